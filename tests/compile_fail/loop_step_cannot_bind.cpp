// Must not compile: a loop policy whose optimizer_step cannot take the trainer (it takes an int). Steps a policy
// does not declare are DefaultLoop's; a declared step that cannot be called would be silently replaced by the
// default, so it is an error naming the step.
#include <accelerated/accelerated.hpp>

struct WrongStep {
  void optimizer_step(int) {}
};

int main() {
  const auto x = torch::randn({8, 1});
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<accelerated::Cpu, accelerated::FullPrecision, accelerated::SingleProcess, WrongStep> trainer(
      model, torch::nn::MSELoss(), optimizer);
  trainer.train(std::pair{x, x}, {});
}
