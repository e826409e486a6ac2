// Activation checkpointing on a model whose activations dominate its memory: a deep MLP (48 layers of Linear + ReLU,
// in blocks of 4, the blocks in a Sequential) at a large batch. The same training steps run plain and with
// TrainOptions::activation_checkpointing naming the first K blocks (by default every block but the last; no change to
// the model), in one process, alternating.
//   activation_memory_ratio     the peak of tensor memory a training step adds on top of what the model, gradients
//                               and optimizer hold, checkpointed / plain: counted by a CPU allocator that wraps
//                               LibTorch's (what CUDA's max_memory_allocated counts on a GPU), so malloc's caching
//                               does not blur it
//   activation_step_time_ratio  median step time (forward, backward, optimizer step), checkpointed / plain
// On the CPU only.
// Usage: bench_activation_checkpoint [--steps N] [--batch B] [--width W] [--depth LAYERS] [--per-block LAYERS]
//                                    [--checkpointed-blocks K]   (default: every block but the last)
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstring>
#include <map>
#include <optional>

#include "common.hpp"

namespace acc = accelerated;
using namespace torch::nn;

namespace {
// LibTorch's CPU allocator, wrapped to count the bytes its tensors hold and their peak.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}
#if ACCELERATED_TORCH_AT_LEAST(2, 3)  // allocate lost its const in LibTorch 2.3
  c10::DataPtr allocate(std::size_t bytes) override {
#else
  c10::DataPtr allocate(std::size_t bytes) const override {
#endif
    auto inner = inner_->allocate(bytes);
    void* data = inner.get();
    const auto now = held_.fetch_add(bytes) + bytes;
    for (auto peak = peak_.load(); now > peak && !peak_.compare_exchange_weak(peak, now);) {
    }
    return {data, new Held{std::move(inner), bytes, this}, &release, c10::Device(c10::kCPU)};
  }
  // LibTorch 2.3+ asks allocators for this; older ones have no such member.
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }

  double held_mb() const { return static_cast<double>(held_.load()) / (1 << 20); }
  double reset_peak_mb() const {
    peak_ = held_.load();
    return held_mb();
  }
  double peak_mb() const { return static_cast<double>(peak_.load()) / (1 << 20); }

 private:
  struct Held {
    c10::DataPtr inner;
    std::size_t bytes;
    const CountingAllocator* owner;
  };
  static void release(void* context) {
    auto* held = static_cast<Held*>(context);
    held->owner->held_.fetch_sub(held->bytes);
    delete held;
  }
  c10::Allocator* inner_;
  mutable std::atomic<std::size_t> held_{0}, peak_{0};
};

CountingAllocator& counting_allocator() {
  static CountingAllocator allocator(c10::GetCPUAllocator());
  return allocator;
}

// One block: `layers` times Linear then ReLU, as a transformer block has several activations inside. Plain, backward
// keeps one batch x width tensor per layer (each ReLU's output, which is also the next Linear's input); checkpointed,
// one per block (its input) plus, during the replay, one block's layers.
struct BlockImpl : Module {
  Sequential layers;
  BlockImpl(std::int64_t width, std::int64_t count) {
    for (std::int64_t i = 0; i < count; ++i) {
      layers->push_back(Linear(width, width));
      layers->push_back(ReLU());
    }
    register_module("layers", layers);
  }
  torch::Tensor forward(const torch::Tensor& x) { return layers->forward(x); }
};
TORCH_MODULE(Block);

Sequential deep_mlp(std::int64_t width, std::int64_t depth, std::int64_t per_block) {
  torch::manual_seed(1);
  Sequential blocks;
  for (std::int64_t i = 0; i < depth / per_block; ++i) blocks->push_back(Block(width, per_block));
  blocks->push_back(Linear(width, 1));
  return blocks;
}

// Peak memory a step adds and its time, per step, as a callback sees them around each training step.
struct StepProbe {
  std::vector<double> added_mb, seconds;
  double base_mb = 0;
  std::chrono::steady_clock::time_point start;
  void operator()(acc::on_train_step_start, auto&) {
    base_mb = counting_allocator().reset_peak_mb();
    start = std::chrono::steady_clock::now();
  }
  void operator()(acc::on_update_step_end, auto&) {  // after backward and the optimizer's step
    seconds.push_back(bench::seconds_since(start));
    added_mb.push_back(counting_allocator().peak_mb() - base_mb);
  }
};

