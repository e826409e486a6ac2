// Checkpoints (save, load, and every way a load can be refused), SaveBestModel and EarlyStopping.
#include <algorithm>
#include <malloc.h>
#include <sys/resource.h>

#include <filesystem>
#include <fstream>
#include <random>

#include <caffe2/serialize/inline_container.h>

#include "fuzz/readers.hpp"
#include "helpers.hpp"

namespace acc = accelerated;
namespace fs = std::filesystem;

namespace {
struct Fixture {
  torch::nn::Linear model = test::linear_model();
  torch::optim::Adam optimizer{model->parameters(), torch::optim::AdamOptions(0.01)};
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer{model, torch::nn::MSELoss(), optimizer};
  Fixture() { trainer.set_output(test::quiet()); }
};
}  // namespace

namespace {
// The offset of the central directory entry of the record whose name ends with `suffix`.
std::size_t directory_entry(const std::string& zip, const std::string& suffix) {
  for (auto at = zip.find("PK\x01\x02"); at != std::string::npos; at = zip.find("PK\x01\x02", at + 1)) {
    const auto length = static_cast<unsigned char>(zip[at + 28]) | (static_cast<unsigned char>(zip[at + 29]) << 8);
    const auto name = zip.substr(at + 46, length);
    if (name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) return at;
  }
  FAIL("no record ending in " << suffix);
  return 0;
}
void put_u32(std::string& bytes, std::size_t at, std::uint32_t value) {
  for (int i = 0; i < 4; ++i) bytes[at + i] = static_cast<char>((value >> (8 * i)) & 0xff);
}
// One epoch trained, then dir/ckpt.pt (with `values`) and dir/state.pt saved.
void train_and_save_both(Fixture& f, const fs::path& dir, const std::map<std::string, double>& values = {}) {
  f.trainer.train(test::regression_data(32), {.num_epochs = 1, .per_device_batch_size = 8});
  f.trainer.save_checkpoint(dir / "ckpt.pt", values);
  f.trainer.save_training_state(dir / "state.pt");
}
}  // namespace

TEST_CASE("a checkpoint restores the model, the optimizer and the saved values", "[checkpoint]") {
  const auto dir = test::fresh_dir("checkpoint");
  const auto data = test::regression_data(32);
  Fixture a;
  a.trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 8});
  a.trainer.save_checkpoint(dir / "ckpt.pt", {{"epoch", 2.0}, {"best", 0.125}});
  for (const auto& entry : fs::directory_iterator(dir)) {
    CHECK(entry.path().filename() == "ckpt.pt");  // the temporary file was renamed away
  }

  Fixture b;
  CHECK_FALSE(torch::equal(test::flat_parameters(*a.model), test::flat_parameters(*b.model)));
  const auto values = b.trainer.load_checkpoint(dir / "ckpt.pt");
  CHECK(torch::equal(test::flat_parameters(*a.model), test::flat_parameters(*b.model)));
  CHECK(values.at("epoch") == 2.0);
  CHECK(values.at("best") == 0.125);
  // The optimizer state came along: one more identical epoch gives identical parameters.
  a.trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 8, .shuffle = false});
  b.trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 8, .shuffle = false});
  CHECK(torch::equal(test::flat_parameters(*a.model), test::flat_parameters(*b.model)));
  fs::remove_all(dir);
}

TEST_CASE("a checkpoint restores each parameter group's learning rate on LibTorch 1.13 as on 2.x", "[checkpoint]") {
  // LibTorch 1.13's Optimizer::load left the groups' options as constructed and 2.x's restores them: the file carries
  // the rates (optimizer_lrs), so a load gives the same optimizer on either version, as Python's load_state_dict does.
  const auto dir = test::fresh_dir("checkpoint_lrs");
  auto model = test::linear_model();
  auto groups = [&] {
    return std::vector<torch::optim::OptimizerParamGroup>{
        torch::optim::OptimizerParamGroup({model->weight}, std::make_unique<torch::optim::SGDOptions>(0.1)),
        torch::optim::OptimizerParamGroup({model->bias}, std::make_unique<torch::optim::SGDOptions>(0.01))};
  };
  torch::optim::SGD saved(groups(), torch::optim::SGDOptions(0.1));
  saved.param_groups()[0].options().set_lr(0.05);  // lowered by a schedule
  saved.param_groups()[1].options().set_lr(0.004);
  acc::save_checkpoint(dir / "ckpt.pt", *model, &saved);
  torch::optim::SGD loaded(groups(), torch::optim::SGDOptions(0.1));
  acc::load_checkpoint(dir / "ckpt.pt", *model, &loaded);
  CHECK(loaded.param_groups()[0].options().get_lr() == 0.05);
  CHECK(loaded.param_groups()[1].options().get_lr() == 0.004);
  fs::remove_all(dir);
}

TEST_CASE("bad checkpoints are refused with the entry named and nothing changed", "[checkpoint][bad_input]") {
  const auto dir = test::fresh_dir("bad_checkpoint");
  Fixture f;
  f.trainer.save_checkpoint(dir / "good.pt");
  const auto before = test::flat_parameters(*f.model);

  CHECK_THROWS_WITH(f.trainer.load_checkpoint(dir / "missing.pt"), Catch::Contains("missing.pt") && Catch::Contains("does not exist"));

  // Another model's shapes.
  torch::manual_seed(1);
  auto other = torch::nn::Linear(4, 1);
  acc::save_checkpoint(dir / "other.pt", *other);
  auto model = test::linear_model();
  torch::manual_seed(2);
  model->weight.data().normal_();
  const auto untouched = test::flat_parameters(*model);
  CHECK_THROWS_WITH(acc::load_checkpoint(dir / "other.pt", *model),
                    Catch::Contains("'model/weight' has shape [1, 4]") && Catch::Contains("[1, 8] in the model"));
  CHECK(torch::equal(untouched, test::flat_parameters(*model)));  // nothing was loaded

  // A model with a parameter the checkpoint lacks.
  auto bigger = torch::nn::Sequential(torch::nn::Linear(8, 1));
  CHECK_THROWS_WITH(acc::load_checkpoint(dir / "good.pt", *bigger), Catch::Contains("no entry 'model/0."));

  // Truncated.
  std::ifstream in(dir / "good.pt", std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), {});
  std::ofstream(dir / "truncated.pt", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  CHECK_THROWS_WITH(f.trainer.load_checkpoint(dir / "truncated.pt"),
                    Catch::Contains("truncated.pt' is not a zip-format torch.save file, or only part of one"));

  // Not ours (a state dict), and another format version.
  acc::save_state_dict({{"weights", torch::ones({2})}}, dir / "foreign.pt");
  CHECK_THROWS_WITH(f.trainer.load_checkpoint(dir / "foreign.pt"), Catch::Contains("no 'accelerated_format_version'"));
  acc::save_state_dict({{"accelerated_format_version", torch::tensor(99, torch::kLong)}}, dir / "future.pt");
  CHECK_THROWS_WITH(f.trainer.load_checkpoint(dir / "future.pt"), Catch::Contains("format version 99"));

  // An optimizer of another shape of state.
  acc::save_checkpoint(dir / "no_optimizer.pt", *f.model);
  CHECK_THROWS_WITH(f.trainer.load_checkpoint(dir / "no_optimizer.pt"), Catch::Contains("no entry 'optimizer'"));
  CHECK(torch::equal(before, test::flat_parameters(*f.model)));

  // Writing into a folder that does not exist fails and leaves nothing behind.
  CHECK_THROWS_WITH(f.trainer.save_checkpoint(dir / "nowhere" / "x.pt"), Catch::Contains("does not exist"));
  fs::remove_all(dir);
}

