// Must not compile: a callback written in the Python original's form, a member function named after an event, which
// the trainer would never call. Expected: "has a member function on_train_epoch_end(...), which the trainer never
// calls".
#include <accelerated/accelerated.hpp>

struct PrintsEachEpoch {
  void operator()(accelerated::on_training_run_start, auto&) {}
  void on_train_epoch_end(auto& trainer) { trainer.print("epoch done"); }
};

int main() {
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer trainer(model, torch::nn::MSELoss(), optimizer, PrintsEachEpoch{});
  trainer.train(std::pair{torch::zeros({4, 1}), torch::zeros({4, 1})}, {.num_epochs = 1, .per_device_batch_size = 2});
}
