#pragma once
// Sharded optimizer state (ZeRO stage 1), DataParallel's `shard_optimizer_state`: each rank keeps the optimizer state
// of a contiguous 1/N of the parameters (by element count), steps only those after the gradient all-reduce, and the
// ranks then exchange the updated parameters: in padded, bucketed all-gathers (exchange), or over Gloo on the CPU as
// messages straight from and into the parameters (exchange_by_messages). The weights stay bit-equal to
// unsharded data parallel because the owner runs the very same kernels on the very same (all-reduced) gradients.
//
// The step: the gradients of parameters this rank does not own are set aside (undefined) around the optimizer's
// step and put back after it, so that torch::optim's SGD, Adam, AdamW, RMSprop and Adagrad, which skip a parameter
// with no gradient before weight decay and before creating its state, step exactly the owned ones. Clipping, the
// loss scaler's unscale and overflow check, and callbacks see every gradient. An optimizer that decays or keeps
// state for parameters without a gradient would differ; LBFGS (one closure over every parameter) is refused.
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/scoped_value.hpp"

namespace accelerated::distributed {

// The optimizer's parameters in param_groups order: the order a partition, a shard file and LibTorch's own
// serialisation number them in.
inline std::vector<torch::Tensor> optimizer_parameters(const torch::optim::Optimizer& optimizer) {
  std::vector<torch::Tensor> parameters;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) parameters.push_back(p);
  }
  return parameters;
}

// Which rank keeps each parameter's state: N contiguous ranges, balanced by element count (a parameter goes to the
// rank its midpoint falls in). Frozen parameters count too: a backbone unfrozen later must not land on one rank.
// Off from 1/N by at most the largest parameter.
inline std::vector<std::int64_t> partition_parameters(const std::vector<torch::Tensor>& parameters,
                                                      std::int64_t world_size) {
  std::int64_t total = 0;
  for (const auto& p : parameters) total += p.numel();
  std::vector<std::int64_t> owner;
  std::int64_t before = 0;
  for (const auto& p : parameters) {
    owner.push_back(total == 0 ? 0 : std::min(world_size - 1, (2 * before + p.numel()) * world_size / (2 * total)));
    before += p.numel();
  }
  return owner;
}

// The key LibTorch's Optimizer::state() files a parameter under: its TensorImpl's address, printed ("0x...") before
// LibTorch 2.2 and the pointer itself after.
template <class StateMap>
typename StateMap::key_type optimizer_state_key(const StateMap&, const torch::Tensor& parameter) {
  using Key = typename StateMap::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream text;
    text << static_cast<const void*>(parameter.unsafeGetTensorImpl());
    return text.str();
  } else {
    return static_cast<Key>(parameter.unsafeGetTensorImpl());
  }
}

