// Must not compile: a device policy without place(). Expected: "the DevicePolicy lacks `void place".
#include <accelerated/accelerated.hpp>

struct IncompleteDevice {
  torch::Device device() const { return torch::kCPU; }
  std::string name() const { return "cpu"; }
  template <class B>
  B&& to_device(B&& b) const { return static_cast<B&&>(b); }
};

int main() {
  auto model = torch::nn::Linear(1, 1);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  accelerated::Trainer<IncompleteDevice> trainer(model, torch::nn::MSELoss(), optimizer);
}
