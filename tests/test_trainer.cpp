#include "helpers.hpp"
#include "ranks_as_threads.hpp"

namespace acc = accelerated;

namespace {
using Log = std::vector<std::string>;

// Records every event, and stops training at the first step of epoch 2 (as EarlyStopping would, by throwing).
struct RecordEvents {
  Log* log;
  std::int64_t stop_at_epoch = 2;
  void operator()(acc::on_init_end, auto&) { log->push_back("on_init_end"); }
  void operator()(acc::on_training_run_start, auto&) { log->push_back("on_training_run_start"); }
  void operator()(acc::on_train_epoch_start, auto& t) { log->push_back("on_train_epoch_start " + std::to_string(t.run_history().current_epoch())); }
  void operator()(acc::on_train_step_start, auto&) { log->push_back("on_train_step_start"); }
  void operator()(acc::on_train_step_end, auto& t, const auto&, const auto&, std::int64_t step) {
    log->push_back("on_train_step_end " + std::to_string(step));
    if (t.run_history().current_epoch() == stop_at_epoch) throw acc::StopTrainingError("early stop");
  }
  void operator()(acc::on_train_epoch_end, auto&) { log->push_back("on_train_epoch_end"); }
  void operator()(acc::on_eval_epoch_start, auto&, bool intermediate) { log->push_back(intermediate ? "on_eval_epoch_start 1" : "on_eval_epoch_start 0"); }
  void operator()(acc::on_eval_step_start, auto&) { log->push_back("on_eval_step_start"); }
  void operator()(acc::on_eval_step_end, auto&, const auto&, const auto&) { log->push_back("on_eval_step_end"); }
  void operator()(acc::on_eval_epoch_end, auto&, bool) { log->push_back("on_eval_epoch_end"); }
  void operator()(acc::on_training_run_epoch_end, auto&) { log->push_back("on_training_run_epoch_end"); }
  void operator()(acc::on_training_run_end, auto&) { log->push_back("on_training_run_end"); }
  void operator()(acc::on_evaluation_run_start, auto&) { log->push_back("on_evaluation_run_start"); }
  void operator()(acc::on_evaluation_run_end, auto&) { log->push_back("on_evaluation_run_end"); }
  void operator()(acc::on_stop_training_error, auto&, const acc::StopTrainingError& e) { log->push_back(std::string("on_stop_training_error ") + e.what()); }
  void operator()(acc::on_before_optimizer_step, auto&) { log->push_back("on_before_optimizer_step"); }
  void operator()(acc::on_update_step_end, auto&) { log->push_back("on_update_step_end"); }
};

// Records the loop steps into the same log, so the test sees steps and events interleaved.
struct RecordingLoop : acc::DefaultLoop {
  Log* log = nullptr;
  void training_run_start(auto&) { log->push_back("training_run_start"); }
  void train_epoch_start(auto& t) { log->push_back("train_epoch_start"); DefaultLoop::train_epoch_start(t); }
  void backward_step(auto& t, torch::Tensor& loss) { log->push_back("backward_step"); DefaultLoop::backward_step(t, loss); }
  void optimizer_step(auto& t) { log->push_back("optimizer_step"); DefaultLoop::optimizer_step(t); }
  void scheduler_step(auto& t) { log->push_back("scheduler_step"); DefaultLoop::scheduler_step(t); }
  void optimizer_zero_grad(auto& t) { log->push_back("optimizer_zero_grad"); DefaultLoop::optimizer_zero_grad(t); }
  void train_epoch_end(auto&) { log->push_back("train_epoch_end"); }
  void eval_epoch_start(auto& t) { log->push_back("eval_epoch_start"); DefaultLoop::eval_epoch_start(t); }
  void eval_epoch_end(auto&) { log->push_back("eval_epoch_end"); }
  void training_run_epoch_end(auto&) { log->push_back("training_run_epoch_end"); }
  void training_run_end(auto&) { log->push_back("training_run_end"); }
  void evaluation_run_start(auto&) { log->push_back("evaluation_run_start"); }
  void evaluation_run_end(auto&) { log->push_back("evaluation_run_end"); }
};
}  // namespace

