"""``Budget``: estimates spaced so that their time stays within a share of the training time.

The monitor times training (the wall time between its estimates) and every estimate. After
each estimate it plans the next one: not before the estimates' total time, the next included,
fits within ``max_overhead`` of the training time, and, beyond that ceiling, sooner where the
LLC moves fast and later where it is flat (see ``pace``), so that time saved on flat stretches
is spent near stage boundaries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from llc_callbacks.distributed import gather_from_every_rank, rank_and_world
from llc_callbacks.keys import metric_key
from llc_callbacks.validation import check_float

# A change of the LLC between the last two estimates beyond this many of its standard errors
# means the curve moves: the next estimate comes PACE_MOVING times sooner than an even spacing
# of the budget would place it. Below CALM standard errors it is flat: PACE_FLAT times later.
MOVING, CALM = 2.0, 1.0
PACE_MOVING, PACE_FLAT = 0.5, 2.0
# Estimates planned from the dearest of the last few, so one fast estimate does not let the
# next one break the ceiling.
RECENT = 3


class Budget:
    """Plans estimates so that their total time stays within ``max_overhead`` of training's.

    After each estimate the budget sets a target, in seconds of training: the next estimate
    may run once the estimates' total time, the next one's included (priced as the dearest of
    the last ``RECENT``), is at most ``max_overhead`` of the training time, and once training
    has run ``pace * cost / max_overhead`` seconds since the last one. It turns the target
    into a step from the mean time of a training step so far, and at that step checks the
    clock again, planning a later step if training was slower than the mean.

    The ceiling holds from the second estimate on: the first runs when due, before any
    estimate's cost is known, so a run shorter than that cost over ``max_overhead`` exceeds it.

    Args:
        max_overhead: The largest ratio of the estimates' time to the training time (0.1:
            training with estimates takes at most 10% longer than without).

    Attributes:
        spent: Seconds spent in estimates.
        trained: Seconds of training between estimates (everything else the process did),
            up to the last estimate.
        trained_steps: Optimizer steps over those seconds.
        target: Seconds of training after which the next estimate may run.
        next_step: The step at which the clock is checked against ``target`` next
            (``None``: at the next step asked about).

    Raises:
        ValueError: If ``max_overhead`` is not a number above 0.
    """

    def __init__(self, max_overhead: float) -> None:
        check_float("max_overhead", max_overhead, positive=True)
        self.max_overhead = float(max_overhead)
        self.spent = 0.0
        self.trained = 0.0
        self.trained_steps = 0
        self.target = 0.0
        self.next_step: int | None = None
        self._costs: list[float] = []
        self._clock: tuple[float, int] | None = None  # when and at which step training resumed

    def allows(self, step: int, *, distributed: bool = False) -> bool:
        """Whether the budget lets an estimate run after ``step`` optimizer steps.

        Args:
            step: Optimizer steps completed. The first call starts the training clock
                (again after a resume).
            distributed: Agree with the other ranks on each plan (a collective: every rank
                must then ask at the same steps).
        """
        if self._clock is None:
            self._clock = (time.perf_counter(), step)
        if not self._costs:
            return True
        if self.next_step is not None and step < self.next_step:
            return False
        trained, steps = self._training_so_far(step)
        if steps == 0:
            return False
        remaining = self.target - trained
        next_step = step if remaining <= 0 else step + math.ceil(remaining * steps / trained)
        if distributed and rank_and_world()[1] > 1:
            next_step = max(gather_from_every_rank(lambda: next_step))
        self.next_step = next_step
        return step >= next_step

    def begin(self, step: int) -> None:
        """An estimate starts after ``step`` optimizer steps: close the training account."""
        self.trained, self.trained_steps = self._training_so_far(step)
        self._clock = (time.perf_counter(), step)

    def end(self, step: int, pace: float) -> None:
        """The estimate begun at ``step`` has ended: count its time and set the next target.

        Args:
            step: Optimizer steps completed.
            pace: How much sooner (below 1) or later (above 1) than an even spacing of the
                budget the next estimate should come (see ``pace``).
        """
        began, _ = self._clock  # type: ignore[misc]
        ended = time.perf_counter()
        self._costs = [*self._costs, ended - began][-RECENT:]
        self.spent += ended - began
        self._clock = (ended, step)
        cost = max(self._costs)
        ceiling = (self.spent + cost) / self.max_overhead
        self.target = max(ceiling, self.trained + pace * cost / self.max_overhead)
        self.next_step = None

    def overhead(self) -> float:
        """The estimates' time over the training time so far (NaN before any training)."""
        trained = self.trained
        if self._clock is not None:
            trained += time.perf_counter() - self._clock[0]
        return self.spent / trained if trained > 0 else math.nan

    def state_dict(self) -> dict[str, Any]:
        """Time spent and trained, recent costs and the target, for a checkpoint."""
        return {
            "spent": self.spent,
            "trained": self.trained,
            "trained_steps": self.trained_steps,
            "target": self.target,
            "costs": list(self._costs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the accounts of a checkpointed run."""
        self.spent = float(state["spent"])
        self.trained = float(state["trained"])
        self.trained_steps = int(state["trained_steps"])
        self.target = float(state["target"])
        self._costs = [float(cost) for cost in state["costs"]]
        self.next_step = None

    def _training_so_far(self, step: int) -> tuple[float, int]:
        """Training seconds and steps, the stretch since the clock last started included."""
        if self._clock is None:
            return self.trained, self.trained_steps
        started, at = self._clock
        return self.trained + time.perf_counter() - started, self.trained_steps + step - at


def pace(rows: Sequence[dict[str, float]], prefix: str) -> float:
    """How soon the next estimate should come, from the last two estimates of the LLC.

    Returns:
        ``PACE_MOVING`` if the LLC changed by more than ``MOVING`` standard errors,
        ``PACE_FLAT`` if by less than ``CALM``, else 1 (and 1 when it cannot tell).
    """
    if len(rows) < 2:
        return 1.0
    chains = sum(key.startswith(metric_key(prefix, "chain_")) for key in rows[-1])
    mean, std = metric_key(prefix, "mean"), metric_key(prefix, "std")
    before, after = rows[-2], rows[-1]
    mean_a, mean_b = before.get(mean, math.nan), after.get(mean, math.nan)
    error = math.hypot(before.get(std, math.nan), after.get(std, math.nan)) / math.sqrt(
        max(chains, 1)
    )
    if not (chains and math.isfinite(mean_b - mean_a) and math.isfinite(error) and error > 0):
        return 1.0
    z = abs(mean_b - mean_a) / error
    return PACE_MOVING if z > MOVING else PACE_FLAT if z < CALM else 1.0
