"""Cost of the check that monitors and callbacks run once when training starts.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/preflight.py``

``preflight`` forks the weights and evaluates the loss once per data source, without
gradients. Its time is printed against one training step (forward, backward, SGD step) and
against one default estimate (``LLCConfig()``: 4 chains of 2,000 steps), measured in this run.
"""

import torch
from mlp import loss_fn, make_data, make_loader, trained_model
from timing import best_of

from llc_callbacks import LLCConfig, Restrictions, estimate_llc
from llc_callbacks.preflight import preflight


def main(repeats: int = 5) -> None:
    torch.manual_seed(0)
    dataset = make_data()
    model, data = trained_model(dataset), make_loader(dataset)
    batch = next(iter(data))
    optimizer = torch.optim.SGD(trained_model(dataset, steps=0).parameters(), lr=1e-4)
    copy = trained_model(dataset, steps=0)

    def training_step() -> None:
        optimizer.zero_grad()
        loss_fn(copy, batch).backward()
        optimizer.step()

    restrictions = Restrictions(weights={"first": "0.*", "last": "4.*"}, sources={"again": data})
    timings = {
        "training step": best_of(repeats, training_step),
        "check": best_of(repeats, lambda: preflight(model, loss_fn, data, LLCConfig())),
        "check, 2 weight restrictions and a source": best_of(
            repeats,
            lambda: preflight(model, loss_fn, data, LLCConfig(), restrictions=restrictions),
        ),
        "estimate": best_of(1, lambda: estimate_llc(model, loss_fn, data, warn=False)),
    }
    step, estimate = timings["training step"], timings["estimate"]
    print(f"{'':45} {'ms':>9} {'/ training step':>16} {'/ estimate':>11}")
    for name, seconds in timings.items():
        print(f"{name:45} {seconds * 1e3:9.2f} {seconds / step:16.1f} {seconds / estimate:11.4f}")


if __name__ == "__main__":
    main()
