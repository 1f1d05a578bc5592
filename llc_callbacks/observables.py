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

import numpy as np

from llc_callbacks.result import LLCResult


@dataclass(frozen=True)
class Covariance:
    """A posterior covariance (or correlation) between two sets of observations.

    Attributes:
        value: Pooled over the chains, shape ``(a, b)``.
        stderr: Its standard error: the spread of the chains' own values over the square
            root of their number, shape ``(a, b)``; NaN with one chain.
        draws: The number of draws pooled (recorded draws of every chain).
    """

    value: np.ndarray
    stderr: np.ndarray
    draws: int


def loss_kernel(result: LLCResult, name: str, *, correlation: bool = False) -> Covariance:
    """The loss kernel of one observable: the covariance of its examples' losses.

    Args:
        result: An estimate made with ``observables``.
        name: One of its observables.
        correlation: Normalize to correlations (the kernel Adam et al. cluster).

    Returns:
        The ``(examples, examples)`` kernel.

    Raises:
        ValueError: If ``name`` is not an observable of ``result``.
    """
    samples = _samples(result, name)
    return _covariance(samples, samples, correlation)


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
    found = _covariance(_samples(result, a), _samples(result, b), correlation)
    return Covariance(-found.value, found.stderr, found.draws)


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
    own = np.stack([_cov(xc, yc, correlation) for xc, yc in zip(x, y, strict=True)])
    stderr = (
        own.std(axis=0, ddof=1) / np.sqrt(chains) if chains > 1 else np.full_like(pooled, np.nan)
    )
    return Covariance(pooled, stderr, chains * records)


def _cov(x: np.ndarray, y: np.ndarray, correlation: bool) -> np.ndarray:
    """The covariance (or correlation) of the columns of ``x`` and ``y``; rows are draws."""
    dx, dy = x - x.mean(axis=0), y - y.mean(axis=0)
    cov = dx.T @ dy / (len(x) - 1)
    if correlation:
        cov = cov / np.outer(dx.std(axis=0, ddof=1), dy.std(axis=0, ddof=1))
    return cov