namespace {
// Records the parameters after each epoch, and makes training diverge from epoch 3 on (a huge learning rate).
struct DivergeFromEpoch3 {
  std::vector<torch::Tensor> parameters;
  void operator()(acc::on_train_epoch_start, auto& trainer) {
    if (trainer.run_history().current_epoch() == 3) trainer.optimizer().param_groups()[0].options().set_lr(50.0);
  }
  void operator()(acc::on_training_run_epoch_end, auto& trainer) { parameters.push_back(test::flat_parameters(trainer.model().module())); }
};
}  // namespace

TEST_CASE("SaveBestModel keeps the best epoch and loads it back", "[callbacks][checkpoint]") {
  const auto dir = test::fresh_dir("best");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, DivergeFromEpoch3, acc::callbacks::SaveBestModel>
      trainer(model, torch::nn::MSELoss(), optimizer, {}, acc::callbacks::SaveBestModel({.save_path = dir / "best.pt"}));
  const auto data = test::regression_data(32);
  trainer.train(data, {.num_epochs = 5, .per_device_batch_size = 8}, data);
  const auto& losses = trainer.run_history().get_metric_values("eval_loss_epoch");
  const auto best = std::min_element(losses.begin(), losses.end()) - losses.begin();
  CHECK(best == 1);  // epoch 2, before the divergence
  CHECK(trainer.callback<acc::callbacks::SaveBestModel>().best() == losses[1]);
  CHECK(torch::equal(test::flat_parameters(*model), trainer.callback<DivergeFromEpoch3>().parameters[1]));
  fs::remove_all(dir);
}

TEST_CASE("EarlyStopping stops after patience epochs without improvement", "[callbacks]") {
  const auto data = test::regression_data(32);
  auto run = [&](acc::callbacks::EarlyStoppingOptions options, double lr) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(lr));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::EarlyStopping>
        trainer(model, torch::nn::MSELoss(), optimizer, acc::callbacks::EarlyStopping(options));
    trainer.train(data, {.num_epochs = 10, .per_device_batch_size = 8}, data);
    // The stopping epoch was completed and counted: a later train(reset_run_history = false) starts with the next
    // epoch (and its data order) instead of repeating it.
    CHECK(trainer.run_history().current_epoch() ==
          static_cast<std::int64_t>(trainer.run_history().get_metric_values("train_loss_epoch").size()) + 1);
    return trainer.run_history().get_metric_values("train_loss_epoch").size();
  };
  // lr 0: nothing improves after the first epoch; patience 2 stops in epoch 3.
  CHECK(run({.patience = 2}, 0.0) == 3);
  // Improving every epoch by more than the threshold: all 10 epochs.
  CHECK(run({.patience = 1, .threshold = 0.0}, 0.05) == 10);
  // The other direction: the loss never increases, so "greater is better" never improves.
  CHECK(run({.patience = 1, .threshold = 0.0, .greater_is_better = true}, 0.05) == 2);
  CHECK_THROWS_WITH(acc::callbacks::EarlyStopping({.patience = 0}), Catch::Contains("patience = 0"));
}

TEST_CASE("metrics go to CSV and JSON lines and the curves to an SVG after every epoch", "[callbacks][files]") {
  const auto dir = test::fresh_dir("curves");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::MetricsLogger,
               acc::callbacks::LearningCurves>
      trainer(model, torch::nn::MSELoss(), optimizer, acc::callbacks::MetricsLogger(dir / "metrics.csv"),
              acc::callbacks::LearningCurves(dir / "curves.svg", 2));
  const auto data = test::regression_data(32);
  trainer.train(data, {.num_epochs = 3, .per_device_batch_size = 8}, data);
  trainer.evaluate(data, 8);

  std::ifstream csv(dir / "metrics.csv");
  std::vector<std::string> lines;
  for (std::string line; std::getline(csv, line);) lines.push_back(line);
  REQUIRE(lines.size() == 5);  // header, 3 epochs, the evaluation
  CHECK(lines[0] == "epoch,phase,eval_loss_epoch,evaluation_loss,train_loss_epoch");
  CHECK(lines[1].rfind("1,train,", 0) == 0);
  CHECK(lines[3].rfind("3,train,", 0) == 0);
  CHECK(lines[4].find(",evaluate,") != std::string::npos);
  std::ostringstream third_loss;
  third_loss.precision(10);
  third_loss << trainer.run_history().get_metric_values("train_loss_epoch")[2];
  CHECK_THAT(lines[3], Catch::EndsWith("," + third_loss.str()));

  std::ifstream svg_file(dir / "curves.svg");
  const std::string svg((std::istreambuf_iterator<char>(svg_file)), {});
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK_THAT(svg, Catch::Contains(">loss_epoch</text>") && Catch::Contains(">train_loss_epoch</text>") &&
                      Catch::Contains(">eval_loss_epoch</text>"));
  std::size_t polylines = 0;
  for (auto at = svg.find("<polyline"); at != std::string::npos; at = svg.find("<polyline", at + 1)) ++polylines;
  // Two epoch curves, over the per-update loss, learning rate and gradient norm (every 2 of the 12 updates).
  CHECK(polylines == 5);
  CHECK_THAT(svg, Catch::Contains(">lr</text>") && Catch::Contains(">grad_norm</text>") &&
                      Catch::Contains(">train_loss per update</text>") && Catch::Contains(">grad_norm before clipping</text>"));
  const auto per_update = svg.find("stroke-opacity");
  REQUIRE(per_update != std::string::npos);
  const auto points = svg.substr(svg.find("points=\"", per_update), svg.find("\"/>", per_update) - svg.find("points=\"", per_update));
  CHECK(std::count(points.begin(), points.end(), ',') == 6);
  CHECK_THAT(svg, Catch::EndsWith("</svg>\n"));

  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::MetricsLogger> json(
      model, torch::nn::MSELoss(), optimizer,
      acc::callbacks::MetricsLogger(dir / "metrics.jsonl", acc::callbacks::MetricsLogger::Format::json_lines));
  json.train(data, {.num_epochs = 2, .per_device_batch_size = 8});
  std::ifstream jsonl(dir / "metrics.jsonl");
  std::string first;
  std::getline(jsonl, first);
  CHECK_THAT(first, Catch::StartsWith(R"({"epoch":1,"phase":"train","train_loss_epoch":)"));
  fs::remove_all(dir);
}


