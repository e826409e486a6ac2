// Sharded optimizer state (ZeRO stage 1, DataParallelOptions::shard_optimizer_state), ranks as threads: the same
// weights as unsharded data parallel, 1/N of the optimizer state per rank, and saves that write a shard per rank.
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "helpers.hpp"
#include "ranks_as_threads.hpp"

namespace acc = accelerated;
using namespace std::chrono_literals;
using acc::distributed::Transport;

namespace {

torch::nn::Sequential mlp(std::uint64_t seed = 5) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::Tanh(), torch::nn::Linear(16, 16), torch::nn::Tanh(),
                               torch::nn::Linear(16, 1));
}

enum class Kind { sgd, sgd_nesterov, adam, adam_amsgrad, adamw, rmsprop, adagrad };
const char* name_of(Kind kind) {
  static const char* names[] = {"SGD momentum + weight decay", "SGD nesterov", "Adam", "Adam amsgrad", "AdamW",
                                "RMSprop", "Adagrad"};
  return names[static_cast<int>(kind)];
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(Kind kind, const std::vector<torch::Tensor>& parameters) {
  namespace optim = torch::optim;
  switch (kind) {
    case Kind::sgd: return std::make_unique<optim::SGD>(parameters, optim::SGDOptions(0.05).momentum(0.9).weight_decay(1e-3));
    case Kind::sgd_nesterov:
      return std::make_unique<optim::SGD>(parameters, optim::SGDOptions(0.05).momentum(0.9).nesterov(true));
    case Kind::adam: return std::make_unique<optim::Adam>(parameters, optim::AdamOptions(1e-2).weight_decay(1e-3));
    case Kind::adam_amsgrad: return std::make_unique<optim::Adam>(parameters, optim::AdamOptions(1e-2).amsgrad(true));
    case Kind::adamw: return std::make_unique<optim::AdamW>(parameters, optim::AdamWOptions(1e-2));
    case Kind::rmsprop: return std::make_unique<optim::RMSprop>(parameters, optim::RMSpropOptions(1e-3).momentum(0.5));
    case Kind::adagrad: return std::make_unique<optim::Adagrad>(parameters, optim::AdagradOptions(0.05));
  }
  return nullptr;
}

// The state tensors LibTorch keeps for one parameter (none: no state).
std::vector<torch::Tensor> state_of(const torch::optim::Optimizer& optimizer, const torch::Tensor& p) {
  namespace optim = torch::optim;
  const auto& state = optimizer.state();
  const auto found = state.find(acc::distributed::optimizer_state_key(state, p));
  if (found == state.end()) return {};
  const auto* s = found->second.get();
  if (auto* sgd = dynamic_cast<const optim::SGDParamState*>(s)) return {sgd->momentum_buffer()};
  if (auto* adam = dynamic_cast<const optim::AdamParamState*>(s)) {
    return {adam->exp_avg(), adam->exp_avg_sq(), adam->max_exp_avg_sq(), torch::tensor(adam->step())};
  }
  if (auto* adamw = dynamic_cast<const optim::AdamWParamState*>(s)) {
    return {adamw->exp_avg(), adamw->exp_avg_sq(), torch::tensor(adamw->step())};
  }
  if (auto* rms = dynamic_cast<const optim::RMSpropParamState*>(s)) return {rms->square_avg(), rms->momentum_buffer()};
  if (auto* ada = dynamic_cast<const optim::AdagradParamState*>(s)) return {ada->sum(), torch::tensor(ada->step())};
  return {torch::tensor(-1)};
}

bool same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].defined() != b[i].defined()) return false;
    if (a[i].defined() && !torch::equal(a[i], b[i])) return false;
  }
  return true;
}

struct RankResult {
  torch::Tensor weights;
  std::vector<std::vector<torch::Tensor>> state;  // per parameter in param_groups order
  std::vector<std::int64_t> owners;               // empty when unsharded
  std::int64_t state_bytes = 0;
  torch::Tensor grad_norm;
  std::vector<double> losses;
  std::int64_t skipped = -1;  // updates the precision policy skipped, where it counts them
  std::int64_t exchange_bytes = -1;  // the exchange's all-gather buffers; -1 when unsharded
};

struct Case {
  int world = 2;
  Transport transport = Transport::shared_memory;
  Kind kind = Kind::sgd;
  bool shard = false;
  acc::TrainOptions options{.num_epochs = 17, .per_device_batch_size = 4, .seed = 3};
  std::function<void(torch::nn::Sequential&)> adjust = {};  // before the optimizer is made
  bool check_collectives = false;
};

