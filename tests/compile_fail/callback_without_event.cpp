// Must not compile: a callback with no handler (on_epoch_end is not an event, and handlers are call operators taking
// an event tag; a member function named like an event, the old form, is not one either).
// Expected: "a callback handles no known event".
#include <accelerated/accelerated.hpp>

struct Misspelled {
  void on_epoch_end(auto&) {}
  void on_train_epoch_end(auto&) {}
};

int main() {
  const auto x = torch::randn({8, 1});
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer trainer(model, torch::nn::MSELoss(), optimizer, Misspelled{});
  trainer.train(std::pair{x, x}, {});
}
