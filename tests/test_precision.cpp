// Device and precision policies, tested on the CPU: autocast, the loss scaler's logic, placement, the policy matrix.
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <boost/hana/for_each.hpp>
#include <boost/hana/tuple.hpp>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <set>
#include <tuple>
#include <sstream>

#include "helpers.hpp"
#include "ranks_as_threads.hpp"

namespace acc = accelerated;
namespace hana = boost::hana;
using acc::precision::AutocastGuard;
using acc::precision::GradScaler;

namespace {
using test::ScopedEnv;
}  // namespace

TEST_CASE("the autocast guard enables bf16 on the CPU and nests and restores", "[precision][autocast]") {
  auto linear = torch::nn::Linear(4, 3);
  const auto x = torch::randn({2, 4});
  REQUIRE_FALSE(acc::compat::autocast_enabled(torch::kCPU));
  {
    AutocastGuard outer(torch::kCPU, torch::kBFloat16);
    CHECK(linear(x).dtype() == torch::kBFloat16);
    CHECK(linear->weight.dtype() == torch::kFloat);  // weights stay float32
    {
      AutocastGuard inner(torch::kCPU, torch::kBFloat16);
      CHECK(linear(x).dtype() == torch::kBFloat16);
    }
    CHECK(acc::compat::autocast_enabled(torch::kCPU));  // the inner guard restored the outer state
    CHECK(linear(x).dtype() == torch::kBFloat16);
  }
  CHECK_FALSE(acc::compat::autocast_enabled(torch::kCPU));
  CHECK(linear(x).dtype() == torch::kFloat);
  std::optional<AutocastGuard> moved;
  moved.emplace(torch::kCPU, torch::kBFloat16);
  auto other = std::move(*moved);
  moved.reset();  // the moved-from guard restores nothing
  CHECK(acc::compat::autocast_enabled(torch::kCPU));
}

namespace {
struct ScalerFixture {
  torch::nn::Linear model = test::linear_model();
  torch::optim::SGD optimizer{model->parameters(), torch::optim::SGDOptions(0.1)};
  std::pair<torch::Tensor, torch::Tensor> data = test::regression_data(8);
  torch::Tensor loss() { return torch::mse_loss(model(data.first), data.second); }
};
}  // namespace

TEST_CASE("the scaler skips a step with an inf gradient and halves the scale", "[precision][scaler]") {
  ScalerFixture f;
  GradScaler scaler;
  CHECK(scaler.get_scale() == 65536.0);
  scaler.scale(f.loss()).backward();
  f.model->weight.grad()[0][3] = std::numeric_limits<float>::infinity();  // the injected overflow
  const auto before = test::flat_parameters(*f.model);
  CHECK_FALSE(scaler.step(f.optimizer));
  scaler.update();
  CHECK(scaler.last_step_skipped());
  CHECK(torch::equal(before, test::flat_parameters(*f.model)));  // no update
  CHECK(scaler.get_scale() == 32768.0);
  CHECK(scaler.growth_tracker() == 0);
}

TEST_CASE("the scaler doubles the scale after growth_interval clean steps", "[precision][scaler]") {
  ScalerFixture f;
  GradScaler scaler({.init_scale = 1024.0, .growth_interval = 3});
  for (int step = 1; step <= 3; ++step) {
    f.optimizer.zero_grad();
    scaler.scale(f.loss()).backward();
    CHECK(scaler.step(f.optimizer));
    scaler.update();
    CHECK(scaler.get_scale() == (step < 3 ? 1024.0 : 2048.0));
    CHECK(scaler.growth_tracker() == step % 3);
  }
}

TEST_CASE("unscaled gradients equal the true gradients so clipping sees them", "[precision][scaler]") {
  ScalerFixture f;
  f.loss().backward();
  const auto reference = f.model->weight.grad().clone();
  f.optimizer.zero_grad();
  GradScaler scaler({.init_scale = 4096.0});
  scaler.scale(f.loss()).backward();
  CHECK_FALSE(torch::allclose(f.model->weight.grad(), reference));
  scaler.unscale_(f.optimizer);
  scaler.unscale_(f.optimizer);  // once per step: a second call does nothing
  CHECK(torch::allclose(f.model->weight.grad(), reference, 1e-6, 1e-7));
}

