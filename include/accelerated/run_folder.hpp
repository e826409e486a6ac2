#pragma once
// A run's folder of training states (callbacks::SaveTrainingState's save_dir, the preemption save): the states
// (*.pt) and a file `latest` that names the newest, written atomically after the state itself, so `latest` never
// names a state that was not completely written.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include "detail/atomic_file.hpp"

namespace accelerated {

// The newest state saved in `dir`, as `latest` names it, if any.
inline std::optional<std::filesystem::path> latest_training_state(const std::filesystem::path& dir) {
  std::ifstream in(dir / "latest", std::ios::binary);
  if (!in) return std::nullopt;
  // Its first line, read no further than a file name's longest (255 bytes): a damaged `latest` of gigabytes without a
  // newline is not read whole. Only a plain file name counts: "../x" or "/x" must not lead out of the folder.
  std::string name(256, '\0');
  in.read(name.data(), static_cast<std::streamsize>(name.size()));
  name.resize(static_cast<std::size_t>(in.gcount()));
  name = name.substr(0, name.find('\n'));
  if (name.empty() || name.size() > 255 || name == "." || name == ".." ||
      name.find_first_of(std::string("/\0", 2)) != std::string::npos) {
    return std::nullopt;
  }
  const auto path = dir / name;
  if (!std::filesystem::is_regular_file(path)) return std::nullopt;
  return path;
}

// Every state in `dir` to try when resuming, best first: the one `latest` names, then the other *.pt files,
// newest written first (a fallback order only: the state `latest` names is always tried first).
inline std::vector<std::filesystem::path> training_states_newest_first(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> states;
  const auto latest = latest_training_state(dir);
  if (latest) states.push_back(*latest);
  std::vector<std::pair<std::filesystem::file_time_type, std::filesystem::path>> others;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    if (!entry.is_regular_file() || entry.path().extension() != ".pt") continue;
    if (latest && std::filesystem::equivalent(entry.path(), *latest, error)) continue;
    others.emplace_back(entry.last_write_time(error), entry.path());
  }
  std::sort(others.begin(), others.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second > b.second;
  });
  for (auto& [time, path] : others) states.push_back(std::move(path));
  return states;
}

// Names `file_name` (a state inside `dir`) as the newest.
inline void record_latest_training_state(const std::filesystem::path& dir, const std::string& file_name) {
  detail::write_file_atomically(dir / "latest", file_name + "\n");
}

}  // namespace accelerated
