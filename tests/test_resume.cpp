// The full training state and exact resume (in process, and after a real SIGKILL), a write killed half-way, and
// the callbacks that act per update or per batch: ModelEma, LimitBatches, LimitEvalSteps, StepBasedEvaluation,
// SaveTrainingState, MoveModulesToDevice; scheduler state and schedules of other param-group fields.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "helpers.hpp"

namespace acc = accelerated;
namespace cb = accelerated::callbacks;
namespace fs = std::filesystem;

namespace {

// Dropout (random numbers), Adam (optimizer state), a cosine schedule (scheduler state), accumulation, an eval set,
// EarlyStopping and an EMA (callback state): everything a resume must restore.
struct Net : torch::nn::Module {
  Net() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 1));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2(torch::dropout(torch::relu(fc1(x)), 0.2, is_training())); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

constexpr std::int64_t kEpochs = 3;
constexpr std::int64_t kUpdatesPerEpoch = 8;  // 64 examples, batch 4, accumulation 2

// Kills the process (or throws) once the run reaches update `at`.
struct CrashAt {
  std::int64_t at;
  bool sigkill;
  template <class Trainer>
  void operator()(acc::on_update_step_end, Trainer& trainer) {
    if (trainer.state().update_step != at) return;
    if (sigkill) ::raise(SIGKILL);
    throw std::runtime_error("simulated crash");
  }
};

struct Outcome {
  torch::Tensor parameters;
  torch::Tensor ema;
  acc::RunHistory history;
};

// One run of the scenario in `dir`: resumes from the latest saved state if there is one; crashes at update
// `crash_at` (0: never). Saves every 3 updates, keeping 2; in the background when `asynchronous`.
Outcome run_scenario(const fs::path& dir, std::int64_t crash_at, bool sigkill, bool asynchronous = false) {
  const auto train = test::regression_data(64, 3);
  const auto eval = test::regression_data(20, 4);
  torch::manual_seed(11);  // a resumed run starts from other weights and other random numbers: the state fixes both
  if (cb::SaveTrainingState::latest(dir / "states")) torch::manual_seed(999);
  fs::create_directories(dir);
  auto model = std::make_shared<Net>();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::EarlyStopping, cb::ModelEma,
               cb::SaveTrainingState, CrashAt>
      trainer(acc::Model(model), torch::nn::MSELoss(), optimizer,
              cb::EarlyStopping({.patience = 100, .threshold = 0.0}),
              cb::ModelEma({.decay = 0.9, .save_path = dir / "ema.pt"}),
              cb::SaveTrainingState({.save_dir = dir / "states", .save_every_n_steps = 3, .max_checkpoints = 2,
                                     .asynchronous = asynchronous}),
              CrashAt{crash_at, sigkill});
  trainer.set_output(test::quiet());
  acc::TrainOptions options{.num_epochs = kEpochs, .per_device_batch_size = 4, .gradient_accumulation_steps = 2};
  options.create_scheduler_fn = [](torch::optim::Optimizer& o, const acc::RunConfig& rc) {
    return std::make_unique<acc::schedulers::CosineLrScheduler>(
        o, acc::schedulers::CosineOptions{.total_num_epochs = rc.num_epochs,
                                          .num_update_steps_per_epoch = rc.num_update_steps_per_epoch,
                                          .num_warmup_epochs = 1});
  };
  options.resume_from = cb::SaveTrainingState::latest(dir / "states");
  trainer.train(train, options, eval);
  Outcome out{test::flat_parameters(*model), {}, trainer.run_history()};
  std::vector<torch::Tensor> ema;
  for (const auto& t : trainer.callback<cb::ModelEma>().weights()) ema.push_back(t.flatten());
  out.ema = torch::cat(ema);
  return out;
}

void check_same(const Outcome& a, const Outcome& b) {
  CHECK(torch::equal(a.parameters, b.parameters));
  CHECK(torch::equal(a.ema, b.ema));
  CHECK(a.history.current_epoch() == b.history.current_epoch());
  CHECK(a.history.get_metric_names() == b.history.get_metric_names());
  for (const auto& name : a.history.get_metric_names()) {
    INFO(name);
    CHECK(a.history.get_metric_values(name) == b.history.get_metric_values(name));
  }
}

// Runs this test program again with `tag` selecting a hidden test case and `env` added; returns the wait status.
int run_self(const std::string& tag, const std::vector<std::string>& env) {
  return test::wait_for(test::spawn_self(tag, env));
}

const char* env_or_null(const char* name) { return std::getenv(name); }

}  // namespace

