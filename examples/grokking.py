"""Grokking modular addition, with the LLC tracked by LLCCallback (``make demo``).

A small MLP learns (a + b) mod p from 30% of the pairs with AdamW and strong weight decay.
Training accuracy saturates within a few hundred steps; test accuracy stays low, then climbs
to 100% thousands of steps later. The LLC rises while the network memorizes and then falls by
orders of magnitude as weight decay compresses it into the generalizing solution.

The LLC here is a stream's (the default: chains tuned at the first reading and continued
along training, for 35% of its time) at the defaults' localization, 100. ``LLCConfig.accurate()``'s
localization does not fit this network: with 31,675 parameters and 1,044 training examples,
chains at ``localization=5`` (or 1) leave the basin and sample losses far past chance level,
about the same (950 to 1,300) whether the network memorizes or generalizes; their estimates
warn R-hat (see ``docs/accuracy.md``). The Hessian trace, the empirical Fisher trace and the
top Hessian eigenvalue are measured at the same steps, and the summary says how each moved.

The LLC curve's stages are found twice: online, by the callback, which logs each boundary
once enough later estimates confirm it (``llc/stage``), and at the end over the whole curve
(``detect_stages``). Essential dynamics record each of 256 fixed pairs' loss at log-spaced
steps; the path of that vector in its leading principal components turns where the network
changes what it computes, which the figure and the summary set beside the LLC's stages.

The run logs to W&B (offline unless ``WANDB_MODE`` says otherwise; sync it later with
``wandb sync``) and to a CSV file, and always writes a PNG of train loss, test accuracy and
the LLC with its chains and stages on one step axis, and the essential-dynamics path.

Run: ``make demo`` or ``python examples/grokking.py [--steps 12000] [--out outputs/grokking]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from llc_callbacks import EssentialDynamics, LLCConfig
from llc_callbacks.curvature import CURVATURES
from llc_callbacks.history import read_rows, series
from llc_callbacks.integrations.lightning import LLCCallback
from llc_callbacks.measures import Curvature, FreeEnergy
from llc_callbacks.plotting import draw_dynamics_path, shade_stages
from llc_callbacks.stages import detect_stages

PROBE = 256  # pairs whose losses trace the essential dynamics


class ModularAddition(L.LightningModule):
    """Embeddings of a and b, summed, then a ReLU layer and a linear readout over p classes."""

    def __init__(self, p: int, width: int = 128, lr: float = 1e-3, weight_decay: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(p, width)
        self.hidden = nn.Linear(width, width)
        self.readout = nn.Linear(width, p)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.readout(F.relu(self.hidden(self.embed(pairs[:, 0]) + self.embed(pairs[:, 1]))))

    def training_step(self, batch, batch_idx):
        pairs, sums = batch
        logits = self(pairs)
        loss = F.cross_entropy(logits, sums)
        self.log("train_loss", loss)
        self.log("train_acc", (logits.argmax(dim=1) == sums).float().mean())
        return loss

    def validation_step(self, batch, batch_idx):
        pairs, sums = batch
        self.log("test_acc", (self(pairs).argmax(dim=1) == sums).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            betas=(0.9, 0.98),
        )


def datasets(p: int, train_fraction: float, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """All pairs (a, b) with a + b mod p, split at random into train and test."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], dim=1)
    sums = pairs.sum(dim=1) % p
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    cut = int(train_fraction * len(pairs))
    train, test = order[:cut], order[cut:]
    return TensorDataset(pairs[train], sums[train]), TensorDataset(pairs[test], sums[test])


def probe(p: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``PROBE`` pairs drawn from all p^2, seen in training or not, as one batch."""
    train, test = datasets(p, train_fraction=0.3, seed=seed)
    pairs = torch.cat([train.tensors[0], test.tensors[0]])
    sums = torch.cat([train.tensors[1], test.tensors[1]])
    chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + 1))
    chosen = chosen[: min(PROBE, len(pairs))]
    return [(pairs[chosen], sums[chosen])]


def pair_losses(module: ModularAddition, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Each pair's cross-entropy: the outputs that essential dynamics follow."""
    pairs, sums = batch
    return F.cross_entropy(module(pairs), sums, reduction="none")


def wandb_mode() -> str:
    """Online when W&B is set up (WANDB_MODE or an API key), offline otherwise."""
    return os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )


