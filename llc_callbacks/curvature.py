"""Curvature at the current weights: Hessian traces, top eigenvalue, the step size it implies.

Measured next to the LLC to show what it adds, each on forked weights, isolated from training
as the chains are; ``mala_step_size`` gives a streaming monitor its step size. A Hessian-vector
product is a central difference of gradients, ``H v ≈ (g(w* + h v) - g(w* - h v)) / 2h`` with a
perturbation of root-mean-square ``h`` per weight: exact for a quadratic loss up to rounding,
it needs first derivatives only (every model the chains can sample), and the probes of
Hutchinson's estimator share one vectorized gradient evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn

from llc_callbacks.config import LLCConfig
from llc_callbacks.data import batch_size, cycle_batches, example, sampling_size
from llc_callbacks.distributed import gather_from_every_rank
from llc_callbacks.estimator import fork, model_device, sampling
from llc_callbacks.forked import ForkedModel, LossFn
from llc_callbacks.validation import check_choice, check_int

CURVATURES = ("hessian_trace", "fisher_trace", "top_eigenvalue")
# Root-mean-square perturbation per weight of the finite differences, relative to the
# weights' own (or absolute below 1): small enough that the third derivative's error
# (second order in it) stays below float32 rounding of the gradients divided by it.
FD_STEP = 1e-3
# Rademacher probes of tr(A^3) in mala_step_size. The localization's share of it, d gamma^3,
# is exact with every probe; on benchmarks/curves.py's runs 8 probes had a standard error of
# 0.1% to 6% of the trace, so 4 have at most 9%, and the step size (its cube root) 3%.
STEP_SIZE_PROBES = 4


def estimate_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    quantities: Sequence[str] = CURVATURES,
    *,
    probes: int = 16,
    iterations: int = 20,
    examples: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Measure the loss's curvature at the model's current weights, on the data's first batch.

    Args:
        model: The model at the weights ``w*``; left exactly as it was (weights, gradients,
            modes, RNG states).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean minibatch loss.
        data: Re-iterable of batches; the first one is used.
        quantities: Any of ``"hessian_trace"`` (Hutchinson's estimator with ``probes``
            Rademacher probes), ``"fisher_trace"`` (the mean squared norm of per-example
            gradients over the batch's first ``examples`` examples) and ``"top_eigenvalue"``
            (power iteration on Hessian-vector products: the eigenvalue of largest
            magnitude, negative where the weights are not at a minimum).
        probes: Rademacher probes of the Hessian trace, at least 2.
        iterations: Power iterations for the top eigenvalue.
        examples: Per-example gradients for the Fisher trace, at least 2.
        seed: Seeds the probes and the start of the power iteration.
        device: Where to compute; the model's device by default.

    Returns:
        Each quantity asked for by name, and ``hessian_trace_stderr`` and
        ``fisher_trace_stderr``: the standard errors of the two traces' means over probes
        and examples.

    Raises:
        ValueError: If a quantity is unknown, a count is out of range, or the data yields no
            batch; the message names the argument.
    """
    quantities = list(quantities)
    if not quantities:
        raise ValueError(f"quantities must name at least one of {', '.join(CURVATURES)}")
    for quantity in quantities:
        check_choice("quantities", quantity, CURVATURES)
    check_int("probes", probes, minimum=2)
    check_int("iterations", iterations, minimum=1)
    check_int("examples", examples, minimum=2)
    check_int("seed", seed, minimum=0)
    device = torch.device(device) if device is not None else model_device(model)
    config = LLCConfig(seed=seed)
    with sampling(model, config, device):
        forked = ForkedModel(model, loss_fn, device, config.vectorize)
        batch = next(cycle_batches(data, device, forked.precision))
        generator = torch.Generator(device=device).manual_seed(seed)
        found: dict[str, float] = {}
        if "hessian_trace" in quantities:
            products = _rademacher(probes, forked.anchor, generator)
            values = (products * hessian_vector_products(forked, batch, products)).sum(dim=1)
            found.update(_mean_and_stderr("hessian_trace", values))
        if "fisher_trace" in quantities:
            found.update(
                _mean_and_stderr("fisher_trace", _squared_gradients(forked, batch, examples))
            )
        if "top_eigenvalue" in quantities:
            found["top_eigenvalue"] = _top_eigenvalue(forked, batch, iterations, generator)
    return found