TEST_CASE("every event and step fires in the reference order", "[trainer][events]") {
  Log log;
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, RecordingLoop>(
      model, torch::nn::MSELoss(), optimizer, RecordEvents{&log});
  trainer.loop().log = &log;
  trainer.set_output(test::quiet());
  // 6 examples, batch 2: 3 micro-batches; accumulation 2: updates after micro-batches 2 and 3 (the short group).
  trainer.train(test::regression_data(6), {.num_epochs = 3, .per_device_batch_size = 2, .gradient_accumulation_steps = 2},
                test::regression_data(3, 2));
  trainer.evaluate(test::regression_data(3, 2), 2);

  const Log expected{
      "on_init_end", "training_run_start", "on_training_run_start",
      // epoch 1
      "train_epoch_start", "on_train_epoch_start 1",
      "on_train_step_start", "on_train_step_end 0", "backward_step",
      "on_train_step_start", "on_train_step_end 1", "backward_step", "on_before_optimizer_step", "optimizer_step",
      "scheduler_step", "optimizer_zero_grad", "on_update_step_end",
      "on_train_step_start", "on_train_step_end 2", "backward_step", "on_before_optimizer_step", "optimizer_step",
      "scheduler_step", "optimizer_zero_grad", "on_update_step_end",
      "train_epoch_end", "on_train_epoch_end",
      "eval_epoch_start", "on_eval_epoch_start 0", "on_eval_step_start", "on_eval_step_end", "on_eval_step_start",
      "on_eval_step_end", "eval_epoch_end", "on_eval_epoch_end",
      "training_run_epoch_end", "on_training_run_epoch_end",
      // epoch 2: stopped inside the first step, before its backward; the unfinished group's gradients are dropped
      "train_epoch_start", "on_train_epoch_start 2", "on_train_step_start", "on_train_step_end 0",
      "optimizer_zero_grad", "on_stop_training_error early stop",
      "training_run_end", "on_training_run_end",
      // evaluate()
      "evaluation_run_start", "on_evaluation_run_start", "eval_epoch_start", "on_eval_epoch_start 0",
      "on_eval_step_start", "on_eval_step_end", "on_eval_step_start", "on_eval_step_end", "eval_epoch_end",
      "on_eval_epoch_end", "evaluation_run_end", "on_evaluation_run_end"};
  CHECK(log == expected);
  CHECK(trainer.run_history().get_metric_values("train_loss_epoch").size() == 1);
  CHECK(trainer.run_history().get_metric_values("eval_loss_epoch").size() == 1);
  CHECK(trainer.run_history().has_metric("evaluation_loss"));
}

namespace {
// Ends training after the current step when asked: a handler returning bool.
struct StopAfterSteps {
  std::int64_t steps;
  bool operator()(acc::on_train_step_end, auto& t) { return t.state().update_step + 1 >= steps; }
};
}  // namespace

TEST_CASE("a callback returning true stops cleanly after the current step", "[trainer][events]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  std::ostringstream out;
  acc::Trainer trainer(model, torch::nn::MSELoss(), optimizer, acc::callbacks::Defaults{}, StopAfterSteps{3});
  trainer.set_output(out);
  trainer.train(test::regression_data(40), {.num_epochs = 4, .per_device_batch_size = 4});
  CHECK(trainer.state().update_step == 3);  // the step that asked still finished its update
  CHECK_THAT(out.str(), Catch::Contains("stop requested by a callback in on_train_step_end"));
  CHECK_THAT(out.str(), Catch::Contains("Finishing training run"));
  CHECK(trainer.callback<StopAfterSteps>().steps == 3);
}

TEST_CASE("the default callbacks print progress and a plain progress bar and metrics", "[trainer][callbacks]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  std::ostringstream out;
  trainer.set_output(out);
  trainer.train(test::regression_data(40), {.num_epochs = 2, .per_device_batch_size = 4}, test::regression_data(8, 3));
  const auto text = out.str();
  for (const char* expected : {"Starting training run", "Model summary (Linear):", "Total: 9 parameters",
                               "Run: cpu, precision no, 1 process, transport none", "Starting epoch 1",
                               "Starting epoch 2", "Starting eval epoch", "train [", "10/10", "it/s", "eta",
                               "train_loss_epoch: ", "eval_loss_epoch: ", "Finishing training run"}) {
    CHECK_THAT(text, Catch::Contains(expected));
  }
  CHECK_THAT(text, !Catch::Contains("\r"));  // not a terminal: plain lines

  std::ostringstream terminal;
  trainer.set_output(terminal, true);
  trainer.train(test::regression_data(40), {.num_epochs = 1, .per_device_batch_size = 4});
  CHECK_THAT(terminal.str(), Catch::Contains("\rtrain [==============================] 10/10"));  // redrawn in place
}

TEST_CASE("the trainer gives LibTorch every hardware thread unless told otherwise", "[performance]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  if (std::getenv("OMP_NUM_THREADS") == nullptr && std::getenv("ACCELERATED_NUM_THREADS") == nullptr &&
      std::getenv("LOCAL_WORLD_SIZE") == nullptr) {
    CHECK(at::get_num_threads() == static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  }
}

namespace {
// Label smoothing for regression: the point is only that the trainer calls the user's step, and only for training.
struct ScaledLossLoop : acc::DefaultLoop {
  int calls = 0;
  acc::BatchOutput calculate_train_batch_loss(auto& trainer, auto& batch) {
    ++calls;
    auto outputs = trainer.model()(acc::inputs_of(batch));
    return {10.0 * trainer.loss()(outputs, acc::targets_of(batch)), outputs, outputs.size(0)};
  }
};
}  // namespace

