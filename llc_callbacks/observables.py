"""What the chains' samples say beyond the LLC: the loss kernel and Bayesian influence.

Both read the per-example losses that ``estimate_llc(..., observables=...)`` records on the
chains' draws, samples of the localized tempered posterior around ``w*``:

- the loss kernel (Adam et al. 2025, arXiv:2509.26537): the posterior covariance, or
  correlation, of two examples' losses, ``Cov(l_i(w), l_j(w))``;
- the Bayesian influence function (Kreer et al. 2025, arXiv:2509.26544): the influence of
  example ``i`` on an observable ``phi`` is ``-Cov(l_i(w), phi(w))``; here ``phi`` is another
  example's loss.

Covariances are taken over every chain's recorded draws together, about their common mean
(the papers pool chains this way); each chain's own covariance gives the spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llc_callbacks.result import LLCResult


@dataclass(frozen=True)
class Covariance:
    """A posterior covariance (or correlation) between two sets of observations.

    Attributes:
        value: Pooled over the chains, shape ``(a, b)``.
        stderr: Its standard error: the spread of the chains' own values over the square
            root of their number, shape ``(a, b)``; NaN with one chain or one record.
        draws: The number of draws pooled (recorded draws of every chain).
    """

    value: np.ndarray
    stderr: np.ndarray
    draws: int


def loss_kernel(
    result: LLCResult, a: str, b: str | None = None, *, correlation: bool = False
) -> Covariance:
    """The loss kernel: the covariance of examples' losses, within an observable or between two.

    Args:
        result: An estimate made with ``observables``.
        a: One of its observables.
        b: Another (or the same); ``None``: ``a``.
        correlation: Normalize to correlations (the kernel Adam et al. cluster).

    Returns:
        The ``(examples of a, examples of b)`` kernel.

    Raises:
        ValueError: If ``a`` or ``b`` is not an observable of ``result``.
    """
    return _covariance(_samples(result, a), _samples(result, a if b is None else b), correlation)


def bif(result: LLCResult, a: str, b: str, *, correlation: bool = False) -> Covariance:
    """Bayesian influence of each example of ``a`` on each example's loss in ``b``.

    ``-Cov(l_i(w), l_j(w))``: positive when upweighting example ``i`` (lowering its loss)
    lowers example ``j``'s loss too.

    Args:
        result: An estimate made with ``observables``.
        a: The observable whose examples exert the influence (training examples).
        b: The observable whose losses feel it (a query set).
        correlation: Normalize to correlations.

    Returns:
        The ``(examples of a, examples of b)`` influences.

    Raises:
        ValueError: If ``a`` or ``b`` is not an observable of ``result``.
    """
    found = loss_kernel(result, a, b, correlation=correlation)
    return Covariance(-found.value, found.stderr, found.draws)


def summarize(result: LLCResult, top: int = 5) -> tuple[dict[str, float], list[list[Any]]]:
    """What a person can read of an estimate's observables, for a logger.

    Args:
        result: An estimate made with ``observables``.
        top: How many of the most influential examples to list per pair of observables.

    Returns:
        The mean loss-kernel correlation between every pair of observables (``a`` before or
        equal to ``b`` in their order; within one, off the diagonal), by ``"<a>:<b>"``; and
        rows ``[source, target, rank, example, influence]``: per ordered pair, the ``top``
        examples of ``source`` whose mean Bayesian influence on ``target``'s other examples
        is largest.
    """
    names = list(result.observables)
    means: dict[str, float] = {}
    rows: list[list[Any]] = []
    for i, a in enumerate(names):
        for b in names:
            same = a == b
            kernel = loss_kernel(result, a, b, correlation=True).value
            off = ~np.eye(*kernel.shape, dtype=bool) if same else np.ones_like(kernel, bool)
            if names.index(b) >= i and off.any():
                means[f"{a}:{b}"] = float(kernel[off].mean())
            influence = bif(result, a, b).value
            if same:
                np.fill_diagonal(influence, np.nan)
            mean = np.nanmean(influence, axis=1) if influence.shape[1] > same else None
            if mean is None:
                continue
            for rank, example in enumerate(np.argsort(-mean)[:top], start=1):
                rows.append([a, b, rank, int(example), float(mean[example])])
    return means, rows


def _samples(result: LLCResult, name: str) -> np.ndarray:
    """The recorded losses of the chains that did not diverge, ``(chains, records, examples)``."""
    if name not in result.observables:
        known = ", ".join(map(repr, result.observables)) or "none (pass observables=...)"
        raise ValueError(f"{name!r} is not an observable of this estimate; it has {known}")
    samples = result.observables[name].astype(np.float64)
    return samples[np.isfinite(samples).all(axis=(1, 2))]


def _covariance(x: np.ndarray, y: np.ndarray, correlation: bool) -> Covariance:
    """Pooled and per-chain covariances of ``x`` and ``y``, both ``(chains, records, n)``."""
    chains, records = x.shape[:2]
    pooled = _cov(x.reshape(chains * records, -1), y.reshape(chains * records, -1), correlation)
    stderr = np.full_like(pooled, np.nan)
    if chains > 1 and records > 1:
        own = np.stack([_cov(xc, yc, correlation) for xc, yc in zip(x, y, strict=True)])
        stderr = own.std(axis=0, ddof=1) / np.sqrt(chains)
    return Covariance(pooled, stderr, chains * records)


def _cov(x: np.ndarray, y: np.ndarray, correlation: bool) -> np.ndarray:
    """The covariance (or correlation) of the columns of ``x`` and ``y``; rows are draws."""
    dx, dy = x - x.mean(axis=0), y - y.mean(axis=0)
    cov = dx.T @ dy / (len(x) - 1)
    if correlation:
        cov = cov / np.outer(dx.std(axis=0, ddof=1), dy.std(axis=0, ddof=1))
    return cov
