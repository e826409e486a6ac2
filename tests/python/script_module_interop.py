"""The Python side of the TorchScript tests (tests/test_python_models.cpp, [script_module]).

  write DIR   scripts the network below (seed 0) and saves it with torch.jit.save as DIR/scripted.pt, its initial
              state dict as DIR/initial.pt (for the C++ twin), and a module whose forward returns a tuple as
              DIR/tuple_out.pt.
  check DIR   loads DIR/trained.pt (written by accelerated::save_script_module) with torch.jit.load, checks that
              training moved its weights away from DIR/initial.pt, and that its eval-mode output on DIR/io.pt's
              "input" equals "output" (computed in C++) within 1e-6.
"""
import sys
from typing import Tuple

import torch
from torch import nn


class Net(nn.Module):  # TwinNet in test_python_models.cpp: the same layers under the same names
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.features(x))


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x) -> Tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        return y, y


def main():
    mode, folder = sys.argv[1:3]
    if mode == "write":
        torch.manual_seed(0)
        net = Net()
        torch.jit.script(net).save(f"{folder}/scripted.pt")
        torch.save(net.state_dict(), f"{folder}/initial.pt")
        torch.jit.script(TupleOut()).save(f"{folder}/tuple_out.pt")
        net.features[1].eval()  # a submodule held in eval mode while the rest trains
        torch.jit.script(net).save(f"{folder}/mixed_modes.pt")
        print(f"python: scripted Net with torch {torch.__version__}")
        return 0
    trained = torch.jit.load(f"{folder}/trained.pt")
    initial = torch.load(f"{folder}/initial.pt")
    state = trained.state_dict()
    moved = [name for name in initial if not torch.equal(state[name], initial[name])]
    io = torch.load(f"{folder}/io.pt")
    trained.eval()
    with torch.no_grad():
        difference = (trained(io["input"]) - io["output"]).abs().max().item()
    print(f"python: {len(moved)} of {len(initial)} entries trained; eval output differs by {difference}")
    return 0 if len(moved) >= 6 and difference <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
