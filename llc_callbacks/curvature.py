"""Curvature at the current weights: Hessian trace, empirical Fisher trace, top eigenvalue.

Measured next to the LLC to show what it adds, each on forked weights, isolated from training
as the chains are. A Hessian-vector product is a central difference of gradients,
``H v ≈ (g(w* + h v) - g(w* - h v)) / 2h`` with a perturbation of root-mean-square ``h`` per
weight: exact for a quadratic loss up to rounding, it needs first derivatives only (every
model the chains can sample), and the probes of Hutchinson's estimator share one vectorized
gradient evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from llc_callbacks.config import LLCConfig
from llc_callbacks.data import batch_size, cycle_batches, example
from llc_callbacks.estimator import model_device, sampling
from llc_callbacks.forked import ForkedModel, LossFn
from llc_callbacks.validation import check_choice, check_int

CURVATURES = ("hessian_trace", "fisher_trace", "top_eigenvalue")
# Root-mean-square perturbation per weight of the finite differences, relative to the
# weights' own (or absolute below 1): small enough that the third derivative's error
# (second order in it) stays below float32 rounding of the gradients divided by it.
FD_STEP = 1e-3


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
