// Faults that meet: a resume where one rank cannot read the newest state, a loss that diverges between checks while
// states are being saved, a preemption signal that arrives after the last vote, a load that fails half-way, a peer
// that is busy saving (not hung) and one that is stopped. Each test failed before its fix (issue 20).
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <signal.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
#include <random>
#include <thread>

#include "helpers.hpp"

namespace acc = accelerated;
namespace cb = accelerated::callbacks;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// Runs `body(rank, store)` on `world` threads and returns what each returned; rethrows the first failure.
template <class Body>
auto run_ranks(int world, Body body) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  using Result = decltype(body(0, store));
  std::vector<std::future<Result>> futures;
  for (int rank = 0; rank < world; ++rank) {
    futures.push_back(std::async(std::launch::async, [=] { return body(rank, store); }));
  }
  std::vector<Result> results;
  for (auto& f : futures) results.push_back(f.get());
  return results;
}

acc::DataParallelOptions short_timeout() {
  acc::DataParallelOptions options;
  options.timeout = 20s;
  return options;
}

// Throws at update `at` (0: never), after SaveTrainingState has saved it.
struct ThrowAt {
  std::int64_t at;
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step == at) throw std::runtime_error("simulated crash");
  }
};

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), {}};
}

}  // namespace

// ---- ranks resume together ------------------------------------------------------------------------------------
TEST_CASE("ranks that read different newest states resume together from the same older one",
          "[resume][distributed][faults]") {
  const auto data = test::regression_data(64, 5);
  const auto base = test::fresh_dir("agreed_resume");
  // 32 examples per rank, batch 4, accumulation 2: 4 updates per epoch, 8 in all; states after updates 2, 4, 6, 8.
  // Each rank resumes from its own view of the run folder (`dirs[rank]`), as ranks on other machines do.
  auto run = [&](std::vector<fs::path> dirs, std::int64_t crash_at, std::vector<std::string>* printed) {
    std::vector<torch::nn::Linear> models{test::linear_model(), test::linear_model()};  // before the threads
    return run_ranks(2, [&, models](int rank, auto store) {
      auto model = models[static_cast<std::size_t>(rank)];
      torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
      const auto& dir = dirs[static_cast<std::size_t>(rank)];
      acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, cb::SaveTrainingState, ThrowAt>
          trainer(model, torch::nn::MSELoss(), optimizer,
                  cb::SaveTrainingState({.save_dir = dir, .save_every_n_steps = 2}), ThrowAt{crash_at});
      trainer.distributed() = acc::DataParallel(store, rank, 2, short_timeout());
      std::ostringstream out;
      trainer.set_output(out);
      acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 4, .gradient_accumulation_steps = 2,
                                .seed = 3};
      options.resume_from_newest_in = dir;
      try {
        trainer.train(data, options);
      } catch (...) {
        if (printed) (*printed)[static_cast<std::size_t>(rank)] = out.str();
        throw;
      }
      if (printed) (*printed)[static_cast<std::size_t>(rank)] = out.str();
      return test::flat_parameters(*model);
    });
  };
  const auto reference = run({base / "uninterrupted", base / "uninterrupted"}, 0, nullptr);
  const auto shared = base / "shared";
  CHECK_THROWS_WITH(run({shared, shared}, 5, nullptr), Catch::Contains("simulated crash"));
  REQUIRE(acc::latest_training_state(shared)->filename() == "step_4.pt");
  // Rank 1 sees the newest state cut short (a stale network-filesystem cache, a read error); rank 0 reads it whole.
  const auto stale = base / "stale_view";
  fs::copy(shared, stale);
  fs::resize_file(stale / "step_4.pt", fs::file_size(stale / "step_4.pt") / 2);
  std::vector<std::string> printed(2);
  const auto resumed = run({shared, stale}, 0, &printed);
  INFO("rank 0 printed: " << printed[0] << "\nrank 1 printed: " << printed[1]);
  CHECK_THAT(printed[0], Catch::Contains("Resuming from '" + (shared / "step_2.pt").string() + "'"));
  CHECK_THAT(printed[0], Catch::Contains("'step_4.pt' does not load on rank 1 of 2"));
  CHECK_THAT(printed[1], Catch::Contains("rank 1 cannot read '" + (stale / "step_4.pt").string() + "'"));
  CHECK(torch::equal(resumed[0], reference[0]));
  CHECK(torch::equal(resumed[1], reference[1]));

  // A state one rank refuses (another run's shape) is refused on every rank, at once, not after a timeout.
  const auto started = std::chrono::steady_clock::now();
  auto other = run_ranks(2, [&](int rank, auto store) {
    return test::error_or_none([&, rank, store] {
      auto model = rank == 1 ? torch::nn::Linear(8, 2) : test::linear_model();
      torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
      acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
      trainer.distributed() = acc::DataParallel(store, rank, 2, short_timeout());
      trainer.set_output(test::quiet());
      trainer.load_training_state(shared / "step_2.pt");
    });
  });
  CHECK(std::chrono::steady_clock::now() - started < 10s);
  CHECK_THAT(other[1], Catch::Contains("'model/bias' has shape [1] in"));
  CHECK_THAT(other[0], Catch::Contains("does not load on rank 1 of 2"));
  fs::remove_all(base);
}

