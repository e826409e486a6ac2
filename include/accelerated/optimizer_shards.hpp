#pragma once
// Saves of a sharded optimizer state (DataParallelOptions::shard_optimizer_state): no rank holds the whole state, so
// each rank writes its own shard, in parallel, beside the main file rank 0 writes:
//   step_100.pt                            the checkpoint or training state, with `optimizer_shards` (the number of
//                                          shards and the save's nonce) where `optimizer` would be
//   step_100.pt.<nonce>.shard-<r>-of-<N>   rank r's optimizer state, in LibTorch's own format (every parameter in
//                                          its param_groups, the state of rank r's)
// The nonce, drawn for each save, keeps a save from overwriting the shards of the file it replaces: the main file is
// written only once every shard is complete, so a crash at any moment leaves either the old file with its shards or
// the new one with its shards. A load reads every shard into the optimizer (LibTorch's Optimizer::load adds the state
// of the parameters a file has and leaves the others), so a sharded file loads in one process, unsharded, or sharded
// (the next run start keeps only this rank's part). Every rank reads every shard onto its device: while loading,
// each holds the whole state. consolidate_optimizer_shards merges the shards into one file that needs none of them.
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "detail/archive_file.hpp"
#include "distributed/call_site.hpp"

namespace accelerated::detail {

inline constexpr std::int64_t optimizer_shard_format_version = 1;

// What the main file records of its shards.
struct ShardManifest {
  std::int64_t world_size = 1;
  std::string nonce;  // 16 hex digits
};

inline std::filesystem::path shard_path(const std::filesystem::path& path, const std::string& nonce, std::int64_t rank,
                                        std::int64_t world_size) {
  return path.string() + "." + nonce + ".shard-" + std::to_string(rank) + "-of-" + std::to_string(world_size);
}

// The shard files beside `path`, of any save (not the temporary files of one being written).
inline std::vector<std::filesystem::path> shard_files(const std::filesystem::path& path) {
  std::vector<std::filesystem::path> found;
  const auto prefix = path.filename().string() + ".";
  std::error_code error;
  const auto dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    const auto name = entry.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    const auto at = name.find(".shard-", prefix.size());
    if (at == std::string::npos || name.find(".tmp-") != std::string::npos) continue;
    found.push_back(entry.path());
  }
  return found;
}

// Removes a saved file (an error when it cannot) and its shards (a rotation).
inline void remove_training_state(const std::filesystem::path& path) {
  std::filesystem::remove(path);
  std::error_code ignored;
  for (const auto& shard : shard_files(path)) std::filesystem::remove(shard, ignored);
}

inline void write_shard_manifest(torch::serialize::OutputArchive& archive, const ShardManifest& manifest) {
  torch::serialize::OutputArchive shards;
  shards.write("world_size", torch::tensor(manifest.world_size, torch::kLong));
  shards.write("nonce", c10::IValue(manifest.nonce));
  archive.write("optimizer_shards", shards);
}

inline void write_optimizer_shard(const std::filesystem::path& file, const torch::optim::Optimizer& optimizer,
                                  std::int64_t rank, const ShardManifest& manifest, const std::string& optimizer_type) {
  torch::serialize::OutputArchive archive;
  archive.write("accelerated_optimizer_shard_version", torch::tensor(optimizer_shard_format_version, torch::kLong));
  archive.write("rank", torch::tensor(rank, torch::kLong));
  archive.write("world_size", torch::tensor(manifest.world_size, torch::kLong));
  archive.write("nonce", c10::IValue(manifest.nonce));
  archive.write("optimizer_type", c10::IValue(optimizer_type));
  torch::serialize::OutputArchive state;
  optimizer.save(state);
  archive.write("optimizer", state);
  write_archive_file(file, archive);
}

// A number of the file, checked: one integer.
inline std::int64_t read_count(torch::serialize::InputArchive& archive, const std::string& key, const std::string& where) {
  torch::Tensor value;
  if (!archive.try_read(key, value) || value.numel() != 1 || value.scalar_type() != torch::kLong) {
    throw std::runtime_error(where + " has no readable '" + key + "' (one integer)");
  }
  return value.item<std::int64_t>();
}
inline std::string read_text(torch::serialize::InputArchive& archive, const std::string& key, const std::string& where) {
  c10::IValue value;
  if (!archive.try_read(key, value) || !value.isString()) {
    throw std::runtime_error(where + " has no readable '" + key + "' (a string)");
  }
  return value.toStringRef();
}

