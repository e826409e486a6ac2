#pragma once
// Moves a batch to a device: tensors, and tuples, pairs, torch::data::Examples, vectors and maps of them, nested in
// any way; anything else (numbers, strings, NoTarget) is kept as it is. To a CUDA device, CPU tensors go through
// pinned memory with a non-blocking copy on a side stream (SideStreamCopy), so that the copy overlaps the kernels of
// the step before, still queued on the compute stream, instead of waiting behind them.
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/data/example.h>
#include <torch/types.h>

#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace accelerated::detail {

// Any device: the tensor as LibTorch moves it.
struct PlainCopy {
  torch::Device device;
  torch::Tensor operator()(const torch::Tensor& tensor) const {
    if (!tensor.defined() || tensor.device() == device) return tensor;
    return tensor.to(device);
  }
};

// Host to GPU on a stream from LibTorch's pool. The compute stream waits for the copies (an event, finish()) before
// anything queued after them reads the batch, and each copy is marked as used on the compute stream, so that the
// caching allocator does not hand its memory out again before the step is done with it. Through c10's
// device-generic streams and events, which CPU builds of LibTorch compile too (the CUDA ones live in libc10_cuda).
class SideStreamCopy {
 public:
  explicit SideStreamCopy(const torch::Device& device)
      : device_(device), gpu_(device.type()), compute_(gpu_.getStream(device)), side_(copy_stream(compute_.device())) {}

  torch::Tensor operator()(const torch::Tensor& tensor) {
    if (!tensor.defined() || tensor.device() == device_) return tensor;
    if (!tensor.is_cpu()) return tensor.to(device_);  // another GPU: in order on the compute stream
    const auto pinned = tensor.is_pinned() ? tensor : tensor.pin_memory();
    torch::Tensor copy;
    {
      const c10::StreamGuard on_side(side_);
      copy = pinned.to(device_, /*non_blocking=*/true);
    }
    copy.record_stream(compute_);
    copied_ = true;
    return copy;
  }

  // The stream the copies run on: the same for every batch to this GPU.
  const c10::Stream& stream() const { return side_; }

  // The compute stream waits for every copy made so far.
  void finish() {
    if (!copied_) return;
    c10::Event done(device_.type());
    done.record(side_);
    done.block(compute_);
  }

 private:
  // One side stream per GPU for the whole process: the caching allocator keeps freed memory for the stream it was
  // allocated on, so a new pool stream per batch (the pool hands out 32 in turn) would cache up to 32 batches.
  c10::Stream copy_stream(const c10::Device& gpu) const {
    static std::mutex mutex;
    static std::map<c10::DeviceIndex, c10::Stream> streams;
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = streams.find(gpu.index());
    if (found != streams.end()) return found->second;
    return streams.emplace(gpu.index(), gpu_.getStreamFromGlobalPool(gpu)).first->second;
  }

  torch::Device device_;
  c10::impl::VirtualGuardImpl gpu_;
  c10::Stream compute_, side_;
  bool copied_ = false;
};

template <class T>
struct is_std_map : std::false_type {};
template <class K, class V, class C, class A>
struct is_std_map<std::map<K, V, C, A>> : std::true_type {};
template <class K, class V, class H, class E, class A>
struct is_std_map<std::unordered_map<K, V, H, E, A>> : std::true_type {};

template <class T, class Copy>
std::remove_cvref_t<T> move_batch(T&& value, Copy& copy) {
  using V = std::remove_cvref_t<T>;
  if constexpr (std::is_same_v<V, torch::Tensor>) {
    return copy(value);
  } else if constexpr (requires { value.data; value.target; }) {  // torch::data::Example
    return V{move_batch(std::forward<T>(value).data, copy), move_batch(std::forward<T>(value).target, copy)};
  } else if constexpr (is_std_map<V>::value) {
    V out;
    for (auto& [key, item] : value) out.emplace(key, move_batch(item, copy));
    return out;
  } else if constexpr (requires { typename V::value_type; value.size(); value.begin(); } &&
                       !std::is_convertible_v<V, std::string>) {  // vector and other sequences
    V out;
    if constexpr (requires { out.reserve(value.size()); }) out.reserve(value.size());
    for (auto& item : value) out.push_back(move_batch(item, copy));
    return out;
  } else if constexpr (requires { std::tuple_size<V>::value; }) {  // pair, tuple
    return std::apply([&](auto&... items) { return V{move_batch(items, copy)...}; }, value);
  } else {
    return std::forward<T>(value);
  }
}

template <class T>
std::remove_cvref_t<T> to_device(T&& value, const torch::Device& device) {
  if (!device.is_cuda()) {
    PlainCopy copy{device};
    return move_batch(std::forward<T>(value), copy);
  }
  SideStreamCopy copy(device);
  auto moved = move_batch(std::forward<T>(value), copy);
  copy.finish();
  return moved;
}

}  // namespace accelerated::detail