def run(
    out: Path,
    p: int = 59,
    steps: int = 12000,
    estimates: int = 30,
    config: LLCConfig | None = None,
    seed: int = 0,
    max_overhead: float | str | None = "auto",
) -> dict:
    """Train, estimate, log, plot; return the summary.

    Args:
        out: Folder for the CSV log, the W&B run and the PNG.
        p: The modulus.
        steps: Optimizer steps.
        estimates: About how many LLC estimates, at log-spaced steps (plus one at the start).
        config: Sampling hyperparameters (``LLCConfig()`` if ``None``).
        seed: Seed of the initialization, the split and the batches.
        max_overhead: The share of the training time the streaming readings take
            (``"auto"``: 0.35; ``None``: ``config.num_draws`` draws a reading, as the tests
            use).
    """
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, verbose=False)
    train, test = datasets(p, train_fraction=0.3, seed=seed)
    batches = RandomSampler(train, replacement=True, num_samples=steps * 512)
    train_loader = DataLoader(train, batch_size=512, sampler=batches)
    test_loader = DataLoader(test, batch_size=len(test))
    dynamics = EssentialDynamics(
        probe(p, seed), outputs_fn=pair_losses, log_spaced=2 * estimates, at_start=True
    )
    callback = LLCCallback(
        config or LLCConfig(),
        log_spaced=estimates,
        at_start=True,
        max_overhead=max_overhead,
        measures=[Curvature(), FreeEnergy()],  # the curvature, and F next to the LLC
        dynamics=dynamics,
        extra_metrics=("chains",),  # each chain's curve
    )
    csv = CSVLogger(out, name="csv")
    wandb_logger = WandbLogger(
        project="llc-callbacks-grokking", save_dir=str(out), mode=wandb_mode()
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=max(1, steps // 80),
        check_val_every_n_epoch=None,
        log_every_n_steps=max(1, steps // 400),
        logger=[csv, wandb_logger],
        callbacks=[callback],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ModularAddition(p), train_loader, test_loader)
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()
    rows = read_rows(Path(csv.log_dir) / "metrics.csv")
    summary = {
        **summarize(rows),
        "confirmed": callback.monitor.boundaries,
        "dynamics": dynamics.result(),
    }
    figure_path = out / "grokking.png"
    plot(rows, summary, figure_path, p)
    return {
        **summary,
        "png": figure_path,
        "csv": Path(csv.log_dir) / "metrics.csv",
        "wandb": run_dir,
    }


SIGNALS = {"LLC": "llc/mean", **{name: f"llc/curvature/{name}" for name in CURVATURES}}


def summarize(rows: list[dict]) -> dict:
    """When test accuracy crossed 90%, the LLC at its peak, at the crossing and at the end, and
    how each signal (the LLC and the curvature) moved.

    ``stages`` are the LLC curve's stages (``llc_callbacks.stages``). ``moves`` holds, per
    signal, three factors: from the start to the LLC's peak
    (memorization), from the peak to the end, and across the grokking transition (from the
    last estimate before test accuracy reached 50% to the first after it crossed 90%).
    """
    test = series(rows, "test_acc")
    llc = series(rows, "llc/mean")
    crossed = next((s for s, a in zip(test.steps, test.values, strict=True) if a >= 0.9), None)
    half = next((s for s, a in zip(test.steps, test.values, strict=True) if a >= 0.5), None)
    peak = max(range(len(llc.values)), key=llc.values.__getitem__)
    before = [
        v for s, v in zip(llc.steps, llc.values, strict=True) if crossed is None or s <= crossed
    ]
    moves = {}
    for name, key in SIGNALS.items():
        signal = series(rows, key)
        values = dict(zip(signal.steps, signal.values, strict=True))
        if llc.steps[peak] not in values or not values.get(0):
            continue
        top = values[llc.steps[peak]]
        across = math.nan
        if crossed is not None and half is not None:
            start = max((s for s in values if s <= half), default=None)
            end = min((s for s in values if s >= crossed), default=None)
            if start is not None and end is not None and values[start]:
                across = values[end] / values[start]
        moves[name] = (top / values[0], values[max(values)] / top, across)
    return {
        "crossed_90": crossed,
        "final_test_acc": test.values[-1],
        "llc_peak": (llc.steps[peak], llc.values[peak]),
        "llc_at_crossing": before[-1],
        "llc_final": llc.values[-1],
        "moves": moves,
        "stages": detect_stages(rows, loss="train_loss"),
    }


def plot(rows: list[dict], summary: dict, path: Path, p: int) -> None:
    """The LLC with its chains and stages, the LLC and the curvature scaled, accuracies and
    train loss on one step axis; below, the essential-dynamics path."""
    figure = Figure(figsize=(8, 12), dpi=100, layout="constrained")
    top, shapes, middle, bottom, path_axes = figure.subplots(
        5, 1, gridspec_kw={"height_ratios": [1.2, 1, 1, 1, 1.6]}
    )
    steps_axes = (top, shapes, middle, bottom)
    for axes in steps_axes[1:]:
        axes.sharex(top)
    for axes in steps_axes[:-1]:
        axes.tick_params(labelbottom=False)
    _llc_panel(top, rows, summary, p)
    for (name, key), color in zip(SIGNALS.items(), ("tab:blue", "C1", "C2", "C3"), strict=True):
        values = series(rows, key)
        largest = max((abs(v) for v in values.values), default=0.0) or 1.0
        scaled = [v / largest for v in values.values]
        shapes.plot(values.steps, scaled, marker=".", color=color, label=name.replace("_", " "))
    shapes.set(ylabel="/ largest magnitude")
    shapes.legend(loc="lower left", fontsize="small", ncol=2)
    for key, color in (("train_acc", "tab:orange"), ("test_acc", "tab:green")):
        values = series(rows, key)
        middle.plot(values.steps, values.values, color=color, label=key.replace("_", " "))
    middle.set(ylabel="accuracy", ylim=(0, 1.05))
    middle.legend(loc="center right")
    loss = series(rows, "train_loss")
    bottom.plot(loss.steps, loss.values, color="tab:red", linewidth=0.8)
    bottom.set(ylabel="train loss", yscale="log")
    bottom.set_xlabel("step: linear from 0 to 10, logarithmic beyond (dotted line)")
    bottom.set_xscale("symlog", linthresh=10)
    bottom.set_xlim(0, max(loss.steps[-1], series(rows, "llc/mean").steps[-1]))
    for axes in steps_axes:
        axes.axvline(10, color="0.6", linestyle=":", linewidth=0.8)
        if summary["crossed_90"] is not None:
            axes.axvline(summary["crossed_90"], color="gray", linestyle="--", linewidth=0.8)
    boundaries = [stage.end for stage in summary["stages"][:-1]]
    image = draw_dynamics_path(path_axes, summary["dynamics"], boundaries)
    path_axes.set_title(f"Essential dynamics: the losses of {PROBE} fixed pairs", fontsize="medium")
    path_axes.legend(loc="best", fontsize="small")
    figure.colorbar(image, ax=path_axes, label="step")
    figure.savefig(path)


def _llc_panel(axes, rows: list[dict], summary: dict, p: int) -> None:
    """The LLC, each chain's estimate, the chains' spread, the stages and the boundaries."""
    llc, spread = series(rows, "llc/mean"), series(rows, "llc/std")
    chains = sorted({key for row in rows for key in row if key.startswith("llc/chain_")})
    for index, key in enumerate(chains):
        values = series(rows, key)
        label = "each chain" if index == 0 else None
        axes.scatter(values.steps, values.values, s=6, color="0.55", zorder=2, label=label)
    low = [max(m - s, 1e-3) for m, s in zip(llc.values, spread.values, strict=True)]
    high = [m + s for m, s in zip(llc.values, spread.values, strict=True)]
    axes.fill_between(llc.steps, low, high, color="tab:blue", alpha=0.3, label="± chain std")
    axes.plot(llc.steps, llc.values, marker="o", markersize=3, color="tab:blue", label="LLC")
    shade_stages(axes, summary["stages"], labels=True)
    for index, boundary in enumerate(b for b in summary["confirmed"] if b.curve is None):
        label = "boundary confirmed online" if index == 0 else None
        axes.axvline(boundary.step, color="black", linewidth=1.0, label=label)
    if summary["crossed_90"] is not None:
        axes.plot([], [], color="gray", linestyle="--", label="test accuracy reaches 90%")
    axes.set(ylabel="LLC", yscale="log", title=f"Grokking (a + b) mod p, p = {p}")
    axes.legend(loc="lower left", fontsize="x-small", ncol=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--out", type=Path, default=Path("outputs/grokking"))
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.out, steps=args.steps)
    step, peak = result["llc_peak"]
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    if result["crossed_90"] is None:
        print(f"Test accuracy did not reach 90% (final {result['final_test_acc']:.1%}).")
    else:
        print(f"Test accuracy crossed 90% at step {result['crossed_90']}.")
    print(f"LLC: {peak:.1f} at its peak (step {step}, while memorizing),")
    print(f"     {result['llc_at_crossing']:.2f} when test accuracy crossed 90%,")
    print(
        f"     {result['llc_final']:.2f} at the end (test accuracy {result['final_test_acc']:.1%})."
    )
    print("How each signal moved (factors): while memorizing, from the LLC's peak to the end,")
    print("and across the grokking transition (test accuracy from 50% to 90%):")
    for name, (rise, fall, across) in result["moves"].items():
        print(f"{name.replace('_', ' '):>15}: x{rise:<8.3g} x{fall:<10.3g} x{across:.3g}")
    print("Stages of the LLC curve:")
    for stage in result["stages"]:
        print(f"  steps {stage.start:>5} to {stage.end:>5}: {stage.kind:8} ({stage.change:+.3g})")
    for boundary in result["confirmed"]:
        print(
            f"  boundary at step {boundary.step} ({boundary.before}, then {boundary.after})"
            f" confirmed during training, at step {boundary.confirmed_at}"
        )
    dynamics = result["dynamics"]
    shares = ", ".join(f"{share:.0%}" for share in dynamics.explained_variance)
    turns = ", ".join(map(str, dynamics.turning_points)) or "none"
    print(f"Essential dynamics (components explain {shares}): the path turns at steps {turns}.")
    print(f"Figure: {result['png']}")
    print(f"Metrics: {result['csv']}")
    print(f"W&B run: {result['wandb']}  (upload it with: wandb sync {result['wandb']})")


if __name__ == "__main__":
    main()
