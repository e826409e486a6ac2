#include <algorithm>
#include <optional>
#include <sched.h>

#include <bit>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "helpers.hpp"

using accelerated::RunHistory;
namespace fs = std::filesystem;

TEST_CASE("run history records and reads and resets metrics", "[run_history]") {
  RunHistory history;
  CHECK(history.current_epoch() == 1);
  history.update_metric("train_loss_epoch", 0.5);
  history.update_metric("train_loss_epoch", 0.25);
  CHECK(history.get_metric_values("train_loss_epoch") == std::vector<double>{0.5, 0.25});
  CHECK(history.get_latest_metric("train_loss_epoch") == 0.25);
  CHECK(history.get_metric_names() == std::vector<std::string>{"train_loss_epoch"});

  history.set_metric_name_prefix("ema_");
  history.update_metric("eval_loss_epoch", 1.0);
  CHECK(history.has_metric("ema_eval_loss_epoch"));
  CHECK_FALSE(history.has_metric("eval_loss_epoch"));
  CHECK(history.metric_name_prefix() == "ema_");

  history.increment_epoch();
  CHECK(history.current_epoch() == 2);
  CHECK(history.latest_json() == R"({"ema_eval_loss_epoch":1,"train_loss_epoch":0.25})");
  CHECK(history.to_json() == R"({"ema_eval_loss_epoch":[1],"train_loss_epoch":[0.5,0.25]})");

  history.delete_metric("ema_eval_loss_epoch");
  CHECK_FALSE(history.has_metric("ema_eval_loss_epoch"));
  history.reset();
  CHECK(history.current_epoch() == 1);
  CHECK(history.get_metric_names().empty());
  CHECK(history.metric_name_prefix() == "ema_");  // the prefix survives reset, as in the original
}

TEST_CASE("an unknown metric name is a clear error that lists the known ones", "[run_history]") {
  RunHistory history;
  history.update_metric("train_loss_epoch", 1.0);
  const auto message = test::message_of([&] { (void)history.get_latest_metric("eval_accuracy"); });
  CHECK_THAT(message, Catch::Contains("no metric named 'eval_accuracy'"));
  CHECK_THAT(message, Catch::Contains("train_loss_epoch"));
  CHECK_THROWS_AS(history.get_metric_values("nope"), std::invalid_argument);
  CHECK_FALSE(history.has_metric("nope"));  // reading did not create an entry
}

TEST_CASE("JSON output writes non-finite values as null", "[run_history]") {
  RunHistory history;
  history.update_metric("x", std::nan(""));
  CHECK(history.latest_json() == R"({"x":null})");
}

TEST_CASE("run config serialises every field", "[run_config]") {
  accelerated::RunConfig config;
  config.num_epochs = 3;
  config.gradient_clip_norm = 1.5;
  const auto json = config.to_json();
  CHECK_THAT(json, Catch::Contains(R"("num_epochs":3)"));
  CHECK_THAT(json, Catch::Contains(R"("gradient_clip_value":null)"));
  CHECK_THAT(json, Catch::Contains(R"("gradient_clip_norm":1.5)"));
  CHECK_THAT(json, Catch::Contains(R"("device":"cpu")"));
  CHECK_THAT(json, Catch::Contains(R"("mixed_precision":"no")"));
}

namespace {
// The program's first trainer, which applies the process-wide defaults (allocator tuning, thread count) when built.
void build_first_trainer() {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
}

// The count the trainer's default gives this process (its share of the CPUs it may use).
int default_thread_count() {
  return std::max(1, accelerated::detail::available_cpus() / std::max(1, accelerated::distributed::local_processes_or_one()));
}
}  // namespace

// Run in a child process of its own, so that no earlier test case has built a trainer yet.
TEST_CASE("allocator tuning (child)", "[.allocator_child]") {
  REQUIRE_FALSE(accelerated::detail::allocator_tuning_done());  // including the headers changed nothing
  build_first_trainer();
  REQUIRE(accelerated::detail::allocator_tuning_done());
#if defined(__GLIBC__)
  REQUIRE(accelerated::allocator_tuning().applied);
#else
  REQUIRE_FALSE(accelerated::allocator_tuning().applied);
#endif
}

TEST_CASE("the allocator is tuned when the first trainer is built, not at start-up", "[performance]") {
  const int status = test::wait_for(test::spawn_self("[.allocator_child]", {}));
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
}