template <class Trainer = acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel>, class... Callbacks>
std::vector<RankResult> train_case(const Case& c, Callbacks... callbacks) {
  const auto data = test::regression_data(48);
  std::vector<torch::nn::Sequential> models;
  for (int r = 0; r < c.world; ++r) models.push_back(mlp(5 + r));  // different inits: the broadcast fixes them
  return test::run_ranks(c.world, [&](int rank, auto store) {
    auto model = models[rank];
    if (c.adjust) c.adjust(model);
    auto optimizer = make_optimizer(c.kind, model->parameters());
    Trainer trainer(model, torch::nn::MSELoss(), *optimizer, callbacks...);
    acc::DataParallelOptions options;
    options.timeout = 30s;
    options.transport = c.transport;
    options.shard_optimizer_state = c.shard;
    options.check_collectives = c.check_collectives;
    options.shard_exchange_bucket_bytes = 40;  // several all-gathers per exchange, segments split across them
    trainer.distributed() = acc::DataParallel(store, rank, c.world, options);
    trainer.set_output(test::quiet());
    trainer.train(data, c.options);
    RankResult result;
    result.weights = test::flat_parameters(*model);
    for (const auto& p : acc::distributed::optimizer_parameters(*optimizer)) result.state.push_back(state_of(*optimizer, p));
    if (const auto* shard = trainer.distributed().optimizer_shard()) {
      result.owners = shard->owners();
      result.exchange_bytes = shard->exchange_buffer_bytes();
    }
    result.state_bytes = acc::distributed::optimizer_state_bytes(*optimizer);
    result.grad_norm = trainer.state().grad_norm;
    result.losses = trainer.run_history().get_metric_values("train_loss_epoch");
    if constexpr (requires { trainer.precision().skipped; }) result.skipped = trainer.precision().skipped;
    return result;
  });
}

// Makes `trainer` rank `rank` of 2 over `store`, sharded or not, quiet.
template <class Trainer>
void two_ranks(Trainer& trainer, c10::intrusive_ptr<c10d::Store> store, int rank, bool shard,
               std::chrono::milliseconds timeout) {
  acc::DataParallelOptions options;
  options.timeout = timeout;
  options.shard_optimizer_state = shard;
  trainer.distributed() = acc::DataParallel(store, rank, 2, options);
  trainer.set_output(test::quiet());
}

// Sharded against unsharded: every rank's weights bit-equal; each parameter's state held by its owner alone, equal to
// the unsharded state.
void check_equal_to_unsharded(const std::vector<RankResult>& plain, const std::vector<RankResult>& sharded) {
  REQUIRE(plain.size() == sharded.size());
  for (std::size_t r = 0; r < sharded.size(); ++r) {
    INFO("rank " << r);
    CHECK(torch::equal(plain[r].weights, plain[0].weights));  // frozen parameters are rank 0's too
    CHECK(torch::equal(sharded[r].weights, plain[0].weights));
    CHECK((torch::abs(sharded[r].weights - plain[0].weights).max().item<double>() <= 1e-6));
    CHECK(sharded[r].losses == plain[0].losses);
    REQUIRE(sharded[r].owners.size() == plain[0].state.size());
    for (std::size_t i = 0; i < plain[0].state.size(); ++i) {
      INFO("parameter " << i << ", owner " << sharded[r].owners[i]);
      if (sharded[r].owners[i] == static_cast<std::int64_t>(r)) {
        CHECK(same(sharded[r].state[i], plain[r].state[i]));
      } else {
        CHECK(sharded[r].state[i].empty());
      }
    }
  }
}

// Loads the checkpoint `file` (score 0.75) into a fresh model and Adam in one process: the weights are `weights`, and
// every parameter's state equals unsharded training's.
void check_loads_whole(const std::filesystem::path& file, const torch::Tensor& weights, const RankResult& plain) {
  auto model = mlp(9);
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2).weight_decay(1e-3));
  const auto values = acc::load_checkpoint(file, *model, &optimizer);
  CHECK(values.at("score") == 0.75);
  CHECK(torch::equal(test::flat_parameters(*model), weights));
  const auto parameters = acc::distributed::optimizer_parameters(optimizer);
  REQUIRE(parameters.size() == plain.state.size());
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    INFO("parameter " << i);
    CHECK(same(state_of(optimizer, parameters[i]), plain.state[i]));
  }
}

}  // namespace

