#pragma once
// A training state written on a background thread while training goes on (Trainer::save_training_state_async,
// SaveTrainingStateOptions::asynchronous). The step loop stops only to copy the state into host memory; world
// process zero then writes that copy (atomically, as every save) and runs the caller's follow-up (recording
// `latest`, rotation) once the file is complete. One write at a time: the next save or load, the end of train()
// and Trainer::wait_for_async_save wait for it on every rank, and a failed write throws there, on every rank.
// The follow-up runs on the writer thread, concurrently with training: it must not call the trainer.
#include <exception>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "detail/archive_file.hpp"
#include "distributed/call_site.hpp"

namespace accelerated::detail {

class AsyncSave {
 public:
  AsyncSave() = default;
  AsyncSave(const AsyncSave&) = delete;
  AsyncSave& operator=(const AsyncSave&) = delete;
  AsyncSave(AsyncSave&&) noexcept = default;  // the thread shares nothing with this object but `failure_`
  AsyncSave& operator=(AsyncSave&& other) noexcept {
    report(wait());
    started_ = std::exchange(other.started_, false);
    path_ = std::move(other.path_);
    thread_ = std::move(other.thread_);
    failure_ = std::move(other.failure_);
    return *this;
  }
  // Destroyed with a write still going (the trainer destroyed, or moved over): waits for it; a failure can only be
  // printed then.
  ~AsyncSave() { report(wait()); }

  // Whether a save was started and not yet waited for (on every rank, not only the writing one).
  bool started() const { return started_; }
  const std::filesystem::path& path() const { return path_; }

  // Every rank calls it at the same save; the writing rank gives the host copy to write, the others nothing.
  void start(const std::filesystem::path& path, std::optional<ArchiveContents> contents,
             std::function<void()> when_written) {
    started_ = true;
    path_ = path;
    if (!contents) return;
    failure_ = std::make_shared<std::string>();
    auto job = [path, failure = failure_, contents = std::move(*contents), when_written = std::move(when_written)] {
      try {
        write_archive_contents(path, contents);
      } catch (const std::exception& error) {
        *failure = message_of(error) + "; the files saved before it are left as they were (and `latest` with them)";
        return;
      }
      try {
        if (when_written) when_written();
      } catch (const std::exception& error) {
        *failure = "the file was written, but what follows its write failed: " + message_of(error);
      }
    };
    try {
      thread_ = std::thread(std::move(job));
    } catch (const std::system_error&) {  // no thread to be had: written here, at once
      job();
    }
  }

  // Waits for the write to end, here only. "" when it succeeded (or none was started), else what failed, naming the
  // file.
  std::string wait() {
    if (thread_.joinable()) thread_.join();
    started_ = false;
    if (!failure_ || failure_->empty()) return {};
    return "accelerated::Trainer: the asynchronous save of '" + path_.string() + "' failed: " + *std::exchange(failure_, {});
  }

 private:
  static void report(const std::string& failure) {
    if (!failure.empty()) std::cerr << failure << '\n';
  }

  bool started_ = false;
  std::filesystem::path path_;
  std::thread thread_;
  std::shared_ptr<std::string> failure_;  // written by the thread, read once it has been joined
};

// Waits for a started save and agrees on its outcome in one all-reduce (every rank calls it, at the same point);
// a failure on any rank throws std::runtime_error on every rank. No collective when no save was started.
template <class Distributed>
void settle_async_save(AsyncSave& save, Distributed& distributed) {
  if (!save.started()) return;
  const auto path = save.path();
  const auto failure = save.wait();
  const auto rank = distributed::first_rank_where(distributed, !failure.empty(), distributed::CallSite::async_save);
  if (!rank) return;
  if (*rank == distributed.rank()) throw std::runtime_error(failure);
  throw std::runtime_error("accelerated::Trainer: the asynchronous save of '" + path.string() + "' failed on rank " +
                           std::to_string(*rank) + " (its error says why)");
}

}  // namespace accelerated::detail
