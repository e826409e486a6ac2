// Must not compile: a loop policy written from scratch that forgot optimizer_step.
// Expected: "the LoopPolicy lacks the step `optimizer_step".
#include <accelerated/accelerated.hpp>

struct HandWrittenLoop {
  auto create_train_dataloader(auto& t, auto s, const accelerated::data::SamplerOptions& o, auto c) {
    return accelerated::DefaultLoop{}.create_train_dataloader(t, std::move(s), o, std::move(c));
  }
  auto create_eval_dataloader(auto& t, auto s, const accelerated::data::SamplerOptions& o, auto c) {
    return accelerated::DefaultLoop{}.create_eval_dataloader(t, std::move(s), o, std::move(c));
  }
  std::unique_ptr<torch::optim::LRScheduler> create_scheduler(auto&) { return nullptr; }
  void training_run_start(auto&) {}
  void train_epoch_start(auto&) {}
  accelerated::BatchOutput calculate_train_batch_loss(auto& t, auto& b) { return accelerated::DefaultLoop::forward_and_loss(t, b); }
  accelerated::BatchOutput calculate_eval_batch_loss(auto& t, auto& b) { return accelerated::DefaultLoop::forward_and_loss(t, b); }
  void backward_step(auto&, torch::Tensor& loss) { loss.backward(); }
  void scheduler_step(auto&) {}
  void optimizer_zero_grad(auto& t) { t.optimizer().zero_grad(); }
  void train_epoch_end(auto&) {}
  void eval_epoch_start(auto&) {}
  void eval_epoch_end(auto&) {}
  void training_run_epoch_end(auto&) {}
  void training_run_end(auto&) {}
  void evaluation_run_start(auto&) {}
  void evaluation_run_end(auto&) {}
};

int main() {
  const auto x = torch::randn({8, 1});
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<accelerated::Cpu, accelerated::FullPrecision, accelerated::SingleProcess, HandWrittenLoop>
      trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.train(std::pair{x, x}, {});
}
