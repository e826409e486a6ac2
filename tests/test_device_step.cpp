// The step that never waits on the host (loss kept on the device, clipping without a sync, accuracy counted on the
// device, TerminateOnNan's interval), checked on the CPU against the host-synchronising versions; and the cases
// that need a GPU or NCCL, which say that they were skipped, and why, where there is none.
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <cmath>

#include <ATen/record_function.h>

#include "helpers.hpp"

namespace acc = accelerated;
using namespace std::chrono_literals;

TEST_CASE("the loss meter sums batch-weighted losses and reads each value once", "[device_step]") {
  acc::LossMeter meter;
  const auto first = meter.add(torch::tensor(2.0), 4);
  const auto second = meter.add(torch::tensor({1.0, 3.0}), 2);  // not a scalar: its mean
  CHECK_FALSE(first.pending());  // CPU values are read at once
  CHECK(static_cast<double>(first) == 2.0);
  CHECK(second.value() == 2.0);
  CHECK(meter.total() == 12.0);
  CHECK(meter.count() == 6.0);
  meter.restore(5.0, 1.0);
  CHECK(meter.total() == 5.0);
  meter.reset();
  CHECK(meter.count() == 0.0);
}

TEST_CASE("clipping by norm without a sync matches LibTorch's clip_grad_norm_", "[device_step]") {
  auto grads_after = [](bool ours, double max_norm) {
    auto model = test::linear_model();
    torch::manual_seed(3);
    model->forward(torch::randn({16, 8})).pow(2).sum().backward();
    auto params = model->parameters();
    if (ours) {
      const auto norm = acc::detail::clip_grad_norm_no_sync(params, max_norm);
      CHECK(norm.dim() == 0);
    } else {
      torch::nn::utils::clip_grad_norm_(params, max_norm);
    }
    return torch::cat({params[0].grad().flatten(), params[1].grad().flatten()});
  };
  for (double max_norm : {0.5, 1e6}) {  // clipped, and left alone
    INFO("max_norm " << max_norm);
    CHECK(torch::allclose(grads_after(true, max_norm), grads_after(false, max_norm), 1e-6, 1e-7));
  }
  CHECK_FALSE(acc::detail::clip_grad_norm_no_sync({torch::zeros({2}, torch::requires_grad())}, 1.0).defined());
}

namespace {
std::vector<std::string>* op_log = nullptr;  // the aten operators run while set (a thread-local observer)

std::unique_ptr<at::ObserverContext> note_op(const at::RecordFunction& fn) {
  if (op_log) op_log->emplace_back(fn.name());
  return nullptr;
}
}  // namespace

TEST_CASE("clipping multiplies each dtype's gradients in one foreach call where LibTorch has it", "[device_step]") {
  // Three float parameters and a double one: two groups.
  auto make = [] {
    torch::manual_seed(5);
    std::vector<torch::Tensor> params;
    for (auto type : {torch::kFloat, torch::kDouble, torch::kFloat, torch::kFloat}) {
      auto p = torch::randn({7}, torch::TensorOptions(type).requires_grad(true));
      p.mutable_grad() = torch::randn({7}, type) * 3;
      params.push_back(p);
    }
    return params;
  };
  auto ours = make();
  auto theirs = make();
  std::vector<std::string> ops;
  op_log = &ops;
  const auto handle = at::addThreadLocalCallback(at::RecordFunctionCallback(&note_op));
  acc::detail::clip_grad_norm_no_sync(ours, 1.0);
  at::removeCallback(handle);
  op_log = nullptr;
  torch::nn::utils::clip_grad_norm_(theirs, 1.0);
  for (std::size_t i = 0; i < ours.size(); ++i) {
    CHECK(torch::allclose(ours[i].grad(), theirs[i].grad(), 1e-6, 1e-7));
  }
  const auto foreach_calls = std::count(ops.begin(), ops.end(), "aten::_foreach_mul_");
  const auto single_calls = std::count(ops.begin(), ops.end(), "aten::mul_");
  if constexpr (acc::detail::has_foreach_mul_by_tensor<torch::Tensor>) {
    // One call per dtype, not one per parameter (the CPU kernel behind it may still multiply tensor by tensor, and
    // the observer sees those nested calls too: only the calls made by the clipping are counted here).
    CHECK(foreach_calls == 2);
    CHECK((single_calls == 0 || single_calls == 4));
  } else {
    CHECK(single_calls == 4);  // LibTorch 1.13 has no tensor-factor foreach multiply: one per parameter
  }
}