TEST_CASE("a run resumed from a state saved mid-epoch ends bit-identical to the uninterrupted run", "[resume]") {
  const auto base = test::fresh_dir("resume_inproc");
  const auto reference = run_scenario(base / "uninterrupted", 0, false);
  // Crash at update 14 (epoch 2, mid-epoch; last save at 12, so 2 updates are redone) and at 17 (last save at 15).
  for (const std::int64_t crash_at : {14, 17}) {
    INFO("crash at update " << crash_at);
    const auto dir = base / ("crash_" + std::to_string(crash_at));
    CHECK_THROWS_WITH(run_scenario(dir, crash_at, false), Catch::Contains("simulated crash"));
    REQUIRE(cb::SaveTrainingState::latest(dir / "states"));
    check_same(reference, run_scenario(dir, 0, false));
  }
  // Rotation kept the 2 newest periodic states, plus final.pt; `latest` names the final one.
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(base / "uninterrupted" / "states")) names.insert(e.path().filename());
  CHECK(names == std::set<std::string>{"final.pt", "latest", "step_21.pt", "step_24.pt"});
  CHECK(cb::SaveTrainingState::latest(base / "uninterrupted" / "states")->filename() == "final.pt");
  fs::remove_all(base);
}

// A run whose states are written in the background ends as the synchronous one, with the same files; each of them
// holds the state of its save point (the copy is taken there, whatever training does while the writer writes), so
// resuming from it ends bit-identical. A crash waits for the write in flight. (The files are not compared byte for
// byte: LibTorch keys an optimizer's state by the parameter's address, which differs from run to run.)
TEST_CASE("asynchronous saves write what synchronous saves write, and resume bit-identical", "[resume][async_save]") {
  const auto base = test::fresh_dir("resume_async");
  const auto reference = run_scenario(base / "sync", 0, false);
  check_same(reference, run_scenario(base / "async", 0, false, true));
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(base / "async" / "states")) names.insert(e.path().filename());
  CHECK(names == std::set<std::string>{"final.pt", "latest", "step_21.pt", "step_24.pt"});
  for (const auto* state : {"step_21.pt", "step_24.pt"}) {
    INFO("resumed from " << state);
    const auto dir = base / (std::string("from_") + state);
    fs::create_directories(dir / "states");
    fs::copy_file(base / "async" / "states" / state, dir / "states" / state);
    acc::record_latest_training_state(dir / "states", state);
    check_same(reference, run_scenario(dir, 0, false, true));
  }
  // A crash right after a save point (15) and between two (17): the run's end waits for the write in flight.
  for (const std::int64_t crash_at : {15, 17}) {
    INFO("crash at update " << crash_at);
    const auto dir = base / ("crash_" + std::to_string(crash_at));
    CHECK_THROWS_WITH(run_scenario(dir, crash_at, false, true), Catch::Contains("simulated crash"));
    CHECK(cb::SaveTrainingState::latest(dir / "states")->filename() == "step_15.pt");
    check_same(reference, run_scenario(dir, 0, false, true));
  }
  fs::remove_all(base);
}

// Hidden: the child side of the SIGKILL test (run by run_self).
TEST_CASE("resume worker", "[.resume_worker]") {
  const fs::path dir = env_or_null("ACCELERATED_TEST_DIR");
  const char* kill_at = env_or_null("ACCELERATED_TEST_KILL_AT");
  const auto outcome = run_scenario(dir, kill_at ? std::atoll(kill_at) : 0, true, env_or_null("ACCELERATED_TEST_ASYNC"));
  torch::save(std::vector<torch::Tensor>{outcome.parameters, outcome.ema}, (dir / "outcome.pt").string());
}

// Asynchronous saves: killed at a save point, the state being written there is cut short (or, written in time, whole);
// either way the run resumes from a complete state and ends bit-identical.
TEST_CASE("a run killed with SIGKILL at a random update resumes bit-identical", "[resume][fault][async_save]") {
  const auto base = test::fresh_dir("resume_sigkill");
  std::random_device device;
  for (const bool asynchronous : {false, true}) {
    auto kill_at = std::uniform_int_distribution<std::int64_t>(1, kEpochs * kUpdatesPerEpoch - 1)(device);
    if (asynchronous) kill_at = 3 * std::uniform_int_distribution<std::int64_t>(1, kEpochs * kUpdatesPerEpoch / 3 - 1)(device);
    INFO((asynchronous ? "asynchronous saves, " : "") << "killed at update " << kill_at);
    const auto mode = std::string(asynchronous ? "async_" : "");
    const auto ref_dir = base / (mode + "uninterrupted"), dir = base / (mode + "killed");
    fs::create_directories(ref_dir);
    fs::create_directories(dir);
    const std::vector<std::string> env = asynchronous ? std::vector<std::string>{"ACCELERATED_TEST_ASYNC=1"}
                                                      : std::vector<std::string>{};
    auto with = [&](std::vector<std::string> more) {
      more.insert(more.end(), env.begin(), env.end());
      return more;
    };
    int status = run_self("[.resume_worker]", with({"ACCELERATED_TEST_DIR=" + ref_dir.string()}));
    REQUIRE((WIFEXITED(status) && WEXITSTATUS(status) == 0));
    status = run_self("[.resume_worker]", with({"ACCELERATED_TEST_DIR=" + dir.string(),
                                                "ACCELERATED_TEST_KILL_AT=" + std::to_string(kill_at)}));
    REQUIRE((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL));
    CHECK_FALSE(fs::exists(dir / "outcome.pt"));
    const auto latest = cb::SaveTrainingState::latest(dir / "states");
    if (kill_at >= (asynchronous ? 6 : 3)) REQUIRE(latest);  // the write at the kill may be cut short
    INFO("resumes from " << (latest ? latest->filename().string() : std::string("nothing")));
    status = run_self("[.resume_worker]", with({"ACCELERATED_TEST_DIR=" + dir.string()}));  // from the last state
    REQUIRE((WIFEXITED(status) && WEXITSTATUS(status) == 0));
    std::vector<torch::Tensor> expected, resumed;
    torch::load(expected, (ref_dir / "outcome.pt").string());
    torch::load(resumed, (dir / "outcome.pt").string());
    CHECK(torch::equal(expected[0], resumed[0]));
    CHECK(torch::equal(expected[1], resumed[1]));
  }
  fs::remove_all(base);
}

