// W1: MLP 784-128-10, SGD(lr 0.01, momentum 0.9), batch 64, 60000 random rows, one epoch per run.
// The Trainer (default callbacks, output discarded) and a hand-written LibTorch loop alternate in one process;
// prints one JSON line with steps/s of both and their ratio (goal: trainer / hand-written >= 0.98). A third trainer
// adds callbacks::TensorBoard (scalars every n updates, the gradient norm included) to measure its overhead.
// Usage: bench_w1_mlp [repeats=5] [TensorBoard every_n_updates=10]
#include "common.hpp"

namespace nn = torch::nn;

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::stoi(argv[1]) : 5;
  const std::int64_t log_every = argc > 2 ? std::stoll(argv[2]) : 10;
  constexpr std::int64_t rows = 60000, batch = 64;
  torch::manual_seed(0);
  const auto inputs = torch::randn({rows, 784});
  const auto targets = torch::randint(0, 10, {rows}, torch::kLong);
  auto make_model = [] {
    torch::manual_seed(1);
    return nn::Sequential(nn::Linear(784, 128), nn::ReLU(), nn::Linear(128, 10));
  };
  auto sgd = [](auto& model) { return torch::optim::SGD(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9)); };

  auto trainer_model = make_model();
  auto trainer_optimizer = sgd(trainer_model);
  accelerated::Trainer<> trainer(trainer_model, nn::CrossEntropyLoss(), trainer_optimizer);
  trainer.set_output(bench::null_stream());
  auto tensorboard_model = make_model();
  auto tensorboard_optimizer = sgd(tensorboard_model);
  const auto log_dir = std::filesystem::temp_directory_path() / ("accelerated_bench_w1_" + std::to_string(::getpid()));
  accelerated::Trainer tensorboard(tensorboard_model, nn::CrossEntropyLoss(), tensorboard_optimizer,
                                   accelerated::callbacks::Defaults{},
                                   accelerated::callbacks::TensorBoard({.log_dir = log_dir, .every_n_updates = log_every}));
  tensorboard.set_output(bench::null_stream());
  auto hand_model = make_model();
  auto hand_optimizer = sgd(hand_model);
  const auto data = std::pair{inputs, targets};
  const auto steps = (rows + batch - 1) / batch;

  // One untimed epoch each: first-touch costs are not what this measures.
  trainer.train(data, {.num_epochs = 1, .per_device_batch_size = batch});
  tensorboard.train(data, {.num_epochs = 1, .per_device_batch_size = batch});
  bench::hand_written_epoch(hand_model, hand_optimizer, nn::CrossEntropyLoss(), inputs, targets, batch, 0);

  std::vector<double> trainer_s, hand_s, tensorboard_s;
  for (int r = 0; r < repeats; ++r) {
    trainer_s.push_back(bench::time_it([&] { trainer.train(data, {.num_epochs = 1, .per_device_batch_size = batch, .seed = std::uint64_t(r)}); }));
    tensorboard_s.push_back(bench::time_it(
        [&] { tensorboard.train(data, {.num_epochs = 1, .per_device_batch_size = batch, .seed = std::uint64_t(r)}); }));
    hand_s.push_back(bench::time_it([&] {
      bench::hand_written_epoch(hand_model, hand_optimizer, nn::CrossEntropyLoss(), inputs, targets, batch, r);
    }));
  }
  const double trainer_rate = steps / bench::median(trainer_s), hand_rate = steps / bench::median(hand_s);
  std::ostringstream json;
  accelerated::detail::JsonObject out(json);
  out.field("benchmark", "W1 mlp 784-128-10 sgd batch 64, 60000 rows, 1 epoch")
      .field("repeats", repeats)
      .field("threads", at::get_num_threads())
      .field("trainer_steps_per_s", trainer_rate)
      .field("hand_written_steps_per_s", hand_rate)
      .field("ratio_trainer_over_hand_written", trainer_rate / hand_rate)
      .field("tensorboard_every_n_updates", log_every)
      .field("ratio_tensorboard_over_trainer", bench::median(trainer_s) / bench::median(tensorboard_s))
      .field("trainer_epoch_s", trainer_s)
      .field("trainer_with_tensorboard_epoch_s", tensorboard_s)
      .field("hand_written_epoch_s", hand_s);
  out.close();
  std::cout << json.str() << std::endl;
  std::filesystem::remove_all(log_dir);
}
