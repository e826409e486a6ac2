#pragma once
// Distributed policies: how many processes train together and how they agree. The menu:
//   SingleProcess    one process; every call below is a no-op.
//   DataParallel     one process per CPU (or GPU) over a c10d process group (shared memory when every rank is on
//                    this machine, Gloo otherwise): rank 0's parameters and buffers
//                    are broadcast at the start of each run, gradients are averaged by c10d::Reducer (bucketed
//                    all-reduce) on update steps only, metrics are summed over processes. Rendezvous from
//                    torchrun, OpenMPI or SLURM variables (distributed/environment.hpp), at the first run, once per
//                    process (distributed/membership.hpp).
//   AutoDistributed  the same type as DataParallel, which is a single process when the environment names no other
//                    ranks (the trainer's default), so one binary runs alone or under a launcher.
// A distributed policy provides, checked by accelerated::DistributedPolicy in concepts.hpp:
//   std::int64_t num_processes() const;  rank() const;  local_rank() const;
//   void prepare(torch::nn::Module&);    auto gradient_sync(bool enabled);  (a guard alive over forward and backward,
//                                                                           with void arm(const torch::Tensor& loss))
//   void all_reduce_sum(std::span<double>);  torch::Tensor gather(const torch::Tensor&);  void barrier();
// and optionally, as a pair, start_all_reduce_sum / finish_all_reduce_sum (the same sum, overlapped with work).
#include <torch/nn/module.h>
#include <torch/types.h>

#include <chrono>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <thread>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <string>
#include <vector>

#include "../distributed/call_site.hpp"
#include "../distributed/environment.hpp"
#include "../distributed/heartbeat.hpp"
#include "../distributed/optimizer_shard.hpp"

// Multi-process training needs LibTorch's Gloo process group and Gloo's own headers, which the official LibTorch
// zips and wheels do not ship (Debian's libgloo-dev has them).
#if __has_include(<torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>) && __has_include(<gloo/algorithm.h>) && \
    defined(USE_C10D_GLOO) && !defined(ACCELERATED_NO_DISTRIBUTED)
#define ACCELERATED_HAS_GLOO 1
#include "../distributed/gradient_sync.hpp"
#include "../distributed/membership.hpp"
#include "../distributed/process_group.hpp"
#include "../distributed/silent_peers.hpp"
#include "../distributed/watchdog.hpp"
#else
#define ACCELERATED_HAS_GLOO 0
#endif

namespace accelerated {

struct SingleProcess {
  struct NoSyncGuard {
    void arm(const torch::Tensor&) {}
  };

