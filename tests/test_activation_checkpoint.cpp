// Activation checkpointing (activation_checkpoint.hpp): the same numbers as the plain forward, dropout and batch norm
// included, in the model's code and through TrainOptions, with accumulation, bf16 autocast and data parallelism.
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include "helpers.hpp"
#include "ranks_as_threads.hpp"

namespace acc = accelerated;
using torch::nn::BatchNorm1d;
using torch::nn::Dropout;
using torch::nn::Linear;
using torch::nn::ReLU;
using torch::nn::Sequential;
using torch::nn::Tanh;

namespace {
std::vector<torch::Tensor> gradients_of(torch::nn::Module& module) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : module.parameters()) grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  return grads;
}

bool all_equal(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].defined() != b[i].defined() || (a[i].defined() && !torch::equal(a[i], b[i]))) return false;
  }
  return true;
}

// An identity that counts its forward calls: a checkpointed element runs twice per training step.
struct CountingImpl : torch::nn::Module {
  std::int64_t calls = 0;
  torch::Tensor forward(torch::Tensor x) {
    ++calls;
    return x;
  }
};
TORCH_MODULE(Counting);

// A model whose blocks are a Sequential member (named "blocks.<i>"), beside a plain Linear ("head").
struct BlocksNetImpl : torch::nn::Module {
  Sequential blocks{Linear(8, 16), BatchNorm1d(16), ReLU(), Dropout(0.2), Linear(16, 16), Tanh(), Counting()};
  Linear head{16, 1};
  BlocksNetImpl() {
    register_module("blocks", blocks);
    register_module("head", head);
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(blocks->forward(x)); }
};
TORCH_MODULE(BlocksNet);

std::int64_t counted_calls(const Sequential& sequential) {
  for (const auto& module : sequential->children()) {
    if (auto* counting = dynamic_cast<CountingImpl*>(module.get())) return counting->calls;
  }
  return -1;
}

// A trained model's outcome: its parameters, what the generator gives next (it must not have moved) and its buffers
// (batch norm's statistics).
torch::Tensor outcome_of(torch::nn::Module& model) {
  std::vector<torch::Tensor> pieces{test::flat_parameters(model), torch::rand({4})};
  for (const auto& buffer : model.buffers()) pieces.push_back(buffer.flatten().to(torch::kFloat));
  return torch::cat(pieces);
}

template <class Precision = acc::FullPrecision>
torch::Tensor trained(BlocksNet model, const acc::TrainOptions& options) {
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
  acc::Trainer<acc::Cpu, Precision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  trainer.train(test::regression_data(64), options, test::regression_data(16, 2));
  return outcome_of(*model);  // each run starts from blocks_net()'s seed: the generator must end where plain's does
}

BlocksNet blocks_net() {
  torch::manual_seed(3);
  return BlocksNet();
}
}  // namespace

TEST_CASE("activation_checkpoint gives the plain forward's gradients, bit-equal on the CPU, dropout included",
          "[activation_checkpoint]") {
  torch::manual_seed(1);
  Sequential first(Linear(16, 32), ReLU(), Dropout(0.5));
  Sequential second(Linear(32, 32), Tanh(), Dropout(0.3));
  Linear head(32, 4);
  const auto x = torch::randn({8, 16}).requires_grad_();
  const auto y = torch::randn({8, 4});
  int calls = 0;
  auto run = [&](bool checkpointed) {
    for (auto* m : std::initializer_list<torch::nn::Module*>{first.get(), second.get(), head.get()}) m->zero_grad();
    x.mutable_grad() = torch::Tensor();
    torch::manual_seed(5);
    torch::Tensor h;
    if (checkpointed) {
      h = acc::activation_checkpoint([&](const torch::Tensor& t) { ++calls; return first->forward(t); }, x);
      h = acc::activation_checkpoint([&](const torch::Tensor& t) { return second->forward(t); }, h);
    } else {
      h = second->forward(first->forward(x));
    }
    const auto out = head(h);
    torch::mse_loss(out, y).backward();
    auto grads = gradients_of(*first);
    for (const auto& g : gradients_of(*second)) grads.push_back(g);
    grads.push_back(x.grad().clone());
    grads.push_back(out.detach());
    grads.push_back(torch::rand({3}));  // the generator continues from where the plain forward left it
    return grads;
  };
  const auto plain = run(false);
  const auto checkpointed = run(true);
  CHECK(calls == 2);  // the forward, and its replay in backward
  CHECK(all_equal(plain, checkpointed));
  // In no-grad mode it is the plain function, run once.
  torch::NoGradGuard no_grad;
  calls = 0;
  const auto out = acc::activation_checkpoint([&](const torch::Tensor& t) { ++calls; return first->forward(t); }, x);
  CHECK(calls == 1);
  CHECK_FALSE(out.requires_grad());
}

