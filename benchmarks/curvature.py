"""Cost of the curvature measured next to the LLC, against one LLC estimate.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/curvature.py``

On the trained MLP of ``mlp.py``, each quantity of ``llc_callbacks.curvature`` (with its
defaults: 16 Hutchinson probes, 64 per-example gradients, 20 power iterations) is timed
against one estimate with ``LLCConfig()`` and with ``LLCConfig.fast()``, in this run.
"""

import torch
from mlp import loss_fn, make_data, make_loader, trained_model
from timing import best_of

from llc_callbacks import LLCConfig, estimate_llc
from llc_callbacks.curvature import CURVATURES, estimate_curvature


def main(repeats: int = 3) -> None:
    torch.manual_seed(0)
    dataset = make_data()
    model, data = trained_model(dataset), make_loader(dataset)
    estimates = {
        "LLCConfig()": best_of(1, lambda: estimate_llc(model, loss_fn, data, warn=False)),
        "LLCConfig.fast()": best_of(
            repeats, lambda: estimate_llc(model, loss_fn, data, LLCConfig.fast(), warn=False)
        ),
    }
    timings = {
        name: best_of(repeats, lambda name=name: estimate_curvature(model, loss_fn, data, [name]))
        for name in CURVATURES
    }
    print(f"{'':16} {'s':>8}" + "".join(f" {'/ ' + name:>20}" for name in estimates))
    for name, seconds in {**timings, **estimates}.items():
        ratios = "".join(f" {seconds / estimate:20.4f}" for estimate in estimates.values())
        print(f"{name:16} {seconds:8.3f}{ratios}")


if __name__ == "__main__":
    main()
