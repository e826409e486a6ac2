// Train an MLP on Fashion-MNIST with the batteries: a cosine schedule, an EMA of the weights, evaluation every 300
// updates on part of the test set, early stopping, and the full training state saved every 200 updates (written in the
// background while training goes on; `latest` moves once a file is complete). Kill it at
// any moment (Ctrl-C, SIGKILL, a lost machine) and run the same command again: it continues from the last saved
// state and ends with the same weights as a run that was never interrupted.
// Usage: resume [state folder] [fashion-mnist folder]   (defaults: ./resume_states, the Debian package's folder)
#include <accelerated/accelerated.hpp>

namespace acc = accelerated;
namespace cb = accelerated::callbacks;
namespace nn = torch::nn;

int main(int argc, char** argv) try {
  const std::filesystem::path states = argc > 1 ? argv[1] : "resume_states";
  const std::string folder = argc > 2 ? argv[2] : acc::data::fashion_mnist_default_folder;
  auto train_set = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
  auto test_set = acc::data::load_fashion_mnist(folder, acc::data::Split::test);

  torch::manual_seed(0);
  nn::Sequential model(nn::Flatten(), nn::Linear(28 * 28, 256), nn::ReLU(), nn::Dropout(0.2), nn::Linear(256, 10));
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(2e-3));

  acc::Trainer trainer(model, nn::CrossEntropyLoss(), optimizer,
                       cb::LimitEvalSteps(2),  // intermediate evaluations look at 2 batches of 1000
                       cb::StepBasedEvaluation(300), cb::Accuracy{}, cb::Defaults{},  // LogMetrics after Accuracy
                       cb::EarlyStopping({.patience = 2, .threshold = 0.0}),
                       cb::ModelEma({.decay = 0.999, .save_path = states / "ema_model.pt"}),
                       cb::SaveTrainingState(
                           {.save_dir = states, .save_every_n_steps = 200, .max_checkpoints = 2, .asynchronous = true}));

  acc::TrainOptions options{.num_epochs = 3, .per_device_batch_size = 64, .eval_per_device_batch_size = 1000};
  options.create_scheduler_fn = [](torch::optim::Optimizer& optimizer, const acc::RunConfig& run) {
    return std::make_unique<acc::schedulers::CosineLrScheduler>(
        optimizer, acc::schedulers::CosineOptions{.total_num_epochs = run.num_epochs,
                                                  .num_update_steps_per_epoch = run.num_update_steps_per_epoch,
                                                  .num_warmup_epochs = 1, .warmup_starting_lr_ratio = 0.1});
  };
  // The one line that makes a run resumable: continue from the newest saved state, if there is one.
  options.resume_from = cb::SaveTrainingState::latest(states);
  if (options.resume_from) std::cout << "Resuming from " << options.resume_from->string() << std::endl;

  trainer.train(train_set, options, test_set);
  trainer.evaluate(test_set, 1000);
  std::cout << trainer.run_history().latest_json() << std::endl;
} catch (const std::exception& error) {
  // A failure (a bad path, a peer that died in a multi-process run) ends with its message and exit code 1.
  std::cerr << "resume: " << error.what() << std::endl;
  return 1;
}