// ---- a diverged loss is never saved as a good state ------------------------------------------------------------
namespace {
// The targets turn NaN from update `from` on (0: never), as a diverging run's loss does.
struct Poison {
  std::shared_ptr<std::atomic<std::int64_t>> from;
  std::shared_ptr<std::atomic<bool>> on;
  void operator()(acc::on_train_step_start, auto& trainer) {
    on->store(*from > 0 && trainer.state().update_step + 1 >= *from);
  }
};

struct DivergingRun {
  fs::path dir;
  std::int64_t poison_from = 0;
  std::optional<fs::path> resume_from_newest_in;
  torch::Tensor parameters;
  std::string printed;

  void operator()() {
    auto from = std::make_shared<std::atomic<std::int64_t>>(poison_from);
    auto on = std::make_shared<std::atomic<bool>>(false);
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
    auto loss = [on](const torch::Tensor& out, const torch::Tensor& target) {
      return torch::mse_loss(out, *on ? target * std::numeric_limits<double>::quiet_NaN() : target);
    };
    // States every 10 updates, keeping 3; TerminateOnNan reads its flag every 50 steps, as it does on a GPU.
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, Poison, cb::TerminateOnNan,
                 cb::SaveTrainingState>
        trainer(model, loss, optimizer, Poison{from, on}, cb::TerminateOnNan(50),
                cb::SaveTrainingState({.save_dir = dir, .save_every_n_steps = 10, .max_checkpoints = 3}));
    std::ostringstream out;
    trainer.set_output(out);
    acc::TrainOptions options{.num_epochs = 1, .per_device_batch_size = 4};
    options.resume_from_newest_in = resume_from_newest_in;
    try {
      trainer.train(test::regression_data(240, 9), options);  // 60 updates
    } catch (...) {
      printed = out.str();
      throw;
    }
    printed = out.str();
    parameters = test::flat_parameters(*model);
  }
};

bool state_is_finite(const fs::path& path) {
  auto model = test::linear_model(1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  const auto error = test::error_or_none([&] { trainer.load_training_state(path); });
  INFO(path << ": " << error);
  return error == "none" && torch::isfinite(test::flat_parameters(*model)).all().item<bool>();
}
}  // namespace

TEST_CASE("a loss that diverges between checks leaves no saved state with a non-finite value",
          "[resume][faults][nan]") {
  const auto base = test::fresh_dir("diverged");
  DivergingRun reference{base / "reference"};
  reference();

  DivergingRun diverged{base / "diverged", 25};
  CHECK_THROWS_AS(diverged(), acc::NonFiniteLossError);
  CHECK_THROWS_WITH(diverged(), Catch::Contains("not saving '" + (base / "diverged" / "step_30.pt").string() +
                                                "': 'model/") &&
                                    Catch::Contains("holds non-finite values at epoch 1, update step 30"));
  // step_30, step_40 and final.pt were never written; `latest` names the last good state.
  std::set<std::string> left;
  for (const auto& entry : fs::directory_iterator(base / "diverged")) left.insert(entry.path().filename().string());
  CHECK(left == std::set<std::string>{"latest", "step_10.pt", "step_20.pt"});
  CHECK(acc::latest_training_state(base / "diverged") == base / "diverged" / "step_20.pt");
  for (const auto& name : {"step_10.pt", "step_20.pt"}) CHECK(state_is_finite(base / "diverged" / name));
  fs::copy_file(base / "diverged" / "step_20.pt", base / "good_step_20.pt");

  // Resuming (the cause fixed) starts from the last finite state and ends as the run that never diverged.
  DivergingRun resumed{base / "diverged", 0, base / "diverged"};
  resumed();
  CHECK_THAT(resumed.printed, Catch::Contains("Resuming from '" + (base / "diverged" / "step_20.pt").string()));
  CHECK(torch::equal(resumed.parameters, reference.parameters));

  // A non-finite state written by other means (an older version, a hand-made file) is passed over by name.
  const auto planted = base / "planted";
  fs::create_directories(planted);
  fs::copy_file(base / "good_step_20.pt", planted / "step_20.pt");
  {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
    torch::NoGradGuard no_grad;
    model->weight.fill_(std::numeric_limits<float>::infinity());
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
    CHECK_THROWS_WITH(trainer.save_training_state(planted / "by_trainer.pt"),
                      Catch::Contains("not saving") && Catch::Contains("'model/weight' holds non-finite values"));
    CHECK_THROWS_WITH(trainer.save_checkpoint(planted / "checkpoint.pt"), Catch::Contains("not saving"));
    CHECK_THROWS_AS(acc::save_checkpoint(planted / "free.pt", *model), acc::NonFiniteLossError);
    CHECK_FALSE(fs::exists(planted / "by_trainer.pt"));
    CHECK_FALSE(fs::exists(planted / "checkpoint.pt"));
    CHECK_FALSE(fs::exists(planted / "free.pt"));
    // The writer below the trainer has no check: it plants the file.
    acc::FullPrecision precision;
    boost::hana::tuple<> callbacks;
    acc::RunHistory history;
    acc::detail::TrainingStateParts<acc::FullPrecision, boost::hana::tuple<>> parts{
        *model, &optimizer, nullptr, precision, callbacks, history};
    acc::detail::write_training_state(planted / "step_30.pt", parts, acc::RunPosition{}, 1,
                                      {acc::detail::generator_state(torch::kCPU).unsqueeze(0), {}}, {});
    acc::record_latest_training_state(planted, "step_30.pt");
  }
  DivergingRun from_planted{planted, 0, planted};
  from_planted();
  CHECK_THAT(from_planted.printed, Catch::Contains("holds non-finite values in 'model/weight'"));
  CHECK_THAT(from_planted.printed, Catch::Contains("Resuming from '" + (planted / "step_20.pt").string()));
  CHECK(torch::equal(from_planted.parameters, reference.parameters));
  fs::remove_all(base);
}

// ---- a preemption signal is never swallowed -----------------------------------------------------------------------
namespace {
std::atomic<int> usr2_received{0};
extern "C" void count_usr2(int) { usr2_received.fetch_add(1); }

struct RaiseAt {
  bool in_last_eval;
  void operator()(acc::on_eval_epoch_end, auto& trainer, bool) {
    if (in_last_eval && trainer.run_history().current_epoch() == 2) ::raise(SIGUSR2);
  }
  void operator()(acc::on_training_run_end, auto&) {
    if (!in_last_eval) ::raise(SIGUSR2);
  }
};
struct RaiseOnce {
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step == 2) ::raise(SIGUSR2);
  }
};
}  // namespace

