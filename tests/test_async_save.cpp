// Training states written in the background (Trainer::save_training_state_async, SaveTrainingStateOptions::
// asynchronous): the copy is the state of the save point, training goes on while it is written, a failed write is
// an error on every rank at the next save or the run's end, a preemption waits for the write and saves at once, and
// a process killed at any moment of a write leaves the state before it whole. Resume across asynchronous saves is in
// test_resume.cpp, a diverging loss in test_faults.cpp (with the chaos runs, which also save in the background).
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "helpers.hpp"
#include "ranks_as_threads.hpp"

namespace acc = accelerated;
namespace cb = accelerated::callbacks;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// A flag one thread raises and another waits for, with a bound: a wait that would deadlock ends false instead.
struct Latch {
  std::mutex mutex;
  std::condition_variable changed;
  bool raised = false;
  void raise() {
    std::lock_guard lock(mutex);
    raised = true;
    changed.notify_all();
  }
  bool wait(std::chrono::seconds bound) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, bound, [&] { return raised; });
  }
};

// An SGD optimizer's momentum buffers, flattened in parameter order (empty before its first step).
template <class Optimizer>  // a template, so that the key branch not taken is not compiled
torch::Tensor flat_momentum(Optimizer& optimizer) {
  std::vector<torch::Tensor> flat;
  for (const auto& p : optimizer.param_groups()[0].params()) {
    // The state's key: the parameter's TensorImpl, as a string up to LibTorch 2.0, as a pointer after.
    using Key = typename std::remove_cvref_t<decltype(optimizer.state())>::key_type;
    Key key{};
    if constexpr (std::is_same_v<Key, std::string>) {
      std::ostringstream text;
      text << p.unsafeGetTensorImpl();
      key = text.str();
    } else {
      key = p.unsafeGetTensorImpl();
    }
    const auto found = optimizer.state().find(key);
    if (found == optimizer.state().end()) continue;
    flat.push_back(static_cast<torch::optim::SGDParamState&>(*found->second).momentum_buffer().flatten());
  }
  return flat.empty() ? torch::empty({0}) : torch::cat(flat);
}

// The parameters of a saved state, then its momentum.
torch::Tensor parameters_of_state(const fs::path& path) {
  auto model = test::linear_model(1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.load_training_state(path);
  return torch::cat({test::flat_parameters(*model), flat_momentum(optimizer)});
}

// An asynchronous save whose follow-up ends `after` from now: a save, load or run end that waits for it finds done.
struct SlowWrite {
  std::shared_ptr<Latch> release = std::make_shared<Latch>();
  std::shared_ptr<std::atomic<bool>> done = std::make_shared<std::atomic<bool>>(false);
  std::thread releaser;
  template <class Trainer>
  SlowWrite(Trainer& trainer, const fs::path& path, std::chrono::milliseconds after = 100ms) {
    trainer.save_training_state_async(path, {}, [release = release, done = done] {
      release->wait(60s);
      done->store(true);
    });
    releaser = std::thread([release = release, after] {
      std::this_thread::sleep_for(after);
      release->raise();
    });
  }
  ~SlowWrite() { releaser.join(); }
};

// At update 2: a state saved in the background. Right after the call the parameters and the momentum are overwritten
// (as the next updates would) until the file is written, then put back: the file must hold the values of the save point. The
// save's follow-up (run once the file is written) then waits for update 5: were the save synchronous, it would run
// inside update 2 and its wait would end unanswered.
struct SaveAt2WaitFor5 {
  fs::path dir;
  std::shared_ptr<Latch> written = std::make_shared<Latch>();
  std::shared_ptr<Latch> reached = std::make_shared<Latch>();
  std::shared_ptr<std::atomic<int>> seen = std::make_shared<std::atomic<int>>(-1);  // 1: update 5 seen while writing
  std::shared_ptr<torch::Tensor> saved_at = std::make_shared<torch::Tensor>();
  void operator()(acc::on_update_step_end, auto& trainer) {
    const auto step = trainer.state().update_step;
    if (step == 2) {
      *saved_at = torch::cat({test::flat_parameters(trainer.model().module()), flat_momentum(trainer.optimizer())});
      trainer.save_training_state_async(dir / "step_2.pt", {}, [written = written, reached = reached, seen = seen] {
        written->raise();
        seen->store(reached->wait(60s) ? 1 : 0);
      });
      torch::NoGradGuard no_grad;
      std::vector<torch::Tensor> live = trainer.model()->parameters(), kept;
      for (auto& [key, state] : trainer.optimizer().state()) {
        live.push_back(static_cast<torch::optim::SGDParamState&>(*state).momentum_buffer());
      }
      for (auto& t : live) kept.push_back(t.clone()), t.fill_(-1.0);
      written->wait(60s);
      for (std::size_t i = 0; i < kept.size(); ++i) live[i].copy_(kept[i]);
    }
    if (step == 5) reached->raise();
  }
};

struct CrashAt4 {
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step == 4) throw std::runtime_error("simulated crash");
  }
};

