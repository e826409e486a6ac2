#pragma once
// Callback groups and the default set. A group is flattened into the trainer's callback list, so
//   Trainer trainer(model, loss, optimizer, callbacks::Defaults{}, callbacks::Accuracy{});
// keeps the defaults and adds one. A trainer given no callbacks at all uses Defaults.
#include <boost/hana/tuple.hpp>

#include <utility>

#include "log_metrics.hpp"
#include "model_summary.hpp"
#include "print_progress.hpp"
#include "progress_bar.hpp"
#include "terminate_on_nan.hpp"

namespace accelerated::callbacks {

template <class... Callbacks>
struct Group {
  boost::hana::tuple<Callbacks...> members;
};

template <class... Callbacks>
Group<Callbacks...> group(Callbacks... callbacks) {
  return {boost::hana::make_tuple(std::move(callbacks)...)};
}

// On by default, in this order: stop on a non-finite loss, print run boundaries, what is trained and how, progress
// bar, log metrics.
using Defaults = Group<TerminateOnNan, PrintProgress, ModelSummary, ProgressBar, LogMetrics>;

// No callbacks at all (not even the defaults): Trainer trainer(model, loss, optimizer, callbacks::None{}).
using None = Group<>;

}  // namespace accelerated::callbacks