TEST_CASE("activation_checkpoint takes several inputs and returns each one's gradient", "[activation_checkpoint]") {
  torch::manual_seed(2);
  Linear a(6, 5), b(4, 5);
  const auto x = torch::randn({3, 6}).requires_grad_();
  const auto z = torch::randn({3, 4});  // needs no gradient
  auto run = [&](bool checkpointed) {
    a->zero_grad();
    b->zero_grad();
    x.mutable_grad() = torch::Tensor();
    auto fn = [&](const torch::Tensor& p, const torch::Tensor& q) { return torch::tanh(a(p)) * b(q); };
    const auto out = checkpointed ? acc::activation_checkpoint(fn, x, z) : fn(x, z);
    out.pow(2).sum().backward();
    auto grads = gradients_of(*a);
    for (const auto& g : gradients_of(*b)) grads.push_back(g);
    grads.push_back(x.grad().clone());
    return grads;
  };
  CHECK(all_equal(run(false), run(true)));
  CHECK_FALSE(z.grad().defined());
}

TEST_CASE("checkpoint_sequential updates batch-norm statistics once and gives the plain gradients",
          "[activation_checkpoint]") {
  auto make = [] {
    torch::manual_seed(4);
    return Sequential(Linear(8, 16), BatchNorm1d(16), ReLU(), Dropout(0.25), Linear(16, 16), BatchNorm1d(16), ReLU(),
                      Linear(16, 2));
  };
  auto plain = make();
  auto checkpointed = make();
  const auto x = torch::randn({10, 8});
  for (int step = 0; step < 2; ++step) {
    torch::manual_seed(10 + step);
    plain->forward(x).sum().backward();
    torch::manual_seed(10 + step);
    acc::checkpoint_sequential(checkpointed, 3, x).sum().backward();
  }
  CHECK(all_equal(gradients_of(*plain), gradients_of(*checkpointed)));
  std::vector<torch::Tensor> plain_buffers = plain->buffers(), checkpointed_buffers = checkpointed->buffers();
  CHECK(all_equal(plain_buffers, checkpointed_buffers));  // running mean and variance, num_batches_tracked
  CHECK(checkpointed->ptr(1)->named_buffers()["num_batches_tracked"].item<std::int64_t>() == 2);
  CHECK_THAT(test::message_of([&] { acc::checkpoint_sequential(checkpointed, 0, x); }),
             Catch::Contains("segments = 0 must be in [1, 8]"));
  CHECK_THAT(test::message_of([&] { acc::checkpoint_sequential(checkpointed, 9, x); }),
             Catch::Contains("segments = 9"));
}

TEST_CASE("TrainOptions::activation_checkpointing trains to the same weights, bit-equal, with no change to the model",
          "[activation_checkpoint][trainer]") {
  const auto [names, accumulation] = GENERATE(table<std::vector<std::string>, std::int64_t>({
      {{"blocks.*"}, 1},
      {{"blocks.*"}, 2},
      {{"blocks.1", "blocks.3", "blocks.6"}, 1},
  }));
  INFO("names: " << names.size() << " entries, first " << names.front() << "; accumulation " << accumulation);
  acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 8, .gradient_accumulation_steps = accumulation};
  auto plain_model = blocks_net();
  const auto plain = trained(plain_model, options);
  auto model = blocks_net();
  options.activation_checkpointing = names;
  const auto checkpointed = trained(model, options);
  CHECK(torch::equal(plain, checkpointed));
  // 16 training batches over the two epochs, each counted element run twice; 4 eval batches run once.
  CHECK(counted_calls(plain_model->blocks) == 16 + 4);
  CHECK(counted_calls(model->blocks) == 2 * 16 + 4);
  // After train() the Sequential calls its own elements again.
  const auto before = counted_calls(model->blocks);
  torch::NoGradGuard no_grad;
  model->forward(torch::randn({2, 8}));
  CHECK(counted_calls(model->blocks) == before + 1);
  CHECK(model->blocks->ptr(6).get() == model->blocks->named_children()["6"].get());
}

