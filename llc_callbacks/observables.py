"""What the chains' samples say beyond the LLC: loss kernel, Bayesian influence, susceptibility.

All read the per-example (or per-token) losses that ``estimate_llc(..., observables=...)``
records on the chains' draws, samples of the localized tempered posterior around ``w*``:

- the loss kernel (Adam et al. 2025, arXiv:2509.26537): the posterior covariance, or
  correlation, of two examples' losses, ``Cov(l_i(w), l_j(w))``;
- the Bayesian influence function (Kreer et al. 2025, arXiv:2509.26544): the influence of
  example ``i`` on an observable ``phi`` is ``-Cov(l_i(w), phi(w))``; here ``phi`` is another
  example's loss;
- susceptibilities (Baker et al. 2025, arXiv:2504.18274): how a component's loss, sampled by
  chains that move only that component's weights, responds to shifting the data toward a
  probe set (``susceptibility``).

Covariances are taken over every chain's recorded draws together, about their common mean
(the papers pool chains this way); each chain's own covariance gives the spread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llc_callbacks.forked import ObserveFn
from llc_callbacks.result import LLCResult


@dataclass(frozen=True)
class Probe:
    """A probe set whose losses the chains record, and how each is measured.

    ``observables={"code": loader}`` is ``Probe(loader)``: one loss per example.

    Attributes:
        data: Re-iterable of batches (a DataLoader), read once per estimate.
        losses: ``losses(model, batch) -> Tensor`` of shape ``(batch, ...)``: the values to
            record, flattened per batch (``token_losses``: one per token of a causal language
            model); ``None``: ``loss_fn`` on each example as a batch of one. It runs under
            ``torch.func.vmap`` over the chains and ``torch.no_grad``, with the model's
            weights swapped for each chain's.
    """

    data: Iterable[Any]
    losses: ObserveFn | None = None


def probe_sets(observables: Mapping[str, Any] | None) -> dict[str, Probe]:
    """The probe sets of ``observables=...``, each a ``Probe``.

    Args:
        observables: Names mapped to re-iterables of batches or to ``Probe``.

    Raises:
        ValueError: If a name is empty, not a string or holds ``/`` or ``:`` (they name
            metrics), or a value is neither a ``Probe`` nor a re-iterable (a one-shot iterator
            would be empty at the second estimate).
    """
    probes = {}
    for name, value in (observables or {}).items():
        if not isinstance(name, str) or not name or set(name) & {"/", ":"}:
            raise ValueError(f"observables names hold no '/' or ':', got {name!r}")
        probe = value if isinstance(value, Probe) else Probe(value)
        if not isinstance(probe.data, Iterable) or isinstance(probe.data, Iterator):
            raise ValueError(
                f"observables[{name!r}] must be a re-iterable of batches (a DataLoader) or a"
                f" Probe, got {type(probe.data).__name__}"
            )
        if probe.losses is not None and not callable(probe.losses):
            raise ValueError(
                f"observables[{name!r}].losses must be callable(model, batch), got"
                f" {type(probe.losses).__name__}"
            )
        probes[name] = probe
    return probes


def token_losses(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-token losses of a causal language model: a ``Probe.losses`` hook.

    The cross-entropy of each next token, as a transformers causal LM computes its loss:
    ``labels`` (``input_ids`` when absent) shifted by one; positions labelled ``-100`` get 0.

    Args:
        model: Called as ``model(input_ids=..., attention_mask=...)``; returns logits or an
            output with ``.logits``, ``(batch, tokens, vocabulary)``.
        batch: A mapping with ``input_ids`` and, optionally, ``attention_mask`` and ``labels``.

    Returns:
        The losses, shape ``(batch, tokens - 1)``.
    """
    labels = batch.get("labels", batch["input_ids"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = getattr(out, "logits", out)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none"
    )


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
    return _covariance(*_samples(result, a, a if b is None else b), correlation)


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


@dataclass(frozen=True)
class Susceptibility:
    """A component's susceptibility to a shift of the data toward a source.

    Attributes:
        value: ``chi``, pooled over the chains.
        stderr: Its standard error from the chains' own values (NaN with one chain).
        per_example: ``chi_x`` for each value the source records (an example, or a token
            with ``token_losses``): signed attributions whose mean is ``value``.
        draws: The number of draws pooled.
    """

    value: float
    stderr: float
    per_example: np.ndarray
    draws: int


def susceptibility(
    result: LLCResult, source: str, base: str, component: str | None = None
) -> Susceptibility:
    """How a component's loss responds to shifting the data from ``base`` toward ``source``.

    Baker et al. (2025, arXiv:2504.18274) perturb the data distribution ``q`` toward a probe
    distribution ``q'``, ``q_h = (1 - h) q + h q'``, and measure the first-order change of
    the posterior expectation of an observable localized on a component ``C``. With only
    ``C``'s weights sampled (a weight restriction; the rest held at ``w*``) the localized
    posterior is ``p_h(w) ~ exp(-n beta L_h(w) - gamma/2 |w - w*|^2)``, ``L_h = (1 - h) L +
    h L'``, and differentiating its expectation gives the linear response

        d/dh E_h[phi] |_(h=0) = -n beta Cov[phi, L' - L].

    The observable is the component's loss ``phi = L``, both losses the means over the probe
    sets ``base`` (a sample of ``q``, the training data) and ``source`` (of ``q'``):

        chi = -Cov[L, L' - L] = (d/dh E_h[L] |_(h=0)) / (n beta),

    which factorizes over the source's examples (or tokens) ``x``: ``chi = mean_x chi_x``,
    ``chi_x = -Cov[L, l_x - L]``. Positive ``chi``: shifting the data toward ``source``
    raises the component's expected loss (its weights spread, ``source`` constrains them
    less than ``base`` does). Multiply by ``result.nbeta`` for the derivative itself.

    Args:
        result: An estimate made with ``observables`` holding ``base`` and ``source``.
        source: The observable the data shifts toward.
        base: The observable sampling the data it shifts from.
        component: A weight restriction of ``result`` on its data (its chains moved only
            the component's weights); ``None``: the whole model.

    Returns:
        The susceptibility, with its spread and per-example factors.

    Raises:
        ValueError: If ``component`` is not such a restriction of ``result``, or ``source``
            or ``base`` is not one of its observables.
    """
    found = result if component is None else _component(result, component)
    values, base_values = _samples(found, source, base)
    phi = base_values.mean(axis=2, keepdims=True)
    shift = values - phi
    total = _covariance(phi, shift.mean(axis=2, keepdims=True), correlation=False)
    each = _covariance(phi, shift, correlation=False)
    return Susceptibility(
        float(-total.value[0, 0]), float(total.stderr[0, 0]), -each.value[0], total.draws
    )


@dataclass(frozen=True)
class Summary:
    """What a person can read of an estimate's observables, for a logger.

    Attributes:
        kernel: The mean loss-kernel correlation between every pair of observables (``a``
            before or equal to ``b`` in their order; within one, off the diagonal), by
            ``"<a>:<b>"``.
        influences: Rows ``[source, target, rank, example, influence]``: per ordered pair,
            the examples of ``source`` whose mean Bayesian influence on ``target``'s other
            examples is largest.
        susceptibilities: Rows ``[component, source, susceptibility, stderr]``: the whole
            model's (component ``None``) and each weight restriction's susceptibility to
            every observable but the base (with a base).
    """

    kernel: dict[str, float]
    influences: list[list[Any]]
    susceptibilities: list[list[Any]]


def summarize(result: LLCResult, top: int = 5, base: str | None = None) -> Summary:
    """Summarize an estimate's observables: kernel means, top influences, susceptibilities.

    Args:
        result: An estimate made with ``observables``.
        top: How many of the most influential examples to list per pair of observables.
        base: The observable sampling the training data, from which the susceptibilities'
            shifts start; ``None``: no susceptibilities.

    Returns:
        The summary.
    """
    names = list(result.observables)
    kernel: dict[str, float] = {}
    influences: list[list[Any]] = []
    for i, a in enumerate(names):
        for b in names:
            same = a == b
            x, y = (s.reshape(-1, s.shape[2]) for s in _samples(result, a, b))
            covariance = _cov(x, y, correlation=False)  # pooled only: no spread is logged
            found = _correlated(covariance, x, y)
            off = ~np.eye(*found.shape, dtype=bool) if same else np.ones_like(found, bool)
            if names.index(b) >= i and off.any():
                kernel[f"{a}:{b}"] = float(np.nanmean(found[off]))
            influence = -covariance
            if same:
                np.fill_diagonal(influence, np.nan)
            if influence.shape[1] <= same:
                continue
            mean = np.nanmean(influence, axis=1)
            for rank, example in enumerate(np.argsort(-mean)[:top], start=1):
                influences.append([a, b, rank, int(example), float(mean[example])])
    susceptibilities = []
    if base is not None:
        components = [None, *(n for n, r in result.restricted.items() if r.observables)]
        for component in components:
            for source in names:
                if source != base:
                    chi = susceptibility(result, source, base, component)
                    susceptibilities.append([component, source, chi.value, chi.stderr])
    return Summary(kernel, influences, susceptibilities)


def _component(result: LLCResult, name: str) -> LLCResult:
    """The weight-restricted estimate ``name`` of ``result``, which recorded the observables."""
    found = result.restricted.get(name)
    if found is None or not found.observables:
        known = [n for n, r in result.restricted.items() if r.observables]
        raise ValueError(
            f"component {name!r} is not a weight restriction of this estimate on its data;"
            f" it has {', '.join(map(repr, known)) or 'none (pass restrictions=...)'}"
        )
    return found


def _samples(result: LLCResult, *names: str) -> list[np.ndarray]:
    """The observables' recorded values, ``(chains, records, values)`` each.

    Only the chains whose values are all finite in every one of them are kept.
    """
    for name in names:
        if name not in result.observables:
            known = ", ".join(map(repr, result.observables)) or "none (pass observables=...)"
            raise ValueError(f"{name!r} is not an observable of this estimate; it has {known}")
    samples = [result.observables[name].astype(np.float64) for name in names]
    finite = np.logical_and.reduce([np.isfinite(x).all(axis=(1, 2)) for x in samples])
    return [x[finite] for x in samples]


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
    cov = (x - x.mean(axis=0)).T @ (y - y.mean(axis=0)) / (len(x) - 1)
    return _correlated(cov, x, y) if correlation else cov


def _correlated(cov: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A covariance of the columns of ``x`` and ``y`` as correlations.

    NaN for a constant value (a padding token's zero loss).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return cov / np.outer(x.std(axis=0, ddof=1), y.std(axis=0, ddof=1))
