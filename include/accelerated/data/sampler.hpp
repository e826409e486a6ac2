#pragma once
// Which examples go into which batch, epoch by epoch. The order of epoch e is a pure function of (seed, e), the
// same on every process, so shuffling changes per epoch, resumes exactly, and needs no communication. With several
// processes each takes every num_replicas-th example of that order (training pads by wrapping around so that every
// process gets the same number of batches; evaluation does not pad, so each example is seen exactly once).
// An epoch may also start after its first `skip` examples: a run resumed with another number of processes continues
// the interrupted epoch with the examples the saved run had not trained, shared out the same way.
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace accelerated::data {

struct SamplerOptions {
  std::int64_t batch_size = 1;
  bool shuffle = false;
  bool drop_last = false;
  std::uint64_t seed = 42;
  std::int64_t num_replicas = 1;
  std::int64_t rank = 0;
  bool pad_to_even = true;  // training: equal batches on every process
};

class EpochSampler {
 public:
  EpochSampler(std::int64_t dataset_size, SamplerOptions options) : size_(dataset_size), options_(options) {
    if (options_.batch_size <= 0) {
      throw std::invalid_argument("accelerated::data::EpochSampler: batch_size = " +
                                  std::to_string(options_.batch_size) + " must be >= 1");
    }
    if (options_.num_replicas <= 0 || options_.rank < 0 || options_.rank >= options_.num_replicas) {
      throw std::invalid_argument("accelerated::data::EpochSampler: rank = " + std::to_string(options_.rank) +
                                  " is not in [0, num_replicas = " + std::to_string(options_.num_replicas) + ")");
    }
  }

  std::int64_t dataset_size() const { return size_; }
  const SamplerOptions& options() const { return options_; }

  // Examples this process sees per epoch.
  std::int64_t num_samples() const {
    const auto r = options_.num_replicas;
    if (options_.pad_to_even) return (size_ + r - 1) / r;
    return size_ / r + (options_.rank < size_ % r ? 1 : 0);
  }

  std::int64_t num_batches() const { return batches_of(num_samples()); }

  // Batches made of `samples` examples on this process.
  std::int64_t batches_of(std::int64_t samples) const {
    const auto b = options_.batch_size;
    return options_.drop_last ? samples / b : (samples + b - 1) / b;
  }

  // This process's example indices for `epoch`, in batch order: every num_replicas-th example of the epoch's order
  // after its first `skip` (the examples already trained, when a resumed run continues an epoch).
  std::vector<std::int64_t> indices(std::int64_t epoch, std::int64_t skip = 0) const {
    if (skip < 0 || skip > size_) {
      throw std::invalid_argument("accelerated::data::EpochSampler: skip = " + std::to_string(skip) +
                                  " is not in [0, dataset size = " + std::to_string(size_) + "]");
    }
    std::vector<std::int64_t> order(static_cast<std::size_t>(size_));
    for (std::int64_t i = 0; i < size_; ++i) order[static_cast<std::size_t>(i)] = i;
    if (options_.shuffle) shuffle(order, epoch);
    if (options_.num_replicas == 1 && skip == 0) return order;
    const auto rest = size_ - skip;  // padding wraps around inside the rest: no trained example comes back
    const auto r = options_.num_replicas;
    const auto total = options_.pad_to_even ? (rest + r - 1) / r * r : rest;
    std::vector<std::int64_t> mine;
    mine.reserve(static_cast<std::size_t>(total / r + 1));
    for (auto i = options_.rank; i < total; i += r) {
      mine.push_back(order[static_cast<std::size_t>(skip + i % rest)]);
    }
    return mine;
  }

 private:
  // Fisher-Yates with an explicit bounded draw: unlike std::shuffle and std::uniform_int_distribution, the result
  // is the same with every standard library, so a checkpoint resumes into the same order anywhere.
  void shuffle(std::vector<std::int64_t>& order, std::int64_t epoch) const {
    std::seed_seq seq{static_cast<std::uint32_t>(options_.seed), static_cast<std::uint32_t>(options_.seed >> 32),
                      static_cast<std::uint32_t>(epoch), static_cast<std::uint32_t>(epoch >> 32)};
    std::mt19937_64 engine(seq);
    for (auto i = order.size(); i > 1; --i) {
      const std::uint64_t bound = i;
      const std::uint64_t limit = UINT64_MAX - UINT64_MAX % bound;  // reject the biased tail
      std::uint64_t draw = engine();
      while (draw >= limit) draw = engine();
      std::swap(order[i - 1], order[static_cast<std::size_t>(draw % bound)]);
    }
  }

  std::int64_t size_;
  SamplerOptions options_;
};

}  // namespace accelerated::data
