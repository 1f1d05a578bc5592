"""Estimate the LLC of fully_shard-ed models on 2 CPU ranks (gloo); run by test_fsdp.py.

Usage: torchrun --nproc_per_node=2 fsdp_script.py OUT_DIR

For an MLP and a tiny GPT-2, each rank records whether its shards, gradients and RNG states
are bit-identical before and after the estimate, and the estimate; rank zero also estimates
the unsharded model in one process. Then chains that diverge, and a loss that fails on rank 1
only: each rank records
the error it raised and whether a training step runs afterwards. Writes OUT_DIR/rank_<r>.json.
"""

import copy
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from hf_helpers import TokenData, tiny_gpt2
from models import DropoutBatchNormNet, cross_entropy
from ranks import leave
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks import LLCConfig, estimate_llc

CONFIG = LLCConfig(num_chains=3, num_burnin=10, num_draws=20, step_size=1e-3, nbeta=50.0)


def mlp_case() -> tuple[torch.nn.Module, torch.nn.Module, DataLoader, object]:
    torch.manual_seed(0)
    model = DropoutBatchNormNet()
    plain = copy.deepcopy(model)
    for layer in model.net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(128, 6, generator=generator), torch.randint(0, 3, (128,)))
    return model, plain, DataLoader(data, batch_size=32, shuffle=True), cross_entropy


def gpt2_loss(model, batch):
    return model(**batch).loss


def gpt2_case() -> tuple[torch.nn.Module, torch.nn.Module, DataLoader, object]:
    model = tiny_gpt2()
    plain = copy.deepcopy(model)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model, plain, DataLoader(TokenData(64), batch_size=8, shuffle=True), gpt2_loss


def state(model: torch.nn.Module) -> dict:
    """Every rank-local thing an estimate must leave as it was."""
    params = list(model.parameters())
    return {
        "shards": [p.to_local().clone() for p in params],
        "grads": [
            None if p.grad is None else p.grad.to_local().clone() for p in model.parameters()
        ],
        "buffers": [b.clone() for b in model.buffers()],
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }


def same(a: dict, b: dict) -> bool:
    tensors = all(
        (x is None and y is None) or torch.equal(x, y)
        for key in ("shards", "grads", "buffers")
        for x, y in zip(a[key], b[key], strict=True)
    )
    rng = torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
    return tensors and rng and a["rng"][2] == b["rng"][2]


def train_step(model: torch.nn.Module, loss_fn, data: DataLoader) -> None:
    """A training step's backward pass on the first examples (BatchNorm's statistics move),
    leaving gradients on the shards as a trainer would mid-step."""
    model.train()
    loss_fn(model, next(iter(DataLoader(data.dataset, batch_size=data.batch_size)))).backward()


def estimate_case(name: str, make) -> dict:
    model, plain, data, loss_fn = make()
    train_step(model, loss_fn, data)
    before = state(model)
    result = estimate_llc(model, loss_fn, data, CONFIG, distributed=True, warn=False)
    record = {
        "untouched": same(before, state(model)),
        "llc_per_chain": result.llc_per_chain.tolist(),
        "loss_trace": result.loss_trace.tolist(),
        "init_loss": result.init_loss,
    }
    if dist.get_rank() == 0:
        train_step(plain, loss_fn, data)
        single = estimate_llc(plain, loss_fn, data, CONFIG, warn=False)
        record["single_llc_per_chain"] = single.llc_per_chain.tolist()
        record["single_loss_trace"] = single.loss_trace.tolist()
        record["single_init_loss"] = single.init_loss
    return record


# Adapting chains that settle, stop early and start the next estimate warm: at most 250
# burn-in steps and 200 draws, two estimates.
ADAPTIVE = LLCConfig(num_chains=2, num_burnin=250, num_draws=200, nbeta=50.0)


def adaptive_case() -> dict:
    """Two estimates of the MLP, the second warm-started from the first, sharded and not."""
    model, plain, data, loss_fn = mlp_case()
    train_step(model, loss_fn, data)
    before = state(model)
    first = estimate_llc(
        model, loss_fn, data, ADAPTIVE, distributed=True, warn=False, keep_ends=True
    )
    second = estimate_llc(
        model,
        loss_fn,
        data,
        replace(ADAPTIVE, seed=1),
        distributed=True,
        warn=False,
        start=first.starts,
    )
    record = {"untouched": same(before, state(model))}
    runs = {"sharded": (first, second)}
    if dist.get_rank() == 0:
        train_step(plain, loss_fn, data)
        one = estimate_llc(plain, loss_fn, data, ADAPTIVE, warn=False, keep_ends=True)
        two = estimate_llc(
            plain, loss_fn, data, replace(ADAPTIVE, seed=1), warn=False, start=one.starts
        )
        runs["single"] = (one, two)
    for name, results in runs.items():
        record[name] = [
            {
                "llc_per_chain": r.llc_per_chain.tolist(),
                "step_sizes": r.step_sizes.tolist(),
                "burnin": r.burnin.tolist(),
                "draws": r.draws.tolist(),
                "warm": r.warm,
            }
            for r in results
        ]
    return record


def diverging_case() -> dict:
    model, _, data, loss_fn = mlp_case()
    before = state(model)
    config = replace(CONFIG, step_size=1e8)  # every chain's loss overflows within a few steps
    result = estimate_llc(model, loss_fn, data, config, distributed=True, warn=False)
    return {
        "num_diverged": result.diagnostics["num_diverged"],
        "llc_mean": result.llc_mean,
        "untouched": same(before, state(model)),
    }


def failing_case() -> dict:
    model, _, data, loss_fn = mlp_case()
    calls = 0

    def fails_on_rank_1(module, batch):
        nonlocal calls
        calls += 1
        if dist.get_rank() == 1 and calls == 20:  # within the first chain
            raise RuntimeError("chains failed on rank 1 only")
        return loss_fn(module, batch)

    train_step(model, loss_fn, data)
    before = state(model)
    try:
        estimate_llc(model, fails_on_rank_1, data, CONFIG, distributed=True, warn=False)
        error = None
    except RuntimeError as raised:
        error = str(raised)
    untouched = same(before, state(model))
    train_step(model, loss_fn, data)  # training goes on: the collectives still pair up
    return {"error": error, "untouched": untouched, "trained": True}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    record = {
        "mlp": estimate_case("mlp", mlp_case),
        "gpt2": estimate_case("gpt2", gpt2_case),
        "adaptive": adaptive_case(),
        "diverging": diverging_case(),
        "failure": failing_case(),
    }
    (out / f"rank_{dist.get_rank()}.json").write_text(json.dumps(record))
    leave()
