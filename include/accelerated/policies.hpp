#pragma once
// Configured policies: the four policies of a trainer as values, so that a policy with options is given to the
// trainer when it is built, as ensmallen's optimizers take configured policy objects:
//
//   accelerated::Trainer trainer(model, loss, optimizer,
//                                accelerated::policies(accelerated::DataParallel(options), accelerated::BFloat16{}),
//                                accelerated::callbacks::Defaults{});
//
// policies(...) takes any of them, in any order; each is recognised by the concept it satisfies (a device, precision
// or distributed policy; anything else is the loop policy), and the ones not given are the defaults. A
// default-constructed policy costs nothing: the distributed one joins no process group until the first run.
#include <type_traits>
#include <utility>

#include "concepts.hpp"
#include "policies/device.hpp"
#include "policies/distributed.hpp"
#include "policies/loop.hpp"
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
enum class PolicyKind { device, precision, distributed, loop };

template <class T>
constexpr PolicyKind policy_kind_v = DevicePolicy<T>        ? PolicyKind::device
                                     : PrecisionPolicy<T>   ? PolicyKind::precision
                                     : DistributedPolicy<T> ? PolicyKind::distributed
                                                            : PolicyKind::loop;

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
                "accelerated::policies: two loop policies (or something that is no policy) were given; give at most "
                "one of each kind");
  using Device = typename detail::policy_of<PolicyKind::device, AutoDevice, Given...>::type;
  using Precision = typename detail::policy_of<PolicyKind::precision, AutoPrecision, Given...>::type;
  using Distributed = typename detail::policy_of<PolicyKind::distributed, AutoDistributed, Given...>::type;
  using Loop = typename detail::policy_of<PolicyKind::loop, DefaultLoop, Given...>::type;
  return Policies<Device, Precision, Distributed, Loop>{detail::take<Device>(given...), detail::take<Precision>(given...),
                                                        detail::take<Distributed>(given...),
                                                        detail::take<Loop>(given...)};
}

}  // namespace accelerated
