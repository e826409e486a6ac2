// Change one step of the loop: label smoothing in calculate_train_batch_loss, everything else as DefaultLoop.
// Usage: custom_loop_policy [fashion-mnist folder] [max_num_train_steps]
#include <accelerated/accelerated.hpp>

namespace acc = accelerated;
namespace F = torch::nn::functional;

// Derive from the default loop and redefine only the step you change. The trainer calls it directly: no virtual.
struct LabelSmoothingLoop : acc::DefaultLoop {
  double smoothing = 0.1;

  acc::BatchOutput calculate_train_batch_loss(auto& trainer, auto& batch) {
    auto outputs = trainer.model()(acc::inputs_of(batch));
    const auto log_probs = F::log_softmax(outputs, F::LogSoftmaxFuncOptions(1));
    const auto nll = -log_probs.gather(1, acc::targets_of(batch).unsqueeze(1)).squeeze(1);
    const auto uniform = -log_probs.mean(1);
    auto loss = ((1.0 - smoothing) * nll + smoothing * uniform).mean();
    return {loss, outputs, outputs.size(0)};
  }
};

int main(int argc, char** argv) try {
  const std::string folder = argc > 1 ? argv[1] : acc::data::fashion_mnist_default_folder;
  const std::int64_t max_steps = argc > 2 ? std::stoll(argv[2]) : 300;
  auto train_set = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
  auto test_set = acc::data::load_fashion_mnist(folder, acc::data::Split::test);

  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Flatten(), torch::nn::Linear(784, 256), torch::nn::ReLU(),
                                     torch::nn::Linear(256, 10));
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, LabelSmoothingLoop>(
      model, torch::nn::CrossEntropyLoss(), optimizer, acc::callbacks::Defaults{}, acc::callbacks::Accuracy{});
  trainer.train(train_set, {.num_epochs = 1, .per_device_batch_size = 64, .max_num_train_steps = max_steps}, test_set);
  std::cout << trainer.run_history().latest_json() << std::endl;
} catch (const std::exception& error) {
  // A failure (a bad path, a peer that died in a multi-process run) ends with its message and exit code 1.
  std::cerr << "custom_loop_policy: " << error.what() << std::endl;
  return 1;
}
