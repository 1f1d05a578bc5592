"""Streaming LLC curves against long cold chains at the same weights, and what each curve costs.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/curves.py [--quick] [--runs mlp grokking dln]
[--set localization=50] [--max-overhead 0.5]`` (about 17 minutes; ``--quick``: shorter runs
and chains, about 2 minutes; ``--set``: change every run's config, as ``LLCConfig(...)``)

Three training runs on data made in code, each in one process, on one thread:

- ``mlp``: an MLP 64 → 64 → 64 → 10 (ReLU, 8,970 weights) on 8,192 Gaussian inputs labelled
  by a random teacher, cross-entropy, Adam (lr 1e-3), batches of 64; 6,000 steps, a reading
  every 300. Default ``LLCConfig()``.
- ``grokking``: the network of ``examples/grokking.py`` (p = 59, width 128, 31,675 weights)
  on 30% of the pairs, AdamW (lr 1e-3, weight decay 1), batches of 512 drawn with
  replacement; 12,000 steps, as ``make demo`` (memorization, then grokking), readings at 11
  chosen steps. Default ``LLCConfig()`` (at ``LLCConfig.accurate()``'s localization, 5, the
  chains leave this network's basin: see the example's docstring). The readings sample
  batches of 256 training pairs, to halve the long chains' time.
- ``dln``: a deep linear network 10 → 20 → 20 → 10 (800 weights) trained by SGD (lr 0.01 / 3,
  batches of 64) from weights of std 0.01 on ``y = T x + 0.5 N(0, I)``, ``T`` of singular
  values 5, 3, 1.5, 0.8, with the squared error ``gaussian_nll`` (0.5 x the summed squared
  error, the loss of ``llc_callbacks.theory``): its loss falls in stages, near steps 1,200,
  2,700 and 5,500 of its 6,000; a reading every 300. Default ``LLCConfig()``.

Each run trains, in this order and on the same initialization and batches: without a monitor;
with ``LLCMonitor(config, stream=True)`` (``max_overhead`` the default, ``"auto"``: 0.35;
``--max-overhead`` changes it) on the schedule above, keeping the weights at every reading;
without a monitor; with ``stream=False`` (a warm-started snapshot estimate at every scheduled
step, the behaviour before streaming); without a monitor. The time without a monitor is the
median of its three runs. After training, at each reading's weights: long cold chains, 4 x
(2,000 burn-in + 4,000 draws) at the reading's step size (the chains' geometric mean,
``llc/step_size``) and localization.

Per reading: the streaming reading with its standard error (chain std / sqrt(chains)), step
size, burn-in steps and draws per chain, whether it tuned, whether it was healthy, its cost in
training steps (its seconds over the plain run's seconds per step); the long chains with their
standard error, the reading over them (``ratio``) and the difference in combined standard
errors (``z``); the snapshot estimate with its step size, cost and ratio to the same long
chains (which ran at the streaming reading's step size, not the snapshot's). Per run: each
monitored run's overhead, ``(seconds with - seconds without) / seconds without``, also in
training steps; the first reading's cost and the later readings' share of the training time
between readings (what ``max_overhead`` paces); the largest ``|ratio - 1|`` after the first
tenth of training and the share of those readings within 10% and 15%; each distinct warning the
monitors raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llc_callbacks import LLCConfig, LLCMonitor, estimate_llc
from llc_callbacks.theory import gaussian_nll

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from grokking import ModularAddition, datasets

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
LONG, QUICK_LONG = (2000, 4000), (200, 400)  # the long chains' burn-in and draws
LONG_SEED, DATA_SEED = 1234, 7
MAX_OVERHEAD = "auto"  # the streaming monitor's share of the training time: the default


class Batches:
    """Minibatches of in-memory tensors, reshuffled on every pass by their own generator."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = DATA_SEED) -> None:
        self.tensors = tensors
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Batch]:
        order = torch.randperm(len(self.tensors[0]), generator=self.generator)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            index = order[start : start + self.batch_size]
            yield tuple(t[index] for t in self.tensors)


