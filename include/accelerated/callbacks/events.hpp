#pragma once
// The 17 events of a run and their compile-time dispatch. A callback is any class (a lambda too); it handles an event
// with a call operator whose first parameter is the event's tag, then the trainer alone or the trainer and the
// event's arguments:
//
//   void operator()(accelerated::on_train_epoch_end, auto& trainer);
//   bool operator()(accelerated::on_eval_step_end, auto& trainer, const auto& batch, const auto& output);
//
//   on_init_end(trainer)                 on_training_run_start(trainer)      on_train_epoch_start(trainer)
//   on_train_step_start(trainer)         on_train_step_end(trainer, batch, batch_output, step)
//   on_train_epoch_end(trainer)          on_eval_epoch_start(trainer, is_intermediate)
//   on_eval_step_start(trainer)          on_eval_step_end(trainer, batch, batch_output)
//   on_eval_epoch_end(trainer, is_intermediate)                              on_training_run_epoch_end(trainer)
//   on_training_run_end(trainer)         on_evaluation_run_start(trainer)    on_evaluation_run_end(trainer)
//   on_stop_training_error(trainer, const StopTrainingError& error)
//   on_before_optimizer_step(trainer)    on an update step, after backward (gradients averaged over the processes,
//                                        still scaled under fp16 unless a callback unscaled them), before clipping
//                                        and the optimizer step (as Lightning's): the place to read or check the
//                                        gradients, and to call trainer.skip_update()
//   on_update_step_end(trainer)          after each optimizer update (and its scheduler step and zero_grad): the
//                                        place for per-update work such as an EMA, or saving the training state
//                                        (not in the Python original, whose only step events are per micro-batch)
//
// Why tags, not member names such as on_train_epoch_end(trainer): C++ cannot list a class's members, so a misspelled
// member name would compile and never be called. A misspelled tag does not compile ("'on_train_epoch_edn' is not a
// member of 'accelerated'"), and a handler whose tag is right but whose parameters cannot take the event's arguments
// (a non-const reference to the batch, another trainer type) is a static_assert naming the callback and the event.
//
// A handler returning exactly `bool` asks the trainer to stop when it returns true (after the current step).
// An event no callback handles generates no code: dispatch is `if constexpr` over a Boost.Hana tuple.
#include <boost/hana/for_each.hpp>
#include <boost/hana/tuple.hpp>

#include <cstdint>
#include <string_view>
#include <type_traits>

#include "../detail/any_argument.hpp"
#include "../errors.hpp"
#include "events.hpp"

