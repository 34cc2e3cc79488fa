"""Run by test_train.py under torchrun (1 or 2 CPU processes): train a tiny model, write the loss curve."""

from __future__ import annotations

import json
import sys

import torch
from tiny import tiny_model, tiny_tokenizer

from attnsurgery import patch
from attnsurgery.train import TrainConfig, prepare_data, train

out = sys.argv[1]
model = tiny_model("llama")
handle = patch(model, "head_scale", trainable=True)
data = prepare_data(tiny_tokenizer(), "gutenberg_ppl", 32)
config = TrainConfig(
    steps=4, batch_size=4, seq_len=32, lr=0.05, objective="lm+kd", val_every=2, save_every=100
)
result = train(model, handle, data, config, progress=False)
if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
    sys.exit(0)
with open(out, "w") as f:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    json.dump({"loss": result.train_loss, "scale": handle.surgeries[0].scale.tolist(), "world": world}, f)
