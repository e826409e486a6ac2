"""The Python side of examples/train_scripted.cpp: a model defined and scripted in Python, trained in C++.

  python3 script_model.py write SCRIPTED.pt     scripts the classifier below (untrained) with torch.jit.script and
                                                saves it, as a Python user hands a model to C++.
  python3 script_model.py check TRAINED.pt [fashion-mnist folder]
                                                loads the model C++ trained (torch.jit.load) and prints its accuracy
                                                on the Fashion-MNIST test set, as JSON; exits 1 below 0.80.
Needs python3-torch (Debian: apt-get install python3-torch).
"""
import gzip
import json
import os
import sys

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                    nn.Dropout(0.1), nn.Linear(256, 10))

    def forward(self, x):
        return self.layers(x)


def read_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()[offset:]), dtype=torch.uint8)


def main():
    mode, path = sys.argv[1:3]
    if mode == "write":
        torch.manual_seed(0)
        torch.jit.script(Classifier()).save(path)
        print(f"script_model.py: wrote {path} (torch {torch.__version__})")
        return 0
    folder = sys.argv[3] if len(sys.argv) > 3 else "/usr/share/datasets/fashion-mnist"
    images = read_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), 16).view(-1, 1, 28, 28).float() / 255
    labels = read_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), 8).long()
    model = torch.jit.load(path)
    model.eval()
    with torch.no_grad():
        accuracy = (model((images - 0.2860) / 0.3530).argmax(1) == labels).float().mean().item()
    print(json.dumps({"python_eval_accuracy": accuracy}))
    return 0 if accuracy >= 0.80 else 1


if __name__ == "__main__":
    sys.exit(main())
