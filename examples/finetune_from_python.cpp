// Fine-tuning, in C++, a backbone pre-trained in Python: examples/pretrain_backbone.py trains it on Fashion-MNIST
// classes 0-4 and saves torch.save(backbone.state_dict(), path) or a safetensors file; here the weights are loaded
// with accelerated::load_state_dict (either format, every name and shape checked), the backbone is frozen with
// ModelFreezer, and a new head learns classes 5-9; then the backbone is unfrozen and trained at a lower rate. The
// fine-tuned model goes back to Python with save_state_dict (safetensors when OUT ends in ".safetensors").
// Usage: finetune_from_python BACKBONE OUT [fashion-mnist folder]. Last line: JSON with the accuracy.
#include <accelerated/accelerated.hpp>

namespace acc = accelerated;
namespace nn = torch::nn;

// The same layers, in the same order, as Backbone in pretrain_backbone.py: the state dict's names match.
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
  ClassifierImpl() {
    register_module("backbone", backbone);
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
  if (argc < 3) {
    std::cerr << "usage: finetune_from_python BACKBONE.pt OUT.pt [fashion-mnist folder]\n"
                 "  make BACKBONE.pt with: python3 examples/pretrain_backbone.py BACKBONE.pt\n";
    return 2;
  }
  const std::string folder = argc > 3 ? argv[3] : acc::data::fashion_mnist_default_folder;
  const auto train = classes(acc::data::load_fashion_mnist(folder, acc::data::Split::train), 5);
  const auto test = classes(acc::data::load_fashion_mnist(folder, acc::data::Split::test), 5);
  torch::manual_seed(0);

  Classifier model;
  acc::load_state_dict(model->backbone, argv[1]);  // Python's names ("layers.0.weight", ...), checked, strict
  acc::ModelFreezer freezer(model);
  freezer.freeze(0, 0);  // the backbone
  torch::optim::Adam optimizer(freezer.trainable_parameters(), torch::optim::AdamOptions(1e-3));
  acc::Trainer trainer(model, nn::CrossEntropyLoss(), optimizer, acc::callbacks::Defaults{}, acc::callbacks::Accuracy{});
  const acc::TrainOptions options{.num_epochs = 1, .per_device_batch_size = 64, .reset_run_history = false};
  trainer.train(train, options, test);
  const double frozen_accuracy = trainer.run_history().get_latest_metric("eval_accuracy");

  // Then the backbone too, at a lower rate.
  for (auto& [group, parameters] : freezer.unfreeze()) {
    optimizer.add_param_group(torch::optim::OptimizerParamGroup(
        parameters, std::make_unique<torch::optim::AdamOptions>(torch::optim::AdamOptions(1e-4))));
  }
  trainer.train(train, options, test);

  acc::save_state_dict(model, argv[2]);  // Python: model.load_state_dict(torch.load(OUT.pt)), or load_file(OUT.safetensors)
  std::cout << R"({"eval_accuracy_frozen_backbone":)" << frozen_accuracy << R"(,"eval_accuracy":)"
            << trainer.run_history().get_latest_metric("eval_accuracy") << "}" << std::endl;
} catch (const std::exception& error) {
  std::cerr << "finetune_from_python: " << error.what() << std::endl;
  return 1;
}
