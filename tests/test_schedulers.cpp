#include "helpers.hpp"

namespace acc = accelerated;
using acc::schedulers::CosineLrScheduler;

TEST_CASE("the cosine schedule warms up, decays and cools down continuously", "[schedulers]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1.0));
  // 10 epochs x 10 updates: 20 warm-up, 60 cosine, 20 cool-down.
  CosineLrScheduler scheduler(optimizer, {.total_num_epochs = 10, .num_update_steps_per_epoch = 10, .lr_min = 0.0,
                                          .num_warmup_epochs = 2, .warmup_starting_lr = 0.0, .num_cooldown_epochs = 2});
  auto lr = [&](std::int64_t t) { return scheduler.lrs_at(t)[0]; };
  CHECK(optimizer.param_groups()[0].options().get_lr() == 0.0);  // set at construction: update 0 is warm-up
  CHECK(lr(10) == Approx(0.5));
  CHECK(lr(20) == Approx(1.0));
  CHECK(lr(50) == Approx(0.5));   // half way through the cosine phase
  CHECK(lr(79) < 0.001);          // reaches lo at the end of the cosine phase: no jump
  CHECK(lr(80) == 0.0);
  CHECK(lr(500) == 0.0);
  for (std::int64_t t = 21; t < 80; ++t) CHECK(lr(t) <= lr(t - 1));
  scheduler.step();
  CHECK(optimizer.param_groups()[0].options().get_lr() == Approx(lr(1)));
  CHECK(scheduler.num_updates() == 1);
  CHECK_THROWS_WITH(CosineLrScheduler(optimizer, {.total_num_epochs = 2, .num_warmup_epochs = 1, .num_cooldown_epochs = 1}),
                    Catch::Contains("num_warmup_epochs + num_cooldown_epochs"));
}

TEST_CASE("the cosine schedule sizes itself from the run config and steps once per update", "[schedulers][trainer]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  acc::TrainOptions options{.num_epochs = 3, .per_device_batch_size = 4, .gradient_accumulation_steps = 2};
  options.create_scheduler_fn = [](torch::optim::Optimizer& o, const acc::RunConfig& config) {
    return std::make_unique<CosineLrScheduler>(
        o, acc::schedulers::CosineOptions{.total_num_epochs = config.num_epochs,
                                          .num_update_steps_per_epoch = config.num_update_steps_per_epoch,
                                          .min_lr_ratio = 0.1});
  };
  trainer.train(test::regression_data(32), options);  // 8 batches, 4 updates per epoch, 12 in all
  auto* scheduler = dynamic_cast<CosineLrScheduler*>(trainer.scheduler());
  REQUIRE(scheduler != nullptr);
  CHECK(scheduler->num_updates() == 12);
  CHECK(optimizer.param_groups()[0].options().get_lr() == Approx(0.01));  // the end of the schedule: 0.1 x 0.1
}

TEST_CASE("ModelFreezer freezes and unfreezes layer groups", "[finetuning]") {
  auto model = torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::BatchNorm1d(8), torch::nn::ReLU(),
                                     torch::nn::Linear(8, 2));
  acc::ModelFreezer freezer(model);
  CHECK(freezer.num_groups() == 4);
  freezer.freeze();  // all groups but the last
  auto groups = freezer.layer_groups();
  CHECK(groups[0].is_frozen);
  CHECK_FALSE(groups[1].is_frozen);  // a batch norm stays trainable
  CHECK_FALSE(groups[2].is_frozen);  // no parameters: never "frozen"
  CHECK_FALSE(groups[3].is_frozen);
  CHECK_FALSE(model[0]->as<torch::nn::Linear>()->weight.requires_grad());
  CHECK(model[1]->as<torch::nn::BatchNorm1d>()->weight.requires_grad());
  CHECK(freezer.trainable_parameters().size() == 4);  // batch norm weight and bias, last linear weight and bias

  const auto added = freezer.unfreeze(-4, -4);  // negative indices, one group
  REQUIRE(added.size() == 1);
  CHECK(added.at(0).size() == 2);
  CHECK(freezer.unfreeze().empty());  // nothing left to unfreeze

  acc::ModelFreezer with_norms(model, true);
  with_norms.freeze(-1, 1, /*set_modules_as_eval=*/true);  // a reversed range: groups 1 to 3
  CHECK(with_norms.layer_groups()[1].is_frozen);
  CHECK_FALSE(model[1]->is_training());
  CHECK(with_norms.trainable_parameters().size() == 2);
  CHECK_THROWS_WITH(with_norms.freeze(0, 4), Catch::Contains("to_index = 4") && Catch::Contains("[-4, 3]"));
}