TEST_CASE("the scaler's state round-trips through an archive", "[precision][scaler]") {
  ScalerFixture f;
  GradScaler scaler({.init_scale = 256.0, .growth_factor = 4.0, .backoff_factor = 0.25, .growth_interval = 5});
  scaler.scale(f.loss()).backward();
  scaler.step(f.optimizer);
  scaler.update();
  torch::serialize::OutputArchive out;
  scaler.save(out);
  std::ostringstream bytes;
  out.save_to(bytes);
  std::istringstream in_bytes(bytes.str());
  torch::serialize::InputArchive in;
  in.load_from(in_bytes);
  GradScaler restored;
  restored.load(in);
  CHECK(restored.get_scale() == 256.0);
  CHECK(restored.growth_tracker() == 1);
  CHECK(restored.options().growth_interval == 5);
  CHECK(restored.options().backoff_factor == 0.25);
  torch::serialize::InputArchive empty;
  CHECK_THROWS_WITH(restored.load(empty), Catch::Contains("no 'scale'"));
  CHECK_THROWS_WITH(GradScaler({.init_scale = 0.0}), Catch::Contains("init_scale = 0"));
  CHECK_THROWS_WITH(GradScaler({.backoff_factor = 1.5}), Catch::Contains("backoff_factor = 1.5"));
}

TEST_CASE("fp16 on the CPU is a clear error", "[precision][bad_input]") {
  acc::Float16 fp16;
  CHECK_THROWS_WITH(fp16.check_device(torch::kCPU), Catch::Contains("fp16 mixed precision needs a CUDA device") &&
                                                        Catch::Contains("BFloat16"));
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  // Trainer<Cpu, Float16> does not compile (compile_fail.fp16_on_cpu); AutoDevice decides at run time, and on a
  // machine without a GPU the trainer refuses it when it is built.
  if (!torch::cuda::is_available()) {
    using Fp16OnAuto = acc::Trainer<acc::AutoDevice, acc::Float16>;
    CHECK_THROWS_WITH(Fp16OnAuto(model, torch::nn::MSELoss(), optimizer), Catch::Contains("needs a CUDA device"));
  }
}