TEST_CASE("activation checkpointing under bf16 autocast replays with autocast on", "[activation_checkpoint][precision]") {
  acc::TrainOptions options{.num_epochs = 1, .per_device_batch_size = 8};
  const auto plain = trained<acc::BFloat16>(blocks_net(), options);
  options.activation_checkpointing = {"blocks.*"};
  const auto checkpointed = trained<acc::BFloat16>(blocks_net(), options);
  CHECK(torch::equal(plain, checkpointed));
  // Without the recorded autocast state the replay would run in float32 and differ.
  auto model = blocks_net();
  const auto x = torch::randn({4, 8});
  torch::Tensor in_bf16;
  {
    acc::precision::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
    in_bf16 = acc::activation_checkpoint([&](const torch::Tensor& t) { return model->blocks[0]->as<Linear>()->forward(t); }, x);
  }
  CHECK(in_bf16.dtype() == torch::kBFloat16);
  in_bf16.sum().backward();  // outside the autocast region, as the trainer's backward is
  CHECK(model->blocks[0]->as<Linear>()->weight.grad().defined());
}

TEST_CASE("a model that is itself a Sequential is checkpointed by \"*\" or by element number, in-place ReLU included",
          "[activation_checkpoint][trainer]") {
  auto make = [] {
    torch::manual_seed(6);
    // The in-place ReLU writes into the Linear's result: as an element of its own it is given a copy.
    return Sequential(Linear(8, 32), ReLU(torch::nn::ReLUOptions().inplace(true)), Dropout(0.1), Linear(32, 8),
                      Counting(), Tanh(), Linear(8, 1));
  };
  std::int64_t calls = 0;
  auto train = [&](std::vector<std::string> names) {
    auto model = make();
    acc::detail::OnScopeExit count([&] { calls = counted_calls(model); });
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
    trainer.set_output(test::quiet());
    trainer.train(test::regression_data(48), {.num_epochs = 2, .per_device_batch_size = 8,
                                              .activation_checkpointing = std::move(names)});
    return test::flat_parameters(*model);
  };
  const auto plain = train({});
  CHECK(calls == 12);  // 6 training batches a epoch, run once
  CHECK(torch::equal(plain, train({"*"})));
  CHECK(calls == 24);  // and their replays
  CHECK(torch::equal(plain, train({"0", "2", "4"})));
  CHECK(calls == 24);
  CHECK(torch::equal(plain, train({"0", "2", "3"})));
  CHECK(calls == 12);  // "4" (the counter) not among them
}

TEST_CASE("a bad activation_checkpointing entry is named before anything changes",
          "[activation_checkpoint][trainer][bad_input]") {
  auto model = blocks_net();
  const auto before = test::flat_parameters(*model);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess> trainer(model, torch::nn::MSELoss(), optimizer);
  trainer.set_output(test::quiet());
  auto message = [&](std::vector<std::string> names) {
    return test::message_of([&] {
      trainer.train(test::regression_data(16), {.per_device_batch_size = 8, .activation_checkpointing = names});
    });
  };
  CHECK_THAT(message({"blocks.*", "blocks.9"}),
             Catch::Contains("activation_checkpointing entry \"blocks.9\" names no submodule"));
  CHECK_THAT(message({"encoder.*"}), Catch::Contains("entry \"encoder.*\" names no submodule"));
  CHECK_THAT(message({"head"}), Catch::Contains("entry \"head\" is not an element of a torch::nn::Sequential") &&
                                    Catch::Contains("BlocksNetImpl") &&
                                    Catch::Contains("accelerated::activation_checkpoint"));
  CHECK(torch::equal(before, test::flat_parameters(*model)));
  CHECK(trainer.run_history().get_metric_names().empty());
  CHECK(model->blocks->ptr(0).get() == model->blocks->named_children()["0"].get());  // nothing left replaced
}

