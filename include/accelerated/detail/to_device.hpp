#pragma once
// Moves a batch to a device: tensors, and tuples, pairs, torch::data::Examples, vectors and maps of them, nested in
// any way; anything else (numbers, strings, NoTarget) is kept as it is. To a CUDA device, CPU tensors go through
// pinned memory with a non-blocking copy, so the copy overlaps the work already queued on the GPU.
#include <torch/data/example.h>
#include <torch/types.h>

#include <map>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace accelerated::detail {

inline torch::Tensor tensor_to_device(const torch::Tensor& tensor, const torch::Device& device) {
  if (!tensor.defined() || tensor.device() == device) return tensor;
  if (device.is_cuda() && tensor.is_cpu()) {
    const auto pinned = tensor.is_pinned() ? tensor : tensor.pin_memory();
    return pinned.to(device, /*non_blocking=*/true);
  }
  return tensor.to(device);
}

template <class T>
struct is_std_map : std::false_type {};
template <class K, class V, class C, class A>
struct is_std_map<std::map<K, V, C, A>> : std::true_type {};
template <class K, class V, class H, class E, class A>
struct is_std_map<std::unordered_map<K, V, H, E, A>> : std::true_type {};

template <class T>
std::remove_cvref_t<T> to_device(T&& value, const torch::Device& device) {
  using V = std::remove_cvref_t<T>;
  if constexpr (std::is_same_v<V, torch::Tensor>) {
    return tensor_to_device(value, device);
  } else if constexpr (requires { value.data; value.target; }) {  // torch::data::Example
    return V{to_device(std::forward<T>(value).data, device), to_device(std::forward<T>(value).target, device)};
  } else if constexpr (is_std_map<V>::value) {
    V out;
    for (auto& [key, item] : value) out.emplace(key, to_device(item, device));
    return out;
  } else if constexpr (requires { typename V::value_type; value.size(); value.begin(); } &&
                       !std::is_convertible_v<V, std::string>) {  // vector and other sequences
    V out;
    if constexpr (requires { out.reserve(value.size()); }) out.reserve(value.size());
    for (auto& item : value) out.push_back(to_device(item, device));
    return out;
  } else if constexpr (requires { std::tuple_size<V>::value; }) {  // pair, tuple
    return std::apply([&](auto&... items) { return V{to_device(items, device)...}; }, value);
  } else {
    return std::forward<T>(value);
  }
}

}  // namespace accelerated::detail
