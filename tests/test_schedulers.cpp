#include "helpers.hpp"
#include "ranks_as_threads.hpp"

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

namespace {
// A model with everything the range test must put back: dropout (the CPU generator), batch norm (buffers and a mode),
// a submodule pinned to eval mode, and parameters with and without gradients.
struct Probe : torch::nn::Module {
  torch::nn::Linear first{nullptr}, second{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
  torch::nn::Dropout dropout{nullptr};
  Probe() {
    torch::manual_seed(3);
    first = register_module("first", torch::nn::Linear(8, 16));
    norm = register_module("norm", torch::nn::BatchNorm1d(16));
    dropout = register_module("dropout", torch::nn::Dropout(0.2));
    second = register_module("second", torch::nn::Linear(16, 1));
  }
  torch::Tensor forward(torch::Tensor x) { return second(dropout(torch::relu(norm(first(x))))); }
};

// Everything find_learning_rate promises to leave as it was.
struct Snapshot {
  std::vector<torch::Tensor> tensors;  // parameters, buffers, gradients (zeros for none), optimizer state, generator
  std::vector<bool> modes;
  std::vector<double> rates;
  explicit Snapshot(torch::nn::Module& model, torch::optim::Optimizer& optimizer) {
    for (const auto& p : model.parameters()) tensors.push_back(p.detach().clone());
    for (const auto& b : model.buffers()) tensors.push_back(b.clone());
    for (const auto& p : model.parameters()) tensors.push_back(p.grad().defined() ? p.grad().clone() : torch::full({1}, -7.0));
    for (const auto& m : model.modules()) modes.push_back(m->is_training());
    for (const auto& group : optimizer.param_groups()) rates.push_back(group.options().get_lr());
    std::ostringstream bytes;
    torch::serialize::OutputArchive archive;
    optimizer.save(archive);
    archive.save_to(bytes);
    const auto text = bytes.str();
    tensors.push_back(torch::from_blob(const_cast<char*>(text.data()), {static_cast<std::int64_t>(text.size())},
                                       torch::kUInt8).clone());
    tensors.push_back(acc::detail::generator_state(torch::kCPU));
  }
  bool operator==(const Snapshot& other) const {
    if (tensors.size() != other.tensors.size() || modes != other.modes || rates != other.rates) return false;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      if (!tensors[i].sizes().equals(other.tensors[i].sizes()) || !torch::equal(tensors[i], other.tensors[i])) return false;
    }
    return true;
  }
};
}  // namespace

TEST_CASE("find_learning_rate sweeps exponentially, suggests the steepest descent, and leaves the trainer bit-equal",
          "[schedulers][lr_finder]") {
  const auto data = test::regression_data(256);
  const auto dir = test::fresh_dir("lr_finder");
  auto model = std::make_shared<Probe>();
  model->norm->eval();  // pinned: set_training leaves it in eval mode; the test checks it stays so
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1e-2).momentum(0.9));
  std::ostringstream out;
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(out);
  const acc::TrainOptions options{.per_device_batch_size = 16};
  // Two updates: momentum buffers exist, the gradients are zeroed, the generator has moved; the model is still far
  // from trained, so the sweep's loss has somewhere to fall.
  trainer.train(data, {.per_device_batch_size = 16, .max_num_train_steps = 2});
  model->first->weight.mutable_grad() = torch::full_like(model->first->weight, 0.25);  // a gradient to keep
  model->eval();

  const Snapshot before(*model, optimizer);
  const auto history = trainer.run_history().get_metric_values("train_loss_epoch");
  const auto found = acc::find_learning_rate(trainer, data,
                                             {.train = options, .start_lr = 1e-5, .end_lr = 10.0, .num_steps = 60,
                                              .svg = dir / "lr_find.svg"});
  CHECK(Snapshot(*model, optimizer) == before);
  CHECK(trainer.run_history().get_metric_values("train_loss_epoch") == history);  // nothing logged into the run

  // The rates: start_lr * (end_lr / start_lr)^(i / (num_steps - 1)), until the loss diverged.
  REQUIRE(found.learning_rates.size() >= 20);
  CHECK(found.learning_rates.size() == found.losses.size());
  CHECK(found.learning_rates.size() == found.smoothed_losses.size());
  CHECK(found.learning_rates[0] == Approx(1e-5));
  CHECK(found.learning_rates[1] / found.learning_rates[0] == Approx(std::pow(1e6, 1.0 / 59.0)));
  CHECK(found.diverged);
  CHECK(found.learning_rates.size() < 60);
  CHECK(found.smoothed_losses.back() > 4.0 * *std::min_element(found.smoothed_losses.begin(), found.smoothed_losses.end() - 1));
  // The suggestion is a recorded rate where the smoothed loss falls, before the lowest loss.
  REQUIRE(found.suggestion);
  const auto at = std::find(found.learning_rates.begin(), found.learning_rates.end(), *found.suggestion) -
                  found.learning_rates.begin();
  REQUIRE(at < static_cast<std::ptrdiff_t>(found.learning_rates.size()));
  CHECK(at >= 10);
  CHECK(found.smoothed_losses[static_cast<std::size_t>(at) + 1] < found.smoothed_losses[static_cast<std::size_t>(at) - 1]);
  const auto lowest = std::min_element(found.smoothed_losses.begin(), found.smoothed_losses.end()) - found.smoothed_losses.begin();
  CHECK(at <= lowest);
  CHECK_THAT(out.str(), Catch::Contains("Learning-rate range test: " + std::to_string(found.losses.size()) +
                                        " updates from 1e-05 to") &&
                            Catch::Contains("(the loss diverged); suggested rate"));
  const auto svg = test::file_bytes(dir / "lr_find.svg");
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK_THAT(svg, Catch::Contains("<polyline") && Catch::Contains("Learning-rate range test: suggested") &&
                      Catch::Contains("stroke-dasharray"));

  // The run after it is the run without it, bit for bit.
  auto train_after = [&](bool find_first) {
    auto m = std::make_shared<Probe>();
    torch::optim::SGD o(m->parameters(), torch::optim::SGDOptions(1e-2).momentum(0.9));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> t(m, torch::nn::MSELoss(), o);
    t.set_output(test::quiet());
    t.train(data, options);
    if (find_first) acc::find_learning_rate(t, data, {.train = options, .num_steps = 20});
    t.train(data, options);
    return test::flat_parameters(*m);
  };
  const auto without = train_after(false);
  torch::manual_seed(11);
  const auto with = train_after(true);
  CHECK(torch::equal(without, with));
}

