"""The checks that need a GPU, in one script of under 6 minutes on an H100 or H200.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/gpu_check.py [--device cuda] [--quick]``

On the device it checks, printing ``ok`` or ``FAILED`` with the numbers, and exits 1 if
anything failed:

1. vectorized chains (``vmap``) give the loop's numbers;
2. an estimate leaves the live model, its gradients and every RNG (CUDA's too) as they were;
3. ``chains_in_flight`` changes nothing but float rounding;
4. one step of all the chains against one AdamW training step of the same batch and
   precision, for GPT-2 124M at 1, 4, 8, 16 and 32 chains in float32 and under bfloat16
   autocast (and compiled, at 16), and for GPT-2 of 0.5B and 1.3B parameters (random
   weights) at 1, 4 and 16 chains under bfloat16 autocast and at 4 in float32; each row
   says whether the chains ran vectorized and how many were in flight, and the goal's
   ratio (a 16-chain step of GPT-2 124M under bfloat16 in at most 4 training steps) is
   printed on its own line; the estimates are finite, and the compiled ones ran compiled;
5. where a chain step's time goes: ``torch.profiler`` (CPU, and CUDA activity) over 16
   chains of GPT-2 124M under bfloat16 autocast, its 15 costliest operators, and the
   operators dispatched and CUDA kernels launched per step;
6. the extra peak memory of an estimate (``torch.cuda.max_memory_allocated`` on CUDA) and the
   time of a chain step, for 1 to 16 chains and ``chains_in_flight`` 1, 4 and ``"auto"``, and
   64 chains of GPT-2 124M under ``"auto"`` (more than the card holds at once);
7. a bfloat16 model's estimate against the float32 model's (the same weights);
8. a LoRA adapter on a bfloat16 base: the base is read in place; the extra peak memory;
9. a GPT-2 of 1.3B parameters estimating with 4 chains under bfloat16 autocast beside its
   live training state (float32 weights, gradients, AdamW's state) on one card, with the
   peak memory against the card's (CUDA only);
10. with 2 GPUs, the sharded checks of ``gpu_sharded.py`` under torchrun (FSDP2 chains against
    one process; a transformers Trainer with accelerate FSDP2); skipped on one GPU.

Each check runs on its own: an exception fails that check, prints its traceback, and the
script goes on to the next. Times on CUDA come from CUDA events around the timed code.

``--quick`` keeps the small models (the MLP, a GPT-2 of 0.6M parameters) and 1 and 4
chains, and compiles one row (the MLP's); the test suite runs it with ``--device cpu
--quick`` so that the script never rots. Matmuls run as the user's settings leave TF32
(printed first); the two checks that compare vmap and chains in flight at float32 rounding
turn it off for themselves.
"""

import argparse
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from mlp import loss_fn, make_data, make_loader, make_model
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import llc_callbacks.chains as chains_module
from llc_callbacks import LLCConfig, LLCResult, estimate_llc
from llc_callbacks.counting import OperatorCount
from llc_callbacks.forked import ForkedModel

SHORT = LLCConfig(num_chains=4, num_burnin=10, num_draws=20, localization=10.0, mala=False)
# A chain step is the time of an estimate of LONG_DRAWS draws less one of SHORT_DRAWS, over
# the extra draws: setup and the initial loss cancel.
SHORT_DRAWS, LONG_DRAWS = 2, 10
failures: list[str] = []
T = TypeVar("T")
# A step-cost row: chains, autocast (None: float32) and compiled.
Row = tuple[int, str | None, bool]
Build = Callable[[torch.device], tuple[torch.nn.Module, DataLoader]]


def check(name: str, passed: bool, detail: str) -> None:
    """Print a check's outcome and remember a failure."""
    print(f"{'ok' if passed else 'FAILED':7} {name}: {detail}")
    if not passed:
        failures.append(name)