TEST_CASE("AutoPrecision reads ACCELERATED_MIXED_PRECISION", "[precision][auto]") {
  {
    ScopedEnv env("ACCELERATED_MIXED_PRECISION", nullptr);
    CHECK(acc::AutoPrecision().name() == "no");
  }
  {
    ScopedEnv env("ACCELERATED_MIXED_PRECISION", "bf16");
    CHECK(acc::AutoPrecision().name() == "bf16");
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
    acc::Trainer<acc::Cpu> trainer(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.train(test::regression_data(16), {.per_device_batch_size = 4});
    CHECK(trainer.run_config().mixed_precision == "bf16");
    CHECK(trainer.run_config().device == "cpu");
  }
  {
    ScopedEnv env("ACCELERATED_MIXED_PRECISION", "fp8");
    CHECK_THROWS_WITH(acc::AutoPrecision(), Catch::Contains("ACCELERATED_MIXED_PRECISION = 'fp8'"));
  }
  {
    ScopedEnv env("ACCELERATED_MIXED_PRECISION", "fp16");
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
    CHECK_THROWS_WITH(acc::Trainer<acc::Cpu>(model, torch::nn::MSELoss(), optimizer), Catch::Contains("needs a CUDA device"));
  }
}

TEST_CASE("bf16 training on the CPU tracks fp32", "[precision][bf16]") {
  torch::manual_seed(3);
  const auto x = torch::randn({512, 20});
  const auto y = x.narrow(1, 0, 4).argmax(1);
  auto run = [&](auto precision_tag) {
    using Precision = typename decltype(precision_tag)::type;
    torch::manual_seed(4);
    auto model = torch::nn::Sequential(torch::nn::Linear(20, 64), torch::nn::ReLU(), torch::nn::Linear(64, 4));
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
    auto trainer = acc::make_trainer<acc::Cpu, Precision>(model, torch::nn::CrossEntropyLoss(), optimizer,
                                                          acc::callbacks::Accuracy{});
    trainer.train(std::pair{x, y}, {.num_epochs = 8, .per_device_batch_size = 32}, std::pair{x, y});
    return trainer.run_history().get_latest_metric("eval_accuracy");
  };
  const double fp32 = run(hana::type_c<acc::FullPrecision>);
  const double bf16 = run(hana::type_c<acc::BFloat16>);
  CHECK(fp32 > 0.9);
  CHECK(std::abs(fp32 - bf16) < 0.03);
}

TEST_CASE("nested batches move to the device with every tensor and keep the rest", "[device]") {
  using Batch = std::tuple<torch::Tensor, std::vector<torch::Tensor>, std::map<std::string, torch::Tensor>, int,
                           torch::data::Example<>>;
  Batch batch{torch::ones({2}), {torch::zeros({1}), torch::zeros({3})}, {{"mask", torch::ones({2, 2})}}, 7,
              {torch::ones({1}), torch::zeros({1})}};
  const auto moved = acc::detail::to_device(batch, torch::Device(torch::kMeta));
  CHECK(std::get<0>(moved).is_meta());
  CHECK(std::get<1>(moved).size() == 2);
  CHECK(std::get<1>(moved)[1].is_meta());
  CHECK(std::get<1>(moved)[1].sizes() == torch::IntArrayRef{3});
  CHECK(std::get<2>(moved).at("mask").is_meta());
  CHECK(std::get<3>(moved) == 7);
  CHECK(std::get<4>(moved).target.is_meta());
  CHECK(std::get<0>(batch).is_cpu());  // the source is untouched
  // The CPU policy hands the batch through without copying.
  acc::Cpu cpu;
  torch::Tensor t = torch::ones({2});
  CHECK(&cpu.to_device(t) == &t);
  acc::AutoDevice automatic;
  CHECK(automatic.to_device(t).data_ptr() == t.data_ptr());
}

TEST_CASE("the Cuda policy reports a missing GPU clearly", "[device][bad_input]") {
  if (torch::cuda::is_available()) return;  // this check is for CPU-only machines
  acc::Cuda cuda;
  CHECK(cuda.device() == torch::Device(torch::kCUDA, 0));
  auto model = test::linear_model();
  CHECK_THROWS_WITH(cuda.place(*model), Catch::Contains("CUDA is not available"));
  {
    // Under mpirun there is no LOCAL_RANK: the GPU follows OpenMPI's local rank, as the distributed policy reads it.
    ScopedEnv rank("OMPI_COMM_WORLD_RANK", "1"), size("OMPI_COMM_WORLD_SIZE", "2"),
        local("OMPI_COMM_WORLD_LOCAL_RANK", "1"), addr("MASTER_ADDR", "127.0.0.1"), port("MASTER_PORT", "29500");
    CHECK(acc::Cuda().device() == torch::Device(torch::kCUDA, 1));
  }
  ScopedEnv env("LOCAL_RANK", "abc");
  CHECK_THROWS_WITH(acc::Cuda(), Catch::Contains("LOCAL_RANK = 'abc'"));
}

namespace {
// A user-defined precision policy: float32 with loss scaling, logging every scale change.
struct LoggingScaledFloat32 {
  acc::precision::GradScaler scaler{{.init_scale = 1024.0, .growth_interval = 2}};
  std::vector<double> scales;
  bool skipped = false;
  std::string name() const { return "fp32-scaled"; }
  acc::FullPrecision::NoAutocast autocast(torch::Device) const { return {}; }
  void backward(torch::Tensor& loss) { scaler.scale(loss).backward(); }
  void unscale_gradients(torch::optim::Optimizer& o) { scaler.unscale_(o); }
  void step(torch::optim::Optimizer& o) {
    skipped = !scaler.step(o);
    const double before = scaler.get_scale();
    scaler.update();
    if (scaler.get_scale() != before) scales.push_back(scaler.get_scale());
  }
  bool step_was_skipped() const { return skipped; }
};

// Injects an inf gradient into the k-th backward.
struct InfAtBackward : acc::DefaultLoop {
  int k = -1, calls = 0;
  void backward_step(auto& t, torch::Tensor& loss) {
    DefaultLoop::backward_step(t, loss);
    if (++calls == k) t.model()->parameters()[0].grad()[0][0] = std::numeric_limits<float>::infinity();
  }
};

struct CountingScheduler : torch::optim::LRScheduler {
  int* steps;
  CountingScheduler(torch::optim::Optimizer& optimizer, int* counter) : LRScheduler(optimizer), steps(counter) {}
  std::vector<double> get_lrs() override {
    ++*steps;
    return get_current_lrs();
  }
};
}  // namespace

TEST_CASE("a user-defined precision policy plugs in", "[precision][custom]") {
  const auto data = test::regression_data(16);
  auto train = [&](auto precision_tag, int inf_at, int* scheduler_steps) {
    using Precision = typename decltype(precision_tag)::type;
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    auto trainer = acc::make_trainer<acc::Cpu, Precision, acc::SingleProcess, InfAtBackward>(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.loop().k = inf_at;
    acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 4, .shuffle = false};
    options.create_scheduler_fn = [scheduler_steps](torch::optim::Optimizer& o, const acc::RunConfig&) {
      return std::make_unique<CountingScheduler>(o, scheduler_steps);
    };
    trainer.train(data, options);
    CHECK(trainer.run_config().mixed_precision == Precision().name());
    return std::pair{test::flat_parameters(*model), trainer.precision()};
  };
  int plain_steps = 0, scaled_steps = 0, skipped_steps = 0;
  const auto [plain, plain_policy] = train(hana::type_c<acc::FullPrecision>, -1, &plain_steps);
  const auto [scaled, scaled_policy] = train(hana::type_c<LoggingScaledFloat32>, -1, &scaled_steps);
  // Power-of-two scaling is exact: the same parameters as unscaled float32.
  CHECK(torch::equal(plain, scaled));
  CHECK(scaled_policy.scales == std::vector<double>{2048, 4096, 8192, 16384});  // 8 clean steps, interval 2
  CHECK(plain_steps == 8);
  CHECK(scaled_steps == 8);
  // An overflow on update 3: that update and its scheduler step are skipped, and the scale backs off.
  const auto [with_inf, inf_policy] = train(hana::type_c<LoggingScaledFloat32>, 3, &skipped_steps);
  CHECK(skipped_steps == 7);
  CHECK(inf_policy.scales.at(1) == 1024.0);  // 1024 -> 2048 -> (overflow) 1024
  CHECK_FALSE(torch::equal(plain, with_inf));
}

TEST_CASE("anomaly mode, from TrainOptions or ACCELERATED_DETECT_ANOMALY, names the backward function that returns "
          "NaN",
          "[precision][anomaly]") {
  // A finite loss whose gradient is not: sqrt's derivative at 0 is infinite, and 0 * inf is NaN.
  auto loss = [](const torch::Tensor& out, const torch::Tensor& target) {
    return torch::mse_loss(out, target) + 0.0 * torch::sqrt(out - out.detach()).sum();
  };
  auto train = [&](acc::TrainOptions options) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
    acc::Trainer<> trainer(model, loss, optimizer);
    trainer.set_output(test::quiet());
    options.per_device_batch_size = 4;
    try {
      trainer.train(test::regression_data(16), options);
    } catch (const acc::StepError& error) {
      CHECK_THROWS_AS(std::rethrow_if_nested(error), std::runtime_error);  // autograd's own, nested
      return "StepError: " + std::string(error.what());
    } catch (const std::exception& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  auto check_named = [](const std::string& message) {
    CHECK(message == "StepError: accelerated: the train step at epoch 1, step 1 of 4 failed: Function "
                     "'SqrtBackward0' returned nan values in its 0th output.");
  };
  {
    ScopedEnv env("ACCELERATED_DETECT_ANOMALY", nullptr);
    // Off: the NaN gradient goes into the weights, and only the next step's loss shows it (TerminateOnNan).
    const auto off = train({});
    CHECK_THAT(off, Catch::Contains("non-finite train loss") && Catch::Contains("step 2"));
    CHECK_THAT(off, !Catch::Contains("SqrtBackward0"));
    check_named(train({.detect_anomaly = true}));
    CHECK_FALSE(torch::autograd::AnomalyMode::is_enabled());  // for the call only
    // Switched on by the user, it stays on after the call.
    torch::autograd::AnomalyMode::set_enabled(true);
    check_named(train({.detect_anomaly = true}));
    CHECK(torch::autograd::AnomalyMode::is_enabled());
    torch::autograd::AnomalyMode::set_enabled(false);
  }
  {
    ScopedEnv env("ACCELERATED_DETECT_ANOMALY", "1");
    check_named(train({}));
    CHECK_FALSE(torch::autograd::AnomalyMode::is_enabled());
  }
  {
    ScopedEnv env("ACCELERATED_DETECT_ANOMALY", "sometimes");
    CHECK_THAT(train({}), Catch::Contains("ACCELERATED_DETECT_ANOMALY = 'sometimes' is not one of"));
  }
}

TEST_CASE("every device and precision policy compiles with the default loop", "[precision][matrix]") {
  using Data = std::pair<torch::Tensor, torch::Tensor>;
  auto devices = hana::tuple_t<acc::Cpu, acc::Cuda, acc::AutoDevice>;
  auto precisions = hana::tuple_t<acc::FullPrecision, acc::BFloat16, acc::Float16, acc::AutoPrecision>;
  int combinations = 0, refused = 0;
  hana::for_each(devices, [&](auto device) {
    hana::for_each(precisions, [&](auto precision) {
      using D = typename decltype(device)::type;
      using P = typename decltype(precision)::type;
      // The one combination that can never run is refused at compile time (compile_fail.fp16_on_cpu).
      if constexpr (!acc::compatible_policies_v<D, P>) {
        ++refused;
        return;
      } else {
      using T = acc::Trainer<D, P>;
      static_assert(acc::DevicePolicy<typename T::device_policy_type>);
      static_assert(acc::PrecisionPolicy<typename T::precision_policy_type>);
      // Taking the addresses instantiates train() and evaluate() for this combination.
      auto train = static_cast<void (T::*)(Data&, const acc::TrainOptions&, const acc::NoEvalSet&, acc::data::DefaultCollate)>(&T::train);
      auto evaluate = static_cast<double (T::*)(Data&, std::int64_t, acc::data::DefaultCollate)>(&T::evaluate);
      CHECK(train != nullptr);
      CHECK(evaluate != nullptr);
      ++combinations;
      }
    });
  });
  CHECK(combinations == 11);
  CHECK(refused == 1);
}

TEST_CASE("modules registered with the trainer follow the model", "[device]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  acc::Trainer<acc::Cpu> trainer(model, torch::nn::MSELoss(), optimizer);
  auto extra = torch::nn::Linear(2, 2);
  trainer.register_module(extra.ptr());
  CHECK(extra->weight.device().is_cpu());
  CHECK_THROWS_WITH(trainer.register_module(nullptr), Catch::Contains("module is null"));
}

TEST_CASE("the device follows the distributed policy's local rank, in one place", "[device][policies]") {
  // Ranks as threads over a store of their own: each DataParallel knows its rank; no environment variable says it.
  auto store = c10::make_intrusive<c10d::HashStore>();
  for (std::int64_t rank = 0; rank < 3; ++rank) {
    acc::DataParallel parallel(store, rank, 3);  // joins nothing until a run
    acc::Cuda cuda;
    acc::FullPrecision precision;
    acc::bind_policies(cuda, precision, parallel);
    CHECK(cuda.device() == torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(rank)));
    acc::Cuda fixed(2);  // an index given by the user stays
    acc::bind_policies(fixed, precision, parallel);
    CHECK(fixed.device() == torch::Device(torch::kCUDA, 2));
  }
  acc::AutoDevice automatic;  // on a machine without a GPU it stays on the CPU whatever the rank
  acc::SingleProcess single;
  acc::FullPrecision precision;
  acc::bind_policies(automatic, precision, single);
  if (!torch::cuda::is_available()) CHECK(automatic.device() == torch::Device(torch::kCPU));
}

namespace {
namespace cb = acc::callbacks;
using namespace std::chrono_literals;

// A finite loss whose gradient is NaN on the chosen micro-batches (1-based, counted by this loss): sqrt's derivative
// at 0 is infinite, and 0 * inf is NaN, in every parameter's gradient.
struct NanGradientAt {
  std::set<int> calls;
  std::shared_ptr<int> count = std::make_shared<int>(0);
  torch::Tensor operator()(const torch::Tensor& out, const torch::Tensor& target) const {
    auto loss = torch::mse_loss(out, target);
    if (calls.count(++*count)) loss = loss + 0.0 * torch::sqrt(out - out.detach()).sum();
    return loss;
  }
};

// Drops the listed updates (1-based) without a NaN in sight: the reference for the runs that meet one.
struct SkipUpdates {
  std::set<std::int64_t> updates;
  void operator()(acc::on_before_optimizer_step, auto& trainer) {
    if (updates.count(trainer.state().update_step + 1)) trainer.skip_update();
  }
};

struct SaveAt {
  std::int64_t update;
  std::filesystem::path path;
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step == update) trainer.save_training_state(path);
  }
};

