// Must not compile: ProgressBar twice (once inside Defaults). Expected: "the same callback type is listed twice".
#include <accelerated/accelerated.hpp>

int main() {
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer trainer(model, torch::nn::MSELoss(), optimizer, accelerated::callbacks::Defaults{},
                               accelerated::callbacks::ProgressBar{});
}