TEST_CASE("saving streams the archive to disk instead of holding copies of it in memory", "[checkpoint]") {
  const auto dir = test::fresh_dir("checkpoint_memory");
  torch::nn::Linear big(4096, 16384);  // 64 M floats: 256 MB of weights
  torch::NoGradGuard no_grad;
  big->weight.fill_(1.0);  // touch every page, so the weights count in the peak before the save
  const double before = test::reset_peak_resident_mb();
  acc::save_checkpoint(dir / "big.pt", *big);
  const double growth = test::peak_resident_mb() - before;
  INFO("peak resident memory grew by " << growth << " MB while saving 256 MB");
  CHECK(growth < 96.0);  // holding the archive in memory (once or twice) grows it by 256-512 MB
  // A state dict for Python too (it held the whole file in a string: +256 MB).
  const double before_state_dict = test::reset_peak_resident_mb();
  acc::save_state_dict(*big, dir / "big_state_dict.pt");
  const double state_dict_growth = test::peak_resident_mb() - before_state_dict;
  INFO("peak resident memory grew by " << state_dict_growth << " MB while saving a 256 MB state dict");
  CHECK(state_dict_growth < 96.0);
  CHECK(acc::read_state_dict(dir / "big_state_dict.pt").size() == 2);
  std::filesystem::remove_all(dir);
}

namespace {
// The most memory held above `before`, looked at each epoch's start (before any gradient exists).
struct MeasureHeld {
  double* held;
  const double* before;
  void operator()(acc::on_train_epoch_start, auto&) { *held = std::max(*held, test::live_heap_mb() - *before); }
};
}  // namespace

TEST_CASE("resuming holds two copies of the model at the peak (the file's and the rollback's) and none during the run",
          "[checkpoint][resume]") {
  const auto dir = test::fresh_dir("resume_memory");
  torch::nn::Linear big(4096, 16384);  // 256 MB of weights
  {
    torch::NoGradGuard no_grad;
    big->weight.fill_(0.5);  // touched: the weights count in the resident memory from here
  }
  torch::optim::SGD sgd(big->parameters(), 0.0);
  double held_in_run = 0.0;
  double heap_before = 0.0;
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, MeasureHeld> trainer(
      big, torch::nn::MSELoss(), sgd, MeasureHeld{&held_in_run, &heap_before});
  trainer.set_output(test::quiet());
  trainer.save_training_state(dir / "state.pt");
  const double model_mb = 4096.0 * 16384.0 * 4.0 / (1024.0 * 1024.0);
  heap_before = test::live_heap_mb();
  const double peak_before = test::reset_peak_resident_mb();
  trainer.load_training_state(dir / "state.pt");
  const double peak_growth = test::peak_resident_mb() - peak_before;
  const auto x = torch::zeros({4, 4096});
  const auto y = torch::zeros({4, 16384});
  trainer.train(std::pair{x, y}, {.num_epochs = 1, .per_device_batch_size = 2});
  INFO("model " << model_mb << " MB; peak grew by " << peak_growth << " MB while loading; " << held_in_run
                << " MB more held during the resumed run");
  CHECK(peak_growth < 2.25 * model_mb);
  CHECK(held_in_run < 0.25 * model_mb);
  std::filesystem::remove_all(dir);
}

TEST_CASE("a save whose folder is a file says so", "[checkpoint]") {
  const auto dir = test::fresh_dir("checkpoint_not_a_folder");
  std::ofstream(dir / "file") << "x";
  auto model = test::linear_model();
  CHECK_THROWS_WITH(acc::save_checkpoint(dir / "file" / "x.pt", *model), Catch::Contains("is a file, not a folder"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("a checkpoint that fails to load leaves the model and the optimizer as they were", "[checkpoint]") {
  const auto dir = test::fresh_dir("checkpoint_transaction");
  auto saved_model = test::linear_model(1);
  torch::optim::SGD sgd(saved_model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  acc::save_checkpoint(dir / "sgd.pt", *saved_model, &sgd);
  auto model = test::linear_model(2);  // other weights than the saved ones
  const auto before = test::flat_parameters(*model);
  REQUIRE_FALSE(torch::equal(before, test::flat_parameters(*saved_model)));
  torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(0.01));
  CHECK_THROWS_WITH(acc::load_checkpoint(dir / "sgd.pt", *model, &adam),
                    Catch::Contains("holds the state of a torch::optim::SGD, but this optimizer is a torch::optim::Adam"));
  CHECK(torch::equal(test::flat_parameters(*model), before));
  // A failure after the weights were read (an optimizer of another shape) puts them back too.
  torch::optim::SGD other(std::vector<torch::Tensor>{model->weight}, torch::optim::SGDOptions(0.1).momentum(0.9));
  CHECK_THROWS_WITH(acc::load_checkpoint(dir / "sgd.pt", *model, &other), Catch::Contains("does not fit this optimizer"));
  CHECK(torch::equal(test::flat_parameters(*model), before));
  std::filesystem::remove_all(dir);
}

namespace {
// Rewrites a LibTorch archive as if every tensor in it had been saved on cuda:0 (the storage location in each pickle
// says "cuda:0"), which is what a GPU run writes. Python's zipfile does the rewriting; false when there is no python3.
bool as_if_saved_on_gpu(const fs::path& from, const fs::path& to) {
  const std::string script =
      "import sys, zipfile\n"
      "with zipfile.ZipFile(sys.argv[1]) as zin, zipfile.ZipFile(sys.argv[2], 'w', zipfile.ZIP_STORED) as zout:\n"
      "    for info in zin.infolist():\n"
      "        data = zin.read(info.filename)\n"
      "        if info.filename.endswith('.pkl'):\n"
      "            data = data.replace(b'X\\x03\\x00\\x00\\x00cpu', b'X\\x06\\x00\\x00\\x00cuda:0')\n"
      "        zout.writestr(info.filename, data)\n";
  const auto script_file = to.string() + ".py";
  std::ofstream(script_file) << script;
  return std::system(("python3 '" + script_file + "' '" + from.string() + "' '" + to.string() + "' 2>/dev/null").c_str()) == 0;
}
}  // namespace

TEST_CASE("a checkpoint and a training state saved on a GPU load onto this trainer's device", "[checkpoint][device]") {
  const auto dir = test::fresh_dir("gpu_saved");
  const auto data = test::regression_data(32);
  Fixture a;
  a.trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 8});
  a.trainer.save_checkpoint(dir / "ckpt.pt");
  a.trainer.save_training_state(dir / "state.pt");
  if (!as_if_saved_on_gpu(dir / "ckpt.pt", dir / "ckpt_gpu.pt") ||
      !as_if_saved_on_gpu(dir / "state.pt", dir / "state_gpu.pt")) {
    ACCELERATED_SKIP("python3 is needed to write a GPU-saved file on a machine without a GPU");
  }
  // The rewritten file does say CUDA: Python's torch.load (without map_location) could not open it here.
  CHECK(test::file_bytes(dir / "ckpt_gpu.pt").find("cuda:0") != std::string::npos);
  Fixture b;
  b.trainer.load_checkpoint(dir / "ckpt_gpu.pt");
  CHECK(torch::equal(test::flat_parameters(*a.model), test::flat_parameters(*b.model)));
  CHECK(b.model->weight.device() == torch::Device(torch::kCPU));

  // The training state resumes as the same file saved on the CPU does: the run continues to epoch 3 identically.
  Fixture from_gpu, from_cpu;
  from_gpu.trainer.load_training_state(dir / "state_gpu.pt");
  from_cpu.trainer.load_training_state(dir / "state.pt");
  from_gpu.trainer.train(data, {.num_epochs = 3, .per_device_batch_size = 8});
  from_cpu.trainer.train(data, {.num_epochs = 3, .per_device_batch_size = 8});
  CHECK(from_gpu.trainer.run_history().current_epoch() == 4);
  CHECK(torch::equal(test::flat_parameters(*from_cpu.model), test::flat_parameters(*from_gpu.model)));
  fs::remove_all(dir);
}

// ---- state dicts that Python reads and writes ([state_dict]) ----------------------------------------------------
namespace {
// tests/python/state_dict_interop.py's InteropNet, written in C++: convolutions, batch norm and a Sequential.
struct InteropNetImpl : torch::nn::Module {
  torch::nn::Sequential features{torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)),
                                 torch::nn::BatchNorm2d(4),
                                 torch::nn::ReLU(),
                                 torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3).stride(2)),
                                 torch::nn::BatchNorm2d(8),
                                 torch::nn::ReLU(),
                                 torch::nn::Flatten()};
  torch::nn::Linear head{72, 10};
  InteropNetImpl() {
    register_module("features", features);
    register_module("head", head);
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(features->forward(x)); }
};
TORCH_MODULE(InteropNet);

