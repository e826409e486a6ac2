// The CUDA/NCCL build check (scripts/check-cuda-build.sh): compiled, not linked, with USE_C10D_NCCL defined and the
// CUDA and NCCL headers present, against LibTorch 2.x. It instantiates every policy combination a GPU user writes,
// so each CUDA and NCCL path of the library (device placement, autocast, the loss scaler, the NCCL backend, state
// save/restore with CUDA generators, the sync-free step) is type-checked as a CUDA build of LibTorch compiles it.
#include <accelerated/accelerated.hpp>

static_assert(accelerated::distributed::has_nccl,
              "the CUDA build check must compile the NCCL paths: USE_C10D_NCCL and <nccl.h> are needed");

namespace acc = accelerated;

template <class Device, class Precision, class Distributed>
void train_evaluate_save_resume() {
  torch::nn::Linear model(4, 3);
  torch::optim::AdamW optimizer(model->parameters());
  auto trainer = acc::make_trainer<Device, Precision, Distributed>(model, torch::nn::CrossEntropyLoss(), optimizer,
                                                                   acc::callbacks::Defaults{}, acc::callbacks::Accuracy{});
  const auto data = std::pair{torch::randn({8, 4}), torch::randint(3, {8})};
  trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4, .gradient_clip_norm = 1.0}, data);
  trainer.evaluate(data, 4);
  trainer.save_training_state("state.pt");
  trainer.load_training_state("state.pt");
  trainer.save_checkpoint("checkpoint.pt");
  trainer.load_checkpoint("checkpoint.pt");
}

template void train_evaluate_save_resume<acc::Cuda, acc::FullPrecision, acc::DataParallel>();
template void train_evaluate_save_resume<acc::Cuda, acc::BFloat16, acc::DataParallel>();
template void train_evaluate_save_resume<acc::Cuda, acc::Float16, acc::DataParallel>();
template void train_evaluate_save_resume<acc::Cuda, acc::AutoPrecision, acc::SingleProcess>();
template void train_evaluate_save_resume<acc::AutoDevice, acc::AutoPrecision, acc::AutoDistributed>();

// The NCCL backend on its own, as DataParallel attaches it to the process group.
std::string attach_nccl(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const c10::intrusive_ptr<c10d::Store>& store) {
  return acc::distributed::attach_cuda_backend(group, store, 0, 1, std::chrono::seconds(30),
                                               acc::distributed::CudaBackend::nccl);
}