std::pair<double, double> run(std::int64_t checkpointed_blocks, std::int64_t steps, std::int64_t batch,
                              std::int64_t width, std::int64_t depth, std::int64_t per_block) {
  auto model = deep_mlp(width, depth, per_block);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1e-4).momentum(0.9));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, StepProbe> trainer(
      model, MSELoss(), optimizer, StepProbe{});
  trainer.set_output(bench::null_stream());
  torch::manual_seed(2);
  const auto x = torch::randn({batch * (steps + 1), width});
  const auto y = torch::randn({batch * (steps + 1), 1});
  acc::TrainOptions options{.num_epochs = 1, .per_device_batch_size = batch, .shuffle = false, .num_workers = 0};
  // The first `checkpointed_blocks` blocks (by default every block but the last, whose activations backward needs at
  // once) and never the head.
  for (std::int64_t b = 0; b < checkpointed_blocks; ++b) {
    options.activation_checkpointing.push_back(std::to_string(b));
  }
  trainer.train(std::pair{x, y}, options);
  auto& probe = trainer.template callback<StepProbe>();
  // The first step warms the allocator and the optimizer's state up: left out.
  std::vector<double> added(probe.added_mb.begin() + 1, probe.added_mb.end());
  std::vector<double> seconds(probe.seconds.begin() + 1, probe.seconds.end());
  return {bench::median(added), bench::median(seconds)};
}
}  // namespace

int main(int argc, char** argv) {
  std::int64_t steps = 6, batch = 2048, width = 256, depth = 48, per_block = 4;
  std::optional<std::int64_t> checkpointed_blocks;  // default: every block but the last
  const std::map<std::string, std::int64_t*> flags{{"--steps", &steps}, {"--batch", &batch}, {"--width", &width},
                                                   {"--depth", &depth}, {"--per-block", &per_block}};
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i], value = i + 1 < argc ? argv[i + 1] : "";
    std::int64_t number = 0;
    std::size_t used = 0;
    try {
      number = std::stoll(value, &used);
    } catch (const std::exception&) {
    }
    const bool known = flags.count(flag) || flag == "--checkpointed-blocks";
    if (!known || value.empty() || used != value.size()) {
      std::cerr << "bench_activation_checkpoint: " << (known ? "no whole number after " + flag + ": '" + value + "'"
                                                             : "unknown argument '" + flag + "'")
                << "\n";
      return 2;
    }
    if (flag == "--checkpointed-blocks") {
      checkpointed_blocks = number;
    } else {
      *flags.at(flag) = number;
    }
  }
  if (per_block < 1 || depth < per_block) {
    std::cerr << "bench_activation_checkpoint: --depth " << depth << " and --per-block " << per_block
              << " make no block\n";
    return 2;
  }
  const auto blocks = depth / per_block;
  if (!checkpointed_blocks) checkpointed_blocks = blocks - 1;
  if (*checkpointed_blocks < 0 || *checkpointed_blocks > blocks) {
    std::cerr << "bench_activation_checkpoint: --checkpointed-blocks " << *checkpointed_blocks << " with " << blocks
              << " blocks (--depth " << depth << " / --per-block " << per_block << ")\n";
    return 2;
  }
  c10::SetAllocator(c10::kCPU, &counting_allocator(), /*priority=*/100);
  std::vector<double> plain_mb, checkpointed_mb, plain_s, checkpointed_s;
  // Three rounds, alternating, so that a slow spell of a shared machine hits both and the median of each variant
  // leaves one slow round out (a cold start's first round was the one over the goal).
  for (int round = 0; round < 3; ++round) {
    const auto [pm, ps] = run(0, steps, batch, width, depth, per_block);
    const auto [cm, cs] = run(*checkpointed_blocks, steps, batch, width, depth, per_block);
    plain_mb.push_back(pm);
    plain_s.push_back(ps);
    checkpointed_mb.push_back(cm);
    checkpointed_s.push_back(cs);
  }
  const double activation_mb = (batch * width * 4.0 * depth) / (1024.0 * 1024.0);  // one tensor per layer
  std::cout << "{\"benchmark\": \"activation_checkpoint\", \"batch\": " << batch << ", \"width\": " << width
            << ", \"depth\": " << depth << ", \"layers_per_block\": " << per_block
            << ", \"checkpointed_blocks\": " << *checkpointed_blocks << ", \"steps\": " << steps
            << ", \"activations_mb_estimate\": " << activation_mb
            << ", \"plain_step_added_mb\": " << bench::median(plain_mb)
            << ", \"checkpointed_step_added_mb\": " << bench::median(checkpointed_mb)
            << ", \"plain_step_s\": " << bench::median(plain_s)
            << ", \"checkpointed_step_s\": " << bench::median(checkpointed_s)
            << ", \"activation_memory_ratio\": " << bench::median(checkpointed_mb) / bench::median(plain_mb)
            << ", \"activation_step_time_ratio\": " << bench::median(checkpointed_s) / bench::median(plain_s) << "}"
            << std::endl;
}
