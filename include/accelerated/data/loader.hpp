#pragma once
// Batches for one process: the sampler picks the indices, the source gathers them, the collate function builds the
// batch. Tensor data with the default collate skips the per-example path entirely (one index_select per tensor).
#include <cstdint>
#include <iterator>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "collate.hpp"
#include "sampler.hpp"

namespace accelerated::data {

template <class T>
inline constexpr bool is_std_vector_v = false;
template <class T, class A>
inline constexpr bool is_std_vector_v<std::vector<T, A>> = true;

template <class Source, class Collate = DefaultCollate>
class Loader {
 public:
  Loader(Source source, EpochSampler sampler, Collate collate = {})
      : source_(std::move(source)), sampler_(std::move(sampler)), collate_(std::move(collate)) {}

  // Batches per epoch on this process.
  std::int64_t size() const { return sampler_.num_batches(); }
  const EpochSampler& sampler() const { return sampler_; }
  Source& source() { return source_; }

  // Selects the example order of `epoch` for the next pass (the trainer calls it at each epoch start).
  void set_epoch(std::int64_t epoch) {
    epoch_ = epoch;
    order_.clear();
  }
  std::int64_t epoch() const { return epoch_; }

  // Batch `b` of the current epoch.
  auto batch(std::int64_t b) {
    if (order_.empty()) order_ = sampler_.indices(epoch_);
    const auto bs = sampler_.options().batch_size;
    const auto first = static_cast<std::size_t>(b * bs);
    const auto count = std::min<std::size_t>(static_cast<std::size_t>(bs), order_.size() - first);
    const std::span<const std::int64_t> indices(order_.data() + first, count);
    if constexpr (std::is_same_v<Collate, DefaultCollate> && requires { source_.gather(indices); }) {
      return source_.gather(indices);
    } else {
      auto examples = source_.examples(indices);
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

  iterator begin() {
    order_ = sampler_.indices(epoch_);
    return {this, 0};
  }
  iterator end() { return {this, size()}; }

 private:
  Source source_;
  EpochSampler sampler_;
  Collate collate_;
  std::int64_t epoch_ = 0;
  std::vector<std::int64_t> order_;
};

// Calls fn(batch) for batches [first, last) of a loader's current epoch; fn returns false to stop. Loaders with random
// access (ours) jump to `first`; others are advanced past the skipped batches.
template <class Loader, class Fn>
void for_each_batch(Loader& loader, std::int64_t first, std::int64_t last, Fn&& fn) {
  if (first >= last) return;
  if constexpr (requires { loader.batch(first); }) {
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