  std::int64_t num_processes() const { return 1; }
  std::int64_t rank() const { return 0; }
  std::int64_t local_rank() const { return 0; }
  void prepare(torch::nn::Module&) {}
  NoSyncGuard gradient_sync(bool) { return {}; }
  void all_reduce_sum(std::span<double>) {}
  torch::Tensor gather(const torch::Tensor& tensor) { return tensor; }
  void barrier() {}
};

struct DataParallelOptions {
  // Any wait: rendezvous, collectives, a dead peer. 5 minutes, or ACCELERATED_TIMEOUT_SECONDS; a value set in code
  // wins over both.
  std::chrono::milliseconds timeout = distributed::timeout_from_env(std::chrono::minutes(5));
  // Under a launcher, a rank that has waited this long on its peers (a collective, or backward's gradient averaging)
  // makes the watchdog report every rank's step and phase and end the process with DataParallel::hang_exit_code.
  // Zero: a third of the timeout. ACCELERATED_WATCHDOG_SECONDS sets it from outside (distributed/watchdog.hpp).
  std::chrono::milliseconds watchdog_threshold = distributed::watchdog_threshold_from_env();
  // A debugging mode for any transport: before each of DataParallel's collectives every rank writes what it is
  // about to call (operation, size, call site; distributed/call_site.hpp) to the store and compares it with every
  // other rank's, so that ranks that diverged fail at once naming both calls instead of pairing same-shaped
  // collectives and exchanging garbage (the shared-memory group always checks; Gloo only does in this mode).
  // Costs a store round trip per collective. ACCELERATED_CHECK_COLLECTIVES=1 turns it on from outside.
  bool check_collectives = distributed::check_collectives_from_env();
  // ZeRO stage 1 (distributed/optimizer_shard.hpp): each rank keeps and steps the optimizer state of 1/N of the
  // parameters, then the ranks exchange the updated parameters; the weights are those of unsharded training. A no-op
  // in one process. ACCELERATED_SHARD_OPTIMIZER=1 turns it on from outside.
  bool shard_optimizer_state = distributed::shard_optimizer_state_from_env();
  // The size of each all-gather of that exchange over shared memory and NCCL (N + 1 buffers of this size per device
  // and dtype); over Gloo a CPU model's parameters travel as messages, with no buffers.
  std::int64_t shard_exchange_bucket_bytes = std::int64_t{4} << 20;
#if ACCELERATED_HAS_GLOO
  distributed::GradientSyncOptions gradient_sync{};
  // Shared memory when every rank runs on this machine, Gloo otherwise (ACCELERATED_TRANSPORT overrides it).
  distributed::Transport transport = distributed::Transport::automatic;
  // What carries the gradients of a model on a GPU: NCCL where LibTorch has it, else the transport above
  // (ACCELERATED_CUDA_BACKEND=nccl|gloo overrides it).
  distributed::CudaBackend cuda_backend = distributed::CudaBackend::automatic;
#endif
};

class DataParallel {
 public:
#if ACCELERATED_HAS_GLOO
  // Alive over the forward and backward of a micro-batch; on an update step it arms the reducer once the loss exists
  // (the trainer calls arm(loss) right before backward).
  class SyncGuard {
   public:
    explicit SyncGuard(distributed::GradientSync* sync = nullptr) : sync_(sync) {}
    void arm(const torch::Tensor& loss) {
      if (sync_) sync_->prepare_for_backward(loss);
    }

   private:
    distributed::GradientSync* sync_;
  };
#else
  struct SyncGuard {
    void arm(const torch::Tensor&) {}
  };
#endif

  // The exit code of a process the watchdog ended (EX_UNAVAILABLE: a peer is unavailable).
  static constexpr int hang_exit_code = 69;

  DataParallel() : DataParallel(DataParallelOptions{}) {}

  // A member of the run the environment describes (a single process when it describes none). Nothing is joined yet:
  // the first run joins (or join()), and every DataParallel of this process shares that one process group.
  explicit DataParallel(DataParallelOptions options) : options_(options), env_(distributed::environment_from_env()) {
#if !ACCELERATED_HAS_GLOO
    if (env_.world_size > 1) {
      throw std::runtime_error("accelerated::DataParallel: WORLD_SIZE = " + std::to_string(env_.world_size) +
                               " but this build has no multi-process support: LibTorch was built without "
                               "USE_C10D_GLOO, or Gloo's headers (gloo/algorithm.h, Debian's libgloo-dev) were not found");
    }
#endif
  }

#if ACCELERATED_HAS_GLOO
  // A member of a run over a store of your own (a c10d::HashStore for ranks as threads, a FileStore, ...); its group
  // is its own, made at the first run.
  DataParallel(c10::intrusive_ptr<c10d::Store> store, std::int64_t rank, std::int64_t world_size,
               DataParallelOptions options = {})
      : options_(options), given_store_(store) {
    if (world_size < 1 || rank < 0 || rank >= world_size) {
      throw std::invalid_argument("accelerated::DataParallel: rank = " + std::to_string(rank) +
                                  " is not in [0, world_size = " + std::to_string(world_size) + ")");
    }
    env_.rank = env_.local_rank = rank;
    env_.world_size = env_.local_world_size = world_size;
    env_.launcher = "store";
  }
#endif