torch::Tensor flat_state(torch::nn::Module& module) {
  std::vector<torch::Tensor> parts;
  for (const auto& [name, tensor] : acc::state_dict_of(module)) parts.push_back(tensor.detach().flatten().to(torch::kDouble));
  return torch::cat(parts);
}

// A model whose batch-norm buffers have moved away from their initial values.
InteropNet trained_interop_net(std::uint64_t seed) {
  torch::manual_seed(seed);
  InteropNet net;
  for (int i = 0; i < 3; ++i) net->forward(torch::randn({16, 1, 8, 8}));
  net->eval();
  return net;
}

std::string python_with_torch() { return test::python_with("torch"); }

int run_interop_script(const std::string& python, const std::string& mode, const fs::path& weights, const fs::path& io) {
  return test::run_python(python, "state_dict_interop.py", {mode, weights.string(), io.string()});
}
}  // namespace

TEST_CASE("a state dict round-trips through save_state_dict and load_state_dict", "[state_dict]") {
  const auto dir = test::fresh_dir("state_dict");
  auto a = trained_interop_net(1);
  acc::save_state_dict(a, dir / "weights.pt");
  const auto entries = acc::read_state_dict(dir / "weights.pt");
  // Python's names and order: a module's parameters, then its buffers, then its children's.
  REQUIRE(entries.size() == 16);
  CHECK(entries[0].first == "features.0.weight");
  CHECK(entries[2].first == "features.1.weight");
  CHECK(entries[4].first == "features.1.running_mean");
  CHECK(entries[6].first == "features.1.num_batches_tracked");
  CHECK(entries[6].second.scalar_type() == torch::kLong);
  CHECK(entries[6].second.item<std::int64_t>() == 3);
  CHECK(entries[15].first == "head.bias");
  // An undefined buffer is left out, as Python leaves out a None buffer.
  struct WithEmptyBuffer : torch::nn::Module {
    WithEmptyBuffer() {
      register_parameter("w", torch::ones({2}));
      register_buffer("unset", torch::Tensor());
    }
  } with_empty;
  acc::save_state_dict(with_empty, dir / "empty_buffer.pt");
  const auto kept = acc::read_state_dict(dir / "empty_buffer.pt");
  REQUIRE(kept.size() == 1);
  CHECK(kept[0].first == "w");
  // LibTorch's own pickle_save (a type-tagged dict) is read too.
  c10::Dict<std::string, torch::Tensor> tagged;
  tagged.insert("w", torch::ones({2, 2}));
  const auto bytes = torch::pickle_save(tagged);
  std::ofstream(dir / "pickle_save.pt", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  const auto from_libtorch = acc::read_state_dict(dir / "pickle_save.pt");
  REQUIRE(from_libtorch.size() == 1);
  CHECK(torch::equal(from_libtorch[0].second, torch::ones({2, 2})));

  auto b = trained_interop_net(2);
  CHECK_FALSE(torch::equal(flat_state(*a), flat_state(*b)));
  const auto result = acc::load_state_dict(b, dir / "weights.pt");
  CHECK(result.missing_keys.empty());
  CHECK(result.unexpected_keys.empty());
  CHECK(torch::equal(flat_state(*a), flat_state(*b)));
  const auto input = torch::randn({2, 1, 8, 8});
  CHECK(torch::equal(a->forward(input), b->forward(input)));
  fs::remove_all(dir);
}

TEST_CASE("load_state_dict checks every name and shape before it changes anything", "[state_dict]") {
  const auto dir = test::fresh_dir("state_dict_checks");
  torch::nn::Sequential saved(torch::nn::Linear(4, 3), torch::nn::Linear(3, 2));
  acc::save_state_dict(saved, dir / "two_layers.pt");

  torch::nn::Sequential other(torch::nn::Linear(4, 5), torch::nn::BatchNorm1d(5));
  const auto before = flat_state(*other);
  try {
    acc::load_state_dict(other, dir / "two_layers.pt");
    FAIL("a state dict of another architecture was accepted");
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    CHECK_THAT(message, Catch::Contains("does not fit the model"));
    CHECK_THAT(message, Catch::Contains("missing: \"1.running_mean\", \"1.running_var\", \"1.num_batches_tracked\""));
    CHECK_THAT(message, Catch::Contains("size mismatch for 0.weight: [3, 4] in the file, [5, 4] in the model"));
    CHECK_THAT(message, Catch::Contains("size mismatch for 1.weight: [2, 3] in the file, [5] in the model"));
    CHECK_THAT(message, Catch::Contains("nothing was changed"));
  }
  CHECK(torch::equal(flat_state(*other), before));

  // Not strict: missing and unexpected entries are returned; what fits is loaded.
  torch::nn::Sequential first_only(torch::nn::Linear(4, 3));
  const auto result = acc::load_state_dict(first_only, dir / "two_layers.pt", {.strict = false});
  CHECK(result.missing_keys.empty());
  CHECK(result.unexpected_keys == std::vector<std::string>{"1.weight", "1.bias"});
  CHECK(torch::equal(first_only[0]->as<torch::nn::Linear>()->weight, saved[0]->as<torch::nn::Linear>()->weight));

  // A name map: the file's "0." becomes "encoder.", the rest is dropped.
  struct EncoderImpl : torch::nn::Module {
    torch::nn::Linear encoder{4, 3};
    EncoderImpl() { register_module("encoder", encoder); }
  };
  auto encoder = std::make_shared<EncoderImpl>();
  acc::load_state_dict(*encoder, dir / "two_layers.pt",
                       {.rename = [](const std::string& name) {
                         return name.rfind("0.", 0) == 0 ? "encoder." + name.substr(2) : std::string();
                       }});
  CHECK(torch::equal(encoder->encoder->bias, saved[0]->as<torch::nn::Linear>()->bias));
  fs::remove_all(dir);
}

TEST_CASE("a damaged or foreign state dict file is refused with its path", "[state_dict]") {
  const auto dir = test::fresh_dir("state_dict_bad");
  auto net = trained_interop_net(1);
  CHECK_THROWS_WITH(acc::load_state_dict(net, dir / "absent.pt"), Catch::Contains("absent.pt' is not a file"));
  std::ofstream(dir / "text.pt") << "not a zip";
  CHECK_THROWS_WITH(acc::load_state_dict(net, dir / "text.pt"),
                    Catch::Contains("text.pt' is not a zip-format torch.save file"));
  acc::save_state_dict(net, dir / "good.pt");
  const auto size = fs::file_size(dir / "good.pt");
  fs::copy_file(dir / "good.pt", dir / "truncated.pt");
  fs::resize_file(dir / "truncated.pt", size / 2);
  CHECK_THROWS_WITH(acc::load_state_dict(net, dir / "truncated.pt"), Catch::Contains("truncated.pt"));
  // LibTorch's own torch::save of a module is a TorchScript-style archive, not a state dict.
  torch::save(net, (dir / "torch_save.pt").string());
  CHECK_THROWS_WITH(acc::load_state_dict(net, dir / "torch_save.pt"), Catch::Contains("torch_save.pt"));
  fs::remove_all(dir);
}

namespace {
// A torch.save-style zip whose data.pkl is `pickle`, with one storage record data/0 of `storage_bytes` zero bytes.
void write_pickle_file(const fs::path& path, const std::string& pickle, std::size_t storage_bytes = 0) {
  caffe2::serialize::PyTorchStreamWriter writer(path.string());
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  const std::vector<char> zeros(storage_bytes, 0);
  if (storage_bytes > 0) writer.writeRecord("data/0", zeros.data(), zeros.size());
  writer.writeEndOfFile();
}
// A string literal's bytes, NULs included.
template <std::size_t N>
std::string raw(const char (&literal)[N]) {
  return std::string(literal, N - 1);
}
std::string pickle_int(std::int64_t value) {  // BININT, or LONG1 of 8 bytes beyond 32 bits
  if (value < INT32_MIN || value > INT32_MAX) {
    std::string out = raw("\x8a\x08");
    for (int i = 0; i < 8; ++i) out += static_cast<char>((static_cast<std::uint64_t>(value) >> (8 * i)) & 0xff);
    return out;
  }
  std::string out = "J";
  for (int i = 0; i < 4; ++i) out += static_cast<char>((static_cast<std::uint64_t>(value) >> (8 * i)) & 0xff);
  return out;
}
std::string pickle_text(const std::string& value) {  // BINUNICODE
  std::string out = "X";
  for (int i = 0; i < 4; ++i) out += static_cast<char>((value.size() >> (8 * i)) & 0xff);
  return out + value;
}
// torch._utils._rebuild_tensor_v2 of a float storage of 4 elements with the given offset, sizes and strides.
std::string pickle_tensor(std::int64_t offset, const std::vector<std::int64_t>& sizes,
                          const std::vector<std::int64_t>& strides) {
  std::string out = "\x80\x02" "ctorch._utils\n_rebuild_tensor_v2\n((" + pickle_text("storage") +
                    "ctorch\nFloatStorage\n" + pickle_text("0") + pickle_text("cpu") + pickle_int(4) + "tQ" +
                    pickle_int(offset) + "(";
  for (const auto v : sizes) out += pickle_int(v);
  out += "t(";
  for (const auto v : strides) out += pickle_int(v);
  return out + "t\x89" "ccollections\nOrderedDict\n)RtR.";
}
}  // namespace

TEST_CASE("a hostile state dict pickle is an exception naming the file, never a crash", "[state_dict][bad_input]") {
  const auto dir = test::fresh_dir("state_dict_hostile");
  auto refused = [&](const std::string& name, const std::string& pickle, const std::string& why,
                     std::size_t storage_bytes = 0) {
    INFO(name);
    write_pickle_file(dir / name, pickle, storage_bytes);
    CHECK_THROWS_WITH(acc::read_state_dict(dir / name), Catch::Contains(name) && Catch::Contains(why));
  };
  // TUPLE3 on an empty stack (it took three items from below the stack's bottom: SIGSEGV).
  refused("tuple3.pt", raw("\x80\x02\x87."), "TUPLE3 at byte 2 with 0 items on the stack");
  refused("tuple2_mark.pt", raw("\x80\x02(N\x86."), "TUPLE2 over a MARK");
  // A list nested a million deep (2 MB): destroyed recursively it overflowed the stack (SIGSEGV).
  const int depth = 1'000'000;
  refused("nested.pt", "\x80\x02" + std::string(depth, ']') + std::string(depth - 1, 'a') + ".",
          "holds something other than a dict");
  // A list appended to itself (it leaked); and a dict holding itself.
  refused("self_list.pt", raw("\x80\x02]q\x00h\x00" "a."), "holds something other than a dict");
  refused("self_dict.pt", raw("\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s."), "not a (name, tensor) pair");
  // 1 MB memoized once and copied 200 times: 200 MB asked for by a 1 MB file.
  std::string gets;
  for (int i = 0; i < 200; ++i) gets += raw("h\x00");
  refused("memo_copies.pt", "\x80\x02" + pickle_text(std::string(1 << 20, 'x')) + raw("q\x00") + gets + ".",
          "copies of memoized strings would take more than");
  // Sizes and strides that do not fit the 4-element storage, or each other.
  refused("strides_count.pt", pickle_tensor(0, {4}, {1, 1}), "a tensor with 1 sizes and 2 strides", 16);
  refused("negative_size.pt", pickle_tensor(0, {-4}, {1}), "size -4 and stride 1 in dimension 0", 16);
  refused("negative_stride.pt", pickle_tensor(3, {4}, {-1}), "size 4 and stride -1 in dimension 0", 16);
  refused("negative_offset.pt", pickle_tensor(-2, {2}, {1}), "storage offset -2", 16);
  refused("past_storage.pt", pickle_tensor(1, {4}, {1}), "reaches past its storage", 16);
  refused("far.pt", pickle_tensor(0, {2, 3}, {0x7fffffff, 0x7fffffff}), "reaches past its storage", 16);
  refused("overflow.pt", pickle_tensor(0, {std::int64_t{1} << 40, 2}, {std::int64_t{1} << 40, 1}),
          "sizes and strides overflow", 16);
  // A good tensor still loads (as something other than a dict: the checks refuse nothing valid).
  refused("good_tensor.pt", pickle_tensor(0, {2, 2}, {2, 1}), "holds something other than a dict", 16);
  fs::remove_all(dir);
}

TEST_CASE("checkpoints and training states are torch.save files that a TorchScript archive cannot pass for",
          "[checkpoint][resume][bad_input]") {
  const auto dir = test::fresh_dir("format");
  Fixture f;
  train_and_save_both(f, dir);
  // The records torch.save writes (a pickle and raw storages), and none of a TorchScript archive's.
  for (const auto* name : {"ckpt.pt", "state.pt"}) {
    const auto bytes = test::file_bytes(dir / name);
    CHECK(bytes.find("/data.pkl") != std::string::npos);
    CHECK(bytes.find("/data/0") != std::string::npos);
    CHECK(bytes.find("constants.pkl") == std::string::npos);
    CHECK(bytes.find("/code/") == std::string::npos);
  }
  // A file in the format of accelerated 0.1 (a TorchScript archive, what torch::save writes) is refused unread.
  torch::serialize::OutputArchive old;
  old.write("accelerated_format_version", torch::tensor(1, torch::kLong));
  old.save_to((dir / "old.pt").string());
  CHECK_THROWS_WITH(f.trainer.load_checkpoint(dir / "old.pt"),
                    Catch::Contains("old.pt' is a TorchScript archive") && Catch::Contains("accelerated 0.1"));
  CHECK_THROWS_WITH(f.trainer.load_training_state(dir / "old.pt"), Catch::Contains("old.pt' is a TorchScript archive"));
  fs::remove_all(dir);
}

TEST_CASE("an optimizer's typed lists and a callback's dicts round-trip through a checkpoint", "[checkpoint]") {
  const auto dir = test::fresh_dir("typed_values");
  const auto data = test::regression_data(32);
  // LBFGS keeps deques of tensors (List[Tensor]) and an optional string; a run needs a closure, so steps are taken by
  // hand here.
  auto step = [&](torch::nn::Linear& model, torch::optim::LBFGS& optimizer) {
    optimizer.step([&] {
      optimizer.zero_grad();
      auto loss = torch::mse_loss(model->forward(data.first), data.second);
      loss.backward();
      return loss;
    });
  };
  auto a = test::linear_model(1);
  torch::optim::LBFGS lbfgs_a(a->parameters(), torch::optim::LBFGSOptions(0.5).history_size(4));
  for (int i = 0; i < 3; ++i) step(a, lbfgs_a);
  acc::save_checkpoint(dir / "lbfgs.pt", *a, &lbfgs_a);
  auto b = test::linear_model(2);
  torch::optim::LBFGS lbfgs_b(b->parameters(), torch::optim::LBFGSOptions(0.5).history_size(4));
  acc::load_checkpoint(dir / "lbfgs.pt", *b, &lbfgs_b);
  step(a, lbfgs_a);
  step(b, lbfgs_b);
  CHECK(torch::equal(test::flat_parameters(*a), test::flat_parameters(*b)));

  // Dicts, lists and tuples a callback writes come back with their types; so do the contents of an archive passed
  // through LibTorch's own serialisation (the route taken on LibTorch versions whose archive layout is not known).
  torch::serialize::OutputArchive out;
  c10::Dict<std::string, std::int64_t> counts;
  counts.insert("a", 1);
  counts.insert("b", 2);
  out.write("counts", counts);
  out.write("empty", c10::List<torch::Tensor>());
  out.write("pair", c10::ivalue::Tuple::create({c10::IValue(0.5), c10::IValue(std::string("x"))}));
  out.write("none", c10::IValue());
  acc::detail::write_archive_file(dir / "values.pt", out);
  auto in = acc::detail::read_archive_file(dir / "values.pt", "test", torch::kCPU);
  c10::IValue value;
  in.read("counts", value);
  REQUIRE(value.isGenericDict());
  CHECK(value.toGenericDict().at("b").toInt() == 2);
  CHECK(*value.type() == *c10::DictType::create(c10::StringType::get(), c10::IntType::get()));
  in.read("empty", value);
  CHECK(value.isTensorList());
  CHECK(value.toTensorList().empty());
  in.read("pair", value);
  CHECK(value.toTupleRef().elements()[1].toStringRef() == "x");
  in.read("none", value);
  CHECK(value.isNone());
  torch::serialize::OutputArchive again;
  again.write("counts", counts);
  auto through_bytes = acc::detail::input_archive_by_bytes(again);
  through_bytes.read("counts", value);
  CHECK(value.toGenericDict().at("a").toInt() == 1);
  fs::remove_all(dir);
}

TEST_CASE("an archive's limits: nesting, expansion, repeated views, types it cannot read back, and the device",
          "[checkpoint][bad_input]") {
  const auto dir = test::fresh_dir("archive_limits");
  auto refused = [&](const std::string& name, const std::string& pickle, const std::string& why) {
    INFO(name);
    write_pickle_file(dir / name, pickle, 16);
    CHECK_THROWS_WITH(acc::detail::read_archive_file(dir / name, "test", torch::kCPU),
                      Catch::Contains(name) && Catch::Contains(why));
  };
  // {"a": (((...(None,)...),)} nested 40 deep.
  refused("deep.pt", "\x80\x02}(" + pickle_text("a") + std::string(40, '(') + "N" + std::string(40, 't') + "u.",
          "is nested more than 32 deep");
  // {"a": t30} where t(k+1) = (t(k), t(k)) through the memo: 2^30 values from 150 bytes.
  std::string doubling = "\x80\x02}(" + pickle_text("a") + raw("Nq\x00");
  for (int i = 0; i < 30; ++i) doubling += raw("h\x00\x86q\x00");
  refused("doubling.pt", doubling + "u.", "expands into more values than the file holds");
  // A view of 2^31 elements with stride 0 over a storage of 4.
  refused("stride0.pt", pickle_tensor(0, {std::int64_t{1} << 31}, {0}), "more elements than its storage of 4 holds");
  // Saving what could not be read back is refused at the save, naming the entry.
  torch::serialize::OutputArchive unreadable;
  unreadable.write("devices", c10::List<c10::Device>({c10::Device(torch::kCPU)}));
  CHECK_THROWS_WITH(acc::detail::write_archive_file(dir / "devices.pt", unreadable),
                    Catch::Contains("entry 'devices' is a List[Device], which an archive cannot hold"));
  CHECK_FALSE(fs::exists(dir / "devices.pt"));
  // Every tensor lands on the load's device, the optimizer's state and typed lists included ("meta" stands in for a
  // GPU here; where the file says it was saved is ignored).
  auto model = test::linear_model();
  torch::optim::LBFGS lbfgs(model->parameters(), torch::optim::LBFGSOptions(0.5).history_size(2));
  const auto data = test::regression_data(16);
  for (int i = 0; i < 2; ++i) {
    lbfgs.step([&] {
      lbfgs.zero_grad();
      auto loss = torch::mse_loss(model->forward(data.first), data.second);
      loss.backward();
      return loss;
    });
  }
  acc::save_checkpoint(dir / "lbfgs.pt", *model, &lbfgs);
  auto meta = acc::detail::read_archive_file(dir / "lbfgs.pt", "test", torch::kMeta);
  std::size_t tensors = 0;
  std::function<void(torch::serialize::InputArchive&)> walk = [&](torch::serialize::InputArchive& archive) {
    for (const auto& key : archive.keys()) {
      torch::serialize::InputArchive nested;
      if (archive.try_read(key, nested)) {
        walk(nested);
        continue;
      }
      c10::IValue value;
      archive.read(key, value);
      std::vector<c10::IValue> values{value};
      if (value.isList()) values = value.toListRef().vec();
      for (const auto& v : values) {
        if (!v.isTensor()) continue;
        CHECK(v.toTensor().device() == torch::Device(torch::kMeta));
        ++tensors;
      }
    }
  };
  walk(meta);
  CHECK(tensors >= 8);  // the weights, the version, the LBFGS state's tensors and its lists' items
  // A module with an empty buffer (registered undefined) saves and loads: the empty buffer is left out.
  struct WithEmptyBuffer : torch::nn::Module {
    torch::Tensor w = register_parameter("w", torch::ones({2}));
    torch::Tensor unset = register_buffer("unset", torch::Tensor());
  } with_empty, loaded;
  acc::save_checkpoint(dir / "empty_buffer.pt", with_empty);
  loaded.w.detach().zero_();
  acc::load_checkpoint(dir / "empty_buffer.pt", loaded);
  CHECK(torch::equal(loaded.w, with_empty.w));
  fs::remove_all(dir);
}

namespace {
// Saves, in the place of EarlyStopping's state, a "best" of two numbers: a section that is present (what loading
// the file checks) but that EarlyStopping cannot read when train() applies it.
struct DamagedEarlyStoppingState {
  void operator()(acc::on_train_epoch_end, auto&) {}
  void save_state(torch::serialize::OutputArchive& archive) const {
    archive.write("best", torch::ones({2}, torch::kDouble));
    archive.write("epochs_without_improvement", torch::tensor(std::int64_t{0}));
  }
  void load_state(torch::serialize::InputArchive&) {}
};
}  // namespace

TEST_CASE("a damaged section applied when train() starts is an error naming the file and the section",
          "[resume][bad_input]") {
  const auto dir = test::fresh_dir("damaged_section");
  const auto data = test::regression_data(32);
  {
    auto model = test::linear_model();
    torch::optim::SGD sgd(model->parameters(), 0.01);
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, DamagedEarlyStoppingState> saver(
        model, torch::nn::MSELoss(), sgd, DamagedEarlyStoppingState{});
    saver.set_output(test::quiet());
    saver.save_training_state(dir / "state.pt");
  }
  auto model = test::linear_model();
  torch::optim::SGD sgd(model->parameters(), 0.01);
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::EarlyStopping> trainer(
      model, torch::nn::MSELoss(), sgd, acc::callbacks::EarlyStopping{});
  trainer.set_output(test::quiet());
  trainer.load_training_state(dir / "state.pt");  // the section is there: the load itself succeeds
  const auto message = test::message_of([&] { trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 8}, data); });
  CHECK_THAT(message, Catch::Contains("resuming '" + (dir / "state.pt").string() + "': entry 'callback_0' could not be "
                                      "loaded: accelerated: a callback's saved 'best' holds 2 values, not one"));
  CHECK_THAT(message, !Catch::Contains("Exception raised from"));
  fs::remove_all(dir);
}