TEST_CASE("TerminateOnNan decides every check_every steps and says which steps it covers", "[device_step]") {
  auto data = test::regression_data(40);
  data.second[13] = std::nan("");  // batch 4 of 10 (batch size 4, no shuffle)
  auto run = [&](std::int64_t every) {
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
    auto trainer = acc::make_trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess>(
        model, torch::nn::MSELoss(), optimizer, acc::callbacks::TerminateOnNan(every));
    trainer.set_output(test::quiet());
    return std::pair{test::message_of([&] {
                       trainer.train(data, {.num_epochs = 1, .per_device_batch_size = 4, .shuffle = false});
                     }),
                     trainer.state().update_step};
  };
  const auto [every_step, updates_1] = run(1);
  CHECK_THAT(every_step, Catch::Contains("non-finite train loss (nan) at epoch 1, step 4 of 10"));
  CHECK(updates_1 == 3);
  const auto [every_3, updates_3] = run(3);
  // The bad loss at step 4 is seen at step 6; steps 4-5 were trained (their update is what the interval costs).
  CHECK_THAT(every_3, Catch::Contains("non-finite train loss (nan) at epoch 1, step 4 of 10"));
  CHECK(updates_3 == 5);
  CHECK_THROWS_WITH(acc::callbacks::TerminateOnNan(-1), Catch::Contains("check_every = -1"));
}

TEST_CASE("the CUDA backend choice is checked by name", "[device_step][nccl]") {
  ::setenv("ACCELERATED_CUDA_BACKEND", "mpi", 1);
  CHECK_THROWS_WITH(acc::distributed::cuda_backend_from_env(acc::distributed::CudaBackend::automatic),
                    Catch::Contains("ACCELERATED_CUDA_BACKEND = 'mpi'"));
  ::setenv("ACCELERATED_CUDA_BACKEND", "gloo", 1);
  CHECK(acc::distributed::cuda_backend_from_env(acc::distributed::CudaBackend::nccl) ==
        acc::distributed::CudaBackend::gloo);
  ::unsetenv("ACCELERATED_CUDA_BACKEND");
  if (!acc::distributed::has_nccl) {
    auto store = c10::make_intrusive<c10d::HashStore>();
    auto group = acc::distributed::make_process_group(store, 0, 1, 5s, "127.0.0.1", acc::distributed::Transport::gloo);
    CHECK_THROWS_WITH(acc::distributed::attach_cuda_backend(group, store, 0, 1, 5s, acc::distributed::CudaBackend::nccl),
                      Catch::Contains("this LibTorch has no NCCL"));
  }
}

// ---- on a GPU -------------------------------------------------------------------------------------------------

#define REQUIRE_GPU()                                                                                  \
  if (!torch::cuda::is_available())                                                                    \
  ACCELERATED_SKIP("no CUDA GPU is visible to this LibTorch (a CPU build, or no device)")

TEST_CASE("a model trains on the GPU in fp32 and bf16 and fp16", "[cuda]") {
  REQUIRE_GPU();
  const auto data = test::regression_data(256);
  auto final_loss = [&](auto precision) {
    using Precision = decltype(precision);
    auto model = test::linear_model();
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    auto trainer = acc::make_trainer<acc::Cuda, Precision, acc::SingleProcess>(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.train(data, {.num_epochs = 5, .per_device_batch_size = 16, .gradient_clip_norm = 10.0});
    CHECK(model->weight.is_cuda());
    const auto losses = trainer.run_history().get_metric_values("train_loss_epoch");
    CHECK(losses.back() < losses.front());
    return losses.back();
  };
  const auto fp32 = final_loss(acc::FullPrecision{});
  CHECK(final_loss(acc::BFloat16{}) < fp32 * 2 + 0.05);
  CHECK(final_loss(acc::Float16{}) < fp32 * 2 + 0.05);
}

TEST_CASE("activation checkpointing on the GPU replays the CUDA generator and the autocast state", "[cuda]") {
  REQUIRE_GPU();
  // Dropout alone: the mask drawn in the replay must be the first run's (the CUDA generator restored).
  const auto x = torch::randn({256, 256}, torch::kCUDA).requires_grad_();
  auto grad_of = [&](bool checkpointed) {
    x.mutable_grad() = torch::Tensor();
    torch::manual_seed(3);
    auto fn = [](const torch::Tensor& t) { return torch::dropout(t * 2, 0.5, true); };
    (checkpointed ? acc::activation_checkpoint(fn, x) : fn(x)).pow(2).sum().backward();
    return std::pair{x.grad().clone(), torch::rand({2}, torch::kCUDA)};  // and the generator continues as before
  };
  const auto plain = grad_of(false);
  const auto checkpointed = grad_of(true);
  CHECK(torch::equal(plain.first, checkpointed.first));
  CHECK(torch::equal(plain.second, checkpointed.second));
  // A model trained through TrainOptions in fp32 and bf16: the same weights as without checkpointing.
  auto trained = [](auto precision, std::vector<std::string> names) {
    torch::manual_seed(5);
    torch::nn::Sequential model(torch::nn::Linear(8, 64), torch::nn::ReLU(), torch::nn::Dropout(0.2),
                                torch::nn::Linear(64, 64), torch::nn::Tanh(), torch::nn::Linear(64, 1));
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    auto trainer = acc::make_trainer<acc::Cuda, decltype(precision), acc::SingleProcess>(model, torch::nn::MSELoss(),
                                                                                        optimizer);
    trainer.set_output(test::quiet());
    trainer.train(test::regression_data(256), {.num_epochs = 2, .per_device_batch_size = 32,
                                               .activation_checkpointing = std::move(names)});
    return test::flat_parameters(*model).cpu();
  };
  CHECK(torch::allclose(trained(acc::FullPrecision{}, {}), trained(acc::FullPrecision{}, {"*"}), 1e-6, 1e-7));
  CHECK(torch::allclose(trained(acc::BFloat16{}, {}), trained(acc::BFloat16{}, {"*"}), 1e-6, 1e-7));
  CHECK(torch::allclose(trained(acc::Float16{}, {}), trained(acc::Float16{}, {"*"}), 1e-6, 1e-7));  // the loss scaler's
}

// A training state saved in the background: its device-to-host copies are queued into pinned memory and waited for
// before the call returns, so kernels queued right after it (here: the weights overwritten) cannot reach the file.
struct SaveAsyncAt3ThenOverwrite {
  std::filesystem::path path;
  std::shared_ptr<torch::Tensor> saved_at = std::make_shared<torch::Tensor>();
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step != 3) return;
    *saved_at = test::flat_parameters(trainer.model().module()).cpu();
    trainer.save_training_state_async(path);
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> kept;
    for (auto& p : trainer.model()->parameters()) kept.push_back(p.clone()), p.fill_(-1.0);
    trainer.wait_for_async_save();
    for (std::size_t i = 0; i < kept.size(); ++i) trainer.model()->parameters()[i].copy_(kept[i]);
  }
};

