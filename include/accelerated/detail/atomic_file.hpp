#pragma once
// Writes a file so that a crash at any moment leaves either the old file or the new one, never a torn one:
// the bytes go to a temporary file in the same folder, are flushed to disk, and the temporary is renamed over the
// target (rename is atomic within a file system); then the folder is flushed so the rename itself survives.
// A temporary left by a writer that was killed half-way is removed by the next successful write of that file.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

namespace accelerated::detail {

// Temporaries of `path` left by writers that were killed half-way (their process no longer exists).
inline void remove_stale_temporaries(const std::filesystem::path& path) {
  const auto folder = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const auto prefix = path.filename().string() + ".tmp-";
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(folder, error)) {
    const auto name = entry.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    const auto pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
    if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) std::filesystem::remove(entry.path(), error);
  }
}

// "accelerated: cannot write 'path': what (the system's reason)"
inline std::runtime_error write_error(const std::filesystem::path& path, const std::string& what, int error) {
  return std::runtime_error("accelerated: cannot write '" + path.string() + "': " + what + " (" + std::strerror(error) +
                            ")");
}

// Writes `path` atomically: `fill(temporary)` writes the whole content into the temporary file, by its name (so a
// serializer can stream straight into it, holding nothing in memory); then it is flushed and renamed over `path`.
template <class Fill>
void write_atomically(const std::filesystem::path& path, Fill&& fill) {
  auto fail = [&](const std::string& what) { throw write_error(path, what, errno); };
  const auto folder = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  std::error_code status_error;
  const auto status = std::filesystem::status(folder, status_error);
  if (!std::filesystem::is_directory(status)) {
    errno = std::filesystem::exists(status) ? ENOTDIR : ENOENT;
    fail(std::filesystem::exists(status) ? "'" + folder.string() + "' is a file, not a folder"
                                         : "folder '" + folder.string() + "' does not exist");
  }
  const auto temporary = path.string() + ".tmp-" + std::to_string(::getpid());
  try {
    fill(temporary);
  } catch (...) {
    ::unlink(temporary.c_str());
    throw;
  }
  const int fd = ::open(temporary.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("the temporary file was not written");
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(temporary.c_str());
    fail("flush failed");
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    ::unlink(temporary.c_str());
    fail("rename failed");
  }
  if (const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
  remove_stale_temporaries(path);
}

// Writes all of `bytes` to `fd` (a temporary file of `path`), across partial writes and interruptions.
inline void write_all(int fd, const void* bytes, std::size_t size, const std::filesystem::path& path) {
  const auto* data = static_cast<const char*>(bytes);
  std::size_t done = 0;
  while (done < size) {
    const auto n = ::write(fd, data + done, size - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw write_error(path, "write failed", errno);
    }
    done += static_cast<std::size_t>(n);
  }
}

// Writes `path` atomically from a writer that streams into a file descriptor: `fill(fd)` is called with the
// temporary file open for writing.
template <class Fill>
void write_atomically_to_fd(const std::filesystem::path& path, Fill&& fill) {
  write_atomically(path, [&](const std::string& temporary) {
    const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw write_error(path, "cannot create a temporary file", errno);
    struct Close {
      int fd;
      ~Close() { ::close(fd); }
    } close{fd};
    fill(fd);
  });
}

inline void write_file_atomically(const std::filesystem::path& path, std::string_view bytes) {
  write_atomically_to_fd(path, [&](int fd) { write_all(fd, bytes.data(), bytes.size(), path); });
}

}  // namespace accelerated::detail
