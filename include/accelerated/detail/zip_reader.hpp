#pragma once
// The zip layer of a torch.save file, read with every record checked before it is trusted. LibTorch's
// PyTorchStreamReader allocates whatever size a record's header claims (a 5 KB file can ask for a terabyte) and reads
// through a FILE*; this reader parses the central directory itself and refuses a record that is compressed, that
// claims more bytes than the file has, that overlaps the directory or that appears twice. Records are read with
// pread straight into the caller's memory and their CRC-32 is checked, so a file that another process is still
// writing or rewriting (a torn read on a shared disk) is an error naming it, never a crash or a silent wrong value:
// the file is never mapped, so it shrinking under us cannot raise SIGBUS.
//
// torch.save (Python and LibTorch) stores records uncompressed under one folder ("archive/data.pkl",
// "archive/data/0", ...); names here are given without that folder, as PyTorchStreamReader gives them. torch.jit.save
// deflates some records (its code): a reader made with `Deflated::allowed` accepts those, and check() inflates them
// (no further than the size the directory gives) to check their CRC-32.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace accelerated::detail {

class ZipReader {
 public:
  struct Record {
    std::uint64_t offset = 0;  // of the record's bytes in the file
    std::uint64_t size = 0;
    std::uint32_t crc = 0;
    std::uint64_t packed = 0;  // the bytes it takes in the file (size, unless deflated)
    bool deflated = false;
  };
  enum class Deflated { refused, allowed };

  // Opens `path` and reads its central directory; `caller` names the public function in errors.
  ZipReader(const std::filesystem::path& path, std::string caller, Deflated deflated = Deflated::refused)
      : file_(path.string()), caller_(std::move(caller)), deflated_allowed_(deflated == Deflated::allowed) {
    fd_ = ::open(file_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) fail(std::string("cannot be opened (") + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd_);
      fail("is not a regular file");
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
    try {
      read_directory();
    } catch (...) {
      ::close(fd_);
      throw;
    }
  }
  ~ZipReader() { ::close(fd_); }
  ZipReader(const ZipReader&) = delete;
  ZipReader& operator=(const ZipReader&) = delete;

  const std::string& file() const { return file_; }
  std::uint64_t file_size() const { return size_; }
  bool has(const std::string& name) const { return records_.count(name) != 0; }
  const std::map<std::string, Record>& records() const { return records_; }

  // The record's size; an error naming it when the file has no such record.
  std::uint64_t size_of(const std::string& name) const { return find(name).size; }

  // Reads the whole record into `out` (size_of(name) bytes) and checks its CRC-32.
  void read(const std::string& name, void* out) const {
    const auto& record = find(name);
    if (record.deflated) fail("has a compressed record '" + name + "', which this reader cannot read");
    auto* bytes = static_cast<unsigned char*>(out);
    read_at(record.offset, bytes, record.size, "record '" + name + "'");
    std::uint32_t crc = 0;
    for (std::uint64_t done = 0; done < record.size;) {  // crc32 takes at most 4 GB a call
      const auto chunk = std::min<std::uint64_t>(record.size - done, std::uint64_t{1} << 30);
      crc = static_cast<std::uint32_t>(::crc32(crc, bytes + done, static_cast<uInt>(chunk)));
      done += chunk;
    }
    if (crc != record.crc) {
      fail("has a damaged record '" + name + "' (its CRC-32 does not match: changed while it was read, or corrupt)");
    }
  }
  // Checks the record's CRC-32 (inflating a deflated one, in pieces, never past its declared size), holding at most
  // its bytes in the file.
  void check(const std::string& name) const {
    const auto& record = find(name);
    if (!record.deflated) {
      std::vector<unsigned char> bytes(static_cast<std::size_t>(record.size));
      read(name, bytes.data());
      return;
    }
    // A deflated record may not claim to expand beyond 16 times its bytes plus 64 MB (code compresses 3-10 times):
    // its declared size is what the loader that reads it next allocates.
    if (record.size > 16 * record.packed + (std::uint64_t{64} << 20)) {
      fail("has a compressed record '" + name + "' that claims " + std::to_string(record.size) + " bytes from " +
           std::to_string(record.packed) + " (a damaged or hostile file)");
    }
    const auto packed = bytes_at(record.offset, record.packed, "record '" + name + "'");
    z_stream stream{};
    if (::inflateInit2(&stream, -MAX_WBITS) != Z_OK) fail("could not start zlib for record '" + name + "'");
    struct End {
      z_stream* s;
      ~End() { ::inflateEnd(s); }
    } end{&stream};
    stream.next_in = const_cast<unsigned char*>(packed.data());
    stream.avail_in = static_cast<uInt>(std::min<std::uint64_t>(packed.size(), UINT32_MAX));
    std::vector<unsigned char> out(1 << 16);
    std::uint64_t total = 0;
    std::uint32_t crc = 0;
    int status = Z_OK;
    while (status != Z_STREAM_END) {
      stream.next_out = out.data();
      stream.avail_out = static_cast<uInt>(out.size());
      status = ::inflate(&stream, Z_NO_FLUSH);
      if (status != Z_OK && status != Z_STREAM_END) fail("has a damaged compressed record '" + name + "'");
      const auto produced = out.size() - stream.avail_out;
      total += produced;
      if (total > record.size) fail("has a compressed record '" + name + "' that inflates past its declared size");
      crc = static_cast<std::uint32_t>(::crc32(crc, out.data(), static_cast<uInt>(produced)));
      if (produced == 0 && stream.avail_in == 0 && status != Z_STREAM_END) {
        fail("has a compressed record '" + name + "' that ends early");
      }
    }
    if (total != record.size || crc != record.crc) {
      fail("has a damaged record '" + name + "' (its CRC-32 or size does not match: changed while it was read, or "
           "corrupt)");
    }
  }

