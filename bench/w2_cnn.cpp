// W2: the quickstart CNN on Fashion-MNIST (batch 64, Adam 1e-3). Per round, one epoch each of: the Trainer, a
// hand-written loop on tensors, and torch::data::make_data_loader with Stack<>. The trainer's first epoch against
// its second shows the first-epoch (allocator) penalty. Prints one JSON line; speed ratios use each one's best epoch.
// Usage: bench_w2_cnn [fashion-mnist folder] [rounds=2]
// On a machine with a GPU (the trainer's AutoDevice picks it) the hand-written loop runs there too, sync-free: its
// running loss stays on the device, as the trainer's does.
// Run once more with ACCELERATED_ALLOCATOR_TUNING=0 to see what the allocator tuning buys.
#include "common.hpp"

namespace nn = torch::nn;
namespace acc = accelerated;

// The tensors as a torch::data dataset, for the make_data_loader baseline.
class FashionDataset : public torch::data::datasets::Dataset<FashionDataset> {
 public:
  explicit FashionDataset(const acc::data::TensorDataset& d) : x_(d.inputs()), y_(d.targets()) {}
  torch::data::Example<> get(size_t i) override { return {x_[static_cast<std::int64_t>(i)], y_[static_cast<std::int64_t>(i)]}; }
  torch::optional<size_t> size() const override { return static_cast<size_t>(x_.size(0)); }

 private:
  torch::Tensor x_, y_;
};

int main(int argc, char** argv) {
  const std::string folder = argc > 1 ? argv[1] : acc::data::fashion_mnist_default_folder;
  const int rounds = argc > 2 ? std::stoi(argv[2]) : 2;
  const torch::Device device = acc::AutoDevice().device();
  const bool gpu = device.is_cuda();
  const auto train_set = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
  constexpr std::int64_t batch = 64;
  auto make = [&] {
    torch::manual_seed(0);
    bench::QuickstartNet model;
    model->to(device);
    return model;
  };

  auto trainer_model = make();
  torch::optim::Adam trainer_optimizer(trainer_model->parameters(), torch::optim::AdamOptions(1e-3));
  acc::Trainer trainer(trainer_model, nn::CrossEntropyLoss(), trainer_optimizer, acc::callbacks::Defaults{}, bench::EpochTimes{});
  trainer.set_output(bench::null_stream());

  auto hand_model = make();
  torch::optim::Adam hand_optimizer(hand_model->parameters(), torch::optim::AdamOptions(1e-3));

  auto loader_model = make();
  torch::optim::Adam loader_optimizer(loader_model->parameters(), torch::optim::AdamOptions(1e-3));
  auto loader = torch::data::make_data_loader(FashionDataset(train_set).map(torch::data::transforms::Stack<>()),
                                              torch::data::DataLoaderOptions(batch));
  nn::CrossEntropyLoss loss_fn;

  // The three alternate, one epoch each per round, so that machine noise hits all of them alike.
  std::vector<double> hand_s, loader_s;
  for (int round = 0; round < rounds; ++round) {
    trainer.train(train_set, {.num_epochs = 1, .per_device_batch_size = batch, .reset_run_history = false});
    hand_s.push_back(bench::time_it([&] {
      bench::hand_written_epoch(hand_model, hand_optimizer, loss_fn, train_set.inputs(), train_set.targets(), batch, round,
                                device, /*sync_free=*/gpu);
    }));
    loader_s.push_back(bench::time_it([&] {
      loader_model->train();
      for (auto& b : *loader) {
        loader_optimizer.zero_grad();
        auto loss = loss_fn(loader_model(b.data.to(device)), b.target.to(device));
        loss.backward();
        loader_optimizer.step();
        (void)loss.item<double>();
      }
    }));
  }
  const auto& trainer_s = trainer.callback<bench::EpochTimes>().seconds;
  // A batch-1000 evaluation: the case glibc's default thresholds hurt most.
  const auto test_set = acc::data::load_fashion_mnist(folder, acc::data::Split::test);
  const double evaluate_s = bench::time_it([&] { trainer.evaluate(test_set, 1000); });
  const double trainer_best = *std::min_element(trainer_s.begin(), trainer_s.end());

  std::ostringstream json;
  acc::detail::JsonObject out(json);
  out.field("benchmark", "W2 quickstart cnn, fashion-mnist 60000, batch 64, 1 epoch per round")
      .field("rounds", rounds)
      .field("threads", at::get_num_threads())
      .field("device", device.str())
      .field("hand_written_sync_free", gpu)
      .field("allocator_tuned", acc::allocator_tuning().applied)
      .field("trainer_epoch_s", trainer_s)
      .field("hand_written_tensors_epoch_s", hand_s)
      .field("make_data_loader_stack_epoch_s", loader_s)
      .field("evaluate_batch1000_s", evaluate_s)
      .field("trainer_epoch1_over_epoch2", trainer_s.at(0) / trainer_s.at(1))
      .field("ratio_trainer_over_hand_written_speed", *std::min_element(hand_s.begin(), hand_s.end()) / trainer_best)
      .field("ratio_trainer_over_make_data_loader_speed",
             *std::min_element(loader_s.begin(), loader_s.end()) / trainer_best);
  out.close();
  std::cout << json.str() << std::endl;
}
