// A user's program: fits y = 2x with the default trainer on a pair of tensors.
#include <accelerated/accelerated.hpp>

int main() {
  torch::manual_seed(0);
  const auto x = torch::linspace(-1, 1, 64).unsqueeze(1);
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.train(std::pair{x, 2 * x}, {.num_epochs = 20, .per_device_batch_size = 16});
  const double loss = trainer.run_history().get_latest_metric("train_loss_epoch");
  std::cout << "final train_loss_epoch " << loss << std::endl;
  return loss < 1e-3 ? 0 : 1;
}
