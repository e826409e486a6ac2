#pragma once
// Classification accuracy over an evaluation epoch, counted on every process and summed across processes, so the
// recorded value is the global one: "eval_accuracy" during train(), "evaluation_accuracy" during evaluate()
// ("eval_top5_accuracy" for TopKAccuracy<5>), "intermediate_eval_accuracy" in evaluations StepBasedEvaluation asks for. Model outputs are [batch, classes] scores; targets are class indices.
// k is a template parameter so that several k can sit in one trainer (each callback type appears once).
#include <torch/types.h>

#include <array>
#include <cstdint>
#include <string>

#include "../batch.hpp"
#include "../distributed/call_site.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

template <std::int64_t K>
class TopKAccuracy {
  static_assert(K >= 1, "accelerated::callbacks::TopKAccuracy<K>: K must be >= 1");

 public:

  template <class Trainer>
  void operator()(accelerated::on_evaluation_run_start, Trainer&) {
    in_evaluation_run_ = true;
  }
  template <class Trainer>
  void operator()(accelerated::on_evaluation_run_end, Trainer&) {
    in_evaluation_run_ = false;
  }
  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_start, Trainer&) {
    hits_ = torch::Tensor();
    examples_ = 0.0;
  }

  template <class Trainer, class Batch, class Output>
  void operator()(accelerated::on_eval_step_end, Trainer&, const Batch& batch, const Output& output) {
    const auto& targets = targets_of(batch);
    const auto& scores = output.model_outputs;
    torch::Tensor hits;
    if (K == 1) {
      hits = scores.argmax(1).eq(targets);
    } else {
      hits = std::get<1>(scores.topk(K, 1)).eq(targets.unsqueeze(1)).any(1);
    }
    // Counted on the device: reading it every batch would make the host wait for each eval step.
    auto sum = hits.sum();
    hits_ = hits_.defined() ? hits_.add_(sum) : sum;
    examples_ += static_cast<double>(targets.size(0));
  }

  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_end, Trainer& trainer, bool is_intermediate) {
    std::array<double, 2> totals{hits_.defined() ? static_cast<double>(hits_.template item<std::int64_t>()) : 0.0,
                                 examples_};
    const accelerated::distributed::AtCallSite site(accelerated::distributed::CallSite::metric);
    trainer.distributed().all_reduce_sum(totals);
    if (totals[1] == 0) return;
    const std::string k = K == 1 ? "" : "top" + std::to_string(K) + "_";
    const std::string prefix = in_evaluation_run_ ? "evaluation_" : is_intermediate ? "intermediate_eval_" : "eval_";
    trainer.run_history().update_metric(prefix + k + "accuracy", totals[0] / totals[1]);
  }

 private:
  bool in_evaluation_run_ = false;
  torch::Tensor hits_;    // on the model's device
  double examples_ = 0.0;
};

using Accuracy = TopKAccuracy<1>;

}  // namespace accelerated::callbacks