def timed(device: torch.device, run: Callable[[], T]) -> tuple[T, float]:
    """``run()`` and its seconds: between two CUDA events on CUDA, by the clock elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        return run(), time.perf_counter() - start
    stream = torch.cuda.current_stream(device)
    start_event, end_event = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start_event.record(stream)
    found = run()
    end_event.record(stream)
    end_event.synchronize()
    return found, start_event.elapsed_time(end_event) / 1e3


def tf32_settings() -> str:
    """The TF32 settings as the user left them."""
    return (
        f"torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32},"
        f" float32 matmul precision {torch.get_float32_matmul_precision()!r},"
        f" torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
    )


@contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off inside, for a comparison at float32 rounding; the user's settings after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)


def gpt2(
    layers: int, width: int, device: torch.device, vocab: int = 512, heads: int | None = None
) -> tuple[torch.nn.Module, DataLoader]:
    """A GPT-2 of random weights (made on the device) and batches of 4 x 64 random tokens."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_head=heads or max(1, width // 64),
        n_embd=width,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
    )
    ids = torch.randint(0, vocab, (64, 64))
    data = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=4)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    return model.to(device), data


def gpt2_124m(device: torch.device) -> tuple[torch.nn.Module, DataLoader]:
    """GPT-2 small: ``GPT2Config(n_layer=12, n_head=12, n_embd=768)``, 124.4M parameters."""
    return gpt2(12, 768, device, vocab=50257)


def gpt2_0b5(device: torch.device) -> tuple[torch.nn.Module, DataLoader]:
    """24 layers of width 1280 (20 heads): 24 (12 d^2 + 13 d) + (50257 + 1024 + 2) d = 537.9M."""
    return gpt2(24, 1280, device, vocab=50257)


def gpt2_1b3(device: torch.device) -> tuple[torch.nn.Module, DataLoader]:
    """24 layers of width 2048 (16 heads): 24 (12 d^2 + 13 d) + (50257 + 1024 + 2) d = 1313.6M."""
    return gpt2(24, 2048, device, vocab=50257, heads=16)


def millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def gpt2_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    return model(**batch).loss


def fixed(chains: int, autocast: str | None = None, compiled: bool = False) -> LLCConfig:
    """Chains of exactly ``SHORT_DRAWS`` steps at step size 1e-4: no burn-in, search or MALA."""
    return LLCConfig(
        num_chains=chains,
        num_burnin=0,
        num_draws=SHORT_DRAWS,
        step_size=1e-4,
        relative_error=None,
        mala=False,
        autocast=autocast,
        compile=compiled,
    )


def per_step(measure: Callable[[int], float]) -> float:
    """What a draw adds: ``measure(draws)`` at ``LONG_DRAWS`` less at ``SHORT_DRAWS``, per draw."""
    return (measure(LONG_DRAWS) - measure(SHORT_DRAWS)) / (LONG_DRAWS - SHORT_DRAWS)