TEST_CASE("activation checkpointing under DataParallel: the reducer's hooks fire in the replay, same weights",
          "[activation_checkpoint][distributed]") {
  // No dropout here: ranks as threads share one CPU generator.
  auto make = [] {
    torch::manual_seed(8);
    return Sequential(Linear(8, 32), ReLU(), Linear(32, 32), Tanh(), Linear(32, 1));
  };
  std::vector<Sequential> plain_models{make(), make()}, models{make(), make()};
  const auto data = test::regression_data(64);
  auto run = [&](std::vector<Sequential>& ms, std::vector<std::string> names) {
    return test::run_ranks(2, [&, names](int rank, auto store) {
      auto model = ms[rank];
      torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
      acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
      acc::DataParallelOptions parallel;
      parallel.timeout = std::chrono::seconds(60);
      trainer.distributed() = acc::DataParallel(store, rank, 2, parallel);
      trainer.set_output(test::quiet());
      trainer.train(data, {.num_epochs = 2, .per_device_batch_size = 4, .gradient_accumulation_steps = 2,
                           .activation_checkpointing = names});
      return test::flat_parameters(*model);
    });
  };
  const auto plain = run(plain_models, {});
  const auto checkpointed = run(models, {"*"});
  CHECK(torch::equal(plain[0], plain[1]));
  CHECK(torch::equal(checkpointed[0], checkpointed[1]));  // averaged on both ranks
  CHECK(torch::equal(plain[0], checkpointed[0]));
  // find_unused_parameters walks the graph before backward and cannot see a segment's parameters: refused up front,
  // instead of LibTorch's reducer failing at the first step with advice that only Python can follow.
  auto messages = test::run_ranks(2, [&](int rank, auto store) {
    auto model = models[rank];
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel> trainer(model, torch::nn::MSELoss(), optimizer);
    acc::DataParallelOptions parallel;
    parallel.timeout = std::chrono::seconds(60);
    parallel.gradient_sync.find_unused_parameters = true;
    trainer.distributed() = acc::DataParallel(store, rank, 2, parallel);
    trainer.set_output(test::quiet());
    return test::error_or_none([&] {
      trainer.train(data, {.per_device_batch_size = 4, .activation_checkpointing = {"*"}});
    });
  });
  for (const auto& message : messages) {
    CHECK_THAT(message, Catch::Contains("activation_checkpointing entry \"*\" cannot be used with DataParallel's "
                                        "gradient_sync.find_unused_parameters"));
  }
}

TEST_CASE("a checkpointed piece that returns a view of its input can be modified in place afterwards",
          "[activation_checkpoint]") {
  auto make = [] {
    torch::manual_seed(9);
    return Sequential(Linear(8, 16), torch::nn::Flatten(), ReLU(torch::nn::ReLUOptions().inplace(true)), Linear(16, 1));
  };
  auto plain = make();
  auto checkpointed = make();
  const auto x = torch::randn({4, 8});
  plain->forward(x).sum().backward();
  {
    acc::CheckpointedElements elements(*checkpointed, {"1"});  // the Flatten, whose result is a view of its input
    REQUIRE(elements.size() == 1);
    checkpointed->forward(x).sum().backward();
  }
  CHECK(all_equal(gradients_of(*plain), gradients_of(*checkpointed)));
  const auto y = torch::randn({3, 5}).requires_grad_();
  auto out = acc::activation_checkpoint([](const torch::Tensor& t) { return t.view({15}); }, y);
  out.relu_().sum().backward();
  CHECK(torch::equal(y.grad(), (y.detach() > 0).to(torch::kFloat)));
  // A view of something made inside the piece, too.
  Linear linear(5, 5);
  auto viewed = acc::activation_checkpoint([&](const torch::Tensor& t) { return linear(t).view({15}); }, y);
  CHECK_NOTHROW(viewed.relu_().sum().backward());
}

TEST_CASE("an in-place element first called in eval mode still gets its copy in training mode",
          "[activation_checkpoint]") {
  auto make = [] {
    torch::manual_seed(11);
    return Sequential(Linear(8, 16), Dropout(torch::nn::DropoutOptions(0.5).inplace(true)), Linear(16, 1));
  };
  auto plain = make();
  auto checkpointed = make();
  const auto x = torch::randn({4, 8});
  acc::CheckpointedElements elements(*checkpointed, {"1"});
  checkpointed->eval();  // in eval mode the in-place dropout writes nothing: not the time to learn whether it does
  checkpointed->forward(x).sum().backward();
  checkpointed->train();
  checkpointed->zero_grad();
  torch::manual_seed(12);
  plain->forward(x).sum().backward();
  torch::manual_seed(12);
  checkpointed->forward(x).sum().backward();
  CHECK(all_equal(gradients_of(*plain), gradients_of(*checkpointed)));
}

TEST_CASE("a graph built while elements were checkpointed still runs backward after they are put back",
          "[activation_checkpoint]") {
  auto make = [] {
    torch::manual_seed(10);
    return Sequential(Linear(8, 16), Tanh(), Linear(16, 1));
  };
  auto plain = make();
  auto checkpointed = make();
  const auto x = torch::randn({4, 8});
  plain->forward(x).sum().backward();
  torch::Tensor loss;
  {
    acc::CheckpointedElements elements(*checkpointed, {"*"});
    loss = checkpointed->forward(x).sum();
    // Meanwhile the Sequential's public API shows the stand-ins (documented).
    CHECK(checkpointed[0]->as<Linear>() == nullptr);
  }  // the stand-ins are gone; the graph's replays hold the elements themselves
  CHECK(checkpointed[0]->as<Linear>() != nullptr);
  loss.backward();
  CHECK(all_equal(gradients_of(*plain), gradients_of(*checkpointed)));
}