  std::int64_t num_processes() const { return env_.world_size; }
  std::int64_t rank() const { return env_.rank; }
  std::int64_t local_rank() const { return env_.local_rank; }
  const distributed::Environment& environment() const { return env_; }
  const DataParallelOptions& options() const { return options_; }

  // Joins the process group now (the first run does it otherwise): every rank must call it. A no-op in a single
  // process and when this process has joined already.
  void join() {
#if ACCELERATED_HAS_GLOO
    if (membership_ || env_.world_size == 1) return;
    if (given_store_) {
      membership_ = std::make_shared<distributed::Membership>();
      membership_->store = given_store_;
      membership_->check_collectives = options_.check_collectives;
      membership_->group = guarded("joining the process group", [&] {
        return distributed::make_process_group(given_store_, env_.rank, env_.world_size, options_.timeout,
                                               "127.0.0.1", options_.transport);
      });
      return;
    }
    membership_ = distributed::membership_of(env_, [&] {
      auto joined = std::make_shared<distributed::Membership>();
      joined->store = distributed::make_store(env_, options_.timeout);
      joined->group = guarded("joining the process group", [&] {
        return distributed::make_process_group(joined->store, env_.rank, env_.world_size, options_.timeout,
                                               env_.master_addr, options_.transport);
      });
      const auto threshold = options_.watchdog_threshold.count() > 0 ? options_.watchdog_threshold : options_.timeout / 3;
      // Published every second (four times per threshold when that is shorter). After its report a rank waits two
      // publishing intervals before it exits, so that the other ranks, which see the hang within one interval, can
      // still read the store (rank 0's process serves it).
      const auto interval = std::min<std::chrono::milliseconds>(std::chrono::seconds(1), threshold / 4);
      joined->watchdog = std::make_unique<distributed::Watchdog>(
          joined->store, env_.rank, env_.world_size, joined->heartbeat, threshold,
          [interval](const std::string& report) {
            std::cerr << report << std::endl;
            std::this_thread::sleep_for(2 * interval);
            std::_Exit(hang_exit_code);  // the training thread is blocked in the collective: only an exit ends it
          },
          interval);
      joined->options = options_text();
      joined->check_collectives = options_.check_collectives;
      return joined;
    });
    if (membership_->options != options_text()) {
      const auto joined = membership_->options;
      membership_.reset();
      throw std::invalid_argument(
          "accelerated::DataParallel: this process already joined its run with " + joined +
          "; this DataParallel asks for " + options_text() +
          ". A process has one process group, shared by every DataParallel in it (distributed/membership.hpp): give "
          "them the same timeout, watchdog threshold, transport, CUDA backend and collective checking");
    }
#endif
  }

#if ACCELERATED_HAS_GLOO
  // The options the process group is made with, which every DataParallel of a process must share.
  std::string options_text() const {
    static const char* transports[] = {"automatic", "gloo", "shared_memory"};
    static const char* backends[] = {"automatic", "nccl", "gloo"};
    return "{timeout " + std::to_string(options_.timeout.count()) + " ms, watchdog threshold " +
           std::to_string(options_.watchdog_threshold.count()) + " ms, transport " +
           transports[static_cast<int>(options_.transport)] + ", CUDA backend " +
           backends[static_cast<int>(options_.cuda_backend)] +
           (options_.check_collectives ? ", checked collectives" : "") + "}";
  }
#endif

  // What carries the gradients: "accelerated_shared_memory", "gloo", "nccl" (a model on a GPU, once prepared), or
  // "none" for a single process or before the process group is joined.
  std::string transport() const {
#if ACCELERATED_HAS_GLOO
    if (!membership_) return "none";
    if (!membership_->cuda_backend.empty()) return membership_->cuda_backend;
    return compat::backend_name(membership_->group, c10::DeviceType::CPU);
#else
    return "none";
#endif
  }

