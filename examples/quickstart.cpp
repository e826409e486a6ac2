// Train a small CNN on Fashion-MNIST and print the final metrics as one JSON line.
// Usage: quickstart [fashion-mnist folder]   (default: /usr/share/datasets/fashion-mnist)
#include <accelerated/accelerated.hpp>

namespace nn = torch::nn;

struct NetImpl : nn::Module {
  nn::Sequential layers{nn::Conv2d(nn::Conv2dOptions(1, 32, 3).padding(1)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Conv2d(nn::Conv2dOptions(32, 64, 3).padding(1)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Flatten(), nn::Linear(64 * 7 * 7, 128), nn::ReLU(), nn::Linear(128, 10)};
  NetImpl() { register_module("layers", layers); }
  torch::Tensor forward(const torch::Tensor& x) { return layers->forward(x); }
};
TORCH_MODULE(Net);

int main(int argc, char** argv) try {
  namespace acc = accelerated;
  const std::string folder = argc > 1 ? argv[1] : acc::data::fashion_mnist_default_folder;
  auto train_set = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
  auto test_set = acc::data::load_fashion_mnist(folder, acc::data::Split::test);

  torch::manual_seed(0);
  Net model;
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  acc::Trainer trainer(model, nn::CrossEntropyLoss(), optimizer, acc::callbacks::Defaults{}, acc::callbacks::Accuracy{});

  trainer.train(train_set, {.num_epochs = 3, .per_device_batch_size = 64, .eval_per_device_batch_size = 1000}, test_set);
  trainer.evaluate(test_set, 1000);
  trainer.print(trainer.run_history().latest_json());  // once, on process zero, as the trainer prints
} catch (const std::exception& error) {
  // A failure (a bad path, a peer that died in a multi-process run) ends with its message and exit code 1; a
  // preemption (ACCELERATED_RUN_DIR, docs/preemption.md) with 75, so that the launcher starts it again.
  std::cerr << "quickstart: " << error.what() << std::endl;
  return accelerated::exit_code_for(error);
}