TEST_CASE("a loop policy that redefines one step is used for that step only", "[trainer][loop]") {
  const auto data = test::regression_data(16);
  auto run = [&](auto tag) {
    using Loop = typename decltype(tag)::type;
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.0));  // lr 0: losses comparable
    auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, Loop>(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4, .shuffle = false}, data);
    if constexpr (std::is_same_v<Loop, ScaledLossLoop>) CHECK(trainer.loop().calls == 4);
    return std::pair{trainer.run_history().get_latest_metric("train_loss_epoch"),
                     trainer.run_history().get_latest_metric("eval_loss_epoch")};
  };
  const auto [default_train, default_eval] = run(boost::hana::type_c<acc::DefaultLoop>);
  const auto [scaled_train, scaled_eval] = run(boost::hana::type_c<ScaledLossLoop>);
  CHECK(scaled_train == Approx(10.0 * default_train));
  CHECK(scaled_eval == Approx(default_eval));
}

TEST_CASE("gradient accumulation equals one large batch with the short last group included", "[trainer][accumulation]") {
  const auto data = test::regression_data(12);
  auto train = [&](std::int64_t batch, std::int64_t accumulation) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
    acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.train(data, {.num_epochs = 3, .per_device_batch_size = batch, .gradient_accumulation_steps = accumulation,
                         .shuffle = false});
    return std::pair{test::flat_parameters(*model), trainer.state().update_step};
  };
  // 12 examples: batch 4 x accumulation 3 = one update per epoch, like batch 12.
  const auto [big, big_updates] = train(12, 1);
  const auto [accumulated, accumulated_updates] = train(4, 3);
  CHECK(big_updates == 3);
  CHECK(accumulated_updates == 3);
  CHECK(torch::allclose(big, accumulated, 1e-5, 1e-6));
  // Batch 2 x accumulation 4: groups of 4 and 2 batches. The short group is averaged over its 2 batches, so it
  // equals batches of 8 then 4 examples.
  const auto [grouped, grouped_updates] = train(2, 4);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  for (int epoch = 0; epoch < 3; ++epoch) {
    for (auto [start, size] : {std::pair{0, 8}, std::pair{8, 4}}) {
      optimizer.zero_grad();
      torch::mse_loss(model(data.first.narrow(0, start, size)), data.second.narrow(0, start, size)).backward();
      optimizer.step();
    }
  }
  CHECK(grouped_updates == 6);
  CHECK(torch::allclose(grouped, test::flat_parameters(*model), 1e-5, 1e-6));
}

TEST_CASE("the recorded loss is the unscaled batch-size-weighted mean", "[trainer][accumulation]") {
  const auto data = test::regression_data(10);  // batches of 4, 4, 2
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.0));
  acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4, .gradient_accumulation_steps = 2, .shuffle = false}, data);
  const auto full = torch::mse_loss(model(data.first), data.second).item<double>();
  CHECK(trainer.run_history().get_latest_metric("train_loss_epoch") == Approx(full).epsilon(1e-6));
  CHECK(trainer.run_history().get_latest_metric("eval_loss_epoch") == Approx(full).epsilon(1e-6));
  const double returned = trainer.evaluate(data, 3);  // batches of 3, 3, 3, 1
  CHECK(trainer.run_history().get_latest_metric("evaluation_loss") == Approx(full).epsilon(1e-6));
  CHECK(returned == trainer.run_history().get_latest_metric("evaluation_loss"));  // evaluate() returns the loss
  CHECK(trainer.run_config().eval_per_device_batch_size == 3);  // run_config() now describes the evaluation
}

namespace {
// Reads the largest gradient entry when the optimizer steps (after clipping) and after each backward.
struct GradientProbe : acc::DefaultLoop {
  std::vector<double> at_backward, at_step;
  static double max_grad(auto& t) {
    double m = 0;
    for (auto& p : t.model()->parameters()) m = std::max(m, p.grad().abs().max().template item<double>());
    return m;
  }
  void backward_step(auto& t, torch::Tensor& loss) { DefaultLoop::backward_step(t, loss); at_backward.push_back(max_grad(t)); }
  void optimizer_step(auto& t) { at_step.push_back(max_grad(t)); DefaultLoop::optimizer_step(t); }
};
}  // namespace

TEST_CASE("gradients are clipped on update steps only by value or by norm", "[trainer][clipping]") {
  const auto data = std::pair{torch::randn({8, 8}) * 10, torch::randn({8, 1}) * 100};
  SECTION("by value") {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
    auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, GradientProbe>(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 2, .gradient_accumulation_steps = 2, .gradient_clip_value = 0.5});
    REQUIRE(trainer.loop().at_step.size() == 2);
    for (double g : trainer.loop().at_step) CHECK(g <= 0.5 + 1e-6);
    CHECK(trainer.loop().at_backward[0] > 0.5);  // the micro-step before an update was not clipped
  }
  SECTION("by norm") {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
    auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, GradientProbe>(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4, .gradient_clip_norm = 1.0});
    REQUIRE(trainer.loop().at_step.size() == 2);
    for (double g : trainer.loop().at_step) CHECK(g <= 1.0 + 1e-6);
    CHECK(trainer.loop().at_backward[0] > 1.0);
  }
}

