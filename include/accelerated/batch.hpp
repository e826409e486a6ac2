#pragma once
// What a batch is and what a loss step returns. A batch is whatever the loader yields: a torch::data::Example
// (data, target), a std::pair or std::tuple (inputs first, targets second), or a user type. The default loop reads
// inputs and targets through inputs_of/targets_of; a loop policy for another batch shape reads it directly.
#include <torch/data/example.h>
#include <torch/types.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

namespace accelerated {

// What calculate_train_batch_loss / calculate_eval_batch_loss return. A step may return its own type instead:
// the trainer needs only `.loss` (a tensor) and `.batch_size` (an integer); callbacks see the whole object.
struct BatchOutput {
  torch::Tensor loss;
  torch::Tensor model_outputs;
  std::int64_t batch_size = 0;
};

namespace detail {
template <class T>
inline constexpr bool is_example_v = false;
template <class D, class T>
inline constexpr bool is_example_v<torch::data::Example<D, T>> = true;

template <class T>
concept tuple_like = requires { std::tuple_size<std::remove_cvref_t<T>>::value; };
}  // namespace detail

template <class Batch>
decltype(auto) inputs_of(Batch&& batch) {
  using B = std::remove_cvref_t<Batch>;
  if constexpr (detail::is_example_v<B>) {
    return (std::forward<Batch>(batch).data);
  } else if constexpr (detail::tuple_like<B>) {
    return std::get<0>(std::forward<Batch>(batch));
  } else {
    static_assert(!sizeof(B*),
                  "accelerated::inputs_of: the batch is neither a torch::data::Example nor a pair/tuple; "
                  "override calculate_train_batch_loss/calculate_eval_batch_loss in your loop policy to read it");
  }
}

template <class Batch>
decltype(auto) targets_of(Batch&& batch) {
  using B = std::remove_cvref_t<Batch>;
  if constexpr (detail::is_example_v<B>) {
    return (std::forward<Batch>(batch).target);
  } else if constexpr (detail::tuple_like<B>) {
    return std::get<1>(std::forward<Batch>(batch));
  } else {
    static_assert(!sizeof(B*),
                  "accelerated::targets_of: the batch is neither a torch::data::Example nor a pair/tuple; "
                  "override calculate_train_batch_loss/calculate_eval_batch_loss in your loop policy to read it");
  }
}

}  // namespace accelerated
