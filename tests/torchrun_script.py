"""Train a tiny GPT-2 with LLCTrainerCallback under torchrun (run by test_torchrun.py).

Usage: torchrun --standalone --nproc_per_node=2 torchrun_script.py OUT_DIR
Writes each process's callback history and log_history to OUT_DIR/rank_<rank>.json.
"""

import json
import sys
from pathlib import Path

import torch
from hf_helpers import make_trainer
from ranks import leave

from llc_callbacks import LLCConfig
from llc_callbacks.integrations.huggingface import LLCTrainerCallback

# Chains in sequence, a fixed step size and no MALA check, so that counting loss calls shows
# how many chains each process ran.
CONFIG = LLCConfig(
    num_chains=3,
    num_burnin=5,
    num_draws=5,
    vectorize=False,
    mala=False,
    step_size=2e-4,
)
STEPS = [4, 8]
# The check when training starts evaluates the loss once on every process.
CHECK_LOSS_CALLS = 1


def loss_calls_per_estimate(chains: int) -> int:
    """One call per chain step, and one at ``w*`` per step (the reference, which also gives
    ``L(w*)``: a paired estimate spends no batch of its own on it)."""
    steps = CONFIG.num_burnin + CONFIG.num_draws
    return chains * steps + steps


if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer = make_trainer(out, max_steps=8, ddp_backend="gloo", per_device_train_batch_size=8)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return trainer.compute_loss(model, batch)

    callback = LLCTrainerCallback(CONFIG, steps=STEPS, loss_fn=loss_fn, stream=False)
    trainer.add_callback(callback)
    trainer.train()
    rank = torch.distributed.get_rank()
    record = {
        "world_size": torch.distributed.get_world_size(),
        "history": callback.monitor.history,
        "log_history": trainer.state.log_history,
        "is_world_process_zero": trainer.is_world_process_zero(),
        "loss_calls": len(calls),
    }
    (out / f"rank_{rank}.json").write_text(json.dumps(record))
    leave()
