#include <sched.h>

#include "helpers.hpp"

using accelerated::RunHistory;

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

// Run in a child process of its own, so that no earlier test case has built a trainer yet.
TEST_CASE("allocator tuning (child)", "[.allocator_child]") {
  REQUIRE_FALSE(accelerated::detail::allocator_tuning_done());  // including the headers changed nothing
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
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
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  REQUIRE(at::get_num_threads() == 1);
}

TEST_CASE("thread default (child: the user chose)", "[.threads_user_child]") {
  at::set_num_threads(3);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<> trainer(model, torch::nn::MSELoss(), optimizer);
  REQUIRE(at::get_num_threads() == 3);
}

TEST_CASE("the thread default follows CPU affinity and keeps a set_num_threads the user made", "[performance]") {
  for (const char* tag : {"[.threads_affinity_child]", "[.threads_user_child]"}) {
    INFO(tag);
    // Without the launcher's and the user's thread variables, so that the default applies.
    const int status = test::wait_for(test::spawn_self(tag, {"ACCELERATED_NUM_THREADS=", "OMP_NUM_THREADS="}));
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  }
}
