// W3: the quickstart CNN on Fashion-MNIST with augmentation (random crop 28 padding 2, random horizontal flip,
// normalise; batch 64, Adam 1e-3), one epoch per variant, alternating in one process:
//   (a) the trainer with its pipeline and default workers     (b) a hand-written loop augmenting inline
//   (c) a hand-written loop over torch::data::make_data_loader, the transforms in a Dataset's get(), 1 worker
//   (d) the trainer with 0 workers
// Light W3 is that; heavy W3 adds a per-example step of fixed cost sized so that data preparation X equals the
// compute C per batch (it stands for JPEG decoding). C and X are measured in (b). Pipelining hides at best the smaller
// of the two; on 2 cores the ceiling is (C + X) / max(C, X, (C + X) / 2), and with C measured on 2 training threads
// also (C + X) / max(C, X, (C1 + X) / 2), C1 the step on one thread (its work). Also: how heavy W3 scales with the
// workers, and the test accuracy per epoch (3 by default; full epochs) with and without the light augmentation, and
// (part ablation) with each of its steps alone. One JSON line.
// Usage: bench_w3_pipeline [fashion-mnist folder] [parts=light,heavy,scaling,accuracy(,ablation)] [batches per epoch=all]
//                          [rounds=2] (each variant keeps its best round) [accuracy epochs=3]
#include <cmath>
#include <random>

#include "common.hpp"

namespace nn = torch::nn;
namespace acc = accelerated;
namespace tf = accelerated::data::transforms;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::int64_t kBatch = 64;
constexpr float kMean = acc::data::fashion_mnist_mean, kStd = acc::data::fashion_mnist_std;

// A per-example step of fixed cost that leaves the pixels as they are: `rounds` passes of square roots over them.
struct Decode {
  int rounds = 0;
  void operator()(tf::ExampleView v) const {
    const auto n = v.shape.numel();
    float sum = 0.0f;
    for (int r = 0; r < rounds; ++r) {
      for (std::int64_t i = 0; i < n; ++i) sum += std::sqrt(std::abs(v.data[i]) + static_cast<float>(r));
    }
    asm volatile("" : : "x"(sum));  // keep the work
  }
};

// The augmentation as a LibTorch user writes it on the training thread: batch ops, then a crop and a flip per
// example with narrow/flip, stacked.
torch::Tensor augment_inline(const torch::Tensor& raw, const torch::Tensor& index, std::mt19937& rng, const Decode& decode) {
  auto x = torch::constant_pad_nd(raw.index_select(0, index).to(torch::kFloat).div_(255.0f), {2, 2, 2, 2}, 0.0);
  std::uniform_int_distribution<std::int64_t> offset(0, 4);
  std::bernoulli_distribution coin(0.5);
  std::vector<torch::Tensor> crops;
  crops.reserve(static_cast<std::size_t>(x.size(0)));
  for (std::int64_t k = 0; k < x.size(0); ++k) {
    auto c = x[k].narrow(1, offset(rng), 28).narrow(2, offset(rng), 28);
    crops.push_back(coin(rng) ? c.flip({2}) : c);
  }
  auto out = torch::stack(crops).sub_(kMean).div_(kStd);
  if (decode.rounds > 0) {
    for (std::int64_t k = 0; k < out.size(0); ++k) decode({out.data_ptr<float>() + k * 784, {1, 28, 28}, k});
  }
  return out;
}

// The same transforms as a torch::data dataset (per example), for make_data_loader.
class AugmentedFashion : public torch::data::datasets::Dataset<AugmentedFashion> {
 public:
  AugmentedFashion(torch::Tensor raw, torch::Tensor targets, Decode decode)
      : raw_(std::move(raw)), targets_(std::move(targets)), decode_(decode) {}
  torch::data::Example<> get(size_t i) override {
    thread_local std::mt19937 rng(std::random_device{}());
    std::uniform_int_distribution<std::int64_t> offset(0, 4);
    const auto index = static_cast<std::int64_t>(i);
    auto x = torch::constant_pad_nd(raw_[index].to(torch::kFloat).div_(255.0f), {2, 2, 2, 2}, 0.0);
    x = x.narrow(1, offset(rng), 28).narrow(2, offset(rng), 28);
    if (std::bernoulli_distribution(0.5)(rng)) x = x.flip({2});
    x = x.sub(kMean).div_(kStd).contiguous();
    if (decode_.rounds > 0) decode_({x.data_ptr<float>(), {1, 28, 28}, index});
    return {x, targets_[index]};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(raw_.size(0)); }

