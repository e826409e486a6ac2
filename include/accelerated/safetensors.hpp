#pragma once
// safetensors, the format the model hubs use (huggingface/safetensors): an 8-byte little-endian length N, N bytes of
// JSON ({"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {"k": "v"}},
// padded with spaces), then the tensors' raw little-endian bytes, each at its offsets from the end of the header.
//
//   accelerated::save_safetensors(model, "model.safetensors", {{"format", "pt"}});
//   auto file = accelerated::read_safetensors("model.safetensors");   // file.tensors, file.metadata
//   accelerated::load_state_dict(model, "model.safetensors");         // state_dict.hpp: either format, by content
//
// The reader checks the whole header before it reads a byte of a tensor (every dtype, shape and offset; the tensors
// tile the data exactly, as the format's own reader demands), and reads each tensor with pread straight into its own
// storage: the file is never held twice, and a file cut short under the reader is an error naming it. (A memory
// map would also hold it once, but a file truncated while mapped kills the process with SIGBUS.)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <locale>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "detail/atomic_file.hpp"
#include "detail/compat.hpp"
#include "detail/json.hpp"

namespace accelerated {

// A safetensors file's contents: its tensors in the header's order, on the CPU, and its "__metadata__".
struct SafetensorsFile {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::map<std::string, std::string> metadata;
};

namespace detail::safetensors {

static_assert(std::endian::native == std::endian::little, "safetensors' bytes are little-endian, as this machine's");

inline constexpr std::uint64_t max_header_bytes = 100'000'000;  // the format's own reader's limit
inline constexpr std::size_t max_dims = 64;
// Empty tensors take no bytes of data, so a header could name millions of them: each costs memory far beyond its
// bytes in the file. The largest checkpoints name tens of thousands of tensors per file.
inline constexpr std::size_t max_tensors = std::size_t{1} << 18;

// safetensors' dtype names and LibTorch's types (the newer ones where this LibTorch has them).
inline const std::vector<std::pair<std::string, c10::ScalarType>>& dtypes() {
  static const auto table = [] {
    std::vector<std::pair<std::string, c10::ScalarType>> t{
        {"F64", torch::kDouble}, {"F32", torch::kFloat}, {"F16", torch::kHalf}, {"BF16", torch::kBFloat16},
        {"I64", torch::kLong},   {"I32", torch::kInt},   {"I16", torch::kShort}, {"I8", torch::kChar},
        {"U8", torch::kByte},    {"BOOL", torch::kBool}, {"C64", torch::kComplexFloat}};
    for (const auto& [name, type] : compat::newer_safetensors_dtypes()) t.emplace_back(name, type);
    return t;
  }();
  return table;
}

// A name or a value of a file, fit to print in a message: control bytes shown as '?', at most 64 bytes.
inline std::string printable(std::string_view text) {
  std::string out;
  for (const char c : text.substr(0, 64)) out += (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) ? '?' : c;
  return text.size() > 64 ? out + "..." : out;
}

// True when `text` is UTF-8 as the standard defines it (no overlong forms, no surrogates, nothing past U+10FFFF):
// the format's header is UTF-8, and its own reader refuses anything else.
inline bool valid_utf8(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t n = 0;
    std::uint32_t code = 0, least = 0;
    if ((c & 0xe0) == 0xc0) {
      n = 1, code = c & 0x1f, least = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2, code = c & 0x0f, least = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3, code = c & 0x07, least = 0x10000;
    } else {
      return false;
    }
    if (i + n >= text.size()) return false;  // cut short
    for (std::size_t k = 1; k <= n; ++k) {
      const auto follow = static_cast<unsigned char>(text[i + k]);
      if ((follow & 0xc0) != 0x80) return false;
      code = (code << 6) | (follow & 0x3f);
    }
    if (code < least || code > 0x10ffff || (code >= 0xd800 && code < 0xe000)) return false;
    i += n + 1;
  }
  return true;
}

// What the header says of one tensor. Offsets count from the first byte after the header.
struct Entry {
  std::string name;
  c10::ScalarType dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
};

struct Header {
  std::vector<Entry> entries;  // the header's order
  std::map<std::string, std::string> metadata;
  std::uint64_t data_start = 0;  // 8 + N
};

// The subset of JSON a safetensors header is: objects, arrays of non-negative integers, and strings. Anything else
// is an error naming the file and the byte where it is, so that a hostile header never costs more than its size.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, std::string where) : text_(text), where_(std::move(where)) {}