struct Defers {
  void operator()(acc::on_training_run_end, auto& trainer) {
    trainer.raise_after_run(std::make_exception_ptr(std::runtime_error("deferred by a callback")));
  }
};

struct SignalAt5 {
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step == 5) ::raise(SIGUSR2);
  }
};

}  // namespace

TEST_CASE("a host copy of an archive keeps the values of the moment it was taken", "[async_save]") {
  const auto dir = test::fresh_dir("host_copy");
  auto model = test::linear_model();
  torch::serialize::OutputArchive archive;
  model->save(archive);
  auto contents = acc::detail::archive_contents(dir / "model.pt", archive);
  const auto before = test::flat_parameters(*model).clone();
  auto copy = acc::detail::host_copy(contents);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.add_(1.0);  // training goes on
  }
  acc::detail::write_archive_contents(dir / "copy.pt", copy);
  acc::detail::write_archive_contents(dir / "live.pt", contents);  // the references see the change
  auto read = [&](const fs::path& path) {
    auto other = test::linear_model(2);
    auto archive = acc::detail::read_archive_file(path, "test", torch::kCPU);
    other->load(archive);
    return test::flat_parameters(*other);
  };
  CHECK(torch::equal(read(dir / "copy.pt"), before));
  CHECK(torch::equal(read(dir / "live.pt"), test::flat_parameters(*model)));
  fs::remove_all(dir);
}

TEST_CASE("the step loop goes on while an asynchronous save is written", "[async_save]") {
  const auto dir = test::fresh_dir("async_goes_on");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  SaveAt2WaitFor5 hooks{dir};
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, SaveAt2WaitFor5> trainer(
      model, torch::nn::MSELoss(), optimizer, hooks);
  trainer.set_output(test::quiet());
  trainer.train(test::regression_data(64), {.num_epochs = 1, .per_device_batch_size = 4});  // 16 updates
  CHECK(hooks.seen->load() == 1);  // and the run's end waited for the follow-up
  CHECK(torch::equal(parameters_of_state(dir / "step_2.pt"), *hooks.saved_at));
  CHECK_FALSE(torch::equal(torch::cat({test::flat_parameters(*model), flat_momentum(optimizer)}), *hooks.saved_at));
  fs::remove_all(dir);
}

