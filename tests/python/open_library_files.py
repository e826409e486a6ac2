# Opens a checkpoint and a training state written by accelerated with torch.load(weights_only=True), which
# refuses anything but tensors, containers, numbers and strings, and writes back what C++ checks they held:
#   python3 open_library_files.py CHECKPOINT TRAINING_STATE OUT
import sys

import torch

checkpoint_file, state_file, out = sys.argv[1:4]
checkpoint = torch.load(checkpoint_file, weights_only=True)
state = torch.load(state_file, weights_only=True)
assert isinstance(checkpoint, dict) and isinstance(state, dict)
assert int(checkpoint["accelerated_format_version"]) == 2, checkpoint.keys()
assert int(state["accelerated_training_state_version"]) == 2, state.keys()
assert state["optimizer_type"] == "torch::optim::Adam", state["optimizer_type"]
# The model entry is a state dict: a module with the same names loads it strictly.
model = torch.nn.Linear(8, 1)
model.load_state_dict(checkpoint["model"], strict=True)
torch.save({"weight": model.weight.detach(), "epochs_done": state["position"]["epochs_done"],
            "best": checkpoint["values"]["best"]}, out)
