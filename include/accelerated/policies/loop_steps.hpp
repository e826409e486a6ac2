#pragma once
// The steps of a loop policy, written once (ACCELERATED_LOOP_STEPS). A loop policy defines only the steps it changes:
// the trainer calls the policy's step when it has one that takes the step's arguments, DefaultLoop's otherwise, so a
// policy written from scratch may be a struct with one member. A step the policy declares but that cannot take the
// arguments is a compile error naming the step (it would otherwise be silently replaced by the default).
// Dispatch is resolved at compile time: a policy derived from DefaultLoop costs what a direct call costs.
#include <string_view>
#include <utility>

#include "../detail/any_argument.hpp"
#include "loop.hpp"

namespace accelerated::steps {

// Every step, in the order docs/loop.md calls them.
#define ACCELERATED_LOOP_STEPS(X)                                                                            \
  X(create_train_dataloader) X(create_eval_dataloader) X(create_scheduler) X(training_run_start)            \
  X(train_epoch_start) X(calculate_train_batch_loss) X(backward_step) X(optimizer_step) X(scheduler_step)    \
  X(optimizer_zero_grad) X(train_epoch_end) X(eval_epoch_start) X(calculate_eval_batch_loss) X(eval_epoch_end) \
  X(training_run_epoch_end) X(training_run_end) X(evaluation_run_start) X(evaluation_run_end)

#define ACCELERATED_DEFINE_STEP(NAME)                                                                             \
  struct NAME {                                                                                                  \
    static constexpr std::string_view name = #NAME;                                                              \
    template <class Loop, class... A>                                                                            \
    static constexpr bool defined_by = requires(Loop& loop, A&&... a) { loop.NAME(std::forward<A>(a)...); };      \
    template <class Loop>                                                                                        \
    static constexpr bool declared_by = requires(Loop& l, accelerated::detail::any_argument& x) { l.NAME(x); } ||            \
                                        requires(Loop& l, accelerated::detail::any_argument& x) { l.NAME(x, x); } ||         \
                                        requires(Loop& l, accelerated::detail::any_argument& x) { l.NAME(x, x, x); } ||      \
                                        requires(Loop& l, accelerated::detail::any_argument& x) { l.NAME(x, x, x, x); };     \
    /* The policy's step or, when it has none, DefaultLoop's can take these arguments. */                        \
    template <class Loop, class... A>                                                                            \
    static constexpr bool available = defined_by<Loop, A...> || defined_by<DefaultLoop, A...>;                   \
    template <class Loop, class... A>                                                                            \
    static decltype(auto) call(Loop& loop, A&&... a) {                                                           \
      if constexpr (defined_by<Loop, A...>) {                                                                    \
        return loop.NAME(std::forward<A>(a)...);                                                                 \
      } else {                                                                                                   \
        static_assert(!declared_by<Loop>, "accelerated::Trainer: the LoopPolicy's step " #NAME                   \
                                          " cannot take the arguments the trainer passes (see the policy type "  \
                                          "in 'required from' and the signature in policies/loop.hpp)");         \
        return DefaultLoop{}.NAME(std::forward<A>(a)...);                                                        \
      }                                                                                                          \
    }                                                                                                            \
  };

ACCELERATED_LOOP_STEPS(ACCELERATED_DEFINE_STEP)
#undef ACCELERATED_DEFINE_STEP

}  // namespace accelerated::steps
