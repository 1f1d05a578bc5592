"""Cost of recording observables (per-example losses on the draws) against the plain estimate.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/observables.py``

On the trained MLP of ``mlp.py`` (minibatches of 256), ``LLCConfig.fast()`` (4 chains,
200 + 200 steps), with a probe set of 256 training examples recorded on every draw and on
every tenth, against the same estimate without observables, in this run (best of 3).
"""

import torch
from mlp import loss_fn, make_data, make_loader, trained_model
from timing import best_of
from torch.utils.data import DataLoader, Subset

from llc_callbacks import LLCConfig, estimate_llc


def main(repeats: int = 3) -> None:
    torch.manual_seed(0)
    dataset = make_data()
    model, data = trained_model(dataset), make_loader(dataset)
    probe = DataLoader(Subset(dataset, range(256)), batch_size=256)
    plain = best_of(
        repeats, lambda: estimate_llc(model, loss_fn, data, LLCConfig.fast(), warn=False)
    )
    print(f"plain estimate: {plain:.2f} s")
    for every in (1, 10):
        config = LLCConfig.fast(observe_every=every)
        seconds = best_of(
            repeats,
            lambda c=config: estimate_llc(
                model, loss_fn, data, c, warn=False, observables={"probe": probe}
            ),
        )
        records = config.observed_draws
        print(
            f"observables on every {every:2d} draw(s) ({records} records of 256 examples):"
            f" {seconds:.2f} s, {seconds / plain:.2f}x the plain estimate"
        )


if __name__ == "__main__":
    main()
