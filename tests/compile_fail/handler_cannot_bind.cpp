// Must not compile: a handler with the right tag whose parameters cannot take the event's arguments (is_intermediate
// is a bool, not a std::string&). It would never be called; it is a static_assert naming the event instead.
#include <accelerated/accelerated.hpp>

#include <string>

struct WrongParameters {
  void operator()(accelerated::on_train_epoch_start, auto&) {}
  void operator()(accelerated::on_eval_epoch_start, auto&, std::string& is_intermediate) {}
};

int main() {
  const auto x = torch::randn({8, 1});
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer trainer(model, torch::nn::MSELoss(), optimizer, WrongParameters{});
  trainer.train(std::pair{x, x}, {});
}
