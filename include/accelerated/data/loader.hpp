#pragma once
// Batches for one process: the sampler picks the indices, the source gathers them, the collate function builds the
// batch. Tensor data with the default collate skips the per-example path entirely (one index_select per tensor), and
// an augmented dataset writes each example into one batch tensor. batch(b) depends only on b and the epoch, so worker
// threads (prefetch.hpp) can build batches in any order.
#include <cstdint>
#include <iterator>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "augmented_dataset.hpp"
#include "collate.hpp"
#include "gather_context.hpp"
#include "prefetch.hpp"
#include "sampler.hpp"
#include "tensor_dataset.hpp"

namespace accelerated::data {

template <class T>
inline constexpr bool is_std_vector_v = false;
template <class T, class A>
inline constexpr bool is_std_vector_v<std::vector<T, A>> = true;

template <class Source, class Collate = DefaultCollate>
class Loader {
 public:
  Loader(Source source, EpochSampler sampler, Collate collate = {})
      : source_(std::move(source)), sampler_(std::move(sampler)), collate_(std::move(collate)) {
    set_epoch(0);
  }

  // Worker threads by default only for an augmented dataset with the default collate: safe to read from several
  // threads, and with per-example work that can be worth a thread. A tensor batch is one index_select per tensor,
  // cheaper than handing it between threads (measured with W1); a torch::data dataset, a range or a collate
  // function of the user's may not be thread-safe. Any of them gets workers when the user asks
  // (TrainOptions::num_workers), as with torch::data's own loader.
  static constexpr bool workers_by_default = std::is_same_v<Collate, DefaultCollate> && is_augmented_dataset_v<Source>;

  // Batches of the current epoch on this process (all of an epoch's, unless set_epoch skipped some examples).
  std::int64_t size() const { return sampler_.batches_of(static_cast<std::int64_t>(order_.size())); }
  const EpochSampler& sampler() const { return sampler_; }
  Source& source() { return source_; }

  // Selects the example order of `epoch` for the next pass (the trainer calls it at each epoch start), without its
  // first `skip` examples (a resumed run continuing an epoch that another number of processes began).
  void set_epoch(std::int64_t epoch, std::int64_t skip = 0) {
    epoch_ = epoch;
    order_ = sampler_.indices(epoch_, skip);
  }
  std::int64_t epoch() const { return epoch_; }

  // CUDA: batches are built in pinned memory, so the copy to the device needs no staging copy and does not block.
  void set_pin_memory(bool pin) { pin_memory_ = pin; }

  // Batch `b` of the current epoch. Reads only the epoch's order: worker threads may call it concurrently.
  auto batch(std::int64_t b) {
    const auto bs = sampler_.options().batch_size;
    const auto first = static_cast<std::size_t>(b * bs);
    const auto count = std::min<std::size_t>(static_cast<std::size_t>(bs), order_.size() - first);
    const std::span<const std::int64_t> indices(order_.data() + first, count);
    const GatherContext context{sampler_.options().seed, epoch_, pin_memory_};
    if constexpr (std::is_same_v<Collate, DefaultCollate> && requires { source_.gather(indices, context); }) {
      return source_.gather(indices, context);
    } else if constexpr (std::is_same_v<Collate, DefaultCollate> && requires { source_.gather(indices); }) {
      return source_.gather(indices);
    } else {
      auto examples = [&] {
        if constexpr (requires { source_.examples(indices, context); }) {
          return source_.examples(indices, context);
        } else {
          return source_.examples(indices);
        }
      }();
      if constexpr (is_std_vector_v<decltype(examples)>) {
        return collate_(std::move(examples));
      } else {
        return examples;  // the dataset collated already (e.g. mapped with torch::data::transforms::Stack<>)
      }
    }
  }

  class iterator {
   public:
    using difference_type = std::ptrdiff_t;
    using value_type = decltype(std::declval<Loader&>().batch(0));

    iterator() = default;
    iterator(Loader* loader, std::int64_t index) : loader_(loader), index_(index) {}
    value_type operator*() const { return loader_->batch(index_); }
    iterator& operator++() {
      ++index_;
      return *this;
    }
    void operator++(int) { ++index_; }
    bool operator==(const iterator& other) const { return index_ == other.index_; }

   private:
    Loader* loader_ = nullptr;
    std::int64_t index_ = 0;
  };

  iterator begin() { return {this, 0}; }
  iterator end() { return {this, size()}; }

 private:
  Source source_;
  EpochSampler sampler_;
  Collate collate_;
  std::int64_t epoch_ = 0;
  std::vector<std::int64_t> order_;
  bool pin_memory_ = false;
};

// Calls fn(batch) for batches [first, last) of a loader's current epoch; fn returns false to stop. Loaders with random
// access (ours) jump to `first`, and with prefetch.workers > 0 their batches are built ahead by worker threads;
// others are advanced past the skipped batches.
template <class Loader, class Fn>
void for_each_batch(Loader& loader, std::int64_t first, std::int64_t last, Fn&& fn, PrefetchOptions prefetch = {}) {
  if (first >= last) return;
  if constexpr (requires { loader.batch(first); }) {
    if (prefetch.workers > 0) {
      Prefetcher<Loader> ahead(loader, first, last, prefetch);
      for (auto b = first; b < last; ++b) {
        if (!fn(ahead.next())) return;
      }
      return;
    }
    for (auto b = first; b < last; ++b) {
      if (!fn(loader.batch(b))) return;
    }
  } else {
    auto it = std::begin(loader);
    const auto end = std::end(loader);
    std::int64_t b = 0;
    for (; b < first && it != end; ++b) ++it;
    for (; b < last && it != end; ++b, ++it) {
      if (!fn(*it)) return;
    }
  }
}

}  // namespace accelerated::data
