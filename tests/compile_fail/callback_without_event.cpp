// Must not compile: a callback whose only member is misspelled (on_epoch_end is not an event).
// Expected: "a callback handles no known event".
#include <accelerated/accelerated.hpp>

struct Misspelled {
  void on_epoch_end(auto&) {}
};

int main() {
  const auto x = torch::randn({8, 1});
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer trainer(model, torch::nn::MSELoss(), optimizer, Misspelled{});
  trainer.train(std::pair{x, x}, {});
}