TEST_CASE("what a checkpointed piece cannot do is named: writing into its input, torch::autograd::grad",
          "[activation_checkpoint][bad_input]") {
  Linear linear(4, 4);
  const auto x = torch::randn({2, 4});
  const auto h = linear(x);
  CHECK_THROWS_WITH(acc::activation_checkpoint([](const torch::Tensor& t) { return t.relu_(); }, h),
                    Catch::Contains("accelerated::activation_checkpoint: the checkpointed piece modified its input in "
                                    "place"));
  const auto y = torch::randn({2, 4}).requires_grad_();
  const auto out = acc::activation_checkpoint([&](const torch::Tensor& t) { return linear(t).tanh(); }, y);
  CHECK_THROWS_WITH(torch::autograd::grad({out.sum()}, {y}), Catch::Contains("works with backward() only"));
  // An undefined tensor among the inputs (an optional mask) is passed through.
  const auto z = acc::activation_checkpoint(
      [&](const torch::Tensor& t, const torch::Tensor& mask) { return mask.defined() ? t * mask : linear(t); }, y,
      torch::Tensor());
  z.sum().backward();
  CHECK(y.grad().defined());
}

TEST_CASE("under autocast a weight used inside and outside a checkpointed element gets both gradients",
          "[activation_checkpoint][precision]") {
  // Autocast caches a cast copy of each weight for the forward; one made in the no-grad first run has no history,
  // and the second use of the same weight, outside the element, would then give it no gradient.
  torch::manual_seed(12);
  Linear shared(8, 8);
  Sequential body(shared, Tanh());
  const auto x = torch::randn({4, 8});
  auto weight_grad = [&](bool checkpointed) {
    shared->zero_grad();
    torch::Tensor loss;
    {
      acc::precision::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
      std::optional<acc::CheckpointedElements> elements;
      if (checkpointed) elements.emplace(*body, std::vector<std::string>{"0"});
      loss = shared(body->forward(x)).to(torch::kFloat).sum();
    }
    loss.backward();
    return shared->weight.grad().clone();
  };
  CHECK(torch::equal(weight_grad(false), weight_grad(true)));
}

namespace {
struct CrashAt {
  std::int64_t update = 0;
  void operator()(acc::on_update_step_end, auto& trainer) {
    if (trainer.state().update_step == update) throw std::runtime_error("simulated crash");
  }
};

// Two epochs of BlocksNet with a training state every 3 updates; crashes at update `crash_at` (0: never); resumes
// from the newest state when there is one. Returns the weights, buffers and what the generator gives next.
torch::Tensor run_with_states(const std::filesystem::path& dir, bool checkpointed, std::int64_t crash_at) {
  namespace cb = acc::callbacks;
  auto model = blocks_net();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
  acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, cb::SaveTrainingState, CrashAt>
      trainer(model, torch::nn::MSELoss(), optimizer, cb::SaveTrainingState({.save_dir = dir, .save_every_n_steps = 3}),
              CrashAt{crash_at});
  trainer.set_output(test::quiet());
  acc::TrainOptions options{.num_epochs = 2, .per_device_batch_size = 8, .resume_from_newest_in = dir};
  if (checkpointed) options.activation_checkpointing = {"blocks.*"};
  try {
    trainer.train(test::regression_data(64), options);
  } catch (const std::runtime_error&) {
    // However train() ends, the Sequential calls its own elements again.
    CHECK(model->blocks->ptr(1).get() == model->blocks->named_children()["1"].get());
    throw;
  }
  return outcome_of(*model);
}
}  // namespace

TEST_CASE("a training state saved with checkpointing resumes without it, and back, bit-identical to a plain run",
          "[activation_checkpoint][resume]") {
  const auto base = test::fresh_dir("activation_checkpoint_resume");
  const auto reference = run_with_states(base / "plain", false, 0);
  for (const bool first_checkpointed : {true, false}) {
    INFO("first run checkpointed: " << first_checkpointed);
    const auto dir = base / (first_checkpointed ? "from_checkpointed" : "from_plain");
    CHECK_THROWS_WITH(run_with_states(dir, first_checkpointed, 5), Catch::Contains("simulated crash"));
    CHECK(torch::equal(reference, run_with_states(dir, !first_checkpointed, 0)));
  }
  std::filesystem::remove_all(base);
}
