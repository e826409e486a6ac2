#pragma once
// The 16 events of a run and their compile-time dispatch. A callback is any class; it handles an event by having
// a member function of that name, taking either the trainer alone or the trainer and the event's arguments:
//
//   on_init_end(trainer)                 on_training_run_start(trainer)      on_train_epoch_start(trainer)
//   on_train_step_start(trainer)         on_train_step_end(trainer, batch, batch_output, step)
//   on_train_epoch_end(trainer)          on_eval_epoch_start(trainer, is_intermediate)
//   on_eval_step_start(trainer)          on_eval_step_end(trainer, batch, batch_output)
//   on_eval_epoch_end(trainer, is_intermediate)                              on_training_run_epoch_end(trainer)
//   on_training_run_end(trainer)         on_evaluation_run_start(trainer)    on_evaluation_run_end(trainer)
//   on_stop_training_error(trainer, const StopTrainingError& error)
//   on_update_step_end(trainer)          after each optimizer update (and its scheduler step and zero_grad): the
//                                        place for per-update work such as an EMA, or saving the training state
//                                        (not in the Python original, whose only step events are per micro-batch)
//
// A handler returning exactly `bool` asks the trainer to stop when it returns true (after the current step).
// An event no callback handles generates no code: dispatch is `if constexpr` over a Boost.Hana tuple.
#include <boost/hana/for_each.hpp>
#include <boost/hana/tuple.hpp>

#include <cstdint>
#include <string_view>
#include <type_traits>

namespace accelerated::events {

namespace detail {
template <class R>
constexpr bool returns_bool = std::is_same_v<R, bool>;
}

// One type per event: `handled_by` tells whether a callback handles it, `call` invokes it (returns "stop?").
#define ACCELERATED_DEFINE_EVENT(NAME)                                                                      \
  struct NAME {                                                                                             \
    static constexpr std::string_view name = #NAME;                                                         \
    template <class Cb, class Tr, class... A>                                                               \
    static constexpr bool full_form = requires(Cb& cb, Tr& tr, const A&... a) { cb.NAME(tr, a...); };      \
    template <class Cb, class Tr>                                                                           \
    static constexpr bool short_form = requires(Cb& cb, Tr& tr) { cb.NAME(tr); };                           \
    template <class Cb, class Tr, class... A>                                                               \
    static constexpr bool handled_by = full_form<Cb, Tr, A...> || short_form<Cb, Tr>;                      \
    template <class Cb, class Tr, class... A>                                                               \
    static bool call(Cb& cb, Tr& tr, const A&... a) {                                                       \
      if constexpr (full_form<Cb, Tr, A...>) {                                                              \
        if constexpr (detail::returns_bool<decltype(cb.NAME(tr, a...))>) {                                  \
          return cb.NAME(tr, a...);                                                                         \
        } else {                                                                                            \
          cb.NAME(tr, a...);                                                                                \
          return false;                                                                                     \
        }                                                                                                   \
      } else if constexpr (short_form<Cb, Tr>) {                                                            \
        if constexpr (detail::returns_bool<decltype(cb.NAME(tr))>) {                                        \
          return cb.NAME(tr);                                                                               \
        } else {                                                                                            \
          cb.NAME(tr);                                                                                      \
          return false;                                                                                     \
        }                                                                                                   \
      } else {                                                                                              \
        return false;                                                                                       \
      }                                                                                                     \
    }                                                                                                       \
  };

ACCELERATED_DEFINE_EVENT(on_init_end)
ACCELERATED_DEFINE_EVENT(on_training_run_start)
ACCELERATED_DEFINE_EVENT(on_train_epoch_start)
ACCELERATED_DEFINE_EVENT(on_train_step_start)
ACCELERATED_DEFINE_EVENT(on_train_step_end)
ACCELERATED_DEFINE_EVENT(on_train_epoch_end)
ACCELERATED_DEFINE_EVENT(on_eval_epoch_start)
ACCELERATED_DEFINE_EVENT(on_eval_step_start)
ACCELERATED_DEFINE_EVENT(on_eval_step_end)
ACCELERATED_DEFINE_EVENT(on_eval_epoch_end)
ACCELERATED_DEFINE_EVENT(on_training_run_epoch_end)
ACCELERATED_DEFINE_EVENT(on_training_run_end)
ACCELERATED_DEFINE_EVENT(on_evaluation_run_start)
ACCELERATED_DEFINE_EVENT(on_evaluation_run_end)
ACCELERATED_DEFINE_EVENT(on_stop_training_error)
ACCELERATED_DEFINE_EVENT(on_update_step_end)
#undef ACCELERATED_DEFINE_EVENT

// Calls `Event` on every callback of the tuple, in order; true when any handler asked to stop.
template <class Event, class Callbacks, class Trainer, class... A>
bool emit(Callbacks& callbacks, Trainer& trainer, const A&... args) {
  bool stop = false;
  boost::hana::for_each(callbacks, [&](auto& callback) {
    using Cb = std::remove_cvref_t<decltype(callback)>;
    if constexpr (Event::template handled_by<Cb, Trainer, A...>) {
      stop = Event::call(callback, trainer, args...) || stop;
    }
  });
  return stop;
}

// Does `Cb` handle at least one event? Step events are tried with the run's real batch and output types.
template <class Cb, class Trainer, class TrainBatch, class TrainOutput, class EvalBatch, class EvalOutput,
          class Error>
constexpr bool handles_any_event =
    on_init_end::handled_by<Cb, Trainer> || on_training_run_start::handled_by<Cb, Trainer> ||
    on_train_epoch_start::handled_by<Cb, Trainer> || on_train_step_start::handled_by<Cb, Trainer> ||
    on_train_step_end::handled_by<Cb, Trainer, TrainBatch, TrainOutput, std::int64_t> ||
    on_train_epoch_end::handled_by<Cb, Trainer> || on_eval_epoch_start::handled_by<Cb, Trainer, bool> ||
    on_eval_step_start::handled_by<Cb, Trainer> || on_eval_step_end::handled_by<Cb, Trainer, EvalBatch, EvalOutput> ||
    on_eval_epoch_end::handled_by<Cb, Trainer, bool> || on_training_run_epoch_end::handled_by<Cb, Trainer> ||
    on_training_run_end::handled_by<Cb, Trainer> || on_evaluation_run_start::handled_by<Cb, Trainer> ||
    on_evaluation_run_end::handled_by<Cb, Trainer> || on_stop_training_error::handled_by<Cb, Trainer, Error> ||
    on_update_step_end::handled_by<Cb, Trainer>;

}  // namespace accelerated::events
