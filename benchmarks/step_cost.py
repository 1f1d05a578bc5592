"""Cost of one SGLD step per chain relative to one plain training step of the same model.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/step_cost.py``

A training step is forward, backward and an optimizer step on one batch. A chain step is
measured inside ``estimate_llc`` as the difference between two estimates that differ only in
their number of draws, divided by the extra chain steps, so that setup and the initial loss
cancel. All batches come from memory, so data loading costs nothing on either side.

Beside the times, counts that do not drift with the machine's load, from the same two
estimates: the operators one step of all the chains dispatches (``OperatorCount``: a proxy
for CUDA launches), and the host reads per step (``HostReads``: each one a synchronisation
on CUDA), which come only with the checks every ``CHECK_EVERY`` steps.

Last, a chain step under CPU autocast (bfloat16, float16) against a float32 one: the factors
that ``LLCMonitor`` quotes when it is asked for autocast on the CPU.
"""

import argparse
import time

import torch
from mlp import BATCH_SIZE, loss_fn, make_data, trained_model
from timing import best_of

from llc_callbacks import LLCConfig, estimate_llc
from llc_callbacks.counting import HostReads, OperatorCount


def training_step_s(batch, optimizer_name: str, steps: int, repeats: int) -> float:
    model = trained_model(make_data(), steps=0)  # a fresh copy: the benchmark model stays put
    optimizer = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer_name](
        model.parameters(), lr=1e-4
    )

    def run():
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(model, batch).backward()
            optimizer.step()

    run()
    return best_of(repeats, run) / steps


SHORT, LONG = 50, 250


def estimate(
    model, batches, chains: int, paired: bool, vectorize, draws: int, compile=False, autocast=None
):
    config = LLCConfig(
        num_chains=chains,
        num_burnin=0,
        num_draws=draws,
        paired=paired,
        vectorize=vectorize,
        mala=False,  # the step itself; the MALA check adds a gradient on every tenth draw
        compile=compile,
        autocast=autocast,
    )
    return lambda: estimate_llc(model, loss_fn, batches, config, warn=False)


def chain_step_s(
    model, batches, chains: int, paired: bool, vectorize, repeats: int, compile=False, autocast=None
) -> float:
    def run(draws: int):
        return estimate(model, batches, chains, paired, vectorize, draws, compile, autocast)

    run(SHORT)()
    extra = best_of(repeats, run(LONG)) - best_of(repeats, run(SHORT))
    return extra / ((LONG - SHORT) * chains)


def counts_per_step(model, batches, chains: int, paired: bool, vectorize) -> tuple[float, float]:
    """Operators and host reads per step of all the chains: two estimates' difference."""
    found = []
    for draws in (SHORT, LONG):
        with OperatorCount() as operators, HostReads() as reads:
            estimate(model, batches, chains, paired, vectorize, draws)()
        found.append((sum(operators.counts.values()), len(reads.reads)))
    steps = LONG - SHORT
    return (found[1][0] - found[0][0]) / steps, (found[1][1] - found[0][1]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = make_data()
    model = trained_model(dataset)
    inputs, labels = dataset.tensors
    batches = [
        (inputs[i : i + BATCH_SIZE], labels[i : i + BATCH_SIZE]) for i in range(0, 2048, BATCH_SIZE)
    ]
    params = sum(p.numel() for p in model.parameters())
    print(f"MLP with {params} parameters, batch {BATCH_SIZE}, {torch.get_num_threads()} thread(s)")
    train = {name: training_step_s(batches[0], name, 200, args.repeats) for name in ("sgd", "adam")}
    for name, seconds in train.items():
        print(f"training step ({name}): {seconds * 1e3:.3f} ms")
    header = (
        "chains", "vectorize", "paired", "ms/chain step", "/ sgd step", "/ adam step",
        "operators/step", "reads/step",
    )  # fmt: skip
    widths = (6, 9, 6, 14, 10, 11, 15, 11)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for chains in (1, 4, 8, 16):
        for vectorize in ("auto", False):
            for paired in (True, False):
                seconds = chain_step_s(model, batches, chains, paired, vectorize, args.repeats)
                operators, reads = counts_per_step(model, batches, chains, paired, vectorize)
                print(
                    f"{chains:>6} {vectorize!s:>9} {paired!s:>6} {seconds * 1e3:>14.3f}"
                    f" {seconds / train['sgd']:>10.2f} {seconds / train['adam']:>11.2f}"
                    f" {operators:>15.1f} {reads:>11.3f}"
                )
    for chains in (4, 16):
        compiled_costs(model, batches, chains, args.repeats)
    cpu_autocast_costs(model, batches, args.repeats)


def compiled_costs(model, batches, chains: int, repeats: int) -> None:
    """What ``compile=True`` costs once (its first estimate) and saves per chain step."""
    start = time.perf_counter()
    estimate(model, batches, chains, True, True, SHORT, compile=True)()
    first = time.perf_counter() - start
    plain_first = best_of(repeats, estimate(model, batches, chains, True, True, SHORT))
    compiled = chain_step_s(model, batches, chains, True, True, repeats, compile=True)
    plain = chain_step_s(model, batches, chains, True, True, repeats)
    print(
        f"compile=True, {chains} chains: first estimate {first:.1f} s ({plain_first:.2f} s"
        f" uncompiled); then {compiled * 1e3:.3f} ms per chain step against {plain * 1e3:.3f}"
    )


def cpu_autocast_costs(model, batches, repeats: int) -> None:
    """A chain step under CPU autocast against a float32 one (the factor ``LLCMonitor`` quotes)."""
    plain = chain_step_s(model, batches, 4, True, "auto", repeats)
    for dtype in ("bfloat16", "float16"):
        mixed = chain_step_s(model, batches, 4, True, "auto", repeats, autocast=dtype)
        print(
            f"autocast={dtype!r} on CPU, 4 chains: {mixed * 1e3:.3f} ms per chain step against"
            f" {plain * 1e3:.3f} in float32, {mixed / plain:.1f}x"
        )


if __name__ == "__main__":
    main()
