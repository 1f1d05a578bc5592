"""``estimate_llc``: SGLD chains around a model's current weights."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from llc_callbacks.chains import (
    ChainGroup,
    ChainStart,
    ChainTraces,
    ProbeBatches,
    run_chains,
    run_chains_at_anchor,
)
from llc_callbacks.config import LLCConfig
from llc_callbacks.data import batch_size, cycle_batches, sampling_size, to_device
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
from llc_callbacks.observables import Probe, probe_sets
from llc_callbacks.restrictions import Restrictions
from llc_callbacks.result import LLCResult, restricted_problems
from llc_callbacks.sharded import is_sharded, refuse_unsupported, sample_sharded


class _Pass(NamedTuple):
    """Estimates that share a data source: one batch of ``num_chains`` chains per name."""

    data: Iterable[Any]
    names: list[str | None]  # None: the full (unrestricted) estimate
    masks: list[Tensor | None]  # the weights each name's chains move; None: all


# Where each name's chains start (``estimate_llc(start=...)``): one entry per chain.
Starts = Mapping[str | None, Sequence[ChainStart | None]]


class _ChainPart(NamedTuple):
    """What one process sampled of a pass: some chains, and what every process shares."""

    chains: list[int]  # indices into the pass's names x num_chains chains
    traces: ChainTraces  # one row per chain of ``chains``
    init_loss: float
    nbeta: float
    vectorized: bool
    precision: str  # the dtype of the forward passes, as LLCResult.precision names it


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig = LLCConfig(),
    *,
    device: torch.device | str | None = None,
    restrictions: Restrictions | None = None,
    progress: bool = False,
    distributed: bool = False,
    warn: bool = True,
    strict: bool = True,
    observables: Mapping[str, Iterable[Any] | Probe] | None = None,
    start: Starts | None = None,
    keep_ends: bool = False,
) -> LLCResult:
    """Estimate the local learning coefficient of a model at its current weights.

    The trainable weights are forked as float32 tensors; ``config.num_chains`` SGLD chains
    sample the localized tempered posterior around them, sharing each minibatch. Forward
    passes run in the model's own precision (``result.precision``): a bfloat16 model's chains
    update float32 weights and evaluate the loss with them cast to bfloat16. The live
    model's weights, gradients, buffers, train/eval modes and the global RNG states are left
    exactly as they were. Chains run in eval mode (no dropout; BatchNorm uses its running
    statistics), so the posterior is that of the deterministic model.

    Args:
        model: The model at the weights ``w*`` to estimate at.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean minibatch loss. A loss
            that averages over something else than the batch's rows (preference pairs)
            says how many with a method ``count_examples(batch) -> int``, which
            ``nbeta="batch"`` counts.
        data: Re-iterable of batches (a DataLoader), cycled when it runs out.
        config: Sampling hyperparameters.
        device: Where chains run; defaults to the device of the model's first parameter.
        restrictions: Weight- and data-restricted LLCs to estimate too, in
            ``result.restricted``; the weight restrictions on ``data`` run in the same
            vectorized batch of chains as the full estimate.
        progress: Show a progress bar over chain steps.
        distributed: Split the chains over the ranks of the initialized ``torch.distributed``
            process group and gather them, so that every rank returns the same result. Every
            rank must call it with the same data and config; all sample around rank zero's
            weights and buffers. Chain ``i`` depends only on the seed, ``i``, the weights and
            the batches, so the result equals a single-process run's. A model sharded with
            FSDP2 (``fully_shard``) needs it: every rank runs every chain through its shards
            (``llc_callbacks.sharded``).
        warn: Warn about every failed health check (``LLCResult.problems``); a monitor turns
            this off and warns once per check and run instead.
        strict: Raise when a restriction fails (a selection that matches nothing, a data
            source that raises); ``False`` reports it as a NaN ``result.restricted[name]``
            with its ``error`` and still estimates the full LLC and the other restrictions.
        observables: Named probe sets (each a re-iterable of batches, read once per
            estimate, or a ``Probe``), whose per-example losses (or what ``Probe.losses``
            returns: per-token losses with ``token_losses``) every chain records on every
            ``config.observe_every``-th draw, in ``result.observables`` (and in each
            weight-restricted result's): the samples ``loss_kernel``, ``bif`` and
            ``susceptibility`` read. One batched forward pass per probe batch per recorded
            draw, without gradients. Names hold no ``/`` or ``:``.
        start: Where each estimate's chains start, by name (``None``: the full LLC, a
            restriction's name otherwise), one ``ChainStart`` per chain: a previous
            estimate's ``result.ends`` (and its restrictions'), carried over to the new
            weights as offsets from ``w*`` with their step sizes. A name or chain without
            one (or whose offset does not fit its weights) starts at ``w*``. A monitor
            passes it from one estimate to the next.
        keep_ends: Keep where each chain ended, its offset from ``w*``, in ``result.ends``
            (for a later ``start``): one CPU copy of the weights it moves, per chain.
            Otherwise ``result.ends`` holds the chains' step sizes only.

    Returns:
        The estimate with its traces and diagnostics. Chains whose loss goes NaN or infinite
        stop counting and are reported in ``diagnostics["num_diverged"]``; if all do, the
        estimate is NaN.

    Raises:
        ValueError: If an argument has the wrong type, ``loss_fn`` returns something other
            than a scalar tensor, ``data`` yields no batch, the model has nothing to sample,
            or (``strict``) a weight restriction selects nothing (see ``Restrictions.masks``).
        RuntimeError: If ``config.vectorize=True`` and the model does not support ``vmap``,
            or, when distributed, if the estimate failed on any rank (raised on every rank).
    """
    results, elapsed_s = _estimate(
        model,
        loss_fn,
        data,
        config,
        restrictions,
        True,
        device,
        progress,
        distributed,
        strict,
        observables or {},
        start or {},
        keep_ends,
    )
    full = results.pop(None)
    result = dataclasses.replace(full, restricted=results, elapsed_s=elapsed_s)
    if warn:
        _warn(result.problems())
    return result


def estimate_restricted_llcs(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    restrictions: Restrictions,
    config: LLCConfig = LLCConfig(),
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    distributed: bool = False,
    warn: bool = True,
    strict: bool = True,
) -> dict[str, LLCResult]:
    """Estimate only the restricted LLCs, without the full one.

    All weight restrictions on ``data`` run as one vectorized batch of chains, and those on
    each data source as another; chain ``i`` of every restriction draws the same noise as
    chain ``i`` of ``estimate_llc`` with the same seed.

    Args:
        model: The model at the weights ``w*`` to estimate at.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: Batches for the weight restrictions.
        restrictions: What to estimate.
        config: Sampling hyperparameters.
        device: Where chains run.
        progress: Show a progress bar.
        distributed: Split chains over ranks, as in ``estimate_llc``.
        warn: Warn about every failed health check.
        strict: Raise when a restriction fails, as in ``estimate_llc``.

    Returns:
        The estimates by name (see ``Restrictions``).

    Raises:
        Exception: As ``estimate_llc``.
    """
    results, _ = _estimate(
        model,
        loss_fn,
        data,
        config,
        restrictions,
        False,
        device,
        progress,
        distributed,
        strict,
        {},
        {},
        False,
    )
    if warn:
        _warn(restricted_problems(results))
    return results


def check_inputs(
    model: nn.Module, loss_fn: LossFn, config: LLCConfig, restrictions: Restrictions | None
) -> None:
    """Refuse arguments of the wrong type, naming them.

    Raises:
        ValueError: If ``model`` is not a module, ``loss_fn`` is not callable, ``config`` is
            not an ``LLCConfig`` or ``restrictions`` is neither ``None`` nor ``Restrictions``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    if not isinstance(config, LLCConfig):
        raise ValueError(f"config must be an LLCConfig, got {type(config).__name__}")
    if restrictions is not None and not isinstance(restrictions, Restrictions):
        raise ValueError(f"restrictions must be Restrictions, got {type(restrictions).__name__}")


