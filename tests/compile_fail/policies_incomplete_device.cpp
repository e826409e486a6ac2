// Must not compile: a device policy without to_device(), given through policies(). It used to be taken for the loop
// policy, and the run went on the default device. Expected: "the DevicePolicy lacks `template <class Batch>".
#include <accelerated/accelerated.hpp>

struct DeviceWithoutToDevice {
  torch::Device device() const { return torch::kCPU; }
  std::string name() const { return "cpu"; }
  void place(torch::nn::Module& module) const { module.to(torch::kCPU); }
};

int main() {
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer trainer(model, torch::nn::MSELoss(), optimizer, accelerated::policies(DeviceWithoutToDevice{}));
}
