"""Train with LLCCallback under strategy="ddp" on 2 CPU processes (run by test_ddp.py).

Usage: python ddp_script.py OUT_DIR MODE, MODE "ok", "one_in_flight" (as "ok", one chain held in
memory at a time), "fail_on_rank_1" or "budget" (estimates spaced by max_overhead over 40
steps, the budget's clock counting work, and made to differ between the ranks; the chains
sample the trainer's own batches) or "stream" (as "ok", with streaming readings paced by
max_overhead on the same clocks). Modes but "budget" record observables and sample a loader
of their own. Writes each rank's history, the warnings it showed and the batches per
optimizer step its monitor counts to OUT_DIR/history_<rank>.json,
OUT_DIR/warnings_<rank>.json and OUT_DIR/batches_<rank>.json, rank 0's weights at the
scheduled steps to OUT_DIR/weights_<step>.pt, and a CSVLogger run under OUT_DIR.
"""

import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import torch
from clocks import Clock
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import Classifier, dataset
from ranks import leave
from torch.utils.data import DataLoader, Subset

from llc_callbacks import LLCConfig
from llc_callbacks import budget as budget_module
from llc_callbacks import streaming as streaming_module
from llc_callbacks.integrations.lightning import LLCCallback

MODE = "ok"  # set from the command line
CONFIG = LLCConfig(num_chains=3, num_burnin=10, num_draws=10, observe_every=2)
STEPS = [4, 8]


def estimate_loader() -> DataLoader:
    return DataLoader(dataset(), batch_size=32, shuffle=True)


def observables() -> dict[str, DataLoader]:
    """A probe set whose per-example losses every chain records, on whichever rank."""
    return {"probe": DataLoader(Subset(dataset(), range(8)), batch_size=8)}


# The budget's clock in budget mode: it moves with work, not seconds, so that how loaded the
# machine is cannot change the plan. Each loss call costs 1 ms, a training step 50 ms, 70 ms
# on rank 1: the ranks' clocks differ, as real ones do.
CLOCK = Clock()


def loss_fn(module, batch):
    CLOCK.now += 1e-3
    # Chains fail on rank 1; the check at the start (without gradients) passes.
    failing = MODE == "fail_on_rank_1" and torch.distributed.get_rank() == 1
    if failing and torch.is_grad_enabled():
        raise RuntimeError("chains failed on rank 1 only")
    return torch.nn.functional.cross_entropy(module.net(batch[0]), batch[1])


class SaveWeights(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in STEPS and trainer.is_global_zero:
            torch.save(pl_module.state_dict(), OUT / f"weights_{trainer.global_step}.pt")


class SlowRankOne(L.Callback):
    """Training steps of 50 ms on the work clock, 70 ms on rank 1."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        CLOCK.now += 0.07 if trainer.global_rank == 1 else 0.05


if __name__ == "__main__":
    OUT, MODE = Path(sys.argv[1]), sys.argv[2]
    L.seed_everything(0, verbose=False)
    budget, stream = MODE == "budget", MODE == "stream"
    if budget or stream:
        budget_module.time = streaming_module.time = SimpleNamespace(perf_counter=CLOCK)
    schedule = {"max_overhead": 0.5} if budget else {"steps": STEPS}
    # A stream is paced on clocks that differ by rank: the ranks agree on each reading's draws.
    schedule |= {"stream": True, "max_overhead": 0.5} if stream else {"stream": False}
    config = replace(CONFIG, chains_in_flight=1) if MODE == "one_in_flight" else CONFIG
    callback = LLCCallback(
        config,
        **schedule,
        loss_fn=loss_fn,
        dataloader=None if budget else estimate_loader(),
        observables=None if budget else observables(),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=40 if budget else 8,
        log_every_n_steps=1,
        logger=CSVLogger(OUT),
        callbacks=[callback, *([SlowRankOne()] if budget or stream else []), SaveWeights()],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(dropout=0.0), DataLoader(dataset(), batch_size=16, shuffle=True))
    rank = trainer.global_rank
    (OUT / f"history_{rank}.json").write_text(json.dumps(callback.monitor.history))
    shown = [str(w.message) for w in caught if "llc_callbacks" in str(w.message)]
    (OUT / f"warnings_{rank}.json").write_text(json.dumps(shown))
    (OUT / f"batches_{rank}.json").write_text(json.dumps(callback.monitor.config.batches_per_step))
    leave()
