#pragma once
// TensorBoard's event files without TensorFlow or protobuf. A file is a sequence of TFRecords:
//   uint64 length, uint32 masked_crc32c(length), bytes data, uint32 masked_crc32c(data)   (little-endian)
// where masked_crc = ((crc >> 15) | (crc << 17)) + 0xa282ead8 and the CRC is CRC-32C (Castagnoli). Each record's data
// is a tensorflow.Event message (tensorflow/core/util/event.proto), encoded here by hand:
//   Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//   Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
// The first event carries file_version "brain.Event:2", as TensorFlow's writer does.
#include <array>
#include <bit>
#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace accelerated::detail::tensorboard {

// CRC-32C, reflected polynomial 0x82F63B78, table-driven.
inline std::uint32_t crc32c(std::string_view data) {
  static const auto table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  std::uint32_t crc = 0xFFFFFFFFu;
  for (const char ch : data) crc = table[(crc ^ static_cast<std::uint8_t>(ch)) & 0xFFu] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

inline std::uint32_t masked_crc32c(std::string_view data) {
  const auto crc = crc32c(data);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

// Protocol buffers' wire format, the four pieces an Event needs.
inline void put_varint(std::string& out, std::uint64_t value) {
  while (value >= 0x80) {
    out += static_cast<char>((value & 0x7F) | 0x80);
    value >>= 7;
  }
  out += static_cast<char>(value);
}
inline void put_fixed(std::string& out, std::uint64_t bits, int bytes) {
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((bits >> (8 * i)) & 0xFF);
}
inline void put_bytes_field(std::string& out, int field, std::string_view bytes) {
  put_varint(out, (static_cast<std::uint64_t>(field) << 3) | 2);
  put_varint(out, bytes.size());
  out.append(bytes);
}

// An Event: wall time, step, and either the file version or scalars (tag, value).
inline std::string encode_event(double wall_time, std::int64_t step, std::string_view file_version,
                                const std::vector<std::pair<std::string, float>>& scalars) {
  std::string event;
  put_varint(event, (1 << 3) | 1);  // wall_time, fixed64
  put_fixed(event, std::bit_cast<std::uint64_t>(wall_time), 8);
  put_varint(event, (2 << 3) | 0);  // step, varint
  put_varint(event, static_cast<std::uint64_t>(step));
  if (!file_version.empty()) put_bytes_field(event, 3, file_version);
  if (!scalars.empty()) {
    std::string summary;
    for (const auto& [tag, value] : scalars) {
      std::string v;
      put_bytes_field(v, 1, tag);
      put_varint(v, (2 << 3) | 5);  // simple_value, fixed32
      put_fixed(v, std::bit_cast<std::uint32_t>(value), 4);
      put_bytes_field(summary, 1, v);
    }
    put_bytes_field(event, 5, summary);
  }
  return event;
}

// One TFRecord around `data`.
inline std::string frame_record(std::string_view data) {
  std::string length;
  put_fixed(length, data.size(), 8);
  std::string record = length;
  put_fixed(record, masked_crc32c(length), 4);
  record.append(data);
  put_fixed(record, masked_crc32c(data), 4);
  return record;
}

// Appends events to one file, flushed after each, so that TensorBoard shows a run while it goes on.
class EventFileWriter {
 public:
  EventFileWriter(const std::string& path, double wall_time) : path_(path), out_(path, std::ios::binary) {
    if (!out_) throw std::invalid_argument("accelerated::TensorBoard: cannot create '" + path + "'");
    write(encode_event(wall_time, 0, "brain.Event:2", {}));
  }
  void scalars(double wall_time, std::int64_t step, const std::vector<std::pair<std::string, float>>& values) {
    if (!values.empty()) write(encode_event(wall_time, step, {}, values));
  }
  const std::string& path() const { return path_; }

 private:
  void write(const std::string& event) {
    out_ << frame_record(event);
    out_.flush();
    if (!out_) throw std::runtime_error("accelerated::TensorBoard: cannot write '" + path_ + "'");
  }
  std::string path_;
  std::ofstream out_;
};

}  // namespace accelerated::detail::tensorboard
