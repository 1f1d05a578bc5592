"""What the README's first two examples cost: each trainer's run with and without the callback.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/first_contact.py [--snapshot]``

Lightning: a 6-32-32-3 MLP classifier (1,379 weights), batches of 32. transformers: a 2-layer
GPT-2 of width 32 (28,032 weights), batches of 16 x 16 tokens. Both run 2,000 steps (long
enough for a curve) with ``LLCCallback(every_n_steps=100)`` and
``LLCTrainerCallback(every_n_steps=100)`` (streaming readings at the default ``max_overhead``,
0.35: a curve of 20 points), three times each, interleaved with three runs without the callback;
then once at the step size that tuning reached, held from the first reading, which does not burn
in (what the readings cost without tuning). Two ratios: in the same run, its wall time over the
time outside the callback's hooks (training alone, timed in the same process: what a busy
machine does not move); across runs, the median watched run over the median run without the
callback (what a user's clock shows, moved by everything else the machine runs). A reading's cost
is the time in the hooks over the number of readings, in training steps of that run (the time
outside the hooks over its steps).

``--snapshot``: the README's examples with snapshot estimates (``stream=False``), an estimate
every 100 steps of a 200-step Lightning run and every 50 of a 100-step transformers run.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from llc_callbacks import LLCConfig
from llc_callbacks.integrations.huggingface import LLCTrainerCallback
from llc_callbacks.integrations.lightning import LLCCallback

LIGHTNING_STEPS, HF_STEPS = 200, 100  # the README's runs, of the snapshot estimates
# The streaming runs: long enough for a curve, a reading every STREAM_EVERY steps.
STREAM_STEPS, STREAM_EVERY = 2000, 100


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(32, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.net(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lightning_run(callbacks, steps: int = LIGHTNING_STEPS) -> float:
    L.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 6, generator=generator)
    y = (x[:, :3] @ torch.randn(3, 3, generator=generator)).argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(Classifier(), loader)
    return time.perf_counter() - start


class Counting(Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, 64, (512, 1), generator=generator)
        self.ids = (starts + torch.arange(16)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def hf_run(callbacks, folder: str, save_steps: int | None = None, steps: int = HF_STEPS) -> float:
    """Train the GPT-2 for ``steps``; its wall time. ``save_steps``: checkpoint that often."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    args = TrainingArguments(
        output_dir=folder,
        max_steps=steps,
        per_device_train_batch_size=16,
        use_cpu=True,
        report_to="none",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        logging_steps=steps,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=Counting(), callbacks=callbacks
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def clocked(callback: Any) -> Any:
    """The callback with the seconds spent in its hooks added up in ``callback.seconds``.

    Both trainers look their callbacks' hooks up by name on the instance, so the timed
    methods set on it are the ones they call.
    """
    callback.seconds = 0.0
    hooks = [name for name in dir(type(callback)) if name.startswith("on_")]
    for name in [*hooks, "setup", "teardown"]:
        method = getattr(callback, name, None)
        if not callable(method):
            continue

        def timed(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                callback.seconds += time.perf_counter() - start

        setattr(callback, name, timed)
    return callback


def report(name: str, steps: int, plain: float, watched: float, estimates: int) -> None:
    step = plain / steps
    print(
        f"{name}: {steps} steps {plain:.1f} s without, {watched:.1f} s with {estimates}"
        f" estimates: {watched / plain:.2f}x; one estimate = {(watched - plain) / estimates:.1f} s"
        f" = {(watched - plain) / estimates / step:,.0f} training steps"
    )


def in_run(name: str, watched: float, hooks: float, readings: int) -> str:
    """One streaming run's line: its time over the time outside the callback's hooks."""
    training = watched - hooks
    step = training / STREAM_STEPS
    return (
        f"{name}: {watched:.1f} s, {hooks:.1f} s in the callback: {watched / training:.2f}x the"
        f" training in the same run; {readings} readings of {hooks / readings / step:,.0f}"
        " training steps each"
    )


def streamed() -> None:
    """The two runs at ``STREAM_STEPS`` steps, with and without streaming callbacks.

    Three runs of each, interleaved, at the defaults; then one at the step size its tuning
    reached, held from the first reading on without burn-in (what the readings alone cost).
    """
    runs = (
        ("Lightning MLP", LLCCallback, lambda callbacks: lightning_run(callbacks, STREAM_STEPS)),
        (
            "transformers GPT-2",
            LLCTrainerCallback,
            lambda callbacks: hf_run(callbacks, "/tmp/first_contact_run", steps=STREAM_STEPS),
        ),
    )
    for name, make, run in runs:
        plain, watched, ratios = [], [], []
        for _ in range(3):
            plain.append(run([]))
            callback = clocked(make(every_n_steps=STREAM_EVERY))
            watched.append(run([callback]))
            readings = len(callback.monitor.history)
            print(in_run(f"{name}, streaming", watched[-1], callback.seconds, readings))
            ratios.append(watched[-1] / (watched[-1] - callback.seconds))
        print(
            f"{name}, streaming: {statistics.median(ratios):.2f}x in the same run (median of 3);"
            f" {statistics.median(watched) / statistics.median(plain):.2f}x across runs"
            f" (medians of 3: {statistics.median(watched):.1f} s against"
            f" {statistics.median(plain):.1f} s)"
        )
        held = LLCConfig(step_size=callback.monitor.history[0]["llc/step_size"], num_burnin=0)
        untuned = clocked(make(held, every_n_steps=STREAM_EVERY))
        seconds = run([untuned])
        readings = len(untuned.monitor.history)
        print(in_run(f"{name}, streaming without tuning", seconds, untuned.seconds, readings))


def snapshots() -> None:
    """The README's runs with a snapshot estimate at every scheduled step (``stream=False``)."""
    plain = lightning_run([])
    watched = lightning_run([LLCCallback(every_n_steps=100, stream=False)])
    report("Lightning MLP, snapshots", LIGHTNING_STEPS, plain, watched, LIGHTNING_STEPS // 100)
    plain = hf_run([], "/tmp/first_contact_plain")
    callback = LLCTrainerCallback(every_n_steps=50, stream=False)
    watched = hf_run([callback], "/tmp/first_contact_watched")
    report("transformers GPT-2, snapshots", HF_STEPS, plain, watched, HF_STEPS // 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snapshot", action="store_true", help="snapshot estimates instead")
    torch.set_num_threads(1)
    if parser.parse_args().snapshot:
        snapshots()
    else:
        streamed()


if __name__ == "__main__":
    main()
