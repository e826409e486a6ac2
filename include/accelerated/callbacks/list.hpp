#pragma once
// Turns the callbacks given to the trainer into one flat Boost.Hana tuple (groups are spliced in; no callbacks at
// all means callbacks::Defaults) and checks, at compile time, that no callback type appears twice.
#include <boost/hana/at.hpp>
#include <boost/hana/flatten.hpp>
#include <boost/hana/length.hpp>
#include <boost/hana/tuple.hpp>

#include <cstddef>
#include <type_traits>
#include <utility>

#include "defaults.hpp"
#include "events.hpp"
#include "../errors.hpp"

namespace accelerated::detail {

template <class T>
inline constexpr bool is_callback_group_v = false;
template <class... T>
inline constexpr bool is_callback_group_v<callbacks::Group<T...>> = true;

template <class Callback>
auto as_callback_tuple(Callback callback) {
  if constexpr (is_callback_group_v<Callback>) {
    return std::move(callback.members);
  } else {
    return boost::hana::make_tuple(std::move(callback));
  }
}

template <class... Callbacks>
auto make_callback_tuple(Callbacks... callbacks) {
  if constexpr (sizeof...(Callbacks) == 0) {
    return callbacks::Defaults{}.members;
  } else {
    return boost::hana::flatten(boost::hana::make_tuple(as_callback_tuple(std::move(callbacks))...));
  }
}

template <class... Callbacks>
using callback_tuple_t = decltype(make_callback_tuple(std::declval<Callbacks>()...));

// (hana::unique only removes adjacent duplicates, so count each type instead.)
template <class T, class... U>
inline constexpr std::size_t count_of_v = (std::size_t{0} + ... + std::size_t{std::is_same_v<T, U>});

template <class Tuple>
inline constexpr bool all_unique_v = false;
template <class... T>
inline constexpr bool all_unique_v<boost::hana::tuple<T...>> = ((count_of_v<T, T...> == 1) && ...);

template <class T, class Tuple>
inline constexpr std::size_t index_of_v = 0;
template <class T, class... U>
inline constexpr std::size_t index_of_v<T, boost::hana::tuple<U...>> = [] {
  constexpr bool same[] = {std::is_same_v<T, U>..., false};
  std::size_t i = 0;
  while (!same[i] && i < sizeof...(U)) ++i;
  return i;
}();

// The callback of type T in a trainer's list (Trainer::callback<T>); a compile error naming T's absence otherwise.
template <class T, class Tuple>
T& callback_of(Tuple& callbacks) {
  constexpr auto index = index_of_v<T, Tuple>;
  static_assert(index < decltype(boost::hana::length(std::declval<Tuple&>()))::value,
                "accelerated::Trainer::callback<T>: this trainer has no callback of type T");
  return boost::hana::at_c<index>(callbacks);
}

// Every callback handles at least one event, and each of its handlers can take its event's arguments (step events
// tried with the run's real batch and output types; a misdeclared handler is a static_assert naming the event).
template <class Tuple, class Trainer, class TrainBatch, class TrainOutput, class EvalBatch, class EvalOutput>
inline constexpr bool every_callback_handles_v = false;
template <class... Cbs, class Trainer, class TrainBatch, class TrainOutput, class EvalBatch, class EvalOutput>
inline constexpr bool every_callback_handles_v<boost::hana::tuple<Cbs...>, Trainer, TrainBatch, TrainOutput, EvalBatch,
                                               EvalOutput> =
    (events::check_callback<Cbs, Trainer, events::RunTypes<TrainBatch, TrainOutput, EvalBatch, EvalOutput>>() && ...);

// Whether a callback of the list asks for the trainer's phases as ranges in LibTorch's profiler, by declaring
// `static constexpr bool records_phases = true;` (callbacks::Profiler). Without one the trainer makes no range.
template <class C>
inline constexpr bool records_phases_of = requires { requires C::records_phases; };
template <class Tuple>
inline constexpr bool records_phases_v = false;
template <class... C>
inline constexpr bool records_phases_v<boost::hana::tuple<C...>> = (false || ... || records_phases_of<C>);

}  // namespace accelerated::detail
