// A training state resumed by another number of processes (a torchrun elastic restart with fewer or more ranks, a
// SLURM job requeued on other nodes), ranks as threads: the interrupted epoch trains each of its examples exactly
// once, the update count continues where the new run's would be, and sharded optimizer state reshards.
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "helpers.hpp"
#include "ranks_as_threads.hpp"

namespace acc = accelerated;
using namespace std::chrono_literals;

namespace {

constexpr std::int64_t examples = 96;  // divisible by 1, 2, 3 and by 2 x batch 4: no padding anywhere

// Regression data whose first feature is the example's index / 1000, so that a batch says which examples it holds.
std::pair<torch::Tensor, torch::Tensor> indexed_data() {
  auto [x, y] = test::regression_data(examples, 3);
  x.select(1, 0).copy_(torch::arange(examples, torch::kFloat) / 1000.0);
  return {x, y};
}

// The examples of history epoch `epoch` this rank trains, in order.
template <std::int64_t epoch>
struct SeenInEpoch {
  std::shared_ptr<std::vector<std::int64_t>> seen = std::make_shared<std::vector<std::int64_t>>();
  std::shared_ptr<double> loss_sum = std::make_shared<double>(0.0);  // of loss x batch size
  void operator()(acc::on_train_step_end, auto& trainer, const auto& batch, const auto& output, std::int64_t) {
    if (trainer.run_history().current_epoch() != epoch) return;
    *loss_sum += output.loss.template item<double>() * static_cast<double>(output.batch_size);
    const auto ids = (batch.data.select(1, 0) * 1000.0).round().to(torch::kLong).contiguous();
    for (std::int64_t k = 0; k < ids.numel(); ++k) seen->push_back(ids.template data_ptr<std::int64_t>()[k]);
  }
};

// At update `at`: saves the training state to `path` and fails, as a node lost after a checkpoint would.
struct SaveThenCrash {
  std::filesystem::path path;
  std::int64_t at = 0;
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step != at) return;
    trainer.save_training_state(path);
    throw std::runtime_error("simulated crash");
  }
};

struct RankResult {
  std::vector<std::int64_t> seen_epoch_2;  // history epoch 2, the interrupted one
  std::vector<std::int64_t> seen_epoch_3;
  double loss_sum_epoch_2 = 0.0;
  torch::Tensor weights;
  std::int64_t update_step = 0;
  std::int64_t scheduler_count = 0;  // LibTorch's counter; with cosine, the schedule's own
  double lr = 0.0;                   // at the end
  std::int64_t optimizer_state_bytes = 0;
  std::vector<double> epoch_losses;
  std::string error;
};

enum class Schedule { step_lr, cosine, wsd };

struct Run {
  std::int64_t processes = 2;
  bool shard = false;
  std::filesystem::path resume_from;  // empty: a fresh run
  std::filesystem::path save_to;      // with crash_at: saved there at that update, then the run fails; else at the end
  std::int64_t crash_at = -1;
  std::int64_t accumulation = 1;
  // A StepLR that halves every 5 updates, or the library's cosine or WSD (linear decay) over the run.
  Schedule schedule = Schedule::step_lr;
  std::int64_t num_epochs = 3;
};