// Hidden: writes checkpoints of a 32 MB model in a loop, each with every weight equal to its iteration number.
TEST_CASE("checkpoint writer", "[.checkpoint_writer]") {
  const fs::path dir = env_or_null("ACCELERATED_TEST_DIR");
  torch::nn::Linear model(2048, 4096);
  for (int i = 1; i <= 1000; ++i) {
    {
      torch::NoGradGuard no_grad;
      for (auto& p : model->parameters()) p.fill_(static_cast<double>(i));
    }
    acc::save_checkpoint(dir / "ckpt.pt", *model, nullptr, {{"iteration", static_cast<double>(i)}});
  }
}

TEST_CASE("a process killed while writing a checkpoint leaves the previous one loadable", "[checkpoint][fault]") {
  const auto dir = test::fresh_dir("kill_during_write");
  const pid_t pid = test::spawn_self("[.checkpoint_writer]", {"ACCELERATED_TEST_DIR=" + dir.string()});
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!fs::exists(dir / "ckpt.pt") && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::random_device device;
  std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 400)(device)));
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  REQUIRE(WIFSIGNALED(status));
  torch::nn::Linear model(2048, 4096);
  const auto values = acc::load_checkpoint(dir / "ckpt.pt", *model);
  const double iteration = values.at("iteration");
  INFO("last complete checkpoint: iteration " << iteration);
  CHECK(iteration >= 1);
  for (const auto& p : model->parameters()) CHECK(torch::all(p == iteration).item<bool>());
  // The next save removes the killed writer's temporary, if it left one.
  acc::save_checkpoint(dir / "ckpt.pt", *model);
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(dir)) left.push_back(e.path().filename());
  CHECK(left == std::vector<std::string>{"ckpt.pt"});
  fs::remove_all(dir);
}