TEST_CASE("one asynchronous write at a time: the next save, or load, waits for the one before", "[async_save]") {
  const auto dir = test::fresh_dir("async_one_at_a_time");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  // Each write below ends 100 ms after it starts; a call that did not wait for it would return before.
  {
    SlowWrite a(trainer, dir / "a.pt");
    trainer.save_training_state_async(dir / "b.pt");
    CHECK(a.done->load());
  }
  {
    SlowWrite c(trainer, dir / "c.pt");
    trainer.save_checkpoint(dir / "checkpoint.pt");
    CHECK(c.done->load());
  }
  {
    SlowWrite d(trainer, dir / "d.pt");
    CHECK_NOTHROW(trainer.load_training_state(dir / "d.pt"));  // it may be the very file
    CHECK(d.done->load());
  }
  {  // a write started before train() is waited for at its end
    SlowWrite e(trainer, dir / "e.pt");
    trainer.train(test::regression_data(16), {.per_device_batch_size = 4});
    CHECK(e.done->load());
  }
  trainer.save_training_state_async(dir / "f.pt");
  CHECK_NOTHROW(trainer.train(test::regression_data(16), [&] {
    acc::TrainOptions options{.per_device_batch_size = 4};
    options.resume_from_newest_in = dir;
    return options;
  }()));
  CHECK(trainer.resumed_from() == dir / "f.pt");
  for (const auto* name : {"a.pt", "b.pt", "c.pt", "d.pt", "e.pt", "f.pt"}) CHECK(fs::exists(dir / name));

  // A follow-up that fails is the save's failure, which says that the file itself was written.
  trainer.save_training_state_async(dir / "g.pt", {}, [] { throw std::runtime_error("the upload failed"); });
  CHECK_THROWS_WITH(trainer.wait_for_async_save(),
                    Catch::Contains("the asynchronous save of '" + (dir / "g.pt").string() + "' failed: the file was "
                                    "written, but what follows its write failed: the upload failed"));
  CHECK(fs::exists(dir / "g.pt"));

  // In the middle of a step it is refused, as the synchronous save is.
  struct SavesMidStep {
    void operator()(acc::on_train_step_end, acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess,
                                                         acc::DefaultLoop, SavesMidStep>& trainer) {
      trainer.save_training_state_async("never.pt");
    }
  };
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, SavesMidStep> mid(
      model, torch::nn::MSELoss(), optimizer, SavesMidStep{});
  mid.set_output(test::quiet());
  CHECK_THROWS_WITH(mid.train(test::regression_data(16), {.per_device_batch_size = 4}),
                    Catch::Contains("save_training_state_async: called in the middle of a step"));
  fs::remove_all(dir);
}

TEST_CASE("with several ranks, rank 0 writes and runs the follow-up once", "[async_save][distributed]") {
  const auto dir = test::fresh_dir("async_ranks");
  auto calls = std::make_shared<std::atomic<int>>(0);
  auto on_rank = std::make_shared<std::atomic<int>>(-1);
  test::run_ranks(2, [&](int rank, auto store) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    acc::DataParallelOptions options;
    options.timeout = 20s;
    trainer.distributed() = acc::DataParallel(store, rank, 2, options);
    trainer.set_output(test::quiet());
    trainer.train(test::regression_data(32), {.per_device_batch_size = 4});
    trainer.save_training_state_async(dir / "state.pt", {}, [calls, on_rank, rank] {
      ++*calls;
      on_rank->store(rank);
    });
    trainer.wait_for_async_save();
    return 0;
  });
  CHECK(calls->load() == 1);
  CHECK(on_rank->load() == 0);
  CHECK(fs::exists(dir / "state.pt"));
  fs::remove_all(dir);
}

