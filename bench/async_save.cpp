// Asynchronous training-state saves: how long the step loop stops for a save, written at once
// (Trainer::save_training_state) against in the background (save_training_state_async), in one process, for a state
// of about 256 MB (a 2-layer MLP of 4096 x 4096 weights, SGD with momentum: the weights and their momentum).
// The same run (45 updates, a save every 10) goes three ways, alternating, `--rounds` times: with no saves, with
// synchronous saves and with asynchronous ones.
//   async_save_stall_ratio  median time the loop stops at a save: asynchronous (the host copy) / synchronous (the
//                           whole write, flushed to disk)
//   async_wait_s            median time a later save waited for the write before it
//   async_end_wait_s        median time the run's end waited for the last write (5 updates after it began)
//   sync_run_time_ratio, async_run_time_ratio   the run's time with saves / with none (the writer shares the cores)
// The files go to --dir (default: bench_async_save_states in the current folder), which should be on the disk that
// real states go to, not a tmpfs; it is removed afterwards.
// Usage: bench_async_save [--rounds N] [--dir PATH] [--width W]
#include <filesystem>
#include <map>

#include "common.hpp"

namespace acc = accelerated;
namespace fs = std::filesystem;

namespace {

enum class Saves { none, sync, async };

struct TimedSaves {
  Saves how = Saves::none;
  fs::path dir;
  std::shared_ptr<std::vector<double>> stops = std::make_shared<std::vector<double>>();
  std::shared_ptr<std::vector<double>> waits = std::make_shared<std::vector<double>>();
  std::shared_ptr<std::vector<double>> end_waits = std::make_shared<std::vector<double>>();

  template <class Trainer>
  void operator()(acc::on_update_step_end, Trainer& trainer) {
    const auto step = trainer.state().update_step;
    if (how == Saves::none || step % 10 != 0) return;
    const auto path = dir / ("step_" + std::to_string(step) + ".pt");
    if (how == Saves::sync) {
      stops->push_back(bench::time_it([&] { trainer.save_training_state(path); }));
      return;
    }
    if (step > 10) waits->push_back(bench::time_it([&] { trainer.wait_for_async_save(); }));  // the save would wait
    stops->push_back(bench::time_it([&] { trainer.save_training_state_async(path); }));
  }
  template <class Trainer>
  void operator()(acc::on_training_run_end, Trainer& trainer) {
    if (how == Saves::async) end_waits->push_back(bench::time_it([&] { trainer.wait_for_async_save(); }));
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i + 1 < argc; i += 2) args[argv[i]] = argv[i + 1];
  const int rounds = args.count("--rounds") ? std::stoi(args["--rounds"]) : 3;
  const std::int64_t width = args.count("--width") ? std::stoll(args["--width"]) : 4096;
  const fs::path dir = args.count("--dir") ? fs::path(args["--dir"]) : fs::path("bench_async_save_states");
  fs::create_directories(dir);

  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(width, width), torch::nn::ReLU(), torch::nn::Linear(width, width),
                                     torch::nn::ReLU(), torch::nn::Linear(width, 16));
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1e-4).momentum(0.9));
  std::int64_t parameters = 0;
  for (const auto& p : model->parameters()) parameters += p.numel();
  const double state_mb = 2.0 * static_cast<double>(parameters) * 4 / (1 << 20);  // weights and momentum, fp32
  const auto inputs = torch::randn({360, width});
  const auto targets = torch::randn({360, 16});

  std::vector<double> stop_sync, stop_async, wait_async, end_wait_async, run_none, run_sync, run_async;
  for (int round = 0; round < rounds; ++round) {
    for (const auto how : {Saves::none, Saves::sync, Saves::async}) {
      TimedSaves saves{how, dir};
      acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, TimedSaves> trainer(
          acc::Model(model.ptr()), torch::nn::MSELoss(), optimizer, saves);
      trainer.set_output(bench::null_stream());
      const auto took = bench::time_it([&] {
        trainer.train(std::make_pair(inputs, targets), {.num_epochs = 1, .per_device_batch_size = 8});  // 45 updates
      });
      (how == Saves::none ? run_none : how == Saves::sync ? run_sync : run_async).push_back(took);
      auto& stops = how == Saves::sync ? stop_sync : stop_async;
      stops.insert(stops.end(), saves.stops->begin(), saves.stops->end());
      if (how == Saves::async) {
        wait_async.insert(wait_async.end(), saves.waits->begin(), saves.waits->end());
        end_wait_async.insert(end_wait_async.end(), saves.end_waits->begin(), saves.end_waits->end());
      }
    }
  }
  fs::remove_all(dir);
  std::cout << "{\"benchmark\": \"async_save\", \"state_mb\": " << state_mb << ", \"rounds\": " << rounds
            << ", \"sync_stop_s\": " << bench::median(stop_sync) << ", \"async_stop_s\": " << bench::median(stop_async)
            << ", \"async_save_stall_ratio\": " << bench::median(stop_async) / bench::median(stop_sync)
            << ", \"async_wait_s\": " << bench::median(wait_async)
            << ", \"async_end_wait_s\": " << bench::median(end_wait_async)
            << ", \"sync_run_time_ratio\": " << bench::median(run_sync) / bench::median(run_none)
            << ", \"async_run_time_ratio\": " << bench::median(run_async) / bench::median(run_none) << "}"
            << std::endl;
}