TEST_CASE("bad training states and changed runs are refused by name", "[resume][bad_input]") {
  const auto dir = test::fresh_dir("bad_state");
  const auto data = test::regression_data(32);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.01);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 8});
  trainer.save_training_state(dir / "state.pt");
  trainer.save_checkpoint(dir / "checkpoint.pt");

  CHECK_THROWS_WITH(trainer.load_training_state(dir / "checkpoint.pt"),
                    Catch::Contains("no 'accelerated_training_state_version'"));
  CHECK_THROWS_WITH(trainer.load_training_state(dir / "none.pt"), Catch::Contains("does not exist"));
  {
    std::ifstream in(dir / "state.pt", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(dir / "truncated.pt", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  CHECK_THROWS_WITH(trainer.load_training_state(dir / "truncated.pt"), Catch::Contains("truncated.pt' is not a zip-format torch.save file, or only part of one"));

  // A trainer whose callbacks keep state the file lacks is refused at the load, before its model changes (a file
  // saved by a list with no stateful callback: TerminateOnNan, first of the defaults, keeps one).
  {
    auto plain_model = test::linear_model();
    torch::optim::SGD plain_optimizer(plain_model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::None> plain(
        plain_model, torch::nn::MSELoss(), plain_optimizer, acc::callbacks::None{});
    plain.train(data, {.num_epochs = 1, .per_device_batch_size = 8});
    plain.save_training_state(dir / "stateless.pt");
    auto other_model = test::linear_model(3);
    torch::optim::SGD other_optimizer(other_model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::EarlyStopping>
        stateful(other_model, torch::nn::MSELoss(), other_optimizer, acc::callbacks::EarlyStopping{});
    const auto before = test::flat_parameters(*other_model);
    CHECK_THROWS_WITH(stateful.load_training_state(dir / "stateless.pt"), Catch::Contains("has no entry 'callback_0"));
    CHECK(torch::equal(before, test::flat_parameters(*other_model)));
  }

  trainer.load_training_state(dir / "state.pt");
  CHECK_THROWS_WITH(trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 4}),
                    Catch::Contains("per_device_batch_size = 4 here but 8 in the saved run"));
  trainer.load_training_state(dir / "state.pt");
  acc::TrainOptions with_scheduler{.num_epochs = 2, .per_device_batch_size = 8};
  with_scheduler.create_scheduler_fn = [](torch::optim::Optimizer& o, const acc::RunConfig&) {
    return std::make_unique<torch::optim::StepLR>(o, 1);
  };
  CHECK_THROWS_WITH(trainer.train(data, with_scheduler), Catch::Contains("the saved run had no scheduler"));

  struct SavesMidStep {
    void operator()(acc::on_train_step_end, acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop,
                                        SavesMidStep>& trainer) {
      trainer.save_training_state("never.pt");
    }
  };
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, SavesMidStep> mid(
      model, torch::nn::MSELoss(), optimizer, SavesMidStep{});
  mid.set_output(test::quiet());
  CHECK_THROWS_WITH(mid.train(data, {.per_device_batch_size = 8}), Catch::Contains("in the middle of a step"));
  fs::remove_all(dir);
}

TEST_CASE("a LibTorch scheduler's step count and our schedules' state round-trip", "[resume][schedulers]") {
  auto model = test::linear_model();
  torch::optim::SGD a(model->parameters(), 1.0);
  torch::optim::StepLR step_lr(a, 2, 0.5);
  for (int i = 0; i < 3; ++i) step_lr.step();  // LibTorch's StepLR: lr 0.5 after 3 steps; the 5th halves again
  torch::serialize::OutputArchive out;
  acc::schedulers::save_scheduler_state(out, step_lr);
  std::stringstream bytes;
  out.save_to(bytes);

  torch::optim::SGD b(model->parameters(), 0.5);  // the rate itself travels with the optimizer's state
  torch::optim::StepLR restored(b, 2, 0.5);
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  acc::schedulers::load_scheduler_state(in, restored);
  for (int i = 0; i < 2; ++i) {
    step_lr.step();
    restored.step();  // without the restored count it would still be at 0.5
  }
  CHECK(a.param_groups()[0].options().get_lr() == 0.25);
  CHECK(b.param_groups()[0].options().get_lr() == 0.25);
}

TEST_CASE("a schedule can drive another param-group field", "[schedulers]") {
  auto model = test::linear_model();
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.1));
  acc::schedulers::CosineLrScheduler schedule(
      optimizer, {.total_num_epochs = 4, .num_update_steps_per_epoch = 1, .lr_min = 0.0,
                  .field = acc::schedulers::fields::weight_decay<torch::optim::AdamWOptions>()});
  auto& options = static_cast<torch::optim::AdamWOptions&>(optimizer.param_groups()[0].options());
  CHECK(options.weight_decay() == Approx(0.1));
  schedule.step();
  schedule.step();
  CHECK(options.weight_decay() == Approx(0.05));  // half way down the cosine
  CHECK(options.lr() == 0.01);                    // the rate is left alone
  CHECK_THROWS_WITH(acc::schedulers::CosineLrScheduler(
                        optimizer, {.field = acc::schedulers::fields::momentum<torch::optim::SGDOptions>()}),
                    Catch::Contains("'momentum' was declared for"));
}

namespace {
// Counts batches per epoch and notes intermediate evaluations and the model's mode after them.
struct Recorder {
  std::vector<std::int64_t> train_batches, eval_batches;
  std::vector<bool> intermediate;
  std::int64_t current = 0;
  bool trained_in_eval_mode = false;
  template <class T>
  void operator()(acc::on_train_epoch_start, T&) {
    current = 0;
  }
  template <class T>
  void operator()(acc::on_train_step_start, T& trainer) {
    ++current;
    if (!trainer.model()->is_training()) trained_in_eval_mode = true;
  }
  template <class T>
  void operator()(acc::on_train_epoch_end, T&) {
    train_batches.push_back(current);
  }
  template <class T>
  void operator()(acc::on_eval_epoch_start, T& trainer, bool is_intermediate) {
    intermediate.push_back(is_intermediate);
    eval_batches.push_back(0);
  }
  template <class T>
  void operator()(acc::on_eval_step_end, T&) {
    ++eval_batches.back();
  }
};
}  // namespace