def mala_step_size(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig,
    *,
    device: torch.device | str | None = None,
    distributed: bool = False,
) -> float:
    """The SGLD step size whose MALA acceptance is ``config.target_acceptance``, from curvature.

    In the Gaussian approximation of the localized tempered posterior at ``w*``, whose
    precision is ``A = nbeta H + gamma I`` (``H`` the Hessian of the mean minibatch loss),
    MALA's log acceptance ratio of a step ``eps`` in equilibrium is normal with variance
    ``s^2 = eps^3 tr(A^3) / 16`` and mean ``-s^2 / 2``, so the mean acceptance is
    ``2 Phi(-s / 2)``, and the step size reaching a target is ``(16 s^2 / tr(A^3))^(1/3)``:
    ``d^(-1/3) / gamma`` where the localization dominates (``d`` weights), smaller where the
    loss is curved. ``tr(A^3)`` is Hutchinson's estimate ``(A z)^T A (A z)`` over
    ``STEP_SIZE_PROBES`` Rademacher probes ``z``, on the data's first batch: two
    Hessian-vector products per probe, ``4 * STEP_SIZE_PROBES`` gradients in all. On
    ``benchmarks/curves.py``'s runs, chains at this step size had MALA acceptances of 0.89 to
    0.92 for a target of 0.9, where 400 steps of adaptation from ``w*`` stopped at step sizes
    up to 2.7 times smaller (``chains._Phases``: a chain relaxing from ``w*`` accepts less).

    Args:
        model: The model at the weights ``w*``; left exactly as it was.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean minibatch loss.
        data: Re-iterable of batches; the first one is used.
        config: The chains' settings (``nbeta``, ``localization``, ``target_acceptance``).
        device: Where to compute; the model's device by default.
        distributed: Every rank takes rank zero's step size (a collective).

    Returns:
        The step size.

    Raises:
        ValueError: If the estimated ``tr(A^3)`` is not positive (the weights are far from a
            minimum that the localization holds), or the data yields no batch.
    """
    device = torch.device(device) if device is not None else model_device(model)

    def measured() -> float:
        with sampling(model, config, device):
            forked = fork(model, loss_fn, config, device, distributed)
            batch = next(cycle_batches(data, device, forked.precision))
            nbeta = config.resolve_nbeta(sampling_size(loss_fn, batch))
            generator = torch.Generator(device=device).manual_seed(config.seed)
            probes = _rademacher(STEP_SIZE_PROBES, forked.anchor, generator)

            def precision_times(vectors: Tensor) -> Tensor:
                hessian = hessian_vector_products(forked, batch, vectors)
                return nbeta * hessian + config.localization * vectors

            once = precision_times(probes)
            cube_trace = float((once * precision_times(once)).sum(dim=1).double().mean())
        if not cube_trace > 0:
            raise ValueError(
                f"the curvature at the weights gives tr(A^3) = {cube_trace:.3g}: not a minimum"
                f" that the localization ({config.localization}) holds; raise it"
            )
        spread = -2 * NormalDist().inv_cdf(config.target_acceptance / 2)
        return (16 * spread**2 / cube_trace) ** (1 / 3)

    return gather_from_every_rank(measured)[0] if distributed else measured()


def hessian_vector_products(forked: ForkedModel, batch: Any, vectors: Tensor) -> Tensor:
    """``H v`` at ``w*`` for each row ``v``, by central differences of gradients.

    Args:
        forked: The forked model.
        batch: One batch on the forked weights' device.
        vectors: Shape ``(k, dim)``, non-zero rows.

    Returns:
        The products, shape ``(k, dim)``, from one evaluation of ``2k`` gradients.
    """
    anchor = forked.anchor
    scale = FD_STEP * max(1.0, anchor.square().mean().sqrt().item())
    # Per row, a step whose perturbation has root-mean-square ``scale`` per weight.
    steps = scale * math.sqrt(anchor.numel()) / vectors.norm(dim=1, keepdim=True)
    shifts = steps * vectors
    _, grads = forked.loss_and_grad(torch.cat([anchor + shifts, anchor - shifts]), batch)
    forward, backward = grads.split(len(vectors))
    return (forward - backward) / (2 * steps)


def _rademacher(count: int, anchor: Tensor, generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, (count, anchor.numel()), generator=generator, device=anchor.device)
    return signs.to(anchor.dtype).mul_(2).sub_(1)


def _squared_gradients(forked: ForkedModel, batch: Any, examples: int) -> Tensor:
    """``||grad loss_i(w*)||^2`` for the batch's first ``examples`` examples, one at a time."""
    count = min(examples, batch_size(batch))
    if count < 2:
        raise ValueError(f"fisher_trace needs batches of at least 2 examples, got {count}")
    anchor = forked.anchor[None]
    norms = [
        forked.loss_and_grad(anchor, example(batch, i))[1].square().sum() for i in range(count)
    ]
    return torch.stack(norms)


def _top_eigenvalue(
    forked: ForkedModel, batch: Any, iterations: int, generator: torch.Generator
) -> float:
    """The Rayleigh quotient after ``iterations`` power iterations from a random start."""
    vector = torch.randn(forked.anchor.numel(), generator=generator, device=forked.anchor.device)
    vector /= vector.norm()
    eigenvalue = math.nan
    for _ in range(iterations):
        product = hessian_vector_products(forked, batch, vector[None])[0]
        eigenvalue = float(vector @ product)
        norm = product.norm()
        if not norm > 0:
            break
        vector = product / norm
    return eigenvalue


def _mean_and_stderr(name: str, values: Tensor) -> dict[str, float]:
    values = values.double()
    return {
        name: float(values.mean()),
        f"{name}_stderr": float(values.std() / math.sqrt(len(values))),
    }
