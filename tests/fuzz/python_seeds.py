# Seeds of the fuzz corpus written by Python's torch.save: python3 tests/fuzz/python_seeds.py tests/fuzz/corpus
import collections
import sys

import torch

out = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
torch.save(model.state_dict(), f"{out}/state_dict/seed_python_state_dict.pt")
# A dict of the kinds a checkpoint holds, as Python writes it (floats, ints, strings, nested dicts and lists).
torch.save({"accelerated_format_version": torch.tensor(2), "model": {"weight": torch.randn(1, 8),
            "bias": torch.zeros(1)}, "values": {"best": torch.tensor(0.5, dtype=torch.float64)},
            "misc": [1, 2.5, "x", None, True, (3, 4)], "ordered": collections.OrderedDict(a=torch.ones(2))},
           f"{out}/checkpoint/seed_python_dict.pt")