TEST_CASE("sharded optimizer state ends bit-identical to unsharded data parallel (SGD, Adam, AdamW, RMSprop, "
          "Adagrad) on 2 and 3 ranks",
          "[zero1][distributed]") {
  const auto kind = GENERATE(Kind::sgd, Kind::sgd_nesterov, Kind::adam, Kind::adam_amsgrad, Kind::adamw, Kind::rmsprop,
                             Kind::adagrad);
  const int world = GENERATE(2, 3);
  const auto transport = GENERATE(Transport::shared_memory, Transport::gloo);
  INFO(name_of(kind) << ", " << world << " ranks, " << (transport == Transport::gloo ? "gloo" : "shared memory"));
  Case c{.world = world, .transport = transport, .kind = kind};
  c.options.num_epochs = world == 2 ? 17 : 25;  // 6 or 4 updates an epoch: 100 updates
  const auto plain = train_case(c);
  c.shard = true;
  const auto sharded = train_case(c);
  check_equal_to_unsharded(plain, sharded);
  // Every parameter has one owner, and every rank owns some.
  for (int r = 0; r < world; ++r) {
    CHECK(std::count(sharded[0].owners.begin(), sharded[0].owners.end(), r) > 0);
    CHECK(sharded[r].owners == sharded[0].owners);
    // Over Gloo the parameters travel as messages, with no buffers; over shared memory in bucketed all-gathers.
    CHECK((sharded[r].exchange_bytes == 0) == (transport == Transport::gloo));
  }
}

TEST_CASE("over Gloo the exchange sends each owned parameter from its memory and receives the others into theirs",
          "[zero1]") {
  for (const std::int64_t rank : {0, 1}) {
    INFO("rank " << rank << " of 2");
    auto model = mlp(5);
    auto& transposed = model[2]->as<torch::nn::Linear>()->weight;  // owned by rank 1
    transposed.set_data(transposed.detach().t().contiguous().t());  // not row-major: sent and received through a copy
    torch::optim::SGD optimizer(model->parameters(), 0.1);
    acc::distributed::OptimizerShard shard(optimizer, rank, 2, 1 << 20);
    const auto parameters = acc::distributed::optimizer_parameters(optimizer);
    std::map<std::int64_t, const void*> sent, received;  // by tag (the parameter's index): the memory used
    shard.exchange_by_messages(
        [&](torch::Tensor& t, std::int64_t peer, std::int64_t tag) {
          CHECK(peer == 1 - rank);
          CHECK(torch::equal(t, parameters[static_cast<std::size_t>(tag)]));
          sent[tag] = t.data_ptr();
          return 0;
        },
        [&](torch::Tensor& t, std::int64_t peer, std::int64_t tag) {
          CHECK(peer == 1 - rank);
          received[tag] = t.data_ptr();
          t.fill_(static_cast<float>(tag));  // what the owner sent
          return 0;
        },
        [](int) {});
    for (std::size_t i = 0; i < parameters.size(); ++i) {
      INFO("parameter " << i);
      const auto& p = parameters[i];
      const auto tag = static_cast<std::int64_t>(i);
      const bool row_major = p.is_contiguous();
      CHECK(row_major == !p.is_same(transposed));
      if (shard.owns(i)) {
        REQUIRE(sent.count(tag) == 1);
        CHECK((sent[tag] == p.data_ptr()) == row_major);  // no copy unless the layout needs one
        CHECK(received.count(tag) == 0);
      } else {
        REQUIRE(received.count(tag) == 1);
        CHECK((received[tag] == p.data_ptr()) == row_major);
        CHECK(torch::all(p == static_cast<float>(tag)).item<bool>());  // a copy is written back
        CHECK(sent.count(tag) == 0);
      }
    }
    CHECK(shard.exchange_buffer_bytes() == 0);  // no all-gather buffers were made
  }
}

TEST_CASE("each rank holds about 1/N of the optimizer state", "[zero1][distributed]") {
  const int world = GENERATE(2, 3);
  Case c{.world = world, .kind = Kind::adam};
  c.options.num_epochs = 2;
  const auto plain = train_case(c);
  c.shard = true;
  const auto sharded = train_case(c);
  std::int64_t sum = 0, largest_parameter = 16 * 16 * 3 * 4;  // Adam: 3 buffers of the 16x16 weight, in floats
  for (const auto& r : sharded) {
    sum += r.state_bytes;
    CHECK(r.state_bytes <= plain[0].state_bytes / world + largest_parameter);
    CHECK(r.state_bytes > 0);
  }
  CHECK(sum == plain[0].state_bytes);
}