TEST_CASE("max_num_train_steps and num_epochs: the smaller limit wins", "[trainer][options]") {
  const auto data = test::regression_data(16);  // batch 4: 4 updates per epoch
  auto run = [&](acc::TrainOptions options) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
    acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    options.per_device_batch_size = 4;
    trainer.train(data, options);
    return std::tuple{trainer.state().update_step, trainer.run_config().num_epochs,
                      trainer.run_history().get_metric_values("train_loss_epoch").size()};
  };
  CHECK(run({.num_epochs = 5, .max_num_train_steps = 6}) == std::tuple{6, 2, 2});
  CHECK(run({.num_epochs = 1, .max_num_train_steps = 100}) == std::tuple{4, 1, 1});
  CHECK(run({.num_epochs = 0, .max_num_train_steps = 9}) == std::tuple{9, 3, 3});
  CHECK(run({.num_epochs = 2, .max_num_train_steps = 3, .gradient_accumulation_steps = 3}) == std::tuple{3, 2, 2});
}

namespace {
// Counts its steps (LRScheduler::step() calls get_lrs() once) and halves the rate at each call.
struct CountingScheduler : torch::optim::LRScheduler {
  int* steps;
  CountingScheduler(torch::optim::Optimizer& optimizer, int* counter) : LRScheduler(optimizer), steps(counter) {}
  std::vector<double> get_lrs() override {
    ++*steps;
    auto lrs = get_current_lrs();
    for (auto& lr : lrs) lr *= 0.5;
    return lrs;
  }
};
}  // namespace

TEST_CASE("the scheduler factory sees the run config and steps once per update", "[trainer][scheduler]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1.0));
  acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  std::int64_t seen_updates_per_epoch = 0, seen_max_steps = 0;
  int steps = 0;
  acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 2, .gradient_accumulation_steps = 2};
  options.create_scheduler_fn = [&](torch::optim::Optimizer& opt, const acc::RunConfig& config) {
    seen_updates_per_epoch = config.num_update_steps_per_epoch;
    seen_max_steps = config.max_num_train_steps;
    return std::make_unique<CountingScheduler>(opt, &steps);
  };
  trainer.train(test::regression_data(12), options);  // 6 batches, 3 updates per epoch
  CHECK(seen_updates_per_epoch == 3);
  CHECK(seen_max_steps == 6);
  CHECK(steps == 6);
  CHECK(optimizer.param_groups()[0].options().get_lr() == Approx(1.0 / 64));
  // Any LibTorch scheduler plugs in the same way.
  options.create_scheduler_fn = [](torch::optim::Optimizer& opt, const acc::RunConfig& config) {
    return std::make_unique<torch::optim::StepLR>(opt, config.num_update_steps_per_epoch, 0.5);
  };
  optimizer.param_groups()[0].options().set_lr(1.0);
  trainer.train(test::regression_data(12), options);
  CHECK(optimizer.param_groups()[0].options().get_lr() < 1.0);
}

namespace {
// A loss that turns NaN at the k-th call.
struct NanAt {
  int k;
  std::shared_ptr<int> calls = std::make_shared<int>(0);
  torch::Tensor operator()(const torch::Tensor& out, const torch::Tensor& target) const {
    auto loss = torch::mse_loss(out, target);
    return ++*calls == k ? loss * std::nan("") : loss;
  }
};
}  // namespace

TEST_CASE("a NaN loss stops the run and throws with the epoch and step", "[trainer][bad_input]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  Log log;
  acc::Trainer trainer(model, NanAt{7}, optimizer, acc::callbacks::Defaults{}, RecordEvents{&log, 0});
  trainer.set_output(test::quiet());
  // 20 examples, batch 4: 5 steps per epoch, so call 7 is epoch 2, step 2.
  const auto message = test::message_of([&] { trainer.train(test::regression_data(20), {.num_epochs = 3, .per_device_batch_size = 4}); });
  CHECK_THAT(message, Catch::Contains("non-finite train loss") && Catch::Contains("epoch 2, step 2 of 5"));
  CHECK(log.back() == "on_training_run_end");  // the run ended cleanly before the error surfaced
  CHECK(trainer.run_history().get_metric_values("train_loss_epoch").size() == 1);
}

