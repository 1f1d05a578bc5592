"""GRPO with LLCTrainerCallback under torchrun (run by test_trl.py).

Usage: torchrun --standalone --nproc_per_node=2 trl_torchrun_script.py OUT_DIR
Writes each process's kept completions, callback history and first generation to
OUT_DIR/rank_<rank>.json.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from models import TINY
from ranks import leave
from trl_helpers import grpo_trainer

from llc_callbacks.integrations.huggingface import LLCTrainerCallback

STEPS = [2, 4]
# Two chains per rank, which run batched (a single chain runs alone).
CONFIG = dataclasses.replace(TINY, num_chains=4)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    callback = LLCTrainerCallback(CONFIG, steps=STEPS)
    trainer = grpo_trainer(out, [callback], max_steps=4, ddp_backend="gloo")
    trainer.train()
    record = {
        "world_size": torch.distributed.get_world_size(),
        "kept": {k: v.tolist() for k, v in callback._objective.buffer.items()},
        "history": callback.monitor.history,
        "vectorized": callback.monitor.last_result.vectorized,
    }
    (out / f"rank_{torch.distributed.get_rank()}.json").write_text(json.dumps(record))
    leave()