TEST_CASE("sharding agrees with unsharded training under clipping, accumulation, a frozen layer, a transposed weight "
          "and checked collectives, over shared memory and Gloo",
          "[zero1][distributed]") {
  Case c{.kind = Kind::adam};
  c.options.num_epochs = 4;
  c.options.gradient_accumulation_steps = 2;
  c.options.gradient_clip_norm = 0.05;  // small enough to clip: the norm covers every rank's parameters
  c.adjust = [](torch::nn::Sequential& model) {
    for (auto& p : model[0]->parameters()) p.set_requires_grad(false);
    // A weight that is not row-major (a transposed layout): sent and received through a row-major copy.
    auto& weight = model[2]->as<torch::nn::Linear>()->weight;
    weight.set_data(weight.detach().t().contiguous().t());
    // (Checked by throwing: this runs on the ranks' threads, where Catch2's assertions race; run_ranks rethrows.)
    if (weight.is_contiguous()) throw std::logic_error("the transposed weight is row-major after all");
  };
  c.check_collectives = GENERATE(false, true);
  c.transport = GENERATE(Transport::shared_memory, Transport::gloo);
  INFO((c.transport == Transport::gloo ? "gloo" : "shared memory") << (c.check_collectives ? ", checked" : ""));
  const auto plain = train_case(c);
  c.shard = true;
  const auto sharded = train_case(c);
  check_equal_to_unsharded(plain, sharded);
  CHECK(torch::equal(sharded[0].grad_norm, plain[0].grad_norm));
  CHECK(torch::equal(sharded[1].grad_norm, plain[1].grad_norm));
}

namespace {
// A precision policy that skips an update, deciding in unscale_gradients as the loss scaler decides on an overflow,
// from the gradient of the last parameter (its sign), which rank 1 owns: were the decision made inside the step,
// rank 0 would not see that gradient and would step.
struct SkipOnGradientSign : acc::FullPrecision {
  bool found = false, checked = false;
  std::int64_t skipped = 0;
  void unscale_gradients(torch::optim::Optimizer& optimizer) {
    if (checked) return;
    checked = true;
    const auto& last = optimizer.param_groups().back().params().back();
    found = last.grad().defined() && last.grad().sum().item<double>() > 0;
  }
  void step(torch::optim::Optimizer& optimizer) {
    unscale_gradients(optimizer);
    checked = false;
    if (found) {
      ++skipped;
    } else {
      optimizer.step();
    }
  }
  bool step_was_skipped() const { return found; }
};
}  // namespace

TEST_CASE("an update the precision policy skips for a gradient another rank owns is skipped on every rank",
          "[zero1][distributed]") {
  Case c{.kind = Kind::sgd};
  c.options.num_epochs = 6;
  using Trainer = acc::Trainer<acc::Cpu, SkipOnGradientSign, acc::DataParallel>;
  const auto plain = train_case<Trainer>(c);
  c.shard = true;
  const auto sharded = train_case<Trainer>(c);
  check_equal_to_unsharded(plain, sharded);
  for (const auto& r : sharded) {
    CHECK(r.skipped == plain[0].skipped);
    CHECK(r.skipped > 0);
    CHECK(r.skipped < 30);  // of 36 updates
  }
}

TEST_CASE("Adagrad's state is pruned to the owned parameters; LBFGS is refused by name", "[zero1][distributed]") {
  const auto data = test::regression_data(16);
  std::vector<torch::nn::Sequential> models{mlp(), mlp()};
  auto counts = test::run_ranks(2, [&](int rank, auto store) {
    auto model = models[rank];
    torch::optim::Adagrad optimizer(model->parameters(), torch::optim::AdagradOptions(0.05));
    const auto before = optimizer.state().size();
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    two_ranks(trainer, store, rank, true, 30s);
    trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4});
    return std::pair{before, optimizer.state().size()};
  });
  CHECK(counts[0].first == 6);
  CHECK(counts[0].second + counts[1].second == 6);
  CHECK(counts[0].second > 0);
  CHECK(counts[1].second > 0);

  auto errors = test::run_ranks(2, [&](int rank, auto store) -> std::string {
    auto model = models[rank];
    torch::optim::LBFGS optimizer(model->parameters(), torch::optim::LBFGSOptions(0.1));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    two_ranks(trainer, store, rank, true, 30s);
    try {
      trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4});
    } catch (const std::invalid_argument& error) {
      return error.what();
    }
    return "no error";
  });
  for (const auto& error : errors) CHECK_THAT(error, Catch::Contains("shard_optimizer_state cannot shard torch::optim::LBFGS"));
}

TEST_CASE("ACCELERATED_SHARD_OPTIMIZER turns sharding on; a bad value is named", "[zero1][environment]") {
  ::setenv("ACCELERATED_SHARD_OPTIMIZER", "1", 1);
  CHECK(acc::DataParallelOptions{}.shard_optimizer_state);
  ::setenv("ACCELERATED_SHARD_OPTIMIZER", "maybe", 1);
  CHECK_THROWS_WITH(acc::DataParallelOptions{}, Catch::Contains("ACCELERATED_SHARD_OPTIMIZER = 'maybe'"));
  ::unsetenv("ACCELERATED_SHARD_OPTIMIZER");
  CHECK_FALSE(acc::DataParallelOptions{}.shard_optimizer_state);
}