  Header parse(std::uint64_t data_bytes) {
    Header header;
    if (text_.empty() || text_[0] != '{') fail("does not start with '{'");  // as the format's own reader demands
    std::map<std::string, bool> seen;
    members([&](std::string key) {
      if (!seen.emplace(key, true).second) fail("names '" + printable(key) + "' twice");
      if (key == "__metadata__") {
        header.metadata = metadata();
      } else {
        if (header.entries.size() == max_tensors) fail("names more than " + std::to_string(max_tensors) + " tensors");
        header.entries.push_back(entry(std::move(key), data_bytes));
      }
    });
    skip_space();
    if (at_ != text_.size()) fail("has bytes after its JSON object");
    return header;
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(where_ + ": the header " + what + " (at byte " + std::to_string(at_) + " of " +
                             std::to_string(text_.size()) + ")");
  }

 private:
  char peek() {
    if (at_ >= text_.size()) fail("ends early");
    return text_[at_];
  }
  void skip_space() {
    while (at_ < text_.size() && (text_[at_] == ' ' || text_[at_] == '\n' || text_[at_] == '\r' || text_[at_] == '\t')) {
      ++at_;
    }
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) fail(std::string("has '") + printable(std::string(1, text_[at_])) + "' where '" + c + "' belongs");
    ++at_;
  }
  unsigned hex_digit() {
    const char c = peek();
    ++at_;
    if (c >= '0' && c <= '9') return static_cast<unsigned>(c - '0');
    if (c >= 'a' && c <= 'f') return static_cast<unsigned>(c - 'a' + 10);
    if (c >= 'A' && c <= 'F') return static_cast<unsigned>(c - 'A' + 10);
    fail("has a \\u escape that is not four hex digits");
  }
  unsigned code_unit() {
    unsigned u = 0;
    for (int i = 0; i < 4; ++i) u = (u << 4) | hex_digit();
    return u;
  }
  static void append_utf8(std::string& out, unsigned c) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xc0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3f));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xe0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (c & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (c & 0x3f));
    }
  }
  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      const char c = peek();
      ++at_;
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("has a control character inside a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      const char e = peek();
      ++at_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned c1 = code_unit();
          if (c1 >= 0xd800 && c1 < 0xdc00) {  // a surrogate pair
            if (peek() != '\\') fail("has a lone surrogate in a \\u escape");
            ++at_;
            if (peek() != 'u') fail("has a lone surrogate in a \\u escape");
            ++at_;
            const unsigned c2 = code_unit();
            if (c2 < 0xdc00 || c2 >= 0xe000) fail("has a lone surrogate in a \\u escape");
            c1 = 0x10000 + ((c1 - 0xd800) << 10) + (c2 - 0xdc00);
          } else if (c1 >= 0xdc00 && c1 < 0xe000) {
            fail("has a lone surrogate in a \\u escape");
          }
          append_utf8(out, c1);
          break;
        }
        default: fail(std::string("has an unknown escape '\\") + printable(std::string(1, e)) + "'");
      }
    }
  }
  std::uint64_t integer(const std::string& what) {
    skip_space();
    if (peek() < '0' || peek() > '9') fail("has " + what + " that is not a non-negative integer");
    if (peek() == '0' && at_ + 1 < text_.size() && text_[at_ + 1] >= '0' && text_[at_ + 1] <= '9') {
      fail("has " + what + " with a leading zero, which JSON does not allow");
    }
    std::uint64_t value = 0;
    while (at_ < text_.size() && text_[at_] >= '0' && text_[at_] <= '9') {
      const auto digit = static_cast<std::uint64_t>(text_[at_] - '0');
      if (value > (static_cast<std::uint64_t>(INT64_MAX) - digit) / 10) fail("has " + what + " beyond 2^63");
      value = value * 10 + digit;
      ++at_;
    }
    if (at_ < text_.size() && (text_[at_] == '.' || text_[at_] == 'e' || text_[at_] == 'E')) {
      fail("has " + what + " that is not an integer");
    }
    return value;
  }
  // [a, b, ...] of integers, at most `most` of them.
  std::vector<std::uint64_t> integers(const std::string& what, std::size_t most) {
    expect('[');
    std::vector<std::uint64_t> values;
    skip_space();
    if (peek() == ']') {
      ++at_;
      return values;
    }
    while (true) {
      if (values.size() == most) fail("has " + what + " of more than " + std::to_string(most) + " numbers");
      values.push_back(integer(what));
      skip_space();
      if (peek() == ']') {
        ++at_;
        return values;
      }
      expect(',');
    }
  }
  // { "key": value, ... }: calls on_member(key) to parse each value.
  template <class OnMember>
  void members(OnMember&& on_member) {
    expect('{');
    for (bool first = true;; first = false) {
      skip_space();
      if (peek() == '}') {
        ++at_;
        return;
      }
      if (!first) expect(',');
      auto key = string();
      expect(':');
      on_member(std::move(key));
    }
  }
  std::map<std::string, std::string> metadata() {
    std::map<std::string, std::string> values;
    members([&](std::string key) {
      skip_space();
      if (peek() != '"') fail("has a __metadata__ value that is not a string (key '" + printable(key) + "')");
      auto value = string();
      if (!values.emplace(key, std::move(value)).second) fail("names '" + printable(key) + "' twice in __metadata__");
    });
    return values;
  }
  Entry entry(std::string name, std::uint64_t data_bytes) {
    Entry e;
    e.name = std::move(name);
    const auto tensor = "tensor '" + printable(e.name) + "'";
    bool dtype = false, shape = false, offsets = false;
    members([&](const std::string& field) {
      if (field == "dtype" && !dtype) {
        dtype = true;
        const auto code = string();
        const auto& table = dtypes();
        const auto found = std::find_if(table.begin(), table.end(), [&](const auto& d) { return d.first == code; });
        if (found == table.end()) {
          fail("gives " + tensor + " the dtype '" + printable(code) + "', which this LibTorch (" +
               std::to_string(compat::torch_major) + "." + std::to_string(compat::torch_minor) +
               ") has no type for");
        }
        e.dtype = found->second;
      } else if (field == "shape" && !shape) {
        shape = true;
        for (const auto d : integers("a shape of " + tensor, max_dims)) e.shape.push_back(static_cast<std::int64_t>(d));
      } else if (field == "data_offsets" && !offsets) {
        offsets = true;
        const auto o = integers("data_offsets of " + tensor, 2);
        if (o.size() != 2) fail("has data_offsets of " + tensor + " that are not [begin, end]");
        e.begin = o[0];
        e.end = o[1];
      } else {
        fail("has a field '" + printable(field) + "' in " + tensor + " that is unknown or given twice");
      }
    });
    if (!dtype || !shape || !offsets) fail("does not give " + tensor + " a dtype, a shape and data_offsets");
    // The bytes the shape needs, against the bytes the offsets give. The product of its sizes (a zero counted as one,
    // so that LibTorch's strides cannot overflow either) stays below 2^63.
    std::uint64_t span = static_cast<std::uint64_t>(c10::elementSize(e.dtype));
    bool empty = false;
    for (const auto d : e.shape) {
      empty = empty || d == 0;
      if (__builtin_mul_overflow(span, std::max<std::uint64_t>(static_cast<std::uint64_t>(d), 1), &span) ||
          span > static_cast<std::uint64_t>(INT64_MAX)) {
        fail("gives " + tensor + " a shape of more than 2^63 bytes");
      }
    }
    const std::uint64_t bytes = empty ? 0 : span;
    if (e.begin > e.end || e.end > data_bytes) {
      fail("gives " + tensor + " data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
           "] outside the file's " + std::to_string(data_bytes) + " bytes of data");
    }
    if (e.end - e.begin != bytes) {
      fail("gives " + tensor + " " + std::to_string(e.end - e.begin) + " bytes for a shape that needs " +
           std::to_string(bytes));
    }
    return e;
  }

  std::string_view text_;
  std::string where_;
  std::size_t at_ = 0;
};

