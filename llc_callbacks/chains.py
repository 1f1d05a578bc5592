"""The loop that runs SGLD chains: batches in, loss traces out.

The update rules live in ``samplers``; this module draws the noise, applies restriction
masks, records the draws, and measures MALA acceptance when asked. Chains are grouped: each
group is one vectorized batch over the parameters its chains may move, and the groups of a
wave (at most ``config.chains_in_flight`` chains) step in lockstep on the same minibatches.

Memory: a chain in flight holds its float32 weights and gradient (RMSprop: three more of
their size, for its statistics and step), and all chains share the anchor, so ``k`` chains
take ``1 + 2k`` times the sampled weights' float32 size, plus one forward and backward pass's
activations; on the draws where MALA's acceptance is measured, ``1 + 4k`` (the weights before
the step and the gradient after it). A model of up to ``PIECE / 2`` weights also holds its
chains' noise for the next steps, at most 16 MB per chain (``_Noise``).

A step neither reads the device nor copies host values to it: the decisions wait for the
checks every ``CHECK_EVERY`` steps (``_Phases``), the one synchronisation between them.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from llc_callbacks.adaptation import (
    CHECK_EVERY,
    COLD_MARGIN,
    HEAT_CHECKS,
    HEAT_MARGIN,
    MAX_RESTARTS,
    MIN_BURNIN_COLD,
    MIN_BURNIN_WARM,
    MIN_DRAWS,
    StepSizes,
    precise,
    settled,
)
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

# With config.mala, the MALA acceptance is measured on every this-many-th draw: one more
# gradient each: about 5% of the draws' cost.
MALA_EVERY = 10
# An adapting chain's step size follows its MALA acceptance measured on every this-many-th
# step (one more gradient each), and starts here when it has no earlier estimate's; a cold
# chain adapts for ADAPT_STEPS before its burn-in.
ADAPT_EVERY = 2
INITIAL_STEP_SIZE = 1e-4
ADAPT_STEPS = 400
# A model of up to PIECE / 2 weights draws each chain's noise for up to this many steps at
# once (``_Noise``).
NOISE_AHEAD = 32
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


class ChainStart(NamedTuple):
    """Where one chain starts: a previous estimate's end, carried over to new weights.

    Attributes:
        offset: The chain's ``w - w*`` at the end of the previous estimate, over the weights
            it moves (its mask's, in order), on the CPU; ``None``: start at ``w*``.
        step_size: The step size it drew with.
    """

    offset: Tensor | None
    step_size: float


class ChainGroup(NamedTuple):
    """Chains that run as one vectorized batch: they sample the same parameters.

    Attributes:
        forked: Where the chains' weights live and how their losses and gradients are taken:
            the fork whose flat weights these chains move (narrowed to the parameters their
            restrictions touch), or a sharded model's chain (``sharded.ShardedChains``).
        noise_ids: Per chain, the index whose generator (seeded by ``config.seed`` and it)
            draws the chain's noise; chain ``i`` of any restriction uses ``i``.
        masks: Per chain, the flat weights it may move (``None``: all of ``forked``'s).
        starts: Per chain, where it starts (``None``: at ``w*``, with ``config.step_size``,
            or ``INITIAL_STEP_SIZE`` when it adapts).
    """

    forked: Any
    noise_ids: Sequence[int]
    masks: Sequence[Tensor | None]
    starts: Sequence[ChainStart | None]


class ChainTraces(NamedTuple):
    """What the chains recorded, one row per chain in group order.

    Each chain draws after its own burn-in, until its own end: the draw arrays are
    ``(chains, config.num_draws)``, NaN past a chain's draws or after it diverged.

    Attributes:
        trace: Minibatch loss at each draw.
        reference: ``L_m(w*)`` on each draw's batch.
        distance: ``||w_t - w*||^2 / 2`` at each draw.
        diverged: Which chains' loss went NaN or infinite, ``(chains,)``.
        mala: Each chain's mean MALA acceptance over every ``MALA_EVERY``-th draw, or
            ``None`` unless ``config.mala``.
        observed: Per observable, each chain's recorded values on every
            ``config.observe_every``-th draw, ``(chains, records, values)``.
        burnin: Each chain's burn-in steps, ``(chains,)``.
        draws: Each chain's draws, ``(chains,)``.
        step_size: Each chain's step size during its draws, ``(chains,)``.
        warm: Which chains started from an earlier estimate's offset, ``(chains,)``.
        ends: Where each chain ended, to start a later estimate from (``ChainStart``).
    """

    trace: np.ndarray
    reference: np.ndarray
    distance: np.ndarray
    diverged: np.ndarray
    mala: np.ndarray | None
    observed: dict[str, np.ndarray]
    burnin: np.ndarray
    draws: np.ndarray
    step_size: np.ndarray
    warm: np.ndarray
    ends: list[ChainStart]


class _Running:
    """One group's chains in flight: their state, gradient buffer, noise and step sizes."""

    def __init__(self, group: ChainGroup, config: LLCConfig, rows: slice) -> None:
        device = group.forked.anchor.device
        self.forked = group.forked
        self.rows = rows
        self.masks = list(group.masks)
        self.starts = list(group.starts)
        self.movable = None
        if any(mask is not None and not bool(mask.all()) for mask in group.masks):
            everything = torch.ones_like(self.forked.anchor, dtype=torch.bool)
            self.movable = torch.stack([everything if m is None else m for m in group.masks])
        weights = self.forked.anchor.expand(len(group.noise_ids), -1).clone()
        rmsprop = config.sampler == "rmsprop_sgld"
        self.state = SamplerState(weights, torch.zeros_like(weights) if rmsprop else None)
        for row in range(len(weights)):
            self.place(row)
        self.grads = torch.empty_like(weights)
        generators = [chain_generator(config.seed, i, device) for i in group.noise_ids]
        make_noise = getattr(self.forked, "noise", _Noise)
        self.noise = make_noise(generators, self.movable)
        adapt = config.step_size == "adapt"
        fixed = INITIAL_STEP_SIZE if adapt else float(config.step_size)
        initial = [fixed if s is None or not adapt else s.step_size for s in self.starts]
        warm = torch.tensor([s is not None for s in self.starts], device=device)
        self.steps = StepSizes(
            torch.tensor(initial, dtype=torch.float64, device=device),
            adapt,
            config.target_acceptance,
            warm,
        )

    def place(self, row: int) -> None:
        """Put chain ``row`` where it starts: ``w*``, plus its offset if it has one."""
        weights = self.state.weights[row]
        weights.copy_(self.forked.anchor)
        start = self.starts[row]
        if start is not None and start.offset is not None:
            offset = start.offset.to(weights.device, weights.dtype)
            mask = self.masks[row]
            if mask is None:
                weights.add_(offset)
            else:
                weights[mask] += offset
        if self.state.square_avg is not None:
            self.state.square_avg[row].zero_()

    def restart_ended(self, ended: Tensor) -> None:
        """Put the chains whose step-size search just ended back at ``w*``, on the device.

        A searching chain is a cold one, started at ``w*`` (``_Phases._restart`` restarts
        from there too), so no host read is needed to know where it goes.
        """
        keep = ~ended[:, None]
        torch.where(keep, self.state.weights, self.forked.anchor, out=self.state.weights)
        if self.state.square_avg is not None:
            self.state.square_avg.mul_(keep)

    def end(self, row: int, step_size: float) -> ChainStart:
        """Where chain ``row`` ended, on the CPU, to start a later estimate from."""
        offset = self.state.weights[row] - self.forked.anchor
        mask = self.masks[row]
        return ChainStart((offset if mask is None else offset[mask]).cpu(), step_size)

    def total(self, sums: Tensor) -> Tensor:
        """Per-chain sums over these weights, completed over every rank's (sharded models)."""
        total = getattr(self.forked, "total", None)
        return sums if total is None else total(sums)


class _Noise:
    """Adds each chain's standard normal noise, from its own generator, in place (``AddNoise``).

    A chain's noise depends only on its generator and the number ``dim`` of weights it
    moves: a model of up to ``PIECE / 2`` weights draws ``steps_ahead(dim)`` steps of it at
    once, so that its chains' noise costs one operator per step however many chains are in
    flight, plus one draw per chain every so many steps; a larger model draws every step in
    pieces of at most ``PIECE`` weights, one chain after another. Outside a chain's mask the
    noise is zero.

    Memory: the draws ahead hold at most ``PIECE`` numbers per chain (16 MB in float32).
    """

    def __init__(self, generators: list[torch.Generator], movable: Tensor | None) -> None:
        self.generators = generators
        self.movable = movable
        self._ahead: NoiseAhead | None = None

    def __call__(self, weights: Tensor, scale: Tensor, factor: Tensor | None) -> None:
        if steps_ahead(weights.shape[1]) == 1:
            self._in_pieces(weights, scale, factor)
            return
        if self._ahead is None:
            self._ahead = NoiseAhead(self.generators, weights.shape[1], weights.device)
        xi = self._ahead.next()
        if self.movable is not None:
            xi.mul_(self.movable)
        xi.mul_(scale.to(xi.dtype)[:, None])
        if factor is None:
            weights.add_(xi)
        else:
            weights.addcmul_(factor, xi)

    def _in_pieces(self, weights: Tensor, scale: Tensor, factor: Tensor | None) -> None:
        for row, generator in enumerate(self.generators):
            for start in range(0, weights.shape[1], PIECE):
                piece = slice(start, start + PIECE)
                target = weights[row, piece]
                xi = torch.randn(
                    target.shape, generator=generator, device=target.device, dtype=target.dtype
                )
                if self.movable is not None:
                    xi.mul_(self.movable[row, piece])
                xi.mul_(scale[row])
                if factor is None:
                    target.add_(xi)
                else:
                    target.addcmul_(factor[row, piece], xi)


class NoiseAhead:
    """Chains' standard normal noise, drawn ``steps_ahead(dim)`` steps at a time.

    Each chain draws from its own generator, once every so many steps; a step takes a view.

    Args:
        generators: Each chain's generator.
        dim: The number of weights a chain moves.
        device: Where the noise lives.
    """

    def __init__(self, generators: list[torch.Generator], dim: int, device: torch.device) -> None:
        self.generators = generators
        self._drawn = torch.empty((len(generators), steps_ahead(dim), dim), device=device)
        self._step = 0

    def next(self) -> Tensor:
        """This step's noise, ``(chains, dim)``: a view the caller may scale in place."""
        at = self._step % self._drawn.shape[1]
        if at == 0:
            for row, generator in enumerate(self.generators):
                torch.randn(self._drawn.shape[1:], generator=generator, out=self._drawn[row])
        self._step += 1
        return self._drawn[:, at]


def steps_ahead(dim: int) -> int:
    """How many steps of noise a chain moving ``dim`` weights draws at once (``_Noise``)."""
    return max(1, min(NOISE_AHEAD, PIECE // dim))


def run_chains(
    groups: Sequence[ChainGroup],
    batches: Iterator[Any],
    config: LLCConfig,
    nbeta: float,
    progress: bool,
    observables: Mapping[str, ProbeBatches] | None = None,
    keep_ends: bool = False,
) -> ChainTraces:
    """Run groups of chains, all on the same minibatches.

    At most ``config.chains_in_flight`` chains (``"auto"``: see ``_in_flight``) are held in
    memory and step together (a wave); later waves replay the first one's minibatches, kept
    for them. Every chain tunes itself (``llc_callbacks.adaptation``): its step size, the end
    of its burn-in and of its draws depend only on the seed, its index, its start, ``w*``
    and the minibatches, so the numbers do not depend on how the chains are split into waves
    or ranks, but for float rounding.

    Args:
        groups: The chains, each group one vectorized batch.
        batches: Endless minibatches on the chains' device.
        config: Hyperparameters (``num_burnin``, ``num_draws``, sampler, ...).
        nbeta: The resolved inverse temperature.
        progress: Show a progress bar, when the output is a terminal.
        observables: Probe sets whose losses every chain records on every
            ``config.observe_every``-th draw (the chains then draw ``num_draws`` each).
        keep_ends: Keep each chain's offset from ``w*`` in ``ends`` (a CPU copy of the
            weights it moves); otherwise ``ends`` holds the step sizes only.

    Returns:
        The traces, one row per chain, group after group.
    """
    chains, draws = sum(len(group.noise_ids) for group in groups), config.num_draws
    device = groups[0].forked.anchor.device if groups else torch.device("cpu")
    traces = _Traces(
        trace=np.full((chains, draws), np.nan),
        reference=np.full((chains, draws), np.nan),
        distance=np.full((chains, draws), np.nan),
        acceptance=torch.zeros(chains, device=device),
        measured=torch.zeros(chains, device=device),
        healthy=torch.ones(chains, dtype=torch.bool, device=device),
        observed={
            name: torch.full(
                (chains, config.observed_draws, probe.size), float("nan"), device=device
            )
            for name, probe in (observables or {}).items()
        },
        burnin=np.zeros(chains, dtype=int),
        draws=np.zeros(chains, dtype=int),
        step_size=np.full(chains, math.nan),
        warm=np.zeros(chains, dtype=bool),
        ends=[],
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
        for wave in waves:
            wave_batches = kept.replay() if kept is not None else batches
            _run_wave(
                wave,
                first_row,
                wave_batches,
                config,
                nbeta,
                traces,
                bar,
                observables or {},
                keep_ends,
            )
            first_row += sum(len(group.noise_ids) for group in wave)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not _out_of_memory(error):
            raise
        raise _explained(error, groups, config, in_flight) from error
    finally:
        bar.close()
    return ChainTraces(
        traces.trace,
        traces.reference,
        traces.distance,
        (~traces.healthy).cpu().numpy(),
        (traces.acceptance / traces.measured.clamp(min=1)).cpu().numpy() if config.mala else None,
        {name: losses.cpu().numpy() for name, losses in traces.observed.items()},
        traces.burnin,
        traces.draws,
        traces.step_size,
        traces.warm,
        traces.ends,
    )


def run_chains_at_anchor(
    first: Any,
    batches: Iterator[Any],
    loss_at_anchor: Callable[[Any], Tensor],
    config: LLCConfig,
    run: Callable[[Iterator[Any]], ChainTraces],
) -> tuple[ChainTraces, float]:
    """Run the chains (``run``) on ``first`` and the batches after it, and measure ``L(w*)``.

    Paired (``config.paired``), ``L(w*)`` is the mean of the draws' references, the losses at
    ``w*`` the LLC subtracts, on every draw's minibatch (on ``first`` if no chain drew): no
    minibatch of its own. Unpaired, the mean over ``config.init_loss_batches`` minibatches,
    ``first`` and those after it, before the chains' own.

    Args:
        first: The first minibatch.
        batches: The endless minibatches after it.
        loss_at_anchor: The loss at ``w*`` on a minibatch.
        config: Hyperparameters.
        run: Runs the chains on the minibatches it is given.

    Returns:
        The chains' traces and ``L(w*)``.
    """
    if config.paired:
        traces = run(itertools.chain([first], batches))
        drawn = traces.reference[~np.isnan(traces.reference)]
        return traces, float(drawn.mean()) if drawn.size else loss_at_anchor(first).item()
    init = [first] + [next(batches) for _ in range(config.init_loss_batches - 1)]
    init_loss = torch.stack([loss_at_anchor(batch) for batch in init]).mean().item()
    return run(batches), init_loss


class _Traces(NamedTuple):
    """What every wave writes into, one row per chain."""

    trace: np.ndarray
    reference: np.ndarray
    distance: np.ndarray
    acceptance: Tensor
    measured: Tensor
    healthy: Tensor
    observed: dict[str, Tensor]
    burnin: np.ndarray
    draws: np.ndarray
    step_size: np.ndarray
    warm: np.ndarray
    ends: list[ChainStart]


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
            part = slice(start, end)
            waves[-1].append(
                ChainGroup(
                    group.forked, group.noise_ids[part], group.masks[part], group.starts[part]
                )
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
    bar: tqdm,
    observables: Mapping[str, ProbeBatches],
    keep_ends: bool,
) -> None:
    """Step one wave of chains through their burn-ins and draws, writing into ``traces``.

    Every step evaluates the loss at ``w*`` on its batch once for the wave (the paired
    reference, and each chain's excess loss for its checks). The wave's weights and
    gradients live in this call only: they are freed before the next wave's are made.

    Args:
        wave: The wave's groups.
        first_row: The row of ``traces`` its first chain writes.
        batches: Its minibatches.
        config: Hyperparameters.
        nbeta: The resolved inverse temperature.
        traces: Where each chain writes its row.
        bar: The progress bar to advance.
        observables: The probe sets whose losses the draws record.
        keep_ends: Keep each chain's end offset (see ``run_chains``).
    """
    sizes = [len(group.noise_ids) for group in wave]
    ends = [first_row + end for end in itertools.accumulate(sizes)]
    running = [
        _Running(group, config, slice(end - size, end))
        for group, size, end in zip(wave, sizes, ends, strict=True)
    ]
    chains, device = sum(sizes), running[0].forked.anchor.device
    steps = config.num_burnin + config.num_draws
    phases = _Phases(running, config, chains, device, stop_early=not observables)
    # Every step's numbers, for every chain, stay on the device until the wave ends: the
    # draws are cut out of them then (``_Phases.finish``).
    recorded = _Recorded(
        losses=torch.full((chains, steps), float("nan"), device=device),
        reference=torch.full((steps,), float("nan"), device=device),
        distance=torch.full((chains, steps), float("nan"), device=device),
        excess=torch.full((chains, steps), float("nan"), device=device),
    )
    step_rule = _sampler_step(config, nbeta)
    local = [slice(g.rows.start - first_row, g.rows.stop - first_row) for g in running]
    for t in range(steps):
        if phases.all_done():
            break
        bar.update()
        batch = next(batches)
        reference = running[0].forked.loss_at_anchor(batch)
        recorded.reference[t] = reference
        for group, rows in zip(running, local, strict=True):
            forked, weights, own = group.forked, group.state.weights, group.rows
            losses, grads = forked.loss_and_grad(weights, batch, out=group.grads)
            traces.healthy[own] &= torch.isfinite(losses)
            recorded.excess[rows, t] = nbeta * (losses - reference)
            recorded.losses[rows, t] = torch.where(traces.healthy[own], losses, float("nan"))
            drawing = phases.drawing_rows(rows)
            if drawing.size:
                distance = group.total(_half_square_distances(weights, forked.anchor))
                recorded.distance[rows, t] = distance
                draw = t - phases.began[rows]
                observed = drawing[draw[drawing] % config.observe_every == 0]
                if observed.size:
                    _observe(group, observed, draw, config, traces, observables)
            if group.movable is not None:  # no drift outside a chain's mask (nor noise)
                grads.mul_(group.movable)
            step_size = torch.where(phases.moving(rows, t), group.steps.current, 0.0)
            measured = phases.measured(rows, t)
            before = weights.clone() if measured else None
            group.state, info = step_rule(group.state, grads, forked.anchor, group.noise, step_size)
            if before is None:
                continue
            acceptance = _mala_acceptance(
                group, before, info, losses, grads, batch, config, nbeta, step_size
            )
            if phases.adapt_now(t):
                ended = group.steps.update(acceptance, phases.adapting_now(rows))
                if group.steps.searching:
                    group.restart_ended(ended)
                    phases.search_ended(rows, ended, t + 1)
            if config.mala:
                diagnostic = phases.diagnostic(rows, t)
                traces.acceptance[own] += torch.where(diagnostic, acceptance, 0.0)
                traces.measured[own] += diagnostic
            phases.watch(rows, t, acceptance)
        phases.advance(t, running, local, recorded.excess, traces, first_row)
    phases.finish(running, local, recorded, traces, first_row, keep_ends)


class _Recorded(NamedTuple):
    """What a wave records at every step, on the device: ``(chains, steps)``, ``(steps,)``."""

    losses: Tensor
    reference: Tensor
    distance: Tensor
    excess: Tensor


# A chain's phase: a cold chain adapting its step size, any chain's burn-in (a warm chain
# adapts in it), its draws, and done.
ADAPTING, BURNIN, DRAWING, DONE = 0, 1, 2, 3


class _Phases:
    """Each chain's phase in its wave, and the decisions that move it on.

    A cold chain (no earlier estimate's offset) with ``step_size="adapt"`` first searches
    its step size's scale, goes back to its start (the search's large steps can drive a
    chain far out), refines the step size until ``ADAPT_STEPS`` have passed, and burns in
    from where the refining left it at the frozen step size: its climb so far is kept (on
    deep linear networks of 11,900 to 10^5 weights, going back to the start once more left
    the draws at the climb's steep end, 16 to 26% high), and a chain whose acceptance then
    falls is cooled (``_cool``). A warm chain adapts during its burn-in, from the step size
    it had.

    The phases live on the host, where the decisions are taken every ``CHECK_EVERY`` steps
    (the one read of the device between them), and a copy on the device gives each step's
    masks (``moving``, ``adapting_now``, ``diagnostic``): nothing between two checks waits for
    the device.
    """

    def __init__(
        self,
        running: list[_Running],
        config: LLCConfig,
        chains: int,
        device: torch.device,
        *,
        stop_early: bool,
    ) -> None:
        self.config, self.device = config, device
        self.adapt = config.step_size == "adapt"
        self.stop_early = stop_early and config.relative_error is not None
        warm = np.array([s is not None and s.offset is not None for g in running for s in g.starts])
        first = np.where(warm | (not self.adapt), BURNIN, ADAPTING)
        self.phase = np.full(chains, DRAWING) if config.num_burnin == 0 else first
        self.warm_adapting = warm & self.adapt
        self.began = np.full(chains, config.num_burnin)
        steps = config.num_burnin + config.num_draws
        self.stopped = np.full(chains, steps)  # where each chain's draws ended
        self.restarts = np.zeros(chains, dtype=int)
        self.since = np.zeros(chains, dtype=int)  # where the current phase began
        self.min_burnin = np.where(warm, MIN_BURNIN_WARM, MIN_BURNIN_COLD)
        # Per chain, on the device: summed acceptances of the watched burn-in and their count;
        # the step its search ended at.
        self._watched = torch.zeros(2, chains, device=device)
        self._search_end = torch.zeros(chains, dtype=torch.long, device=device)
        self._upload()

    def all_done(self) -> bool:
        return bool((self.phase == DONE).all())

    def adapting(self) -> np.ndarray:
        return (self.phase == ADAPTING) | ((self.phase == BURNIN) & self.warm_adapting)

    def watching(self) -> np.ndarray:
        """The chains whose burn-in at a frozen step size is watched for heating."""
        return (self.phase == BURNIN) & ~self.warm_adapting & self.adapt

    def moving(self, rows: slice, t: int) -> Tensor:
        """Which of the group's chains still step at ``t`` (those done stay put): on the device."""
        return self._stop[rows] > t

    def adapting_now(self, rows: slice) -> Tensor:
        """Which of the group's chains adapt their step size: on the device."""
        return self._adapting[rows]

    def diagnostic(self, rows: slice, t: int) -> Tensor:
        """Which of the group's chains measure their draws' MALA acceptance at ``t``."""
        drawn = t - self._began[rows]
        return self._drawing[rows] & (self._stop[rows] > t) & (drawn % MALA_EVERY == 0)

    def drawing_rows(self, rows: slice) -> np.ndarray:
        """The group's rows (0-based in it) that draw at this step."""
        return np.flatnonzero(self.phase[rows] == DRAWING)

    def adapt_now(self, t: int) -> bool:
        return self.adapt and t % ADAPT_EVERY == 0

    def measured(self, rows: slice, t: int) -> bool:
        """Whether any of the group's chains needs a MALA acceptance of step ``t``."""
        adapting = self.adapting()[rows] & self.adapt_now(t)
        draw = t - self.began[rows]
        diagnostic = (self.phase[rows] == DRAWING) & self.config.mala & (draw % MALA_EVERY == 0)
        watched = self.watching()[rows] & (t % MALA_EVERY == 0)
        return bool((adapting | diagnostic | watched).any())

    def watch(self, rows: slice, t: int, acceptance: Tensor) -> None:
        """Add step ``t``'s acceptances of the watched chains to their burn-in's tally."""
        if t % MALA_EVERY == 0:
            watched = self._watching[rows]
            self._watched[0, rows] += torch.where(watched, acceptance, 0.0)
            self._watched[1, rows] += watched

    def search_ended(self, rows: slice, ended: Tensor, step: int) -> None:
        """Note, on the device, that the ``ended`` chains adapt again from ``step`` on."""
        self._search_end[rows] = torch.where(ended, step, self._search_end[rows])

    def advance(
        self,
        t: int,
        running: list[_Running],
        local: list[slice],
        excess: Tensor,
        traces: _Traces,
        first_row: int,
    ) -> None:
        """Move chains on after step ``t``.

        Draws that are complete end at once; every ``CHECK_EVERY`` steps (one host read),
        adaptations that are complete, burn-ins that have settled and draws that are
        precise enough end too, and chains that diverged before their draws start over.
        """
        config, done = self.config, t + 1
        complete = (self.phase == DRAWING) & (done - self.began >= config.num_draws)
        self.phase[complete] = DONE
        self.stopped[complete] = done
        last = done == config.num_burnin + config.num_draws
        if done % CHECK_EVERY and done != config.num_burnin and not last:
            return
        healthy = traces.healthy[first_row : first_row + len(self.phase)].cpu().numpy()
        window = excess[:, :done].cpu().numpy()
        watched = self._watched.cpu().numpy()
        adapting = self.phase == ADAPTING
        self.since[adapting] = np.maximum(self.since, self._search_end.cpu().numpy())[adapting]
        for group, part in zip(running, local, strict=True):
            group.steps.refresh()
            for row in range(part.start, part.stop):
                member = row - part.start
                if self.phase[row] in (ADAPTING, BURNIN) and not healthy[row]:
                    self._restart(row, member, group, done, traces, first_row)
                elif watched[1, row] >= HEAT_CHECKS:
                    mean = watched[0, row] / watched[1, row]
                    self._watched[:, row] = 0  # windows of HEAT_CHECKS measurements
                    if mean < self.config.target_acceptance - HEAT_MARGIN:
                        self._cool(row, member, group, done)
                elif self.phase[row] == ADAPTING:
                    self._end_adaptation(row, member, group, done)
                elif self.phase[row] == BURNIN:
                    self._end_burnin(row, member, group, done, window[row, self.since[row] :])
                elif self.phase[row] == DRAWING:
                    self._end_draws(row, done, healthy[row], window[row, self.began[row] :])
        self._upload()

    def _upload(self) -> None:
        """Copy what the steps' masks need of the phases to the device.

        ``_stop``: the step each chain stops stepping at (its draws' end; 0 when done).
        """
        stop = np.where(
            self.phase == DRAWING, self.began + self.config.num_draws, np.iinfo(int).max
        )
        stop[self.phase == DONE] = 0
        device = self.device
        self._stop = torch.as_tensor(stop, device=device)
        self._began = torch.as_tensor(self.began, device=device)
        self._drawing = torch.as_tensor(self.phase == DRAWING, device=device)
        self._adapting = torch.as_tensor(self.adapting(), device=device)
        self._watching = torch.as_tensor(self.watching(), device=device)

    def _restart(
        self, row: int, member: int, group: _Running, done: int, traces: _Traces, first_row: int
    ) -> None:
        """A chain that diverged before its draws adapts again from ``w*``, or is done.

        From ``w*``, not from an earlier estimate's offset, since a search ends by putting
        the chain back at ``w*`` (``_Running.restart_ended``).
        """
        if not self.adapt or self.restarts[row] >= MAX_RESTARTS:
            self.phase[row], self.stopped[row] = DONE, done
            return
        self.restarts[row] += 1
        group.starts[member] = None
        group.place(member)
        group.steps.restart(self._one(member, group))
        traces.healthy[first_row + row] = True
        self.phase[row], self.warm_adapting[row] = ADAPTING, False
        self.min_burnin[row] = MIN_BURNIN_COLD
        self.since[row] = done

    def _cool(self, row: int, member: int, group: _Running, done: int) -> None:
        """A chain heating up at its frozen step size burns in again, from its start, slower.

        With weak localization a chain keeps spreading along directions the loss hardly
        constrains, over ``1 / (eps gamma)`` steps, and may reach places where its step size
        is unstable; its acceptance tells, and it starts over with ``COLD_MARGIN`` smaller
        steps (on a deep linear network of 52,500 weights: acceptance 0.3 and an estimate
        41% high after 600 steps at the adapted step size).
        """
        if self.restarts[row] >= MAX_RESTARTS:
            return
        self.restarts[row] += 1
        group.steps.scale(self._one(member, group), COLD_MARGIN)
        group.place(member)
        self.since[row] = done
        self.min_burnin[row] = done + MIN_BURNIN_COLD

    def _end_adaptation(self, row: int, member: int, group: _Running, done: int) -> None:
        """After ``ADAPT_STEPS``: freeze the step size, and burn in on from where it is."""
        if done >= self.config.num_burnin:  # no room for a burn-in
            group.steps.freeze(self._one(member, group))
            self.phase[row], self.began[row] = DRAWING, done
        elif done - self.since[row] >= ADAPT_STEPS:
            group.steps.freeze(self._one(member, group))
            self.phase[row], self.since[row] = BURNIN, done
            self.min_burnin[row] = done + MIN_BURNIN_COLD

    def _end_burnin(
        self, row: int, member: int, group: _Running, done: int, window: np.ndarray
    ) -> None:
        """Begin a chain's draws at the most burn-in, or (adapting) once it has settled."""
        long_enough = done >= self.min_burnin[row] and len(window) >= 2 * CHECK_EVERY
        if done >= self.config.num_burnin or (self.adapt and long_enough and settled(window)):
            if self.warm_adapting[row]:
                group.steps.freeze(self._one(member, group))
            self.phase[row] = DRAWING
            self.began[row] = done

    @staticmethod
    def _one(member: int, group: _Running) -> Tensor:
        return _one_hot(member, len(group.masks), group.forked.anchor.device)

    def _end_draws(self, row: int, done: int, healthy: bool, draws: np.ndarray) -> None:
        """End a chain's draws when it diverged or (``relative_error``) is precise enough."""
        if not healthy or (
            self.stop_early
            and done - self.began[row] >= MIN_DRAWS
            and precise(draws, self.config.num_chains, self.config.relative_error)
        ):
            self.phase[row], self.stopped[row] = DONE, done

    def finish(
        self,
        running: list[_Running],
        local: list[slice],
        recorded: _Recorded,
        traces: _Traces,
        first_row: int,
        keep_ends: bool,
    ) -> None:
        """Record each chain's draws (cut out of the wave's steps), burn-in, step size, end."""
        steps = self.config.num_burnin + self.config.num_draws
        losses, distance = recorded.losses.cpu().numpy(), recorded.distance.cpu().numpy()
        reference = recorded.reference.cpu().numpy()
        for group, part in zip(running, local, strict=True):
            sizes = group.steps.current.cpu().numpy()
            for member, row in enumerate(range(part.start, part.stop)):
                chain = first_row + row
                began = min(self.began[row], steps)
                drawn = slice(began, max(began, self.stopped[row]))
                count = drawn.stop - drawn.start
                traces.trace[chain, :count] = losses[row, drawn]
                traces.reference[chain, :count] = reference[drawn]
                traces.distance[chain, :count] = distance[row, drawn]
                traces.burnin[chain] = began
                traces.draws[chain] = int(np.isfinite(traces.trace[chain]).sum())
                traces.step_size[chain] = sizes[member]
                start = group.starts[member]
                traces.warm[chain] = start is not None and start.offset is not None
                healthy = bool(traces.healthy[chain])
                traces.ends.append(
                    group.end(member, float(sizes[member]))
                    if healthy and keep_ends
                    else ChainStart(None, float(sizes[member]))
                )


def _one_hot(index: int, size: int, device: torch.device) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    mask[index] = True
    return mask


def _observe(
    group: _Running,
    rows: np.ndarray,
    draw: np.ndarray,
    config: LLCConfig,
    traces: _Traces,
    observables: Mapping[str, ProbeBatches],
) -> None:
    """Record the observables of the group's chains ``rows`` at their draws."""
    weights, chain = group.state.weights, group.rows.start + rows
    records = draw[rows] // config.observe_every
    for name, probe in observables.items():
        found = [group.forked.observed(weights, b, probe.losses) for b in probe.batches]
        values = torch.cat(found, dim=1)[torch.as_tensor(rows, device=weights.device)]
        device = values.device
        traces.observed[name][torch.as_tensor(chain, device=device), records] = values


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
    group: _Running,
    before: Tensor,
    info: StepInfo,
    losses: Tensor,
    grads: Tensor,
    batch: Any,
    config: LLCConfig,
    nbeta: float,
    step_size: Tensor,
) -> Tensor:
    """Per-chain MALA acceptance probability of one step (one more gradient, same batch)."""
    after = group.state.weights
    new_losses, new_grads = group.forked.loss_and_grad(after, batch)
    log_acceptance = mala_log_acceptance(
        before,
        after,
        group.forked.anchor,
        losses,
        new_losses,
        grads,
        new_grads,
        step_size=step_size,
        nbeta=nbeta,
        localization=config.localization,
        precond=info.precond,
        mask=group.movable,
        total=group.total,
    )
    return torch.nan_to_num(log_acceptance.exp(), nan=0.0)


def _sampler_step(config: LLCConfig, nbeta: float):
    """The update rule, ``rule(state, grads, anchor, noise, step_size)``."""
    common = {"nbeta": nbeta, "localization": config.localization}
    if config.sampler == "rmsprop_sgld":
        rule = functools.partial(
            rmsprop_sgld_step, alpha=config.rmsprop_alpha, eps=config.rmsprop_eps, **common
        )
    else:
        rule = functools.partial(sgld_step, **common)

    def step(state, grads, anchor, noise, step_size):
        return rule(state, grads, anchor, noise, step_size=step_size)

    return step


def chain_generator(seed: int, chain: int, device: torch.device) -> torch.Generator:
    """A noise generator that depends only on the seed and the chain's index."""
    chain_seed = int(np.random.SeedSequence([seed, chain]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(chain_seed)
