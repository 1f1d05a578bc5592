"""LLC estimates against the known learning coefficients of deep linear networks.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/accuracy.py [--sizes small|all] [--settings ...]``

Each model is a deep linear network ``W_L ... W_1 x`` (reduced-rank regression for two
layers) at a teacher of rank ``r``, with data ``y = teacher(x) + N(0, I)`` (unit noise,
``n = 20,000``) and the per-example negative log-likelihood
``0.5 * ((f(x) - y) ** 2).sum(-1).mean()``, for which Aoyagi's formula gives λ
(``llc_callbacks.theory``). Every setting is printed with its estimate, the chain spread,
the relative error and the wall time, measured in this run.
"""

import argparse
import dataclasses
import itertools
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks import LLCConfig, estimate_llc
from llc_callbacks.theory import dln_learning_coefficient

SAMPLES, BATCH_SIZE = 20_000, 500
# (widths H_1..H_{L+1}, rank): about 10^2, 10^3, 10^4 and 10^5 parameters.
MODELS = {
    "small": [([5, 3, 5], 2), ([3, 6, 6, 3], 1), ([6, 5, 5, 4, 6], 1)],
    "large": [([20, 15, 15, 20], 5), ([40, 60, 30, 40], 10), ([100, 150, 150, 100], 20)],
    "all": [
        ([5, 3, 5], 2),
        ([3, 6, 6, 3], 1),
        ([6, 5, 5, 4, 6], 1),
        ([20, 15, 15, 20], 5),
        ([40, 60, 30, 40], 10),
        ([100, 150, 150, 100], 20),
    ],
}
SETTINGS = {
    "default": LLCConfig(),
    "weak_localization": LLCConfig(
        localization=1.0, step_size=5e-4, num_burnin=500, num_draws=1500
    ),
}


def deep_linear(widths: list[int], rank: int, seed: int = 0) -> nn.Module:
    """The network at a teacher whose product has rank ``rank``."""
    generator = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(widths)]
    with torch.no_grad():
        for index, layer in enumerate(layers):
            weight = torch.randn(layer.weight.shape, generator=generator) / layer.in_features**0.5
            if index == 0:
                weight[rank:] = 0  # the first layer's rank bounds the product's
            layer.weight.copy_(weight)
    return nn.Sequential(*layers)


def nll(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return 0.5 * ((model(inputs) - targets) ** 2).sum(-1).mean()


def data(model: nn.Module, inputs: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, inputs, generator=generator)
    with torch.no_grad():
        y = model(x) + torch.randn(SAMPLES, model[-1].out_features, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=sorted(MODELS), default="small")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument(
        "--step-sizes", nargs="+", type=float, help="also each setting at these step sizes"
    )
    args = parser.parse_args()
    settings = {name: SETTINGS[name] for name in args.settings}
    for name in args.settings:
        for step_size in args.step_sizes or ():
            changed = dataclasses.replace(SETTINGS[name], step_size=step_size)
            settings[f"{name} ε={step_size:g}"] = changed
    print(
        f"{'widths':>22} {'r':>3} {'params':>7} {'λ':>8} {'setting':>26}"
        f" {'estimate':>16} {'error':>7} {'s':>7}"
    )
    for widths, rank in MODELS[args.sizes]:
        torch.manual_seed(0)
        model = deep_linear(widths, rank)
        loader = data(model, widths[0])
        truth = dln_learning_coefficient(widths, rank)
        params = sum(p.numel() for p in model.parameters())
        for name, config in settings.items():
            start = time.perf_counter()
            result = estimate_llc(model, nll, loader, config, warn=False)
            seconds = time.perf_counter() - start
            error = result.llc_mean / truth - 1
            print(
                f"{widths!s:>22} {rank:3d} {params:7d} {truth:8.2f} {name:>26}"
                f" {result.llc_mean:8.2f} ± {result.llc_std:5.2f} {error:+7.0%} {seconds:7.1f}"
            )


if __name__ == "__main__":
    main()