def fork(
    model: nn.Module, loss_fn: LossFn, config: LLCConfig, device: torch.device, distributed: bool
) -> ForkedModel:
    """Fork the model's weights; across ranks, every rank forks rank zero's weights.

    Raises:
        ValueError: If the model has nothing to sample.
        RuntimeError: When distributed, if forking failed on any rank (on every rank).
    """
    options = {"autocast": config.autocast_dtype, "compile": config.compile_mode}
    if not distributed or rank_and_world()[1] == 1:
        return ForkedModel(model, loss_fn, device, config.vectorize, **options)
    forked = on_every_rank(
        lambda: ForkedModel(model, loss_fn, device, config.vectorize, share_frozen=False, **options)
    )
    # Ranks may hold different buffers (BatchNorm statistics are not synchronized): every
    # rank samples around rank zero's weights, written into its own copies.
    broadcast_from_rank_zero([forked.anchor, *forked.constants.values()])
    return forked


@contextmanager
def sampling(model: nn.Module, config: LLCConfig, device: torch.device) -> Iterator[None]:
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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    tensor: Tensor | None = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _estimate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig,
    restrictions: Restrictions | None,
    include_full: bool,
    device: torch.device | str | None,
    progress: bool,
    distributed: bool,
    strict: bool,
    observables: Mapping[str, Iterable[Any] | Probe],
    starts: Starts,
    keep_ends: bool,
) -> tuple[dict[str | None, LLCResult], float]:
    """Validate, fork the weights and run every pass of chains."""
    check_inputs(model, loss_fn, config, restrictions)
    start = time.perf_counter()
    device = torch.device(device) if device is not None else model_device(model)
    rank, world_size = rank_and_world() if distributed else (0, 1)
    restrictions = restrictions or Restrictions()
    if is_sharded(model):
        refuse_unsupported(
            config,
            distributed,
            restricted=bool(restrictions.weights or restrictions.sources) or not include_full,
            observed=bool(observables),
        )
        with sampling(model, config, device):
            part = on_every_rank(
                lambda: _sample_sharded(
                    model, loss_fn, data, config, progress, starts.get(None, ()), keep_ends
                )
            )
        elapsed = time.perf_counter() - start
        return _summaries(_Pass(data, [None], [None]), [part], config, elapsed), elapsed
    failures: dict[str, str] = {}
    results: dict[str | None, LLCResult] = {}
    with sampling(model, config, device):
        forked = fork(model, loss_fn, config, device, distributed)
        masks = restrictions.masks(forked, failures=None if strict else failures)
        passes = _passes(data, restrictions, masks, include_full, failures)
        probes = _probes(observables, forked, config, len(passes[0].names) if passes else 0)
        for number, sampling_pass in enumerate(passes):
            pass_start = time.perf_counter()
            chains = rank_chains(len(sampling_pass.names) * config.num_chains, rank, world_size)
            observed = probes if number == 0 and sampling_pass.data is data else {}

            def sample(
                p: _Pass = sampling_pass,
                ids: list[int] = chains,
                o: dict[str, ProbeBatches] = observed,
            ) -> _ChainPart:
                return _sample(forked, p, config, ids, progress and rank == 0, o, starts, keep_ends)

            try:
                parts = [sample()] if world_size == 1 else _gathered(sample, rank)
            except Exception as error:
                if strict or None in sampling_pass.names:
                    raise
                # A data source that fails fails alone (on every rank alike: the gather
                # raised on all of them).
                failures.update(dict.fromkeys(sampling_pass.names, _describe(error)))
                continue
            elapsed = time.perf_counter() - pass_start
            results.update(_summaries(sampling_pass, parts, config, elapsed))
    for name, message in failures.items():
        results[name] = LLCResult.failed(config, message)
    return results, time.perf_counter() - start


