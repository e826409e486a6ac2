// Must not compile: a distributed policy with start_all_reduce_sum but finish_all_reduce_sum misspelled. The trainer
// would send each stop vote and never read it. Expected: "needs both".
#include <accelerated/accelerated.hpp>

struct HalfPair : accelerated::SingleProcess {
  std::int64_t num_processes() const { return 2; }
  void start_all_reduce_sum(std::span<double>) {}
  void finsh_all_reduce_sum(std::span<double>) {}
};

int main() {
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<accelerated::Cpu, accelerated::FullPrecision, HalfPair> trainer(model, torch::nn::MSELoss(),
                                                                                       optimizer);
  trainer.train(accelerated::data::TensorDataset(torch::ones({4, 1}), torch::ones({4, 1})), {.num_epochs = 1});
}
