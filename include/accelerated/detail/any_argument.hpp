#pragma once
// Binds to any parameter a function may declare (a reference, a const reference or a value of any type, or `auto&`).
// A callback handler or a loop step that accepts it, but not the real arguments, is declared with the right name and
// the wrong parameters: the checks in callbacks/events.hpp and policies/loop_steps.hpp then name it instead of
// silently skipping it.
namespace accelerated::detail {

struct any_argument {
  template <class T>
  operator T&() const;
};

}  // namespace accelerated::detail