def _gathered(sample: Callable[[], _ChainPart], rank: int) -> list[_ChainPart]:
    """Every rank's part of a pass; the chains' end offsets stay on the rank that ran them.

    The offsets are as large as the weights, once per chain: only the next estimate on the
    same rank, which runs the same chains, needs them.
    """
    own: list[_ChainPart] = []

    def light() -> _ChainPart:
        part = sample()
        own.append(part)
        ends = [ChainStart(None, end.step_size) for end in part.traces.ends]
        return part._replace(traces=part.traces._replace(ends=ends))

    parts = gather_from_every_rank(light)
    parts[rank] = own[0]
    return parts


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _warn(problems: dict[str, str]) -> None:
    for message in problems.values():
        warnings.warn(f"llc_callbacks: {message}", stacklevel=3)


def _passes(
    data: Iterable[Any],
    restrictions: Restrictions,
    masks: dict[str, Tensor],
    include_full: bool,
    failures: dict[str, str],
) -> list[_Pass]:
    """The full estimate and the weight restrictions on ``data``, then a pass per source.

    A combination whose weight selection failed fails too (recorded in ``failures``).
    """
    weights: dict[str | None, Tensor | None] = {None: None} if include_full else {}
    weights.update(masks)
    passes = [_Pass(data, list(weights), list(weights.values()))]
    for source, source_data in restrictions.sources.items():
        pairs = []
        for w, s in restrictions.combinations:
            if s != source:
                continue
            if w in masks:
                pairs.append(w)
            else:
                failures[f"{w}/{source}"] = f"weights[{w!r}] failed: {failures[w]}"
        names = [source, *(f"{w}/{source}" for w in pairs)]
        passes.append(_Pass(source_data, names, [None, *(masks[w] for w in pairs)]))
    return [p for p in passes if p.names]


