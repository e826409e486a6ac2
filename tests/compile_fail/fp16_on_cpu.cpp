// Must not compile: fp16 mixed precision on the fixed CPU device policy can never run (the policies' static facts
// always_cpu and needs_cuda, checked in accelerator.hpp). AutoDevice with Float16 compiles and is checked at run time.
#include <accelerated/accelerated.hpp>

int main() {
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<accelerated::Cpu, accelerated::Float16> trainer(model, torch::nn::MSELoss(), optimizer);
}