// 3 epochs of batch 4 per process, Adam, a scheduler stepped per update; ranks as threads under DataParallel, or
// one plain process (SingleProcess) when processes is 1.
std::vector<RankResult> train(const Run& run) {
  const auto data = indexed_data();
  // Made before the threads start: torch's default generator is shared by threads.
  std::vector<torch::nn::Linear> models;
  for (std::int64_t r = 0; r < run.processes; ++r) models.push_back(test::linear_model());
  auto body = [&](auto distributed, int rank) {
    auto model = models[static_cast<std::size_t>(rank)];
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
    SeenInEpoch<2> epoch_2;
    SeenInEpoch<3> epoch_3;
    acc::Trainer<acc::Cpu, acc::FullPrecision, decltype(distributed), acc::DefaultLoop, SeenInEpoch<2>,
                 SeenInEpoch<3>, SaveThenCrash>
        trainer(model, torch::nn::MSELoss(), optimizer, epoch_2, epoch_3, SaveThenCrash{run.save_to, run.crash_at});
    trainer.distributed() = std::move(distributed);
    trainer.set_output(test::quiet());
    acc::TrainOptions options{.num_epochs = run.num_epochs, .per_device_batch_size = 4,
                              .gradient_accumulation_steps = run.accumulation, .seed = 7};
    options.create_scheduler_fn = [schedule = run.schedule](torch::optim::Optimizer& o, const acc::RunConfig& config)
        -> std::unique_ptr<torch::optim::LRScheduler> {
      namespace sch = acc::schedulers;
      if (schedule == Schedule::cosine) {
        return std::make_unique<sch::CosineLrScheduler>(
            o, sch::CosineOptions{.total_num_epochs = config.num_epochs,
                                  .num_update_steps_per_epoch = config.num_update_steps_per_epoch, .lr_min = 1e-4});
      }
      if (schedule == Schedule::wsd) {
        return std::make_unique<sch::WsdLrScheduler>(
            o, sch::WsdOptions{.total_steps = config.max_num_train_steps, .use_inverse_sqrt_decay = false});
      }
      return std::make_unique<torch::optim::StepLR>(o, 5, 0.5);
    };
    if (!run.resume_from.empty()) options.resume_from = run.resume_from;
    RankResult result;
    result.error = test::error_or_none([&] {
      trainer.train(data, options);
      if (run.crash_at < 0 && !run.save_to.empty()) trainer.save_training_state(run.save_to);
    });
    result.seen_epoch_2 = *epoch_2.seen;
    result.seen_epoch_3 = *epoch_3.seen;
    result.loss_sum_epoch_2 = *epoch_2.loss_sum;
    result.weights = test::flat_parameters(*model);
    result.update_step = trainer.state().update_step;
    const auto names = trainer.run_history().get_metric_names();
    if (std::find(names.begin(), names.end(), "train_loss_epoch") != names.end()) {
      result.epoch_losses = trainer.run_history().get_metric_values("train_loss_epoch");
    }
    if (trainer.scheduler() != nullptr) {  // none when train() failed before making it
      result.scheduler_count = trainer.scheduler()->*acc::schedulers::detail::StepCounter::member;
    }
    if (const auto* cosine = dynamic_cast<acc::schedulers::CosineLrScheduler*>(trainer.scheduler())) {
      result.scheduler_count = cosine->num_updates();
    }
    if (const auto* wsd = dynamic_cast<acc::schedulers::WsdLrScheduler*>(trainer.scheduler())) {
      result.scheduler_count = wsd->num_updates();
    }
    result.lr = optimizer.param_groups()[0].options().get_lr();
    result.optimizer_state_bytes = acc::distributed::optimizer_state_bytes(optimizer);
    return result;
  };
  if (run.processes == 1) return {body(acc::SingleProcess{}, 0)};
  return test::run_ranks(static_cast<int>(run.processes), [&](int rank, auto store) {
    acc::DataParallelOptions options;
    options.timeout = 20s;
    options.shard_optimizer_state = run.shard;
    return body(acc::DataParallel(store, rank, static_cast<int>(run.processes), options), rank);
  });
}

// How many times each example appears in the given lists together.
std::map<std::int64_t, int> counts(std::initializer_list<const std::vector<std::int64_t>*> lists) {
  std::map<std::int64_t, int> count;
  for (const auto* list : lists) {
    for (const auto id : *list) ++count[id];
  }
  return count;
}

bool each_example_once(const std::map<std::int64_t, int>& count) {
  if (static_cast<std::int64_t>(count.size()) != examples) return false;
  return std::all_of(count.begin(), count.end(), [](const auto& entry) { return entry.second == 1; });
}

std::vector<std::int64_t> joined(const std::vector<RankResult>& ranks, std::vector<std::int64_t> RankResult::*member) {
  std::vector<std::int64_t> all;
  for (const auto& rank : ranks) all.insert(all.end(), (rank.*member).begin(), (rank.*member).end());
  return all;
}

}  // namespace

