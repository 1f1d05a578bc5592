"""What an estimate costs along a training run, and how right it is: ``LLCConfig.accurate()``
(the defaults until streaming curves) against the old behaviour (cold chains, a fixed step
size, ``localization=1``, fixed lengths), in training steps of the same batch timed in the
same run.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/cost.py [--sizes 99 825 5400 11900] [--mlp]``

Deep linear networks (``benchmarks/accuracy.py``'s, unit noise, ``n = 20,000``, batches of
500) moved along their set of true parameters: between layers ``j`` and ``j + 1`` the weights
become ``W_{j+1} G_j^{-1}`` and ``G_j W_j``, with ``G_j = exp(s A_j)`` drifting away from the
identity as ``s`` grows. The function, and so λ, stay the same; the curvature the chains meet
changes (by up to e^2 across the trajectory). A monitor estimates at each point, as in
training. Per estimate: the estimate, its error against λ, the mean burn-in and draws per
chain, whether the chains started warm, and the estimate's time over one SGD step (forward,
backward, update) of the same batch size on the same model, timed in this run; and the
chain steps of the first and later estimates against the old ones', a count that does not
drift with the machine's load.

``--mlp``: the MLP of ``mlp.py`` (hidden width 32) over its own Adam training, estimated at
5 points with the defaults (warm-started) and with long cold chains (8 chains x (2,000 +
8,000) steps at the step size ``calibrate`` chooses), which serve as the reference.
"""

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
from mlp import BATCH_SIZE, loss_fn, make_data, make_loader, make_model
from torch import nn
from torch.utils.data import DataLoader

from llc_callbacks import LLCConfig, LLCMonitor, calibrate, estimate_llc
from llc_callbacks.theory import (
    deep_linear_network,
    dln_learning_coefficient,
    gaussian_nll,
    regression_data,
)

SAMPLES, DLN_BATCH = 20_000, 500
# Parameters -> (widths, rank).
DLNS = {
    99: ([6, 5, 5, 4, 6], 1),
    825: ([20, 15, 15, 20], 5),
    5400: ([40, 60, 30, 40], 10),
    11900: ([50, 70, 70, 50], 10),
}
POINTS, DRIFT = 8, 0.12
OLD = LLCConfig(step_size=2e-4, localization=1.0, relative_error=None, warm_start=False)