TEST_CASE("the partition is contiguous and balanced by element count, frozen parameters included", "[zero1]") {
  std::vector<torch::Tensor> parameters;
  for (int n : {100, 100, 10, 100, 100, 100}) parameters.push_back(torch::zeros({n}, torch::requires_grad()));
  parameters.push_back(torch::zeros({100}));  // frozen: it may be unfrozen later, and then needs its state somewhere
  const auto owners = acc::distributed::partition_parameters(parameters, 2);
  CHECK(owners == std::vector<std::int64_t>{0, 0, 0, 0, 1, 1, 1});
  CHECK(acc::distributed::partition_parameters(parameters, 1) == std::vector<std::int64_t>(7, 0));
  const auto three = acc::distributed::partition_parameters(parameters, 3);
  CHECK(std::is_sorted(three.begin(), three.end()));
  CHECK(three.back() == 2);
}

namespace {
namespace cb = accelerated::callbacks;
namespace fs = std::filesystem;

// Stops every rank (by throwing) once the run reaches update `at` (0: never).
struct CrashAt {
  std::int64_t at = 0;
  template <class Trainer>
  void operator()(acc::on_update_step_end, Trainer& trainer) {
    if (trainer.state().update_step == at) throw std::runtime_error("simulated crash");
  }
};

using SavingTrainer =
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, cb::SaveTrainingState, CrashAt>;

// Two ranks with Adam, sharded or not, saving every 3 updates (keeping 2) in `dir`, resuming from its latest state
// if there is one; crashing at update `crash_at`. Returns each rank's weights and optimizer state.
// With `newest_in`, resumes through TrainOptions::resume_from_newest_in instead.
std::vector<RankResult> saving_run(const fs::path& dir, bool shard, std::int64_t crash_at, bool asynchronous = false,
                                   bool newest_in = false) {
  const auto data = test::regression_data(48);
  std::vector<torch::nn::Sequential> models{mlp(5), mlp(6)};
  const auto latest = newest_in ? std::nullopt : cb::SaveTrainingState::latest(dir);
  return test::run_ranks(2, [&](int rank, auto store) {
    auto model = models[rank];
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
    SavingTrainer trainer(model, torch::nn::MSELoss(), optimizer,
                          cb::SaveTrainingState({.save_dir = dir, .save_every_n_steps = 3, .max_checkpoints = 2,
                                                 .asynchronous = asynchronous}),
                          CrashAt{crash_at});
    two_ranks(trainer, store, rank, shard, 30s);
    RankResult result;
    try {
      acc::TrainOptions options{.num_epochs = 4, .per_device_batch_size = 4, .seed = 3, .resume_from = latest};
      if (newest_in) options.resume_from_newest_in = dir;
      trainer.train(data, options);
    } catch (const std::runtime_error&) {
      result.skipped = 1;  // crashed
    }
    result.weights = test::flat_parameters(*model);
    for (const auto& p : acc::distributed::optimizer_parameters(optimizer)) result.state.push_back(state_of(optimizer, p));
    if (const auto* s = trainer.distributed().optimizer_shard()) result.owners = s->owners();
    return result;
  });
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}
}  // namespace

TEST_CASE("a sharded run saves a shard per rank beside each state, rotates them together, and resumes bit-identical",
          "[zero1][resume]") {
  const auto base = test::fresh_dir("zero1_resume");
  const bool asynchronous = GENERATE(false, true);  // a sharded state is written at once either way
  const auto reference = saving_run(base / "uninterrupted", true, 0, asynchronous);
  const auto plain = saving_run(base / "plain", false, 0);
  check_equal_to_unsharded(plain, reference);

  // Each state (step_21, step_24, final) has exactly its two shards, of one nonce; rotation took the others'.
  const auto names = names_in(base / "uninterrupted");
  for (const auto& state : {"final.pt", "step_21.pt", "step_24.pt"}) {
    INFO(state);
    const auto shards = acc::detail::shard_files(base / "uninterrupted" / state);
    REQUIRE(shards.size() == 2);
    const auto a = shards[0].filename().string(), b = shards[1].filename().string();
    CHECK(a.substr(0, a.find(".shard-")) == b.substr(0, b.find(".shard-")));  // one nonce
  }
  CHECK(names.size() == 3 + 6 + 1);  // final, step_21, step_24, their shards, latest

  // Crashed at update 14 (the last save at 12), resumed: bit-identical to the uninterrupted run, state included.
  const auto crashed = saving_run(base / "crashed", true, 14, asynchronous);
  CHECK(crashed[0].skipped == 1);
  const auto resumed = saving_run(base / "crashed", true, 0, asynchronous);
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r);
    CHECK(torch::equal(resumed[r].weights, reference[r].weights));
    for (std::size_t i = 0; i < reference[r].state.size(); ++i) CHECK(same(resumed[r].state[i], reference[r].state[i]));
  }

  // final.pt without one of its shards: resume_from_newest_in passes over it to step_24.pt (the same update), and
  // ends where the run ended.
  fs::remove(acc::detail::shard_files(base / "uninterrupted" / "final.pt").at(1));
  const auto passed_over = saving_run(base / "uninterrupted", true, 0, false, /*newest_in=*/true);
  for (int r = 0; r < 2; ++r) CHECK(torch::equal(passed_over[r].weights, reference[r].weights));
  fs::remove_all(base);
}