TEST_CASE("a damaged checkpoint or training state is an exception naming the file, never a crash",
          "[checkpoint][resume][bad_input]") {
  const auto dir = test::fresh_dir("hostile_archives");
  Fixture f;
  train_and_save_both(f, dir, {{"best", 0.5}});
  // Mutated copies, as the issue's fuzzer made them (byte flips, truncations, zip fields): each loads or throws an
  // exception naming the file without LibTorch's backtrace. LibTorch's TorchScript loader crashed on 21 in 5,000.
  std::mt19937 random(2026);
  int refused = 0, cases = 0;
  for (const auto* name : {"ckpt.pt", "state.pt"}) {
    const auto good = test::file_bytes(dir / name);
    for (int i = 0; i < 250; ++i, ++cases) {
      auto bytes = good;
      switch (i % 4) {
        case 0:  // 1-4 flipped bytes anywhere
          for (int n = 1 + static_cast<int>(random() % 4); n > 0; --n) bytes[random() % bytes.size()] ^= static_cast<char>(1 + random() % 255);
          break;
        case 1:  // cut short
          bytes.resize(random() % bytes.size());
          break;
        case 2: {  // a 4-byte field of the last quarter (zip headers) set to a large or random value
          const auto at = bytes.size() * 3 / 4 + random() % (bytes.size() / 4 - 4);
          put_u32(bytes, at, (random() % 2) ? 0xffffffffu : static_cast<std::uint32_t>(random()));
          break;
        }
        default: {  // a byte of the pickle (its opcodes and lengths) changed, with the CRCs made right again
          const auto start = bytes.find("data.pkl") + 8;
          bytes[start + 30 + random() % 400] = static_cast<char>(random());
          bytes = acc::fuzz::with_fixed_crcs(bytes);
          break;
        }
      }
      const auto mutated = dir / ("mutated_" + std::to_string(cases) + ".pt");
      test::write_bytes(mutated, bytes);
      Fixture target;
      const auto before = test::flat_parameters(*target.model);
      const auto error = name == std::string("ckpt.pt")
                             ? test::load_error(mutated, [&] { target.trainer.load_checkpoint(mutated); })
                             : test::load_error(mutated, [&] { target.trainer.load_training_state(mutated); });
      refused += error.empty() ? 0 : 1;
      if (!error.empty()) CHECK(torch::equal(before, test::flat_parameters(*target.model)));  // left as it was
      fs::remove(mutated);
    }
  }
  INFO(refused << " of " << cases << " mutated files refused");
  CHECK(refused > cases / 2);
  fs::remove_all(dir);
}

