// Must not compile: a misspelled event tag next to a correct handler (on_train_epoch_edn is not an event). With
// member-name hooks this compiled and was never called; a tag that does not exist is an error naming it.
#include <accelerated/accelerated.hpp>

struct Misspelled {
  void operator()(accelerated::on_train_epoch_start, auto&) {}
  void operator()(accelerated::on_train_epoch_edn, auto&) {}
};

int main() {
  const auto x = torch::randn({8, 1});
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer trainer(model, torch::nn::MSELoss(), optimizer, Misspelled{});
  trainer.train(std::pair{x, x}, {});
}