// An open safetensors file: the header checked, the tensors read on demand.
class Reader {
 public:
  Reader(const std::filesystem::path& path, const std::string& caller)
      : where_("accelerated::" + caller + ": '" + path.string() + "'") {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error(where_ + " cannot be opened (" + std::strerror(errno) + ")");
    struct stat status {};
    if (::fstat(fd_, &status) != 0 || !S_ISREG(status.st_mode)) {
      ::close(fd_);
      throw std::runtime_error(where_ + " is not a regular file");
    }
    const auto size = static_cast<std::uint64_t>(status.st_size);
    try {
      if (size < 8) fail("is " + std::to_string(size) + " bytes long, shorter than a safetensors header's length");
      unsigned char length[8];
      read_at(length, 8, 0);
      std::uint64_t n = 0;
      for (int i = 7; i >= 0; --i) n = (n << 8) | length[i];
      if (n > max_header_bytes || n > size - 8) {
        fail("says its header is " + std::to_string(n) + " bytes long, beyond " +
             (n > max_header_bytes ? "the format's limit of 100 MB" : "the file's " + std::to_string(size) + " bytes"));
      }
      std::string text(static_cast<std::size_t>(n), '\0');
      read_at(text.data(), text.size(), 8);
      if (!valid_utf8(text)) fail("has a header that is not UTF-8");
      header_ = HeaderParser(text, where_).parse(size - 8 - n);
      header_.data_start = 8 + n;
      check_tiling(size - 8 - n);
    } catch (...) {
      ::close(fd_);
      throw;
    }
  }
  ~Reader() { ::close(fd_); }
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  const Header& header() const { return header_; }
  const std::string& where() const { return where_; }

