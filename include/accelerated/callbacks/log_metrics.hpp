#pragma once
// Prints the latest value of each metric (process zero only). Training metrics at the end of the training epoch;
// every other metric at the end of the whole epoch, after all eval callbacks have recorded theirs (the Python
// original logs at on_eval_epoch_end, so metrics recorded by callbacks listed after it were missed).
#include <string>
#include "events.hpp"

namespace accelerated::callbacks {

class LogMetrics {
 public:
  template <class Trainer>
  void operator()(accelerated::on_train_epoch_end, Trainer& trainer) {
    log(trainer, [](const std::string& name) { return name.find("train") != std::string::npos; });
  }
  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    log(trainer, [](const std::string& name) { return name.find("train") == std::string::npos; });
  }
  // Intermediate evaluations' metrics (intermediate_*) exist only during this event; LogMetrics must be listed after
  // the callbacks that record them (Accuracy) to see theirs: callbacks::Defaults then goes after Accuracy.
  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_end, Trainer& trainer, bool is_intermediate) {
    if (is_intermediate) log(trainer, [](const std::string& name) { return name.rfind("intermediate_", 0) == 0; });
  }
  template <class Trainer>
  void operator()(accelerated::on_evaluation_run_end, Trainer& trainer) {
    log(trainer, [](const std::string& name) { return name.rfind("evaluation", 0) == 0; });
  }

 private:
  template <class Trainer, class Select>
  static void log(Trainer& trainer, Select select) {
    const auto& history = trainer.run_history();
    for (const auto& name : history.get_metric_names()) {
      if (select(name)) trainer.print(name, ": ", history.get_latest_metric(name));
    }
  }
};

}  // namespace accelerated::callbacks
