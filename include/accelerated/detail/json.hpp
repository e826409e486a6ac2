#pragma once
// A minimal JSON object writer: enough for run configs, metrics and benchmark reports, and no dependency.
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <limits>
#include <optional>
#include <ostream>
#include <string_view>
#include <type_traits>
#include <vector>

namespace accelerated::detail {

inline void write_json_string(std::ostream& out, std::string_view text) {
  out << '"';
  for (const char c : text) {
    switch (c) {
      case '"': out << "\\\""; break;
      case '\\': out << "\\\\"; break;
      case '\n': out << "\\n"; break;
      case '\t': out << "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out << "\\u" << std::hex << std::setw(4) << std::setfill('0') << int(c) << std::dec << std::setfill(' ');
        } else {
          out << c;
        }
    }
  }
  out << '"';
}

template <class T>
void write_json_value(std::ostream& out, const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    out << (value ? "true" : "false");
  } else if constexpr (std::is_floating_point_v<T>) {
    if (std::isfinite(value)) {
      out << std::setprecision(std::numeric_limits<double>::max_digits10) << static_cast<double>(value);
    } else {
      out << "null";  // JSON has no NaN or Inf
    }
  } else if constexpr (std::is_arithmetic_v<T>) {
    out << value;
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    write_json_string(out, value);
  } else {
    static_assert(!sizeof(T*), "accelerated::detail::write_json_value: unsupported type");
  }
}

template <class T>
void write_json_value(std::ostream& out, const std::optional<T>& value) {
  if (value) {
    write_json_value(out, *value);
  } else {
    out << "null";
  }
}

template <class T>
void write_json_value(std::ostream& out, const std::vector<T>& values) {
  out << '[';
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i) out << ',';
    write_json_value(out, values[i]);
  }
  out << ']';
}

class JsonObject {
 public:
  explicit JsonObject(std::ostream& out) : out_(out) { out_ << '{'; }
  template <class T>
  JsonObject& field(std::string_view name, const T& value) {
    if (!first_) out_ << ',';
    first_ = false;
    write_json_string(out_, name);
    out_ << ':';
    write_json_value(out_, value);
    return *this;
  }
  void close() { out_ << '}'; }

 private:
  std::ostream& out_;
  bool first_ = true;
};

}  // namespace accelerated::detail