def vmap_equals_loop(device: torch.device) -> None:
    model, data = make_model().to(device), make_loader(make_data())
    with full_float32():
        results = [
            estimate_llc(
                model, loss_fn, data, replace(SHORT, vectorize=v), device=device, warn=False
            )
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
    with full_float32():
        every = estimate_llc(model, loss_fn, data, SHORT, device=device, warn=False)
        config = replace(SHORT, chains_in_flight=1)
        one = estimate_llc(model, loss_fn, data, config, device=device, warn=False)
    gap = abs(every.llc_mean - one.llc_mean) / max(abs(every.llc_mean), 1e-12)
    check("chains_in_flight=1 equals all at once", gap < 1e-3, f"relative difference {gap:.1e}")


# The step-cost rows. The full matrix (3 models x 5 chain counts x 2 precisions x compiled or
# not: 60 rows) does not fit in 6 minutes; this one does, on an H100 or H200 (estimated):
# - each row is 3 estimates (a warm-up and the two timed ones) of 2, 2 and 10 draws, whose
#   setup (the initial loss over 8 batches, the chains' weights) is 0.2-0.5 s for 124M and
#   1-3 s for 1.3B; a step of 16 chains of 124M under bfloat16 takes tens of ms, one of 32
#   in float32 (6 TFLOP, without TF32) about 0.1 s: the 10 eager rows of 124M about 25 s;
# - compiling 124M's 16 chains under bfloat16 (the first compiled estimate): 60-120 s, once:
#   the later estimates reuse the graph (on CPU, one graph for three estimates);
# - 0.5B and 1.3B: 4 rows each, up to 16 chains of 2 TFLOP a step (1.3B), in waves where the
#   card does not hold them at once (16 of 1.3B take over 170 GB): about 45 s with building
#   the models and their training steps (AdamW: 26 GB for 1.3B);
# - the profiled estimates about 10 s, the 1.3B beside training about 15 s, the other checks
#   about 40 s (the whole script took 53 s before these additions): about 4 minutes in all.
# 32 chains only for 124M (about 45 GB in float32): 0.5B and 1.3B need waves at 16 on an H100
# already, which the "in flight" column shows.
BF16 = "bfloat16"
EVERY_COUNT = (1, 4, 8, 16, 32)
FEW_COUNTS = (1, 4, 16)


def rows(counts: tuple[int, ...], autocast: str | None, compiled: bool = False) -> list[Row]:
    return [(chains, autocast, compiled) for chains in counts]


def mlp(device: torch.device) -> tuple[torch.nn.Module, DataLoader]:
    """The MLP of ``mlp.py`` (untrained) and its batches of 256."""
    return make_model().to(device), make_loader(make_data())


FULL_PLAN: list[tuple[Build, list[Row]]] = [
    (gpt2_124m, rows(EVERY_COUNT, None) + rows(EVERY_COUNT, BF16) + rows((16,), BF16, True)),
    (gpt2_0b5, rows(FEW_COUNTS, BF16) + rows((4,), None)),
    (gpt2_1b3, rows(FEW_COUNTS, BF16) + rows((4,), None)),
]
# The compiled row on the MLP: compiling it takes 14 s on CPU, a GPT-2 of 0.6M 60 s (the
# compiled GPT-2 is tests/test_throughput.py's). GPT-2 0.6M: its rows take 8 s on CPU, 3.6M's 38.
QUICK_PLAN: list[tuple[Build, list[Row]]] = [
    (mlp, rows((1, 4), None) + rows((1, 4), BF16) + rows((4,), BF16, True)),
    (partial(gpt2, 2, 128), rows((1, 4), None) + rows((1, 4), BF16)),
]


class Cost(NamedTuple):
    """A step-cost row's measurements."""

    step_s: float  # one step of all the chains
    first_s: float  # the warm-up estimate: a compiled row's compiles
    result: LLCResult  # the estimate of LONG_DRAWS draws
    in_flight: int  # the chains held at once; fewer than the chains: in waves
    fell_back: bool  # compile=True warned and ran uncompiled


@contextmanager
def in_flight_recorded() -> Iterator[list[int]]:
    """The chains in flight that each estimate inside resolves (``chains_in_flight``)."""
    resolved: list[int] = []
    resolve = chains_module._in_flight

    def recorded(*args: Any) -> int:
        resolved.append(resolve(*args))
        return resolved[-1]

    chains_module._in_flight = recorded
    try:
        yield resolved
    finally:
        chains_module._in_flight = resolve


def chain_step(model, data, loss, device: torch.device, config: LLCConfig) -> Cost:
    """A step of all the chains, as ``per_step`` of the estimates' times, after a warm-up."""
    found: dict[int, LLCResult] = {}

    def seconds(draws: int) -> float:
        run = partial(estimate_llc, model, loss, data, replace(config, num_draws=draws))
        found[draws], elapsed = timed(device, partial(run, device=device, warn=False))
        return elapsed

    with warnings.catch_warnings(record=True) as caught, in_flight_recorded() as in_flight:
        warnings.simplefilter("always")
        first = seconds(SHORT_DRAWS)
        step = per_step(seconds)
    fell_back = any("torch.compile does not support" in str(w.message) for w in caught)
    return Cost(step, first, found[LONG_DRAWS], in_flight[-1], fell_back)


def cost_row(chains: int, compiled: bool, cost: Cost, ratio: float) -> str:
    """A row of the step-cost table; a compiled one says what compiling cost."""
    how = ("fell back" if cost.fell_back else "yes") if compiled else "no"
    result, ms = cost.result, cost.step_s * 1e3
    row = f"{chains:6d} {result.precision:>15} {how:>10} {result.vectorized!s:>10}"
    row += f" {cost.in_flight:9d} {ms:11.2f} {ratio:16.2f} {ratio / chains:10.3f}"
    if compiled:
        row += f"  (compiling: the first estimate took {cost.first_s:.1f} s)"
    return row


def step_costs(device: torch.device, build: Build, plan: list[Row], goal: int) -> None:
    """Each row's step of all the chains against an AdamW training step, in its precision.

    ``goal``: the chains whose bfloat16 ratio is printed on its own line.
    """
    model, data = build(device)
    is_gpt2 = isinstance(model, GPT2LMHeadModel)
    name, loss = (f"GPT-2 {millions(model)}", gpt2_loss) if is_gpt2 else ("MLP", loss_fn)
    precisions = dict.fromkeys(autocast for _, autocast, _ in plan)
    train = {a: training_step_s(model, data, loss, device, a) for a in precisions}
    steps = ", ".join(
        f"{s * 1e3:.2f} ms {f'under {a} autocast' if a else 'in float32'}" for a, s in train.items()
    )
    print(f"        {name}: an AdamW training step {steps}")
    print(
        "        chains       precision   compiled vectorized in flight   ms / step"
        "  / training step  per chain"
    )
    lines, llcs = [], []
    for chains, autocast, compiled in plan:
        cost = chain_step(model, data, loss, device, fixed(chains, autocast, compiled))
        result, ratio = cost.result, cost.step_s / train[autocast]
        llcs.append(result.llc_mean)
        print(f"        {cost_row(chains, compiled, cost, ratio)}")
        if compiled:
            detail = f"{name}, {chains} chains, the first estimate {cost.first_s:.1f} s"
            check("compiled chains run compiled", not cost.fell_back, detail)
        if is_gpt2 and chains == goal and autocast == BF16:
            lines.append(
                f"        {chains}-chain step / training step, {name}, {result.precision}"
                f"{', compiled' if compiled else ''}: {ratio:.2f}"
                " (the goal, 16 chains of GPT-2 124M: at most 4)"
            )
    for line in lines:
        print(line)
    finite = int(np.isfinite(llcs).sum())
    detail = f"{finite} of {len(llcs)} rows"
    check(f"step-cost estimates finite, {name}", finite == len(llcs), detail)


def profiled_step(device: torch.device, quick: bool) -> None:
    """Where a chain step's time goes: 16 chains of GPT-2 124M under bfloat16 (4 of 0.6M quick)."""
    model, data = gpt2(2, 128, device) if quick else gpt2_124m(device)
    config = fixed(4 if quick else 16, BF16)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    run = partial(estimate_llc, model, gpt2_loss, data, device=device, warn=False)
    run(config)  # warm-up
    profiles: dict[int, profile] = {}

    def kernels(draws: int) -> float:
        with profile(activities=activities) as profiles[draws]:
            run(replace(config, num_draws=draws))
        device_events = (e for e in profiles[draws].events() if e.device_type == DeviceType.CUDA)
        return sum(not e.name.startswith(("Memcpy", "Memset")) for e in device_events)

    def operators(draws: int) -> float:
        with OperatorCount() as counted:
            run(replace(config, num_draws=draws))
        return sum(counted.counts.values())

    launched, dispatched = per_step(kernels), per_step(operators)
    print(
        f"        profile of an estimate of {config.num_chains} chains x {LONG_DRAWS} draws,"
        f" GPT-2 {millions(model)} under bfloat16 autocast:"
    )
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(profiles[LONG_DRAWS].key_averages().table(sort_by=sort_by, row_limit=15))
    also = f", {launched:.0f} CUDA kernels launched" if cuda else ""
    print(
        f"        a step of {config.num_chains} chains: {dispatched:.0f} operators dispatched{also}"
    )


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
        run = partial(estimate_llc, m, gpt2_loss, data, config, device=device, warn=False)
        found[name], seconds = timed(device, run)
        result = found[name]
        print(f"        {name}: llc {result.llc_mean:.3f} +- {result.llc_std:.3f}, {seconds:.1f} s")
    gap = abs(found["bfloat16"].llc_mean - found["float32"].llc_mean)
    # Two means of 4 chains each: within twice their combined standard error. The bfloat16
    # chains' spread depends on the processor's bfloat16 kernels (0.093 on an AVX-512 CPU
    # without bfloat16 instructions, against 0.010 in float32), so it enters the bound.
    error = np.hypot(*(r.llc_std / np.sqrt(config.num_chains) for r in found.values()))
    passed = gap <= 2 * max(error, 1e-6)
    check("a bfloat16 model estimates", passed, f"gap {gap:.3f}, bound {2 * error:.3f}")
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


def beside_training(device: torch.device, quick: bool) -> None:
    """A 1.3B GPT-2 (3.6M with --quick) estimates with 4 chains beside its training state."""
    if device.type != "cuda":
        print("        beside training: CUDA only (GPT-2 1.3B, its AdamW state and 4 chains)")
        return
    model, data = gpt2(4, 256, device) if quick else gpt2_1b3(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [_to(batch, device) for batch, _ in zip(data, range(3), strict=False)]
    torch.cuda.reset_peak_memory_stats(device)
    train(model, optimizer, gpt2_loss, batches[:2], BF16)  # AdamW's state made, gradients kept
    held = torch.cuda.memory_allocated(device)
    config = replace(fixed(4, BF16), num_burnin=10, num_draws=20)
    run = partial(estimate_llc, model, gpt2_loss, data, config, device=device, warn=False)
    result, seconds = timed(device, run)
    train(model, optimizer, gpt2_loss, batches[2:], BF16)  # and training goes on
    peak, total = torch.cuda.max_memory_allocated(device), torch.cuda.mem_get_info(device)[1]
    print(
        f"        GPT-2 {millions(model)}: training state {held / 1e9:.1f} GB (float32 weights,"
        f" gradients, AdamW), 4 chains in {seconds:.1f} s, peak {peak / 1e9:.1f} GB"
        f" of the card's {total / 1e9:.1f} GB"
    )
    finite = bool(np.isfinite(result.llc_per_chain).all())
    detail = f"llc {result.llc_mean:.3f}, peak {peak / total:.0%} of memory"
    check(f"GPT-2 {millions(model)} estimates beside its training", finite, detail)


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
    run = partial(estimate_llc, model, gpt2_loss, data, config, device=device, warn=False)
    _, seconds = timed(device, run)
    return torch.cuda.max_memory_allocated() - before, seconds


def training_step_s(model, data, loss, device: torch.device, autocast: str | None) -> float:
    """Seconds of an AdamW step of a copy of the model, over 10 batches after 2 warm-up steps."""
    copy = deepcopy(model)
    optimizer = torch.optim.AdamW(copy.parameters(), lr=1e-4)
    batches = [_to(batch, device) for batch, _ in zip(data, range(10), strict=False)]
    train(copy, optimizer, loss, batches[:2], autocast)
    _, seconds = timed(device, partial(train, copy, optimizer, loss, batches, autocast))
    return seconds / len(batches)


def train(model, optimizer, loss, batches: list, autocast: str | None) -> None:
    """A training step per batch, the forward pass under ``autocast``; the gradients kept."""
    device, dtype = next(model.parameters()).device, getattr(torch, autocast or "float32")
    for batch in batches:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
            value = loss(model, batch)
        value.backward()
        optimizer.step()


def _to(batch, device: torch.device):
    if isinstance(batch, dict):
        return {key: value.to(device) for key, value in batch.items()}
    return [value.to(device) for value in batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}")
    print(f"TF32 as the user's settings leave it: {tf32_settings()}")
    start = time.perf_counter()
    goal = 4 if args.quick else 16
    for run in (
        partial(vmap_equals_loop, device),
        partial(leaves_training_alone, device),
        partial(in_flight_changes_nothing, device),
        *(
            partial(step_costs, device, build, plan, goal)
            for build, plan in (QUICK_PLAN if args.quick else FULL_PLAN)
        ),
        partial(profiled_step, device, args.quick),
        partial(peak_memory, device, args.quick),
        partial(half_precision, device, args.quick),
        partial(lora_on_half_base, device, args.quick),
        partial(beside_training, device, args.quick),
        partial(sharded_on_two_gpus, device),
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
