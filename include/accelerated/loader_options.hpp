#pragma once
// How a run's options (TrainOptions) become its loaders' sampling (shuffle, drop_last, this rank's shard) and batch
// making (pinned memory on a CUDA device, worker threads ahead of the step).
#include <algorithm>
#include <cstdint>

#include "data/prefetch.hpp"
#include "data/sampler.hpp"
#include "train_options.hpp"

namespace accelerated::detail {

// Training batches are shuffled, may drop the last short one, and are padded so that every rank runs as many.
inline data::SamplerOptions sampler_options(const TrainOptions& options, std::int64_t batch_size, bool training,
                                            std::int64_t num_processes, std::int64_t rank) {
  data::SamplerOptions o;
  o.batch_size = batch_size;
  o.shuffle = training && options.shuffle;
  o.drop_last = training && options.drop_last;
  o.seed = options.seed;
  o.num_replicas = num_processes;
  o.rank = rank;
  o.pad_to_even = training;
  return o;
}

// Batches in pinned memory for a CUDA device, and built ahead of the step by TrainOptions::num_workers threads;
// unset, the default for sources safe to read from several threads (started only when they pay), else none.
template <class Loader>
data::PrefetchOptions prepare_loader(Loader& loader, const TrainOptions& options, bool cuda) {
  if constexpr (requires { loader.set_pin_memory(true); }) loader.set_pin_memory(cuda);
  int workers = 0;
  bool only_if_input_bound = false;
  if (options.num_workers) {
    workers = *options.num_workers;
  } else if constexpr (requires { Loader::workers_by_default; }) {
    if (Loader::workers_by_default) {
      workers = data::default_num_workers();
      only_if_input_bound = true;
    }
  }
  return {.workers = workers, .depth = std::max(1, workers * options.prefetch_factor),
          .only_if_input_bound = only_if_input_bound};
}

}  // namespace accelerated::detail