  std::string read_string(const std::string& name) const {
    std::string out(static_cast<std::size_t>(size_of(name)), '\0');
    read(name, out.data());
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("accelerated::" + caller_ + ": '" + file_ + "' " + what);
  }
  const Record& find(const std::string& name) const {
    const auto found = records_.find(name);
    if (found == records_.end()) fail("has no record '" + name + "' (a damaged file)");
    return found->second;
  }
  void read_at(std::uint64_t offset, unsigned char* out, std::uint64_t n, const std::string& what) const {
    std::uint64_t done = 0;
    while (done < n) {
      const auto chunk = static_cast<std::size_t>(std::min<std::uint64_t>(n - done, std::uint64_t{1} << 30));
      const auto got = ::pread(fd_, out + done, chunk, static_cast<off_t>(offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) fail("could not be read at " + what + " (" + std::strerror(errno) + ")");
      if (got == 0) fail("ended before " + what + " (it shrank while it was read: still being written?)");
      done += static_cast<std::uint64_t>(got);
    }
  }
  std::vector<unsigned char> bytes_at(std::uint64_t offset, std::uint64_t n, const std::string& what) const {
    std::vector<unsigned char> out(static_cast<std::size_t>(n));
    read_at(offset, out.data(), n, what);
    return out;
  }
  static std::uint64_t little(const unsigned char* p, int n) {
    std::uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
  }

  void read_directory() {
    constexpr std::uint64_t end_size = 22, locator_size = 20, zip64_end_size = 56, entry_size = 46;
    if (size_ < end_size) {
      fail("is not a zip-format torch.save file (" + std::to_string(size_) + " bytes: truncated, or still being written?)");
    }
    // The end record is in the last 22 + 65535 bytes (its comment is at most 65535 bytes long).
    const auto tail_size = std::min<std::uint64_t>(size_, end_size + 65535);
    const auto tail = bytes_at(size_ - tail_size, tail_size, "its end");
    std::uint64_t end = tail_size - end_size + 1;
    bool found = false;
    while (!found && end > 0) {
      --end;
      found = little(&tail[end], 4) == 0x06054b50 && end + end_size + little(&tail[end + 20], 2) == tail_size;
    }
    if (!found) {
      fail("is not a zip-format torch.save file, or only part of one (no end record: truncated, or still being "
           "written?)");
    }
    const std::uint64_t end_offset = size_ - tail_size + end;
    std::uint64_t count = little(&tail[end + 10], 2);
    std::uint64_t directory_size = little(&tail[end + 12], 4);
    std::uint64_t directory = little(&tail[end + 16], 4);
    std::uint64_t directory_end = end_offset;
    if (count == 0xffff || directory_size == 0xffffffff || directory == 0xffffffff) {  // zip64: files over 4 GB
      if (end_offset < locator_size + zip64_end_size) fail("has a damaged zip64 end record");
      const auto locator = bytes_at(end_offset - locator_size, locator_size, "its zip64 locator");
      if (little(locator.data(), 4) != 0x07064b50) fail("has no zip64 locator where its end record needs one");
      const auto at = little(&locator[8], 8);
      if (at > end_offset - locator_size - zip64_end_size) fail("has a zip64 end record outside the file");
      const auto record = bytes_at(at, zip64_end_size, "its zip64 end record");
      if (little(record.data(), 4) != 0x06064b50) fail("has a damaged zip64 end record");
      count = little(&record[32], 8);
      directory_size = little(&record[40], 8);
      directory = little(&record[48], 8);
      directory_end = at;
    }
    if (directory > directory_end || directory_size > directory_end - directory) {
      fail("has a central directory outside the file (offset " + std::to_string(directory) + ", " +
           std::to_string(directory_size) + " bytes, in a file of " + std::to_string(size_) + ": truncated?)");
    }
    if (count > directory_size / entry_size) {
      fail("claims " + std::to_string(count) + " records in a directory of " + std::to_string(directory_size) +
           " bytes (a damaged file)");
    }
    const auto entries = bytes_at(directory, directory_size, "its central directory");
    std::string folder;
    std::vector<std::tuple<std::uint64_t, std::uint64_t, std::string>> spans;  // local header to data's end, name
    std::uint64_t pos = 0;
    for (std::uint64_t i = 0; i < count; ++i) {
      const auto where = " (directory entry " + std::to_string(i) + ")";
      if (directory_size - pos < entry_size || little(&entries[pos], 4) != 0x02014b50) {
        fail("has a damaged central directory" + where);
      }
      const unsigned char* e = &entries[pos];
      const auto method = little(e + 10, 2);
      const auto crc = static_cast<std::uint32_t>(little(e + 16, 4));
      std::uint64_t packed = little(e + 20, 4), size = little(e + 24, 4), local = little(e + 42, 4);
      const auto name_length = little(e + 28, 2), extra_length = little(e + 30, 2), comment_length = little(e + 32, 2);
      if (directory_size - pos - entry_size < name_length + extra_length + comment_length) {
        fail("has a damaged central directory" + where);
      }
      std::string name(reinterpret_cast<const char*>(e + entry_size), name_length);
      // The zip64 extra field holds, in this order, whichever of the three were too big for their 4 bytes.
      for (std::uint64_t x = 0; x + 4 <= extra_length;) {
        const unsigned char* field = e + entry_size + name_length + x;
        const auto id = little(field, 2), length = little(field + 2, 2);
        if (x + 4 + length > extra_length) fail("has a damaged extra field in record '" + name + "'");
        if (id == 0x0001) {
          std::uint64_t at = 4;
          for (auto* value : {&size, &packed, &local}) {
            if (*value != 0xffffffff) continue;
            if (at + 8 > 4 + length) fail("has a damaged zip64 field in record '" + name + "'");
            *value = little(field + at, 8);
            at += 8;
          }
        }
        x += 4 + length;
      }
      pos += entry_size + name_length + extra_length + comment_length;

      const auto slash = name.find('/');
      if (slash == std::string::npos) fail("has a record '" + name + "' outside the archive's folder");
      if (folder.empty()) folder = name.substr(0, slash + 1);
      if (name.compare(0, folder.size(), folder) != 0) {
        fail("has records in two folders ('" + folder + "' and '" + name + "')");
      }
      const bool deflated = deflated_allowed_ && method == 8;
      if (!deflated && (method != 0 || packed != size)) {
        fail("has a compressed record '" + name + "' (method " + std::to_string(method) +
             "); torch.save stores records uncompressed");
      }
      // The record's bytes follow its local header (30 bytes, its name and its own extra field).
      if (local > directory || directory - local < 30) fail("has record '" + name + "' outside the file");
      const auto header = bytes_at(local, 30, "the local header of '" + name + "'");
      if (little(header.data(), 4) != 0x04034b50) fail("has a damaged local header for record '" + name + "'");
      const auto start = local + 30 + little(&header[26], 2) + little(&header[28], 2);
      if (start > directory || packed > directory - start) {
        fail("has record '" + name + "' of " + std::to_string(packed) + " bytes reaching past its data (a file of " +
             std::to_string(size_) + " bytes: truncated or damaged)");
      }
      if (!records_.emplace(name.substr(folder.size()), Record{start, size, crc, packed, deflated}).second) {
        fail("has record '" + name + "' twice");
      }
      spans.push_back({local, start + packed, name});
    }
    // Records may not share bytes: entries pointing at one record would each be read (and allocated) in full, a file
    // asking for many times its size.
    std::sort(spans.begin(), spans.end());
    for (std::size_t i = 1; i < spans.size(); ++i) {
      if (std::get<0>(spans[i]) < std::get<1>(spans[i - 1])) {
        fail("has records '" + std::get<2>(spans[i - 1]) + "' and '" + std::get<2>(spans[i]) +
             "' that share bytes (a damaged or hostile file)");
      }
    }
  }

  std::string file_;
  std::string caller_;
  bool deflated_allowed_ = false;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  std::map<std::string, Record> records_;
};

}  // namespace accelerated::detail