TEST_CASE("LimitBatches, StepBasedEvaluation and LimitEvalSteps shape the epochs", "[callbacks]") {
  const auto train = test::regression_data(64);
  const auto eval = test::regression_data(40, 2);
  SECTION("LimitBatches caps train and eval epochs, and the last kept batch updates") {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::LimitBatches, Recorder> t(
        model, torch::nn::MSELoss(), optimizer, cb::LimitBatches(3), Recorder{});
    t.set_output(test::quiet());
    t.train(train, {.num_epochs = 2, .per_device_batch_size = 8, .gradient_accumulation_steps = 2}, eval);
    const auto& r = t.callback<Recorder>();
    CHECK(r.train_batches == std::vector<std::int64_t>{3, 3});
    CHECK(r.eval_batches == std::vector<std::int64_t>{3, 3});
    CHECK(t.state().update_step == 4);  // 2 updates per epoch: after batch 2 and after the last kept batch
    CHECK_THROWS_WITH(cb::LimitBatches(0), Catch::Contains("num_batches = 0"));
  }
  SECTION("StepBasedEvaluation evaluates every n updates; LimitEvalSteps caps only those") {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::LimitEvalSteps,
                 cb::StepBasedEvaluation, Recorder>
        t(model, torch::nn::MSELoss(), optimizer, cb::LimitEvalSteps(2), cb::StepBasedEvaluation(3), Recorder{});
    t.set_output(test::quiet());
    t.train(train, {.num_epochs = 1, .per_device_batch_size = 8}, eval);  // 8 updates: evaluations after 3 and 6
    const auto& r = t.callback<Recorder>();
    CHECK(r.intermediate == std::vector<bool>{true, true, false});
    CHECK(r.eval_batches == std::vector<std::int64_t>{2, 2, 5});
    CHECK_FALSE(r.trained_in_eval_mode);
    CHECK_FALSE(t.run_history().has_metric("intermediate_eval_loss"));
  }
  SECTION("with a metric name prefix, the intermediate metrics are removed too") {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::StepBasedEvaluation> t(
        model, torch::nn::MSELoss(), optimizer, cb::StepBasedEvaluation(3));
    t.set_output(test::quiet());
    t.run_history().set_metric_name_prefix("x_");
    t.train(train, {.num_epochs = 1, .per_device_batch_size = 8}, eval);
    CHECK(t.run_history().has_metric("x_eval_loss_epoch"));
    CHECK_FALSE(t.run_history().has_metric("x_intermediate_eval_loss"));
  }
}

namespace {
struct Snapshots {
  std::vector<torch::Tensor> after_update;
  template <class T>
  void operator()(acc::on_update_step_end, T& trainer) {
    after_update.push_back(test::flat_parameters(trainer.model().module()).clone());
  }
};
}  // namespace

TEST_CASE("ModelEma averages the weights after every update and evaluates them", "[callbacks][ema]") {
  const auto dir = test::fresh_dir("ema");
  const auto train = test::regression_data(32);
  const auto eval = test::regression_data(16, 2);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.05);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, Snapshots, cb::ModelEma> t(
      model, torch::nn::MSELoss(), optimizer, Snapshots{}, cb::ModelEma({.decay = 0.8, .save_path = dir / "ema.pt"}));
  t.set_output(test::quiet());
  const auto initial = test::flat_parameters(*model).clone();
  t.train(train, {.num_epochs = 2, .per_device_batch_size = 8}, eval);

  auto expected = initial;
  for (const auto& w : t.callback<Snapshots>().after_update) expected = 0.8 * expected + 0.2 * w;
  std::vector<torch::Tensor> ema;
  for (const auto& w : t.callback<cb::ModelEma>().weights()) ema.push_back(w.flatten());
  CHECK(torch::allclose(torch::cat(ema), expected, 1e-5, 1e-6));
  CHECK(t.run_history().get_metric_values("ema_model_eval_loss_epoch").size() == 2);
  // The best EMA weights were saved; apply_to puts the final ones into a model.
  auto loaded = test::linear_model(99);
  const auto values = acc::load_checkpoint(dir / "ema.pt", *loaded);
  CHECK(values.count("ema_model_eval_loss_epoch") == 1);
  auto applied = test::linear_model(98);
  t.callback<cb::ModelEma>().apply_to(*applied);
  CHECK(torch::allclose(test::flat_parameters(*applied), expected, 1e-5, 1e-6));
  CHECK_THROWS_WITH(cb::ModelEma({.decay = 1.0}), Catch::Contains("decay = 1"));
  fs::remove_all(dir);
}

TEST_CASE("MoveModulesToDevice places the modules it is given at each run start", "[callbacks][device]") {
  struct RecordingCpu : acc::Cpu {
    std::shared_ptr<std::set<const torch::nn::Module*>> placed = std::make_shared<std::set<const torch::nn::Module*>>();
    void place(torch::nn::Module& module) const {
      placed->insert(&module);
      acc::Cpu::place(module);
    }
  };
  auto model = test::linear_model();
  torch::nn::Linear metric(3, 3);
  auto teacher = std::make_shared<Net>();
  torch::optim::SGD optimizer(model->parameters(), 0.01);
  acc::Trainer<RecordingCpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::MoveModulesToDevice> t(
      model, torch::nn::MSELoss(), optimizer, cb::MoveModulesToDevice(metric, teacher));
  t.set_output(test::quiet());
  CHECK(t.device_policy().placed->count(metric.get()) == 0);
  t.train(test::regression_data(16), {.per_device_batch_size = 8});
  CHECK(t.device_policy().placed->count(metric.get()) == 1);
  CHECK(t.device_policy().placed->count(teacher.get()) == 1);
}