 private:
  torch::Tensor raw_, targets_;
  Decode decode_;
};

struct Net {
  bench::QuickstartNet model;
  std::unique_ptr<torch::optim::Adam> optimizer;
};
Net fresh_net() {
  torch::manual_seed(0);
  bench::QuickstartNet model;
  auto optimizer = std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
  return {model, std::move(optimizer)};
}

struct HandSplit {
  double seconds = 0, data_s = 0, compute_s = 0;
  std::int64_t batches = 0;
};

// (b): augmentation and step on the training thread, each timed.
HandSplit hand_written(Net& net, const acc::data::TensorDataset& raw, std::int64_t batches, const Decode& decode,
                       unsigned seed) {
  nn::CrossEntropyLoss loss_fn;
  std::mt19937 rng(seed);
  torch::manual_seed(seed);
  const auto order = torch::randperm(raw.size(), torch::kLong);
  HandSplit split;
  const auto start = Clock::now();
  net.model->train();
  for (std::int64_t b = 0; b < batches; ++b) {
    const auto t0 = Clock::now();
    const auto index = order.narrow(0, b * kBatch, std::min(kBatch, raw.size() - b * kBatch));
    const auto x = augment_inline(raw.inputs(), index, rng, decode);
    const auto y = raw.targets().index_select(0, index);
    const auto t1 = Clock::now();
    net.optimizer->zero_grad();
    auto loss = loss_fn(net.model->forward(x), y);
    loss.backward();
    net.optimizer->step();
    (void)loss.item<double>();
    split.data_s += std::chrono::duration<double>(t1 - t0).count();
    split.compute_s += bench::seconds_since(t1);
  }
  split.seconds = bench::seconds_since(start);
  split.batches = batches;
  return split;
}

// (c): torch::data's loader with the transforms in get(), Stack<>, 1 worker.
double make_data_loader_run(Net& net, const acc::data::TensorDataset& raw, std::int64_t batches, const Decode& decode) {
  nn::CrossEntropyLoss loss_fn;
  return bench::time_it([&] {
    auto loader = torch::data::make_data_loader(
        AugmentedFashion(raw.inputs(), raw.targets(), decode).map(torch::data::transforms::Stack<>()),
        torch::data::DataLoaderOptions(kBatch).workers(1));
    net.model->train();
    std::int64_t b = 0;
    for (auto& batch : *loader) {
      if (b++ == batches) break;
      net.optimizer->zero_grad();
      auto loss = loss_fn(net.model->forward(batch.data), batch.target);
      loss.backward();
      net.optimizer->step();
      (void)loss.item<double>();
    }
  });
}

struct TrainerRun {
  double seconds = 0, data_wait_fraction = 0;
};

// (a) and (d): the trainer, `workers` unset = its default.
template <class Data>
TrainerRun trainer_run(Net& net, const Data& data, std::int64_t batches, std::optional<int> workers, std::int64_t epochs = 1) {
  acc::Trainer<> trainer(net.model, nn::CrossEntropyLoss(), *net.optimizer);
  trainer.set_output(bench::null_stream());
  acc::TrainOptions options{.num_epochs = epochs, .per_device_batch_size = kBatch};
  options.max_num_train_steps = batches * epochs;
  options.num_workers = workers;
  TrainerRun run;
  run.seconds = bench::time_it([&] { trainer.train(data, options); });
  const auto& state = trainer.state();
  run.data_wait_fraction = state.data_wait_seconds / (state.data_wait_seconds + state.compute_seconds);
  return run;
}

