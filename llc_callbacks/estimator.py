"""``estimate_llc``: SGLD chains around a model's current weights."""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llc_callbacks.config import LLCConfig
from llc_callbacks.data import batch_size, cycle_batches
from llc_callbacks.diagnostics import chain_diagnostics
from llc_callbacks.forked import ForkedModel, LossFn
from llc_callbacks.isolation import isolated
from llc_callbacks.result import LLCResult
from llc_callbacks.samplers import SamplerState, rmsprop_sgld_step, sgld_step

# How often (in steps) the loop asks the device whether every chain has diverged.
_DIVERGENCE_CHECK_EVERY = 32


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig = LLCConfig(),
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
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

    Returns:
        The estimate with its traces and diagnostics. Chains whose loss goes NaN or infinite
        stop counting and are reported in ``diagnostics["num_diverged"]`` with a warning; if
        all do, the estimate is NaN.

    Raises:
        TypeError: If ``model`` is not a module, ``loss_fn`` is not callable or returns
            something other than a scalar tensor, or ``config`` is not an ``LLCConfig``.
        ValueError: If ``data`` yields no batch or the model has nothing to sample.
        RuntimeError: If ``config.vectorize=True`` and the model does not support ``vmap``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    if not isinstance(config, LLCConfig):
        raise TypeError(f"config must be an LLCConfig, got {type(config).__name__}")
    start = time.perf_counter()
    device = torch.device(device) if device is not None else _model_device(model)
    with isolated(model, config.seed), torch.inference_mode(False), torch.enable_grad():
        # One chain gains nothing from vmap but its overhead.
        single = config.num_chains == 1 and config.vectorize == "auto"
        forked = ForkedModel(model, loss_fn, device, False if single else config.vectorize)
        batches = cycle_batches(data, device)
        first = next(batches)
        nbeta = config.resolve_nbeta(batch_size(first))
        init_batches = [first] + [next(batches) for _ in range(config.init_loss_batches - 1)]
        init_loss = torch.stack([forked.loss_at_anchor(b) for b in init_batches]).mean().item()
        trace, reference, diverged = _run_chains(forked, batches, config, nbeta, progress)
    excess = trace - (reference if config.paired else init_loss)
    per_chain = np.where(diverged, np.nan, nbeta * excess.mean(axis=1))
    healthy = per_chain[~diverged]
    _warn_if_unhealthy(init_loss, diverged, config)
    return LLCResult(
        llc_mean=float(healthy.mean()) if len(healthy) else math.nan,
        llc_std=float(healthy.std(ddof=1)) if len(healthy) > 1 else math.nan,
        llc_per_chain=per_chain,
        loss_trace=trace,
        init_loss=init_loss,
        diagnostics=chain_diagnostics(excess, diverged),
        config=config,
        nbeta=nbeta,
        vectorized=bool(forked.vectorized),
        elapsed_s=time.perf_counter() - start,
    )


def _run_chains(
    forked: ForkedModel, batches: Any, config: LLCConfig, nbeta: float, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the chains; return the loss trace, the per-draw loss at ``w*`` and diverged chains."""
    chains, draws, device = config.num_chains, config.num_draws, forked.anchor.device
    step = _sampler_step(config, nbeta)
    generators = [_chain_generator(config.seed, c, device) for c in range(chains)]
    state = SamplerState(forked.anchor.expand(chains, -1).clone())
    noise = torch.empty_like(state.weights)
    trace = torch.full((chains, draws), float("nan"), device=device)
    reference = torch.full((draws,), float("nan"), device=device)
    healthy = torch.ones(chains, dtype=torch.bool, device=device)
    total = config.num_burnin + draws
    for t in tqdm(range(total), desc="LLC chains", disable=not progress, leave=False):
        batch = next(batches)
        losses, grads = forked.loss_and_grad(state.weights, batch)
        healthy &= torch.isfinite(losses)
        if t >= config.num_burnin:
            trace[:, t - config.num_burnin] = torch.where(healthy, losses, float("nan"))
            if config.paired:
                reference[t - config.num_burnin] = forked.loss_at_anchor(batch)
        for row, generator in zip(noise, generators, strict=True):
            row.normal_(generator=generator)
        state = step(state, grads, noise, forked.anchor)
        if (t + 1) % _DIVERGENCE_CHECK_EVERY == 0 and not healthy.any():
            break
    return trace.cpu().numpy(), reference.cpu().numpy(), (~healthy).cpu().numpy()


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


def _warn_if_unhealthy(init_loss: float, diverged: np.ndarray, config: LLCConfig) -> None:
    if not math.isfinite(init_loss):
        warnings.warn(
            f"llc_callbacks: the loss at the current weights is {init_loss}; the LLC is NaN.",
            stacklevel=3,
        )
    elif diverged.all():
        warnings.warn(
            f"llc_callbacks: all {config.num_chains} chains diverged (loss became NaN or "
            f"infinite); the LLC is NaN. Lower step_size (now {config.step_size:g}) or raise "
            "localization.",
            stacklevel=3,
        )
    elif diverged.any():
        warnings.warn(
            f"llc_callbacks: {int(diverged.sum())} of {config.num_chains} chains diverged and "
            f"are left out of the LLC; consider a smaller step_size (now {config.step_size:g}).",
            stacklevel=3,
        )


def _model_device(model: nn.Module) -> torch.device:
    tensor: Tensor | None = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
