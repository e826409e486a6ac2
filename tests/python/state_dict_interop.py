"""The Python side of the state-dict interop tests (tests/test_checkpoint.cpp, [state_dict]).

The network is written here as a pytorch user would write it, and again in C++ (test_checkpoint.cpp, InteropNet):
convolutions, batch norm (buffers) and a Sequential, under a parent module.

  check_cpp_file WEIGHTS IO   loads WEIGHTS (saved by accelerated::save_state_dict) with weights_only=True (PyTorch
                              2.6's default) and strict=True, and checks the
                              eval-mode output on IO's "input" against IO's "output" (computed in C++), within 1e-6.
  write_python_file WEIGHTS IO  makes the network (seed 0), runs batches in training mode so the batch-norm buffers
                              move, saves torch.save(model.state_dict(), WEIGHTS) and {"input", "output"} to IO.
"""
import sys

import torch
from torch import nn


class InteropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(72, 10)

    def forward(self, x):
        return self.head(self.features(x))


def main():
    mode, weights, io = sys.argv[1:4]
    model = InteropNet()
    if mode == "check_cpp_file":
        result = model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
        print("python: load_state_dict(strict=True):", result)
        expected = torch.load(io, weights_only=True)
        model.eval()
        with torch.no_grad():
            output = model(expected["input"])
        diff = (output - expected["output"]).abs().max().item()
        print(f"python: max |output difference| = {diff:.3g} (torch {torch.__version__})")
        return 0 if diff <= 1e-6 else 1
    if mode == "write_python_file":
        torch.manual_seed(0)
        model = InteropNet()
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
        model.eval()
        sample = torch.randn(5, 1, 8, 8)
        with torch.no_grad():
            output = model(sample)
        torch.save(model.state_dict(), weights)
        torch.save({"input": sample, "output": output}, io)
        print(f"python: wrote {weights} (torch {torch.__version__})")
        return 0
    print("unknown mode", mode)
    return 2


if __name__ == "__main__":
    sys.exit(main())