struct LoggingScaledFloat32WithDrop : LoggingScaledFloat32 {
  void save_state(torch::serialize::OutputArchive& archive) const { scaler.save(archive); }
  void load_state(torch::serialize::InputArchive& archive) { scaler.load(archive); }
  void drop_step(torch::optim::Optimizer&) {
    skipped = true;
    const double before = scaler.get_scale();
    scaler.drop_step();
    if (scaler.get_scale() != before) scales.push_back(scaler.get_scale());
  }
};
}  // namespace

TEST_CASE("TerminateOnNan(skip_update): an update with a non-finite gradient is dropped, as a hand-written loop drops "
          "it, and named",
          "[precision][nan]") {
  const auto data = test::regression_data(32);
  const std::set<int> poisoned{3, 4, 11};  // updates, 1-based: 8 per epoch, two epochs
  auto sgd = [](torch::nn::Linear& model) {
    return torch::optim::SGD(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  };
  auto step_lr = [](torch::optim::Optimizer& o, const acc::RunConfig&) {
    return std::make_unique<torch::optim::StepLR>(o, 1, 0.9);
  };
  auto model = test::linear_model();
  auto optimizer = sgd(model);
  std::ostringstream out;
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::TerminateOnNan> trainer(
      model, NanGradientAt{poisoned}, optimizer, cb::TerminateOnNan({.skip_update = true}));
  trainer.set_output(out);
  acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 4, .shuffle = false};
  options.create_scheduler_fn = step_lr;
  trainer.train(data, options);
  CHECK(trainer.state().update_step == 16);  // a dropped update still counts
  CHECK(trainer.run_history().get_metric_values("skipped_updates") == std::vector<double>{2, 1});
  CHECK_THAT(out.str(), Catch::Contains("accelerated: skipped update 3 (epoch 1, step 3 of 8): the gradient of "
                                        "'weight' holds 8 non-finite values of 8"));
  CHECK_THAT(out.str(), Catch::Contains("skipped update 11 (epoch 2, step 3 of 8)"));

  // By hand: no optimizer step, no scheduler step, the gradients zeroed.
  auto by_hand = test::linear_model();
  auto by_hand_optimizer = sgd(by_hand);
  torch::optim::StepLR scheduler(by_hand_optimizer, 1, 0.9);
  for (int update = 1; update <= 16; ++update) {
    const auto first = 4 * ((update - 1) % 8);
    auto loss = torch::mse_loss(by_hand(data.first.slice(0, first, first + 4)), data.second.slice(0, first, first + 4));
    loss.backward();
    if (!poisoned.count(update)) {
      by_hand_optimizer.step();
      scheduler.step();
    }
    by_hand_optimizer.zero_grad();
  }
  CHECK(torch::equal(test::flat_parameters(*model), test::flat_parameters(*by_hand)));

  // Too many in a row: the run stops as for a non-finite loss, naming the parameter.
  auto stopped = test::linear_model();
  auto stopped_optimizer = sgd(stopped);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::TerminateOnNan> stopping(
      stopped, NanGradientAt{{5, 6, 7}}, stopped_optimizer, cb::TerminateOnNan({.skip_update = true, .max_skipped_in_a_row = 3}));
  stopping.set_output(test::quiet());
  CHECK_THROWS_MATCHES(stopping.train(data, options), acc::NonFiniteLossError,
                       Catch::Matchers::Message("accelerated: 3 updates in a row had non-finite gradients, the last at "
                                                "update 7 (epoch 1, step 7 of 8): the gradient of 'weight' holds 8 "
                                                "non-finite values of 8; training stopped"));
  CHECK_THROWS_WITH(cb::TerminateOnNan({.skip_update = true, .max_skipped_in_a_row = 0}),
                    Catch::Contains("max_skipped_in_a_row = 0 must be >= 1"));

  // Evaluation losses still stop the run; a training loss that is itself NaN drops its update, and the epoch's mean
  // loss is NaN.
  auto nan_targets = test::regression_data(8, 2);
  nan_targets.second[3][0] = std::numeric_limits<float>::quiet_NaN();
  auto eval_model = test::linear_model();
  auto eval_optimizer = sgd(eval_model);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::TerminateOnNan> evaluating(
      eval_model, torch::nn::MSELoss(), eval_optimizer, cb::TerminateOnNan({.skip_update = true}));
  evaluating.set_output(test::quiet());
  CHECK_THROWS_MATCHES(evaluating.train(data, options, nan_targets), acc::NonFiniteLossError,
                       Catch::Matchers::Message("accelerated: non-finite eval loss (nan) at epoch 1, step 1 of 2; "
                                                "training stopped"));
  auto nan_train = data;
  nan_train.second = nan_train.second.clone();
  nan_train.second[5][0] = std::numeric_limits<float>::quiet_NaN();  // in batch 2
  auto nan_model = test::linear_model();
  auto nan_optimizer = sgd(nan_model);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::TerminateOnNan> nan_loss(
      nan_model, torch::nn::MSELoss(), nan_optimizer, cb::TerminateOnNan({.skip_update = true}));
  nan_loss.set_output(test::quiet());
  nan_loss.train(nan_train, {.per_device_batch_size = 4, .shuffle = false});
  CHECK(nan_loss.run_history().get_metric_values("skipped_updates") == std::vector<double>{1});
  CHECK(std::isnan(nan_loss.run_history().get_latest_metric("train_loss_epoch")));
  CHECK(torch::isfinite(test::flat_parameters(*nan_model)).all().item<bool>());

  // skip_update() belongs to on_before_optimizer_step.
  auto early = [](acc::on_train_step_end, auto& t) { t.skip_update(); };
  auto misplaced_model = test::linear_model();
  auto misplaced_optimizer = sgd(misplaced_model);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, decltype(early)> misplaced(
      misplaced_model, torch::nn::MSELoss(), misplaced_optimizer, early);
  misplaced.set_output(test::quiet());
  CHECK_THROWS_WITH(misplaced.train(data, options),
                    "accelerated::Trainer::skip_update: call it from on_before_optimizer_step");
}

