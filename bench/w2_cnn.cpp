// W2: the quickstart CNN on Fashion-MNIST (batch 64, Adam 1e-3). Times one epoch of: the Trainer (two epochs, to
// compare epoch 1 with epoch 2), a hand-written loop on tensors, and torch::data::make_data_loader with Stack<>.
// Prints one JSON line. Usage: bench_w2_cnn [fashion-mnist folder]
// Run once more with ACCELERATED_ALLOCATOR_TUNING=0 to see what the allocator tuning buys.
#include "common.hpp"

namespace nn = torch::nn;
namespace acc = accelerated;

struct NetImpl : nn::Module {
  nn::Sequential layers{nn::Conv2d(nn::Conv2dOptions(1, 32, 3).padding(1)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Conv2d(nn::Conv2dOptions(32, 64, 3).padding(1)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Flatten(), nn::Linear(64 * 7 * 7, 128), nn::ReLU(), nn::Linear(128, 10)};
  NetImpl() { register_module("layers", layers); }
  torch::Tensor forward(const torch::Tensor& x) { return layers->forward(x); }
};
TORCH_MODULE(Net);

// The tensors as a torch::data dataset, for the make_data_loader baseline.
class FashionDataset : public torch::data::datasets::Dataset<FashionDataset> {
 public:
  explicit FashionDataset(const acc::data::TensorDataset& d) : x_(d.inputs()), y_(d.targets()) {}
  torch::data::Example<> get(size_t i) override { return {x_[static_cast<std::int64_t>(i)], y_[static_cast<std::int64_t>(i)]}; }
  torch::optional<size_t> size() const override { return static_cast<size_t>(x_.size(0)); }

 private:
  torch::Tensor x_, y_;
};

// Records how long each training epoch took.
struct EpochTimes {
  std::vector<double> seconds;
  std::chrono::steady_clock::time_point start;
  void on_train_epoch_start(auto&) { start = std::chrono::steady_clock::now(); }
  void on_train_epoch_end(auto&) { seconds.push_back(bench::seconds_since(start)); }
};

int main(int argc, char** argv) {
  const std::string folder = argc > 1 ? argv[1] : acc::data::fashion_mnist_default_folder;
  const auto train_set = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
  constexpr std::int64_t batch = 64;
  auto make = [] {
    torch::manual_seed(0);
    Net model;
    return model;
  };

  auto trainer_model = make();
  torch::optim::Adam trainer_optimizer(trainer_model->parameters(), torch::optim::AdamOptions(1e-3));
  acc::Trainer trainer(trainer_model, nn::CrossEntropyLoss(), trainer_optimizer, acc::callbacks::Defaults{}, EpochTimes{});
  trainer.set_output(bench::null_stream());
  trainer.train(train_set, {.num_epochs = 2, .per_device_batch_size = batch});
  const auto& epochs = trainer.callback<EpochTimes>().seconds;

  auto hand_model = make();
  torch::optim::Adam hand_optimizer(hand_model->parameters(), torch::optim::AdamOptions(1e-3));
  const double hand_s = bench::time_it([&] {
    bench::hand_written_epoch(hand_model, hand_optimizer, nn::CrossEntropyLoss(), train_set.inputs(),
                              train_set.targets(), batch, 0);
  });

  auto loader_model = make();
  torch::optim::Adam loader_optimizer(loader_model->parameters(), torch::optim::AdamOptions(1e-3));
  const double loader_s = bench::time_it([&] {
    auto loader = torch::data::make_data_loader(FashionDataset(train_set).map(torch::data::transforms::Stack<>()),
                                                torch::data::DataLoaderOptions(batch));
    loader_model->train();
    nn::CrossEntropyLoss loss_fn;
    for (auto& b : *loader) {
      loader_optimizer.zero_grad();
      auto loss = loss_fn(loader_model(b.data), b.target);
      loss.backward();
      loader_optimizer.step();
      (void)loss.item<double>();
    }
  });

  std::ostringstream json;
  acc::detail::JsonObject out(json);
  out.field("benchmark", "W2 quickstart cnn, fashion-mnist 60000, batch 64, 1 epoch")
      .field("threads", at::get_num_threads())
      .field("allocator_tuned", acc::allocator_tuning.applied)
      .field("trainer_epoch1_s", epochs.at(0))
      .field("trainer_epoch2_s", epochs.at(1))
      .field("epoch1_over_epoch2", epochs.at(0) / epochs.at(1))
      .field("hand_written_tensors_s", hand_s)
      .field("make_data_loader_stack_s", loader_s)
      .field("ratio_hand_written_over_trainer_epoch2", hand_s / epochs.at(1))
      .field("ratio_make_data_loader_over_trainer_epoch2", loader_s / epochs.at(1));
  out.close();
  std::cout << json.str() << std::endl;
}