TEST_CASE("a failed asynchronous write is an error on every rank at the next save, and latest stays",
          "[async_save][distributed][bad_input]") {
  const auto base = test::fresh_dir("async_fails");
  const auto data = test::regression_data(64, 3);
  // Two ranks, 8 updates, a state saved in the background every n; each rank's error, or "none".
  auto two_ranks_saving_every = [&](std::int64_t n) {
    return test::run_ranks(2, [&, n](int rank, auto store) {
      return test::error_or_none([&, n, rank, store] {
        auto model = test::linear_model();
        torch::optim::SGD optimizer(model->parameters(), 0.01);
        acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, cb::SaveTrainingState>
            trainer(model, torch::nn::MSELoss(), optimizer,
                    cb::SaveTrainingState({.save_dir = base / "states", .save_every_n_steps = n, .asynchronous = true}));
        acc::DataParallelOptions options;
        options.timeout = 20s;
        trainer.distributed() = acc::DataParallel(store, rank, 2, options);
        trainer.set_output(test::quiet());
        trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4});
      });
    });
  };
  // step_4.pt cannot be written: a folder of that name is in the way (the rename over it fails on the writer thread).
  fs::create_directories(base / "states" / "step_4.pt" / "in_the_way");
  auto errors = two_ranks_saving_every(2);
  const auto file = (base / "states" / "step_4.pt").string();
  CHECK_THAT(errors[0], Catch::Contains("the asynchronous save of '" + file + "' failed: ") &&
                            Catch::Contains("rename failed") && Catch::Contains("the files saved before it are left as they were"));
  CHECK_THAT(errors[1], Catch::Contains("the asynchronous save of '" + file + "' failed on rank 0"));
  CHECK(acc::latest_training_state(base / "states") == base / "states" / "step_2.pt");
  CHECK_FALSE(fs::exists(base / "states" / "step_6.pt"));  // the next save stopped at the failure

  // The last write of the run fails: train() throws at its end, on every rank.
  fs::remove_all(base / "states");
  fs::create_directories(base / "states" / "final.pt" / "in_the_way");
  errors = two_ranks_saving_every(4);
  const auto final_file = (base / "states" / "final.pt").string();
  CHECK_THAT(errors[0], Catch::Contains("the asynchronous save of '" + final_file + "' failed: "));
  CHECK_THAT(errors[1], Catch::Contains("the asynchronous save of '" + final_file + "' failed on rank 0"));
  CHECK(acc::latest_training_state(base / "states") == base / "states" / "step_8.pt");

  // A run that ends by another exception while the write fails: the run's own error is thrown, the write's printed.
  {
    fs::remove_all(base / "states");
    fs::create_directories(base / "states" / "step_4.pt" / "in_the_way");
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState, CrashAt4>
        trainer(model, torch::nn::MSELoss(), optimizer,
                cb::SaveTrainingState({.save_dir = base / "states", .save_every_n_steps = 2, .asynchronous = true}),
                CrashAt4{});
    std::ostringstream out;
    trainer.set_output(out);
    CHECK_THROWS_WITH(trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4}),
                      Catch::Contains("simulated crash"));
    CHECK_THAT(out.str(), Catch::Contains("the asynchronous save of '" + file + "' failed"));
    CHECK(acc::latest_training_state(base / "states") == base / "states" / "step_2.pt");
  }
  {  // An error a callback deferred (raise_after_run) wins over the failed last write, which is printed.
    fs::remove_all(base / "states");
    fs::create_directories(base / "states" / "final.pt" / "in_the_way");
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState, Defers>
        trainer(model, torch::nn::MSELoss(), optimizer,
                cb::SaveTrainingState({.save_dir = base / "states", .asynchronous = true}), Defers{});
    std::ostringstream out;
    trainer.set_output(out);
    CHECK_THROWS_WITH(trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4}),
                      Catch::Contains("deferred by a callback"));
    CHECK_THAT(out.str(), Catch::Contains("the asynchronous save of '" + final_file + "' failed"));
  }

  // The last save of a run: train() itself throws once it has waited for the write.
  fs::remove_all(base / "states");
  fs::create_directories(base / "states" / "final.pt" / "in_the_way");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.01);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState> trainer(
      model, torch::nn::MSELoss(), optimizer,
      cb::SaveTrainingState({.save_dir = base / "states", .save_every_n_steps = 4, .asynchronous = true}));
  trainer.set_output(test::quiet());
  CHECK_THROWS_WITH(trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4}),
                    Catch::Contains("the asynchronous save of '" + (base / "states" / "final.pt").string() + "' failed"));
  CHECK(acc::latest_training_state(base / "states") == base / "states" / "step_16.pt");
  // The trainer is usable afterwards: nothing is left pending.
  CHECK_NOTHROW(trainer.wait_for_async_save());
  CHECK_NOTHROW(trainer.save_training_state(base / "states" / "by_hand.pt"));
  fs::remove_all(base);
}

