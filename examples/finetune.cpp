// Fine-tuning with ModelFreezer: a CNN backbone learns Fashion-MNIST classes 0-4 ("pre-training"); then a new head
// learns classes 5-9 with the backbone frozen, and finally the backbone is unfrozen and trained on at a lower rate.
// Usage: finetune [fashion-mnist folder]. Writes the fine-tuning's learning curves (finetune_curves.svg: open it in a
// browser), its metrics (finetune_metrics.csv) and the head's learning-rate range test (finetune_lr_find.svg) in the
// current folder. Last line: JSON with the accuracy on classes 5-9 after each stage.
#include <accelerated/accelerated.hpp>

namespace acc = accelerated;
namespace nn = torch::nn;

struct BackboneImpl : nn::Module {
  nn::Sequential layers{nn::Conv2d(nn::Conv2dOptions(1, 16, 3).padding(1)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Conv2d(nn::Conv2dOptions(16, 32, 3).padding(1)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Flatten(), nn::Linear(32 * 7 * 7, 64), nn::ReLU()};
  BackboneImpl() { register_module("layers", layers); }
  torch::Tensor forward(const torch::Tensor& x) { return layers->forward(x); }
};
TORCH_MODULE(Backbone);

// Layer groups for ModelFreezer are the top-level children: 0 = backbone, 1 = head.
struct ClassifierImpl : nn::Module {
  Backbone backbone;
  nn::Linear head{64, 5};
  explicit ClassifierImpl(Backbone shared) : backbone(register_module("backbone", shared)) {
    register_module("head", head);
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(backbone(x)); }
};
TORCH_MODULE(Classifier);

// The examples whose label is in [first, first + 5), relabelled 0..4.
acc::data::TensorDataset classes(const acc::data::TensorDataset& data, std::int64_t first) {
  const auto keep = (data.targets() >= first).logical_and(data.targets() < first + 5).nonzero().squeeze(1);
  return {data.inputs().index_select(0, keep), data.targets().index_select(0, keep) - first};
}

int main(int argc, char** argv) try {
  const std::string folder = argc > 1 ? argv[1] : acc::data::fashion_mnist_default_folder;
  const auto train = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
  const auto test = acc::data::load_fashion_mnist(folder, acc::data::Split::test);
  torch::manual_seed(0);
  Backbone backbone;
  const acc::TrainOptions options{.num_epochs = 1, .per_device_batch_size = 64, .reset_run_history = false};

  // 1. Pre-train backbone + head on classes 0-4.
  Classifier pretrain(backbone);
  torch::optim::Adam pretrain_optimizer(pretrain->parameters(), torch::optim::AdamOptions(1e-3));
  acc::Trainer pretrainer(pretrain, nn::CrossEntropyLoss(), pretrain_optimizer);
  pretrainer.train(classes(train, 0), options);

  // 2. A new head for classes 5-9; the backbone (group 0) frozen, only the head trains.
  Classifier model(backbone);
  acc::ModelFreezer freezer(model);
  freezer.freeze(0, 0);
  torch::optim::Adam optimizer(freezer.trainable_parameters(), torch::optim::AdamOptions(1e-3));
  // Both stages keep one run history (reset_run_history = false), so the curves and the file show them one after
  // the other: the frozen head's epoch, then the whole model's.
  acc::Trainer trainer(model, nn::CrossEntropyLoss(), optimizer, acc::callbacks::Defaults{}, acc::callbacks::Accuracy{},
                       acc::callbacks::LearningCurves("finetune_curves.svg", 10),
                       acc::callbacks::MetricsLogger("finetune_metrics.csv"));
  const auto target_train = classes(train, 5), target_test = classes(test, 5);
  // Which rate suits the new head? A short sweep from 1e-5 to 1 says; the model and optimizer are left as they were.
  const auto found = acc::find_learning_rate(trainer, target_train,
                                             {.train = options, .start_lr = 1e-5, .end_lr = 1.0, .num_steps = 60,
                                              .svg = "finetune_lr_find.svg"});
  if (found.suggestion) trainer.print("The range test suggests ", *found.suggestion, "; this example keeps 1e-3");
  trainer.train(target_train, options, target_test);
  const double frozen_accuracy = trainer.run_history().get_latest_metric("eval_accuracy");

  // 3. Unfreeze the backbone and give its parameters to the optimizer at a lower rate.
  for (auto& [group, parameters] : freezer.unfreeze()) {
    optimizer.add_param_group(torch::optim::OptimizerParamGroup(
        parameters, std::make_unique<torch::optim::AdamOptions>(torch::optim::AdamOptions(1e-4))));
  }
  trainer.train(target_train, options, target_test);
  trainer.print("Learning curves: finetune_curves.svg; metrics: finetune_metrics.csv; range test: finetune_lr_find.svg");
  trainer.print(R"({"eval_accuracy_frozen_backbone":)", frozen_accuracy, R"(,"eval_accuracy":)",
                trainer.run_history().get_latest_metric("eval_accuracy"), "}");  // once, on process zero
} catch (const std::exception& error) {
  // A failure (a bad path, a peer that died in a multi-process run) ends with its message and exit code 1.
  std::cerr << "finetune: " << error.what() << std::endl;
  return 1;
}
