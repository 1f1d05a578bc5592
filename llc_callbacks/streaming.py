"""``Stream``: readings of chains that persist through training, paced to a share of its time.

A streaming monitor tunes its chains once, in a first reading, and from then on every reading
continues the chains where the last one left them, around the current weights: no adaptation,
each chain at the step size it was tuned to. A turn of the curve then comes from the weights,
not from a step size adapted anew at each point. Where all chains hold one step size ``eps``
(measured, or the config's), a reading's first steps, one relaxation time ``1 / (eps gamma)``
but at most half of them, are burn-in: the chains relax to the weights that moved since the
last reading. The first reading takes its step size from the curvature at the weights
(``curvature.mala_step_size``, 16 gradients: the step size whose MALA acceptance is the target
in the Gaussian approximation) and burns in at it for ``RELAXATION`` times the localization's
relaxation time ``1 / (eps gamma)``, at most ``TUNING_STEPS`` and ``config.num_burnin`` steps;
with ``sampler="rmsprop_sgld"`` (no such formula), a sharded model, or a ``step_size`` of its
own, it adapts or holds that step size as a snapshot estimate does, in at most as many steps.
The chains are tuned again only when they become unstable, and ``{prefix}/tuned`` marks the
reading that does: after a reading whose MALA acceptance fell below ``MALA_MIN`` (the loss
sharpened under the held step size, biasing the LLC high), by adaptation from where the chains
are; after one whose chains diverged, every chain afresh, from the weights and the initial step
size; after a resume, from the weights at the step sizes of the checkpoint.

Every reading takes a fixed number of steps per chain (``relative_error`` is not used). With
``max_overhead`` that number keeps the readings' time, the tuning included, within that share
of the training time so far: as many steps as the share of the training time not yet spent
allows at the chain-step time measured by the readings before (at least ``MIN_STEPS``; a tuning
reading with no measured time draws ``MIN_STEPS``), so the readings after a tuning one take
fewer until its cost is repaid. Without it, ``config.num_draws`` steps. A reading's LLC is the
mean of its own draws: pooling the readings before it (a window of 40 draws) made a deep
linear network's readings trail its stages by hundreds of steps (``benchmarks/curves.py``).

A reading has a few dozen draws per chain at most, around weights that move: too few for
the checks that judge a burn-in (R-hat, ``trend_z`` and ``climb`` within the reading, which
read as NaN in a reading of fewer than ``POOLED_DRAWS`` draws per chain) or for a MALA
acceptance of its own. Its MALA acceptance and localization sensitivity are pooled over the
readings since the last tuning (that one included), the recent ones holding at least
``POOLED_DRAWS`` draws per chain, weighted by their draws (NaN, and not judged, until they
hold that many); divergence is its own.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from llc_callbacks.adaptation import MIN_BURNIN_WARM
from llc_callbacks.chains import ADAPT_STEPS
from llc_callbacks.config import LLCConfig
from llc_callbacks.diagnostics import MALA_MIN
from llc_callbacks.distributed import gather_from_every_rank, rank_and_world
from llc_callbacks.result import LLCResult
from llc_callbacks.validation import check_float

# max_overhead="auto" of a streaming monitor: training with readings takes 1.35 times as long,
# as far as MIN_STEPS and the tuning allow. At 0.4 runs of benchmarks/curves.py took +38% to
# +53% (the same run +40% and +53%: timing noise, and a paced reading may overshoot its share)
# and the README's Lightning example 1.45 times (first_contact.py): too near their 50%.
STREAM_SHARE = 0.35
# The most burn-in steps of a tuning reading: the step size's adaptation and a short burn-in
# after it. The readings that follow continue the chains, so they go on relaxing there; a
# settled burn-in (at least MIN_BURNIN_COLD steps more) doubled the tuning's cost.
TUNING_STEPS = ADAPT_STEPS + MIN_BURNIN_WARM
# A first reading at a measured step size burns in this many times 1 / (eps gamma): from w*,
# the variance along directions that only the localization holds (the slowest to relax)
# reaches 1 - exp(-3), 95%, of its level. The readings after it go on relaxing the chains.
RELAXATION = 3.0
# The fewest steps a paced reading takes, its burn-in included, however little of the share is
# left: below it a reading is noise (the readings may then exceed their share of the time). A
# reading of 20 steps, 10 of them burn-in, would make the README's examples cost 1.55 and 1.64
# times the run without the callback (first_contact.py), over their 1.5.
MIN_STEPS = 10
# A reading's MALA acceptance and localization sensitivity are pooled over the
# recent readings until they hold at least this many draws per chain (the MALA acceptance is
# measured on every tenth draw: 4 chains x 10 measurements).
POOLED_DRAWS = 100
# The diagnostics that judge a burn-in: NaN in a reading of fewer than POOLED_DRAWS draws.
BURNIN_CHECKS = ("rhat", "trend_z", "climb")
# The diagnostics pooled over recent readings.
POOLED = ("mala_acceptance", "loc_sensitivity")


class _Read(NamedTuple):
    """What a reading leaves for the next ones to pool."""

    draws: float  # per chain
    diagnostics: dict[str, float]


class Stream:
    """What the next reading runs: a tuning estimate, or draws that continue the chains.

    Args:
        max_overhead: The share of the training time the readings may take, the tuning ones
            included (0.5: training with readings takes at most 1.5 times as long, as far
            as ``MIN_STEPS`` allows); ``None``: every reading draws ``config.num_draws``
            steps.

    Attributes:
        tune: Whether the next reading tunes the chains: the first; after a resume; after
            a reading whose MALA acceptance (pooled) fell below ``MALA_MIN``, from where the
            chains are; after one whose chains diverged or that failed, afresh (``cold``).
        first: Whether no reading has run yet (the one that may measure its step size).
        cold: Whether that tuning starts every chain afresh, at the weights.
        held: The step size every chain holds since the last tuning (measured, or the
            config's own); ``None`` where each chain adapted its own.
        step_seconds: Seconds per chain step (all chains together) in the last reading, its
            forking and ``L(w*)`` included; ``None`` before any.
        trained: Seconds of training so far (between the readings).
        spent: Seconds of readings so far.

    Raises:
        ValueError: If ``max_overhead`` is not a number above 0.
    """

    def __init__(self, max_overhead: float | None) -> None:
        if max_overhead is not None:
            check_float("max_overhead", max_overhead, positive=True)
        self.max_overhead = max_overhead
        self.tune = True
        self.first = True
        self.cold = False
        self.step_seconds: float | None = None
        self.held: float | None = None
        self.trained = self.spent = 0.0
        self._ended: float | None = None  # when the last reading ended
        self._began = 0.0
        self._more_steps: str | None = None  # what gives a continuing reading more steps
        # Per estimate name (None: the full LLC), the readings since the last tuning (that
        # one included) that the pooled diagnostics draw on, newest last.
        self._recent: dict[str | None, list[_Read]] = {}

    def start(self) -> None:
        """Training (re)starts: its clock runs from now until the first reading."""
        if self._ended is None:
            self._ended = time.perf_counter()

    def plan(
        self,
        config: LLCConfig,
        *,
        distributed: bool,
        measure: Callable[[LLCConfig], float] | None = None,
    ) -> LLCConfig:
        """The config of the next reading, and start timing it.

        Args:
            config: The monitor's config (a tuning reading runs it with its burn-in capped).
            distributed: Agree with the other ranks on the number of draws (a collective).
            measure: Measures a step size for ``config`` (``curvature.mala_step_size``): the
                run's first reading draws at it, when its chains would adapt plain SGLD's.
                Timed as part of the reading.

        Returns:
            ``config`` with every chain taking the paced number of steps
            (``relative_error=None``); unless it tunes, the first of them burn in for one
            relaxation time ``1 / (eps gamma)`` at the held step size, if there is one.
        """
        now = time.perf_counter()
        self.trained += now - (self._ended if self._ended is not None else now)
        self._began = now
        draws = config.num_draws
        if self.max_overhead is not None:
            left = self.max_overhead * self.trained - self.spent
            fit = math.floor(left / self.step_seconds) if self.step_seconds else MIN_STEPS
            draws = min(draws, max(MIN_STEPS, fit))
        if distributed and rank_and_world()[1] > 1:
            draws = min(gather_from_every_rank(lambda: draws))
        # What gives a continuing reading more steps (num_burnin does not), for its advice.
        limit = "num_draws" if draws == config.num_draws else "max_overhead"
        now_at = config.num_draws if limit == "num_draws" else self.max_overhead
        self._more_steps = f"raise {limit} (now {now_at:g}) for more steps a reading"
        gamma = config.localization
        if self.tune:
            burnin = min(config.num_burnin, TUNING_STEPS)
            self.held = None if isinstance(config.step_size, str) else config.step_size
            adapts = config.step_size == "adapt" and config.sampler == "sgld"
            if measure is not None and self.first and adapts:
                self.held = measure(config)
                relaxed = math.ceil(RELAXATION / (self.held * gamma)) if gamma > 0 else burnin
                burnin = min(burnin, relaxed)
        else:
            # The weights moved since the last reading: the chains relax to them first, for
            # one relaxation time but at most half the reading's steps, even at the floor of
            # MIN_STEPS. At a deep linear network's stage turns the first draws read up to 20
            # times the level the chains settle at within 10 steps; at the turn at step 1,500,
            # readings at the floor that drew all their steps read 3.4 to 4.4 times the long
            # chains, 1.15 to 1.33 with 5 of them burn-in (three seeds, benchmarks/curves.py).
            relaxed = math.ceil(1 / (self.held * gamma)) if self.held and gamma > 0 else 0
            burnin = min(relaxed, draws // 2)
            draws -= burnin
        if self.held is not None:
            config = dataclasses.replace(config, step_size=self.held)
        return dataclasses.replace(config, num_burnin=burnin, num_draws=draws, relative_error=None)

    def read(self, result: LLCResult | None, *, tuning: bool) -> LLCResult | None:
        """A reading ended with ``result`` (``None``: it failed): time it, judge its chains.

        Args:
            result: The reading, or ``None`` if it failed.
            tuning: Whether it was a tuning reading (``plan`` kept the burn-in).

        Returns:
            ``result``, with its diagnostics as its health is judged (see the module's
            docstring).
        """
        self._ended = time.perf_counter()
        self.spent += self._ended - self._began
        self.first = False
        if result is None or result.error is not None or not math.isfinite(result.llc_mean):
            self.tune = self.cold = True
            self._recent = {}
            return result
        steps = int((result.burnin + result.draws).max(initial=0))
        if steps:
            self.step_seconds = (self._ended - self._began) / steps
        if tuning:
            self._recent = {}
        more = None if tuning else self._more_steps
        restricted = {name: self._judged(name, r, more) for name, r in result.restricted.items()}
        result = dataclasses.replace(self._judged(None, result, more), restricted=restricted)
        self.cold = bool(result.diagnostics.get("num_diverged", 0))
        too_large = result.diagnostics.get("mala_acceptance", math.nan) < MALA_MIN
        self.tune = self.cold or (too_large and not tuning)
        return result

    def _judged(self, name: str | None, result: LLCResult, more_steps: str | None) -> LLCResult:
        """One estimate of a reading, with its health pooled over recent readings.

        ``more_steps``: what gives its chains more steps, for the checks' advice.
        """
        if result.error is not None:
            return result
        recent = self._recent.setdefault(name, [])
        drawn = float(result.draws.mean()) if result.draws.size else 0.0
        recent.append(_Read(drawn, result.diagnostics))
        while len(recent) > 1 and sum(read.draws for read in recent[1:]) >= POOLED_DRAWS:
            recent.pop(0)
        diagnostics = dict(result.diagnostics)
        if drawn < POOLED_DRAWS:
            diagnostics |= dict.fromkeys(BURNIN_CHECKS, math.nan)
        pooled = sum(read.draws for read in recent) >= POOLED_DRAWS
        for key in POOLED:
            if key in diagnostics:
                diagnostics[key] = _pooled(recent, key) if pooled else math.nan
        return dataclasses.replace(result, diagnostics=diagnostics, more_steps=more_steps)

    def state_dict(self) -> dict[str, Any]:
        """The measured chain-step time and the time accounts, for a checkpoint."""
        return {"step_seconds": self.step_seconds, "trained": self.trained, "spent": self.spent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a checkpointed run: its chains' offsets are lost, so they tune again."""
        self.step_seconds = state.get("step_seconds")
        self.trained, self.spent = state.get("trained", 0.0), state.get("spent", 0.0)
        self.tune = True


def _pooled(reads: list[_Read], key: str) -> float:
    """The draw-weighted mean of ``key`` over the reads where it is finite (NaN if none)."""
    found = [(read.draws, read.diagnostics.get(key, math.nan)) for read in reads]
    kept = [(draws, value) for draws, value in found if math.isfinite(value)]
    if not kept:
        return math.nan
    weights, values = zip(*kept, strict=True)
    return float(np.average(values, weights=weights))
