// Bad input: every case is a clear exception naming the argument and the value, raised before any work.
#include "helpers.hpp"

namespace acc = accelerated;

namespace {

struct Fixture {
  torch::nn::Linear model = test::linear_model();
  torch::optim::SGD optimizer{model->parameters(), torch::optim::SGDOptions(0.1)};
  acc::Trainer<> trainer{model, torch::nn::MSELoss(), optimizer};
  std::pair<torch::Tensor, torch::Tensor> data = test::regression_data(16);
  Fixture() { trainer.set_output(test::quiet()); }

  std::string train_error(const acc::TrainOptions& options) {
    return test::message_of([&] { trainer.train(data, options); });
  }
};
}  // namespace

TEST_CASE("invalid train options name the option and the value", "[options][bad_input]") {
  Fixture f;
  const auto before = test::flat_parameters(*f.model);
  CHECK_THAT(f.train_error({.num_epochs = -1}), Catch::Contains("num_epochs = -1"));
  CHECK_THAT(f.train_error({.num_epochs = 0}), Catch::Contains("num_epochs = 0") && Catch::Contains("max_num_train_steps"));
  CHECK_THAT(f.train_error({.per_device_batch_size = 0}), Catch::Contains("per_device_batch_size = 0"));
  CHECK_THAT(f.train_error({.eval_per_device_batch_size = -3}), Catch::Contains("eval_per_device_batch_size = -3"));
  CHECK_THAT(f.train_error({.max_num_train_steps = 0}), Catch::Contains("max_num_train_steps = 0"));
  CHECK_THAT(f.train_error({.gradient_accumulation_steps = 0}), Catch::Contains("gradient_accumulation_steps = 0"));
  CHECK_THAT(f.train_error({.gradient_clip_value = -1.0}), Catch::Contains("gradient_clip_value = -1"));
  CHECK_THAT(f.train_error({.gradient_clip_norm = 0.0}), Catch::Contains("gradient_clip_norm = 0"));
  CHECK_THROWS_AS(f.trainer.train(f.data, {.per_device_batch_size = 0}), std::invalid_argument);
  // Nothing trained: validation comes before any work.
  CHECK(torch::equal(before, test::flat_parameters(*f.model)));
  CHECK_FALSE(f.trainer.run_history().has_metric("train_loss_epoch"));
}

TEST_CASE("num_epochs = 0 is fine when max_num_train_steps sets the length", "[options]") {
  Fixture f;
  f.trainer.train(f.data, {.num_epochs = 0, .per_device_batch_size = 4, .max_num_train_steps = 6});
  CHECK(f.trainer.run_config().num_epochs == 2);
  CHECK(f.trainer.state().update_step == 6);
}

TEST_CASE("empty datasets are rejected by name", "[options][bad_input]") {
  Fixture f;
  const auto empty = std::pair{torch::empty({0, 8}), torch::empty({0, 1})};
  CHECK_THAT(test::message_of([&] { f.trainer.train(empty, {}); }), Catch::Contains("train_dataset is empty"));
  CHECK_THAT(test::message_of([&] { f.trainer.train(f.data, {}, empty); }), Catch::Contains("eval_dataset is empty"));
  CHECK_THAT(test::message_of([&] { f.trainer.evaluate(empty); }), Catch::Contains("dataset is empty"));
  const std::vector<torch::data::Example<>> no_examples;
  CHECK_THAT(test::message_of([&] { f.trainer.train(no_examples, {}); }), Catch::Contains("train_dataset is empty"));
}

TEST_CASE("inputs and targets of different lengths are rejected", "[options][bad_input]") {
  Fixture f;
  const auto message = test::message_of([&] { f.trainer.train(std::pair{torch::randn({10, 8}), torch::randn({9, 1})}, {}); });
  CHECK_THAT(message, Catch::Contains("inputs has 10 examples but targets has 9"));
}

TEST_CASE("evaluate rejects a zero batch size", "[options][bad_input]") {
  Fixture f;
  CHECK_THAT(test::message_of([&] { f.trainer.evaluate(f.data, 0); }), Catch::Contains("per_device_batch_size = 0"));
}

TEST_CASE("drop_last that leaves no batch is an error and not a silent no-op", "[options][bad_input]") {
  Fixture f;
  const auto message = test::message_of([&] { f.trainer.train(f.data, {.per_device_batch_size = 32, .drop_last = true}); });
  CHECK_THAT(message, Catch::Contains("drop_last = true") && Catch::Contains("per_device_batch_size = 32"));
}

TEST_CASE("a null loss is reported when the default step needs it", "[options][bad_input]") {
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  acc::Trainer<> trainer(model, nullptr, optimizer);
  trainer.set_output(test::quiet());
  CHECK_THAT(test::message_of([&] { trainer.train(test::regression_data(8), {}); }), Catch::Contains("null loss"));
}

TEST_CASE("the run config's arithmetic in one function", "[options][run_config]") {
  // 10 batches per process, accumulation 3: 4 updates per epoch; 2 processes.
  const acc::ProcessFacts process{2, 1, 0, "cpu", "bf16"};
  auto rc = acc::make_run_config(process, {.train_batches = 10, .train_batch_size = 8, .eval_batch_size = 16,
                                           .gradient_accumulation_steps = 3, .num_epochs = 5});
  CHECK(rc.num_update_steps_per_epoch == 4);
  CHECK(rc.train_total_batch_size == 8 * 2 * 3);
  CHECK(rc.eval_total_batch_size == 32);
  CHECK(rc.max_num_train_steps == 20);
  CHECK((rc.is_distributed && !rc.is_world_process_zero && rc.is_local_process_zero));
  CHECK(rc.mixed_precision == "bf16");
  // max_num_train_steps bounds the epochs, and the smaller limit wins.
  rc = acc::make_run_config(process, {.train_batches = 10, .gradient_accumulation_steps = 3, .num_epochs = 5,
                                      .max_num_train_steps = 6});
  CHECK(rc.num_epochs == 2);
  CHECK(rc.max_num_train_steps == 6);
  rc = acc::make_run_config(process, {.train_batches = 10, .gradient_accumulation_steps = 3, .num_epochs = 0,
                                      .max_num_train_steps = 9});
  CHECK(rc.num_epochs == 3);
  // An evaluate() call: no training batches, one epoch.
  rc = acc::make_run_config(process, {.eval_batch_size = 4});
  CHECK(rc.num_epochs == 1);
  CHECK(rc.max_num_train_steps == 0);
}