namespace {
// A precision policy with state of its own (as Float16's loss scaler): the updates it has stepped.
struct CountingPrecision : acc::FullPrecision {
  std::int64_t steps = 0;
  void step(torch::optim::Optimizer& optimizer) {
    ++steps;
    optimizer.step();
  }
  void save_state(torch::serialize::OutputArchive& archive) const {
    archive.write("steps", torch::tensor(steps, torch::kLong));
  }
  void load_state(torch::serialize::InputArchive& archive) {
    torch::Tensor value;
    archive.read("steps", value);
    steps = value.item<std::int64_t>();
  }
};
}  // namespace

TEST_CASE("states saved at epoch ends resume exactly, with the precision policy's state", "[resume][callbacks]") {
  const auto dir = test::fresh_dir("epoch_states");
  const auto data = test::regression_data(48);
  using T = acc::Trainer<acc::Cpu, CountingPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState>;
  auto run = [&](std::int64_t epochs, bool resume) {
    auto model = test::linear_model();
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
    T trainer(model, torch::nn::MSELoss(), optimizer,
              cb::SaveTrainingState({.save_dir = dir / (resume ? "b" : "a"), .save_every_n_epochs = 1,
                                     .save_at_end = false, .max_checkpoints = 2}));
    trainer.set_output(test::quiet());
    acc::TrainOptions options{.num_epochs = epochs, .per_device_batch_size = 8};
    if (resume) options.resume_from = dir / "a" / "epoch_2.pt";
    trainer.train(data, options);
    return std::tuple{test::flat_parameters(*model), trainer.precision().steps, trainer.run_history()};
  };
  const auto [reference, steps, history] = run(4, false);  // 6 updates per epoch
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir / "a")) names.insert(e.path().filename());
  CHECK(names == std::set<std::string>{"epoch_3.pt", "epoch_4.pt", "latest"});  // epoch_1, epoch_2 rotated away
  CHECK(steps == 24);
  fs::copy_file(dir / "a" / "epoch_3.pt", dir / "a" / "epoch_2.pt");  // resume from the end of epoch 3 (of 4)
  const auto [resumed, resumed_steps, resumed_history] = run(4, true);
  CHECK(torch::equal(reference, resumed));
  CHECK(resumed_steps == 24);  // 18 restored + 6 stepped
  CHECK(resumed_history.get_metric_values("train_loss_epoch") == history.get_metric_values("train_loss_epoch"));
  fs::remove_all(dir);
}

TEST_CASE("SaveTrainingState keeps the newest states by update step whatever their names and file times",
          "[resume][callbacks]") {
  const auto dir = test::fresh_dir("rotation");
  // Left by an earlier run: step_10 is newer than step_9 by its step, but older by its file time and its name.
  for (const char* name : {"step_10.pt", "step_9.pt"}) std::ofstream(dir / name) << "x";
  fs::last_write_time(dir / "step_10.pt", fs::last_write_time(dir / "step_9.pt") - std::chrono::hours(1));
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState> trainer(
      model, torch::nn::MSELoss(), optimizer,
      cb::SaveTrainingState({.save_dir = dir, .save_every_n_steps = 4, .save_at_end = false, .max_checkpoints = 2}));
  trainer.set_output(test::quiet());
  trainer.train(test::regression_data(16), {.num_epochs = 1, .per_device_batch_size = 4});  // 4 updates: step_4
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename());
  // step_4 is the newest save and `latest` names it: kept although its step is the smallest.
  CHECK(names == std::set<std::string>{"latest", "step_10.pt", "step_4.pt"});
  fs::remove_all(dir);
}

TEST_CASE("a training state saved after evaluate() resumes the training run", "[resume]") {
  const auto dir = test::fresh_dir("state_after_evaluate");
  const auto data = test::regression_data(32);
  auto run = [&](bool resume) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 4};
    if (resume) {
      options.resume_from = dir / "state.pt";
    } else {
      options.num_epochs = 1;
    }
    trainer.train(data, options);
    if (!resume) {
      trainer.evaluate(data, 16);  // another batch size and no training batches: not the run's shape
      trainer.save_training_state(dir / "state.pt");
    }
    return test::flat_parameters(*model);
  };
  run(false);
  CHECK_NOTHROW(run(true));
  fs::remove_all(dir);
}

TEST_CASE("MetricsLogger keeps the rows written before a resume", "[resume][callbacks]") {
  const auto dir = test::fresh_dir("metrics_resume");
  const auto data = test::regression_data(32);
  auto run = [&](std::int64_t epochs, bool resume) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::MetricsLogger,
                 cb::SaveTrainingState>
        trainer(model, torch::nn::MSELoss(), optimizer, cb::MetricsLogger(dir / "metrics.csv"),
                cb::SaveTrainingState({.save_dir = dir / "states", .save_every_n_epochs = 1}));
    trainer.set_output(test::quiet());
    acc::TrainOptions options{.num_epochs = epochs, .per_device_batch_size = 8};
    if (resume) options.resume_from = cb::SaveTrainingState::latest(dir / "states");
    trainer.train(data, options, data);
  };
  run(2, false);
  run(4, true);  // a new process would start with an empty logger: its rows come back with the state
  std::ifstream in(dir / "metrics.csv");
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  REQUIRE(lines.size() == 5);  // header + epochs 1-4
  for (int epoch = 1; epoch <= 4; ++epoch) CHECK(lines[static_cast<std::size_t>(epoch)].rfind(std::to_string(epoch) + ",train", 0) == 0);
  fs::remove_all(dir);
}