  // Called by bind_policies (accelerator.hpp): the device the model trains on. On a GPU, CUDA tensors go to the
  // CUDA backend (NCCL where LibTorch has it) when the model is prepared.
  void bind_device(torch::Device device) { device_ = device; }

  // At the start of every run: rank 0's parameters and buffers everywhere, and the reducer for this model.
  void prepare(torch::nn::Module& module) {
#if ACCELERATED_HAS_GLOO
    join();
    if (!membership_) return;
    // A run after a failure this process caught: its phases count again, and a new failure is reported afresh.
    membership_->heartbeat.clear_failing();
    silent_peers_.reset();
    if (membership_->cuda_backend.empty() && (device_.is_cuda() || on_cuda(module))) {
      membership_->cuda_backend = guarded("creating the CUDA backend", [&] {
        return distributed::attach_cuda_backend(membership_->group, membership_->store, env_.rank, env_.world_size,
                                                options_.timeout, options_.cuda_backend);
      });
    }
    guarded("broadcasting rank 0's parameters", [&] {
      module_ = &module;
      if (!sync_ || !sync_->covers(module)) {
        sync_ = std::make_shared<distributed::GradientSync>(module, membership_->group, options_.gradient_sync);
      }
      sync_->broadcast_state();
      return 0;
    });
    // After the first NCCL collective (the broadcast), which creates the communicators and whatever NCCL and CUDA
    // set up lazily with them: their exit handlers then run after this one.
    if (membership_->cuda_backend == "nccl") distributed::shut_down_at_exit(membership_);
#else
    (void)module;
#endif
  }

  // Over the forward and backward of a micro-batch: when `enabled` (an update step) rank 0's buffers are broadcast,
  // the previous reduction is checked, and the guard arms the reducer before backward, so that the backward pass
  // averages the gradients; otherwise they accumulate locally, with no communication. A parameter frozen or
  // unfrozen since the run started (a callback's ModelFreezer) gets a new reducer, on every rank at the same step.
  SyncGuard gradient_sync(bool enabled) {
#if ACCELERATED_HAS_GLOO
    if (enabled && sync_) {
      guarded("synchronising buffers", [&] {
        if (sync_->trainable_changed()) {
          sync_ = std::make_shared<distributed::GradientSync>(*module_, membership_->group, options_.gradient_sync);
        }
        distributed::PhaseScope phase(heartbeat(), distributed::Phase::broadcast);
        sync_->broadcast_buffers();
        return 0;
      });
      sync_->before_forward();  // its error (a parameter with no gradient) is no peer's failure: raised as it is
      return SyncGuard(sync_.get());
    }
#else
    (void)enabled;
#endif
    return SyncGuard{};
  }

  // After prepare, at the start of every run: with shard_optimizer_state in several processes, this rank's share of
  // the optimizer's parameters (kept across runs of the same optimizer); the state of the others is dropped.
  void prepare_optimizer(torch::optim::Optimizer& optimizer) {
#if ACCELERATED_HAS_GLOO
    if (!options_.shard_optimizer_state || env_.world_size == 1) {
      shard_.reset();
      return;
    }
    repartition(optimizer);
    shard_->prune(optimizer);
#else
    (void)optimizer;
#endif
  }

