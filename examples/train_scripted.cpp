// A model defined and scripted in Python (examples/script_model.py: torch.jit.script(model).save(path)), trained here
// through the same Trainer as any C++ model: callbacks (the defaults' progress and logs, accuracy), bf16 mixed
// precision, and back to Python with save_script_module, where torch.jit.load reads it trained.
// Usage: train_scripted SCRIPTED.pt TRAINED.pt [fashion-mnist folder]. Last line: JSON with the accuracy.
#include <accelerated/accelerated.hpp>

namespace acc = accelerated;

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::cerr << "usage: train_scripted SCRIPTED.pt TRAINED.pt [fashion-mnist folder]\n"
                 "  make SCRIPTED.pt with: python3 examples/script_model.py write SCRIPTED.pt\n";
    return 2;
  }
  const std::string folder = argc > 3 ? argv[3] : acc::data::fashion_mnist_default_folder;
  const auto train = acc::data::load_fashion_mnist(folder, acc::data::Split::train);
  const auto test = acc::data::load_fashion_mnist(folder, acc::data::Split::test);
  torch::manual_seed(0);

  auto model = acc::load_script_module(argv[1]);  // its parameters are the script's: the optimizer trains those
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(1e-3));
  acc::Trainer trainer(model, torch::nn::CrossEntropyLoss(), optimizer, acc::policies(acc::Cpu{}, acc::BFloat16{}),
                       acc::callbacks::Defaults{}, acc::callbacks::Accuracy{});
  trainer.train(train, {.num_epochs = 2, .per_device_batch_size = 128}, test);

  acc::save_script_module(model, argv[2]);  // Python: torch.jit.load(TRAINED.pt)
  std::cout << R"({"eval_accuracy":)" << trainer.run_history().get_latest_metric("eval_accuracy") << "}"
            << std::endl;
} catch (const std::exception& error) {
  std::cerr << "train_scripted: " << error.what() << std::endl;
  return 1;
}
