#pragma once
// Which number of each parameter group a schedule drives: the learning rate by default, or any field of an
// optimizer's options (weight decay, momentum, ...). LibTorch keeps those fields on the concrete options type, so a
// field other than the rate names that type; a schedule built for another optimizer's options is refused by name.
#include <torch/optim/optimizer.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <utility>

namespace accelerated::schedulers {

struct ParamGroupField {
  std::string name;
  std::function<double(torch::optim::OptimizerOptions&)> get;
  std::function<void(torch::optim::OptimizerOptions&, double)> set;
  bool is_lr() const { return name == "lr"; }
};

namespace fields {

inline ParamGroupField lr() {
  return {"lr", [](torch::optim::OptimizerOptions& o) { return o.get_lr(); },
          [](torch::optim::OptimizerOptions& o, double value) { o.set_lr(value); }};
}

// A field of `Options` reached by `access(options) -> double&`, e.g.
//   option<torch::optim::AdamWOptions>("weight_decay", [](auto& o) -> double& { return o.weight_decay(); })
template <class Options, class Access>
ParamGroupField option(std::string name, Access access) {
  auto cast = [name](torch::optim::OptimizerOptions& o) -> Options& {
    auto* options = dynamic_cast<Options*>(&o);
    if (options == nullptr) {
      throw std::invalid_argument("accelerated::schedulers: the field '" + name + "' was declared for " +
                                  typeid(Options).name() + ", but the optimizer's options are " + typeid(o).name());
    }
    return *options;
  };
  return {name, [cast, access](torch::optim::OptimizerOptions& o) -> double { return access(cast(o)); },
          [cast, access](torch::optim::OptimizerOptions& o, double value) { access(cast(o)) = value; }};
}

template <class Options>
ParamGroupField weight_decay() {
  return option<Options>("weight_decay", [](Options& o) -> double& { return o.weight_decay(); });
}

template <class Options>
ParamGroupField momentum() {
  return option<Options>("momentum", [](Options& o) -> double& { return o.momentum(); });
}

}  // namespace fields
}  // namespace accelerated::schedulers