  // The update: `step` (the loop's optimizer step) on the owned parameters, then the exchange of the updated ones;
  // just `step` when unsharded. The gradients are unscaled first, so that the loss scaler's overflow check still
  // covers every gradient; an update it skips is skipped on every rank (their reduced gradients are equal), with
  // nothing to exchange.
  template <class Precision, class Step>
  void step_optimizer(Precision& precision, torch::optim::Optimizer& optimizer, Step&& step) {
#if ACCELERATED_HAS_GLOO
    if (!shard_) return step();
    repartition(optimizer);  // a parameter group added during the run (every rank adds it at the same step)
    precision.unscale_gradients(optimizer);
    shard_->step(step);
    if (precision.step_was_skipped()) return;
    distributed::PhaseScope phase(heartbeat(), distributed::Phase::exchange);
    const distributed::AtCallSite at(distributed::CallSite::shard_exchange);
    guarded("exchanging the updated parameters", [&] {
      // Gloo carrying CPU tensors: messages from and into the parameters, no copies.
      if (shard_->exchanged_on_cpu() && compat::backend_name(membership_->group, c10::DeviceType::CPU) == "gloo") {
        check_collective("exchange", shard_->messages_shape());
        using Tensors = std::vector<torch::Tensor>;
        auto& group = *membership_->group;
        shard_->exchange_by_messages(
            [&](torch::Tensor& t, std::int64_t peer, std::int64_t tag) {
              Tensors message{t};
              return group.send(message, static_cast<int>(peer), static_cast<int>(tag));
            },
            [&](torch::Tensor& t, std::int64_t peer, std::int64_t tag) {
              Tensors message{t};
              return group.recv(message, static_cast<int>(peer), static_cast<int>(tag));
            },
            [&](const c10::intrusive_ptr<c10d::Work>& work) { work->wait(options_.timeout); });
        return 0;
      }
      shard_->exchange([&](torch::Tensor& send, std::vector<torch::Tensor>& receive) {
        check_collective("allgather", std::to_string(send.numel()) + " elements");
        std::vector<std::vector<torch::Tensor>> out{receive};
        std::vector<torch::Tensor> in{send};
        membership_->group->allgather(out, in)->wait(options_.timeout);
      });
      return 0;
    });
#else
    (void)precision, (void)optimizer;
    step();
#endif
  }

#if ACCELERATED_HAS_GLOO
  // A partition for the optimizer's current parameters: built at the first run, and again when parameters were added
  // (the ones it had keep their owners, and with them their state). A comparison of handles per parameter.
  void repartition(torch::optim::Optimizer& optimizer) {
    if (shard_ && shard_->built_for(optimizer)) return;
    shard_ = std::make_shared<distributed::OptimizerShard>(optimizer, env_.rank, env_.world_size,
                                                           options_.shard_exchange_bucket_bytes, shard_.get());
  }
#endif

  // The partition of the optimizer's state over the ranks; null when unsharded (or before the first run).
  const distributed::OptimizerShard* optimizer_shard() const {
#if ACCELERATED_HAS_GLOO
    return shard_.get();
#else
    return nullptr;
#endif
  }

#if ACCELERATED_HAS_GLOO
  // The gradient averaging of the current model (null before the first run, or in a single process).
  const distributed::GradientSync* gradient_sync_engine() const { return sync_.get(); }
#endif

  // Element-wise sum over every process, in place.
  void all_reduce_sum(std::span<double> values) {
#if ACCELERATED_HAS_GLOO
    if (env_.world_size == 1 || values.empty()) return;
    join();
    auto tensor = torch::from_blob(values.data(), {static_cast<std::int64_t>(values.size())}, torch::kDouble).clone();
    distributed::PhaseScope phase(heartbeat(), distributed::Phase::all_reduce);
    guarded("all_reduce", [&] {
      queue_sum(tensor)->wait(options_.timeout);
      return 0;
    });
    std::copy_n(tensor.data_ptr<double>(), values.size(), values.data());
#else
    (void)values;
#endif
  }