  // The entry's tensor, read into a new CPU tensor of its own.
  torch::Tensor read(const Entry& e) const {
    torch::Tensor tensor;
    try {
      tensor = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype));
    } catch (const c10::Error& error) {  // the memory for it (the file may be larger than this machine's memory)
      fail("could not hold tensor '" + printable(e.name) + "': " + error.what_without_backtrace());
    }
    if (e.end > e.begin) read_at(tensor.data_ptr(), static_cast<std::size_t>(e.end - e.begin), header_.data_start + e.begin);
    return tensor;
  }

  // The entry's values written into `target` (of its shape): read straight into its memory where it is a contiguous
  // CPU tensor of the same dtype (no copy held at all), else through a tensor of the file's dtype.
  void read_into(const Entry& e, const torch::Tensor& target) const {
    if (target.device().is_cpu() && target.scalar_type() == e.dtype && target.is_contiguous() &&
        target.sizes() == c10::IntArrayRef(e.shape)) {
      if (e.end > e.begin) read_at(target.data_ptr(), static_cast<std::size_t>(e.end - e.begin), header_.data_start + e.begin);
      target.unsafeGetTensorImpl()->bump_version();  // an in-place write, as copy_ would count it
      return;
    }
    const auto values = read(e);
    try {
      target.copy_(values);
    } catch (const c10::Error& error) {
      fail("could not copy tensor '" + printable(e.name) + "' into the model: " + error.what_without_backtrace());
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw std::runtime_error(where_ + " " + what); }

  void read_at(void* into, std::size_t bytes, std::uint64_t offset) const {
    auto* out = static_cast<char*>(into);
    std::size_t done = 0;
    while (done < bytes) {
      const auto n = ::pread(fd_, out + done, bytes - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail(std::string("could not be read (") + std::strerror(errno) + ")");
      if (n == 0) fail("ended at byte " + std::to_string(offset + done) + ": it was cut short while being read");
      done += static_cast<std::size_t>(n);
    }
  }

  // The tensors must cover the data exactly, in some order, without a gap or an overlap (as the format's reader
  // demands): no byte of the file is two tensors', and none is unaccounted for.
  void check_tiling(std::uint64_t data_bytes) const {
    std::vector<const Entry*> order;
    for (const auto& e : header_.entries) order.push_back(&e);
    std::stable_sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::uint64_t next = 0;
    for (const auto* e : order) {
      if (e->begin != next) {
        fail("gives tensor '" + printable(e->name) + "' data_offsets [" + std::to_string(e->begin) + ", " +
             std::to_string(e->end) + "] where the tensors before it end at " + std::to_string(next) +
             " (a gap or an overlap)");
      }
      next = e->end;
    }
    if (next != data_bytes) {
      fail("has " + std::to_string(data_bytes) + " bytes of data, but its tensors cover " + std::to_string(next));
    }
  }

  std::string where_;
  int fd_ = -1;
  Header header_;
};

// True when the file's first bytes are a safetensors header's: a length, then '{'. (A zip, torch.save's format, has
// its compression method there, 0 or 8.) A length beyond the file is the safetensors reader's error to name.
inline bool looks_like_safetensors(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  unsigned char start[9];
  const auto n = ::pread(fd, start, sizeof start, 0);
  ::close(fd);
  return n == static_cast<ssize_t>(sizeof start) && start[8] == '{' && std::memcmp(start, "PK", 2) != 0;
}

inline std::string dtype_name(c10::ScalarType type) {
  for (const auto& [name, t] : dtypes()) {
    if (t == type) return name;
  }
  return {};
}

}  // namespace detail::safetensors

// Reads every tensor and the metadata of a safetensors file, onto the CPU, in the header's order. A damaged or
// hostile file is a std::runtime_error naming it and what is wrong; nothing is read past a bad header.
inline SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  if (!std::filesystem::is_regular_file(path)) {
    throw std::invalid_argument("accelerated::read_safetensors: path = '" + path.string() + "' is not a file");
  }
  const detail::safetensors::Reader reader(path, "read_safetensors");
  SafetensorsFile file;
  file.metadata = reader.header().metadata;
  for (const auto& e : reader.header().entries) file.tensors.emplace_back(e.name, reader.read(e));
  return file;
}

