"""The checks that need a GPU, in one script of at most 5 minutes: run it whenever one is at hand.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/gpu_check.py [--device cuda] [--quick]``

On the device it checks, printing ``ok`` or ``FAILED`` with the numbers, and exits 1 if
anything failed:

1. vectorized chains (``vmap``) give the loop's numbers;
2. an estimate leaves the live model, its gradients and every RNG (CUDA's too) as they were;
3. ``chains_in_flight`` changes nothing but float rounding;
4. one chain step against one training step, at 1, 4, 8 and 16 chains, for the MLP of
   ``mlp.py`` and GPT-2 of about 10M and 124M parameters;
5. the extra peak memory of an estimate (``torch.cuda.max_memory_allocated`` on CUDA) with
   all chains in flight and one at a time.

``--quick`` keeps the small models and 1 and 4 chains; the test suite runs it with
``--device cpu --quick`` so that the script never rots. Matmuls run in full float32 (TF32
off), so the vmap and loop paths compare at float32 rounding.
"""

import argparse
import sys
import time
from copy import deepcopy
from dataclasses import replace

import numpy as np
import torch
from mlp import loss_fn, make_data, make_loader, make_model
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from llc_callbacks import LLCConfig, estimate_llc

SHORT = LLCConfig(num_chains=4, num_burnin=10, num_draws=20, localization=10.0, mala=False)
failures: list[str] = []


def check(name: str, passed: bool, detail: str) -> None:
    """Print a check's outcome and remember a failure."""
    print(f"{'ok' if passed else 'FAILED':7} {name}: {detail}")
    if not passed:
        failures.append(name)


def gpt2(layers: int, width: int, device: torch.device) -> tuple[torch.nn.Module, DataLoader]:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_head=max(1, width // 64),
        n_embd=width,
        vocab_size=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    ids = torch.randint(0, 512, (64, 64))
    data = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=4)
    return GPT2LMHeadModel(config).to(device), data


def gpt2_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    return model(**batch).loss


def vmap_equals_loop(device: torch.device) -> None:
    model, data = make_model().to(device), make_loader(make_data())
    results = [
        estimate_llc(model, loss_fn, data, replace(SHORT, vectorize=v), device=device, warn=False)
        for v in (True, False)
    ]
    gap = np.max(np.abs(results[0].loss_trace - results[1].loss_trace))
    check("vmap equals the loop", bool(gap < 1e-3), f"largest loss difference {gap:.2e}")


def leaves_training_alone(device: torch.device) -> None:
    model = make_model().to(device)
    data = make_loader(make_data())
    batch = next(iter(data))
    loss_fn(model, [t.to(device) for t in batch]).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    estimate_llc(model, loss_fn, data, SHORT, device=device, warn=False)
    same = all(torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))
    same &= all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    same &= torch.equal(cpu_rng, torch.get_rng_state())
    if device.type == "cuda":
        after = torch.cuda.get_rng_state_all()
        same &= all(torch.equal(a, b) for a, b in zip(cuda_rng, after, strict=True))
    check("training untouched", same, "weights, gradients, CPU and CUDA RNG states")


def in_flight_changes_nothing(device: torch.device) -> None:
    model, data = make_model().to(device), make_loader(make_data())
    every = estimate_llc(model, loss_fn, data, SHORT, device=device, warn=False)
    config = replace(SHORT, chains_in_flight=1)
    one = estimate_llc(model, loss_fn, data, config, device=device, warn=False)
    gap = abs(every.llc_mean - one.llc_mean) / max(abs(every.llc_mean), 1e-12)
    check("chains_in_flight=1 equals all at once", gap < 1e-3, f"relative difference {gap:.1e}")


def step_costs(device: torch.device, quick: bool) -> None:
    models = {"MLP": (make_model().to(device), make_loader(make_data()), loss_fn)}
    models["GPT-2 10M"] = (*gpt2(4, 256, device), gpt2_loss)
    if not quick:
        models["GPT-2 124M"] = (*gpt2(12, 768, device), gpt2_loss)
    for name, (model, data, loss) in models.items():
        train = _training_step_seconds(model, data, loss, device)
        ratios = []
        for chains in (1, 4) if quick else (1, 4, 8, 16):
            config = LLCConfig(num_chains=chains, num_burnin=5, num_draws=10, mala=False)
            start = _synchronized(device)
            estimate_llc(model, loss, data, config, device=device, warn=False)
            seconds = _synchronized(device) - start
            ratios.append(f"{chains}: {seconds / (15 * chains) / train:.2f}")
        print(f"        chain step / training step, {name} (chains: ratio): {', '.join(ratios)}")


def peak_memory(device: torch.device, quick: bool) -> None:
    model, data = gpt2(4, 256, device) if quick else gpt2(12, 768, device)
    size = sum(p.numel() for p in model.parameters()) * 4
    if device.type != "cuda":
        print("        peak memory: CUDA only (benchmarks/memory.py measures it on CPU)")
        return
    peaks = {}
    for in_flight in ("auto", 1):
        config = LLCConfig(num_chains=4, num_burnin=1, num_draws=2, chains_in_flight=in_flight)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        estimate_llc(model, gpt2_loss, data, config, device=device, warn=False)
        peaks[in_flight] = (torch.cuda.max_memory_allocated() - before) / size
    print(f"        extra peak memory / model size, 4 chains: {peaks}")
    check("one chain in flight takes less memory", peaks[1] < peaks["auto"], str(peaks))


def _training_step_seconds(model, data, loss, device: torch.device, steps: int = 10) -> float:
    copy = deepcopy(model)
    optimizer = torch.optim.SGD(copy.parameters(), lr=1e-3)
    batches = [_to(batch, device) for batch, _ in zip(data, range(steps), strict=False)]
    start = _synchronized(device)
    for batch in batches:
        optimizer.zero_grad()
        loss(copy, batch).backward()
        optimizer.step()
    return (_synchronized(device) - start) / len(batches)


def _to(batch, device: torch.device):
    if isinstance(batch, dict):
        return {key: value.to(device) for key, value in batch.items()}
    return [value.to(device) for value in batch]


def _synchronized(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}")
    start = time.perf_counter()
    vmap_equals_loop(device)
    leaves_training_alone(device)
    in_flight_changes_nothing(device)
    step_costs(device, args.quick)
    peak_memory(device, args.quick)
    print(f"{len(failures)} failed, in {time.perf_counter() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
