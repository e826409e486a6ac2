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

TEST_CASE("the allocator is tuned at start-up on glibc", "[performance]") {
#if defined(__GLIBC__)
  CHECK(accelerated::allocator_tuning.applied);
#else
  CHECK_FALSE(accelerated::allocator_tuning.applied);
#endif
}
