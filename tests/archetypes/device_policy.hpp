// A minimal device policy (docs/writing-a-device-policy.md shows this file, and the doc-snippet test checks the page
// against it). Everything lives on the CPU; it counts the modules it places, to show that the trainer calls it.
struct ExampleDevice {
  int placed = 0;  // how many times place() ran (the model at construction and at each run start, the loss module)

  torch::Device device() const { return torch::kCPU; }       // where batches and the model go
  std::string name() const { return "example-cpu"; }         // reported as run_config().device
  void place(torch::nn::Module& module) {                     // moves a module there
    module.to(torch::kCPU);
    ++placed;
  }
  template <class Batch>
  Batch&& to_device(Batch&& batch) const {                   // moves a batch there (here: nothing to do)
    return std::forward<Batch>(batch);
  }

  // Optional. A static fact the trainer checks fixed combinations with (Float16 with this device does not compile).
  static constexpr bool always_cpu = true;
  // Optional. Called by bind_policies (accelerator.hpp) with the distributed policy's local rank: a GPU policy
  // picks its device from it.
  void bind_local_rank(std::int64_t) {}
};