TEST_CASE("TerminateOnNan(skip_update) under a loss scaler: the scaler backs off as when it skips the update itself",
          "[precision][nan]") {
  // An infinite gradient on update 3: LoggingScaledFloat32 skips it on its own; with skip_update the callback drops
  // it first (after unscaling), and the scale, the weights and the scheduler steps must come out the same.
  const auto data = test::regression_data(16);
  auto train = [&](bool skip_update, int* scheduler_steps) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    auto trainer = acc::make_trainer<acc::Cpu, LoggingScaledFloat32WithDrop, acc::SingleProcess, InfAtBackward>(
        model, torch::nn::MSELoss(), optimizer, cb::TerminateOnNan({.skip_update = skip_update}));
    trainer.set_output(test::quiet());
    trainer.loop().k = 3;
    acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 4, .shuffle = false};
    options.create_scheduler_fn = [scheduler_steps](torch::optim::Optimizer& o, const acc::RunConfig&) {
      return std::make_unique<CountingScheduler>(o, scheduler_steps);
    };
    trainer.train(data, options);
    return std::pair{test::flat_parameters(*model), trainer.precision().scales};
  };
  int by_scaler = 0, by_callback = 0;
  const auto [scaler_weights, scaler_scales] = train(false, &by_scaler);
  const auto [callback_weights, callback_scales] = train(true, &by_callback);
  // Clipping by value would clamp the infinity to a finite value: the check comes before it, and the update is
  // dropped all the same; and an overflow the loss scaler would have skipped counts as a dropped update.
  for (const bool scaled : {false, true}) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    auto run = [&](auto precision_tag) {
      using Precision = typename decltype(precision_tag)::type;
      auto trainer = acc::make_trainer<acc::Cpu, Precision, acc::SingleProcess, InfAtBackward>(
          model, torch::nn::MSELoss(), optimizer, cb::TerminateOnNan({.skip_update = true}));
      trainer.set_output(test::quiet());
      trainer.loop().k = 3;
      trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 4, .gradient_clip_value = 0.5, .shuffle = false});
      return trainer.run_history().get_metric_values("skipped_updates");
    };
    const auto skipped = scaled ? run(hana::type_c<LoggingScaledFloat32WithDrop>) : run(hana::type_c<acc::FullPrecision>);
    CHECK(skipped == std::vector<double>{1, 0});
  }
  CHECK(by_scaler == 7);
  CHECK(by_callback == 7);
  CHECK(scaler_scales == callback_scales);
  CHECK(callback_scales.at(1) == 1024.0);  // 1024 -> 2048 -> (overflow) 1024
  CHECK(torch::equal(scaler_weights, callback_weights));

  // find_learning_rate puts the loss scale back: the sweep's copy of the policy shares the scale's tensor, which
  // grows every 2 clean updates during the sweep.
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  auto trainer = acc::make_trainer<acc::Cpu, LoggingScaledFloat32WithDrop, acc::SingleProcess>(model, torch::nn::MSELoss(),
                                                                                               optimizer, cb::None{});
  trainer.set_output(test::quiet());
  trainer.train(data, {.per_device_batch_size = 4});
  const double scale = trainer.precision().scaler.get_scale();
  const auto found = acc::find_learning_rate(trainer, data, {.train = {.per_device_batch_size = 2}, .num_steps = 20});
  CHECK(found.losses.size() >= 8);
  CHECK(trainer.precision().scaler.get_scale() == scale);
}

