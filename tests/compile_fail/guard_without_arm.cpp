// Must not compile: a distributed policy whose guard misspells arm(). It used to compile, and the ranks trained on
// their own gradients. Expected: "guard lacks `void arm(const torch::Tensor& loss)`".
#include <accelerated/accelerated.hpp>

struct Misspelled : accelerated::SingleProcess {
  struct Guard {
    void amr(const torch::Tensor&) {}
  };
  Guard gradient_sync(bool) { return {}; }
};

int main() {
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<accelerated::Cpu, accelerated::FullPrecision, Misspelled> trainer(model, torch::nn::MSELoss(),
                                                                                         optimizer);
}
