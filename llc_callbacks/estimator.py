"""``estimate_llc``: SGLD chains around a model's current weights."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llc_callbacks.config import LLCConfig
from llc_callbacks.data import batch_size, cycle_batches
from llc_callbacks.diagnostics import chain_diagnostics
from llc_callbacks.distributed import (
    broadcast_from_rank_zero,
    gather_from_every_rank,
    on_every_rank,
    rank_and_world,
    rank_chains,
)
from llc_callbacks.forked import ForkedModel, LossFn
from llc_callbacks.isolation import isolated
from llc_callbacks.result import LLCResult
from llc_callbacks.samplers import (
    SamplerState,
    mala_log_acceptance,
    rmsprop_sgld_step,
    sgld_step,
)

# How often (in steps) the loop asks the device whether every chain has diverged.
_DIVERGENCE_CHECK_EVERY = 32


class _ChainPart(NamedTuple):
    """What one process sampled: some chains, and the quantities every process shares."""

    chains: list[int]
    trace: np.ndarray  # (len(chains), draws)
    diverged: np.ndarray  # (len(chains),)
    reference: np.ndarray  # (draws,): L_m(w*) at each draw, NaN when not paired
    mala: np.ndarray | None  # (len(chains),): mean MALA acceptance, when measured
    init_loss: float
    nbeta: float
    vectorized: bool


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig = LLCConfig(),
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    distributed: bool = False,
    warn: bool = True,
) -> LLCResult:
    """Estimate the local learning coefficient of a model at its current weights.

    The trainable weights are forked as float32 tensors; ``config.num_chains`` SGLD chains
    sample the localized tempered posterior around them, sharing each minibatch. The live
    model's weights, gradients, buffers, train/eval modes and the global RNG states are left
    exactly as they were. Chains run in eval mode (no dropout; BatchNorm uses its running
    statistics), so the posterior is that of the deterministic model.

    Args:
        model: The model at the weights ``w*`` to estimate at.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean minibatch loss.
        data: Re-iterable of batches (a DataLoader), cycled when it runs out.
        config: Sampling hyperparameters.
        device: Where chains run; defaults to the device of the model's first parameter.
        progress: Show a progress bar over chain steps.
        distributed: Split the chains over the ranks of the initialized ``torch.distributed``
            process group and gather them, so that every rank returns the same result. Every
            rank must call it with the same data and config; all sample around rank zero's
            weights and buffers. Chain ``i`` depends only on the seed, ``i``, the weights and
            the batches, so the result equals a single-process run's.
        warn: Warn about every failed health check (``LLCResult.problems``); a monitor turns
            this off and warns once per check and run instead.

    Returns:
        The estimate with its traces and diagnostics. Chains whose loss goes NaN or infinite
        stop counting and are reported in ``diagnostics["num_diverged"]``; if all do, the
        estimate is NaN. With ``config.step_size="auto"`` the step size is first chosen by
        ``calibrate`` (on every call: a monitor calibrates once per run).

    Raises:
        TypeError: If ``model`` is not a module, ``loss_fn`` is not callable or returns
            something other than a scalar tensor, or ``config`` is not an ``LLCConfig``.
        ValueError: If ``data`` yields no batch or the model has nothing to sample.
        RuntimeError: If ``config.vectorize=True`` and the model does not support ``vmap``,
            or, when distributed, if the estimate failed on any rank (raised on every rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    if not isinstance(config, LLCConfig):
        raise TypeError(f"config must be an LLCConfig, got {type(config).__name__}")
    if config.step_size == "auto":
        from llc_callbacks.calibration import calibrate  # calibrate itself calls estimate_llc

        calibration = calibrate(
            model, loss_fn, data, config, device=device, progress=progress, distributed=distributed
        )
        config = dataclasses.replace(config, step_size=calibration.chosen_step_size())
    start = time.perf_counter()
    device = torch.device(device) if device is not None else _model_device(model)
    rank, world_size = rank_and_world() if distributed else (0, 1)
    chains = rank_chains(config.num_chains, rank, world_size)
    # One chain gains nothing from vmap but its overhead.
    vectorize = False if len(chains) == 1 and config.vectorize == "auto" else config.vectorize
    with _sampling(model, config, device):
        if world_size == 1:
            forked = ForkedModel(model, loss_fn, device, vectorize)
            parts = [_sample(forked, data, config, chains, progress)]
        else:
            forked = on_every_rank(lambda: ForkedModel(model, loss_fn, device, vectorize))
            # Ranks may hold different buffers (BatchNorm statistics are not synchronized):
            # every rank samples around rank zero's weights.
            broadcast_from_rank_zero([forked.anchor, *forked.constants.values()])
            parts = gather_from_every_rank(
                lambda: _sample(forked, data, config, chains, progress and rank == 0)
            )
    result = _result(parts, config, time.perf_counter() - start)
    if warn:
        for message in result.problems().values():
            warnings.warn(f"llc_callbacks: {message}", stacklevel=2)
    return result


@contextmanager
def _sampling(model: nn.Module, config: LLCConfig, device: torch.device) -> Iterator[None]:
    """Isolate the training process, enable gradients, and keep chains in float32."""
    with (
        isolated(model, config.seed),
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(device.type, enabled=False)
        if device.type in ("cpu", "cuda")
        else nullcontext(),
    ):
        yield


def _sample(
    forked: ForkedModel, data: Iterable[Any], config: LLCConfig, chains: list[int], progress: bool
) -> _ChainPart:
    """Measure ``L(w*)`` and run the given chains."""
    batches = cycle_batches(data, forked.anchor.device)
    first = next(batches)
    nbeta = config.resolve_nbeta(batch_size(first))
    init_batches = [first] + [next(batches) for _ in range(config.init_loss_batches - 1)]
    init_loss = torch.stack([forked.loss_at_anchor(b) for b in init_batches]).mean().item()
    trace, reference, diverged, mala = _run_chains(forked, batches, config, nbeta, chains, progress)
    return _ChainPart(
        chains, trace, diverged, reference, mala, init_loss, nbeta, bool(forked.vectorized)
    )


def _result(parts: list[_ChainPart], config: LLCConfig, elapsed_s: float) -> LLCResult:
    """Put every process's chains back in order and summarize them."""
    first = parts[0]  # rank 0 always runs chain 0, so it sampled the shared reference
    trace = np.empty((config.num_chains, config.num_draws))
    diverged = np.empty(config.num_chains, dtype=bool)
    mala = np.empty(config.num_chains) if config.mala else None
    for part in parts:
        trace[part.chains] = part.trace
        diverged[part.chains] = part.diverged
        if mala is not None:
            mala[part.chains] = part.mala
    excess = trace - (first.reference if config.paired else first.init_loss)
    per_chain = np.where(diverged, np.nan, first.nbeta * excess.mean(axis=1))
    healthy = per_chain[~diverged]
    return LLCResult(
        llc_mean=float(healthy.mean()) if len(healthy) else math.nan,
        llc_std=float(healthy.std(ddof=1)) if len(healthy) > 1 else math.nan,
        llc_per_chain=per_chain,
        loss_trace=trace,
        init_loss=first.init_loss,
        diagnostics=chain_diagnostics(excess, diverged, mala),
        config=config,
        nbeta=first.nbeta,
        vectorized=first.vectorized,
        elapsed_s=elapsed_s,
    )


def _run_chains(
    forked: ForkedModel,
    batches: Any,
    config: LLCConfig,
    nbeta: float,
    chain_ids: list[int],
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Run the given chains.

    Returns:
        Their losses at each draw, the per-draw ``L_m(w*)``, which diverged, and their mean
        MALA acceptance (``None`` unless ``config.mala``).
    """
    chains, draws, device = len(chain_ids), config.num_draws, forked.anchor.device
    step = _sampler_step(config, nbeta)
    generators = [_chain_generator(config.seed, c, device) for c in chain_ids]
    state = SamplerState(forked.anchor.expand(chains, -1).clone())
    noise = torch.empty_like(state.weights)
    trace = torch.full((chains, draws), float("nan"), device=device)
    reference = torch.full((draws,), float("nan"), device=device)
    acceptance = torch.zeros(chains, device=device)
    healthy = torch.ones(chains, dtype=torch.bool, device=device)
    total = config.num_burnin + draws if chains else 0
    for t in tqdm(range(total), desc="LLC chains", disable=not progress, leave=False):
        batch = next(batches)
        losses, grads = forked.loss_and_grad(state.weights, batch)
        healthy &= torch.isfinite(losses)
        drawing = t >= config.num_burnin
        if drawing:
            trace[:, t - config.num_burnin] = torch.where(healthy, losses, float("nan"))
            if config.paired:
                reference[t - config.num_burnin] = forked.loss_at_anchor(batch)
        for row, generator in zip(noise, generators, strict=True):
            row.normal_(generator=generator)
        new_state = step(state, grads, noise, forked.anchor)
        if drawing and config.mala:
            acceptance += _mala_acceptance(
                forked, state, new_state, losses, grads, batch, config, nbeta
            )
        state = new_state
        if (t + 1) % _DIVERGENCE_CHECK_EVERY == 0 and not healthy.any():
            break
    mala = (acceptance / draws).cpu().numpy() if config.mala else None
    return trace.cpu().numpy(), reference.cpu().numpy(), (~healthy).cpu().numpy(), mala


def _mala_acceptance(
    forked: ForkedModel,
    state: SamplerState,
    new_state: SamplerState,
    losses: Tensor,
    grads: Tensor,
    batch: Any,
    config: LLCConfig,
    nbeta: float,
) -> Tensor:
    """Per-chain MALA acceptance probability of one step (one more gradient, same batch)."""
    new_losses, new_grads = forked.loss_and_grad(new_state.weights, batch)
    precond = None
    if config.sampler == "rmsprop_sgld":
        precond = (new_state.square_avg.sqrt() + config.rmsprop_eps).reciprocal()
    log_acceptance = mala_log_acceptance(
        state.weights,
        new_state.weights,
        forked.anchor,
        losses,
        new_losses,
        grads,
        new_grads,
        step_size=config.step_size,
        nbeta=nbeta,
        localization=config.localization,
        precond=precond,
    )
    return torch.nan_to_num(log_acceptance.exp(), nan=0.0)


def _sampler_step(config: LLCConfig, nbeta: float):
    common = {"step_size": config.step_size, "nbeta": nbeta, "localization": config.localization}
    if config.sampler == "rmsprop_sgld":
        return functools.partial(
            rmsprop_sgld_step, alpha=config.rmsprop_alpha, eps=config.rmsprop_eps, **common
        )
    return functools.partial(sgld_step, **common)


def _chain_generator(seed: int, chain: int, device: torch.device) -> torch.Generator:
    """A noise generator that depends only on the seed and the chain's index."""
    chain_seed = int(np.random.SeedSequence([seed, chain]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(chain_seed)


def _model_device(model: nn.Module) -> torch.device:
    tensor: Tensor | None = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
