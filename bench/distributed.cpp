// One training epoch of W1 (MLP, random data) or W2 (quickstart CNN, Fashion-MNIST) under whatever the launcher
// says (one process, or N with RANK/WORLD_SIZE/MASTER_*); rank 0 prints one JSON line: samples/s, and the time per
// step spent in backward (which includes the gradient all-reduce not hidden by the overlap) and elsewhere.
// Run by bench/distributed.sh, which compares 1 and 2 processes.
// Usage: bench_distributed w1|w2 [folder|blocking|exchange]
// "w1 blocking": the unoptimised variant, whose stop vote blocks before backward (as it did) instead of travelling
// during it. "w1 exchange": no training, only the exchange no W1 step can do without, one all-reduce of W1's
// gradients (101,770 floats, 0.4 MB), timed alone; 2 x 64 samples per exchange is a ceiling no 2-process W1 step
// over that transport can pass, however fast its compute.
#include "common.hpp"

#include <type_traits>

namespace nn = torch::nn;
namespace acc = accelerated;

// Times backward (forward+loss and the rest are the remainder of the step).
struct TimedLoop : acc::DefaultLoop {
  double backward_s = 0;
  void backward_step(auto& trainer, torch::Tensor& loss) {
    const auto start = std::chrono::steady_clock::now();
    DefaultLoop::backward_step(trainer, loss);
    backward_s += bench::seconds_since(start);
  }
};

// The unoptimised variant, the vote as it was: a blocking all-reduce after forward, before backward (start sums at
// once; finish only hands the sums over).
struct BlockingVote : acc::DataParallel {
  std::vector<double> sums;
  void start_all_reduce_sum(std::span<double> values) {
    all_reduce_sum(values);
    sums.assign(values.begin(), values.end());
  }
  void finish_all_reduce_sum(std::span<double> values) { std::copy(sums.begin(), sums.end(), values.begin()); }
};

template <class Distributed = acc::AutoDistributed, class Model>
void run(const std::string& name, Model model, torch::optim::Optimizer& optimizer, const acc::data::TensorDataset& data) {
  acc::Trainer<acc::Cpu, acc::FullPrecision, Distributed, TimedLoop, bench::EpochTimes> trainer(
      model, nn::CrossEntropyLoss(), optimizer, {});
  const acc::TrainOptions options{.num_epochs = 1, .per_device_batch_size = 64};
  trainer.train(data, options);  // warm-up epoch
  trainer.loop().backward_s = 0;
  trainer.train(data, options);
  const auto& rc = trainer.run_config();
  const double epoch_s = trainer.template callback<bench::EpochTimes>().seconds.back();
  const double steps = static_cast<double>(rc.num_update_steps_per_epoch);
  std::vector<double> backward{trainer.loop().backward_s};
  trainer.all_reduce_sum(backward);  // mean over ranks below
  if (!rc.is_world_process_zero) return;
  constexpr bool blocking = std::is_same_v<Distributed, BlockingVote>;
  std::ostringstream json;
  acc::detail::JsonObject out(json);
  out.field("benchmark", name)
      .field("processes", rc.num_processes)
      .field("transport", trainer.distributed().transport())
      .field("stop_vote", blocking ? "blocking" : "during backward")
      .field("threads_per_process", at::get_num_threads())
      .field("epoch_s", epoch_s)
      .field("samples_per_s", static_cast<double>(data.size()) / epoch_s)
      .field("steps_per_process", steps)
      .field("backward_ms_per_step", 1000.0 * backward[0] / static_cast<double>(rc.num_processes) / steps)
      .field("step_ms", 1000.0 * epoch_s / steps);
  out.close();
  std::cout << json.str() << std::endl;
}

void exchange_only(std::int64_t floats) {
  auto model = nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), 0.0);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::AutoDistributed> trainer(model, nn::MSELoss(), optimizer);
  trainer.set_output(std::cerr);
  trainer.train(std::pair{torch::zeros({8, 1}), torch::zeros({8, 1})}, {.per_device_batch_size = 4});  // joins
  std::vector<double> values(static_cast<std::size_t>(floats / 2), 1.0);  // as many bytes as the floats
  constexpr int warm_up = 50, timed = 500;
  for (int i = 0; i < warm_up; ++i) trainer.all_reduce_sum(values);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < timed; ++i) trainer.all_reduce_sum(values);
  const double seconds = bench::seconds_since(start) / timed;
  if (!trainer.run_config().is_world_process_zero) return;
  std::ostringstream json;
  acc::detail::JsonObject out(json);
  out.field("benchmark", "W1's gradient exchange alone, 0.4 MB all-reduce")
      .field("processes", trainer.run_config().num_processes)
      .field("transport", trainer.distributed().transport())
      .field("exchange_ms", 1000.0 * seconds)
      .field("samples_per_s", static_cast<double>(64 * trainer.run_config().num_processes) / seconds);
  out.close();
  std::cout << json.str() << std::endl;
}

int main(int argc, char** argv) {
  const std::string workload = argc > 1 ? argv[1] : "w1";
  torch::manual_seed(0);
  if (workload == "w1") {
    const acc::data::TensorDataset data(torch::randn({60000, 784}), torch::randint(0, 10, {60000}, torch::kLong));
    auto model = nn::Sequential(nn::Linear(784, 128), nn::ReLU(), nn::Linear(128, 10));
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
    if (argc > 2 && std::string(argv[2]) == "exchange") {
      exchange_only(784 * 128 + 128 + 128 * 10 + 10);
    } else if (argc > 2 && std::string(argv[2]) == "blocking") {
      run<BlockingVote>("W1 mlp, 60000 rows, batch 64 per process", model, optimizer, data);
    } else {
      run("W1 mlp, 60000 rows, batch 64 per process", model, optimizer, data);
    }
  } else {
    const std::string folder = argc > 2 ? argv[2] : acc::data::fashion_mnist_default_folder;
    const auto data = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
    bench::QuickstartNet model;
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
    run("W2 quickstart cnn, fashion-mnist, batch 64 per process", model, optimizer, data);
  }
}
