"""What estimating off the training path costs: training with the callback against training
that only saves checkpoints, which ``llc-callbacks replay`` (or ``--watch``) estimates apart.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/replay.py``

The transformers run of ``first_contact.py`` (a 2-layer GPT-2 of width 32, batches of
16 x 16 tokens, 100 steps) three times in one process: plain; with
``LLCTrainerCallback(every_n_steps=50, stream=False)`` (snapshot estimates, as replay
makes); saving a checkpoint every 50 steps instead. Then
``replay`` over the saved checkpoints with the same default ``LLCConfig()``. Costs are in
training steps of the plain run (its wall time over its steps).
"""

import tempfile
import time

import torch
from first_contact import HF_STEPS, Counting, hf_run
from torch.utils.data import DataLoader

from llc_callbacks import LLCMonitor
from llc_callbacks.integrations.huggingface import LLCTrainerCallback, model_loss, pretrained_loader
from llc_callbacks.replay import find_checkpoints, replay

EVERY = 50


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        plain = hf_run([], f"{folder}/plain")
        watched = hf_run(
            [LLCTrainerCallback(every_n_steps=EVERY, stream=False)], f"{folder}/watched"
        )
        saving = hf_run([], f"{folder}/saving", save_steps=EVERY)
        checkpoints = find_checkpoints(f"{folder}/saving")
        loader = DataLoader(Counting(), batch_size=16, shuffle=True)
        start = time.perf_counter()
        for checkpoint in checkpoints:
            pretrained_loader()(checkpoint)
        loading = (time.perf_counter() - start) / len(checkpoints)
        start = time.perf_counter()
        replay(
            checkpoints,
            pretrained_loader(),
            model_loss,
            loader,
            LLCMonitor(stream=False),
            progress=False,
        )
        replayed = (time.perf_counter() - start) / len(checkpoints)
    step = plain / HF_STEPS
    count = HF_STEPS // EVERY
    print(f"training step {step * 1e3:.1f} ms; {count} estimates or checkpoints per run")
    print(
        f"training with the callback: {watched / plain:.1f}x the plain run's time;"
        f" one estimate in training = {(watched - plain) / count / step:,.0f} steps"
    )
    print(
        f"training saving checkpoints instead: {saving / plain:.2f}x;"
        f" one save = {(saving - plain) / count / step:,.0f} steps"
    )
    print(
        f"replay, per checkpoint: {replayed / step:,.0f} steps"
        f" (loading it: {loading / step:,.0f}), on whatever device the replay has"
    )


if __name__ == "__main__":
    main()