namespace {
// Records, at every training step, whether the batch norm was in training mode.
struct RecordNormMode {
  torch::nn::Sequential model;
  std::vector<bool> training;
  template <class Trainer>
  void operator()(acc::on_train_step_start, Trainer&) {
    training.push_back(model[1]->is_training());
  }
};
}  // namespace

TEST_CASE("groups frozen in eval mode stay in eval mode through every training epoch", "[finetuning]") {
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::BatchNorm1d(8), torch::nn::ReLU(),
                                     torch::nn::Linear(8, 1));
  acc::ModelFreezer freezer(model, /*freeze_batch_norms=*/true);
  freezer.freeze(0, 1, /*set_modules_as_eval=*/true);
  torch::optim::SGD optimizer(freezer.trainable_parameters(), torch::optim::SGDOptions(0.01));
  auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess>(
      acc::Model(model), torch::nn::MSELoss(), optimizer, RecordNormMode{model, {}});
  trainer.set_output(test::quiet());
  const auto data = test::regression_data(32);
  trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 8}, data);  // eval epochs in between
  const auto& modes = trainer.callback<RecordNormMode>().training;
  REQUIRE(modes.size() == 8);
  for (bool training : modes) CHECK_FALSE(training);  // the batch norm never switched back to training mode
  freezer.unfreeze(0, 1);  // set_modules_as_training: unpinned and training again
  trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 8});
  CHECK(trainer.callback<RecordNormMode>().training.back());
}

TEST_CASE("the WSD schedule warms up, holds, and decays at the end of each period", "[schedulers]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1.0));
  using acc::schedulers::WsdLrScheduler;
  WsdLrScheduler one(optimizer, {.total_steps = 100, .num_warmup_steps = 10, .decay_phase_ratio = 0.2, .lr_min = 0.01,
                                 .warmup_starting_lr = 0.0});
  auto lr = [&](const WsdLrScheduler& s, std::int64_t t) { return s.lrs_at(t)[0]; };
  CHECK(lr(one, 0) == 0.0);
  CHECK(lr(one, 5) == Approx(0.5));
  CHECK(lr(one, 10) == 1.0);
  CHECK(lr(one, 79) == 1.0);                         // stable
  CHECK(lr(one, 80) == 1.0);                         // decay starts (r = 0)
  CHECK(lr(one, 100) == Approx(0.01));               // r = 1: lr_min x base
  CHECK(lr(one, 90) == Approx(0.01 + 0.99 * (1 - std::sqrt(0.5))));  // inverse-sqrt shape
  CHECK(one.checkpoint_steps() == std::vector<std::int64_t>{100});

  torch::optim::SGD optimizer2(model->parameters(), torch::optim::SGDOptions(1.0));  // `one` set the first one's rate
  WsdLrScheduler three(optimizer2, {.total_steps = 400, .num_warmup_steps = 0, .decay_phase_ratio = 0.25,
                                   .num_checkpoints = 3});
  CHECK(three.checkpoint_steps() == std::vector<std::int64_t>{100, 200, 400});
  CHECK(lr(three, 74) == 1.0);
  CHECK(lr(three, 99) < 0.1);                        // the first period decays before its checkpoint
  CHECK(lr(three, 100) == 1.0);                      // the next period starts stable again
  CHECK(lr(three, 399) < 0.05);

  CHECK_THROWS_WITH(WsdLrScheduler(optimizer2, {.num_epochs = 2, .num_update_steps_per_epoch = 5, .total_steps = 10}),
                    Catch::Contains("not both"));
  CHECK_THROWS_WITH(WsdLrScheduler(optimizer2, {.total_steps = 100, .decay_phase_ratio = 0.5, .num_checkpoints = 2}),
                    Catch::Contains("1/3"));
  CHECK_THROWS_WITH(WsdLrScheduler(optimizer2, {.total_steps = 100, .warmup_starting_lr = 2.0}),
                    Catch::Contains("above the base rate"));
}
