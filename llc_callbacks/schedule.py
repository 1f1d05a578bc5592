"""When an LLC estimate is due, in optimizer steps completed."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from llc_callbacks.validation import check_bool, check_int

DEFAULT_EVERY_N_STEPS = 100


@dataclass(frozen=True)
class Schedule:
    """The steps at which estimates run; a step counts completed optimizer steps.

    Give at most one of ``every_n_steps``, ``steps`` and ``log_spaced``; with none, an estimate
    runs every 100 steps.

    Args:
        every_n_steps: Estimate after every ``n``-th optimizer step (steps n, 2n, ...).
        steps: Estimate after exactly these steps (0 is before training).
        log_spaced: Estimate about this many times at log-spaced steps between 1 and
            ``total_steps`` (fewer when rounding makes early steps coincide).
        total_steps: The length of training, needed by ``log_spaced``; adapters fill it in from
            their trainer.
        at_start: Also estimate before the first step (step 0).
        at_end: Also estimate after the last step, if it was not already due.

    Raises:
        ValueError: If more than one kind of schedule is given, or a value is out of range.
    """

    every_n_steps: int | None = None
    steps: tuple[int, ...] | None = None
    log_spaced: int | None = None
    total_steps: int | None = None
    at_start: bool = False
    at_end: bool = False

    def __post_init__(self) -> None:
        kinds = ("every_n_steps", "steps", "log_spaced")
        given = [name for name in kinds if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                "give at most one of every_n_steps, steps and log_spaced,"
                f" got {' and '.join(given)}"
            )
        if not given:
            object.__setattr__(self, "every_n_steps", DEFAULT_EVERY_N_STEPS)
        check_int("every_n_steps", self.every_n_steps, minimum=1, optional=True)
        check_int("log_spaced", self.log_spaced, minimum=2, optional=True)
        check_int("total_steps", self.total_steps, minimum=1, optional=True)
        if self.steps is not None:
            object.__setattr__(self, "steps", _sorted_steps(self.steps))
        check_bool("at_start", self.at_start)
        check_bool("at_end", self.at_end)

    @functools.cached_property
    def due_steps(self) -> frozenset[int] | None:
        """The explicit set of due steps, or ``None`` for ``every_n_steps``.

        Raises:
            ValueError: If ``log_spaced`` is set but ``total_steps`` is not known.
        """
        if self.log_spaced:
            if self.total_steps is None:
                raise ValueError(
                    "log_spaced needs total_steps, the number of optimizer steps of the run"
                    " (a trainer's max_steps, or max_epochs over a sized DataLoader)"
                )
            return frozenset(log_spaced_steps(self.total_steps, self.log_spaced))
        return frozenset(self.steps) if self.steps is not None else None

    def is_due(self, step: int, *, final: bool = False) -> bool:
        """Whether an estimate is due after ``step`` optimizer steps.

        Args:
            step: Optimizer steps completed.
            final: Whether training has just ended.
        """
        if (step == 0 and self.at_start) or (final and self.at_end):
            return True
        due = self.due_steps
        if due is not None:
            return step in due
        return step > 0 and step % self.every_n_steps == 0

    def beyond(self, total_steps: int) -> str | None:
        """What of the schedule a run of ``total_steps`` optimizer steps never reaches.

        Returns:
            ``None`` when every estimate falls within the run (``every_n_steps`` beyond it
            with ``at_start`` or ``at_end`` counts as within: those still estimate); else
            what falls after it, and what that costs, for a warning.
        """
        ends = self.at_start or self.at_end
        if self.steps is not None:
            late = [step for step in self.steps if step > total_steps]
            if not late:
                return None
            every = len(late) == len(self.steps) and not ends
            outcome = "no LLC estimate runs" if every else "those estimates do not run"
            return f"steps {late} come after the run's {total_steps} optimizer steps: {outcome}"
        if self.every_n_steps is not None and self.every_n_steps > total_steps and not ends:
            return (
                f"every_n_steps={self.every_n_steps} is more than the run's {total_steps}"
                " optimizer steps: no LLC estimate runs"
            )
        return None


def log_spaced_steps(total_steps: int, num: int) -> list[int]:
    """About ``num`` distinct steps spaced evenly in log scale from 1 to ``total_steps``."""
    return sorted({round(s) for s in np.geomspace(1, total_steps, num)})


def _sorted_steps(steps: Iterable[int]) -> tuple[int, ...]:
    try:
        values = tuple(steps)
    except TypeError:
        raise ValueError(f"steps must be a sequence of integers >= 0, got {steps!r}") from None
    if not values or any(
        isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0 for s in values
    ):
        raise ValueError(f"steps must be a non-empty sequence of integers >= 0, got {steps!r}")
    return tuple(sorted({int(s) for s in values}))
