#pragma once
// Shared by the benchmarks: a stopwatch, medians, and the JSON line each benchmark ends with.
#include <accelerated/accelerated.hpp>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace bench {

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

template <class F>
double time_it(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return seconds_since(start);
}

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const auto n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// The hand-written loop the trainer is compared with: what a LibTorch user writes without a library, doing the
// same math (shuffled batches gathered with index_select, forward, loss, backward, step, running loss). On a GPU,
// batches go through pinned memory without blocking; `sync_free` keeps the running loss on the device (what a
// careful GPU user writes), so the comparison with the trainer's sync-free step is fair.
template <class Model, class Optimizer, class Loss>
double hand_written_epoch(Model& model, Optimizer& optimizer, Loss loss_fn, const torch::Tensor& inputs,
                          const torch::Tensor& targets, std::int64_t batch_size, std::uint64_t seed,
                          torch::Device device = torch::kCPU, bool sync_free = false) {
  torch::manual_seed(seed);
  const auto order = torch::randperm(inputs.size(0), torch::kLong);
  model->train();
  double loss_sum = 0;
  torch::Tensor device_sum;
  std::int64_t seen = 0;
  for (std::int64_t start = 0; start < inputs.size(0); start += batch_size) {
    const auto index = order.narrow(0, start, std::min(batch_size, inputs.size(0) - start));
    auto x = inputs.index_select(0, index);
    auto y = targets.index_select(0, index);
    if (!device.is_cpu()) {
      x = x.pin_memory().to(device, /*non_blocking=*/true);
      y = y.pin_memory().to(device, /*non_blocking=*/true);
    }
    optimizer.zero_grad();
    auto loss = loss_fn(model->forward(x), y);
    loss.backward();
    optimizer.step();
    if (sync_free) {
      const auto weighted = loss.detach() * static_cast<double>(x.size(0));
      device_sum = device_sum.defined() ? device_sum.add_(weighted) : weighted;
    } else {
      loss_sum += loss.template item<double>() * static_cast<double>(x.size(0));
    }
    seen += x.size(0);
  }
  if (device_sum.defined()) loss_sum = device_sum.template item<double>();
  return loss_sum / static_cast<double>(seen);
}

// The quickstart's CNN (examples/quickstart.cpp), for the W2 benchmarks.
struct QuickstartNetImpl : torch::nn::Module {
  torch::nn::Sequential layers{
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1)), torch::nn::ReLU(), torch::nn::MaxPool2d(2),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)), torch::nn::ReLU(), torch::nn::MaxPool2d(2),
      torch::nn::Flatten(), torch::nn::Linear(64 * 7 * 7, 128), torch::nn::ReLU(), torch::nn::Linear(128, 10)};
  QuickstartNetImpl() { register_module("layers", layers); }
  torch::Tensor forward(const torch::Tensor& x) { return layers->forward(x); }
};
TORCH_MODULE(QuickstartNet);

// A callback recording how long each training epoch took.
struct EpochTimes {
  std::vector<double> seconds;
  std::chrono::steady_clock::time_point start;
  void operator()(accelerated::on_train_epoch_start, auto&) { start = std::chrono::steady_clock::now(); }
  void operator()(accelerated::on_train_epoch_end, auto&) { seconds.push_back(seconds_since(start)); }
};

inline std::ostream& null_stream() {
  static std::ostringstream sink;
  sink.str("");
  return sink;
}

}  // namespace bench