TEST_CASE("TerminateOnNan(skip_update) in two processes: a NaN on one rank drops that update on both, sharded or not",
          "[precision][nan][distributed]") {
  const auto data = test::regression_data(64);
  struct Case {
    bool shard;
    std::int64_t accumulation;
  };
  for (const auto c : {Case{false, 1}, Case{true, 2}}) {
    DYNAMIC_SECTION("shard_optimizer_state = " << c.shard << ", gradient_accumulation_steps = " << c.accumulation) {
      // A NaN gradient in update 3 on rank 1 (its micro-batch 3, or 5 of micro-batches 5 and 6 with accumulation),
      // and nowhere on rank 0.
      const std::set<int> poisoned_calls = c.accumulation == 1 ? std::set<int>{3} : std::set<int>{5};
      auto run = [&](bool poison, std::set<std::int64_t> skips) {
        std::vector<torch::nn::Linear> models{test::linear_model(7), test::linear_model(8)};
        return test::run_ranks(2, [&](int rank, auto store) {
          auto model = models[static_cast<std::size_t>(rank)];
          torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
          acc::LossFunction loss = NanGradientAt{poison && rank == 1 ? poisoned_calls : std::set<int>{}};
          std::ostringstream out;
          acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, cb::TerminateOnNan, SkipUpdates>
              trainer(model, loss, optimizer, cb::TerminateOnNan({.skip_update = true}), SkipUpdates{skips});
          acc::DataParallelOptions options;
          options.timeout = 30s;
          options.shard_optimizer_state = c.shard;
          trainer.distributed() = acc::DataParallel(store, rank, 2, options);
          trainer.set_output(out);
          trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 4, .gradient_accumulation_steps = c.accumulation,
                               .shuffle = false});
          return std::tuple{test::flat_parameters(*model), trainer.run_history().get_metric_values("skipped_updates"),
                            out.str()};
        });
      };
      const auto poisoned = run(true, {});
      const auto reference = run(false, {3});  // update 3 dropped by hand, on both ranks
      const auto plain = run(false, {});
      CHECK(torch::equal(std::get<0>(poisoned[0]), std::get<0>(poisoned[1])));
      CHECK(torch::equal(std::get<0>(poisoned[0]), std::get<0>(reference[0])));
      CHECK_FALSE(torch::equal(std::get<0>(poisoned[0]), std::get<0>(plain[0])));
      for (const auto& rank : poisoned) CHECK(std::get<1>(rank) == std::vector<double>{1, 0});
      CHECK_THAT(std::get<2>(poisoned[0]), Catch::Contains("skipped update 3 (epoch 1") &&
                                               Catch::Contains("the gradient of 'weight' holds 8 non-finite values"));
    }
  }
  // Two in a row on rank 1 with a limit of 2: every rank stops, each with the same NonFiniteLossError.
  const auto errors = test::run_ranks(2, [&](int rank, auto store) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    acc::LossFunction loss = NanGradientAt{rank == 1 ? std::set<int>{2, 3} : std::set<int>{}};
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, cb::TerminateOnNan> trainer(
        model, loss, optimizer, cb::TerminateOnNan({.skip_update = true, .max_skipped_in_a_row = 2}));
    acc::DataParallelOptions options;
    options.timeout = 30s;
    trainer.distributed() = acc::DataParallel(store, rank, 2, options);
    trainer.set_output(test::quiet());
    try {
      trainer.train(data, {.per_device_batch_size = 4, .shuffle = false});
    } catch (const acc::NonFiniteLossError& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  });
  CHECK_THAT(errors[0], Catch::Contains("2 updates in a row had non-finite gradients, the last at update 3"));
  CHECK(errors[0] == errors[1]);
  // The default mode, where every rank sees a non-finite loss at once: the one error names the first rank, as before
  // (the own-words rule is skip_update's alone).
  const auto both = test::run_ranks(2, [&](int rank, auto store) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    auto nan_loss = [](const torch::Tensor& out, const torch::Tensor& target) {
      return torch::mse_loss(out, target) * std::numeric_limits<float>::quiet_NaN();
    };
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, cb::TerminateOnNan> trainer(
        model, nan_loss, optimizer, cb::TerminateOnNan());
    acc::DataParallelOptions options;
    options.timeout = 30s;
    trainer.distributed() = acc::DataParallel(store, rank, 2, options);
    trainer.set_output(test::quiet());
    return test::error_or_none([&] { trainer.train(data, {.per_device_batch_size = 4, .shuffle = false}); });
  });
  CHECK(both[0] == "accelerated: non-finite train loss on rank 0 of 2 at epoch 1, step 1; training stopped");
  CHECK(both[0] == both[1]);
}

