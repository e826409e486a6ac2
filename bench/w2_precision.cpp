// bf16 against fp32 on W2 (the quickstart CNN, Fashion-MNIST, batch 64, Adam 1e-3), on this CPU: one epoch each,
// alternating, then test accuracy. Prints one JSON line with the step-time ratio and both accuracies.
// Usage: bench_w2_precision [fashion-mnist folder] [epochs=1]
#include "common.hpp"

namespace nn = torch::nn;
namespace acc = accelerated;

template <class Precision>
struct Run {
  bench::QuickstartNet model = [] {
    torch::manual_seed(0);
    return bench::QuickstartNet();
  }();
  torch::optim::Adam optimizer{model->parameters(), torch::optim::AdamOptions(1e-3)};
  acc::Trainer<acc::Cpu, Precision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::Defaults,
               acc::callbacks::Accuracy, bench::EpochTimes>
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
  const auto& fp32_s = fp32.trainer.callback<bench::EpochTimes>().seconds;
  const auto& bf16_s = bf16.trainer.callback<bench::EpochTimes>().seconds;
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