TEST_CASE("an asynchronous save on the GPU holds the state of its save point", "[cuda][async_save]") {
  REQUIRE_GPU();
  const auto dir = test::fresh_dir("async_gpu");
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  SaveAsyncAt3ThenOverwrite hook{dir / "step_3.pt"};
  auto trainer = acc::make_trainer<acc::Cuda, acc::FullPrecision, acc::SingleProcess>(model, torch::nn::MSELoss(),
                                                                                      optimizer, hook);
  trainer.set_output(test::quiet());
  trainer.train(test::regression_data(256), {.num_epochs = 1, .per_device_batch_size = 16});
  auto on_cpu = test::linear_model(2);
  torch::optim::SGD cpu_optimizer(on_cpu->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> reader(on_cpu, torch::nn::MSELoss(), cpu_optimizer);
  reader.load_training_state(dir / "step_3.pt");
  CHECK(torch::equal(test::flat_parameters(*on_cpu), *hook.saved_at));
  std::filesystem::remove_all(dir);
}

TEST_CASE("on the GPU the running loss stays on the device until it is read", "[cuda]") {
  REQUIRE_GPU();
  acc::LossMeter meter;
  const auto value = meter.add(torch::tensor(2.0, torch::kCUDA), 4);
  CHECK(value.pending());
  CHECK(value.tensor().is_cuda());
  meter.add(torch::tensor(4.0, torch::kCUDA), 4);
  CHECK(meter.total() == 24.0);
  CHECK(value.value() == 2.0);
  CHECK_FALSE(value.pending());
  // Clipping on the device agrees with LibTorch's.
  auto grads = torch::randn({1000}, torch::kCUDA);
  auto p1 = torch::zeros({1000}, torch::TensorOptions(torch::kCUDA).requires_grad(true));
  auto p2 = torch::zeros({1000}, torch::TensorOptions(torch::kCUDA).requires_grad(true));
  p1.mutable_grad() = grads.clone();
  p2.mutable_grad() = grads.clone();
  acc::detail::clip_grad_norm_no_sync({p1}, 1.0);
  torch::nn::utils::clip_grad_norm_(std::vector<torch::Tensor>{p2}, 1.0);
  CHECK(torch::allclose(p1.grad(), p2.grad(), 1e-5, 1e-6));
}

TEST_CASE("a batch copied to the GPU on the side stream is whole when the step, queued behind busy work, reads it",
          "[cuda]") {
  REQUIRE_GPU();
  const torch::Device gpu(torch::kCUDA, 0);
  const auto compute = c10::impl::VirtualGuardImpl(torch::kCUDA).getStream(gpu);
  for (int round = 0; round < 20; ++round) {
    // Keep the compute stream busy, so that the copy (on its own stream) runs while these kernels do.
    auto busy = torch::randn({2048, 2048}, gpu);
    for (int k = 0; k < 4; ++k) busy = busy.mm(busy).tanh_();
    const auto source = torch::arange(1 << 22, torch::kFloat).add_(round);
    std::tuple<torch::Tensor, std::vector<torch::Tensor>> batch{source, {source.narrow(0, 0, 10)}};
    const auto moved = acc::detail::to_device(batch, gpu);
    CHECK(std::get<0>(moved).is_cuda());
    // Read on the compute stream, which must have waited for the copy; the allocator must not reuse its memory
    // for the next round's tensors before this read is done.
    CHECK(torch::equal(std::get<0>(moved).cpu(), source));
    CHECK(torch::equal(std::get<1>(moved)[0].cpu(), source.narrow(0, 0, 10)));
  }
  CHECK(c10::impl::VirtualGuardImpl(torch::kCUDA).getStream(gpu) == compute);  // the side stream was only borrowed
  // One side stream for every batch (the allocator caches freed memory per stream), and not the compute stream.
  CHECK(acc::detail::SideStreamCopy(gpu).stream() == acc::detail::SideStreamCopy(gpu).stream());
  CHECK(acc::detail::SideStreamCopy(gpu).stream() != compute);
}

TEST_CASE("NCCL carries CUDA tensors in a one-process group", "[cuda][nccl]") {
  if (!acc::distributed::has_nccl) {
    ACCELERATED_SKIP("this LibTorch has no NCCL (a CUDA build of LibTorch 2.x defines USE_C10D_NCCL)");
  }
  REQUIRE_GPU();
  auto store = c10::make_intrusive<c10d::HashStore>();
  auto group = acc::distributed::make_process_group(store, 0, 1, 30s, "127.0.0.1", acc::distributed::Transport::gloo);
  const auto name = acc::distributed::attach_cuda_backend(group, store, 0, 1, 30s, acc::distributed::CudaBackend::automatic);
  CHECK(name == "nccl");
  std::vector<torch::Tensor> tensors{torch::full({1024}, 3.0, torch::kCUDA)};
  group->allreduce(tensors)->wait();
  CHECK(tensors[0].sum().item<double>() == 3.0 * 1024);
  std::vector<torch::Tensor> host{torch::full({4}, 2.0)};  // CPU tensors still go through the CPU transport
  group->allreduce(host)->wait();
  CHECK(host[0].sum().item<double>() == 8.0);
}

TEST_CASE("on the GPU in fp16, TerminateOnNan(skip_update) drops a NaN update and the loss scaler backs off; "
          "find_learning_rate leaves the scale and the CUDA generator as they were",
          "[cuda][nan][lr_finder]") {
  REQUIRE_GPU();
  namespace cb = acc::callbacks;
  const auto data = test::regression_data(64);
  // A finite loss whose gradient is NaN on the 3rd call: sqrt's derivative at 0 is infinite, and 0 * inf is NaN.
  auto count = std::make_shared<int>(0);
  auto loss = [count](const torch::Tensor& out, const torch::Tensor& target) {
    auto value = torch::mse_loss(out.to(torch::kFloat), target);
    if (++*count == 3) value = value + 0.0 * torch::sqrt(out - out.detach()).to(torch::kFloat).sum();
    return value;
  };
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
  std::ostringstream out;
  // A scale of 1024: no overflow of its own in this small regression, so the one back-off is the NaN's.
  acc::Trainer trainer(model, loss, optimizer,
                       acc::policies(acc::Cuda{}, acc::Float16({.init_scale = 1024.0}), acc::SingleProcess{}),
                       cb::TerminateOnNan({.skip_update = true}));
  trainer.set_output(out);
  const double initial_scale = trainer.precision().scaler().get_scale();
  trainer.train(data, {.per_device_batch_size = 8, .shuffle = false});
  CHECK(trainer.run_history().get_metric_values("skipped_updates") == std::vector<double>{1});
  CHECK_THAT(out.str(), Catch::Contains("skipped update 3 (epoch 1, step 3 of 8): the gradient of 'weight'"));
  CHECK(trainer.precision().scaler().get_scale() == initial_scale * 0.5);  // one back-off, no growth in 8 updates
  CHECK(torch::isfinite(model->weight).all().item<bool>());

  const double scale = trainer.precision().scaler().get_scale();
  const auto weights = test::flat_parameters(*model).cpu();
  const auto generator = acc::detail::generator_state(torch::Device(torch::kCUDA, 0));
  const auto found = acc::find_learning_rate(trainer, data, {.train = {.per_device_batch_size = 8}, .num_steps = 30});
  CHECK(found.losses.size() > 0);
  CHECK(trainer.precision().scaler().get_scale() == scale);
  CHECK(torch::equal(test::flat_parameters(*model).cpu(), weights));
  CHECK(torch::equal(acc::detail::generator_state(torch::Device(torch::kCUDA, 0)), generator));
}