namespace {
struct StopInEval {
  template <class T>
  void operator()(acc::on_eval_step_end, T&) {
    throw acc::StopTrainingError("stopped in an eval step");
  }
};
}  // namespace

TEST_CASE("a stop inside an evaluation leaves the trainer able to save its state", "[resume]") {
  const auto dir = test::fresh_dir("stop_in_eval");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.01);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, StopInEval> trainer(
      model, torch::nn::MSELoss(), optimizer, StopInEval{});
  trainer.set_output(test::quiet());
  trainer.evaluate(test::regression_data(16), 4);
  trainer.train(test::regression_data(16), {.per_device_batch_size = 4}, test::regression_data(8, 2));
  CHECK_NOTHROW(trainer.save_training_state(dir / "state.pt"));
  fs::remove_all(dir);
}

// ---- preemption ([preemption]) ---------------------------------------------------------------------------------
namespace {
// Delivers `signal` to this process at the end of update `at` (a cluster's SIGTERM arriving mid-run).
struct SignalAt {
  std::int64_t at;
  int signal = SIGTERM;
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step == at) ::raise(signal);
  }
};

// The resume scenario, preemptible: the run folder `dir` is both SaveTrainingState's (every 3 updates) and the
// preemption folder, and the run resumes from the newest state in it. `out` receives the trainer's printing.
acc::RunHistory run_preemptible(const fs::path& dir, std::int64_t signal_at, torch::Tensor& parameters,
                                std::ostream& out, int signal = SIGTERM) {
  const auto train = test::regression_data(64, 3);
  const auto eval = test::regression_data(20, 4);
  torch::manual_seed(11);
  if (acc::latest_training_state(dir)) torch::manual_seed(999);  // the state must fix weights and random numbers
  auto model = std::make_shared<Net>();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState, SignalAt>
      trainer(acc::Model(model), torch::nn::MSELoss(), optimizer,
              cb::SaveTrainingState({.save_dir = dir, .save_every_n_steps = 3, .save_at_end = false}),
              SignalAt{signal_at, signal});
  trainer.set_output(out);
  acc::TrainOptions options{.num_epochs = kEpochs, .per_device_batch_size = 4, .gradient_accumulation_steps = 2};
  options.resume_from_newest_in = dir;
  options.preemption_dir = dir;
  trainer.train(train, options, eval);
  parameters = test::flat_parameters(*model);
  return trainer.run_history();
}
}  // namespace

TEST_CASE("a preempted run saves the update it agreed on and resumes bit-identical", "[resume][preemption]") {
  const auto base = test::fresh_dir("preemption");
  std::ostringstream ignored;
  torch::Tensor reference, resumed;
  const auto reference_history = run_preemptible(base / "reference", 0, reference, ignored);  // nothing to resume

  struct sigaction before {};
  ::sigaction(SIGTERM, nullptr, &before);
  const auto dir = base / "preempted";
  torch::Tensor unused;
  try {
    run_preemptible(dir, 13, unused, ignored);
    FAIL("the run was not preempted");
  } catch (const acc::PreemptedError& error) {
    CHECK_THAT(std::string(error.what()), Catch::Contains("preempted (SIGTERM on rank 0) at update step 13"));
  }
  CHECK(acc::latest_training_state(dir) == dir / "preempted_step_13.pt");
  struct sigaction after {};
  ::sigaction(SIGTERM, nullptr, &after);
  CHECK(after.sa_handler == before.sa_handler);  // the run's handler is gone with the run
  CHECK(acc::exit_code_for(acc::PreemptedError("x")) == 75);
  CHECK(acc::exit_code_for(std::runtime_error("x")) == 1);

  std::ostringstream printed;
  const auto history = run_preemptible(dir, 0, resumed, printed);
  CHECK_THAT(printed.str(), Catch::Contains("Resuming from '" + (dir / "preempted_step_13.pt").string() + "'"));
  CHECK(torch::equal(reference, resumed));
  CHECK(history.get_metric_values("train_loss_epoch") == reference_history.get_metric_values("train_loss_epoch"));
  CHECK(history.get_metric_values("eval_loss_epoch") == reference_history.get_metric_values("eval_loss_epoch"));

  // SIGUSR1 (SLURM's --signal=USR1@60) preempts as well.
  CHECK_THROWS_WITH(run_preemptible(base / "usr1", 5, unused, ignored, SIGUSR1),
                    Catch::Contains("preempted (SIGUSR1 on rank 0) at update step 5"));
  fs::remove_all(base);
}