TEST_CASE("the zip layer refuses records that claim more than the file holds, compressed records and torn copies",
          "[checkpoint][resume][bad_input]") {
  const auto dir = test::fresh_dir("zip_layer");
  Fixture f;
  const auto data = test::regression_data(32);
  f.trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 8});
  f.trainer.save_training_state(dir / "a.pt");
  const auto good = test::file_bytes(dir / "a.pt");
  {  // A record whose sizes claim 2 GB in a file of a few KB: refused before anything is allocated.
    auto bytes = good;
    const auto entry = directory_entry(bytes, "/data/0");
    put_u32(bytes, entry + 20, 0x7fffffff);
    put_u32(bytes, entry + 24, 0x7fffffff);
    test::write_bytes(dir / "huge.pt", bytes);
    Fixture target;
    CHECK_THAT(test::load_error(dir / "huge.pt", [&] { target.trainer.load_training_state(dir / "huge.pt"); }),
               Catch::Contains("record 'archive/data/0' of 2147483647 bytes reaching past its data"));
  }
  {  // A compressed record: torch.save never writes one.
    auto bytes = good;
    bytes[directory_entry(bytes, "/data.pkl") + 10] = 8;
    test::write_bytes(dir / "deflated.pt", bytes);
    Fixture target;
    CHECK_THAT(test::load_error(dir / "deflated.pt", [&] { target.trainer.load_training_state(dir / "deflated.pt"); }),
               Catch::Contains("has a compressed record 'archive/data.pkl' (method 8)"));
  }
  {  // Two directory entries pointing at one record: each would be read, and allocated, in full.
    auto bytes = good;
    const auto first = directory_entry(bytes, "/data/0"), second = directory_entry(bytes, "/data/1");
    bytes.replace(second + 42, 4, bytes.substr(first + 42, 4));  // data/1's local header offset := data/0's
    bytes.replace(second + 16, 12, bytes.substr(first + 16, 12));  // and its CRC and sizes
    test::write_bytes(dir / "shared.pt", bytes);
    Fixture target;
    CHECK_THAT(test::load_error(dir / "shared.pt", [&] { target.trainer.load_training_state(dir / "shared.pt"); }),
               Catch::Contains("that share bytes"));
    fs::remove(dir / "shared.pt");
  }
  // A torn copy: another process was rewriting the file in place (its first half new, the rest old). The CRC of the
  // records says so, and resuming from the folder passes over it to the state before.
  f.trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 8});
  f.trainer.save_training_state(dir / "b.pt");
  auto torn = test::file_bytes(dir / "b.pt");
  REQUIRE(torn.size() == good.size());
  torn.replace(torn.size() / 2, torn.size() - torn.size() / 2, good.substr(good.size() / 2));
  test::write_bytes(dir / "torn.pt", torn);
  {
    Fixture target;
    CHECK_THAT(test::load_error(dir / "torn.pt", [&] { target.trainer.load_training_state(dir / "torn.pt"); }),
               Catch::Contains("CRC-32 does not match"));
  }
  fs::remove(dir / "huge.pt");
  fs::remove(dir / "deflated.pt");
  acc::record_latest_training_state(dir, "torn.pt");
  Fixture resumed;
  std::ostringstream printed;
  resumed.trainer.set_output(printed);
  acc::TrainOptions options{.num_epochs = 3, .per_device_batch_size = 8};
  options.resume_from_newest_in = dir;
  resumed.trainer.train(data, options);
  CHECK_THAT(printed.str(), Catch::Contains("torn.pt' is damaged, incomplete or diverged, trying the one before it"));
  CHECK_THAT(printed.str(), Catch::Contains("Resuming from '" + (dir / "b.pt").string() + "'"));
  CHECK(resumed.trainer.run_history().current_epoch() == 4);
  fs::remove_all(dir);
}

