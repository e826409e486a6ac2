// bf16 against fp32 on W2 (the quickstart CNN, Fashion-MNIST, batch 64, Adam 1e-3), on this CPU: one epoch each,
// alternating, then test accuracy. Prints one JSON line with the step-time ratio and both accuracies.
// Usage: bench_w2_precision [fashion-mnist folder] [epochs=1]
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

struct EpochTimes {
  std::vector<double> seconds;
  std::chrono::steady_clock::time_point start;
  void on_train_epoch_start(auto&) { start = std::chrono::steady_clock::now(); }
  void on_train_epoch_end(auto&) { seconds.push_back(bench::seconds_since(start)); }
};

template <class Precision>
struct Run {
  Net model = [] {
    torch::manual_seed(0);
    return Net();
  }();
  torch::optim::Adam optimizer{model->parameters(), torch::optim::AdamOptions(1e-3)};
  acc::Trainer<acc::Cpu, Precision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::Defaults,
               acc::callbacks::Accuracy, EpochTimes>
      trainer{model, nn::CrossEntropyLoss(), optimizer, {}, {}, {}};
  Run() { trainer.set_output(bench::null_stream()); }
};

int main(int argc, char** argv) {
  const std::string folder = argc > 1 ? argv[1] : acc::data::fashion_mnist_default_folder;
  const int epochs = argc > 2 ? std::stoi(argv[2]) : 1;
  const auto train_set = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
  const auto test_set = acc::data::load_fashion_mnist(folder, acc::data::Split::test);
  Run<acc::FullPrecision> fp32;
  Run<acc::BFloat16> bf16;
  const acc::TrainOptions options{.num_epochs = 1, .per_device_batch_size = 64, .reset_run_history = false};
  for (int e = 0; e < epochs; ++e) {
    fp32.trainer.train(train_set, options);
    bf16.trainer.train(train_set, options);
  }
  fp32.trainer.evaluate(test_set, 1000);
  bf16.trainer.evaluate(test_set, 1000);
  const auto& fp32_s = fp32.trainer.callback<EpochTimes>().seconds;
  const auto& bf16_s = bf16.trainer.callback<EpochTimes>().seconds;
  const double fp32_best = *std::min_element(fp32_s.begin(), fp32_s.end());
  const double bf16_best = *std::min_element(bf16_s.begin(), bf16_s.end());

  std::ostringstream json;
  acc::detail::JsonObject out(json);
  out.field("benchmark", "W2 precision: quickstart cnn, fashion-mnist, batch 64, cpu")
      .field("epochs", epochs)
      .field("threads", at::get_num_threads())
      .field("fp32_epoch_s", fp32_s)
      .field("bf16_epoch_s", bf16_s)
      .field("step_time_ratio_bf16_over_fp32", bf16_best / fp32_best)
      .field("fp32_test_accuracy", fp32.trainer.run_history().get_latest_metric("evaluation_accuracy"))
      .field("bf16_test_accuracy", bf16.trainer.run_history().get_latest_metric("evaluation_accuracy"));
  out.close();
  std::cout << json.str() << std::endl;
}