TEST_CASE("resuming from a run folder passes over a damaged newest state", "[resume][preemption][bad_input]") {
  const auto base = test::fresh_dir("preemption_damaged");
  std::ostringstream ignored;
  torch::Tensor reference, resumed, unused;
  run_preemptible(base / "reference", 0, reference, ignored);
  const auto dir = base / "run";
  CHECK_THROWS_AS(run_preemptible(dir, 13, unused, ignored), acc::PreemptedError);
  // The newest state is cut short (a copy interrupted, a disk that filled): the one before it (step_12) is used.
  fs::resize_file(dir / "preempted_step_13.pt", fs::file_size(dir / "preempted_step_13.pt") / 2);
  std::ostringstream printed;
  run_preemptible(dir, 0, resumed, printed);
  CHECK_THAT(printed.str(), Catch::Contains("preempted_step_13.pt' is damaged, incomplete or diverged, trying the one before it"));
  CHECK_THAT(printed.str(), Catch::Contains("Resuming from '" + (dir / "step_12.pt").string() + "'"));
  CHECK(torch::equal(reference, resumed));

  // Every state damaged: an error naming the folder, not a silent fresh start.
  const auto broken = base / "broken";
  fs::create_directories(broken);
  std::ofstream(broken / "step_3.pt") << "not a state";
  CHECK_THROWS_WITH(run_preemptible(broken, 0, unused, ignored),
                    Catch::Contains("resume_from_newest_in: no training state in '" + broken.string() + "' loads"));
  CHECK_THROWS_WITH(acc::TrainOptions{.preemption_signals = {SIGKILL}}.validate(),
                    Catch::Contains("preemption_signals = 9 is not a signal that can be caught"));
  fs::remove_all(base);
}

TEST_CASE("a run folder's latest names only a file inside the folder", "[resume][bad_input]") {
  const auto base = test::fresh_dir("latest_outside");
  const auto dir = base / "states";
  fs::create_directories(dir);
  std::ofstream(base / "outside.pt") << "x";
  std::ofstream(dir / "step_1.pt") << "x";
  for (const std::string& name :
       std::vector<std::string>{"../outside.pt", (base / "outside.pt").string(), "..", ".", "step_1.pt/x"}) {
    INFO(name);
    std::ofstream(dir / "latest", std::ios::trunc) << name << "\n";
    CHECK_FALSE(acc::latest_training_state(dir).has_value());
    const auto states = acc::training_states_newest_first(dir);
    REQUIRE(states.size() == 1);
    CHECK(states[0] == dir / "step_1.pt");
  }
  // A `latest` of 16 MB without a newline is not read whole, and names nothing.
  std::ofstream(dir / "latest", std::ios::trunc) << std::string(16 << 20, 'a');
  CHECK_FALSE(acc::latest_training_state(dir).has_value());
  std::ofstream(dir / "latest", std::ios::trunc) << "step_1.pt\n";
  CHECK(acc::latest_training_state(dir) == dir / "step_1.pt");
  fs::remove_all(base);
}

TEST_CASE("ACCELERATED_NUM_THREADS and SLURM_CPUS_PER_TASK that are not counts are errors naming them",
          "[options][bad_input]") {
  const char* threads_before = std::getenv("ACCELERATED_NUM_THREADS");
  const char* slurm_before = std::getenv("SLURM_CPUS_PER_TASK");
  const std::optional<std::string> threads = threads_before ? std::optional<std::string>(threads_before) : std::nullopt;
  const std::optional<std::string> slurm = slurm_before ? std::optional<std::string>(slurm_before) : std::nullopt;
  acc::detail::OnScopeExit restore([&] {
    for (const auto& [name, value] : {std::pair{"ACCELERATED_NUM_THREADS", threads}, std::pair{"SLURM_CPUS_PER_TASK", slurm}}) {
      if (value) {
        ::setenv(name, value->c_str(), 1);
      } else {
        ::unsetenv(name);
      }
    }
  });
  for (const char* value : {"4x", "abc", "-2", "1e3", " 4", "9999999"}) {
    INFO(value);
    ::setenv("ACCELERATED_NUM_THREADS", value, 1);
    CHECK_THROWS_WITH(acc::detail::parse_positive_env("ACCELERATED_NUM_THREADS", -1),
                      Catch::Contains("ACCELERATED_NUM_THREADS = '" + std::string(value) + "' is not a whole number"));
  }
  ::setenv("ACCELERATED_NUM_THREADS", "0", 1);
  CHECK(acc::detail::parse_positive_env("ACCELERATED_NUM_THREADS", -1) == 0);
  ::setenv("ACCELERATED_NUM_THREADS", "", 1);
  CHECK(acc::detail::parse_positive_env("ACCELERATED_NUM_THREADS", -1) == -1);
  ::unsetenv("ACCELERATED_NUM_THREADS");
  ::setenv("SLURM_CPUS_PER_TASK", "8(x2)", 1);  // what a heterogeneous job's variable can look like
  CHECK_THROWS_WITH(acc::detail::available_cpus(), Catch::Contains("SLURM_CPUS_PER_TASK = '8(x2)'"));
  ::setenv("SLURM_CPUS_PER_TASK", "1", 1);
  CHECK(acc::detail::available_cpus() == 1);
}
