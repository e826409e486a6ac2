// The names the docs' C++ fragments use without declaring them: a fragment's statements are compiled in a function
// taking these as parameters (nothing is run), its declarations in a namespace that sees doc_context.
#pragma once
#include <accelerated/accelerated.hpp>

#include <algorithm>
#include <span>
#include <string>
#include <vector>

#include <cstdint>
#include <iostream>

namespace doc_context {
namespace acc = accelerated;
namespace nn = torch::nn;

// docs/finetuning.md: a backbone shared by two classifiers.
struct BackboneImpl : nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(Backbone);
struct ClassifierImpl : nn::Module {
  explicit ClassifierImpl(Backbone backbone) { register_module("backbone", backbone); }
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(Classifier);

// The archetypes the "writing a ... policy" pages show (the pages are checked against these files).
#include "archetypes/device_policy.hpp"
#include "archetypes/distributed_policy.hpp"
}  // namespace doc_context

#define DOC_CONTEXT_PARAMETERS                                                                                     \
  [[maybe_unused]] torch::nn::Sequential& model, [[maybe_unused]] torch::nn::CrossEntropyLoss& loss,                 \
      [[maybe_unused]] torch::optim::SGD& optimizer, [[maybe_unused]] accelerated::Trainer<>& trainer,               \
      [[maybe_unused]] accelerated::data::TensorDataset& train_set,                                                  \
      [[maybe_unused]] accelerated::data::TensorDataset& eval_set,                                                   \
      [[maybe_unused]] accelerated::data::TensorDataset& test_set, [[maybe_unused]] accelerated::TrainOptions& options, \
      [[maybe_unused]] doc_context::Backbone& backbone, [[maybe_unused]] accelerated::data::TensorDataset& target_train, \
      [[maybe_unused]] accelerated::data::TensorDataset& target_test,                                                \
      [[maybe_unused]] c10::intrusive_ptr<c10d::Store>& store, [[maybe_unused]] std::int64_t rank,                   \
      [[maybe_unused]] std::int64_t world