TEST_CASE("evaluate leaves the model's mode as it found it", "[trainer][evaluate]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  const auto data = test::regression_data(8);
  model->train();
  trainer.evaluate(data);
  CHECK(model->is_training());
  model->eval();
  trainer.evaluate(data);
  CHECK_FALSE(model->is_training());
  CHECK(trainer.run_history().get_metric_values("evaluation_loss").size() == 2);
  CHECK_FALSE(model->parameters()[0].grad().defined());  // evaluation ran without autograd
}

TEST_CASE("training on each kind of data gives bit-identical parameters", "[trainer][data]") {
  const auto data = test::regression_data(30);
  auto train = [&](auto&& dataset) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.train(dataset, {.num_epochs = 3, .per_device_batch_size = 8, .seed = 5});
    return test::flat_parameters(*model);
  };
  const auto from_tensors = train(data);
  CHECK(torch::equal(from_tensors, train(test::PairDataset(data.first, data.second))));
  std::vector<std::pair<torch::Tensor, torch::Tensor>> examples;
  for (std::int64_t i = 0; i < 30; ++i) examples.emplace_back(data.first[i], data.second[i]);
  CHECK(torch::equal(from_tensors, train(examples)));
  // And the order really is shuffled: another seed gives other parameters.
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  trainer.train(data, {.num_epochs = 3, .per_device_batch_size = 8, .seed = 6});
  CHECK_FALSE(torch::equal(from_tensors, test::flat_parameters(*model)));
}

TEST_CASE("the trainer matches a hand-written LibTorch loop exactly", "[trainer][zero_overhead]") {
  const auto data = test::regression_data(32);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  acc::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 8, .shuffle = false});

  auto reference = test::linear_model();
  torch::optim::SGD reference_optimizer(reference->parameters(), torch::optim::SGDOptions(0.05));
  for (int epoch = 0; epoch < 2; ++epoch) {
    for (std::int64_t start = 0; start < 32; start += 8) {
      reference_optimizer.zero_grad();
      torch::mse_loss(reference(data.first.narrow(0, start, 8)), data.second.narrow(0, start, 8)).backward();
      reference_optimizer.step();
    }
  }
  CHECK(torch::equal(test::flat_parameters(*model), test::flat_parameters(*reference)));
}

TEST_CASE("accuracy is counted over the whole eval set", "[trainer][callbacks]") {
  torch::manual_seed(0);
  const auto x = torch::randn({10, 3});
  const auto y = torch::tensor({0, 1, 2, 0, 1, 2, 0, 1, 2, 0}, torch::kLong);
  auto model = torch::nn::Linear(3, 3);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.0));
  acc::Trainer trainer(model, torch::nn::CrossEntropyLoss(), optimizer, acc::callbacks::Accuracy{}, acc::callbacks::TopKAccuracy<2>{});
  trainer.evaluate(std::pair{x, y}, 4);
  const auto scores = model(x);
  const double top1 = scores.argmax(1).eq(y).sum().item<double>() / 10.0;
  const double top2 = std::get<1>(scores.topk(2, 1)).eq(y.unsqueeze(1)).any(1).sum().item<double>() / 10.0;
  CHECK(trainer.run_history().get_latest_metric("evaluation_accuracy") == Approx(top1));
  CHECK(trainer.run_history().get_latest_metric("evaluation_top2_accuracy") == Approx(top2));
}

namespace {
struct StopAtStep {
  std::int64_t at;
  template <class Trainer>
  void operator()(acc::on_train_step_end, Trainer& trainer) {
    if (trainer.state().step + 1 == at) throw acc::StopTrainingError("stop at a micro-step");
  }
};
}  // namespace

TEST_CASE("a stop between accumulation micro-steps leaves no gradient for the next train()", "[trainer][stop]") {
  const auto data = test::regression_data(32);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess>(
      model, torch::nn::MSELoss(), optimizer, StopAtStep{6});  // updates after steps 4 and 8: step 6 is mid-group
  trainer.set_output(test::quiet());
  trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 2, .gradient_accumulation_steps = 4});
  CHECK(trainer.state().update_step == 1);
  for (const auto& p : model->parameters()) {
    CHECK((!p.grad().defined() || p.grad().abs().sum().item<double>() == 0.0));
  }
}

TEST_CASE("a LibTorch error in the model or the loss says where it happened and keeps its message", "[trainer][errors]") {
  auto model = torch::nn::Linear(8, 3);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess>(model, torch::nn::CrossEntropyLoss(),
                                                                                     optimizer);
  trainer.set_output(test::quiet());
  auto labels = torch::zeros({16}, torch::kLong);
  labels[9] = 7;  // 3 classes: out of range, in batch 3 of 4
  const auto inputs = torch::randn({16, 8});
  std::string message;
  try {
    trainer.train(std::pair{inputs, labels}, {.num_epochs = 1, .per_device_batch_size = 4, .shuffle = false});
  } catch (const acc::StepError& error) {
    message = error.what();
    CHECK_THROWS_AS(std::rethrow_if_nested(error), c10::Error);  // the original is nested
  }
  CHECK_THAT(message, Catch::Contains("the train step at epoch 1, step 3 of 4 failed") &&
                          Catch::Contains("out of bounds"));
  CHECK_THAT(message, !Catch::Contains("frame #"));  // no C++ backtrace
}