// Each in a child process of its own, where no trainer was built yet.
TEST_CASE("thread default (child: affinity)", "[.threads_affinity_child]") {
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(0, &one);
  REQUIRE(::sched_setaffinity(0, sizeof one, &one) == 0);  // as `taskset -c 0` would
  build_first_trainer();
  REQUIRE(at::get_num_threads() == 1);
}

TEST_CASE("thread default (child: the user chose)", "[.threads_user_child]") {
  // Neither LibTorch's starting count (a call asking for it cannot be told from no call) nor the default.
  const int n = std::max(default_thread_count(), accelerated::detail::initial_num_threads) + 1;
  at::set_num_threads(n);
  build_first_trainer();
  REQUIRE(at::get_num_threads() == n);
}

TEST_CASE("thread default (child: ACCELERATED_NUM_THREADS=n)", "[.threads_env_child]") {
  const int n = std::stoi(std::getenv("ACCELERATED_NUM_THREADS"));  // neither LibTorch's count nor the default
  build_first_trainer();
  REQUIRE(at::get_num_threads() == n);
  int later = 0;  // a thread the program starts afterwards (a rank's, a sweep's) gets the count too
  std::thread([&] { later = at::get_num_threads(); }).join();
  REQUIRE(later == n);
}

// The documented limit: a call that asks for the count LibTorch started with cannot be told from no call.
TEST_CASE("thread default (child: set_num_threads to the starting count)", "[.threads_same_child]") {
  at::set_num_threads(at::get_num_threads());
  build_first_trainer();
  REQUIRE(at::get_num_threads() == default_thread_count());
}

TEST_CASE("ACCELERATED_NUM_THREADS=n holds on the thread that builds the trainer and on threads started after it",
          "[performance]") {
  const int n = std::max(default_thread_count(), accelerated::detail::initial_num_threads) + 1;
  const int status = test::wait_for(test::spawn_self(
      "[.threads_env_child]", {"ACCELERATED_NUM_THREADS=" + std::to_string(n), "OMP_NUM_THREADS="}));
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
}

TEST_CASE("a set_num_threads that asks for LibTorch's starting count is taken for no call: the default applies",
          "[performance]") {
  // (LibTorch's starting count, read when this program started, as in the child)
  if (accelerated::detail::initial_num_threads == default_thread_count()) {
    ACCELERATED_SKIP("LibTorch starts with the default's count here (" << default_thread_count()
                                                                       << "): the two cannot be told apart");
  }
  const int status = test::wait_for(test::spawn_self("[.threads_same_child]", {"ACCELERATED_NUM_THREADS=", "OMP_NUM_THREADS="}));
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
}

TEST_CASE("the thread default follows CPU affinity and keeps a set_num_threads the user made", "[performance]") {
  for (const char* tag : {"[.threads_affinity_child]", "[.threads_user_child]"}) {
    INFO(tag);
    // Without the launcher's and the user's thread variables, so that the default applies.
    const int status = test::wait_for(test::spawn_self(tag, {"ACCELERATED_NUM_THREADS=", "OMP_NUM_THREADS="}));
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  }
}