// optimizer.load(state), with LibTorch's error (another optimizer's state, other shapes) as a runtime_error that
// names `what` (the file and entry) without a backtrace.
inline void load_optimizer_state(torch::optim::Optimizer& optimizer, torch::serialize::InputArchive& state,
                                 const std::string& what) {
  try {
    optimizer.load(state);
  } catch (const c10::Error& error) {
    throw std::runtime_error(what + " does not fit this optimizer: " + error.what_without_backtrace());
  } catch (const std::exception& error) {
    throw std::runtime_error(what + " does not fit this optimizer: " + error.what());
  }
}

// True when the main file's optimizer state is in shards; then calls fn(optimizer entry, optimizer type, where) for
// every shard in rank order, each read onto `device` and checked against the manifest (rank, count, nonce, format).
// A missing or mismatched shard is a runtime_error, as a damaged file is, so that a resume falls back to an older
// state.
template <class Fn>
bool for_each_optimizer_shard(torch::serialize::InputArchive& archive, const std::filesystem::path& path,
                              const std::string& caller, torch::Device device, Fn&& fn) {
  torch::serialize::InputArchive shards;
  if (!archive.try_read("optimizer_shards", shards)) return false;
  const std::string where = "accelerated::" + caller + ": '" + path.string() + "'";
  ShardManifest manifest{read_count(shards, "world_size", where + "'s optimizer_shards"),
                         read_text(shards, "nonce", where + "'s optimizer_shards")};
  if (manifest.world_size < 1 || manifest.world_size > (1 << 20) || manifest.nonce.size() != 16 ||
      manifest.nonce.find_first_not_of("0123456789abcdef") != std::string::npos) {
    throw std::runtime_error(where + " has a damaged optimizer_shards entry (" + std::to_string(manifest.world_size) +
                             " shards, nonce '" + manifest.nonce.substr(0, 32) + "')");
  }
  for (std::int64_t r = 0; r < manifest.world_size; ++r) {
    const auto file = shard_path(path, manifest.nonce, r, manifest.world_size);
    const std::string shard_where = "accelerated::" + caller + ": the optimizer shard '" + file.string() + "' of '" +
                                    path.string() + "'";
    if (!std::filesystem::is_regular_file(file)) {
      throw std::runtime_error(shard_where + " does not exist: a sharded state needs every rank's shard beside it "
                               "(saved to a folder the ranks do not share, or copied without its shards?)");
    }
    auto shard = read_archive_file(file, caller, device);
    const auto expect = [&](const char* field, const std::string& found, const std::string& expected) {
      if (found != expected) {
        throw std::runtime_error(shard_where + " has " + field + " " + found + " where " + expected +
                                 " is expected: it belongs to another save");
      }
    };
    expect("format version", std::to_string(read_count(shard, "accelerated_optimizer_shard_version", shard_where)),
           std::to_string(optimizer_shard_format_version));
    expect("rank", std::to_string(read_count(shard, "rank", shard_where)), std::to_string(r));
    expect("world_size", std::to_string(read_count(shard, "world_size", shard_where)),
           std::to_string(manifest.world_size));
    expect("nonce", read_text(shard, "nonce", shard_where), manifest.nonce);
    const auto type = read_text(shard, "optimizer_type", shard_where);
    torch::serialize::InputArchive state;
    if (!shard.try_read("optimizer", state)) throw std::runtime_error(shard_where + " has no entry 'optimizer'");
    fn(state, type, shard_where);
  }
  return true;
}


// Loads every shard of a sharded file into `optimizer` (LibTorch's Optimizer::load adds each shard's entries); false
// when the file's optimizer state is not sharded.
inline bool load_optimizer_shards(torch::serialize::InputArchive& archive, const std::filesystem::path& path,
                                  torch::optim::Optimizer& optimizer, const std::string& optimizer_type,
                                  const std::string& caller, torch::Device device) {
  return for_each_optimizer_shard(
      archive, path, caller, device,
      [&](torch::serialize::InputArchive& state, const std::string& type, const std::string& where) {
        if (type != optimizer_type) {
          throw std::runtime_error(where + " holds the state of a " + type + ", but this optimizer is a " +
                                   optimizer_type);
        }
        load_optimizer_state(optimizer, state, where);
      });
}

// 64 random bits from rank 0, the same on every rank (one all-reduce of two exactly representable halves).
template <class Distributed>
std::string agreed_nonce(Distributed& distributed) {
  double halves[2] = {0.0, 0.0};
  if (distributed.rank() == 0) {
    std::random_device device;
    halves[0] = static_cast<double>(device());
    halves[1] = static_cast<double>(device());
  }
  const distributed::AtCallSite at(distributed::CallSite::save_outcome);
  distributed.all_reduce_sum(std::span<double>(halves));
  char text[17];
  std::snprintf(text, sizeof text, "%08x%08x", static_cast<unsigned>(halves[0]), static_cast<unsigned>(halves[1]));
  return text;
}