// The test accuracy (%) after each of `epochs` epochs of training on `data`, default workers.
template <class Data, class Eval>
std::vector<double> accuracy_per_epoch(Net& net, const Data& data, const Eval& test, std::int64_t epochs) {
  acc::Trainer trainer(net.model, nn::CrossEntropyLoss(), *net.optimizer, acc::callbacks::Defaults{},
                       acc::callbacks::Accuracy{});
  trainer.set_output(bench::null_stream());
  trainer.train(data, {.num_epochs = epochs, .per_device_batch_size = kBatch, .eval_per_device_batch_size = 1000}, test);
  auto accuracy = trainer.run_history().get_metric_values("eval_accuracy");
  for (auto& a : accuracy) a *= 100.0;
  return accuracy;
}

bool wants(const std::string& parts, const std::string& part) { return parts.find(part) != std::string::npos; }

}  // namespace

int main(int argc, char** argv) {
  const std::string folder = argc > 1 ? argv[1] : acc::data::fashion_mnist_default_folder;
  const std::string parts = argc > 2 ? argv[2] : "light,heavy,scaling,accuracy";
  const auto raw = acc::data::load_fashion_mnist_raw(folder, acc::data::Split::train);
  const auto all_batches = (raw.size() + kBatch - 1) / kBatch;
  const std::int64_t batches = argc > 3 ? std::min<std::int64_t>(std::stoll(argv[3]), all_batches) : all_batches;
  const int rounds = argc > 4 ? std::max(1, std::stoi(argv[4])) : 2;
  const std::int64_t accuracy_epochs = argc > 5 ? std::max(1, std::stoi(argv[5])) : 3;
  const auto light = tf::random_crop(28, 2) | tf::random_horizontal_flip() | tf::normalize(kMean, kStd);

  // The first trainer sets the thread count; measure everything after it.
  auto warm = fresh_net();
  trainer_run(warm, acc::data::augment(raw, light), 20, 0);
  const int threads = at::get_num_threads();
  const int default_workers = acc::data::default_num_workers();

  // Calibrate heavy W3: C per batch from a short (b) run, and the cost of one Decode round on a batch.
  const auto probe = hand_written(warm, raw, 40, Decode{}, 1);
  const double compute_per_batch = probe.compute_s / 40, light_x_per_batch = probe.data_s / 40;
  // The step's work on one core (C1): with 2 threads the step takes C but keeps both cores busy for part of it, so
  // on 2 cores the best a pipeline can do is bounded by the work as well: (C + X) / max(C, X, (C1 + X) / 2).
  at::set_num_threads(1);
  const double compute_one_thread = hand_written(warm, raw, 40, Decode{}, 3).compute_s / 40;
  at::set_num_threads(threads);
  const double round_per_batch = [&] {
    auto x = torch::rand({kBatch, 1, 28, 28});
    const Decode ten{10};
    const double s = bench::time_it([&] {
      for (std::int64_t k = 0; k < kBatch; ++k) ten({x.data_ptr<float>() + k * 784, {1, 28, 28}, k});
    });
    return s / 10;
  }();
  const int heavy_rounds =
      std::max(1, static_cast<int>(std::lround((compute_per_batch - light_x_per_batch) / round_per_batch)));

  std::ostringstream json;
  acc::detail::JsonObject out(json);
  out.field("benchmark", "W3 quickstart cnn + augmentation, fashion-mnist, batch 64, Adam, 1 epoch per variant")
      .field("batches_per_epoch", batches)
      .field("rounds", rounds)
      .field("training_threads", threads)
      .field("default_workers", default_workers);

  auto variant = [&](const std::string& name, const Decode& decode) {
    const auto pipeline = light | tf::lambda(decode);
    const auto data = acc::data::augment(raw, pipeline);
    // The variants alternate, one epoch each per round, so that machine noise hits all alike; each keeps its best.
    auto net_a = fresh_net(), net_b = fresh_net(), net_c = fresh_net(), net_d = fresh_net();
    TrainerRun a{1e300, 0}, d{1e300, 0};
    HandSplit b{1e300, 0, 0, 0};
    double c = 1e300;
    for (int round = 0; round < rounds; ++round) {
      if (const auto r = trainer_run(net_a, data, batches, std::nullopt); r.seconds < a.seconds) a = r;
      if (const auto r = hand_written(net_b, raw, batches, decode, 2 + round); r.seconds < b.seconds) b = r;
      c = std::min(c, make_data_loader_run(net_c, raw, batches, decode));
      if (const auto r = trainer_run(net_d, data, batches, 0); r.seconds < d.seconds) d = r;
    }
    const double C = b.compute_s / static_cast<double>(batches), X = b.data_s / static_cast<double>(batches);
    const double ceiling = (C + X) / std::max({C, X, (C + X) / 2});
    const double work_ceiling = (C + X) / std::max({C, X, (compute_one_thread + X) / 2});
    const auto field = [&](const std::string& key, const auto& value) { out.field(name + "." + key, value); };
    field("decode_rounds", decode.rounds);
    field("C_ms", 1e3 * C);
    field("X_ms", 1e3 * X);
    field("C1_ms", 1e3 * compute_one_thread);
    field("ceiling", ceiling);
    field("ceiling_by_work", work_ceiling);
    field("a_trainer_default_workers_s", a.seconds);
    field("b_hand_written_inline_s", b.seconds);
    field("c_make_data_loader_1_worker_s", c);
    field("d_trainer_0_workers_s", d.seconds);
    field("a_over_b", b.seconds / a.seconds);
    field("a_over_c", c / a.seconds);
    field("a_over_d", d.seconds / a.seconds);
    field("d_over_b", b.seconds / d.seconds);
    field("data_wait_fraction_a", a.data_wait_fraction);
    field("data_wait_fraction_d", d.data_wait_fraction);
    return b.seconds;
  };
  double heavy_b = 0;
  if (wants(parts, "light")) variant("light", Decode{});
  if (wants(parts, "heavy")) heavy_b = variant("heavy", Decode{heavy_rounds});
  if (wants(parts, "scaling")) {
    const auto data = acc::data::augment(raw, light | tf::lambda(Decode{heavy_rounds}));
    std::vector<double> seconds;
    for (int workers = 0; workers <= 3; ++workers) {
      auto net = fresh_net();
      seconds.push_back(trainer_run(net, data, batches, workers).seconds);
    }
    out.field("heavy_scaling.workers_0_to_3_s", seconds);
    if (heavy_b > 0) {
      std::vector<double> speed;
      for (const double s : seconds) speed.push_back(heavy_b / s);
      out.field("heavy_scaling.speed_over_b", speed);
    }
  }
  if (wants(parts, "accuracy") || wants(parts, "ablation")) {
    // Each pipeline trained from the same start and tested on the normalised test set, read once.
    const auto normalize = tf::normalize(kMean, kStd);
    const auto test = acc::data::augment(acc::data::load_fashion_mnist_raw(folder, acc::data::Split::test), normalize);
    const auto accuracy_with = [&](const auto& steps) {
      auto net = fresh_net();
      return accuracy_per_epoch(net, acc::data::augment(raw, steps), test, accuracy_epochs);
    };
    if (wants(parts, "accuracy")) {
      const auto with = accuracy_with(light);
      const auto without = accuracy_with(normalize);
      if (accuracy_epochs >= 3) {
        out.field("accuracy_after_3_epochs.light_augmentation", with[2])
            .field("accuracy_after_3_epochs.no_augmentation", without[2]);
      }
      out.field("accuracy_per_epoch.light_augmentation", with).field("accuracy_per_epoch.no_augmentation", without);
    }
    if (wants(parts, "ablation")) {  // which step of the light augmentation costs the accuracy: each alone
      out.field("ablation_accuracy_per_epoch.random_crop_28_padding_2", accuracy_with(tf::random_crop(28, 2) | normalize))
          .field("ablation_accuracy_per_epoch.random_horizontal_flip",
                 accuracy_with(tf::random_horizontal_flip() | normalize))
          .field("ablation_accuracy_per_epoch.random_crop_28_padding_1", accuracy_with(tf::random_crop(28, 1) | normalize));
    }
  }
  out.close();
  std::cout << json.str() << std::endl;
}
