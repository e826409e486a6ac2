"""Pre-trains, in Python, the backbone that examples/finetune_from_python.cpp fine-tunes in C++.

The backbone and a 5-class head learn Fashion-MNIST classes 0-4 for one epoch; the backbone's weights are saved with
torch.save(backbone.state_dict(), PATH), as a Python user would, or as safetensors when PATH ends in ".safetensors".
Needs python3-torch (Debian: apt-get install python3-torch).
Usage: python3 pretrain_backbone.py PATH [fashion-mnist folder]
       python3 pretrain_backbone.py --check-finetuned OUT   (loads the C++ fine-tuned model, strict; .pt or
                                                             .safetensors)
"""
import gzip
import json
import os
import struct
import sys

import torch
from torch import nn


class Backbone(nn.Module):  # the same layers as BackboneImpl in finetune_from_python.cpp
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU())

    def forward(self, x):
        return self.layers(x)


# safetensors without the safetensors package (not packaged for Debian 12): what safetensors.torch.save_file and
# load_file do, from the published format. With the package installed, use those instead.
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def save_safetensors(tensors, path):
    header, offset, chunks = {}, 0, []
    for name, tensor in tensors.items():
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        chunks.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def load_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    by_name = {code: dtype for dtype, code in DTYPES.items()}
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        data = bytearray(raw[8 + n + begin:8 + n + end])
        tensors[name] = torch.frombuffer(data, dtype=torch.uint8).view(by_name[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()[offset:]), dtype=torch.uint8)


class Classifier(nn.Module):  # ClassifierImpl in finetune_from_python.cpp
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.backbone(x))


def main():
    if sys.argv[1] == "--check-finetuned":
        path = sys.argv[2]
        weights = load_safetensors(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
        result = Classifier().load_state_dict(weights, strict=True)
        print(f"pretrain_backbone.py: {sys.argv[2]} loads into Classifier: {result}")
        return
    out = sys.argv[1]
    folder = sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist"
    images = read_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"), 16).view(-1, 1, 28, 28).float() / 255
    labels = read_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), 8).long()
    keep = labels < 5
    images, labels = (images[keep] - 0.2860) / 0.3530, labels[keep]
    torch.manual_seed(0)
    backbone = Backbone()
    model = nn.Sequential(backbone, nn.Linear(64, 5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(labels))
    for start in range(0, len(order), 64):
        batch = order[start:start + 64]
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if out.endswith(".safetensors"):
        save_safetensors(backbone.state_dict(), out)
    else:
        torch.save(backbone.state_dict(), out)
    print(f"pretrain_backbone.py: wrote {out} (torch {torch.__version__}, last loss {loss.item():.3f})")


if __name__ == "__main__":
    main()