TEST_CASE("TerminateOnNan(skip_update) keeps its count across a resume, and reads states saved before it kept one",
          "[precision][nan][resume]") {
  const auto data = test::regression_data(32);
  const auto dir = test::fresh_dir("skip_update_resume");
  const acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 4, .shuffle = false};
  auto train = [&](NanGradientAt loss, auto... callbacks) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, decltype(callbacks)...> trainer(
        model, loss, optimizer, callbacks...);
    trainer.set_output(test::quiet());
    return test::error_or_none([&] { trainer.train(data, options); });
  };
  auto on_nan = cb::TerminateOnNan({.skip_update = true, .max_skipped_in_a_row = 3});
  // Uninterrupted: updates 4, 5 and 6 dropped, and the run stops at 6. Saved after update 5, two in a row so far.
  const auto uninterrupted = train(NanGradientAt{{4, 5, 6}}, on_nan, SaveAt{5, dir / "at5.pt"});
  CHECK_THAT(uninterrupted, Catch::Contains("3 updates in a row had non-finite gradients, the last at update 6"));
  // Resumed after update 5: the loss counts its calls afresh, so update 6 is its first.
  auto resumed_options = options;
  const auto resumed = [&] {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::TerminateOnNan> trainer(
        model, NanGradientAt{{1}}, optimizer, on_nan);
    trainer.set_output(test::quiet());
    resumed_options.resume_from = dir / "at5.pt";
    return test::error_or_none([&] { trainer.train(data, resumed_options); });
  }();
  CHECK(resumed == uninterrupted);
  // The epoch's count of dropped updates goes on across the resume: 2 in epoch 1 (updates 4 and 5), whether the run
  // was interrupted after update 5 or not.
  auto counts = [&](NanGradientAt loss, std::optional<std::filesystem::path> from, auto... callbacks) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::TerminateOnNan,
                 decltype(callbacks)...> trainer(model, loss, optimizer, on_nan, callbacks...);
    trainer.set_output(test::quiet());
    auto run_options = options;
    run_options.resume_from = from;
    trainer.train(data, run_options);
    return trainer.run_history().get_metric_values("skipped_updates");
  };
  CHECK(counts(NanGradientAt{{4, 5}}, std::nullopt, SaveAt{5, dir / "two.pt"}) == std::vector<double>{2, 0});
  CHECK(counts(NanGradientAt{}, dir / "two.pt") == std::vector<double>{2, 0});
  // A state saved by a list whose first callback keeps no state (as TerminateOnNan kept none before) resumes.
  auto stateless = [](acc::on_train_epoch_end, auto&) {};
  CHECK(train(NanGradientAt{}, stateless, SaveAt{5, dir / "old.pt"}) == "none");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::TerminateOnNan> trainer(
      model, torch::nn::MSELoss(), optimizer, on_nan);
  trainer.set_output(test::quiet());
  auto from_old = options;
  from_old.resume_from = dir / "old.pt";
  CHECK_NOTHROW(trainer.train(data, from_old));
  CHECK(trainer.state().update_step == 16);
}