namespace {
struct CountingLoop : acc::DefaultLoop {
  int* steps = nullptr;
  void optimizer_step(auto& t) {
    ++*steps;
    acc::DefaultLoop::optimizer_step(t);
  }
};
}  // namespace

TEST_CASE("configured policies are given to the trainer as values", "[trainer][policies]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.05);
  acc::DataParallelOptions options;
  options.timeout = std::chrono::seconds(7);
  // Any subset, in any order; the others are the defaults. CTAD deduces the trainer's type from them.
  acc::Trainer trainer(model, torch::nn::MSELoss(), optimizer, acc::policies(acc::BFloat16{}, acc::Cpu{}),
                       acc::callbacks::Defaults{});
  static_assert(std::is_same_v<decltype(trainer)::device_policy_type, acc::Cpu>);
  static_assert(std::is_same_v<decltype(trainer)::precision_policy_type, acc::BFloat16>);
  static_assert(std::is_same_v<decltype(trainer)::distributed_policy_type, acc::AutoDistributed>);
  static_assert(std::is_same_v<decltype(trainer)::loop_policy_type, acc::DefaultLoop>);
  trainer.set_output(test::quiet());
  trainer.train(test::regression_data(16), {.per_device_batch_size = 4});
  CHECK(trainer.run_config().mixed_precision == "bf16");

  // A configured value keeps its configuration (here a loop policy with state).
  int steps = 0;
  acc::Trainer counted(model, torch::nn::MSELoss(), optimizer,
                       acc::policies(CountingLoop{.steps = &steps}, acc::Cpu{}, acc::FullPrecision{}),
                       acc::callbacks::Defaults{});
  counted.set_output(test::quiet());
  counted.train(test::regression_data(16), {.num_epochs = 2, .per_device_batch_size = 4});
  CHECK(steps == 8);
  (void)options;
}

TEST_CASE("the model summary lists modules, trainable and frozen parameters, bytes by dtype, and the run",
          "[trainer][callbacks]") {
  struct Net : torch::nn::Module {
    Net() {
      backbone = register_module("backbone", torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::ReLU()));
      head = register_module("head", torch::nn::Linear(16, 1));
      head->to(torch::kDouble);
      for (auto& p : backbone->parameters()) p.requires_grad_(false);  // frozen
    }
    torch::Tensor forward(torch::Tensor x) { return head(backbone->forward(x).to(torch::kDouble)).to(torch::kFloat); }
    torch::nn::Sequential backbone{nullptr};
    torch::nn::Linear head{nullptr};
  };
  auto model = std::make_shared<Net>();
  const auto table = acc::callbacks::ModelSummary::summary(*model, 1);
  INFO(table);
  // backbone: 8x16 + 16 = 144 floats (576 B), frozen; head: 16 + 1 = 17 doubles (136 B), trainable.
  CHECK_THAT(table, Catch::Contains("backbone  Sequential         144          0  576 B Float"));
  CHECK_THAT(table, Catch::Contains("head      Linear              17         17  136 B Double"));
  CHECK_THAT(table, !Catch::Contains("backbone.0"));  // depth 1: the model's children
  CHECK_THAT(table, Catch::Contains("Total: 161 parameters, 17 trainable, 144 frozen; 136 B Double, 576 B Float"));
  CHECK_THAT(acc::callbacks::ModelSummary::summary(*model, 2), Catch::Contains("backbone.0  Linear"));
  CHECK_THROWS_WITH(acc::callbacks::ModelSummary(0), Catch::Contains("max_depth"));

  // The run line says what the run uses, e.g. bf16 (a default callback: printed at every run's start).
  auto linear = test::linear_model();
  torch::optim::SGD optimizer(linear->parameters(), 0.05);
  acc::Trainer trainer(linear, torch::nn::MSELoss(), optimizer, acc::policies(acc::BFloat16{}, acc::Cpu{}));
  std::ostringstream out;
  trainer.set_output(out);
  trainer.train(test::regression_data(16), {.per_device_batch_size = 4});
  CHECK_THAT(out.str(), Catch::Contains("Run: cpu, precision bf16, 1 process, transport none, " +
                                        std::to_string(at::get_num_threads()) + " intra-op threads"));
}

