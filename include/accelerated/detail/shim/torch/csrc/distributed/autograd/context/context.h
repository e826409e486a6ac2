#pragma once
// Stand-in for a header that Debian's LibTorch 1.13 (and the official 1.13 and 2.0 zips) omit although
// c10d/reducer.hpp includes it (pytorch#88006). reducer.hpp needs only these two names: it holds a ContextPtr and
// checks that GradCallback is this std::function type. The build adds this folder to the include path only when the
// real header is missing (see cmake/acceleratedDependencies.cmake).
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>

namespace torch::distributed::autograd {

class DistAutogradContext {
 public:
  using GradCallback = std::function<bool(at::Tensor&)>;
};

using ContextPtr = std::shared_ptr<DistAutogradContext>;

}  // namespace torch::distributed::autograd