class OptimizerShard {
 public:
  // `bucket_bytes`: the size of each all-gather of exchange() (its buffers are N + 1 of them, reused).
  // `previous`: the partition of the same optimizer before parameters were added to it (add_param_group between or
  // during runs): its parameters keep their owners, and so their state; only the new ones are partitioned.
  OptimizerShard(torch::optim::Optimizer& optimizer, std::int64_t rank, std::int64_t world_size,
                 std::int64_t bucket_bytes, const OptimizerShard* previous = nullptr)
      : rank_(rank), world_size_(world_size), bucket_bytes_(bucket_bytes) {
    if (bucket_bytes <= 0) {
      throw std::invalid_argument("accelerated::DataParallelOptions: shard_exchange_bucket_bytes = " +
                                  std::to_string(bucket_bytes) + " is not a positive size");
    }
    if (dynamic_cast<torch::optim::LBFGS*>(&optimizer) != nullptr) {
      throw std::invalid_argument(
          "accelerated::DataParallel: shard_optimizer_state cannot shard torch::optim::LBFGS, whose step is one "
          "closure over every parameter's state; train it with shard_optimizer_state = false");
    }
    parameters_ = optimizer_parameters(optimizer);
    std::vector<torch::Tensor> fresh;
    std::vector<std::int64_t> kept(parameters_.size(), -1);
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      if (previous != nullptr) {
        const auto& old = previous->parameters_;
        const auto at = std::find_if(old.begin(), old.end(), [&](const torch::Tensor& p) { return p.is_same(parameters_[i]); });
        if (at != old.end()) kept[i] = previous->owner_[static_cast<std::size_t>(at - old.begin())];
      }
      if (kept[i] < 0) fresh.push_back(parameters_[i]);
    }
    const auto fresh_owner = partition_parameters(fresh, world_size_);
    std::size_t next = 0;
    for (std::size_t i = 0; i < parameters_.size(); ++i) owner_.push_back(kept[i] >= 0 ? kept[i] : fresh_owner[next++]);
  }

  std::int64_t rank() const { return rank_; }
  std::int64_t world_size() const { return world_size_; }
  // Per parameter in param_groups order, the rank that keeps its state.
  const std::vector<std::int64_t>& owners() const { return owner_; }
  bool owns(std::size_t index) const { return owner_[index] == rank_; }

  // True when built for exactly these parameters (an optimizer given other ones needs a new partition).
  bool built_for(const torch::optim::Optimizer& optimizer) const {
    std::size_t i = 0;
    for (const auto& group : optimizer.param_groups()) {
      for (const auto& p : group.params()) {
        if (i >= parameters_.size() || !p.is_same(parameters_[i])) return false;
        ++i;
      }
    }
    return i == parameters_.size();
  }

  // Drops the state of parameters another rank owns: Adagrad's, made for every parameter in its constructor, or a
  // whole state loaded from a file.
  void prune(torch::optim::Optimizer& optimizer) const {
    auto& state = optimizer.state();
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      if (!owns(i)) state.erase(optimizer_state_key(state, parameters_[i]));
    }
  }

  // Runs the optimizer's step (`step`) on the owned parameters only: the others' gradients are set aside around it.
  template <class Step>
  void step(Step&& step) {
    set_aside_.clear();
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      if (owns(i) || !parameters_[i].grad().defined()) continue;
      set_aside_.emplace_back(i, std::exchange(parameters_[i].mutable_grad(), torch::Tensor()));
    }
    accelerated::detail::OnScopeExit put_back([this] {
      for (auto& [i, grad] : set_aside_) parameters_[i].mutable_grad() = std::move(grad);
      set_aside_.clear();
    });
    step();
  }

  // Every rank's updated parameters, everywhere. `all_gather(send, receive)` is one collective: every rank's `send`
  // (equal sizes) lands in receive[rank]. Trainable parameters only (see exchanged), grouped by device and dtype.
  template <class AllGather>
  void exchange(AllGather&& all_gather) {
    if (layout_stale()) build_layout();
    torch::NoGradGuard no_grad;
    for (auto& group : groups_) {
      for (std::int64_t offset = 0; offset < group.longest; offset += group.bucket) {
        const auto length = std::min(group.bucket, group.longest - offset);
        auto send = group.send.narrow(0, 0, length);
        for_segments(group.owned[rank_], offset, length, [&](const torch::Tensor& p, std::int64_t from,
                                                             std::int64_t to, std::int64_t count) {
          send.narrow(0, to, count).copy_(p.detach().reshape(-1).narrow(0, from, count));
        });
        std::vector<torch::Tensor> receive;
        for (auto& buffer : group.receive) receive.push_back(buffer.narrow(0, 0, length));
        all_gather(send, receive);
        for (std::int64_t r = 0; r < world_size_; ++r) {
          if (r == rank_) continue;
          for_segments(group.owned[r], offset, length, [&](const torch::Tensor& p, std::int64_t from, std::int64_t to,
                                                           std::int64_t count) {
            write_flat(p, from, receive[r].narrow(0, to, count));
          });
        }
      }
    }
  }

  // The exchange as messages (DataParallel's way over Gloo): each owner sends each updated parameter to every other
  // rank straight from the parameter's memory, and each rank receives the others' straight into theirs; every message
  // is started, then every one waited for. No buffers and no copies (a parameter in another layout, channels-last,
  // goes through a row-major copy), where exchange() copies into a bucket and back out of it and Gloo's all-gather
  // through a buffer of its own. `send(tensor, peer, tag)` and `receive(tensor, peer, tag)`
  // start one message each and return a handle that `wait(handle)` finishes; a parameter's tag is its index in
  // param_groups order, so the messages pair whatever order the transport delivers them in.
  template <class Send, class Receive, class Wait>
  void exchange_by_messages(Send&& send, Receive&& receive, Wait&& wait) {
    torch::NoGradGuard no_grad;
    using Handle = std::invoke_result_t<Send&, torch::Tensor&, std::int64_t, std::int64_t>;
    std::vector<Handle> started;
    std::vector<torch::Tensor> sent;                                // row-major copies, alive until sent
    std::vector<std::pair<torch::Tensor, torch::Tensor>> received;  // (parameter, its row-major copy)
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const auto& p = parameters_[i];
      if (!sent_as_message(p)) continue;
      const auto tag = static_cast<std::int64_t>(i);
      auto data = p.detach();
      if (owns(i)) {
        auto message = data.is_contiguous() ? data : sent.emplace_back(data.contiguous());
        for (std::int64_t peer = 0; peer < world_size_; ++peer) {
          if (peer != rank_) started.push_back(send(message, peer, tag));
        }
      } else {
        auto into = data.is_contiguous() ? data : received.emplace_back(data, data.contiguous()).second;
        started.push_back(receive(into, owner_[i], tag));
      }
    }
    for (auto& handle : started) wait(handle);
    for (auto& [parameter, copy] : received) parameter.copy_(copy);
  }

  // Whether every parameter exchange_by_messages sends is on the CPU (Gloo's messages carry host memory).
  bool exchanged_on_cpu() const {
    return std::all_of(parameters_.begin(), parameters_.end(),
                       [](const torch::Tensor& p) { return !exchanged(p) || p.device().is_cpu(); });
  }

  // What exchange_by_messages will send, for DataParallel's checked collectives: ranks that disagree (one froze a
  // layer the others did not) would post messages that never pair, and wait the whole timeout.
  std::string messages_shape() const {
    std::int64_t count = 0, elements = 0;
    for (const auto& p : parameters_) {
      if (!sent_as_message(p)) continue;
      ++count;
      elements += p.numel();
    }
    return std::to_string(count) + " parameters, " + std::to_string(elements) + " elements";
  }

  // The bytes of the exchange's buffers (for the benchmark's report).
  std::int64_t exchange_buffer_bytes() const {
    std::int64_t bytes = 0;
    for (const auto& group : groups_) bytes += (world_size_ + 1) * group.bucket * group.send.element_size();
    return bytes;
  }

 private:
  struct Group {  // the trainable parameters of one device and dtype
    torch::Device device{torch::kCPU};
    torch::Dtype dtype = torch::kFloat;
    std::vector<std::vector<torch::Tensor>> owned;  // per rank, in param_groups order
    std::int64_t longest = 0;                       // the largest rank's element count
    std::int64_t bucket = 0;                        // elements per all-gather
    torch::Tensor send;
    std::vector<torch::Tensor> receive;
  };

  // A parameter is exchanged when its owner may have changed it: it is trainable, or it still has a gradient (LibTorch
  // 1.13's zero_grad keeps a zero gradient on a parameter frozen mid-run, and momentum or weight decay then move it).
  static bool exchanged(const torch::Tensor& p) { return p.requires_grad() || p.grad().defined(); }
  // What exchange_by_messages sends, and messages_shape describes: one predicate, so the two cannot disagree.
  static bool sent_as_message(const torch::Tensor& p) { return exchanged(p) && p.numel() > 0; }

  bool layout_stale() const {
    if (trainable_.size() != parameters_.size()) return true;
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      if (exchanged(parameters_[i]) != trainable_[i]) return true;  // a callback froze or unfroze one
    }
    return false;
  }

  void build_layout() {
    groups_.clear();
    trainable_.assign(parameters_.size(), false);
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const auto& p = parameters_[i];
      trainable_[i] = exchanged(p);
      if (!trainable_[i]) continue;
      auto group = std::find_if(groups_.begin(), groups_.end(), [&](const Group& g) {
        return g.device == p.device() && g.dtype == p.scalar_type();
      });
      if (group == groups_.end()) {
        group = groups_.emplace(groups_.end());
        group->device = p.device();
        group->dtype = p.scalar_type();
        group->owned.resize(static_cast<std::size_t>(world_size_));
      }
      group->owned[owner_[i]].push_back(p);
    }
    for (auto& group : groups_) {
      for (const auto& owned : group.owned) {
        std::int64_t n = 0;
        for (const auto& p : owned) n += p.numel();
        group.longest = std::max(group.longest, n);
      }
      const auto options = torch::TensorOptions().device(group.device).dtype(group.dtype);
      const auto element = static_cast<std::int64_t>(torch::empty({0}, options).element_size());
      group.bucket = std::max<std::int64_t>(1, std::min(group.longest, bucket_bytes_ / element));
      group.send = torch::zeros({group.bucket}, options);
      for (std::int64_t r = 0; r < world_size_; ++r) group.receive.push_back(torch::zeros({group.bucket}, options));
    }
  }

  // Calls fn(parameter, first element in it, first element in the bucket, count) for each part of the parameters'
  // concatenation that falls in [offset, offset + length).
  template <class Fn>
  static void for_segments(const std::vector<torch::Tensor>& parameters, std::int64_t offset, std::int64_t length,
                           Fn&& fn) {
    std::int64_t start = 0;
    for (const auto& p : parameters) {
      const auto lo = std::max(offset, start), hi = std::min(offset + length, start + p.numel());
      if (lo < hi) fn(p, lo - start, lo - offset, hi - lo);
      start += p.numel();
      if (start >= offset + length) break;
    }
  }

  // Writes `values` into elements [from, from + values.numel()) of p, in its flat (row-major) order.
  static void write_flat(const torch::Tensor& p, std::int64_t from, const torch::Tensor& values) {
    auto data = p.detach();
    if (data.is_contiguous()) {
      data.view(-1).narrow(0, from, values.numel()).copy_(values);
    } else {  // channels-last and other layouts: through a row-major copy
      auto flat = data.contiguous();
      flat.view(-1).narrow(0, from, values.numel()).copy_(values);
      data.copy_(flat);
    }
  }

  std::int64_t rank_, world_size_, bucket_bytes_;
  std::vector<torch::Tensor> parameters_;  // param_groups order
  std::vector<std::int64_t> owner_;
  std::vector<std::pair<std::size_t, torch::Tensor>> set_aside_;
  std::vector<bool> trainable_;  // exchanged(p) when the layout was built
  std::vector<Group> groups_;
};