def _probes(
    observables: Mapping[str, Iterable[Any] | Probe],
    forked: ForkedModel,
    config: LLCConfig,
    names: int,
) -> dict[str, ProbeBatches]:
    """The observables' batches on the chains' device, within ``config.observables_max_mb``.

    ``Probe.losses`` is run once at ``w*`` on each batch, to count what it records.

    Raises:
        ValueError: If an observable is neither a ``Probe`` nor re-iterable, holds no
            example, its ``losses`` returns no ``(batch, ...)`` tensor, or recording them all would
            take more than ``config.observables_max_mb``.
    """
    probes = {}
    for name, probe in probe_sets(observables).items():
        batches = [to_device(b, forked.anchor.device, forked.precision) for b in probe.data]
        if not sum(batch_size(b) for b in batches):
            raise ValueError(f"observables[{name!r}] holds no example")
        size = 0
        for batch in batches:
            if probe.losses is None:
                size += batch_size(batch)
                continue
            try:
                size += forked.observed(forked.anchor[None], batch, probe.losses).shape[1]
            except ValueError as error:
                raise ValueError(f"observables[{name!r}]: {error}") from error
        probes[name] = ProbeBatches(batches, probe.losses, size)
    values = sum(probe.size for probe in probes.values())
    records = config.observed_draws
    megabytes = names * config.num_chains * records * values * 4 / 1e6
    if megabytes > config.observables_max_mb:
        raise ValueError(
            f"observables would take {megabytes:.0f} MB ({names * config.num_chains} chains x"
            f" {records} records x {values} values x 4 bytes), above"
            f" observables_max_mb={config.observables_max_mb:g}: raise it, raise observe_every"
            " or observe fewer examples"
        )
    return probes


def _sample_sharded(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig,
    progress: bool,
    starts: Sequence[ChainStart | None],
    keep_ends: bool,
) -> _ChainPart:
    """Run every chain through a sharded model (``sharded.sample_sharded``), on every rank."""
    progress = progress and rank_and_world()[0] == 0
    traces, init_loss, nbeta = sample_sharded(
        model, loss_fn, data, config, progress, starts, keep_ends
    )
    return _ChainPart(list(range(config.num_chains)), traces, init_loss, nbeta, False, "float32")


def _sample(
    forked: ForkedModel,
    sampling_pass: _Pass,
    config: LLCConfig,
    chains: list[int],
    progress: bool,
    observables: dict[str, ProbeBatches],
    starts: Starts,
    keep_ends: bool,
) -> _ChainPart:
    """Run the given chains of the pass and measure ``L(w*)`` on its data."""
    batches = cycle_batches(sampling_pass.data, forked.anchor.device, forked.precision)
    first = next(batches)
    nbeta = config.resolve_nbeta(sampling_size(forked.loss_fn, first))
    groups, order = _groups(forked, sampling_pass, chains, config.num_chains, starts)
    traces, init_loss = run_chains_at_anchor(
        first,
        batches,
        forked.loss_at_anchor,
        config,
        lambda b: run_chains(groups, b, config, nbeta, progress, observables, keep_ends),
    )
    return _ChainPart(
        order,
        traces,
        init_loss,
        nbeta,
        any(bool(group.forked.vectorized) for group in groups),
        forked.precision_name,
    )


