"""Replay a transformers run's checkpoints under torchrun (run by test_replay.py), and the
settings the replay tests share.

Usage: torchrun --standalone --nproc_per_node=2 replay_script.py RUN_DIR OUT_DIR
Replays RUN_DIR with the checkpoints shared among the ranks (cold chains) and with the
chains shared (warm-started); rank 0 writes OUT_DIR/checkpoints.json and OUT_DIR/chains.json.
"""

import dataclasses
import sys
from pathlib import Path

import torch
from hf_helpers import TokenData
from ranks import leave
from torch.utils.data import DataLoader

from llc_callbacks import LLCConfig, LLCMonitor
from llc_callbacks.integrations.huggingface import model_loss, pretrained_loader
from llc_callbacks.replay import replay

# Short chains with a fixed step size: the comparisons are of equal computations, not of
# estimates' accuracy. Warm starts stay on, so each estimate depends on the one before.
CONFIG = LLCConfig(num_chains=2, num_burnin=20, num_draws=20, step_size=1e-4, relative_error=None)
# Each estimate on its own: what a share of the checkpoints gives on any rank.
COLD = dataclasses.replace(CONFIG, warm_start=False)


def token_loader() -> DataLoader:
    return DataLoader(TokenData(64), batch_size=16, shuffle=True)


if __name__ == "__main__":
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.distributed.init_process_group("gloo")
    for split, config in (("checkpoints", COLD), ("chains", CONFIG)):
        replay(
            run,
            pretrained_loader(),
            model_loss,
            token_loader(),
            LLCMonitor(config, stream=False),
            output=out / f"{split}.json",
            split=split,
            progress=False,
        )
    leave()