// The bytes of an optimizer's state tensors on this rank (what sharding divides): the buffers of torch::optim's
// SGD, Adam, AdamW, RMSprop and Adagrad; any other optimizer's state as its serialised size.
inline std::int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  namespace optim = torch::optim;
  const auto sum = [](std::initializer_list<const torch::Tensor*> tensors) {
    std::int64_t bytes = 0;
    for (const auto* t : tensors) bytes += t->defined() ? static_cast<std::int64_t>(t->nbytes()) : 0;
    return bytes;
  };
  std::int64_t bytes = 0;
  for (const auto& [key, state] : optimizer.state()) {
    if (!state) continue;
    if (const auto* s = dynamic_cast<const optim::SGDParamState*>(state.get())) {
      bytes += sum({&s->momentum_buffer()});
    } else if (const auto* s = dynamic_cast<const optim::AdamParamState*>(state.get())) {
      bytes += sum({&s->exp_avg(), &s->exp_avg_sq(), &s->max_exp_avg_sq()});
    } else if (const auto* s = dynamic_cast<const optim::AdamWParamState*>(state.get())) {
      bytes += sum({&s->exp_avg(), &s->exp_avg_sq(), &s->max_exp_avg_sq()});
    } else if (const auto* s = dynamic_cast<const optim::RMSpropParamState*>(state.get())) {
      bytes += sum({&s->square_avg(), &s->momentum_buffer(), &s->grad_avg()});
    } else if (const auto* s = dynamic_cast<const optim::AdagradParamState*>(state.get())) {
      bytes += sum({&s->sum()});
    } else {
      torch::serialize::OutputArchive archive;
      state->serialize(archive);
      std::ostringstream out;
      archive.save_to(out);
      bytes += static_cast<std::int64_t>(out.tellp());
    }
  }
  return bytes;
}

}  // namespace accelerated::distributed