// ---- TensorBoard event files ([tensorboard]) --------------------------------------------------------------------
namespace tb_reader {
// Written from the formats' specifications (TFRecord: length, masked CRC-32C of the length, data, masked CRC-32C of
// the data; protobuf's wire format; tensorflow.Event and Summary), not from the writer: a bitwise CRC, a generic
// field walker.
std::uint32_t crc32c_bitwise(const std::string& data) {
  std::uint32_t crc = ~0u;
  for (const unsigned char byte : data) {
    crc ^= byte;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}
std::uint32_t unmask(std::uint32_t masked) {
  const std::uint32_t rotated = masked - 0xa282ead8u;
  return (rotated >> 17) | (rotated << 15);
}
std::uint64_t little(const std::string& s, std::size_t at, int bytes) {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= std::uint64_t{static_cast<unsigned char>(s[at + i])} << (8 * i);
  return v;
}
struct Field {
  int number;
  int wire;
  std::uint64_t value;  // varint, fixed32, fixed64
  std::string bytes;    // length-delimited
};
std::vector<Field> fields(const std::string& m) {
  std::vector<Field> out;
  std::size_t at = 0;
  auto varint = [&] {
    std::uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      const auto b = static_cast<unsigned char>(m.at(at++));
      v |= std::uint64_t{b & 0x7Fu} << shift;
      if (!(b & 0x80)) return v;
    }
  };
  while (at < m.size()) {
    const auto key = varint();
    Field f{static_cast<int>(key >> 3), static_cast<int>(key & 7), 0, {}};
    if (f.wire == 0) f.value = varint();
    else if (f.wire == 1) { f.value = little(m, at, 8); at += 8; }
    else if (f.wire == 5) { f.value = little(m, at, 4); at += 4; }
    else if (f.wire == 2) { const auto n = varint(); f.bytes = m.substr(at, n); at += n; }
    else throw std::runtime_error("unknown wire type");
    out.push_back(std::move(f));
  }
  return out;
}
struct Scalar {
  std::int64_t step;
  std::string tag;
  float value;
};
// Every event's records, checked; returns (file_version of the first event, the scalars).
std::pair<std::string, std::vector<Scalar>> read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string file((std::istreambuf_iterator<char>(in)), {});
  std::size_t at = 0;
  std::string version;
  std::vector<Scalar> scalars;
  while (at < file.size()) {
    REQUIRE(file.size() - at >= 12);
    const auto length = little(file, at, 8);
    REQUIRE(unmask(static_cast<std::uint32_t>(little(file, at + 8, 4))) == crc32c_bitwise(file.substr(at, 8)));
    const auto data = file.substr(at + 12, length);
    REQUIRE(unmask(static_cast<std::uint32_t>(little(file, at + 12 + length, 4))) == crc32c_bitwise(data));
    at += 12 + length + 4;
    std::int64_t step = 0;
    for (const auto& f : fields(data)) {
      if (f.number == 2 && f.wire == 0) step = static_cast<std::int64_t>(f.value);
      if (f.number == 3 && f.wire == 2) version = f.bytes;
      if (f.number == 5 && f.wire == 2) {
        for (const auto& v : fields(f.bytes)) {
          Scalar s{step, {}, 0};
          for (const auto& g : fields(v.bytes)) {
            if (g.number == 1) s.tag = g.bytes;
            if (g.number == 2 && g.wire == 5) s.value = std::bit_cast<float>(static_cast<std::uint32_t>(g.value));
          }
          scalars.push_back(s);
        }
      }
    }
  }
  return {version, scalars};
}
}  // namespace tb_reader

TEST_CASE("CRC-32C matches the published check values", "[tensorboard]") {
  using accelerated::detail::tensorboard::crc32c;
  CHECK(crc32c("123456789") == 0xE3069283u);                         // the CRC catalogue's check value
  CHECK(crc32c(std::string(32, '\0')) == 0x8A9136AAu);               // RFC 3720, B.4: 32 bytes of zeros
  CHECK(crc32c(std::string(32, '\xff')) == 0x62A8AB43u);             // RFC 3720, B.4: 32 bytes of ones
  std::string increasing;
  for (int i = 0; i < 32; ++i) increasing += static_cast<char>(i);
  CHECK(crc32c(increasing) == 0x46DD794Eu);                          // RFC 3720, B.4: 0x00..0x1f
  CHECK(crc32c(increasing) == tb_reader::crc32c_bitwise(increasing));
}

namespace {
// Reads the event file while the run goes on (at the second epoch's start).
struct ReadsEventsMidRun {
  std::size_t scalars_seen_mid_run = 0;
  void operator()(accelerated::on_train_epoch_start, auto& trainer) {
    if (trainer.run_history().current_epoch() != 2) return;
    scalars_seen_mid_run = tb_reader::read(trainer.template callback<accelerated::callbacks::TensorBoard>().path()).second.size();
  }
};
}  // namespace

