#pragma once
// Reader for the IDX format of (Fashion-)MNIST, gzipped or not (zlib reads both). Every failure names the file:
// missing, not IDX, truncated, or a corrupt gzip stream.
#include <torch/types.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace accelerated::data {

namespace detail {
struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

inline std::size_t read_some(gzFile_s* file, unsigned char* out, std::size_t count, const std::string& path) {
  std::size_t done = 0;
  while (done < count) {
    const auto chunk = static_cast<unsigned>(std::min<std::size_t>(count - done, 1u << 30));
    const int got = gzread(file, out + done, chunk);
    if (got < 0) {
      int code = 0;
      const char* message = gzerror(file, &code);
      throw std::runtime_error("accelerated::data::read_idx: '" + path + "' is corrupt (" + message + ")");
    }
    if (got == 0) break;
    done += static_cast<std::size_t>(got);
  }
  return done;
}
}  // namespace detail

// Reads an unsigned-byte IDX file into a uint8 tensor of the file's shape.
inline torch::Tensor read_idx(const std::filesystem::path& path) {
  const std::string name = path.string();
  if (!std::filesystem::is_regular_file(path)) {
    throw std::runtime_error("accelerated::data::read_idx: '" + name + "' does not exist or is not a file");
  }
  detail::GzFile file(gzopen(name.c_str(), "rb"));
  if (!file) throw std::runtime_error("accelerated::data::read_idx: cannot open '" + name + "'");

  unsigned char magic[4];
  if (detail::read_some(file.get(), magic, 4, name) != 4) {
    throw std::runtime_error("accelerated::data::read_idx: '" + name + "' is truncated: no IDX header");
  }
  if (magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 || magic[3] == 0 || magic[3] > 4) {
    throw std::runtime_error("accelerated::data::read_idx: '" + name +
                             "' is not an unsigned-byte IDX file (expected magic 00 00 08 0n, 1 <= n <= 4)");
  }
  const int dims = magic[3];
  std::vector<std::int64_t> shape(static_cast<std::size_t>(dims));
  std::int64_t total = 1;
  for (auto& d : shape) {
    unsigned char b[4];
    if (detail::read_some(file.get(), b, 4, name) != 4) {
      throw std::runtime_error("accelerated::data::read_idx: '" + name + "' is truncated inside its header");
    }
    d = (std::int64_t{b[0]} << 24) | (std::int64_t{b[1]} << 16) | (std::int64_t{b[2]} << 8) | std::int64_t{b[3]};
    if (d == 0) throw std::runtime_error("accelerated::data::read_idx: '" + name + "' has a zero dimension");
    if (d > (std::int64_t{1} << 40) / total) {  // checked before multiplying: four dimensions can overflow 64 bits
      throw std::runtime_error("accelerated::data::read_idx: '" + name + "' declares an implausible size");
    }
    total *= d;
  }
  // Read in chunks that grow with what was read (1 MB, then as much again), so that a header claiming terabytes costs
  // no more than the data the file really holds.
  std::vector<unsigned char> bytes;
  std::size_t have = 0;
  while (have < static_cast<std::size_t>(total)) {
    const auto want = std::min<std::size_t>(static_cast<std::size_t>(total) - have,
                                            std::max<std::size_t>(std::size_t{1} << 20, have));
    bytes.resize(have + want);
    const auto got = detail::read_some(file.get(), bytes.data() + have, want, name);
    have += got;
    if (got < want) {
      throw std::runtime_error("accelerated::data::read_idx: '" + name + "' is truncated: expected " +
                               std::to_string(total) + " data bytes, found " + std::to_string(have));
    }
  }
  auto tensor = torch::empty(shape, torch::kUInt8);
  std::copy(bytes.begin(), bytes.end(), tensor.data_ptr<std::uint8_t>());
  return tensor;
}

}  // namespace accelerated::data