// Whether every rank did its part of a save, agreed in one all-reduce: on a failure every rank runs `undo` and throws
// (the failed rank its own error, the others one naming it and `consequence`), so that no rank waits for a peer that
// gave up.
template <class Distributed, class Undo>
void agree_on_write(Distributed& distributed, std::exception_ptr mine, const std::string& what, Undo&& undo,
                    const std::string& consequence = "the files saved before it are left as they were") {
  const auto failed = distributed::first_rank_where(distributed, mine != nullptr, distributed::CallSite::save_outcome);
  if (!failed) return;
  undo();
  if (mine) std::rethrow_exception(mine);
  throw std::runtime_error(what + " failed on rank " + std::to_string(*failed) + " (its error is raised there); " +
                           consequence);
}

// The save of a checkpoint or training state at `path` by every rank: the shards when `sharded` (each rank its own,
// then agreed), then `write_main(manifest or null)` on rank 0 (agreed), then each rank's shards of the file it
// replaced are removed; then, when `after_written` is given (on every rank alike), it runs on rank 0 and its outcome
// is agreed too (it cannot undo the save). `what` names the save in errors.
template <class Distributed, class WriteMain>
void save_with_shards(Distributed& distributed, const torch::optim::Optimizer* sharded, const std::string& optimizer_type,
                      const std::filesystem::path& path, const std::string& what, WriteMain&& write_main,
                      const std::function<void()>& after_written = {}) {
  const auto rank = distributed.rank();
  std::optional<ShardManifest> manifest;
  std::filesystem::path mine;
  const auto undo = [&] {
    std::error_code ignored;
    if (!mine.empty()) std::filesystem::remove(mine, ignored);
  };
  if (sharded != nullptr) {
    manifest = ShardManifest{distributed.num_processes(), agreed_nonce(distributed)};
    mine = shard_path(path, manifest->nonce, rank, manifest->world_size);
    std::exception_ptr error;
    try {
      if (path.has_parent_path()) {
        std::error_code ignored;  // rank 0 made it; a shared file system may not show it here yet
        std::filesystem::create_directories(path.parent_path(), ignored);
      }
      write_optimizer_shard(mine, *sharded, rank, *manifest, optimizer_type);
    } catch (...) {
      error = std::current_exception();
    }
    agree_on_write(distributed, error, what + " (each rank's optimizer shard)", undo);
  }
  std::exception_ptr error;
  if (rank == 0) {
    try {
      write_main(manifest ? &*manifest : nullptr);
    } catch (...) {
      error = std::current_exception();
    }
  }
  agree_on_write(distributed, error, what, undo);
  // The replaced save's shards: this rank's, and rank 0 also those of ranks this run does not have. Also after an
  // unsharded save (one listing of the folder): the file it replaced may have been sharded.
  std::error_code ignored;
  for (const auto& shard : shard_files(path)) {
    if (shard == mine) continue;
    const auto name = shard.filename().string();
    const auto at = name.rfind(".shard-");
    const auto owner = std::strtoll(name.c_str() + at + 7, nullptr, 10);
    if (owner == rank || (rank == 0 && owner >= distributed.num_processes())) std::filesystem::remove(shard, ignored);
  }
  if (!after_written) return;
  error = nullptr;
  if (rank == 0) {
    try {
      after_written();
    } catch (...) {
      error = std::current_exception();
    }
  }
  agree_on_write(distributed, error, what + ": what follows the write", [] {},
                 "the file and its shards were written");
}

// ---- one file from the shards ------------------------------------------------------------------------------------

// `in`'s entries copied into `out`, nested archives included, except the entry `skip`.
inline void copy_archive(torch::serialize::InputArchive& in, torch::serialize::OutputArchive& out,
                         const std::string& skip = {}) {
  for (const auto& key : in.keys()) {
    if (key == skip) continue;
    torch::serialize::InputArchive nested;
    if (in.try_read(key, nested)) {
      torch::serialize::OutputArchive copy;
      copy_archive(nested, copy);
      out.write(key, copy);
      continue;
    }
    c10::IValue value;
    in.read(key, value);
    if (value.isTensor()) {
      out.write(key, value.toTensor());
    } else {
      out.write(key, value);
    }
  }
}