  // The same sum in two halves, so that work can run while it travels (the trainer's stop vote overlaps backward):
  // start reads `values` and returns at once (Gloo runs the exchange on its own threads; the shared-memory group
  // completes it there and then); finish waits for it and writes the sums into `values`. One at a time.
  void start_all_reduce_sum(std::span<double> values) {
#if ACCELERATED_HAS_GLOO
    pending_sum_ = {};
    if (env_.world_size == 1 || values.empty()) return;
    join();
    auto tensor = torch::from_blob(values.data(), {static_cast<std::int64_t>(values.size())}, torch::kDouble).clone();
    // Waiting on peers while it runs here (the shared-memory group completes it in the call): the watchdog's phase.
    distributed::PhaseScope phase(heartbeat(), distributed::Phase::all_reduce);
    pending_sum_.work = guarded("all_reduce", [&] { return queue_sum(tensor); });
    pending_sum_.tensor = std::move(tensor);
#else
    (void)values;
#endif
  }
  void finish_all_reduce_sum(std::span<double> values) {
#if ACCELERATED_HAS_GLOO
    if (!pending_sum_.work) return;  // one process (or nothing to sum): the values are the sums
    auto pending = std::exchange(pending_sum_, {});
    distributed::PhaseScope phase(heartbeat(), distributed::Phase::all_reduce);
    guarded("all_reduce", [&] {
      pending.work->wait(options_.timeout);
      return 0;
    });
    std::copy_n(pending.tensor.data_ptr<double>(), std::min<std::size_t>(values.size(), pending.tensor.numel()),
                values.data());
#else
    (void)values;
#endif
  }

  // Every process's tensor, concatenated along dim 0 in rank order; sizes along dim 0 may differ.
  torch::Tensor gather(const torch::Tensor& tensor) {
#if ACCELERATED_HAS_GLOO
    if (env_.world_size == 1) return tensor;
    join();
    const auto& group = membership_->group;
    const auto world = env_.world_size;
    const auto local = tensor.dim() == 0 ? tensor.reshape({1}) : tensor;
    distributed::PhaseScope phase(heartbeat(), distributed::Phase::gather);
    return guarded("gather", [&] {
      check_collective("gather", "a rank-" + std::to_string(local.dim()) + " tensor");  // sizes may differ
      auto size = torch::tensor({local.size(0)}, torch::kLong);
      std::vector<std::vector<torch::Tensor>> sizes_out(1);
      for (std::int64_t r = 0; r < world; ++r) sizes_out[0].push_back(torch::empty({1}, torch::kLong));
      std::vector<torch::Tensor> sizes_in{size};
      group->allgather(sizes_out, sizes_in)->wait(options_.timeout);
      std::int64_t largest = 0;
      for (const auto& s : sizes_out[0]) largest = std::max(largest, s.item<std::int64_t>());
      auto shape = local.sizes().vec();
      shape[0] = largest;
      auto padded = torch::zeros(shape, local.options().device(torch::kCPU));
      padded.narrow(0, 0, local.size(0)).copy_(local);
      std::vector<std::vector<torch::Tensor>> out(1);
      for (std::int64_t r = 0; r < world; ++r) out[0].push_back(torch::empty(shape, padded.options()));
      std::vector<torch::Tensor> in{padded};
      group->allgather(out, in)->wait(options_.timeout);
      std::vector<torch::Tensor> parts;
      for (std::int64_t r = 0; r < world; ++r) parts.push_back(out[0][r].narrow(0, 0, sizes_out[0][r].item<std::int64_t>()));
      return torch::cat(parts).to(tensor.device());
    });
#else
    return tensor;
#endif
  }

  // Where the training loop is (the trainer calls it at each phase): read by the watchdog. A no-op before joining
  // and in a single process.
  void heartbeat(distributed::Phase phase, std::int64_t update_step) {
    if (auto* beat = heartbeat()) {
      beat->set_step(update_step);
      beat->set(phase);
    }
  }

  // Where the loop is, as the watchdog publishes it: `failing` once a collective failed here; idle before joining
  // and in a single process.
  distributed::Phase phase() {
    auto* beat = heartbeat();
    return beat ? beat->phase() : distributed::Phase::idle;
  }

  void barrier() {
#if ACCELERATED_HAS_GLOO
    if (env_.world_size == 1) return;
    join();
    distributed::PhaseScope phase(heartbeat(), distributed::Phase::barrier);
    guarded("barrier", [&] {
      check_collective("barrier", "");
      membership_->group->barrier()->wait(options_.timeout);
      return 0;
    });
#endif
  }