TEST_CASE("a 2-rank state resumed on 1 and on 3 processes trains each example of the interrupted epoch exactly once",
          "[distributed][resume][world_size]") {
  const auto dir = test::fresh_dir("resume_world_size");
  // 2 ranks: 12 batches per epoch each. With accumulation 1 the state is saved after update 15 (epoch 2, batch 3:
  // 24 of epoch 2's 96 examples trained); with accumulation 2 after update 9 (epoch 2, batch 6: 48 trained).
  const auto accumulation = GENERATE(1, 2);
  const auto cosine = GENERATE(false, true);
  const std::int64_t crash_at = accumulation == 1 ? 15 : 9;
  const std::int64_t trained = accumulation == 1 ? 24 : 48;
  INFO("accumulation " << accumulation << (cosine ? ", cosine schedule" : ", StepLR"));
  const auto state = dir / "state.pt";
  const auto before = train({.processes = 2, .save_to = state, .crash_at = crash_at, .accumulation = accumulation,
                             .schedule = cosine ? Schedule::cosine : Schedule::step_lr});
  for (const auto& rank : before) REQUIRE_THAT(rank.error, Catch::Contains("simulated crash"));
  const auto trained_before = joined(before, &RankResult::seen_epoch_2);
  REQUIRE(static_cast<std::int64_t>(trained_before.size()) == trained);

  const auto processes = GENERATE(1, 3);
  INFO("resumed on " << processes << " processes");
  const auto after = train({.processes = processes, .resume_from = state, .accumulation = accumulation,
                            .schedule = cosine ? Schedule::cosine : Schedule::step_lr});
  for (const auto& rank : after) REQUIRE(rank.error == "none");
  const auto trained_after = joined(after, &RankResult::seen_epoch_2);
  CHECK(static_cast<std::int64_t>(trained_after.size()) == examples - trained);
  CHECK(each_example_once(counts({&trained_before, &trained_after})));
  // The next epoch is a whole one, shared out among the new number of processes.
  const auto next_epoch = joined(after, &RankResult::seen_epoch_3);
  CHECK(each_example_once(counts({&next_epoch})));
  // The interrupted epoch's loss is the mean over all its examples, those trained before the save included.
  double loss_sum = 0.0;
  for (const auto* ranks : {&before, &after}) {
    for (const auto& rank : *ranks) loss_sum += rank.loss_sum_epoch_2;
  }
  // The update count goes on from the save; the schedule ends where an uninterrupted run of this many processes
  // ends: 3 epochs of 96 / (4 x processes x accumulation) updates.
  const auto updates_per_epoch = examples / (4 * processes * accumulation);
  const auto rest_updates = (examples - trained) / (4 * processes * accumulation);
  const auto uninterrupted = train({.processes = processes, .accumulation = accumulation,
                                    .schedule = cosine ? Schedule::cosine : Schedule::step_lr});
  for (const auto& rank : after) {
    CHECK(rank.epoch_losses.at(1) == Approx(loss_sum / examples).epsilon(1e-6));
    CHECK(rank.update_step == crash_at + rest_updates + updates_per_epoch);
    CHECK(rank.scheduler_count == 3 * updates_per_epoch);
    CHECK(rank.scheduler_count == uninterrupted[0].scheduler_count);
    if (cosine) CHECK(rank.lr == Approx(uninterrupted[0].lr).epsilon(1e-12));  // the schedule's last value
    REQUIRE(rank.epoch_losses.size() == 3);
    CHECK(std::isfinite(rank.epoch_losses[1]));
    CHECK(torch::equal(rank.weights, after[0].weights));  // the new ranks agree
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("an epoch continued by 3 processes, saved and resumed again by 3, goes on exactly",
          "[distributed][resume][world_size]") {
  const auto dir = test::fresh_dir("resume_world_size_again");
  const auto first = dir / "two_ranks.pt";
  const auto before = train({.processes = 2, .save_to = first, .crash_at = 15});
  // On 3 ranks the rest of epoch 2 (72 examples) is 6 updates, 16 to 21. Saved after update 17.
  const auto uninterrupted = train({.processes = 3, .resume_from = first});
  const auto second = dir / "three_ranks.pt";
  const auto middle = train({.processes = 3, .resume_from = first, .save_to = second, .crash_at = 17});
  for (const auto& rank : middle) REQUIRE_THAT(rank.error, Catch::Contains("simulated crash"));
  const auto last = train({.processes = 3, .resume_from = second});
  for (std::size_t r = 0; r < 3; ++r) {
    REQUIRE(last[r].error == "none");
    CHECK(torch::equal(last[r].weights, uninterrupted[r].weights));
    CHECK(last[r].update_step == uninterrupted[r].update_step);
    CHECK(last[r].scheduler_count == uninterrupted[r].scheduler_count);
    CHECK(last[r].lr == uninterrupted[r].lr);
    CHECK(last[r].epoch_losses == uninterrupted[r].epoch_losses);
    CHECK(last[r].seen_epoch_3 == uninterrupted[r].seen_epoch_3);
  }
  const auto a = joined(before, &RankResult::seen_epoch_2);
  const auto b = joined(middle, &RankResult::seen_epoch_2);
  const auto c = joined(last, &RankResult::seen_epoch_2);
  CHECK(b.size() == 2 * 4 * 3);
  CHECK(each_example_once(counts({&a, &b, &c})));
  std::filesystem::remove_all(dir);
}

TEST_CASE("a sharded optimizer state of 2 ranks reshards on 3 and loads whole in one process",
          "[distributed][resume][world_size][zero1]") {
  const auto dir = test::fresh_dir("resume_world_size_sharded");
  const auto state = dir / "sharded.pt";
  const auto before = train({.processes = 2, .shard = true, .save_to = state, .crash_at = 15});
  for (const auto& rank : before) REQUIRE_THAT(rank.error, Catch::Contains("simulated crash"));
  // The same state, resumed sharded and unsharded on 3 ranks: ZeRO-1 is exact, so the two agree bit for bit.
  const auto sharded = train({.processes = 3, .shard = true, .resume_from = state});
  const auto whole = train({.processes = 3, .resume_from = state});
  std::int64_t sharded_bytes = 0;
  for (std::size_t r = 0; r < 3; ++r) {
    REQUIRE(sharded[r].error == "none");
    REQUIRE(whole[r].error == "none");
    CHECK(torch::equal(sharded[r].weights, whole[r].weights));
    CHECK(sharded[r].optimizer_state_bytes < whole[r].optimizer_state_bytes);  // its own part of the new partition
    sharded_bytes += sharded[r].optimizer_state_bytes;
  }
  CHECK(sharded_bytes == whole[0].optimizer_state_bytes);
  const auto one = train({.processes = 1, .resume_from = state});
  REQUIRE(one[0].error == "none");
  const auto trained_before = joined(before, &RankResult::seen_epoch_2);
  CHECK(each_example_once(counts({&trained_before, &one[0].seen_epoch_2})));
  std::filesystem::remove_all(dir);
}

TEST_CASE("another number of processes needs the same dataset and options, named", "[distributed][resume][world_size]") {
  const auto dir = test::fresh_dir("resume_world_size_mismatch");
  const auto state = dir / "two_ranks.pt";
  train({.processes = 2, .save_to = state, .crash_at = 15});
  auto model = test::linear_model();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  acc::TrainOptions options{.num_epochs = 3, .per_device_batch_size = 4, .seed = 7};
  options.create_scheduler_fn = [](torch::optim::Optimizer& o, const acc::RunConfig&) {
    return std::make_unique<torch::optim::StepLR>(o, 5, 0.5);
  };
  options.resume_from = state;
  const auto fewer = indexed_data();
  const auto error = test::error_or_none([&] {
    trainer.train(std::pair{fewer.first.slice(0, 0, 90), fewer.second.slice(0, 0, 90)}, options);
  });
  CHECK_THAT(error, Catch::Contains("train_dataset size = 90 here but 96 in the saved run"));
  options.per_device_batch_size = 8;
  CHECK_THAT(test::error_or_none([&] { trainer.train(fewer, options); }),
             Catch::Contains("per_device_batch_size = 8 here but 4 in the saved run"));
  options.per_device_batch_size = 4;
  options.max_num_train_steps = 40;
  CHECK_THAT(test::error_or_none([&] { trainer.train(fewer, options); }),
             Catch::Contains("max_num_train_steps counts updates") && Catch::Contains("saved by 2 processes, with 1"));
  options.max_num_train_steps.reset();
  options.drop_last = true;
  CHECK_THAT(test::error_or_none([&] { trainer.train(fewer, options); }),
             Catch::Contains("drop_last = 1 here but 0 in the saved run"));
  std::filesystem::remove_all(dir);
}

namespace {
// A LoopPolicy's own loader: batches in order, and no sampler to say how large the dataset is.
template <class Inner>
struct OpaqueLoader {
  Inner inner;
  std::int64_t size() const { return inner.size(); }
  void set_epoch(std::int64_t epoch) { inner.set_epoch(epoch); }
  auto begin() { return inner.begin(); }
  auto end() { return inner.end(); }
};
struct OpaqueLoop : acc::DefaultLoop {
  template <class Trainer, class Source, class Collate>
  auto create_train_dataloader(Trainer& trainer, Source source, const acc::data::SamplerOptions& options,
                               Collate collate) {
    auto inner = acc::DefaultLoop::create_train_dataloader(trainer, std::move(source), options, std::move(collate));
    return OpaqueLoader<decltype(inner)>{std::move(inner)};
  }
};
}  // namespace

TEST_CASE("a state that does not say where its epoch stands is refused by another number of processes, at the load",
          "[distributed][resume][world_size][bad_input]") {
  const auto dir = test::fresh_dir("resume_world_size_opaque");
  const auto data = indexed_data();
  {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.05);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, OpaqueLoop, SaveThenCrash> single(
        model, torch::nn::MSELoss(), optimizer, SaveThenCrash{dir / "one_process.pt", 5});
    single.set_output(test::quiet());
    CHECK_THAT(test::error_or_none([&] { single.train(data, {.num_epochs = 1, .per_device_batch_size = 4}); }),
               Catch::Contains("simulated crash"));
  }
  const auto results = test::run_ranks(2, [&](int rank, auto store) {
    auto model = test::linear_model(5);
    torch::optim::SGD optimizer(model->parameters(), 0.05);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, OpaqueLoop> trainer(model, torch::nn::MSELoss(),
                                                                                       optimizer);
    acc::DataParallelOptions options;
    options.timeout = 20s;
    trainer.distributed() = acc::DataParallel(store, rank, 2, options);
    const auto before = test::flat_parameters(*model);
    const auto error = test::error_or_none([&] { trainer.load_training_state(dir / "one_process.pt"); });
    return std::pair{error, torch::equal(before, test::flat_parameters(*model))};
  });
  for (const auto& [error, unchanged] : results) {
    CHECK_THAT(error, Catch::Contains("saved by a run of 1 process; this one has 2"));
    CHECK_THAT(error, Catch::Contains("does not say where its epoch stands"));
    CHECK(unchanged);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("an epoch's sampling after its first examples: the rest, padded inside itself, equal batches per rank",
          "[data][world_size]") {
  namespace data = acc::data;
  const std::int64_t size = 50;
  const auto skip = GENERATE(0, 7, 20, 49, 50);
  const auto replicas = GENERATE(1, 3, 4);
  INFO("skip " << skip << ", " << replicas << " replicas");
  const data::EpochSampler whole(size, {.batch_size = 4, .shuffle = true, .seed = 5});
  const auto order = whole.indices(2);
  std::map<std::int64_t, int> count;
  std::vector<std::size_t> sizes;
  for (std::int64_t r = 0; r < replicas; ++r) {
    const data::EpochSampler sampler(size, {.batch_size = 4, .shuffle = true, .seed = 5, .num_replicas = replicas,
                                            .rank = r});
    const auto mine = sampler.indices(2, skip);
    sizes.push_back(mine.size());
    for (const auto i : mine) ++count[i];
  }
  CHECK(std::all_of(sizes.begin(), sizes.end(), [&](auto n) { return n == sizes[0]; }));
  // Exactly the examples after the first `skip` of the epoch's order, each once, but for fewer than `replicas`
  // repeated by the padding.
  int repeats = 0;
  for (std::int64_t i = 0; i < size; ++i) {
    const auto position = std::find(order.begin(), order.end(), i) - order.begin();
    const auto seen = count.count(i) ? count[i] : 0;
    if (position < skip) {
      CHECK(seen == 0);
    } else {
      CHECK(seen >= 1);
      repeats += seen - 1;
    }
  }
  CHECK(repeats < replicas);
  const auto rest = size - skip;
  CHECK(repeats == (rest % replicas == 0 ? 0 : replicas - rest % replicas));
  CHECK_THROWS_WITH(whole.indices(2, size + 1), Catch::Contains("skip = 51 is not in [0, dataset size = 50]"));
}

TEST_CASE("a LibTorch StepLR resumes exactly: the learning rates travel with the training state",
          "[resume][world_size]") {
  // LibTorch 1.13's Optimizer::load restores the state but not the groups' options (2.x's restores them): a rate
  // StepLR had halved came back as the initial one, and a resumed run trained at another rate.
  const auto dir = test::fresh_dir("resume_step_lr");
  const auto processes = GENERATE(1, 3);
  INFO(processes << " processes");
  const auto uninterrupted = train({.processes = processes});
  const std::int64_t crash_at = processes == 1 ? 30 : 12;  // in epoch 2 either way
  train({.processes = processes, .save_to = dir / "state.pt", .crash_at = crash_at});
  const auto resumed = train({.processes = processes, .resume_from = dir / "state.pt"});
  for (std::size_t r = 0; r < resumed.size(); ++r) {
    REQUIRE(resumed[r].error == "none");
    CHECK(resumed[r].lr == uninterrupted[r].lr);
    CHECK(torch::equal(resumed[r].weights, uninterrupted[r].weights));
  }
  if (processes == 1) {
    // A state saved before the entry existed still resumes, with the rates LibTorch's load leaves: on 1.13 the
    // optimizer's own (the run is then not exact), on 2.x the saved ones.
    auto saved = acc::detail::read_archive_file(dir / "state.pt", "test", torch::kCPU);
    torch::serialize::OutputArchive old;
    acc::detail::copy_archive(saved, old, "optimizer_lrs");
    acc::detail::write_archive_file(dir / "old.pt", old);
    const auto from_old = train({.processes = 1, .resume_from = dir / "old.pt"});
    REQUIRE(from_old[0].error == "none");
    if (acc::compat::torch_major >= 2) {
      CHECK(from_old[0].lr == uninterrupted[0].lr);
    } else {
      CHECK(from_old[0].lr != uninterrupted[0].lr);
    }
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("a run resized twice (2, then 3, then 1 process) ends its schedule where a 1-process run does",
          "[distributed][resume][world_size]") {
  const auto dir = test::fresh_dir("resume_world_size_twice");
  const auto before = train({.processes = 2, .save_to = dir / "a.pt", .crash_at = 15, .schedule = Schedule::cosine});
  const auto middle = train({.processes = 3, .resume_from = dir / "a.pt", .save_to = dir / "b.pt", .crash_at = 17,
                             .schedule = Schedule::cosine});
  for (const auto& rank : middle) REQUIRE_THAT(rank.error, Catch::Contains("simulated crash"));
  const auto last = train({.processes = 1, .resume_from = dir / "b.pt", .schedule = Schedule::cosine});
  REQUIRE(last[0].error == "none");
  const auto uninterrupted = train({.processes = 1, .schedule = Schedule::cosine});
  CHECK(last[0].scheduler_count == uninterrupted[0].scheduler_count);
  CHECK(last[0].scheduler_count == 72);
  CHECK(last[0].lr == Approx(uninterrupted[0].lr).epsilon(1e-12));
  const auto a = joined(before, &RankResult::seen_epoch_2);
  const auto b = joined(middle, &RankResult::seen_epoch_2);
  CHECK(each_example_once(counts({&a, &b, &last[0].seen_epoch_2})));
  std::filesystem::remove_all(dir);
}

TEST_CASE("a WSD schedule resumes from a state whose rate decayed below its warm-up start", "[resume][world_size]") {
  // The saved rates are set back once the run's scheduler exists: set at the load, the WSD constructor took the
  // decayed rate (1e-8) for its base and refused its warm-up start (1e-6) as above it.
  const auto dir = test::fresh_dir("resume_wsd");
  const auto first = train({.processes = 1, .save_to = dir / "final.pt", .schedule = Schedule::wsd});
  REQUIRE(first[0].error == "none");
  REQUIRE(first[0].lr < 1e-6);
  const auto extended = train({.processes = 1, .resume_from = dir / "final.pt", .schedule = Schedule::wsd,
                               .num_epochs = 4});
  CHECK(extended[0].error == "none");
  CHECK(extended[0].scheduler_count == 96);
  std::filesystem::remove_all(dir);
}