TEST_CASE("every file the library writes opens in Python with torch.load(weights_only=True)", "[checkpoint][python]") {
  const auto python = python_with_torch();
  if (python.empty()) ACCELERATED_SKIP("no python3 with torch (Debian: apt-get install python3-torch)");
  const auto dir = test::fresh_dir("python_opens");
  Fixture f;
  train_and_save_both(f, dir, {{"best", 0.25}});
  REQUIRE(test::run_python(python, "open_library_files.py",
                           {(dir / "ckpt.pt").string(), (dir / "state.pt").string(), (dir / "back.pt").string()}) == 0);
  std::map<std::string, torch::Tensor> back;
  for (auto& [name, tensor] : acc::read_state_dict(dir / "back.pt")) back[name] = tensor;
  CHECK(torch::equal(back.at("weight"), f.model->weight.detach()));
  CHECK(back.at("epochs_done").item<std::int64_t>() == 1);
  CHECK(back.at("best").item<double>() == 0.25);
  fs::remove_all(dir);
}

TEST_CASE("Python reads save_state_dict's file and C++ reads torch.save(model.state_dict())", "[state_dict][python]") {
  const auto python = python_with_torch();
  if (python.empty()) ACCELERATED_SKIP("no python3 with torch (Debian: apt-get install python3-torch)");
  const auto dir = test::fresh_dir("state_dict_python");
  {  // C++ -> Python: strict load, outputs within 1e-6
    auto net = trained_interop_net(5);
    const auto input = torch::randn({5, 1, 8, 8});
    torch::NoGradGuard no_grad;
    acc::save_state_dict(net, dir / "from_cpp.pt");
    acc::save_state_dict({{"input", input}, {"output", net->forward(input)}}, dir / "from_cpp_io.pt");
    CHECK(run_interop_script(python, "check_cpp_file", dir / "from_cpp.pt", dir / "from_cpp_io.pt") == 0);
  }
  {  // Python -> C++: torch.save(model.state_dict()) (an OrderedDict with _metadata), strict, outputs within 1e-6
    REQUIRE(run_interop_script(python, "write_python_file", dir / "from_python.pt", dir / "from_python_io.pt") == 0);
    auto net = trained_interop_net(9);
    const auto result = acc::load_state_dict(net, dir / "from_python.pt");
    CHECK(result.missing_keys.empty());
    CHECK(result.unexpected_keys.empty());
    std::map<std::string, torch::Tensor> io;
    for (auto& [name, tensor] : acc::read_state_dict(dir / "from_python_io.pt")) io[name] = tensor;
    net->eval();
    torch::NoGradGuard no_grad;
    const auto difference = (net->forward(io.at("input")) - io.at("output")).abs().max().item<double>();
    INFO("max |output difference| = " << difference);
    CHECK(difference <= 1e-6);
  }
  fs::remove_all(dir);
}