 private:
#if ACCELERATED_HAS_GLOO
  distributed::Heartbeat* heartbeat() { return membership_ ? &membership_->heartbeat : nullptr; }
#else
  distributed::Heartbeat* heartbeat() { return nullptr; }
#endif

#if ACCELERATED_HAS_GLOO
  // The SUM all-reduce of `tensor`, in place, queued on the group (all_reduce_sum waits for it at once,
  // start_all_reduce_sum later).
  c10::intrusive_ptr<c10d::Work> queue_sum(torch::Tensor& tensor) {
    check_collective("all_reduce", std::to_string(tensor.numel()) + " elements");
    std::vector<torch::Tensor> tensors{tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    return membership_->group->allreduce(tensors, opts);
  }

  // Checked mode (DataParallelOptions::check_collectives): this rank's next collective, compared through the store
  // with every other rank's; a difference is an error on every rank naming both calls.
  void check_collective(const char* operation, const std::string& shape) {
    if (!membership_ || !membership_->check_collectives) return;
    auto& store = membership_->store;
    const auto sequence = membership_->checked_calls++;
    const auto key = [sequence](std::int64_t rank, std::uint64_t at) {
      return "checked_collective/" + std::to_string(at) + "/" + std::to_string(rank);
    };
    const auto site = distributed::current_call_site();
    std::string details = shape;
    if (site != distributed::CallSite::other) {
      details += (details.empty() ? "" : ", ") + std::string(distributed::call_site_name(site));
    }
    const auto mine = std::string(operation) + " #" + std::to_string(sequence) + (details.empty() ? "" : " (" + details + ")");
    store->set(key(env_.rank, sequence), std::vector<std::uint8_t>(mine.begin(), mine.end()));
    for (std::int64_t r = 0; r < env_.world_size; ++r) {
      if (r == env_.rank) continue;
      store->wait({key(r, sequence)}, options_.timeout);
      const auto bytes = store->get(key(r, sequence));
      const std::string theirs(bytes.begin(), bytes.end());
      if (theirs != mine) {
        throw std::runtime_error("checked collectives: the ranks called different collectives: rank " +
                                 std::to_string(env_.rank) + " is in " + mine + ", rank " + std::to_string(r) +
                                 " is in " + theirs);
      }
    }
    // Every rank has read the keys of two calls ago (it wrote the last call's only after reading them): drop ours.
    // A store without deleteKey (FileStore) keeps them.
    if (sequence >= 2) {
      try {
        store->deleteKey(key(env_.rank, sequence - 2));
      } catch (const std::exception&) {
      }
    }
  }
#endif

  static bool on_cuda(torch::nn::Module& module) {
    for (const auto& p : module.parameters()) return p.is_cuda();
    for (const auto& b : module.buffers()) return b.is_cuda();
    return false;
  }

  // Runs a collective; a failure (a dead peer, a timeout) becomes one error that says which rank and what.
  template <class F>
  std::invoke_result_t<F&> guarded(const char* what, F&& f) {
    try {
      return f();
    } catch (const std::exception& error) {
      throw std::runtime_error("accelerated::DataParallel: rank " + std::to_string(env_.rank) + " of " +
                               std::to_string(env_.world_size) + " failed while " + what +
                               " (a peer may have stopped or died; timeout " + std::to_string(options_.timeout.count()) +
                               " ms)" + silent_peers() + ": " + error.what());
    }
  }

 public:
  // After an error `what` that reads as a failed exchange with a peer (one the reducer raised inside backward): which
  // ranks did not report the failure within a short grace, as a bracketed sentence; "" for any other error.
  std::string describe_silent_peers(const std::string& what) {
#if ACCELERATED_HAS_GLOO
    if (distributed::looks_like_peer_failure(what)) return silent_peers();
#endif
    (void)what;
    return "";
  }

 private:
  // After a failed collective: which ranks did not report it within the grace (distributed/silent_peers.hpp); asked
  // of the store once, then remembered.
  std::string silent_peers() {
#if ACCELERATED_HAS_GLOO
    if (!silent_peers_) {
      // This rank is ending with the failure: its peers' watchdogs, which may wait behind it, see that (at once:
      // published now, not at the next interval) and wait for the failure to reach them rather than report a hang.
      if (auto* beat = heartbeat()) beat->set(distributed::Phase::failing);
      if (membership_ && membership_->watchdog) membership_->watchdog->publish_now();
      const auto store_address = env_.master_addr.empty()
                                     ? std::string("(in-process)")
                                     : env_.master_addr + ":" + std::to_string(env_.master_port);
      silent_peers_ = distributed::describe_silent_peers(
          membership_ ? membership_->store : given_store_, env_.rank, env_.world_size,
          std::min<std::chrono::milliseconds>(options_.timeout, distributed::kFailureReportGrace), store_address);
    }
    return *silent_peers_;
#else
    return "";
#endif
  }

  DataParallelOptions options_;
  distributed::Environment env_;
  torch::Device device_{torch::kCPU};
#if ACCELERATED_HAS_GLOO
  c10::intrusive_ptr<c10d::Store> given_store_;              // the store of the store constructor
  std::shared_ptr<distributed::Membership> membership_;       // null until joined
  std::shared_ptr<distributed::GradientSync> sync_;
  std::shared_ptr<distributed::OptimizerShard> shard_;  // null: unsharded
  torch::nn::Module* module_ = nullptr;  // the model sync_ was built for
  std::optional<std::string> silent_peers_;
  struct PendingSum {
    c10::intrusive_ptr<c10d::Work> work;  // null: none in flight
    torch::Tensor tensor;                 // the buffer the collective writes
  } pending_sum_;
#endif
};

// DataParallel under the name that says "whatever the environment asks for" (the same type, so that a configured
// DataParallel can be assigned to the default trainer's policy).
using AutoDistributed = DataParallel;

namespace detail {
// The distributed policy's optional members for the watchdog (docs/writing-a-distributed-policy.md): where the loop
// is, and after a failed exchange which ranks went silent; nothing, and "", for a policy without them.
template <class Distributed>
void beat(Distributed& distributed, distributed::Phase phase, std::int64_t update_step) {
  if constexpr (requires { distributed.heartbeat(phase, update_step); }) distributed.heartbeat(phase, update_step);
}
// The distributed policy's optional members for a sharded optimizer state (DataParallel's shard_optimizer_state):
// a policy without them prepares the model only, steps the optimizer as the loop says, and shards nothing.
template <class Distributed>
void prepare(Distributed& distributed, torch::nn::Module& module, torch::optim::Optimizer& optimizer) {
  distributed.prepare(module);
  if constexpr (requires { distributed.prepare_optimizer(optimizer); }) distributed.prepare_optimizer(optimizer);
}
template <class Distributed, class Precision, class Step>
void step_optimizer(Distributed& distributed, Precision& precision, torch::optim::Optimizer& optimizer, Step&& step) {
  if constexpr (requires { distributed.step_optimizer(precision, optimizer, step); }) {
    distributed.step_optimizer(precision, optimizer, step);
  } else {
    step();
  }
}
template <class Distributed>
const distributed::OptimizerShard* optimizer_shard(const Distributed& distributed) {
  if constexpr (requires { distributed.optimizer_shard(); }) {
    return distributed.optimizer_shard();
  } else {
    return nullptr;
  }
}
template <class Distributed>
std::string silent_peers(Distributed& distributed, const std::string& what) {
  if constexpr (requires { distributed.describe_silent_peers(what); }) {
    return distributed.describe_silent_peers(what);
  } else {
    return "";
  }
}
}  // namespace detail

}  // namespace accelerated
