// Sharded optimizer state (ZeRO stage 1) against unsharded data parallel, in one process with the ranks as threads
// over the same transport: the optimizer bytes each rank holds, and the time of a training epoch (forward, backward
// with the gradient all-reduce, the step, and for the sharded run the parameter exchange).
// Model: a deep MLP, 8 x Linear(1024, 1024) (8.4 M parameters; Adam's state is 67 MB unsharded). One JSON line per
// world size; over Gloo a second one times the exchange alone, as DataParallel does it over Gloo (messages straight
// from and into the parameters) against the bucketed all-gather it uses over shared memory, alternating, in one run.
// Usage: bench_zero1 [shared_memory|gloo] [world sizes, default "2 4"]
#include "common.hpp"

#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <cstdlib>
#include <future>

namespace nn = torch::nn;
namespace acc = accelerated;

namespace {

nn::Sequential deep_mlp() {
  torch::manual_seed(0);
  nn::Sequential model;
  for (int i = 0; i < 8; ++i) {
    model->push_back(nn::Linear(1024, 1024));
    model->push_back(nn::ReLU());
  }
  model->push_back(nn::Linear(1024, 10));
  return model;
}

struct Measured {
  double epoch_s = 0;
  std::int64_t state_bytes = 0;     // this rank's optimizer state
  std::int64_t exchange_bytes = 0;  // the exchange's buffers
  std::string transport;
};

// One rank: a warm-up epoch, then `rounds` timed epochs; returns the median epoch time.
Measured one_rank(int rank, int world, c10::intrusive_ptr<c10d::Store> store, bool shard,
                  acc::distributed::Transport transport, const std::pair<torch::Tensor, torch::Tensor>& data,
                  int rounds) {
  auto model = deep_mlp();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-4));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, bench::EpochTimes> trainer(
      model, nn::CrossEntropyLoss(), optimizer, {});
  acc::DataParallelOptions options;
  options.transport = transport;
  options.shard_optimizer_state = shard;
  if (const char* mib = std::getenv("BENCH_BUCKET_MIB")) options.shard_exchange_bucket_bytes = std::stoll(mib) << 20;
  trainer.distributed() = acc::DataParallel(store, rank, world, options);
  trainer.set_output(std::cerr);
  const acc::TrainOptions train{.num_epochs = 1, .per_device_batch_size = 16, .seed = 1, .num_workers = 0};
  trainer.train(data, train);  // warm-up: joins, makes every buffer and the optimizer state
  std::vector<double> epochs;
  for (int r = 0; r < rounds; ++r) {
    trainer.train(data, train);
    epochs.push_back(trainer.template callback<bench::EpochTimes>().seconds.back());
  }
  Measured m{bench::median(epochs), acc::distributed::optimizer_state_bytes(optimizer), 0,
             trainer.distributed().transport()};
  if (const auto* s = trainer.distributed().optimizer_shard()) m.exchange_bytes = s->exchange_buffer_bytes();
  return m;
}

std::vector<Measured> run(int world, bool shard, acc::distributed::Transport transport,
                          const std::pair<torch::Tensor, torch::Tensor>& data, int rounds) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::future<Measured>> ranks;
  for (int r = 0; r < world; ++r) {
    ranks.push_back(std::async(std::launch::async, [=, &data] {
      return one_rank(r, world, store, shard, transport, data, rounds);
    }));
  }
  std::vector<Measured> out;
  for (auto& f : ranks) out.push_back(f.get());
  return out;
}

// The exchange alone over Gloo, `reps` times each way, alternating: medians in ms of rank 0 (after 3 warm-up rounds).
std::pair<double, double> exchange_ms(int world, int reps) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::future<std::pair<double, double>>> ranks;
  for (int r = 0; r < world; ++r) {
    ranks.push_back(std::async(std::launch::async, [=] {
      auto model = deep_mlp();
      torch::optim::Adam optimizer(model->parameters());
      auto group = acc::distributed::make_process_group(store, r, world, std::chrono::seconds(60), "127.0.0.1",
                                                        acc::distributed::Transport::gloo);
      acc::distributed::OptimizerShard shard(optimizer, r, world, acc::DataParallelOptions{}.shard_exchange_bucket_bytes);
      using Tensors = std::vector<torch::Tensor>;
      std::vector<double> gathered, messages;
      const auto timed = [&](auto&& exchange) {
        group->barrier()->wait();
        const auto start = std::chrono::steady_clock::now();
        exchange();
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      };
      for (int rep = 0; rep < reps + 3; ++rep) {
        const auto a = timed([&] {
          shard.exchange([&](torch::Tensor& send, Tensors& receive) {
            std::vector<Tensors> out{receive};
            Tensors in{send};
            group->allgather(out, in)->wait();
          });
        });
        const auto b = timed([&] {
          shard.exchange_by_messages(
              [&](torch::Tensor& t, std::int64_t peer, std::int64_t tag) {
                Tensors message{t};
                return group->send(message, static_cast<int>(peer), static_cast<int>(tag));
              },
              [&](torch::Tensor& t, std::int64_t peer, std::int64_t tag) {
                Tensors message{t};
                return group->recv(message, static_cast<int>(peer), static_cast<int>(tag));
              },
              [](const c10::intrusive_ptr<c10d::Work>& work) { work->wait(); });
        });
        if (rep >= 3) gathered.push_back(a), messages.push_back(b);
      }
      return std::pair{bench::median(gathered), bench::median(messages)};
    }));
  }
  std::vector<std::pair<double, double>> out;
  for (auto& f : ranks) out.push_back(f.get());
  return out[0];
}

}  // namespace