def _groups(
    forked: ForkedModel, sampling_pass: _Pass, chains: list[int], num_chains: int, starts: Starts
) -> tuple[list[ChainGroup], list[int]]:
    """Group the pass's chains by the parameters their restriction touches.

    Chains of restrictions that touch the same parameters run as one vectorized batch with a
    mask per chain, over those parameters only: a chain needs no gradient and no noise for
    parameters it never moves, and no chain pays for another restriction's parameters. Each
    chain starts where ``starts`` says, if its offset fits the weights it moves.

    Returns:
        The groups, and the pass's chain indices in the order of the groups' rows.
    """
    touched_by: dict[int, tuple[str, ...]] = {}  # per restriction, the parameters it moves
    by_parameters: dict[tuple[str, ...], list[int]] = {}
    for chain in chains:
        restriction = chain // num_chains
        if restriction not in touched_by:
            mask = sampling_pass.masks[restriction]
            slices = forked.layout.slices
            touched_by[restriction] = tuple(
                name
                for name in forked.layout.names
                if mask is None or bool(mask[slices[name]].any())
            )
        by_parameters.setdefault(touched_by[restriction], []).append(chain)
    groups, order = [], []
    for touched, members in by_parameters.items():
        narrow, index = (
            (forked, None)
            if len(touched) == len(forked.layout.names)
            else forked.restricted_to(touched)
        )
        masks = [sampling_pass.masks[chain // num_chains] for chain in members]
        if index is not None:
            masks = [mask[index] for mask in masks]
        sizes = [narrow.anchor.numel() if m is None else int(m.sum()) for m in masks]
        chain_starts = [
            _fitting(
                starts.get(sampling_pass.names[chain // num_chains], ()), chain % num_chains, n
            )
            for chain, n in zip(members, sizes, strict=True)
        ]
        groups.append(
            ChainGroup(narrow, [chain % num_chains for chain in members], masks, chain_starts)
        )
        order.extend(members)
    return groups, order


def _fitting(starts: Sequence[ChainStart | None], chain: int, size: int) -> ChainStart | None:
    """Chain ``chain``'s start, if there is one; without its offset if that does not fit."""
    start = starts[chain] if chain < len(starts) else None
    if start is None or start.offset is None or start.offset.numel() == size:
        return start
    return ChainStart(None, start.step_size)


def _summaries(
    sampling_pass: _Pass, parts: list[_ChainPart], config: LLCConfig, elapsed_s: float
) -> dict[str | None, LLCResult]:
    """Put every process's chains back in order and summarize each name's chains.

    Each chain's LLC is ``nbeta`` times the mean of its own draws' excess losses; the
    diagnostics that compare chains (R-hat, ESS, trends) read the draws all healthy chains
    share, the first ``min(draws)`` of each.
    """
    first = parts[0]
    total = len(sampling_pass.names) * config.num_chains
    fields = ("trace", "reference", "distance", "burnin", "draws", "step_size")
    gathered = {name: np.empty((total, *getattr(first.traces, name).shape[1:])) for name in fields}
    gathered["diverged"] = np.empty(total, dtype=bool)
    gathered["warm"] = np.empty(total, dtype=bool)
    mala = np.empty(total) if first.traces.mala is not None else None
    observed = {
        n: np.empty((total, *v.shape[1:]), v.dtype) for n, v in first.traces.observed.items()
    }
    ends: list[ChainStart | None] = [None] * total
    for part in parts:
        for name in (*fields, "diverged", "warm"):
            gathered[name][part.chains] = getattr(part.traces, name)
        for name, values in part.traces.observed.items():
            observed[name][part.chains] = values
        if mala is not None:
            mala[part.chains] = part.traces.mala
        for chain, end in zip(part.chains, part.traces.ends, strict=True):
            ends[chain] = end
    trace, diverged = gathered["trace"], gathered["diverged"]
    excess = trace - (gathered["reference"] if config.paired else first.init_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: diverged at once
        per_chain = np.where(diverged, np.nan, first.nbeta * np.nanmean(excess, axis=1))
    summaries = {}
    for index, name in enumerate(sampling_pass.names):
        rows = slice(index * config.num_chains, (index + 1) * config.num_chains)
        healthy = per_chain[rows][~diverged[rows]]
        drawn = gathered["draws"][rows][~diverged[rows]]
        shared = int(drawn.min()) if len(drawn) else 0
        summaries[name] = LLCResult(
            llc_mean=float(healthy.mean()) if len(healthy) else math.nan,
            llc_std=float(healthy.std(ddof=1)) if len(healthy) > 1 else math.nan,
            llc_per_chain=per_chain[rows],
            loss_trace=trace[rows],
            init_loss=first.init_loss,
            diagnostics={
                **chain_diagnostics(
                    first.nbeta * excess[rows, :shared],
                    diverged[rows],
                    gathered["distance"][rows, :shared],
                    config.localization,
                    None if mala is None else mala[rows],
                ),
                "burnin": float(gathered["burnin"][rows].mean()),
                "draws": float(gathered["draws"][rows].mean()),
                "step_size": float(np.exp(np.log(gathered["step_size"][rows]).mean())),
                "warm": float(gathered["warm"][rows].any()),
            },
            config=config,
            nbeta=first.nbeta,
            vectorized=first.vectorized,
            precision=first.precision,
            observables={n: values[rows] for n, values in observed.items()},
            elapsed_s=elapsed_s,
            burnin=gathered["burnin"][rows].astype(int),
            draws=gathered["draws"][rows].astype(int),
            step_sizes=gathered["step_size"][rows],
            warm=bool(gathered["warm"][rows].any()),
            ends=ends[rows],
        )
    return summaries
