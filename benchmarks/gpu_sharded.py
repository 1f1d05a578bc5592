"""The sharded checks of ``gpu_check.py``, on 2 ranks: run by it under torchrun.

Usage: ``torchrun --standalone --nproc_per_node=2 benchmarks/gpu_sharded.py [--device cpu]``

1. A GPT-2 of 4 layers sharded with ``fully_shard`` (each block, then the root): the estimate
   through the shards equals one process's estimate of the unsharded model (rank zero), and
   every rank's shards and gradients are bit-identical before and after.
2. On CUDA only (accelerate applies FSDP on GPUs only): a transformers ``Trainer`` with
   ``fsdp_config={"fsdp_version": 2}`` and ``LLCTrainerCallback`` logs a finite LLC at its
   scheduled steps, its model sharded.

Rank zero prints ``ok`` or ``FAILED`` per check; the script exits 1 on any failure.
"""

import argparse
import os
import sys
import tempfile
from copy import deepcopy
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from gpu_check import SHORT, gpt2, gpt2_loss
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from llc_callbacks import estimate_llc

CONFIG = replace(SHORT, num_chains=2)


def say(name: str, passed: bool, detail: str) -> bool:
    if dist.get_rank() == 0:
        print(f"{'ok' if passed else 'FAILED':7} {name}: {detail}", flush=True)
    return passed


def sharded_equals_one_process(device: torch.device) -> bool:
    model, data = gpt2(4, 256, device)
    plain = deepcopy(model)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    before = [p.to_local().clone() for p in model.parameters()]
    result = estimate_llc(model, gpt2_loss, data, CONFIG, distributed=True, warn=False)
    untouched = all(
        torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    untouched &= all(p.grad is None for p in model.parameters())
    single = estimate_llc(plain, gpt2_loss, data, CONFIG, warn=False)
    gap = float(np.max(np.abs(result.llc_per_chain - single.llc_per_chain)))
    close = bool(np.allclose(result.llc_per_chain, single.llc_per_chain, rtol=1e-3, atol=1e-3))
    return say(
        "sharded GPT-2 (fully_shard, 2 ranks) = one process",
        close and untouched,
        f"per-chain LLC {np.round(result.llc_per_chain, 4).tolist()} against"
        f" {np.round(single.llc_per_chain, 4).tolist()} (largest gap {gap:.2g});"
        f" shards and gradients untouched: {untouched}",
    )


def trainer_with_fsdp2() -> bool:
    from transformers import Trainer, TrainingArguments

    from llc_callbacks.integrations.huggingface import LLCTrainerCallback

    model, data = gpt2(4, 256, torch.device("cpu"))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to="none",
        fsdp="full_shard",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]},
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.dataset)
    callback = LLCTrainerCallback(replace(CONFIG, mala=False), steps=[2, 4], stream=False)
    trainer.add_callback(callback)
    trainer.train()
    sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
    values = [row["llc/mean"] for row in callback.monitor.history]
    finite = len(values) == 2 and all(np.isfinite(values))
    return say(
        "transformers Trainer, accelerate FSDP2, LLCTrainerCallback",
        sharded and finite,
        f"model sharded: {sharded}; llc/mean at steps 2 and 4: {values}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device_type = parser.parse_args().device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    passed = sharded_equals_one_process(device)
    if device.type == "cuda":
        passed &= trainer_with_fsdp2()
    else:
        say(
            "transformers Trainer, accelerate FSDP2",
            True,
            "skipped: accelerate shards on GPUs only",
        )
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
