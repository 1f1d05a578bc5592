"""Realized overhead of ``max_overhead`` budgets against the budget, measured in one run.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/overhead.py [--steps 12000]``

Two Lightning workloads: the grokking demo's network (``examples/grokking.py``, p = 59) and
the MLP of ``mlp.py``. Each trains once without the callback, then once per budget with
``LLCCallback(LLCConfig(), max_overhead=budget, stream=False)`` (snapshot estimates, which
the budget spaces). ``realized`` is the time spent in the callback's hooks over the rest of
``fit``, in the same run: what the budget bounds.
``vs plain`` is the wall time of ``fit`` over that of the run without the callback, minus 1,
which adds to it the difference between two runs of the same training (a few percent on
this machine). The first estimate runs at step 1, before its cost is known, and counts
against the budget: the runs must be long enough to afford it (here an estimate costs a few
seconds, about as much as 1,000 training steps).
"""

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from mlp import loss_fn, make_data, make_loader, make_model
from torch.utils.data import DataLoader, RandomSampler

from llc_callbacks import LLCConfig
from llc_callbacks.integrations.lightning import LLCCallback

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from grokking import ModularAddition, datasets

BUDGETS = (0.1, 0.25, 0.5)


class MLPModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_model()

    def training_step(self, batch, batch_idx):
        return loss_fn(self.model, batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def grokking(steps: int) -> tuple[L.LightningModule, DataLoader]:
    train, _ = datasets(59, train_fraction=0.3)
    sampler = RandomSampler(train, replacement=True, num_samples=steps * 512)
    return ModularAddition(59), DataLoader(train, batch_size=512, sampler=sampler)


def mlp(steps: int) -> tuple[L.LightningModule, DataLoader]:
    return MLPModule(), make_loader(make_data())


class TimedCallback(LLCCallback):
    """``LLCCallback`` that adds up the seconds spent in its training hooks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    def on_train_start(self, *args) -> None:
        self._timed(super().on_train_start, *args)

    def on_train_batch_end(self, *args) -> None:
        self._timed(super().on_train_batch_end, *args)

    def on_train_end(self, *args) -> None:
        self._timed(super().on_train_end, *args)

    def _timed(self, hook, *args) -> None:
        start = time.perf_counter()
        hook(*args)
        self.seconds += time.perf_counter() - start


def fit(workload, steps: int, budget: float | None) -> tuple[float, TimedCallback | None]:
    """Seconds of ``fit``, and the callback (``None`` without a budget)."""
    L.seed_everything(0, verbose=False)
    module, data = workload(steps)
    callback = TimedCallback(LLCConfig(), max_overhead=budget, stream=False) if budget else None
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[callback] if callback else [],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - start, callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12000)
    args = parser.parse_args()
    print(
        f"{'workload':10} {'budget':>7} {'realized':>9} {'vs plain':>9} {'estimates':>10}"
        f" {'seconds':>8}"
    )
    for workload in (grokking, mlp):
        plain, _ = fit(workload, args.steps, None)
        print(f"{workload.__name__:10} {'none':>7} {'':>9} {'':>9} {0:>10} {plain:8.1f}")
        for budget in BUDGETS:
            seconds, callback = fit(workload, args.steps, budget)
            realized = callback.seconds / (seconds - callback.seconds)
            count = len(callback.monitor.history)
            print(
                f"{'':10} {budget:7.2f} {realized:9.3f} {seconds / plain - 1:9.3f} {count:>10}"
                f" {seconds:8.1f}"
            )


if __name__ == "__main__":
    main()