// ---- the fuzz corpus ([fuzz]) ---------------------------------------------------------------------------------
TEST_CASE("every input of the fuzz corpus ends in a value or an exception naming the file or variable",
          "[bad_input][fuzz]") {
  // tests/fuzz/corpus/<target>/: the seeds, and every input that ever crashed, hung or over-allocated a reader
  // (scripts/fuzz.sh finds them). A reader that crashes or names nothing aborts this test.
  const fs::path corpus = std::string(ACCELERATED_TEST_SOURCE_DIR) + "/fuzz/corpus";
  std::map<std::string, int> replayed;
  for (const auto& target : acc::fuzz::target_names()) {
    for (const auto& entry : fs::directory_iterator(corpus / target)) {
      acc::fuzz::run(target, test::file_bytes(entry.path()));
      ++replayed[target];
    }
  }
  for (const auto& target : acc::fuzz::target_names()) {
    INFO(target);
    CHECK(replayed[target] >= 2);
  }
}

// Writes the seeds of the fuzz corpus into $FUZZ_SEED_DIR/<target>/ (run by hand; Python's seeds come from
// tests/fuzz/python_seeds.py).
TEST_CASE("fuzz seeds", "[.fuzz_seeds]") {
  const char* seed_dir = std::getenv("FUZZ_SEED_DIR");
  if (seed_dir == nullptr) FAIL("set FUZZ_SEED_DIR to the corpus folder (tests/fuzz/corpus)");
  const fs::path out = seed_dir;
  for (const auto& target : acc::fuzz::target_names()) fs::create_directories(out / target);
  auto& t = acc::fuzz::targets();
  t.trainer.set_output(test::quiet());
  t.trainer.train(test::regression_data(16), {.num_epochs = 1, .per_device_batch_size = 8}, test::regression_data(8));
  t.trainer.save_checkpoint(out / "checkpoint" / "seed_trainer.pt", {{"best", 0.5}});
  acc::save_checkpoint(out / "checkpoint" / "seed_no_optimizer.pt", *t.model);
  t.trainer.save_training_state(out / "training_state" / "seed_trainer.pt");
  acc::save_state_dict(*t.model, out / "state_dict" / "seed_cpp.pt");
  std::string idx = std::string("\0\0\x08\x03\0\0\0\x02\0\0\0\x1c\0\0\0\x1c", 16) + std::string(2 * 28 * 28, '\x7f');
  test::write_bytes(out / "idx" / "seed_images.idx", idx);
  test::write_bytes(out / "idx" / "seed_labels.idx", std::string("\0\0\x08\x01\0\0\0\x03\x01\x02\x03", 11));
  test::write_bytes(out / "latest" / "seed_name", "step_1.pt\n");
  test::write_bytes(out / "latest" / "seed_outside", "../step_1.pt\n");
  test::write_bytes(out / "env" / "seed_torchrun", "1\n2\n1\n2\n127.0.0.1\n29500\n");
  test::write_bytes(out / "env" / "seed_options", "\n\n\n\n\n\n\n\n\n\n\n\n2.5\n30\nyes\ngloo\n4\n8\n");
  test::write_bytes(out / "env" / "seed_run_switches", std::string(22, '\n') + "on\n1\nbf16\n");
}