TEST_CASE("a preemption signal that arrives after the last vote reaches the handler that was there before",
          "[preemption][faults]") {
  struct sigaction mine {}, before {};
  mine.sa_handler = count_usr2;
  sigemptyset(&mine.sa_mask);
  REQUIRE(::sigaction(SIGUSR2, &mine, &before) == 0);
  const auto dir = test::fresh_dir("late_signal");
  for (const bool in_last_eval : {true, false}) {
    INFO((in_last_eval ? "during the last evaluation" : "in on_training_run_end"));
    usr2_received = 0;
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, RaiseAt> trainer(
        model, torch::nn::MSELoss(), optimizer, RaiseAt{in_last_eval});
    trainer.set_output(test::quiet());
    acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 8};
    options.preemption_dir = dir;
    options.preemption_signals = {SIGUSR2};
    trainer.train(test::regression_data(32), options, test::regression_data(16, 2));  // the run itself completes
    CHECK(usr2_received == 1);
  }
  // A signal the run acted on (it saved and threw PreemptedError) is not raised again.
  usr2_received = 0;
  {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, RaiseOnce> trainer(
        model, torch::nn::MSELoss(), optimizer, RaiseOnce{});
    trainer.set_output(test::quiet());
    acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 8};
    options.preemption_dir = dir;
    options.preemption_signals = {SIGUSR2};
    CHECK_THROWS_AS(trainer.train(test::regression_data(32), options), acc::PreemptedError);
  }
  CHECK(usr2_received == 0);
  ::sigaction(SIGUSR2, &before, nullptr);
  fs::remove_all(dir);
}

