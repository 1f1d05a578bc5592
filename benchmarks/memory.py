"""Extra peak memory of one estimate against the number of chains and ``chains_in_flight``.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/memory.py [--layers 12] [--width 768]``

A GPT-2 built from ``GPT2Config(n_layer=12, n_head=12, n_embd=768)`` (123.8M parameters,
0.50 GB in float32) on batches of 2 x 64 tokens, ``LLCConfig(num_burnin=1, num_draws=2)``.
Each case runs in a fresh process on CPU, after one training step; its extra peak memory is
the process's peak resident memory during the estimate minus its resident memory just
before, as a multiple of the model's float32 size, and the time of one chain step (the
estimate's time over its chain steps). The processes run with ``MALLOC_MMAP_THRESHOLD_``
at 64 KiB, so that memory freed by torch goes back to the system at once and the resident
memory follows the live tensors (glibc otherwise keeps freed blocks of up to 32 MB). The
floor is ``1 + 2k`` for ``k`` chains in flight plus activations (see
``llc_callbacks.chains``); MALA's acceptance (``mala=True``, the default) holds two more
copies per chain on the draws it is measured on.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import psutil
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from llc_callbacks import LLCConfig, estimate_llc

# (chains, chains_in_flight, mala)
CASES = [
    (1, "auto", False),
    (4, "auto", False),
    (4, 2, False),
    (4, 1, False),
    (8, "auto", False),
    (8, 4, False),
    (8, 1, False),
    (4, "auto", True),
    (4, 1, True),
]
LENGTH, BATCH = 64, 2


def one(chains: int, in_flight: int | str, mala: bool, layers: int, width: int) -> dict:
    """Run one estimate here and measure it."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=12, n_embd=width)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (64, LENGTH))
    data = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=BATCH)
    llc = LLCConfig(
        num_chains=chains, num_burnin=1, num_draws=2, chains_in_flight=in_flight, mala=mala
    )
    size = sum(p.numel() for p in model.parameters()) * 4
    # One training step first, as in a run: libraries' one-off buffers are not the estimate's.
    model(**next(iter(data))).loss.backward()
    model.zero_grad(set_to_none=True)
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    estimate_llc(model, lambda m, b: m(**b).loss, data, llc, warn=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = chains * (llc.num_burnin + llc.num_draws)
    return {"extra": (peak - before) / size, "gb": size / 1e9, "step_s": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        chains, in_flight, mala = int(args.one[0]), args.one[1], args.one[2] == "True"
        in_flight = in_flight if in_flight == "auto" else int(in_flight)
        print(json.dumps(one(chains, in_flight, mala, args.layers, args.width)))
        return
    header = f"{'chains':>6} {'in flight':>9} {'mala':>5} {'extra peak / model':>19}"
    print(f"{header} {'floor':>12} {'s per chain step':>17}")
    for chains, in_flight, mala in CASES:
        command = [sys.executable, __file__, "--layers", str(args.layers)]
        command += ["--width", str(args.width), "--one", str(chains), str(in_flight), str(mala)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        found = json.loads(done.stdout.strip().splitlines()[-1])
        floor = 1 + (4 if mala else 2) * (chains if in_flight == "auto" else in_flight)
        row = f"{chains:6d} {in_flight!s:>9} {mala!s:>5} {found['extra']:18.1f}x"
        print(f"{row} {floor:11d}x {found['step_s']:17.2f}")


if __name__ == "__main__":
    main()