// Writes named tensors as a safetensors file, atomically, with `metadata` as its "__metadata__". Each tensor is
// copied to the CPU and made contiguous one at a time (a GPU's weights never sit in host memory whole). The tensors
// are laid out largest element first, so that each one's bytes start at a multiple of its element size (the header
// is padded to 8 bytes), as the format's own writer does: a reader may map them in place.
inline void save_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& entries,
                             const std::filesystem::path& path, const std::map<std::string, std::string>& metadata = {}) {
  const std::string where = "accelerated::save_safetensors: '" + path.string() + "'";
  std::map<std::string, bool> names;
  for (const auto& [key, value] : metadata) {
    if (!detail::safetensors::valid_utf8(key) || !detail::safetensors::valid_utf8(value)) {
      throw std::invalid_argument(where + ": metadata '" + detail::safetensors::printable(key) +
                                  "' is not UTF-8, which the format's header must be");
    }
  }
  for (const auto& [name, tensor] : entries) {
    if (name.empty() || name == "__metadata__") {
      throw std::invalid_argument(where + ": a tensor cannot be named '" + name + "' in safetensors");
    }
    if (!detail::safetensors::valid_utf8(name)) {
      throw std::invalid_argument(where + ": tensor '" + detail::safetensors::printable(name) +
                                  "' has a name that is not UTF-8, which the format's header must be");
    }
    if (!names.emplace(name, true).second) throw std::invalid_argument(where + ": two tensors are named '" + name + "'");
    if (!tensor.defined()) throw std::invalid_argument(where + ": tensor '" + name + "' is undefined");
    if (tensor.layout() != torch::kStrided) {
      throw std::invalid_argument(where + ": tensor '" + name + "' is sparse; safetensors holds dense tensors");
    }
    if (detail::safetensors::dtype_name(tensor.scalar_type()).empty()) {
      throw std::invalid_argument(where + ": tensor '" + name + "' is " + std::string(c10::toString(tensor.scalar_type())) +
                                  ", which safetensors has no dtype for");
    }
  }
  std::vector<std::size_t> order(entries.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return entries[a].second.element_size() > entries[b].second.element_size();
  });
  std::ostringstream json;
  json.imbue(std::locale::classic());  // offsets as digits alone, whatever the program's locale groups them by
  json << '{';
  bool first = true;
  if (!metadata.empty()) {
    json << "\"__metadata__\":{";
    for (const auto& [key, value] : metadata) {
      if (!first) json << ',';
      first = false;
      detail::write_json_string(json, key);
      json << ':';
      detail::write_json_string(json, value);
    }
    json << '}';
    first = false;
  }
  std::uint64_t offset = 0;
  for (const auto i : order) {
    const auto& [name, tensor] = entries[i];
    const auto bytes = static_cast<std::uint64_t>(tensor.numel()) * static_cast<std::uint64_t>(tensor.element_size());
    if (!first) json << ',';
    first = false;
    detail::write_json_string(json, name);
    json << ":{\"dtype\":\"" << detail::safetensors::dtype_name(tensor.scalar_type()) << "\",\"shape\":[";
    for (std::int64_t d = 0; d < tensor.dim(); ++d) json << (d ? "," : "") << tensor.size(d);
    json << "],\"data_offsets\":[" << offset << ',' << offset + bytes << "]}";
    offset += bytes;
  }
  json << '}';
  auto header = json.str();
  header.append((8 - header.size() % 8) % 8, ' ');
  detail::write_atomically_to_fd(path, [&](int fd) {
    unsigned char length[8];
    for (int b = 0; b < 8; ++b) length[b] = static_cast<unsigned char>((header.size() >> (8 * b)) & 0xff);
    detail::write_all(fd, length, 8, path);
    detail::write_all(fd, header.data(), header.size(), path);
    for (const auto i : order) {
      torch::Tensor tensor;
      try {
        tensor = entries[i].second.detach().to(torch::kCPU).contiguous();
      } catch (const c10::Error& error) {  // a tensor that cannot be copied out (on the meta device, say)
        throw std::runtime_error(where + ": tensor '" + entries[i].first + "' cannot be copied to the CPU: " +
                                 error.what_without_backtrace());
      }
      detail::write_all(fd, tensor.data_ptr(), tensor.numel() * tensor.element_size(), path);
    }
  });
}

}  // namespace accelerated