TEST_CASE("a sharded checkpoint loads in one process and in unsharded ranks with every parameter's state",
          "[zero1][checkpoint]") {
  const auto base = test::fresh_dir("zero1_checkpoint");
  const auto data = test::regression_data(48);
  std::vector<torch::nn::Sequential> models{mlp(5), mlp(6)};
  // The unsharded run's full state, and the sharded run's checkpoint.
  const auto plain = train_case(Case{.kind = Kind::adam});
  auto saved = test::run_ranks(2, [&](int rank, auto store) {
    auto model = models[rank];
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2).weight_decay(1e-3));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    two_ranks(trainer, store, rank, true, 30s);
    trainer.train(data, {.num_epochs = 17, .per_device_batch_size = 4, .seed = 3});
    trainer.save_checkpoint(base / "model.pt", {{"score", 0.5}});
    trainer.save_checkpoint(base / "model.pt", {{"score", 0.75}});  // replaced: the first save's shards go
    return test::flat_parameters(*model);
  });
  CHECK(acc::detail::shard_files(base / "model.pt").size() == 2);

  // One process, no DataParallel: the whole state.
  check_loads_whole(base / "model.pt", saved[0], plain[0]);

  // Two unsharded ranks: each loads the whole state.
  auto loaded = test::run_ranks(2, [&](int rank, auto store) {
    auto model = mlp(11 + rank);
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2).weight_decay(1e-3));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    two_ranks(trainer, store, rank, false, 30s);
    trainer.load_checkpoint(base / "model.pt");
    std::vector<std::vector<torch::Tensor>> state;
    for (const auto& p : acc::distributed::optimizer_parameters(optimizer)) state.push_back(state_of(optimizer, p));
    return state;
  });
  for (const auto& state : loaded) {
    for (std::size_t i = 0; i < state.size(); ++i) CHECK(same(state[i], plain[0].state[i]));
  }

  // A missing shard is a clear error naming it; nothing is loaded.
  const auto shards = acc::detail::shard_files(base / "model.pt");
  fs::rename(shards[1], base / "aside");
  auto other = mlp(10);
  torch::optim::Adam other_optimizer(other->parameters(), torch::optim::AdamOptions(1e-2));
  const auto before = test::flat_parameters(*other);
  CHECK_THROWS_WITH(acc::load_checkpoint(base / "model.pt", *other, &other_optimizer),
                    Catch::Contains(shards[1].string()) && Catch::Contains("does not exist"));
  CHECK(torch::equal(test::flat_parameters(*other), before));
  CHECK(other_optimizer.state().empty());
  fs::remove_all(base);
}

TEST_CASE("a save that fails on rank 0 fails on every rank, sharded or not, and leaves the previous files", 
          "[zero1][checkpoint][faults]") {
  const auto base = test::fresh_dir("zero1_failed_save");
  const bool shard = GENERATE(false, true);
  const auto data = test::regression_data(16);
  std::vector<torch::nn::Sequential> models{mlp(5), mlp(6)};
  auto outcomes = test::run_ranks(2, [&](int rank, auto store) -> std::string {
    auto model = models[rank];
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    two_ranks(trainer, store, rank, shard, 20s);
    trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4});
    trainer.save_training_state(base / "good.pt");
    if (rank == 0) fs::create_directories(base / "bad.pt" / "in_the_way");  // the main file cannot be written
    trainer.distributed().barrier();
    try {
      trainer.save_training_state(base / "bad.pt");
    } catch (const std::exception& error) {
      return error.what();
    }
    return "saved";
  });
  CHECK(outcomes[0] != "saved");
  CHECK_THAT(outcomes[1], Catch::Contains("failed on rank 0") && Catch::Contains("bad.pt"));
  CHECK(acc::detail::shard_files(base / "bad.pt").empty());  // the new shards were taken back
  CHECK(acc::detail::shard_files(base / "good.pt").size() == (shard ? 2u : 0u));
  fs::remove_all(base);
}

namespace {
// Unfreezes the first layer at the start of epoch 2 (a ModelFreezer's unfreeze, by hand).
struct UnfreezeFirstLayerAtEpoch2 {
  template <class Trainer>
  void operator()(acc::on_train_epoch_start, Trainer& trainer) {
    if (trainer.run_history().current_epoch() != 2) return;
    for (auto& p : trainer.model()->children()[0]->parameters()) p.set_requires_grad(true);
  }
};
}  // namespace

