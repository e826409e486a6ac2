// Compiled three times (tests/zero_cost/check.sh compares the machine code of the training step loop):
//   VARIANT 0  no callbacks at all
//   VARIANT 1  five callbacks that handle only on_training_run_end, an event the step loop never fires
//   VARIANT 2  one callback that handles on_train_step_end (the control: its code must differ, or the comparison
//              would prove nothing)
#include <accelerated/accelerated.hpp>

namespace acc = accelerated;

// Defined nowhere (the objects are compiled, never linked): a call to one in the step loop would show by name.
void note_run_end(int);
void note_step(std::int64_t);

template <int N>
struct RunEndOnly {
  int seen = 0;  // state, too: it must not move the trainer's other members
  void operator()(acc::on_training_run_end, auto&) { note_run_end(N + seen++); }
};

struct PerStep {
  std::int64_t steps = 0;
  void operator()(acc::on_train_step_end, auto&) { note_step(++steps); }
};

#if VARIANT == 0
using Trainer = acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, acc::callbacks::None>;
#define CALLBACK_VALUES acc::callbacks::None{}
#elif VARIANT == 1
using Trainer = acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, RunEndOnly<1>,
                             RunEndOnly<2>, RunEndOnly<3>, RunEndOnly<4>, RunEndOnly<5>>;
#define CALLBACK_VALUES RunEndOnly<1>{}, RunEndOnly<2>{}, RunEndOnly<3>{}, RunEndOnly<4>{}, RunEndOnly<5>{}
#else
using Trainer = acc::Trainer<acc::Cpu, acc::FullPrecision, acc::SingleProcess, acc::DefaultLoop, PerStep>;
#define CALLBACK_VALUES PerStep{}
#endif

void train(torch::nn::Linear model, torch::optim::SGD& optimizer, std::pair<torch::Tensor, torch::Tensor> data) {
  Trainer trainer(model, torch::nn::MSELoss(), optimizer, CALLBACK_VALUES);
  trainer.train(data, {});
}