TEST_CASE("a preemption while an asynchronous save is written waits for it, then saves at once",
          "[async_save][preemption]") {
  const auto dir = test::fresh_dir("async_preempted");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState, SignalAt5>
      trainer(model, torch::nn::MSELoss(), optimizer,
              cb::SaveTrainingState({.save_dir = dir, .save_every_n_steps = 1, .asynchronous = true}), SignalAt5{});
  trainer.set_output(test::quiet());
  acc::TrainOptions options{.num_epochs = 1, .per_device_batch_size = 4};
  options.preemption_dir = dir;
  options.preemption_signals = {SIGUSR2};
  CHECK_THROWS_AS(trainer.train(test::regression_data(64), options), acc::PreemptedError);
  // step_5.pt (in the background) was complete before preempted_step_5.pt (at once), which `latest` names.
  CHECK(acc::latest_training_state(dir) == dir / "preempted_step_5.pt");
  CHECK(torch::equal(parameters_of_state(dir / "step_5.pt"), parameters_of_state(dir / "preempted_step_5.pt")));
  CHECK(torch::equal(parameters_of_state(dir / "preempted_step_5.pt"),
                     torch::cat({test::flat_parameters(*model), flat_momentum(optimizer)})));

  // The write in flight fails (a folder in the way of step_5.pt): the failure is printed, and the preemption save is
  // made all the same.
  fs::remove_all(dir);
  fs::create_directories(dir / "step_5.pt" / "in_the_way");
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState, SignalAt5>
      again(model, torch::nn::MSELoss(), optimizer,
            cb::SaveTrainingState({.save_dir = dir, .save_every_n_steps = 1, .asynchronous = true}), SignalAt5{});
  std::ostringstream out;
  again.set_output(out);
  CHECK_THROWS_AS(again.train(test::regression_data(64), options), acc::PreemptedError);
  CHECK_THAT(out.str(), Catch::Contains("the asynchronous save of '" + (dir / "step_5.pt").string() + "' failed"));
  CHECK(acc::latest_training_state(dir) == dir / "preempted_step_5.pt");
  CHECK(torch::equal(parameters_of_state(dir / "preempted_step_5.pt"),
                     torch::cat({test::flat_parameters(*model), flat_momentum(optimizer)})));
  fs::remove_all(dir);
}

// Hidden: trains a 32 MB model, a state saved in the background at every update (keeping 2), until killed.
TEST_CASE("async save writer", "[.async_save_writer]") {
  const fs::path dir = std::getenv("ACCELERATED_TEST_DIR");
  torch::manual_seed(5);
  auto model = torch::nn::Linear(2048, 4096);
  torch::optim::SGD optimizer(model->parameters(), 1e-3);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState> trainer(
      model, torch::nn::MSELoss(), optimizer,
      cb::SaveTrainingState(
          {.save_dir = dir, .save_every_n_steps = 1, .max_checkpoints = 2, .asynchronous = true}));
  trainer.set_output(test::quiet());
  trainer.train(std::make_pair(torch::randn({4096, 2048}), torch::randn({4096, 4096})),
                {.num_epochs = 100, .per_device_batch_size = 8});
}

TEST_CASE("a process killed at any moment of an asynchronous write leaves latest whole", "[async_save][fault]") {
  const auto dir = test::fresh_dir("async_killed");
  const pid_t pid = test::spawn_self("[.async_save_writer]", {"ACCELERATED_TEST_DIR=" + dir.string()});
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!fs::exists(dir / "latest") && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  std::random_device device;
  std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 1500)(device)));
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  REQUIRE(WIFSIGNALED(status));
  const auto latest = acc::latest_training_state(dir);
  REQUIRE(latest);
  INFO("latest: " << latest->filename() << "; in the folder: " << [&] {
    std::string names;
    for (const auto& e : fs::directory_iterator(dir)) names += e.path().filename().string() + " ";
    return names;
  }());
  torch::manual_seed(6);
  auto model = torch::nn::Linear(2048, 4096);
  torch::optim::SGD optimizer(model->parameters(), 1e-3);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  const auto values = trainer.load_training_state(*latest);
  CHECK(latest->filename() == "step_" + std::to_string(static_cast<std::int64_t>(values.at("update_step"))) + ".pt");
  // Rotation keeps the two newest states (a third until rotation, which follows `latest`, has run; one more may be
  // half-written, as a temporary, which is no .pt file).
  std::set<std::string> states;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".pt") states.insert(e.path().filename().string());
  }
  CHECK(states.size() <= 3);
  CHECK(states.count(latest->filename().string()) == 1);
  fs::remove_all(dir);
}
