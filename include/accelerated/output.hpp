#pragma once
// Where a trainer's text goes: print() and the progress bar write to one stream (std::cout by default), and only the
// local process zero writes. Whether the stream is a terminal decides whether the progress bar redraws in place:
// std::cout is asked (isatty); another stream is one when the user says so.
#include <unistd.h>

#include <iostream>
#include <ostream>

namespace accelerated {

class Output {
 public:
  std::ostream& stream() { return *out_; }
  void set(std::ostream& out, bool terminal = false) {
    out_ = &out;
    terminal_ = terminal;
  }
  bool is_terminal() const { return terminal_ || (out_ == &std::cout && ::isatty(STDOUT_FILENO) == 1); }

  // One line, when `enabled` (the trainer passes "this is the local process zero"), flushed: these lines are rare
  // (run and epoch boundaries), and someone tailing a job's log file (SLURM's slurm-<job>.out) should see them then.
  template <class... Args>
  void print(bool enabled, const Args&... args) {
    if (enabled) ((*out_) << ... << args) << '\n' << std::flush;
  }

 private:
  std::ostream* out_ = &std::cout;
  bool terminal_ = false;
};

}  // namespace accelerated