namespace accelerated::events {

// The types of one run that the events' arguments are made of.
template <class TrainBatch, class TrainOutput, class EvalBatch, class EvalOutput>
struct RunTypes {
  using train_batch = TrainBatch;
  using train_output = TrainOutput;
  using eval_batch = EvalBatch;
  using eval_output = EvalOutput;
};

template <class... T>
struct type_list {};

namespace detail {
template <class R>
constexpr bool returns_bool = std::is_same_v<R, bool>;

#define ACCELERATED_UNPARENTHESISE(...) __VA_ARGS__
}  // namespace detail

// Every event, once: its name and the arguments after the trainer (in terms of `Run`, a RunTypes). Everything else
// (the tag types, the checks, the names under accelerated::) is generated from this list.
#define ACCELERATED_EVENTS(X)                                                                       \
  X(on_init_end, ())                                                                                \
  X(on_training_run_start, ())                                                                      \
  X(on_train_epoch_start, ())                                                                       \
  X(on_train_step_start, ())                                                                        \
  X(on_train_step_end, (typename Run::train_batch, typename Run::train_output, std::int64_t))      \
  X(on_train_epoch_end, ())                                                                         \
  X(on_eval_epoch_start, (bool))                                                                    \
  X(on_eval_step_start, ())                                                                         \
  X(on_eval_step_end, (typename Run::eval_batch, typename Run::eval_output))                        \
  X(on_eval_epoch_end, (bool))                                                                      \
  X(on_training_run_epoch_end, ())                                                                  \
  X(on_training_run_end, ())                                                                        \
  X(on_evaluation_run_start, ())                                                                    \
  X(on_evaluation_run_end, ())                                                                      \
  X(on_stop_training_error, (StopTrainingError))                                                    \
  X(on_before_optimizer_step, ())                                                                   \
  X(on_update_step_end, ())

// One tag type per event: `handled_by` tells whether a callback handles it with these arguments, `call` invokes it
// (returns "stop?"), `misdeclared_by` finds a handler with this tag whose parameters cannot take them.
#define ACCELERATED_DEFINE_EVENT(NAME, ARGUMENTS)                                                               \
  struct NAME {                                                                                                 \
    static constexpr std::string_view name = #NAME;                                                             \
    template <class Run>                                                                                        \
    using arguments = type_list<ACCELERATED_UNPARENTHESISE ARGUMENTS>;                                          \
    template <class Cb, class Tr, class... A>                                                                   \
    static constexpr bool full_form = requires(Cb& cb, Tr& tr, const NAME& e, const A&... a) { cb(e, tr, a...); }; \
    template <class Cb, class Tr>                                                                               \
    static constexpr bool short_form = requires(Cb& cb, Tr& tr, const NAME& e) { cb(e, tr); };               \
    template <class Cb, class Tr, class... A>                                                                   \
    static constexpr bool handled_by = full_form<Cb, Tr, A...> || short_form<Cb, Tr>;                          \
    template <class Cb>                                                                                         \
    static constexpr bool has_handler =                                                                         \
        requires(Cb& cb, const NAME& e, accelerated::detail::any_argument& x) { cb(e, x); } ||                                         \
        requires(Cb& cb, const NAME& e, accelerated::detail::any_argument& x) { cb(e, x, x); } ||                                      \
        requires(Cb& cb, const NAME& e, accelerated::detail::any_argument& x) { cb(e, x, x, x); } ||                                   \
        requires(Cb& cb, const NAME& e, accelerated::detail::any_argument& x) { cb(e, x, x, x, x); };                                  \
    /* A member function named after the event (pytorch-accelerated's form), which the trainer never calls. */ \
    template <class Cb>                                                                                         \
    static constexpr bool member_named_by =                                                                     \
        requires(Cb& cb) { cb.NAME(); } ||                                                                      \
        requires(Cb& cb, accelerated::detail::any_argument& x) { cb.NAME(x); } ||                               \
        requires(Cb& cb, accelerated::detail::any_argument& x) { cb.NAME(x, x); } ||                            \
        requires(Cb& cb, accelerated::detail::any_argument& x) { cb.NAME(x, x, x); } ||                         \
        requires(Cb& cb, accelerated::detail::any_argument& x) { cb.NAME(x, x, x, x); };                        \
    /* A handler with this tag that cannot take the event's arguments: a compile error naming the event. */     \
    template <class Cb, class Tr, class... A>                                                                   \
    static constexpr bool check_handler(type_list<A...>) {                                                      \
      /* has_handler only when needed: it may instantiate a handler with a deduced return type. */             \
      if constexpr (handled_by<Cb, Tr, A...>) {                                                                 \
        return true;                                                                                            \
      } else {                                                                                                  \
        static_assert(!has_handler<Cb>, "accelerated: a callback's handler for " #NAME                          \
                                        " cannot take its arguments (see the callback type in 'required from'): " \
                                        "take the trainer as `auto&` or the trainer type, and the event's other " \
                                        "arguments as const references or values (accelerated/callbacks/events.hpp)"); \
        return false;                                                                                           \
      }                                                                                                         \
    }                                                                                                           \
    template <class Cb, class Tr, class... A>                                                                   \
    static bool call(Cb& cb, Tr& tr, const A&... a) {                                                           \
      if constexpr (full_form<Cb, Tr, A...>) {                                                                  \
        if constexpr (detail::returns_bool<decltype(cb(NAME{}, tr, a...))>) {                                   \
          return cb(NAME{}, tr, a...);                                                                          \
        } else {                                                                                                \
          cb(NAME{}, tr, a...);                                                                                 \
          return false;                                                                                         \
        }                                                                                                       \
      } else if constexpr (short_form<Cb, Tr>) {                                                                \
        if constexpr (detail::returns_bool<decltype(cb(NAME{}, tr))>) {                                         \
          return cb(NAME{}, tr);                                                                                \
        } else {                                                                                                \
          cb(NAME{}, tr);                                                                                       \
          return false;                                                                                         \
        }                                                                                                       \
      } else {                                                                                                  \
        return false;                                                                                           \
      }                                                                                                         \
    }                                                                                                           \
  };

ACCELERATED_EVENTS(ACCELERATED_DEFINE_EVENT)
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

// Checks every handler of `Cb` against the run's real argument types (a misdeclared one is a static_assert naming
// its event); true when `Cb` handles at least one event.
template <class Cb, class Trainer, class Run>
constexpr bool check_callback() {
  bool handles_any = false;
#define ACCELERATED_CHECK_EVENT(NAME, ARGUMENTS)                                                                   \
  static_assert(!NAME::member_named_by<Cb>,                                                                        \
                "accelerated: a callback has a member function " #NAME "(...), which the trainer never calls "     \
                "(the Python original's form); write it as a handler that takes the event's tag: "                 \
                "void operator()(accelerated::" #NAME ", auto& trainer, ...) (accelerated/callbacks/events.hpp)"); \
  handles_any = NAME::check_handler<Cb, Trainer>(typename NAME::template arguments<Run>{}) || handles_any;
  ACCELERATED_EVENTS(ACCELERATED_CHECK_EVENT)
#undef ACCELERATED_CHECK_EVENT
  return handles_any;
}

}  // namespace accelerated::events

namespace accelerated {
// The tags under the library's namespace, so that handlers read `operator()(accelerated::on_train_epoch_end, ...)`.
#define ACCELERATED_EXPORT_EVENT(NAME, ARGUMENTS) using events::NAME;
ACCELERATED_EVENTS(ACCELERATED_EXPORT_EVENT)
#undef ACCELERATED_EXPORT_EVENT
}  // namespace accelerated