TEST_CASE("find_learning_rate names a bad option, says why there is no suggestion, and reads no ACCELERATED_RUN_DIR",
          "[schedulers][lr_finder]") {
  const auto data = test::regression_data(64);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  auto error = [&](acc::LearningRateFinderOptions options) {
    return test::error_or_none([&] { acc::find_learning_rate(trainer, data, options); });
  };
  CHECK(error({.start_lr = 0.0}) == "accelerated::find_learning_rate: start_lr = 0 must be a finite rate > 0");
  CHECK(error({.start_lr = 1e-3, .end_lr = 1e-4}) == "accelerated::find_learning_rate: end_lr = 0.0001 must be finite and > start_lr");
  CHECK(error({.num_steps = 1}) == "accelerated::find_learning_rate: num_steps = 1 must be >= 2");
  CHECK(error({.smoothing = 1.0}) == "accelerated::find_learning_rate: smoothing = 1 must be in [0, 1)");
  CHECK(error({.divergence = 1.0}) == "accelerated::find_learning_rate: divergence = 1 must be > 1");
  CHECK_THAT(error({.train = {.per_device_batch_size = 0}}), Catch::Contains("per_device_batch_size = 0"));
  // Too few points for a suggestion: it says why.
  const auto few = acc::find_learning_rate(trainer, data, {.start_lr = 1e-4, .end_lr = 1e-3, .num_steps = 12});
  CHECK_FALSE(few.suggestion);
  CHECK(few.reason == "12 updates recorded, 1 of them between skip_start = 10 and skip_end = 1: too few to suggest a "
                      "rate (more num_steps, a lower start_lr, or lower skips)");
  // Under ACCELERATED_RUN_DIR (a preemptible run's folder holding a state) the sweep neither resumes from it nor
  // writes into it: the same curve as without, and the folder as it was.
  const auto run_dir = test::fresh_dir("lr_finder_run_dir");
  trainer.train(data, {.per_device_batch_size = 8});
  trainer.save_training_state(run_dir / "state_1.pt");
  const auto plain = acc::find_learning_rate(trainer, data, {.num_steps = 30});
  test::ScopedEnv env("ACCELERATED_RUN_DIR", run_dir.c_str());
  const auto under_run_dir = acc::find_learning_rate(trainer, data, {.num_steps = 30});
  CHECK(plain.losses == under_run_dir.losses);
  CHECK(std::distance(std::filesystem::directory_iterator(run_dir), std::filesystem::directory_iterator()) == 1);
}

TEST_CASE("find_learning_rate in two processes: the same curve and suggestion on every rank, each rank put back",
          "[schedulers][lr_finder][distributed]") {
  using namespace std::chrono_literals;
  const auto data = test::regression_data(128);
  std::vector<torch::nn::Linear> models{test::linear_model(7), test::linear_model(8)};  // the sweep broadcasts rank 0's
  for (const auto transport : {acc::distributed::Transport::shared_memory, acc::distributed::Transport::gloo}) {
  INFO("transport " << (transport == acc::distributed::Transport::gloo ? "gloo" : "shared memory"));
  const auto results = test::run_ranks(2, [&](int rank, auto store) {
    auto model = models[static_cast<std::size_t>(rank)];
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    acc::DataParallelOptions options;
    options.timeout = 30s;
    options.shard_optimizer_state = true;  // each rank holds its share of the momentum
    options.transport = transport;
    trainer.distributed() = acc::DataParallel(store, rank, 2, options);
    trainer.set_output(test::quiet());
    const auto before = test::flat_parameters(*model).clone();
    auto found = acc::find_learning_rate(trainer, data, {.train = {.per_device_batch_size = 8}, .start_lr = 1e-4,
                                                         .num_steps = 40});
    // Each rank's own weights (the sweep broadcast rank 0's), and no momentum buffer left behind.
    const bool restored = torch::equal(before, test::flat_parameters(*model)) && optimizer.state().empty() &&
                          optimizer.param_groups()[0].options().get_lr() == 0.01;
    trainer.train(data, {.per_device_batch_size = 8});  // the ranks still train together afterwards
    return std::tuple{found.losses, found.suggestion, restored, test::flat_parameters(*model)};
  });
  CHECK(std::get<0>(results[0]) == std::get<0>(results[1]));
  CHECK(std::get<1>(results[0]) == std::get<1>(results[1]));
  CHECK(std::get<1>(results[0]).has_value());
  CHECK(std::get<2>(results[0]));
  CHECK(std::get<2>(results[1]));
  CHECK(torch::equal(std::get<3>(results[0]), std::get<3>(results[1])));
  }
}