def sgd_step_seconds(model: nn.Module, loss, batch, repeats: int = 200) -> float:
    """The mean time of one SGD training step (forward, backward, update) on ``batch``."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    start = time.perf_counter()
    for _ in range(repeats):
        optimizer.zero_grad()
        loss(model, batch).backward()
        optimizer.step()
    return (time.perf_counter() - start) / repeats


def drifted(model: nn.Sequential, generators: list[torch.Tensor], s: float) -> nn.Sequential:
    """The same function, other weights: ``W_{j+1} G_j^-1`` and ``G_j W_j``, ``G_j = e^(s A_j)``."""
    layers = [layer for layer in model if isinstance(layer, nn.Linear)]
    weights = [layer.weight.detach().clone() for layer in layers]
    for j, a in enumerate(generators):
        g = torch.linalg.matrix_exp(s * a)
        weights[j] = g @ weights[j]
        weights[j + 1] = weights[j + 1] @ torch.linalg.inv(g)
    moved = deep_linear_network([layers[0].in_features, *[w.shape[0] for w in weights]], 1)
    with torch.no_grad():
        for layer, w in zip((m for m in moved if isinstance(m, nn.Linear)), weights, strict=True):
            layer.weight.copy_(w)
    return moved


def trajectory(size: int) -> None:
    widths, rank = DLNS[size]
    torch.manual_seed(0)
    model = deep_linear_network(widths, rank)
    loader = DataLoader(
        regression_data(model, widths[0], widths[-1], SAMPLES), batch_size=DLN_BATCH, shuffle=True
    )
    truth = dln_learning_coefficient(widths, rank)
    generators = [torch.randn(h, h) / h**0.5 for h in widths[1:-1]]
    step = sgd_step_seconds(model, gaussian_nll, next(iter(loader)))
    print(
        f"\nDLN {widths} rank {rank}: {size} weights, λ = {truth:g}, SGD step {step * 1e3:.2f} ms"
    )
    print(
        f"{'point':>5} {'setting':>8} {'estimate':>9} {'error':>7} {'burn-in':>8} {'draws':>6}"
        f" {'warm':>5} {'steps':>8}  health"
    )
    costs, chain_steps = {}, {}
    for name, config in (("default", LLCConfig.accurate()), ("old", OLD)):
        monitor = LLCMonitor(config, every_n_steps=1, stream=False)
        for point in range(POINTS):
            moved = drifted(model, generators, DRIFT * point)
            start = time.perf_counter()
            monitor.estimate(point, moved, gaussian_nll, loader)
            seconds = time.perf_counter() - start
            result = monitor.last_result
            costs.setdefault(name, []).append(seconds / step)
            chain_steps.setdefault(name, []).append(int((result.burnin + result.draws).sum()))
            print(
                f"{point:5d} {name:>8} {result.llc_mean:9.1f} {result.llc_mean / truth - 1:+7.1%}"
                f" {result.burnin.mean():8.0f} {result.draws.mean():6.0f} {result.warm!s:>5}"
                f" {seconds / step:8,.0f}  {','.join(result.problems()) or '-'}",
                flush=True,
            )
    for unit, counts in (("training steps", costs), ("chain steps", chain_steps)):
        default, old = np.array(counts["default"]), np.array(counts["old"])
        print(
            f"in {unit}: the first estimate {default[0] / old[0]:.2f} of the old one;"
            f" later ones {default[1:].mean() / old[1:].mean():.2f} on average"
            f" ({default[1:].mean():,.0f} against {old[1:].mean():,.0f})"
        )


def mlp() -> None:
    dataset = make_data()
    loader = make_loader(dataset)
    torch.manual_seed(0)
    model = make_model(32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    step = sgd_step_seconds(model, loss_fn, next(iter(loader)))
    monitor = LLCMonitor(LLCConfig.accurate(), every_n_steps=1, stream=False)
    inputs, labels = dataset.tensors
    print(f"\nMLP 32-32-32-10, SGD step {step * 1e3:.2f} ms")
    print(f"{'step':>5} {'default':>9} {'steps':>7} {'reference':>10} {'difference':>10}")
    trained = 0
    for steps in (50, 150, 300, 600, 1200):
        for _ in range(steps - trained):
            index = torch.randint(0, len(inputs), (BATCH_SIZE,))
            optimizer.zero_grad()
            loss_fn(model, (inputs[index], labels[index])).backward()
            optimizer.step()
        trained = steps
        start = time.perf_counter()
        monitor.estimate(steps, model, loss_fn, loader)
        seconds = time.perf_counter() - start
        result = monitor.last_result
        base = LLCConfig.accurate(
            num_chains=8, num_burnin=2000, num_draws=8000, relative_error=None
        )
        chosen = calibrate(
            model, loss_fn, loader, LLCConfig.accurate(num_chains=4)
        ).chosen_step_size()
        reference = estimate_llc(
            model, loss_fn, loader, dataclasses.replace(base, step_size=chosen), warn=False
        )
        print(
            f"{steps:5d} {result.llc_mean:9.2f} {seconds / step:7,.0f}"
            f" {reference.llc_mean:10.2f} {result.llc_mean / reference.llc_mean - 1:+10.1%}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, choices=sorted(DLNS), default=[99, 825])
    parser.add_argument("--mlp", action="store_true", help="also the MLP over its training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for size in args.sizes:
        trajectory(size)
    if args.mlp:
        mlp()


if __name__ == "__main__":
    main()
