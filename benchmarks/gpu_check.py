"""The checks that need a GPU, in one script of at most 5 minutes: run it whenever one is at hand.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/gpu_check.py [--device cuda] [--quick]``

On the device it checks, printing ``ok`` or ``FAILED`` with the numbers, and exits 1 if
anything failed:

1. vectorized chains (``vmap``) give the loop's numbers;
2. an estimate leaves the live model, its gradients and every RNG (CUDA's too) as they were;
3. ``chains_in_flight`` changes nothing but float rounding;
4. one chain step against one training step, at 1, 4, 8 and 16 chains, for the MLP of
   ``mlp.py`` and GPT-2 of about 10M and 124M parameters;
5. the extra peak memory of an estimate (``torch.cuda.max_memory_allocated`` on CUDA) and the
   time of a chain step, for 1 to 16 chains and ``chains_in_flight`` 1, 4 and ``"auto"``, and
   64 chains of GPT-2 124M under ``"auto"`` (more than the card holds at once);
6. a bfloat16 model's estimate against the float32 model's (the same weights);
7. a LoRA adapter on a bfloat16 base: the base is read in place; the extra peak memory;
8. with 2 GPUs, the sharded checks of ``gpu_sharded.py`` under torchrun (FSDP2 chains against
   one process; a transformers Trainer with accelerate FSDP2); skipped on one GPU.

Each check runs on its own: an exception fails that check, prints its traceback, and the
script goes on to the next.

``--quick`` keeps the small models and 1 and 4 chains; the test suite runs it with
``--device cpu --quick`` so that the script never rots. Matmuls run in full float32 (TF32
off), so the vmap and loop paths compare at float32 rounding.
"""

import argparse
import subprocess
import sys
import time
import traceback
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from mlp import loss_fn, make_data, make_loader, make_model
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from llc_callbacks import LLCConfig, estimate_llc
from llc_callbacks.forked import ForkedModel

SHORT = LLCConfig(num_chains=4, num_burnin=10, num_draws=20, localization=10.0, mala=False)
failures: list[str] = []


def check(name: str, passed: bool, detail: str) -> None:
    """Print a check's outcome and remember a failure."""
    print(f"{'ok' if passed else 'FAILED':7} {name}: {detail}")
    if not passed:
        failures.append(name)