TEST_CASE("a trainer can run with no callbacks at all", "[trainer][callbacks]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.05);
  acc::Trainer trainer(model, torch::nn::MSELoss(), optimizer, acc::callbacks::None{});
  static_assert(std::is_same_v<decltype(trainer)::callback_tuple, boost::hana::tuple<>>);
  std::ostringstream out;
  trainer.set_output(out);
  trainer.train(test::regression_data(16), {.num_epochs = 2, .per_device_batch_size = 4});
  CHECK(out.str().empty());  // no progress, no metrics printed
  CHECK(trainer.run_history().get_metric_values("train_loss_epoch").size() == 2);  // the history is the trainer's
}

// The archetypes of docs/writing-a-device-policy.md and docs/writing-a-distributed-policy.md (the pages are checked
// against these files by the doc-snippet test).
namespace archetypes {
#include "archetypes/device_policy.hpp"
#include "archetypes/distributed_policy.hpp"
}  // namespace archetypes

TEST_CASE("the policy archetypes of the docs satisfy the concepts and train", "[trainer][policies][archetypes]") {
  static_assert(acc::DevicePolicy<archetypes::ExampleDevice>);
  static_assert(acc::DistributedPolicy<archetypes::ExampleDistributed>);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.05);
  acc::Trainer trainer(model, torch::nn::MSELoss(), optimizer,
                       acc::policies(archetypes::ExampleDevice{}, archetypes::ExampleDistributed{}),
                       acc::callbacks::None{});
  CHECK(trainer.device_policy().placed == 2);  // the model and the loss module, when the trainer was built
  trainer.train(test::regression_data(16), {.num_epochs = 2, .per_device_batch_size = 4,
                                            .gradient_accumulation_steps = 2});
  CHECK(trainer.device_policy().placed == 4);  // and again at the start of the run
  CHECK(trainer.run_config().device == "example-cpu");
  const auto& calls = trainer.distributed().calls;
  for (const char* call : {"bind_device", "prepare", "gradient_sync(update)", "gradient_sync(accumulate)",
                           "all_reduce_sum"}) {
    INFO(call);
    CHECK(std::find(calls.begin(), calls.end(), call) != calls.end());
  }
}

namespace {
struct StopsEvaluation {
  void operator()(acc::on_eval_step_start, auto&) { throw acc::StopTrainingError("enough"); }
};
}  // namespace

TEST_CASE("evaluate() stopped by a callback returns NaN and records nothing", "[trainer][evaluate]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.05);
  acc::Trainer trainer(model, torch::nn::MSELoss(), optimizer, StopsEvaluation{});
  trainer.set_output(test::quiet());
  CHECK(std::isnan(trainer.evaluate(test::regression_data(8), 4)));
  CHECK_FALSE(trainer.run_history().has_metric("evaluation_loss"));
}

namespace {
// A loop policy written from scratch with one step: the others are DefaultLoop's.
struct OnlyCountsUpdates {
  int updates = 0;
  void optimizer_step(auto& trainer) {
    ++updates;
    trainer.precision().step(trainer.optimizer());
  }
};
}  // namespace

TEST_CASE("a loop policy defines only the steps it changes", "[trainer][loop]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.05);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, OnlyCountsUpdates> trainer(
      model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  const auto before = test::flat_parameters(*model);
  trainer.train(test::regression_data(16), {.num_epochs = 2, .per_device_batch_size = 4});
  CHECK(trainer.loop().updates == 8);
  CHECK_FALSE(torch::equal(before, test::flat_parameters(*model)));  // the default steps did the rest
  CHECK(trainer.run_history().get_metric_values("train_loss_epoch").size() == 2);
}

namespace {
// The loss named in the policy, called directly (docs/loop-policies.md, "A loss the compiler sees").
struct InlineMse {
  acc::BatchOutput calculate_train_batch_loss(auto& trainer, auto& batch) {
    auto outputs = trainer.model()(acc::inputs_of(batch));
    return {torch::nn::functional::mse_loss(outputs, acc::targets_of(batch)), outputs, outputs.size(0)};
  }
  acc::BatchOutput calculate_eval_batch_loss(auto& trainer, auto& batch) {
    return calculate_train_batch_loss(trainer, batch);
  }
};
}  // namespace

TEST_CASE("a loss called inline by a loop policy trains as the trainer's loss does", "[trainer][loop]") {
  const acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 4};
  torch::manual_seed(3);
  auto through_trainer = test::linear_model();
  auto inline_model = test::linear_model();
  {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < inline_model->parameters().size(); ++i) {
      inline_model->parameters()[i].copy_(through_trainer->parameters()[i]);
    }
  }
  torch::optim::SGD o1(through_trainer->parameters(), 0.05);
  torch::optim::SGD o2(inline_model->parameters(), 0.05);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> plain(through_trainer, torch::nn::MSELoss(), o1);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, InlineMse> inlined(inline_model, nullptr, o2);
  plain.set_output(test::quiet());
  inlined.set_output(test::quiet());
  plain.train(test::regression_data(16), options, test::regression_data(8));
  inlined.train(test::regression_data(16), options, test::regression_data(8));
  CHECK(torch::equal(test::flat_parameters(*through_trainer), test::flat_parameters(*inline_model)));
  CHECK(plain.run_history().get_metric_values("eval_loss_epoch") ==
        inlined.run_history().get_metric_values("eval_loss_epoch"));
}