TEST_CASE("a layer unfrozen mid-run trains as unsharded, its state spread over the ranks", "[zero1][distributed]") {
  Case c{.kind = Kind::adam};
  c.options.num_epochs = 4;
  c.adjust = [](torch::nn::Sequential& model) {
    for (auto& p : model[0]->parameters()) p.set_requires_grad(false);
  };
  using Trainer = acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop,
                               UnfreezeFirstLayerAtEpoch2>;
  const auto plain = train_case<Trainer>(c, UnfreezeFirstLayerAtEpoch2{});
  c.shard = true;
  const auto sharded = train_case<Trainer>(c, UnfreezeFirstLayerAtEpoch2{});
  check_equal_to_unsharded(plain, sharded);
  CHECK_FALSE(plain[0].state[0].empty());  // the unfrozen layer trained, with state
  // The frozen layer counted in the partition (144 of 433 elements): rank 0 owns it alone, and the 16 x 16 layer went
  // to rank 1; had only the trainable layers counted, rank 0 would own both.
  CHECK(sharded[0].owners == std::vector<std::int64_t>{0, 0, 1, 1, 1, 1});
  CHECK(sharded[1].state_bytes > sharded[0].state_bytes);
}

TEST_CASE("parameters added to the optimizer between runs keep the others' owners and state", "[zero1][distributed]") {
  const auto data = test::regression_data(48);
  auto run = [&](bool shard) {
    std::vector<torch::nn::Sequential> models{mlp(5), mlp(6)};
    return test::run_ranks(2, [&](int rank, auto store) {
      auto model = models[rank];
      std::vector<torch::Tensor> head;  // layers 1 and 2 first; layer 0 joins for the second run
      for (std::size_t i = 1; i < model->size(); ++i) {
        for (const auto& p : model[i]->parameters()) head.push_back(p);
      }
      torch::optim::Adam optimizer(head, torch::optim::AdamOptions(1e-2));
      acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
      two_ranks(trainer, store, rank, shard, 30s);
      for (auto& p : model[0]->parameters()) p.set_requires_grad(false);
      trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 4, .seed = 3});
      const auto owners_before = shard ? trainer.distributed().optimizer_shard()->owners() : std::vector<std::int64_t>{};
      for (auto& p : model[0]->parameters()) p.set_requires_grad(true);
      optimizer.add_param_group(torch::optim::OptimizerParamGroup(model[0]->parameters()));
      trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 4, .seed = 4});
      RankResult result;
      result.weights = test::flat_parameters(*model);
      for (const auto& p : acc::distributed::optimizer_parameters(optimizer)) result.state.push_back(state_of(optimizer, p));
      if (shard) {
        result.owners = trainer.distributed().optimizer_shard()->owners();
        // (A throw, not CHECK: this runs on the ranks' threads, where Catch2's assertions race; run_ranks rethrows.)
        if (result.owners.size() == owners_before.size()) throw std::logic_error("no parameter was added to the partition");
        const bool kept = std::equal(owners_before.begin(), owners_before.end(), result.owners.begin());
        result.skipped = kept ? 1 : 0;
      }
      return result;
    });
  };
  const auto plain = run(false);
  const auto sharded = run(true);
  check_equal_to_unsharded(plain, sharded);
  CHECK(sharded[0].skipped == 1);  // the first run's parameters kept their owners
}

namespace {
// An optimizer whose save fails: a rank that cannot write its shard.
struct FailingSaveSgd : torch::optim::SGD {
  using SGD::SGD;
  void save(torch::serialize::OutputArchive&) const override { throw std::runtime_error("disk full (simulated)"); }
};
}  // namespace

TEST_CASE("a shard that one rank cannot write fails the save on every rank, and nothing of it is left",
          "[zero1][checkpoint][faults]") {
  const auto base = test::fresh_dir("zero1_failed_shard");
  auto errors = test::run_ranks(2, [&](int rank, auto store) -> std::string {
    auto model = mlp();
    std::unique_ptr<torch::optim::Optimizer> optimizer;
    if (rank == 1) {
      optimizer = std::make_unique<FailingSaveSgd>(model->parameters(), torch::optim::SGDOptions(0.1));
    } else {
      optimizer = std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    }
    acc::DataParallelOptions options;
    options.timeout = 20s;
    acc::DataParallel parallel(store, rank, 2, options);
    parallel.join();
    try {
      acc::detail::save_with_shards(parallel, optimizer.get(), "torch::optim::SGD", base / "state.pt", "the save",
                                    [&](const acc::detail::ShardManifest*) { acc::save_checkpoint(base / "state.pt", *model); });
    } catch (const std::exception& error) {
      return error.what();
    }
    return "saved";
  });
  CHECK_THAT(errors[0], Catch::Contains("the save (each rank's optimizer shard) failed on rank 1"));
  CHECK_THAT(errors[1], Catch::Contains("disk full (simulated)"));
  CHECK(acc::detail::shard_files(base / "state.pt").empty());  // rank 0's shard was taken back
  CHECK_FALSE(fs::exists(base / "state.pt"));                 // and the main file never written
  fs::remove_all(base);
}

