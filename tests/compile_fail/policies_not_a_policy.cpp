// Must not compile: something that is no policy, given through policies(). Expected: "is none of the four policies".
#include <accelerated/accelerated.hpp>

struct Options {
  int epochs = 3;
};

int main() {
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer trainer(model, torch::nn::MSELoss(), optimizer, accelerated::policies(Options{}));
}
