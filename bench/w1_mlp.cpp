// W1: MLP 784-128-10, SGD(lr 0.01, momentum 0.9), batch 64, 60000 random rows, one epoch per run.
// The Trainer (default callbacks, output discarded) and a hand-written LibTorch loop alternate in one process;
// prints one JSON line with steps/s of both and their ratio (goal: trainer / hand-written >= 0.98).
// Usage: bench_w1_mlp [repeats=5]
#include "common.hpp"

namespace nn = torch::nn;

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::stoi(argv[1]) : 5;
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
  auto hand_model = make_model();
  auto hand_optimizer = sgd(hand_model);
  const auto data = std::pair{inputs, targets};
  const auto steps = (rows + batch - 1) / batch;

  // One untimed epoch each: first-touch costs are not what this measures.
  trainer.train(data, {.num_epochs = 1, .per_device_batch_size = batch});
  bench::hand_written_epoch(hand_model, hand_optimizer, nn::CrossEntropyLoss(), inputs, targets, batch, 0);

  std::vector<double> trainer_s, hand_s;
  for (int r = 0; r < repeats; ++r) {
    trainer_s.push_back(bench::time_it([&] { trainer.train(data, {.num_epochs = 1, .per_device_batch_size = batch, .seed = std::uint64_t(r)}); }));
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
      .field("trainer_epoch_s", trainer_s)
      .field("hand_written_epoch_s", hand_s);
  out.close();
  std::cout << json.str() << std::endl;
}