// ---- a load that fails changes nothing -------------------------------------------------------------------------
TEST_CASE("a training state that fails to load past the weights leaves the model, optimizer and history as they were",
          "[resume][faults][bad_input]") {
  const auto dir = test::fresh_dir("half_load");
  {  // A state whose weights and optimizer are good and whose run history is cut short.
    auto saved = test::linear_model(99);
    torch::optim::SGD optimizer(saved->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
    torch::serialize::OutputArchive archive;
    archive.write("accelerated_training_state_version", torch::tensor(acc::training_state_format_version, torch::kLong));
    acc::detail::write_common(archive, *saved, &optimizer, {});
    acc::detail::write_position(archive, acc::RunPosition{});
    torch::serialize::OutputArchive history;
    history.write("epoch", torch::tensor(std::int64_t{4}, torch::kLong));
    history.write("count", torch::tensor(std::int64_t{2}, torch::kLong));  // and no entries
    archive.write("run_history", history);
    archive.write("rng_cpu", acc::detail::generator_state(torch::kCPU).unsqueeze(0));
    acc::detail::save_archive(dir / "cut.pt", archive);
  }
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  trainer.train(test::regression_data(32), {.num_epochs = 1, .per_device_batch_size = 8});
  const auto weights = test::flat_parameters(*model).clone();
  const auto epoch = trainer.run_history().current_epoch();
  const auto losses = trainer.run_history().get_metric_values("train_loss_epoch");
  CHECK_THROWS_WITH(trainer.load_training_state(dir / "cut.pt"), Catch::Contains("has no entry 'run_history/name_0'"));
  CHECK(torch::equal(test::flat_parameters(*model), weights));
  CHECK(trainer.run_history().current_epoch() == epoch);
  CHECK(trainer.run_history().get_metric_values("train_loss_epoch") == losses);
  // The optimizer's momentum is the trained one still: one more epoch goes on as if nothing had been tried.
  auto twin = test::linear_model();
  torch::optim::SGD twin_optimizer(twin->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> untouched(twin, torch::nn::MSELoss(), twin_optimizer);
  untouched.set_output(test::quiet());
  untouched.train(test::regression_data(32), {.num_epochs = 1, .per_device_batch_size = 8});
  acc::TrainOptions again{.num_epochs = 1, .per_device_batch_size = 8};
  again.reset_run_history = false;
  trainer.train(test::regression_data(32), again);
  untouched.train(test::regression_data(32), again);
  CHECK(torch::equal(test::flat_parameters(*model), test::flat_parameters(*twin)));
  fs::remove_all(dir);
}

// ---- a peer that is busy saving is not hung ----------------------------------------------------------------------
namespace {
// A callback whose state takes `seconds` to write: rank 0's save of the training state is that slow.
struct SlowState {
  double seconds;
  void operator()(acc::on_training_run_start, auto&) {}
  void save_state(torch::serialize::OutputArchive& archive) const {
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    archive.write("slow", torch::tensor(1));
  }
  void load_state(torch::serialize::InputArchive&) {}
};
}  // namespace

TEST_CASE("slow save worker", "[.slow_save_worker]") {
  const fs::path dir = std::getenv("ACCELERATED_TEST_DIR");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.01);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, SlowState, cb::SaveTrainingState>
      trainer(model, torch::nn::MSELoss(), optimizer, SlowState{6.0},
              cb::SaveTrainingState({.save_dir = dir / "states", .save_every_n_steps = 3, .save_at_end = false}));
  trainer.set_output(test::quiet());
  trainer.train(test::regression_data(80, 5), {.num_epochs = 1, .per_device_batch_size = 8});  // 5 updates a rank
  std::ofstream(dir / ("done_" + std::string(std::getenv("RANK")))) << "done\n";
}

TEST_CASE("the watchdog waits for a peer that is busy saving, three times its threshold", "[distributed][faults][watchdog]") {
  const auto dir = test::fresh_dir("slow_save");
  const auto port = std::to_string(20000 + std::random_device{}() % 20000);
  std::vector<pid_t> pids;
  for (int rank = 0; rank < 2; ++rank) {
    pids.push_back(test::spawn_self(
        "[.slow_save_worker]",
        {"RANK=" + std::to_string(rank), "WORLD_SIZE=2", "LOCAL_RANK=" + std::to_string(rank), "LOCAL_WORLD_SIZE=2",
         "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + port, "ACCELERATED_WATCHDOG_SECONDS=2",
         "ACCELERATED_TIMEOUT_SECONDS=60", "ACCELERATED_TEST_DIR=" + dir.string()},
        (dir / ("log_" + std::to_string(rank))).string()));
  }
  for (int rank = 0; rank < 2; ++rank) {
    const int status = test::wait_for(pids[static_cast<std::size_t>(rank)], 90s);
    INFO("rank " << rank << " printed: " << read_text(dir / ("log_" + std::to_string(rank))));
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
    CHECK(fs::exists(dir / ("done_" + std::to_string(rank))));
  }
  CHECK(acc::latest_training_state(dir / "states") == dir / "states" / "step_3.pt");
  fs::remove_all(dir);
}
