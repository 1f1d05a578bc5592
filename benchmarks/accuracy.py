"""LLC estimates against the known learning coefficients of deep linear networks.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/accuracy.py [--sizes small|large|all]
[--settings default fixed calibrated fast] [--step-sizes ...]``

Each model is a deep linear network ``W_L ... W_1 x`` (reduced-rank regression for two
layers) at a teacher of rank ``r``, with data ``y = teacher(x) + N(0, I)`` (unit noise,
``n = 20,000``) and the per-example negative log-likelihood
``0.5 * ((f(x) - y) ** 2).sum(-1).mean()``, for which Aoyagi's formula gives λ
(``llc_callbacks.theory``). Every setting is printed with its estimate, the chain spread,
the relative error, the MALA acceptance, the failed checks, the chain steps per chain and the
wall time, measured in this run. ``default`` is ``LLCConfig()`` (a cold estimate: adapted step
sizes, settled burn-ins, draws until 5% precision); ``fixed`` the defaults before adaptation
(``step_size=2e-4``, ``localization=1``, 1,000 + 1,000 steps); ``calibrated`` the offline
sweep ``calibrate``, whose chosen row is the estimate, and the whole sweep's time.
"""

import argparse
import dataclasses
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from llc_callbacks import LLCConfig, LLCResult, calibrate, estimate_llc
from llc_callbacks.theory import (
    deep_linear_network,
    dln_learning_coefficient,
    gaussian_nll,
    regression_data,
)

SAMPLES, BATCH_SIZE = 20_000, 500
# (widths H_1..H_{L+1}, rank): from 30 to 100,000 parameters.
SMALL = [([5, 3, 5], 2), ([3, 6, 6, 3], 1), ([6, 5, 5, 4, 6], 1)]
LARGE = [
    ([20, 15, 15, 20], 5),
    ([40, 60, 30, 40], 10),
    ([100, 150, 150, 100], 20),
    ([150, 200, 200, 150], 30),
]
MODELS = {"small": SMALL, "large": LARGE, "all": SMALL + LARGE}
FIXED = LLCConfig(step_size=2e-4, localization=1.0, relative_error=None)
SETTINGS = {
    "default": LLCConfig(),
    "fixed": FIXED,
    "calibrated": FIXED,
    "fast": LLCConfig.fast(),
}


def data(model: nn.Sequential, widths: list[int]) -> DataLoader:
    dataset = regression_data(model, widths[0], widths[-1], SAMPLES)
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)


def estimate(
    model: nn.Module, loader: DataLoader, config: LLCConfig, calibrated: bool
) -> tuple[float, float, str]:
    """The estimate's mean, std and what to print about its setting and health."""
    if calibrated:
        calibration = calibrate(model, gaussian_nll, loader, config)
        chosen = calibration.chosen_step_size()
        row = next(r for r in reversed(calibration.rows) if r["step_size"] == chosen)
        acceptance, problems = row["mala_acceptance"], row["problems"]
        mean, std, step_size = row["llc_mean"], row["llc_std"], chosen
        steps = row["burnin"] + row["draws"]
    else:
        result: LLCResult = estimate_llc(model, gaussian_nll, loader, config, warn=False)
        acceptance = result.diagnostics.get("mala_acceptance", float("nan"))
        problems = list(result.problems())
        mean, std = result.llc_mean, result.llc_std
        step_size = result.diagnostics["step_size"]
        steps = result.diagnostics["burnin"] + result.diagnostics["draws"]
    health = f"ε={step_size:.2g} acc={acceptance:.2f} steps={steps:.0f}"
    return mean, std, f"{health} {','.join(problems) or '-'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=sorted(MODELS), default="small")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument(
        "--step-sizes", nargs="+", type=float, help="also the default at these step sizes"
    )
    args = parser.parse_args()
    settings = {name: SETTINGS[name] for name in args.settings}
    for step_size in args.step_sizes or ():
        settings[f"fixed ε={step_size:g}"] = dataclasses.replace(FIXED, step_size=step_size)
    print(
        f"{'widths':>20} {'r':>3} {'params':>6} {'λ':>7} {'setting':>17}"
        f" {'estimate':>17} {'error':>6} {'s':>6}  health"
    )
    for widths, rank in MODELS[args.sizes]:
        torch.manual_seed(0)
        model = deep_linear_network(widths, rank)
        loader = data(model, widths)
        truth = dln_learning_coefficient(widths, rank)
        params = sum(p.numel() for p in model.parameters())
        for name, config in settings.items():
            start = time.perf_counter()
            mean, std, health = estimate(model, loader, config, name == "calibrated")
            seconds = time.perf_counter() - start
            print(
                f"{widths!s:>20} {rank:3d} {params:6d} {truth:7.1f} {name:>17}"
                f" {mean:8.1f} ± {std:6.1f} {mean / truth - 1:+6.0%} {seconds:6.0f}  {health}",
                flush=True,
            )


if __name__ == "__main__":
    main()
