#pragma once
// Configured policies: the four policies of a trainer as values, so that a policy with options is given to the
// trainer when it is built, as ensmallen's optimizers take configured policy objects:
//
//   accelerated::Trainer trainer(model, loss, optimizer,
//                                accelerated::policies(accelerated::DataParallel(options), accelerated::BFloat16{}),
//                                accelerated::callbacks::Defaults{});
//
// policies(...) takes any of them, in any order; each is recognised by what it has: the family whose concept it
// satisfies, else the family it resembles (a device policy that lacks to_device is still the device policy, and the
// trainer's check names the missing member); a loop policy derives from DefaultLoop or declares a step. Anything
// else is a compile error. The ones not given are the defaults. A
// default-constructed policy costs nothing: the distributed one joins no process group until the first run.
#include <concepts>
#include <type_traits>
#include <utility>

#include "concepts.hpp"
#include "policies/device.hpp"
#include "policies/distributed.hpp"
#include "policies/loop.hpp"
#include "policies/loop_steps.hpp"
#include "policies/precision.hpp"

namespace accelerated {

template <class Device = AutoDevice, class Precision = AutoPrecision, class Distributed = AutoDistributed,
          class Loop = DefaultLoop>
struct Policies {
  Device device{};
  Precision precision{};
  Distributed distributed{};
  Loop loop{};
};

namespace detail {
enum class PolicyKind { device, precision, distributed, loop, none };

// What a policy of each family has that no other family has, so that an incomplete policy is still recognised (and
// the trainer's member-by-member check names what it lacks) instead of being taken for another kind.
template <class T>
concept resembles_device = device_has_place<T> || device_has_to_device<T>;
template <class T>
concept resembles_precision = precision_has_autocast<T> || precision_has_backward<T> || precision_has_unscale<T> ||
                              precision_has_step<T> || precision_has_skipped<T>;
template <class T>
concept resembles_distributed = distributed_has_prepare<T> || distributed_has_gradient_sync<T> ||
                                distributed_has_all_reduce<T> || requires(T& p) { p.barrier(); };
// A loop policy derives from DefaultLoop or declares at least one of the loop's steps.
template <class T>
concept resembles_loop = std::derived_from<T, DefaultLoop> ||
#define ACCELERATED_DECLARES_STEP(NAME) steps::NAME::declared_by<T> ||
                         ACCELERATED_LOOP_STEPS(ACCELERATED_DECLARES_STEP) false;
#undef ACCELERATED_DECLARES_STEP

template <class T>
constexpr PolicyKind policy_kind_v = DevicePolicy<T>          ? PolicyKind::device
                                     : PrecisionPolicy<T>     ? PolicyKind::precision
                                     : DistributedPolicy<T>   ? PolicyKind::distributed
                                     : resembles_loop<T>      ? PolicyKind::loop
                                     : resembles_device<T>    ? PolicyKind::device
                                     : resembles_precision<T> ? PolicyKind::precision
                                     : resembles_distributed<T> ? PolicyKind::distributed
                                                                : PolicyKind::none;

// The given policy of `Kind`, else `Default`.
template <PolicyKind Kind, class Default, class... Given>
struct policy_of {
  using type = Default;
};
template <PolicyKind Kind, class Default, class First, class... Rest>
struct policy_of<Kind, Default, First, Rest...>
    : std::conditional_t<policy_kind_v<First> == Kind, std::type_identity<First>, policy_of<Kind, Default, Rest...>> {};

template <PolicyKind Kind, class... Given>
constexpr int count_of_kind_v = (0 + ... + int{policy_kind_v<Given> == Kind});

// The argument of type T among `given`, moved out; a default T when there is none.
template <class T>
T take() {
  return T{};
}
template <class T, class First, class... Rest>
T take(First& first, Rest&... rest) {
  if constexpr (std::is_same_v<T, First>) {
    return std::move(first);
  } else {
    return take<T>(rest...);
  }
}
}  // namespace detail

template <class... Given>
auto policies(Given... given) {
  using detail::PolicyKind;
  static_assert(detail::count_of_kind_v<PolicyKind::device, Given...> <= 1,
                "accelerated::policies: two device policies were given; give at most one of each kind");
  static_assert(detail::count_of_kind_v<PolicyKind::precision, Given...> <= 1,
                "accelerated::policies: two precision policies were given; give at most one of each kind");
  static_assert(detail::count_of_kind_v<PolicyKind::distributed, Given...> <= 1,
                "accelerated::policies: two distributed policies were given; give at most one of each kind");
  static_assert(detail::count_of_kind_v<PolicyKind::loop, Given...> <= 1,
                "accelerated::policies: two loop policies were given; give at most one of each kind");
  static_assert(detail::count_of_kind_v<PolicyKind::none, Given...> == 0,
                "accelerated::policies: an argument is none of the four policies: it has no member of a device "
                "policy (place, to_device), a precision policy (autocast, backward, step, ...) or a distributed "
                "policy (prepare, gradient_sync, all_reduce_sum, ...), and declares no loop step (derive a loop "
                "policy from accelerated::DefaultLoop); see concepts.hpp");
  using Device = typename detail::policy_of<PolicyKind::device, AutoDevice, Given...>::type;
  using Precision = typename detail::policy_of<PolicyKind::precision, AutoPrecision, Given...>::type;
  using Distributed = typename detail::policy_of<PolicyKind::distributed, AutoDistributed, Given...>::type;
  using Loop = typename detail::policy_of<PolicyKind::loop, DefaultLoop, Given...>::type;
  return Policies<Device, Precision, Distributed, Loop>{detail::take<Device>(given...), detail::take<Precision>(given...),
                                                        detail::take<Distributed>(given...),
                                                        detail::take<Loop>(given...)};
}

}  // namespace accelerated