def gpt2(
    layers: int, width: int, device: torch.device, vocab: int = 512
) -> tuple[torch.nn.Module, DataLoader]:
    """A GPT-2 of random weights and batches of 4 x 64 random tokens."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_head=max(1, width // 64),
        n_embd=width,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
    )
    ids = torch.randint(0, vocab, (64, 64))
    data = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=4)
    return GPT2LMHeadModel(config).to(device), data


def gpt2_124m(device: torch.device) -> tuple[torch.nn.Module, DataLoader]:
    """GPT-2 small: ``GPT2Config(n_layer=12, n_head=12, n_embd=768)``, 123.8M parameters."""
    return gpt2(12, 768, device, vocab=50257)


def millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


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
    models = [("MLP", make_model().to(device), make_loader(make_data()), loss_fn)]
    for model, data in [gpt2(4, 256, device)] + ([] if quick else [gpt2_124m(device)]):
        models.append((f"GPT-2 {millions(model)}", model, data, gpt2_loss))
    for name, model, data, loss in models:
        train = _training_step_seconds(model, data, loss, device)
        ratios = []
        for chains in (1, 4) if quick else (1, 4, 8, 16):
            config = LLCConfig(num_chains=chains, num_burnin=5, num_draws=10, mala=False)
            start = _synchronized(device)
            estimate_llc(model, loss, data, config, device=device, warn=False)
            seconds = _synchronized(device) - start
            ratios.append(f"{chains}: {seconds / (15 * chains) / train:.2f}")
        print(f"        chain step / training step, {name} (chains: ratio): {', '.join(ratios)}")


# (chains, chains_in_flight, mala)
MEMORY_CASES = [
    (1, "auto", False),
    (4, "auto", False),
    (4, 1, False),
    (8, "auto", False),
    (8, 4, False),
    (8, 1, False),
    (16, 4, False),
    (4, "auto", True),
    (4, 1, True),
]


def peak_memory(device: torch.device, quick: bool) -> None:
    if device.type != "cuda":
        print("        peak memory: CUDA only (benchmarks/memory.py measures it on CPU)")
        return
    model, data = gpt2(4, 256, device) if quick else gpt2_124m(device)
    size = sum(p.numel() for p in model.parameters()) * 4
    print(f"        GPT-2 of {millions(model)} parameters ({size / 1e9:.2f} GB in float32)")
    print("        chains  in flight   mala  extra peak / model         floor  s per chain step")
    peaks = {}
    for chains, in_flight, mala in MEMORY_CASES[:3] if quick else MEMORY_CASES:
        config = LLCConfig(
            num_chains=chains, num_burnin=1, num_draws=2, chains_in_flight=in_flight, mala=mala
        )
        extra, seconds = _extra_peak(model, data, config, device)
        peaks[chains, in_flight, mala] = extra / size
        floor = 1 + (4 if mala else 2) * (chains if in_flight == "auto" else in_flight)
        row = f"{chains:6d} {in_flight!s:>10} {mala!s:>6} {extra / size:18.2f}x {floor:12d}x"
        print(f"        {row} {seconds / (chains * 3):17.4f}")
    one, alone = peaks[4, 1, False], peaks[1, "auto", False]
    same = abs(one - alone) < 0.05 * alone and one < peaks[4, "auto", False]
    check("4 chains, 1 in flight, take 1 chain's memory", same, f"{one:.2f}x against {alone:.2f}x")
    full = torch.cuda.mem_get_info(device)[1]
    config = LLCConfig(num_chains=64, num_burnin=1, num_draws=2)
    extra, seconds = _extra_peak(model, data, config, device)
    held = (extra + torch.cuda.memory_allocated(device)) / full
    detail = f"64 chains of GPT-2 {millions(model)} in {seconds:.1f} s, peak {held:.0%} of memory"
    check('chains_in_flight="auto" fits the card', held < 0.95, detail)


def half_precision(device: torch.device, quick: bool) -> None:
    model, data = gpt2(2, 128, device) if quick else gpt2(4, 256, device)
    model = model.to(torch.bfloat16)
    reference = deepcopy(model).float()
    config = LLCConfig(
        num_chains=4, num_burnin=10 if quick else 20, num_draws=20 if quick else 40, seed=1
    )
    found = {}
    for name, m in (("bfloat16", model), ("float32", reference)):
        start = _synchronized(device)
        result = estimate_llc(m, gpt2_loss, data, config, device=device, warn=False)
        seconds = _synchronized(device) - start
        found[name] = result.llc_mean
        spread = result.llc_std
        print(f"        {name}: llc {result.llc_mean:.3f} +- {spread:.3f}, {seconds:.1f} s")
    gap = abs(found["bfloat16"] - found["float32"])
    passed = gap <= max(spread, 1e-6) * 2
    check("a bfloat16 model estimates", passed, f"gap {gap:.3f}")
    if not passed and device.type == "cuda":  # which attention kernel goes wrong
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in SDPBackend.__members__.values():
            if backend == SDPBackend.ERROR:
                continue
            for vectorize in (True, False):
                try:
                    with sdpa_kernel(backend):
                        result = estimate_llc(
                            model,
                            gpt2_loss,
                            data,
                            replace(config, vectorize=vectorize),
                            device=device,
                            warn=False,
                        )
                    found_here = f"{result.llc_mean:.3f}, init loss {result.init_loss:.4f}"
                except Exception as error:
                    found_here = f"{type(error).__name__}: {str(error)[:80]}"
                print(f"        bfloat16, {backend.name}, vectorize={vectorize}: {found_here}")


def lora_on_half_base(device: torch.device, quick: bool) -> None:
    from peft import LoraConfig, get_peft_model

    base, data = gpt2(4, 256, device) if quick else gpt2_124m(device)
    base = base.to(torch.bfloat16)
    size = sum(p.numel() for p in base.parameters()) * 2
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["c_attn", "c_proj"]))
    config = LLCConfig(num_chains=4, num_burnin=1, num_draws=2, mala=False)
    forked = ForkedModel(model, gpt2_loss, device, "auto")
    frozen = {f"model.{n}": p for n, p in model.named_parameters() if not p.requires_grad}
    shared = all(forked.constants[n].data_ptr() == p.data_ptr() for n, p in frozen.items())
    check("a bfloat16 base is read in place", shared, f"{len(frozen)} frozen tensors")
    if device.type == "cuda":
        extra, _ = _extra_peak(model, data, config, device)
        print(f"        LoRA on a bfloat16 base, 4 chains: extra peak {extra / size:.2f}x the base")
    result = estimate_llc(model, gpt2_loss, data, config, device=device, warn=False)
    finite = bool(np.isfinite(result.llc_per_chain).all())
    check("LoRA on a bfloat16 base estimates", finite, f"llc {result.llc_mean:.3f}")


def sharded_on_two_gpus(device: torch.device) -> None:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        print(
            "        sharded: needs 2 GPUs, skipped (`torchrun --nproc_per_node=2"
            " gpu_sharded.py --device cpu` checks the chains on CPU)"
        )
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(Path(__file__).with_name("gpu_sharded.py"))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    for line in done.stdout.splitlines():
        if line.startswith(("ok", "FAILED")):
            print(f"  {line}")
    detail = f"exit {done.returncode}" + ("" if done.returncode == 0 else done.stderr[-2000:])
    check("sharded on 2 GPUs (gpu_sharded.py)", done.returncode == 0, detail)


def _extra_peak(model, data, config: LLCConfig, device: torch.device) -> tuple[float, float]:
    """The extra peak CUDA memory of one estimate, in bytes, and its seconds."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    estimate_llc(model, gpt2_loss, data, config, device=device, warn=False)
    seconds = _synchronized(device) - start
    return torch.cuda.max_memory_allocated() - before, seconds


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
    for run in (
        lambda: vmap_equals_loop(device),
        lambda: leaves_training_alone(device),
        lambda: in_flight_changes_nothing(device),
        lambda: step_costs(device, args.quick),
        lambda: peak_memory(device, args.quick),
        lambda: half_precision(device, args.quick),
        lambda: lora_on_half_base(device, args.quick),
        lambda: sharded_on_two_gpus(device),
    ):
        try:
            run()
        except Exception:
            traceback.print_exc(file=sys.stdout)
            check("(raised)", False, "the traceback above")
        sys.stdout.flush()
    print(f"{len(failures)} failed, in {time.perf_counter() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