TEST_CASE("TensorBoard writes per-update and per-epoch scalars in TensorBoard's format", "[tensorboard][callbacks]") {
  namespace acc = accelerated;
  const auto dir = test::fresh_dir("tensorboard");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), 0.05);
  // AutoPrecision (no mixed precision in this test's environment): it has a loss scaler, unused outside fp16.
  acc::Trainer<acc::Cpu, acc::AutoPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::TensorBoard,
               ReadsEventsMidRun>
      trainer(model, torch::nn::MSELoss(), optimizer,
              acc::callbacks::TensorBoard({.log_dir = dir, .run_name = "first", .every_n_updates = 2}),
              ReadsEventsMidRun{});
  trainer.set_output(test::quiet());
  // 32 examples, batch 4: 8 updates per epoch, a point every 2 updates; clipping by norm gives the grad norm.
  trainer.train(test::regression_data(32), {.num_epochs = 2, .per_device_batch_size = 4, .gradient_clip_norm = 100.0},
                test::regression_data(8));
  const auto path = trainer.callback<acc::callbacks::TensorBoard>().path();
  CHECK(fs::path(path).parent_path() == dir / "first");
  CHECK(fs::path(path).filename().string().rfind("events.out.tfevents.", 0) == 0);
  const auto [version, scalars] = tb_reader::read(path);
  CHECK(version == "brain.Event:2");
  auto series = [&](const std::string& tag) {
    std::vector<std::pair<std::int64_t, float>> out;
    for (const auto& s : scalars) if (s.tag == tag) out.emplace_back(s.step, s.value);
    return out;
  };
  const auto loss = series("train/loss");
  REQUIRE(loss.size() == 8);
  CHECK(loss.front().first == 2);
  CHECK(loss.back().first == 16);
  CHECK(series("train/lr") == std::vector<std::pair<std::int64_t, float>>(
                                  {{2, 0.05f}, {4, 0.05f}, {6, 0.05f}, {8, 0.05f}, {10, 0.05f}, {12, 0.05f},
                                   {14, 0.05f}, {16, 0.05f}}));
  CHECK(series("train/grad_norm").size() == 8);
  CHECK(series("train/loss_scale").empty());  // full precision: no loss scale to log
  CHECK(series("train/samples_per_second").size() == 8);
  for (const auto& [step, fraction] : series("time/data_wait_fraction")) CHECK((fraction >= 0 && fraction <= 1));
  const auto epoch_loss = series("epoch/train_loss_epoch");
  REQUIRE(epoch_loss.size() == 2);
  CHECK(epoch_loss[0].first == 8);
  CHECK(epoch_loss[1].second == static_cast<float>(trainer.run_history().get_latest_metric("train_loss_epoch")));
  CHECK(series("epoch/eval_loss_epoch").size() == 2);
  // Readable during the run: epoch 1's 4 points of 6 scalars (no loss scale here) and its epoch metrics were there.
  CHECK(trainer.callback<ReadsEventsMidRun>().scalars_seen_mid_run >= 4 * 6 + 2);
  CHECK(trainer.state().data_wait_seconds >= 0);  // measured, not compared: timings are never asserted
  CHECK(trainer.state().compute_seconds > 0);
  CHECK_THROWS_WITH(acc::callbacks::TensorBoard({.every_n_updates = 0}), Catch::Contains("every_n_updates = 0"));
  fs::remove_all(dir);
}

TEST_CASE("the gradient norm is logged without clipping, equal to the one clipping computes", "[tensorboard][callbacks]") {
  namespace acc = accelerated;
  const auto dir = test::fresh_dir("tensorboard_norm");
  auto norms = [&](const std::string& name, std::optional<double> clip_norm) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), 0.05);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::TensorBoard> trainer(
        model, torch::nn::MSELoss(), optimizer,
        acc::callbacks::TensorBoard({.log_dir = dir, .run_name = name, .every_n_updates = 3}));
    trainer.set_output(test::quiet());
    trainer.train(test::regression_data(32), {.num_epochs = 2, .per_device_batch_size = 4, .gradient_clip_norm = clip_norm});
    std::vector<std::pair<std::int64_t, float>> out;
    for (const auto& s : tb_reader::read(trainer.callback<acc::callbacks::TensorBoard>().path()).second) {
      if (s.tag == "train/grad_norm") out.emplace_back(s.step, s.value);
    }
    return out;
  };
  // A max_norm no gradient reaches clips nothing (a multiplication by exactly 1): the same run, the norm every update.
  const auto unclipped = norms("unclipped", std::nullopt);
  REQUIRE(unclipped.size() == 5);  // updates 3, 6, 9, 12, 15
  CHECK(unclipped == norms("clipped", 1e30));
  CHECK(unclipped.front().second > 0);
  fs::remove_all(dir);
}