TEST_CASE("a stateful loss callable is called, not copied, at each batch", "[trainer][loss]") {
  int calls = 0;
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.05);
  auto counting = [&calls, mse = torch::nn::MSELoss()](const torch::Tensor& out, const torch::Tensor& target) mutable {
    ++calls;
    return mse(out, target);
  };
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, counting, optimizer);
  trainer.set_output(test::quiet());
  trainer.train(test::regression_data(16), {.num_epochs = 1, .per_device_batch_size = 4});
  CHECK(calls == 4);
  CHECK_FALSE(acc::LossFunction(nullptr));
  CHECK_THROWS_WITH(acc::LossFunction(nullptr)(torch::zeros({1}), torch::zeros({1})),
                    Catch::Contains("null loss"));
}

TEST_CASE("the profiler writes a Chrome trace of its window: the trainer's phases around the model's operators",
          "[trainer][profiler]") {
  const auto python = test::python_with("json");
  if (python.empty()) ACCELERATED_SKIP("no python3 to read the trace with");
  const auto dir = test::fresh_dir("profiler");
  namespace cb = acc::callbacks;
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 1));
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  std::ostringstream out;
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::Profiler> trainer(
      model, torch::nn::MSELoss(), optimizer, cb::Profiler({.wait = 2, .warmup = 1, .active = 3, .path = dir / "trace.json"}));
  trainer.set_output(out);
  // 10 updates an epoch: updates 4-6 are recorded, with the eval epoch's range outside the window.
  trainer.train(test::regression_data(40), {.num_epochs = 2, .per_device_batch_size = 4}, test::regression_data(8, 2));
  CHECK(trainer.callback<cb::Profiler>().written() == dir / "trace.json");
  CHECK_THAT(out.str(), Catch::Contains("Profiler: updates 4-6 of this run's epoch 1 written to"));
  CHECK(test::run_python(python, "check_trace.py",
                         {(dir / "trace.json").string(), "3", "accelerated::data", "accelerated::forward",
                          "accelerated::backward", "accelerated::optimizer", "aten::addmm", "aten::mse_loss"}) == 0);
  // An epoch shorter than the window: the trace holds what there was, written at the epoch's end.
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::Profiler> short_run(
      model, torch::nn::MSELoss(), optimizer,
      cb::Profiler({.wait = 0, .warmup = 0, .active = 50, .path = dir / "short.json", .record_shapes = true}));
  std::ostringstream short_out;
  short_run.set_output(short_out);
  short_run.train(test::regression_data(16), {.per_device_batch_size = 4});
  CHECK(test::run_python(python, "check_trace.py",
                         {(dir / "short.json").string(), "4", "accelerated::forward", "--shapes"}) == 0);
  // A run too short for its window (wait 10, four updates): it says so, and writes nothing.
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::Profiler> too_short(
      model, torch::nn::MSELoss(), optimizer, cb::Profiler({.wait = 10, .path = dir / "never.json"}));
  std::ostringstream too_short_out;
  too_short.set_output(too_short_out);
  too_short.train(test::regression_data(16), {.per_device_batch_size = 4});
  CHECK_THAT(too_short_out.str(), Catch::Contains("Profiler: the run ended after 4 updates, before its window (wait + "
                                                  "warmup = 11); no trace written"));
  CHECK_FALSE(std::filesystem::exists(dir / "never.json"));
  CHECK_THROWS_WITH(cb::Profiler({.active = 0}), "accelerated::callbacks::Profiler: active = 0 must be >= 1");
  // Ranks as threads: each rank writes its own trace, with the trainer's collectives (the stop vote) in it.
  test::run_ranks(2, [&](int rank, auto store) {
    auto m = test::linear_model();
    torch::optim::SGD o(m->parameters(), torch::optim::SGDOptions(0.01));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, cb::Profiler> t(
        m, torch::nn::MSELoss(), o, cb::Profiler({.wait = 1, .warmup = 0, .active = 2, .path = dir / "ranks.json"}));
    acc::DataParallelOptions options;
    options.timeout = std::chrono::seconds(30);
    options.shard_optimizer_state = true;  // the exchange of the updated parameters
    t.distributed() = acc::DataParallel(store, rank, 2, options);
    t.set_output(test::quiet());
    t.train(test::regression_data(64), {.per_device_batch_size = 4});
    return 0;
  });
  for (const char* file : {"ranks.rank0.json", "ranks.rank1.json"}) {
    CHECK(test::run_python(python, "check_trace.py", {(dir / file).string(), "2", "accelerated::all_reduce",
                                                      "accelerated::broadcast", "accelerated::exchange"}) == 0);
  }
}
