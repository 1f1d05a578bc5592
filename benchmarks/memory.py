"""Extra peak memory of one estimate against the number of chains and ``chains_in_flight``.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/memory.py [--layers 12] [--width 768]``

A GPT-2 built from ``GPT2Config(n_layer=12, n_head=12, n_embd=768)`` (123.8M parameters,
0.50 GB in float32) on batches of 2 x 64 tokens, ``LLCConfig(num_burnin=1, num_draws=2)``.
Each case runs in a fresh process on CPU; its extra peak memory is the process's peak
resident memory during the estimate minus its resident memory just before, as a multiple of
the model's float32 size, and the time of one chain step (the estimate's time over its
chain steps). 8 chains at once would need about 23 GB and are left out.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from llc_callbacks import LLCConfig, estimate_llc

CASES = [(1, "auto"), (4, "auto"), (4, 2), (4, 1), (8, 4), (8, 1)]
VOCAB, LENGTH, BATCH = 512, 64, 2


def one(chains: int, in_flight: int | str, layers: int, width: int) -> dict:
    """Run one estimate here and measure it."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=12, n_embd=width, vocab_size=VOCAB)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, VOCAB, (64, LENGTH))
    data = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=BATCH)
    llc = LLCConfig(
        num_chains=chains, num_burnin=1, num_draws=2, chains_in_flight=in_flight, mala=False
    )
    size = sum(p.numel() for p in model.parameters()) * 4
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
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        chains, in_flight = int(args.one[0]), args.one[1]
        in_flight = in_flight if in_flight == "auto" else int(in_flight)
        print(json.dumps(one(chains, in_flight, args.layers, args.width)))
        return
    print(f"{'chains':>6} {'in flight':>9} {'extra peak / model':>19} {'s per chain step':>17}")
    for chains, in_flight in CASES:
        command = [sys.executable, __file__, "--layers", str(args.layers)]
        command += ["--width", str(args.width), "--one", str(chains), str(in_flight)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        found = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{chains:6d} {in_flight!s:>9} {found['extra']:18.1f}x {found['step_s']:17.2f}")


if __name__ == "__main__":
    main()