// The parameter keys of a saved optimizer state, by group: LibTorch names each parameter's state after the address
// of the parameter in the process that saved it, and lists those names in param_groups/<i>/params/<j>.
inline std::vector<std::vector<std::string>> saved_parameter_keys(torch::serialize::InputArchive& optimizer,
                                                                  const std::string& where) {
  torch::serialize::InputArchive groups;
  if (!optimizer.try_read("param_groups", groups)) throw std::runtime_error(where + " has no 'param_groups'");
  std::vector<std::vector<std::string>> keys(
      static_cast<std::size_t>(std::clamp<std::int64_t>(read_count(groups, "param_groups/size", where), 0, 1 << 20)));
  for (std::size_t i = 0; i < keys.size(); ++i) {
    torch::serialize::InputArchive group;
    if (!groups.try_read("param_groups/" + std::to_string(i), group)) {
      throw std::runtime_error(where + " has no parameter group " + std::to_string(i));
    }
    const auto size = read_count(group, "params/size", where + "'s parameter group " + std::to_string(i));
    for (std::int64_t j = 0; j < size && j < (1 << 24); ++j) {
      keys[i].push_back(read_text(group, "params/" + std::to_string(j), where + "'s parameter group " +
                                                                         std::to_string(i)));
    }
  }
  return keys;
}

}  // namespace accelerated::detail

namespace accelerated {

// Writes the checkpoint or training state at `sharded`, saved with DataParallelOptions::shard_optimizer_state, as
// one file at `out` (atomically; `out` may be `sharded` itself): every shard's optimizer state merged into the file's
// own `optimizer` entry, as an unsharded save writes it. The file then loads with no shards beside it: in one
// process, with any number of processes, sharded or not. A file whose optimizer state is not sharded is written as it
// is. A missing or foreign shard is a std::runtime_error naming it.
inline void consolidate_optimizer_shards(const std::filesystem::path& sharded, const std::filesystem::path& out) {
  const std::string caller = "consolidate_optimizer_shards";
  auto file = detail::read_archive_file(sharded, caller, torch::kCPU);
  const std::string where = "accelerated::" + caller + ": '" + sharded.string() + "'";
  // Every shard's parameter states, under shard 0's parameter keys. A key two shards hold (a state saved between a
  // load and the next train(), when each rank still held the whole state) takes the last shard's, as a load does.
  std::map<std::string, std::unique_ptr<torch::serialize::OutputArchive>> states;
  torch::serialize::OutputArchive entry;  // shard 0's optimizer entry but its state: its param_groups are every rank's
  std::vector<std::vector<std::string>> keys;
  std::string type;
  const bool is_sharded = detail::for_each_optimizer_shard(
      file, sharded, caller, torch::kCPU,
      [&](torch::serialize::InputArchive& optimizer, const std::string& shard_type, const std::string& shard_where) {
        auto shard_keys = detail::saved_parameter_keys(optimizer, shard_where);
        if (type.empty()) {
          type = shard_type;
          keys = shard_keys;
          detail::copy_archive(optimizer, entry, "state");
        }
        const auto shapes = [](const auto& groups) {
          std::vector<std::size_t> sizes;
          for (const auto& group : groups) sizes.push_back(group.size());
          return sizes;
        };
        if (shard_type != type || shapes(shard_keys) != shapes(keys)) {
          throw std::runtime_error(shard_where + " holds another optimizer's state than the first shard (" +
                                   shard_type + " against " + type + ", or other parameter groups)");
        }
        std::map<std::string, std::string> renamed;  // this shard's key -> shard 0's, by place in the groups
        for (std::size_t i = 0; i < keys.size(); ++i) {
          for (std::size_t j = 0; j < keys[i].size(); ++j) renamed[shard_keys[i][j]] = keys[i][j];
        }
        torch::serialize::InputArchive own;
        if (!optimizer.try_read("state", own)) return;  // a stateless optimizer (SGD without momentum)
        for (const auto& key : own.keys()) {
          const auto found = renamed.find(key);
          torch::serialize::InputArchive one;
          if (found == renamed.end() || !own.try_read(key, one)) {
            throw std::runtime_error(shard_where + " holds a state '" + key + "' of no parameter (a damaged shard)");
          }
          auto copy = std::make_unique<torch::serialize::OutputArchive>();
          detail::copy_archive(one, *copy);
          states[found->second] = std::move(copy);
        }
      });
  torch::serialize::OutputArchive whole;
  detail::copy_archive(file, whole, "optimizer_shards");
  if (is_sharded) {
    torch::serialize::OutputArchive state;
    for (auto& [key, archive] : states) state.write(key, *archive);
    entry.write("state", state);
    whole.write("optimizer", entry);
  }
  detail::without_backtrace(where, [&] { detail::write_archive_file(out, whole); });
}

}  // namespace accelerated
