"""Learning coefficients known in closed form, and the models they belong to.

``deep_linear_network``, ``regression_data`` and ``gaussian_nll`` build the problems of
``benchmarks/accuracy.py``: estimate with them and compare to ``dln_learning_coefficient``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from llc_callbacks.validation import check_int


def rrr_learning_coefficient(m: int, h: int, n: int, r: int) -> float:
    """The learning coefficient of reduced-rank regression ``y = B A x`` at a rank-``r`` truth.

    Aoyagi and Watanabe (2005), "Stochastic complexities of reduced rank regression in
    Bayesian estimation", Neural Networks 18(7), Theorem 1. It holds for the per-example
    negative log-likelihood with unit noise, ``0.5 * ((f(x) - y) ** 2).sum(-1).mean()``.

    Args:
        m: Input width M.
        h: Hidden width H.
        n: Output width N.
        r: Rank r of the true map, at most ``min(m, h, n)``.

    Returns:
        The learning coefficient λ; for example 6.5 for ``(5, 3, 5, 0)``, 9.5 for
        ``(5, 3, 5, 2)`` and 35 for ``(10, 6, 10, 3)``.

    Raises:
        ValueError: If a width is below 1 or ``r`` is outside ``[0, min(m, h, n)]``.
    """
    for name, value in (("m", m), ("h", h), ("n", n)):
        check_int(name, value, minimum=1)
    check_int("r", r, minimum=0)
    if r > min(m, h, n):
        raise ValueError(f"r must be at most min(m, h, n) = {min(m, h, n)}, got {r}")
    if m + h < n + r:
        return (h * m - h * r + n * r) / 2
    if n + h < m + r:
        return (h * n - h * r + m * r) / 2
    if m + n < h + r:
        return m * n / 2
    value = (2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2) / 8
    return value + (1 / 8 if (m + h + n + r) % 2 else 0)


def dln_learning_coefficient(widths: Sequence[int], r: int) -> float:
    """The learning coefficient of a deep linear network ``W_L ... W_1 x`` at a rank-r truth.

    Aoyagi (2024), "Consideration on the learning efficiency of multiple-layered neural
    networks with linear units", Neural Networks 172; restated as Theorem 1 of Furman and Lau
    (2024, arXiv:2402.03698). With ``M_j = H_j - r``, ``Σ`` is the set of the ``ℓ + 1``
    smallest ``M_j`` for the first ``ℓ`` such that ``max_Σ M < min_rest M``,
    ``S = Σ_Σ M_j >= ℓ max_Σ M`` and ``S < ℓ min_rest M`` (conditions on an empty rest hold);
    with ``Mbar = ceil(S / ℓ)`` and ``a = S - (Mbar - 1) ℓ``::

        λ = (r (H_1 + H_{L+1}) - r²) / 2 + a (ℓ - a) / (4 ℓ) - ℓ (ℓ - 1) / 4 (S / ℓ)²
            + ½ Σ_{j<k in Σ} M_j M_k

    One layer gives ``H_1 H_2 / 2``; two layers give ``rrr_learning_coefficient``.

    Args:
        widths: ``H_1, ..., H_{L+1}``: the input width, the hidden widths, the output width.
        r: Rank of the true product, at most the smallest width.

    Returns:
        The learning coefficient λ; for example 4.5 for widths ``[3, 6, 6, 3]`` and
        ``[6, 5, 5, 4, 6]`` gives 10.5, both at rank 1.

    Raises:
        ValueError: If fewer than two widths are given, a width is below 1, or ``r`` is
            outside ``[0, min(widths)]``.
    """
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"widths must list at least an input and an output width, got {widths}")
    for width in widths:
        check_int("widths", width, minimum=1)
    check_int("r", r, minimum=0)
    if r > min(widths):
        raise ValueError(f"r must be at most the smallest width {min(widths)}, got {r}")
    ordered = sorted(width - r for width in widths)
    for ell in range(1, len(ordered)):
        chosen, rest = ordered[: ell + 1], ordered[ell + 1 :]
        total = sum(chosen)
        if rest and not (chosen[-1] < rest[0] and total < ell * rest[0]):
            continue
        if total < ell * chosen[-1]:
            continue
        a = total - (math.ceil(total / ell) - 1) * ell
        pairs = sum(m * n for m, n in itertools.combinations(chosen, 2))
        return (
            (r * (widths[0] + widths[-1]) - r**2) / 2
            + a * (ell - a) / (4 * ell)
            - ell * (ell - 1) / 4 * (total / ell) ** 2
            + pairs / 2
        )
    raise AssertionError(f"no set Σ satisfies Aoyagi's conditions for {widths}, rank {r}")


def deep_linear_network(widths: Sequence[int], r: int, seed: int = 0) -> nn.Sequential:
    """A deep linear network ``W_L ... W_1 x`` at a truth whose product has rank ``r``.

    Each ``W_j`` is drawn with entries ``N(0, 1 / H_j)``; the first layer keeps only its
    first ``r`` rows. The local learning coefficient can differ between points of the true
    set, so the accuracy benchmark and tests fix this one.

    Args:
        widths: ``H_1, ..., H_{L+1}``, as in ``dln_learning_coefficient``.
        r: Rank of the product, at most the smallest width.
        seed: Seeds the weights.

    Returns:
        ``nn.Sequential`` of bias-free ``nn.Linear`` layers.
    """
    dln_learning_coefficient(widths, r)  # validates
    generator = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(widths)]
    with torch.no_grad():
        for index, layer in enumerate(layers):
            weight = torch.randn(layer.weight.shape, generator=generator) / layer.in_features**0.5
            if index == 0:
                weight[r:] = 0  # the first layer's rank bounds the product's
            layer.weight.copy_(weight)
    return nn.Sequential(*layers)


def regression_data(
    model: nn.Module, inputs: int, outputs: int, samples: int, seed: int = 0
) -> TensorDataset:
    """``(x, y)`` with ``x ~ N(0, I)`` and ``y = model(x) + N(0, I)``: unit noise.

    Args:
        model: The truth.
        inputs: Input width.
        outputs: Output width.
        samples: Number of examples ``n``.
        seed: Seeds inputs and noise.

    Returns:
        The data set.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=generator)
    with torch.no_grad():
        y = model(x) + torch.randn(samples, outputs, generator=generator)
    return TensorDataset(x, y)


def gaussian_nll(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean per-example negative log-likelihood under unit Gaussian noise, less constants.

    ``0.5 * ((f(x) - y) ** 2).sum(-1).mean()``: the loss the formulas above assume.
    ``F.mse_loss`` is it times ``2 / N`` for ``N`` outputs, which raises the temperature
    (see the README).
    """
    inputs, targets = batch
    return 0.5 * ((model(inputs) - targets) ** 2).sum(-1).mean()
