#pragma once
// A user's per-example step: fn(ExampleView) or fn(ExampleView, ExampleRng&), changing the example in place
// (view.data is the float slot in the batch, view.tensor() a tensor over it). Worker threads call it concurrently,
// so it is called const: keep state outside, and draw randomness from the ExampleRng it is given.
#include <type_traits>
#include <utility>

#include "../example_rng.hpp"
#include "example.hpp"

namespace accelerated::data::transforms {

template <class Fn>
struct Lambda {
  Fn fn;

  ExampleShape output_shape(ExampleShape in) const { return in; }

  void apply(ExampleView example, ExampleRng& rng) const {
    if constexpr (std::is_invocable_v<const Fn&, ExampleView, ExampleRng&>) {
      fn(example, rng);
    } else {
      fn(example);
    }
  }
};

template <class Fn>
Lambda<std::decay_t<Fn>> lambda(Fn&& fn) {
  static_assert(std::is_invocable_v<const std::decay_t<Fn>&, ExampleView, ExampleRng&> ||
                    std::is_invocable_v<const std::decay_t<Fn>&, ExampleView>,
                "accelerated::data::transforms::lambda: the function must be callable as const with "
                "(ExampleView) or (ExampleView, ExampleRng&); worker threads share it, so a mutable lambda is "
                "refused: draw randomness from the ExampleRng instead");
  return {std::forward<Fn>(fn)};
}

}  // namespace accelerated::data::transforms