@dataclass
class Setup:
    """One run's model, optimizer, training batches and the monitor's data, made afresh."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    next_batch: Callable[[], Batch]
    data: Batches


@dataclass(frozen=True)
class Run:
    """A training run: how to build it, how long it trains and when it is read."""

    name: str
    title: str
    build: Callable[[], Setup]
    loss: LossFn
    steps: int
    schedule: dict[str, Any]  # LLCMonitor's schedule arguments
    config: LLCConfig


@dataclass
class Reading:
    """One monitor reading: its metrics, its cost, and the weights it read."""

    step: int
    mean: float
    stderr: float
    step_size: float
    burnin: float
    draws: float
    tuned: bool
    healthy: bool
    seconds: float
    problems: str
    weights: dict[str, torch.Tensor] | None = None


@dataclass
class Trace:
    """A training run's wall time (copies of the weights left out), readings, end weights."""

    seconds: float
    readings: list[Reading] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    warned: dict[str, int] = field(default_factory=dict)


def sampler(inputs: torch.Tensor, targets: torch.Tensor, size: int) -> Callable[[], Batch]:
    """Training batches drawn with replacement by a generator of their own (seed 0)."""
    generator = torch.Generator().manual_seed(0)

    def next_batch() -> Batch:
        index = torch.randint(0, len(inputs), (size,), generator=generator)
        return inputs[index], targets[index]

    return next_batch


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def build_mlp() -> Setup:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8192, 64, generator=generator)
    teacher = torch.randn(64, 10, generator=generator)
    labels = torch.tanh(inputs @ teacher).argmax(dim=1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Setup(
        model, optimizer, sampler(inputs, labels, 64), Batches(inputs, labels, batch_size=64)
    )


def build_grokking() -> Setup:
    train, _ = datasets(59, train_fraction=0.3)
    pairs, sums = train.tensors
    torch.manual_seed(0)
    model = ModularAddition(59)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    return Setup(model, optimizer, sampler(pairs, sums, 512), Batches(pairs, sums, batch_size=256))


def build_dln() -> Setup:
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(10, 10, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(10, 10, generator=generator))
    teacher = left @ torch.diag(torch.tensor([5.0, 3.0, 1.5, 0.8] + [0.0] * 6)) @ right.T
    inputs = torch.randn(8192, 10, generator=generator)
    targets = inputs @ teacher.T + 0.5 * torch.randn(8192, 10, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(
        *(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise([10, 20, 20, 10]))
    )
    with torch.no_grad():
        for layer in model:
            layer.weight.normal_(0.0, 0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 / 3)
    return Setup(
        model, optimizer, sampler(inputs, targets, 64), Batches(inputs, targets, batch_size=64)
    )


GROKKING_STEPS = (100, 250, 500, 1000, 2000, 3000, 4500, 6000, 8000, 10000, 12000)


def runs(quick: bool) -> dict[str, Run]:
    """The runs, shortened with ``quick``."""
    steps = 1800 if quick else 6000
    grokking = GROKKING_STEPS[:4] if quick else GROKKING_STEPS
    return {
        "mlp": Run(
            "mlp",
            "MLP 64-64-64-10 (8,970 weights), Adam, batches of 64",
            build_mlp,
            cross_entropy,
            steps,
            {"every_n_steps": 300},
            LLCConfig(),
        ),
        "grokking": Run(
            "grokking",
            "grokking MLP, p = 59 (31,675 weights), AdamW, batches of 512",
            build_grokking,
            cross_entropy,
            grokking[-1],
            {"steps": grokking},
            LLCConfig(),
        ),
        "dln": Run(
            "dln",
            "deep linear network 10-20-20-10 (800 weights) from small init, SGD, batches of 64",
            build_dln,
            gaussian_nll,
            steps,
            {"every_n_steps": 300},
            LLCConfig(),
        ),
    }


def copied(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def reading(step: int, metrics: dict[str, float], monitor: LLCMonitor, seconds: float) -> Reading:
    result = monitor.last_result
    chains = monitor.config.num_chains
    return Reading(
        step=step,
        mean=metrics["llc/mean"],
        stderr=metrics["llc/std"] / math.sqrt(chains),
        step_size=result.diagnostics.get("step_size", math.nan) if result is not None else math.nan,
        burnin=float(result.burnin.mean()) if result is not None else math.nan,
        draws=float(result.draws.mean()) if result is not None else math.nan,
        tuned=bool(metrics.get("llc/tuned", 0.0)),
        healthy=bool(metrics.get("llc/healthy", 0.0)),
        seconds=seconds,
        problems=",".join(result.problems()) if result is not None else "failed",
    )


def train(run: Run, monitor: LLCMonitor | None, keep: bool = False) -> Trace:
    """Train ``run`` once, reading it with ``monitor``; ``keep``: copy the weights read."""
    setup = run.build()
    trace = Trace(seconds=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        copying = _loop(run, setup, monitor, trace, keep)
        trace.seconds = time.perf_counter() - start - copying
    for warning in caught:
        message = str(warning.message)
        trace.warned[message] = trace.warned.get(message, 0) + 1
    trace.weights = copied(setup.model)
    return trace


def _loop(run: Run, setup: Setup, monitor: LLCMonitor | None, trace: Trace, keep: bool) -> float:
    """The training loop of ``train``; the seconds spent copying weights."""
    model, optimizer = setup.model, setup.optimizer
    copying = 0.0
    for step in range(1, run.steps + 1):
        optimizer.zero_grad()
        run.loss(model, setup.next_batch()).backward()
        optimizer.step()
        if monitor is None:
            continue
        began = time.perf_counter()
        metrics = monitor.maybe_estimate(step, model, run.loss, setup.data)
        if metrics:
            trace.readings.append(reading(step, metrics, monitor, time.perf_counter() - began))
            if keep:
                began = time.perf_counter()
                trace.readings[-1].weights = copied(model)
                copying += time.perf_counter() - began
    return copying


def long_chains(
    run: Run, weights: dict[str, torch.Tensor], step_size: float, lengths: tuple[int, int]
) -> tuple[float, float, str]:
    """The long cold chains' mean and standard error at ``weights``, at ``step_size``."""
    if not math.isfinite(step_size):
        return math.nan, math.nan, "no step size"
    setup = run.build()
    setup.model.load_state_dict(weights)
    config = dataclasses.replace(
        run.config,
        num_chains=4,
        step_size=step_size,
        num_burnin=lengths[0],
        num_draws=lengths[1],
        relative_error=None,
        seed=LONG_SEED,
    )
    result = estimate_llc(setup.model, run.loss, setup.data, config, warn=False)
    stderr = result.llc_std / math.sqrt(config.num_chains)
    return result.llc_mean, stderr, ",".join(result.problems()) or "-"


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def overhead(seconds: float, plain: float, per_step: float) -> str:
    extra = seconds - plain
    return (
        f"{seconds:.1f} s, overhead {extra / plain:+.0%} = {extra / per_step:,.0f} training steps"
    )


HEADER = (
    f"{'step':>5} {'stream':>8} {'±se':>6} {'ε':>8} {'burn':>4} {'draws':>5} {'tuned':>5}"
    f" {'ok':>3}"
    f" {'cost':>7} | {'long':>8} {'±se':>6} {'ratio':>6} {'z':>5} | {'snapshot':>8} {'±se':>6}"
    f" {'ε':>8} {'cost':>7} {'/long':>6} | problems (stream; long)"
)


def compare(
    run: Run, streamed: Trace, snapshots: Trace, per_step: float, lengths: tuple[int, int]
) -> list[tuple[int, float]]:
    """Print a row per reading, with long chains at its weights; ``(step, ratio)`` pairs."""
    print(HEADER)
    ratios = []
    for read, snap in zip(streamed.readings, snapshots.readings, strict=True):
        long_mean, long_se, long_problems = long_chains(run, read.weights, read.step_size, lengths)
        ratios.append((read.step, read.mean / long_mean))
        tuned, healthy = "yes" if read.tuned else "", "yes" if read.healthy else "no"
        print(
            f"{read.step:5d} {read.mean:8.2f} {read.stderr:6.2f} {read.step_size:8.2e}"
            f" {read.burnin:4.0f} {read.draws:5.0f} {tuned:>5} {healthy:>3}"
            f" {read.seconds / per_step:7,.0f} |"
            f" {long_mean:8.2f} {long_se:6.2f} {read.mean / long_mean:6.3f}"
            f" {(read.mean - long_mean) / math.hypot(read.stderr, long_se):5.1f} |"
            f" {snap.mean:8.2f} {snap.stderr:6.2f} {snap.step_size:8.2e}"
            f" {snap.seconds / per_step:7,.0f} {snap.mean / long_mean:6.3f}"
            f" | {read.problems or '-'}; {long_problems}",
            flush=True,
        )
    return ratios


def warned(name: str, trace: Trace) -> None:
    """Print each distinct warning of a monitored run, shortened, with its count."""
    for message, count in trace.warned.items():
        print(f"warned ({name}, x{count}): {message[:150]}{'...' if len(message) > 150 else ''}")


def measure(run: Run, lengths: tuple[int, int], max_overhead: float | str) -> dict[str, float]:
    """Train, read, compare; print the run's table and summary; return the summary."""
    began = time.perf_counter()
    print(f"\n## {run.name}: {run.title}; {run.steps} steps, readings at {run.schedule}")
    plains = [train(run, None)]
    streamed = train(
        run, LLCMonitor(run.config, **run.schedule, stream=True, max_overhead=max_overhead), True
    )
    plains.append(train(run, None))
    snapshots = train(run, LLCMonitor(run.config, **run.schedule, stream=False))
    plains.append(train(run, None))
    plain = sorted(trace.seconds for trace in plains)[1]
    per_step = plain / run.steps
    ratios = compare(run, streamed, snapshots, per_step, lengths)
    warned("stream", streamed)
    warned("snapshot", snapshots)
    ends = {
        name: same(plains[0].weights, t.weights)
        for name, t in (("stream", streamed), ("snapshot", snapshots))
    }
    print(
        f"plain: {', '.join(f'{t.seconds:.2f}' for t in plains)} s, median {per_step * 1e3:.2f} ms"
        f" a step; end weights the plain run's: {ends}"
    )
    summary = {
        "stream": streamed.seconds / plain - 1,
        "snapshot": snapshots.seconds / plain - 1,
        "first": streamed.readings[0].seconds / per_step,
        "paced": sum(r.seconds for r in streamed.readings[1:])
        / (streamed.seconds - sum(r.seconds for r in streamed.readings)),
        **agreement([ratio for step, ratio in ratios if step > run.steps / 10]),
    }
    print(
        f"stream:   {overhead(streamed.seconds, plain, per_step)}; the first reading"
        f" {summary['first']:,.0f} steps, the later ones {summary['paced']:.0%} of the training"
        " time between readings"
    )
    print(f"snapshot: {overhead(snapshots.seconds, plain, per_step)}")
    print(
        f"after step {run.steps // 10}: {summary['count']:.0f} readings, max |ratio - 1|"
        f" {summary['worst']:.1%}, within 10%: {summary['within_10']:.0%}, within 15%:"
        f" {summary['within_15']:.0%}; this run took {time.perf_counter() - began:.0f} s",
        flush=True,
    )
    return summary


def agreement(ratios: list[float]) -> dict[str, float]:
    """How far ``ratios`` stray from 1: their count, the largest ``|r - 1|``, shares within."""
    errors = [abs(ratio - 1) for ratio in ratios]

    def within(bound: float) -> float:
        return sum(e <= bound for e in errors) / len(errors) if errors else math.nan

    return {
        "count": len(errors),
        "worst": max(errors, default=math.nan),
        "within_10": within(0.10),
        "within_15": within(0.15),
    }


def change(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` as a config change: the value a number where it reads as one."""
    name, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def share(text: str) -> float | str:
    """A ``--max-overhead`` value: ``auto`` or a number."""
    return text if text == "auto" else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs and chains (2 min)")
    parser.add_argument("--runs", nargs="+", choices=("mlp", "grokking", "dln"), default=None)
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE", help="change every run's config"
    )
    parser.add_argument("--max-overhead", type=share, default=MAX_OVERHEAD)
    args = parser.parse_args()
    torch.set_num_threads(1)
    changes = dict(change(text) for text in args.set)
    chosen = {
        name: dataclasses.replace(run, config=dataclasses.replace(run.config, **changes))
        for name, run in runs(args.quick).items()
    }
    lengths = QUICK_LONG if args.quick else LONG
    print(
        f"long chains: 4 x ({lengths[0]:,} + {lengths[1]:,}) steps; stream:"
        f" max_overhead={args.max_overhead}; config changes: {changes or 'none'}"
    )
    start = time.perf_counter()
    summaries = {
        name: measure(chosen[name], lengths, args.max_overhead) for name in args.runs or chosen
    }
    print("\n## summary (overhead against the run without a monitor, in the same process)")
    print(
        f"{'run':>9} {'stream':>8} {'snapshot':>9} {'first':>7} {'later/train':>11} {'max|r-1|':>9}"
        f" {'≤10%':>5} {'≤15%':>5}"
    )
    for name, s in summaries.items():
        print(
            f"{name:>9} {s['stream']:+8.0%} {s['snapshot']:+9.0%} {s['first']:7,.0f}"
            f" {s['paced']:11.0%}"
            f" {s['worst']:9.1%} {s['within_10']:5.0%} {s['within_15']:5.0%}"
        )
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
