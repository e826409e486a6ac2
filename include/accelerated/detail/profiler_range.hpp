#pragma once
// A named range in LibTorch's profiler (at::RecordFunction, as RECORD_USER_SCOPE makes one), opened and closed at
// points of our choosing rather than by a C++ scope: the trainer's phases (forward, backward, ...) follow one another
// across its loop. Nothing is allocated or recorded unless a profiler listens (at::hasCallbacks()).
#include <ATen/record_function.h>
#include <c10/util/ArrayRef.h>

#include <memory>

namespace accelerated::detail {

class ProfilerRange {
 public:
  // `name` must outlive the range (a string literal): the profiler keeps the pointer.
  // Never throws (the trainer opens one on its way out of a run, in a destructor): a range that fails is left out.
  void open(const char* name) noexcept {
    close();
    if (!at::hasCallbacks()) return;
    try {
      range_ = std::make_unique<at::RecordFunction>(at::RecordScope::USER_SCOPE);
      if (range_->isActive()) {
        range_->before(name, c10::ArrayRef<const c10::IValue>{});
      } else {
        range_.reset();
      }
    } catch (...) {
      range_.reset();
    }
  }
  void close() noexcept { range_.reset(); }  // RecordFunction's destructor ends it

 private:
  std::unique_ptr<at::RecordFunction> range_;
};

}  // namespace accelerated::detail
