"""The loop that runs SGLD chains: batches in, loss traces out.

The update rules live in ``samplers``; this module draws the noise, applies restriction
masks, records the draws, and measures MALA acceptance when asked. Chains are grouped: each
group is one vectorized batch over the parameters its chains may move, and the groups of a
wave (at most ``config.chains_in_flight`` chains) step in lockstep on the same minibatches.

Memory: a chain in flight holds its float32 weights and gradient (RMSprop: three more of
their size, for its statistics and step), and all chains share the anchor, so ``k`` chains
take ``1 + 2k`` times the sampled weights' float32 size, plus one forward and backward pass's
activations; on the draws where MALA's acceptance is measured, ``1 + 4k`` (the weights before
the step and the gradient after it).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from llc_callbacks.config import LLCConfig
from llc_callbacks.forked import ForkedModel, ObserveFn
from llc_callbacks.samplers import (
    PIECE,
    SamplerState,
    StepInfo,
    mala_log_acceptance,
    rmsprop_sgld_step,
    sgld_step,
)

# How often (in steps) the loop asks the device whether every chain has diverged.
DIVERGENCE_CHECK_EVERY = 32
# With config.mala, the MALA acceptance is measured on every this-many-th draw: one more
# gradient each: 100 per chain at 1,000 draws, about 5% of an estimate's cost.
MALA_EVERY = 10
# chains_in_flight="auto" on CUDA fills at most this share of the free memory with chains.
AUTO_MEMORY_SHARE = 0.8


class ProbeBatches(NamedTuple):
    """A probe set as the chains record it.

    Attributes:
        batches: Its batches, on the chains' device.
        losses: What to record (``Probe.losses``; ``None``: each example's loss).
        size: How many values one chain records per draw (examples, or tokens).
    """

    batches: list[Any]
    losses: ObserveFn | None
    size: int


class ChainGroup(NamedTuple):
    """Chains that run as one vectorized batch: they sample the same parameters.

    Attributes:
        forked: The fork whose flat weights these chains move (narrowed to the parameters
            their restrictions touch).
        noise_ids: Per chain, the index whose generator (seeded by ``config.seed`` and it)
            draws the chain's noise; chain ``i`` of any restriction uses ``i``.
        masks: Per chain, the flat weights it may move (``None``: all of ``forked``'s).
    """

    forked: ForkedModel
    noise_ids: Sequence[int]
    masks: Sequence[Tensor | None]


class ChainTraces(NamedTuple):
    """What the chains recorded, one row per chain in group order.

    Attributes:
        trace: Minibatch loss at each draw, ``(chains, draws)``; NaN after a divergence.
        reference: ``L_m(w*)`` on each draw's batch, ``(draws,)``; NaN unless paired.
        distance: ``||w_t - w*||^2 / 2`` at each draw, ``(chains, draws)``.
        diverged: Which chains' loss went NaN or infinite, ``(chains,)``.
        mala: Each chain's mean MALA acceptance over every ``MALA_EVERY``-th draw, or
            ``None`` unless ``config.mala``.
        observed: Per observable, each chain's recorded values on every
            ``config.observe_every``-th draw, ``(chains, records, values)``.
    """

    trace: np.ndarray
    reference: np.ndarray
    distance: np.ndarray
    diverged: np.ndarray
    mala: np.ndarray | None
    observed: dict[str, np.ndarray]


class _Running:
    """One group's chains in flight: their state, gradient buffer and noise."""

    def __init__(self, group: ChainGroup, config: LLCConfig, rows: slice) -> None:
        device = group.forked.anchor.device
        self.forked = group.forked
        self.rows = rows
        self.movable = None
        if any(mask is not None and not bool(mask.all()) for mask in group.masks):
            everything = torch.ones_like(self.forked.anchor, dtype=torch.bool)
            self.movable = torch.stack([everything if m is None else m for m in group.masks])
        weights = self.forked.anchor.expand(len(group.noise_ids), -1).clone()
        rmsprop = config.sampler == "rmsprop_sgld"
        self.state = SamplerState(weights, torch.zeros_like(weights) if rmsprop else None)
        self.grads = torch.empty_like(weights)
        generators = [chain_generator(config.seed, i, device) for i in group.noise_ids]
        self.noise = _Noise(generators, self.movable)


class _Noise:
    """Adds each chain's standard normal noise, from its own generator, in place (``AddNoise``).

    The noise is drawn in pieces of at most ``PIECE`` weights, so it depends only on the
    chain's generator and the number of weights it moves; outside a chain's mask it is zero.
    """

    def __init__(self, generators: list[torch.Generator], movable: Tensor | None) -> None:
        self.generators = generators
        self.movable = movable

    def __call__(self, weights: Tensor, scale: float, factor: Tensor | None) -> None:
        for row, generator in enumerate(self.generators):
            for start in range(0, weights.shape[1], PIECE):
                piece = slice(start, start + PIECE)
                target = weights[row, piece]
                xi = torch.randn(
                    target.shape, generator=generator, device=target.device, dtype=target.dtype
                )
                if self.movable is not None:
                    xi.mul_(self.movable[row, piece])
                if factor is None:
                    target.add_(xi, alpha=scale)
                else:
                    target.addcmul_(factor[row, piece], xi, value=scale)


def run_chains(
    groups: Sequence[ChainGroup],
    batches: Iterator[Any],
    config: LLCConfig,
    nbeta: float,
    progress: bool,
    observables: Mapping[str, ProbeBatches] | None = None,
) -> ChainTraces:
    """Run groups of chains from ``w*``, all on the same minibatches.

    At most ``config.chains_in_flight`` chains (``"auto"``: see ``_in_flight``) are held in
    memory and step together (a wave); later waves replay the first one's minibatches, kept
    for them. Chain ``i`` depends only on the seed, ``i``, ``w*`` and the minibatches, so the
    numbers do not depend on how the chains are split into waves, but for float rounding.

    Args:
        groups: The chains, each group one vectorized batch.
        batches: Endless minibatches on the chains' device.
        config: Hyperparameters (``num_burnin``, ``num_draws``, sampler, ...).
        nbeta: The resolved inverse temperature.
        progress: Show a progress bar, when the output is a terminal.
        observables: Probe sets whose losses every chain records on every
            ``config.observe_every``-th draw.

    Returns:
        The traces, one row per chain, group after group.
    """
    chains, draws = sum(len(group.noise_ids) for group in groups), config.num_draws
    device = groups[0].forked.anchor.device if groups else torch.device("cpu")
    traces = _Traces(
        trace=torch.full((chains, draws), float("nan"), device=device),
        reference=torch.full((draws,), float("nan"), device=device),
        distance=torch.full((chains, draws), float("nan"), device=device),
        acceptance=torch.zeros(chains, device=device),
        healthy=torch.ones(chains, dtype=torch.bool, device=device),
        observed={
            name: torch.full(
                (chains, config.observed_draws, probe.size), float("nan"), device=device
            )
            for name, probe in (observables or {}).items()
        },
    )
    in_flight = 1
    if chains:
        first = next(batches)
        batches = itertools.chain([first], batches)
        in_flight = _in_flight(groups, config, first)
    waves = _waves(groups, in_flight)
    kept = _Kept(batches) if len(waves) > 1 else None
    steps = config.num_burnin + draws if chains else 0
    # disable=None: a bar only on a terminal, never as lines of a log file.
    bar = tqdm(
        total=steps * len(waves), desc="LLC chains", disable=None if progress else True, leave=False
    )
    first_row = 0
    try:
        for number, wave in enumerate(waves):
            wave_batches = kept.replay() if kept is not None else batches
            _run_wave(
                wave,
                first_row,
                wave_batches,
                config,
                nbeta,
                traces,
                paired=number == 0,
                bar=bar,
                observables=observables or {},
            )
            first_row += sum(len(group.noise_ids) for group in wave)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not _out_of_memory(error):
            raise
        raise _explained(error, groups, config, in_flight) from error
    finally:
        bar.close()
    return ChainTraces(
        traces.trace.cpu().numpy(),
        traces.reference.cpu().numpy(),
        traces.distance.cpu().numpy(),
        (~traces.healthy).cpu().numpy(),
        (traces.acceptance / len(range(0, draws, MALA_EVERY))).cpu().numpy()
        if config.mala
        else None,
        {name: losses.cpu().numpy() for name, losses in traces.observed.items()},
    )


class _Traces(NamedTuple):
    """What every wave writes into, one row per chain."""

    trace: Tensor
    reference: Tensor
    distance: Tensor
    acceptance: Tensor
    healthy: Tensor
    observed: dict[str, Tensor]


class _Kept:
    """Minibatches drawn once and kept, so that every wave of chains sees the same ones."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self.source = batches
        self.seen: list[Any] = []

    def replay(self) -> Iterator[Any]:
        """The kept minibatches in order, then new ones, kept in turn."""
        yield from self.seen
        while True:
            batch = next(self.source)
            self.seen.append(batch)
            yield batch


def _in_flight(groups: Sequence[ChainGroup], config: LLCConfig, batch: Any) -> int:
    """How many chains to hold in memory at once: ``config.chains_in_flight``, resolved.

    ``"auto"`` is every chain, except on CUDA, where it is as many as fit in
    ``AUTO_MEMORY_SHARE`` of the free memory (the caching allocator's free blocks included)
    at the footprint ``_chain_bytes`` measures (at least one).
    """
    chains = sum(len(group.noise_ids) for group in groups)
    if config.chains_in_flight != "auto":
        return config.chains_in_flight
    device = groups[0].forked.anchor.device
    if device.type != "cuda":
        return chains
    free = torch.cuda.mem_get_info(device)[0]
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    footprint = max(_chain_bytes(group.forked, config, batch) for group in groups)
    return max(1, min(chains, int(AUTO_MEMORY_SHARE * free) // footprint))


def _chain_bytes(forked: ForkedModel, config: LLCConfig, batch: Any) -> int:
    """The CUDA memory one more chain in flight takes, in bytes.

    Its float32 weights and gradient (RMSprop's statistics and step, MALA's copies), the
    largest parameter's gradient while backward makes it, and the activations one chain's
    forward pass keeps for its backward, measured on ``batch``.
    """
    return _weight_bytes(forked, config) + forked.saved_bytes(batch)


def _weight_bytes(forked: ForkedModel, config: LLCConfig) -> int:
    """The float32 weights, gradients and sampler state one chain in flight holds, in bytes."""
    copies = 2 + 3 * (config.sampler == "rmsprop_sgld") + 2 * config.mala
    return 4 * (copies * forked.anchor.numel() + max(forked.layout.numels))


def _out_of_memory(error: RuntimeError) -> bool:
    """Whether ``error`` is an allocator's: CUDA's ``OutOfMemoryError`` or the CPU's."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _explained(
    error: RuntimeError, groups: Sequence[ChainGroup], config: LLCConfig, in_flight: int
) -> RuntimeError:
    """``error`` again, with what each chain in flight holds and how to hold fewer."""
    per_chain = max(_weight_bytes(group.forked, config) for group in groups)
    first_line = str(error).strip().splitlines()[0]
    return type(error)(
        f"out of memory with {in_flight} chains in flight (chains_in_flight="
        f"{config.chains_in_flight!r}): each holds {per_chain / 1e6:.3g} MB of float32"
        " weights, gradients and sampler state plus one forward and backward pass's"
        " activations. Pass LLCConfig(chains_in_flight=k) with a smaller k (1 holds one"
        " chain at a time; the numbers stay the same), or sample with smaller batches."
        f" {type(error).__name__}: {first_line}"
    )


def _waves(groups: Sequence[ChainGroup], size: int) -> list[list[ChainGroup]]:
    """The groups' chains, in order, cut into waves of at most ``size`` chains."""
    waves: list[list[ChainGroup]] = [[]]
    room = size
    for group in groups:
        start = 0
        while start < len(group.noise_ids):
            if room == 0:
                waves.append([])
                room = size
            end = min(start + room, len(group.noise_ids))
            waves[-1].append(
                ChainGroup(group.forked, group.noise_ids[start:end], group.masks[start:end])
            )
            room -= end - start
            start = end
    return [wave for wave in waves if wave]


def _run_wave(
    wave: list[ChainGroup],
    first_row: int,
    batches: Iterator[Any],
    config: LLCConfig,
    nbeta: float,
    traces: _Traces,
    *,
    paired: bool,
    bar: tqdm,
    observables: Mapping[str, ProbeBatches],
) -> None:
    """Step one wave of chains through burn-in and draws, writing into ``traces``.

    The wave's weights and gradients live in this call only: they are freed before the next
    wave's are made.

    Args:
        wave: The wave's groups.
        first_row: The row of ``traces`` its first chain writes.
        batches: Its minibatches.
        config: Hyperparameters.
        nbeta: The resolved inverse temperature.
        traces: Where each chain writes its row.
        paired: Record ``L_m(w*)`` on each draw's batch (the first wave does, for all).
        bar: The progress bar to advance.
        observables: The probe sets whose losses the draws record.
    """
    sizes = [len(group.noise_ids) for group in wave]
    ends = [first_row + end for end in itertools.accumulate(sizes)]
    running = [
        _Running(group, config, slice(end - size, end))
        for group, size, end in zip(wave, sizes, ends, strict=True)
    ]
    step = _sampler_step(config, nbeta)
    rows = slice(running[0].rows.start, running[-1].rows.stop)
    for t in range(config.num_burnin + config.num_draws):
        bar.update()
        batch = next(batches)
        drawing = t >= config.num_burnin
        draw = t - config.num_burnin
        if drawing and paired and config.paired:
            traces.reference[draw] = running[0].forked.loss_at_anchor(batch)
        for group in running:
            forked, weights, own = group.forked, group.state.weights, group.rows
            losses, grads = forked.loss_and_grad(weights, batch, out=group.grads)
            traces.healthy[own] &= torch.isfinite(losses)
            if drawing:
                traces.trace[own, draw] = torch.where(traces.healthy[own], losses, float("nan"))
                traces.distance[own, draw] = _half_square_distances(weights, forked.anchor)
                if draw % config.observe_every == 0:
                    for name, probe in observables.items():
                        found = [forked.observed(weights, b, probe.losses) for b in probe.batches]
                        traces.observed[name][own, draw // config.observe_every] = torch.cat(
                            found, dim=1
                        )
            if group.movable is not None:  # no drift outside a chain's mask (nor noise)
                grads.mul_(group.movable)
            measured = drawing and config.mala and draw % MALA_EVERY == 0
            before = weights.clone() if measured else None
            group.state, info = step(group.state, grads, forked.anchor, group.noise)
            if before is not None:
                traces.acceptance[own] += _mala_acceptance(
                    forked,
                    before,
                    weights,
                    info,
                    losses,
                    grads,
                    batch,
                    config,
                    nbeta,
                    group.movable,
                )
        if (t + 1) % DIVERGENCE_CHECK_EVERY == 0 and not traces.healthy[rows].any():
            break


def _half_square_distances(weights: Tensor, anchor: Tensor) -> Tensor:
    """``||w - w*||^2 / 2`` per chain, summed in pieces of about ``PIECE`` numbers."""
    squares = torch.zeros(len(weights), device=weights.device)
    width = max(1, PIECE // len(weights))
    for start in range(0, weights.shape[1], width):
        squares += (
            (weights[:, start : start + width] - anchor[start : start + width]).square().sum(1)
        )
    return squares.div(2)


def _mala_acceptance(
    forked: ForkedModel,
    before: Tensor,
    after: Tensor,
    info: StepInfo,
    losses: Tensor,
    grads: Tensor,
    batch: Any,
    config: LLCConfig,
    nbeta: float,
    movable: Tensor | None,
) -> Tensor:
    """Per-chain MALA acceptance probability of one step (one more gradient, same batch)."""
    new_losses, new_grads = forked.loss_and_grad(after, batch)
    log_acceptance = mala_log_acceptance(
        before,
        after,
        forked.anchor,
        losses,
        new_losses,
        grads,
        new_grads,
        step_size=config.step_size,
        nbeta=nbeta,
        localization=config.localization,
        precond=info.precond,
        mask=movable,
    )
    return torch.nan_to_num(log_acceptance.exp(), nan=0.0)


def _sampler_step(config: LLCConfig, nbeta: float):
    common = {"step_size": config.step_size, "nbeta": nbeta, "localization": config.localization}
    if config.sampler == "rmsprop_sgld":
        return functools.partial(
            rmsprop_sgld_step, alpha=config.rmsprop_alpha, eps=config.rmsprop_eps, **common
        )
    return functools.partial(sgld_step, **common)


def chain_generator(seed: int, chain: int, device: torch.device) -> torch.Generator:
    """A noise generator that depends only on the seed and the chain's index."""
    chain_seed = int(np.random.SeedSequence([seed, chain]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(chain_seed)