int main(int argc, char** argv) {
  const std::string transport_name = argc > 1 ? argv[1] : "shared_memory";
  const auto transport =
      transport_name == "gloo" ? acc::distributed::Transport::gloo : acc::distributed::Transport::shared_memory;
  std::vector<int> worlds;
  for (int i = 2; i < argc; ++i) worlds.push_back(std::stoi(argv[i]));
  if (worlds.empty()) worlds = {2, 4};
  // One intra-op thread per rank: the ranks are the parallelism. Through the trainer's own setting: where LibTorch
  // starts at 1 thread (here), at::set_num_threads(1) alone cannot be told from no call, and the first trainer raised
  // the count to the 2 cores; the ranks' matrix products then spun for each other, and forward took 30-38 ms a step
  // sharded over Gloo against 9-10 ms unsharded (5 ms in both at one thread). at::set_num_threads(1) as well, for
  // the ranks' threads, which run LibTorch ops (the model's init) before their trainer exists.
  ::setenv("ACCELERATED_NUM_THREADS", "1", 1);
  at::set_num_threads(1);
  for (const int world : worlds) {
    torch::manual_seed(1);
    const auto data = std::pair{torch::randn({16 * world * 6, 1024}), torch::randint(0, 10, {16 * world * 6})};
    // Alternating rounds, so that the machine's noise falls on both variants alike.
    std::vector<double> plain_s, sharded_s;
    std::vector<Measured> plain, sharded;
    for (int round = 0; round < 3; ++round) {
      plain = run(world, false, transport, data, 3);
      sharded = run(world, true, transport, data, 3);
      plain_s.push_back(plain[0].epoch_s);
      sharded_s.push_back(sharded[0].epoch_s);
    }
    std::int64_t largest = 0, total = 0;
    for (const auto& m : sharded) largest = std::max(largest, m.state_bytes), total += m.state_bytes;
    std::int64_t parameters = 0;
    for (const auto& p : deep_mlp()->parameters()) parameters += p.numel();
    std::ostringstream json;
    acc::detail::JsonObject out(json);
    out.field("benchmark", "sharded optimizer state")
        .field("world_size", static_cast<std::int64_t>(world))
        .field("optimizer", "adam")
        .field("parameters", parameters)
        .field("transport", sharded[0].transport)
        .field("optimizer_bytes_unsharded", plain[0].state_bytes)
        .field("optimizer_bytes_per_rank_max", largest)
        .field("optimizer_bytes_all_ranks", total)
        .field("optimizer_bytes_per_rank_ratio", static_cast<double>(largest) / static_cast<double>(plain[0].state_bytes))
        .field("goal_bytes_per_rank_ratio", 1.0 / world + 0.1)
        .field("exchange_buffer_bytes", sharded[0].exchange_bytes)
        .field("epoch_s_unsharded", bench::median(plain_s))
        .field("epoch_s_sharded", bench::median(sharded_s))
        .field("sharded_step_time_ratio", bench::median(sharded_s) / bench::median(plain_s))
        .field("updates_per_epoch", std::int64_t{6});
    out.close();
    std::cout << json.str() << std::endl;
    if (transport != acc::distributed::Transport::gloo) continue;
    const auto [gathered_ms, messages_ms] = exchange_ms(world, 12);
    std::ostringstream exchange_json;
    acc::detail::JsonObject exchange(exchange_json);
    exchange.field("benchmark", "sharded exchange over gloo")
        .field("world_size", static_cast<std::int64_t>(world))
        .field("parameter_bytes", parameters * 4)
        .field("allgather_ms", gathered_ms)
        .field("messages_ms", messages_ms)
        .field("messages_to_allgather_ratio", messages_ms / gathered_ms);
    exchange.close();
    std::cout << exchange_json.str() << std::endl;
  }
}