TEST_CASE("a follow-up that fails after a sharded save is an error on every rank; the save stays whole",
          "[zero1][async_save][faults]") {
  const auto base = test::fresh_dir("zero1_follow_up");
  const auto data = test::regression_data(16);
  std::vector<torch::nn::Sequential> models{mlp(5), mlp(6)};
  auto errors = test::run_ranks(2, [&](int rank, auto store) -> std::string {
    auto model = models[rank];
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    two_ranks(trainer, store, rank, true, 20s);
    trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4});
    try {
      trainer.save_training_state_async(base / "state.pt", {}, [] { throw std::runtime_error("latest not moved"); });
    } catch (const std::exception& error) {
      return error.what();
    }
    return "saved";
  });
  CHECK_THAT(errors[0], Catch::Contains("latest not moved"));
  CHECK_THAT(errors[1], Catch::Contains("what follows the write failed on rank 0") &&
                            Catch::Contains("the file and its shards were written"));
  CHECK(fs::exists(base / "state.pt"));
  CHECK(acc::detail::shard_files(base / "state.pt").size() == 2);
  fs::remove_all(base);
}

TEST_CASE("consolidate_optimizer_shards writes one file that loads without its shards, with every parameter's state",
          "[zero1][checkpoint]") {
  const auto base = test::fresh_dir("zero1_consolidate");
  const auto data = test::regression_data(48);
  std::vector<torch::nn::Sequential> models{mlp(5), mlp(6)};
  const auto plain = train_case(Case{.kind = Kind::adam});
  const auto saved = test::run_ranks(2, [&](int rank, auto store) {
    auto model = models[rank];
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2).weight_decay(1e-3));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    two_ranks(trainer, store, rank, true, 30s);
    trainer.train(data, {.num_epochs = 17, .per_device_batch_size = 4, .seed = 3});
    trainer.save_checkpoint(base / "model.pt", {{"score", 0.75}});
    trainer.save_training_state(base / "state.pt");
    return test::flat_parameters(*model);
  });
  REQUIRE(acc::detail::shard_files(base / "model.pt").size() == 2);

  // A missing shard is named, and nothing is written.
  const auto shards = acc::detail::shard_files(base / "model.pt");
  fs::rename(shards[1], base / "aside");
  CHECK_THROWS_WITH(acc::consolidate_optimizer_shards(base / "model.pt", base / "whole.pt"),
                    Catch::Contains(shards[1].string()) && Catch::Contains("does not exist"));
  CHECK_FALSE(fs::exists(base / "whole.pt"));
  fs::rename(base / "aside", shards[1]);

  acc::consolidate_optimizer_shards(base / "model.pt", base / "whole.pt");
  for (const auto& shard : shards) fs::remove(shard);  // the consolidated file needs none of them
  check_loads_whole(base / "whole.pt", saved[0], plain[0]);
  // A file that is not sharded is written as it is, and consolidating in place works.
  acc::consolidate_optimizer_shards(base / "whole.pt", base / "again.pt");
  auto again = mlp(10);
  torch::optim::Adam again_optimizer(again->parameters(), torch::optim::AdamOptions(1e-2));
  acc::load_checkpoint(base / "again.pt", *again, &again_optimizer);
  CHECK(torch::equal(test::flat_parameters(*again), saved[0]));

  // A training state, consolidated in place, resumes in one process without its shards.
  const auto state_shards = acc::detail::shard_files(base / "state.pt");
  acc::consolidate_optimizer_shards(base / "state.pt", base / "state.pt");
  for (const auto& shard : state_shards) fs::remove(shard);
  auto resumed = mlp(12);
  torch::optim::Adam resumed_optimizer(resumed->parameters(), torch::optim::AdamOptions(1e-2).weight_decay(1e-3));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> single(resumed, torch::nn::MSELoss(),
                                                                         resumed_optimizer);
  single.set_output(test::quiet());
  single.load_training_state(base / "state.pt");
  const auto parameters = acc::distributed::optimizer_parameters(resumed_optimizer);
  REQUIRE(parameters.size() == plain[0].state.size());
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    CHECK(same(state_of(resumed_optimizer, parameters[i]), plain[0].state[i]));
  }
  fs::remove_all(base);
}
