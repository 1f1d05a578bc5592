"""Developmental stages on an LLC curve: where it turns from rising to falling, or flattens.

Hoogland et al. 2024 (arXiv:2402.02364) place stage boundaries at the critical points of the
LLC over training. ``detect_stages`` finds them in a noisy curve: it fits the estimates, in
their order (so a log-spaced schedule is segmented in log steps), with the piecewise-linear
curve that minimizes the squared error in units of each estimate's standard error plus
``PENALTY_PER_LOG_POINT * log(n)`` per segment (a BIC-like penalty that pure noise does not
overcome); each segment is rising, falling or flat by whether its change exceeds
``CHANGE_Z`` of its standard errors, and neighbouring segments of the same kind merge.

During training, ``StageTracker`` runs the detection after every estimate and confirms a
boundary once it has stood still for ``CONFIRM_RUNS`` detections in a row.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from llc_callbacks.history import Series, series
from llc_callbacks.keys import metric_key

# Penalty per segment, in units of log(number of estimates) of the chi-square: BIC charges 3
# (a new intercept, slope and change point); twice that keeps pure noise in one segment
# (no boundary in 300 noise curves of 20 to 60 estimates).
PENALTY_PER_LOG_POINT = 6.0
# A segment's change beyond this many of its standard errors makes it rising or falling.
CHANGE_Z = 4.0
# Boundaries move by at most this many estimates when refined (see _refined).
REFINE = 3
# A stage is flagged when the LLC moves while the loss changes by at most this fraction.
LOSS_TOLERANCE = 0.1
# Online, a boundary is confirmed once the detections after this many estimates in a row placed
# it within one estimate of each other, at the end of a stage of at least MIN_STAGE estimates.
# On 50 noisy rise-fall-flat curves (those of tests/test_stages.py) this confirmed 99 of the 100
# true boundaries, all within 2 estimates and 98 within 1, 7 estimates after them on average, and
# nothing else; 4 in a row confirmed 3 boundaries that were not there, and without MIN_STAGE
# early noise passed as a boundary. Pure noise confirmed none in 30 curves.
CONFIRM_RUNS = 5
MIN_STAGE = 3

Kind = Literal["rising", "falling", "flat"]


@dataclass(frozen=True)
class Stage:
    """A stretch of training over which the LLC rises, falls or stays flat.

    Attributes:
        start: The step of its first estimate.
        end: The step of its last estimate (the next stage starts at the next estimate).
        kind: ``"rising"``, ``"falling"`` or ``"flat"``.
        change: The fitted LLC at ``end`` minus that at ``start``.
        loss_change: The loss's relative change over the stage, where a loss was given.
        flagged: The LLC rises or falls while the loss stays within ``loss_tolerance``:
            the stages that the loss curve hides.
    """

    start: int
    end: int
    kind: Kind
    change: float
    loss_change: float | None = None
    flagged: bool = False


@dataclass(frozen=True)
class Boundary:
    """A stage boundary confirmed during training.

    Attributes:
        curve: The restricted LLC's name, or ``None`` for the full LLC.
        step: The step of the estimate that ends the stage before it.
        before: The kind of the stage it ends.
        after: The kind of the stage it starts, as seen when it was confirmed.
        confirmed_at: The step of the estimate after which it was confirmed.
    """

    curve: str | None
    step: int
    before: Kind
    after: Kind
    confirmed_at: int


class StageTracker:
    """Confirms the stage boundaries of LLC curves as their estimates come in.

    After every estimate ``update`` detects the stages of each curve so far; a boundary is
    confirmed once the detections after ``CONFIRM_RUNS`` estimates in a row placed it within
    one estimate of each other and the stage it ends holds at least ``MIN_STAGE`` estimates.
    A confirmed boundary is never withdrawn, and none is confirmed within two estimates of one.

    Attributes:
        confirmed: The boundaries confirmed so far, in order.
    """

    def __init__(self) -> None:
        self.confirmed: list[Boundary] = []
        # Per curve: the index of each boundary found by the last detection (among the curve's
        # finite estimates), and for how many detections in a row it has been found.
        self._runs: dict[str | None, dict[int, int]] = {}

    def update(
        self, rows: Sequence[dict[str, float]], prefix: str, curves: Sequence[str | None]
    ) -> list[Boundary]:
        """Detect the stages of each curve after a new estimate and confirm what stood still.

        Args:
            rows: Every estimate so far, the newest last (a monitor's history).
            prefix: The metric prefix.
            curves: ``None`` for the full LLC and the names of the restricted ones.

        Returns:
            The boundaries confirmed by this update.
        """
        new = []
        for curve in curves:
            steps = series(rows, metric_key(prefix, "mean", curve)).steps
            stages = detect_stages(rows, prefix, curve)
            previous = self._runs.get(curve, {})
            runs = {}
            for before, after in itertools.pairwise(stages):
                index = steps.index(before.end)
                near = [count for at, count in previous.items() if abs(at - index) <= 1]
                runs[index] = 1 + max(near, default=0)
                if (
                    runs[index] >= CONFIRM_RUNS
                    and index - steps.index(before.start) + 1 >= MIN_STAGE
                    and self._far_from_confirmed(curve, steps, index)
                ):
                    found = Boundary(
                        curve, before.end, before.kind, after.kind, int(rows[-1]["step"])
                    )
                    self.confirmed.append(found)
                    new.append(found)
            self._runs[curve] = runs
        return new

    def state_dict(self) -> dict[str, Any]:
        """The confirmed boundaries and the runs of the last detection, JSON-ready."""
        return {
            "confirmed": [dataclasses.asdict(boundary) for boundary in self.confirmed],
            "runs": [
                [curve, index, count]
                for curve, runs in self._runs.items()
                for index, count in runs.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict``: no boundary is confirmed twice, none is lost."""
        self.confirmed = [Boundary(**boundary) for boundary in state["confirmed"]]
        self._runs = {}
        for curve, index, count in state["runs"]:
            self._runs.setdefault(curve, {})[int(index)] = int(count)

    def _far_from_confirmed(self, curve: str | None, steps: list[int], index: int) -> bool:
        return all(
            abs(steps.index(boundary.step) - index) > 2
            for boundary in self.confirmed
            if boundary.curve == curve and boundary.step in steps
        )


def detect_stages(
    rows: Sequence[dict[str, float]],
    prefix: str = "llc",
    restriction: str | None = None,
    *,
    loss: str | None = None,
    loss_tolerance: float = LOSS_TOLERANCE,
) -> list[Stage]:
    """The stages of an LLC curve, from a monitor's history or a run's logged rows.

    Each estimate's standard error is its chain spread over the square root of the number
    of chains (the ``chain_<i>`` keys, or the ``num_chains`` logged when training started);
    without a spread, the noise is estimated from the
    curve's second differences.

    Args:
        rows: Rows with ``step`` and the metrics of one LLC history (``monitor.history``,
            or one of ``llc_callbacks.history.histories`` of a run's ``read_rows``): the
            estimates are taken in step order.
        prefix: The metric prefix.
        restriction: A restricted LLC's name, or ``None`` for the full LLC.
        loss: The key of a loss logged in ``rows``, to flag stages where it stays flat.
        loss_tolerance: Largest relative change of the loss over a flagged stage.

    Returns:
        The stages in order, covering every finite estimate; empty with fewer than 3.
    """
    steps, values, errors = _curve(rows, prefix, restriction)
    if len(values) < 3:
        return []
    segments = _refined(_segments(values, errors), values, errors)
    stages: list[tuple[int, int, Kind, float]] = []
    for first, last in segments:
        fit, change_error = _line(values[first : last + 1], errors[first : last + 1])
        change = float(fit[-1] - fit[0])
        kind: Kind = "flat"
        if abs(change) > CHANGE_Z * change_error:
            kind = "rising" if change > 0 else "falling"
        if stages and stages[-1][2] == kind:
            start, _, _, before = stages.pop()
            stages.append((start, last, kind, before + change))
        else:
            stages.append((first, last, kind, change))
    losses = series(rows, loss) if loss is not None else None
    result = []
    for first, last, kind, change in stages:
        loss_change = None
        if losses is not None and losses.steps:
            at_start, at_end = _nearest(losses, steps[first]), _nearest(losses, steps[last])
            loss_change = float((at_end - at_start) / abs(at_start)) if at_start else math.inf
        flagged = kind != "flat" and loss_change is not None and abs(loss_change) <= loss_tolerance
        result.append(Stage(steps[first], steps[last], kind, change, loss_change, flagged))
    return result


def _curve(
    rows: Sequence[dict[str, float]], prefix: str, restriction: str | None
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Steps, means and standard errors of the finite estimates, in step order."""
    mean, std = metric_key(prefix, "mean", restriction), metric_key(prefix, "std", restriction)
    chain, count = metric_key(prefix, "chain_", restriction), metric_key(prefix, "num_chains")
    logged = next((int(row[count]) for row in rows if count in row), 0)
    points = sorted(
        (
            int(row["step"]),
            row[mean],
            row.get(std, math.nan),
            sum(k.startswith(chain) for k in row) or logged,
        )
        for row in rows
        if mean in row and math.isfinite(row[mean])
    )
    steps = [step for step, *_ in points]
    values = np.array([value for _, value, *_ in points], dtype=float)
    spreads = np.array([spread / math.sqrt(max(chains, 1)) for *_, spread, chains in points])
    if len(values) >= 3 and not np.all(np.isfinite(spreads) & (spreads > 0)):
        # The curve's own noise: second differences of a smooth curve are near 0, and of
        # independent noise of standard deviation s have standard deviation s * sqrt(6).
        second = np.diff(values, 2)
        noise = np.median(np.abs(second - np.median(second))) / 0.6745 / math.sqrt(6)
        spreads = np.full(len(values), noise if noise > 0 else 1e-12)
    return steps, values, np.maximum(spreads, 1e-12)


def _segments(values: np.ndarray, errors: np.ndarray) -> list[tuple[int, int]]:
    """Optimal partition into segments of at least 2 estimates (first and last index).

    Each segment's cost, the weighted squared residual of its least-squares line, comes from
    prefix sums, for every start at once: the partition takes O(n^2) arithmetic.
    """
    n = len(values)
    penalty = PENALTY_PER_LOG_POINT * math.log(n)
    x, y, w = np.arange(n, dtype=float), values - values.mean(), 1 / errors**2
    sums = [
        np.concatenate([[0.0], np.cumsum(t)])
        for t in (w, w * x, w * x * x, w * y, w * x * y, w * y * y)
    ]
    best = np.full(n + 1, np.inf)  # best[j]: cost of the first j estimates
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=int)
    for j in range(2, n + 1):
        starts = np.arange(j - 1)  # best[1] stays infinite: no segment of one estimate
        weight, wx, wxx, wy, wxy, wyy = (total[j] - total[starts] for total in sums)
        spread_x = wxx - wx * wx / weight
        residual = wyy - wy * wy / weight - (wxy - wx * wy / weight) ** 2 / spread_x
        costs = best[starts] + np.maximum(residual, 0.0) + penalty
        first = int(np.argmin(costs))
        best[j], cut[j] = costs[first], starts[first]
    segments, j = [], n
    while j > 0:
        segments.append((int(cut[j]), j - 1))
        j = int(cut[j])
    return segments[::-1]


def _refined(
    segments: list[tuple[int, int]], values: np.ndarray, errors: np.ndarray
) -> list[tuple[int, int]]:
    """Move each boundary to where a continuous two-piece line fits its two segments best.

    The partition fits each segment on its own, which places a kink loosely; a turning point
    is where one continuous line bends. Each boundary moves by at most ``REFINE`` estimates.
    """
    segments = list(segments)
    for k in range(len(segments) - 1):
        (first, boundary), (_, last) = segments[k], segments[k + 1]
        x = np.arange(first, last + 1, dtype=float)
        weights = 1 / errors[first : last + 1] ** 2
        target = values[first : last + 1]
        best, best_cost = boundary, math.inf
        # Both sides keep at least 2 estimates: the knot ends the first one.
        for knot in range(max(first + 1, boundary - REFINE), min(last - 2, boundary + REFINE) + 1):
            design = np.stack([np.ones_like(x), x, np.maximum(0.0, x - knot)], axis=1)
            normal = design.T @ (design * weights[:, None])
            fit = design @ np.linalg.solve(normal, design.T @ (weights * target))
            cost = float(np.sum(weights * (target - fit) ** 2))
            if cost < best_cost:
                best, best_cost = knot, cost
        segments[k], segments[k + 1] = (first, best), (best + 1, last)
    return segments


def _line(values: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, float]:
    """The weighted least-squares line through a segment, and its change's standard error.

    The change is from the segment's first estimate to its last.
    """
    x = np.arange(len(values), dtype=float)
    weights = 1 / errors**2
    design = np.stack([np.ones_like(x), x], axis=1)
    normal = design.T @ (design * weights[:, None])
    coefficients = np.linalg.solve(normal, design.T @ (weights * values))
    slope_variance = np.linalg.inv(normal)[1, 1]
    return design @ coefficients, math.sqrt(slope_variance) * (len(values) - 1)


def _nearest(values: Series, step: int) -> float:
    """The value logged nearest to ``step``."""
    index = min(range(len(values.steps)), key=lambda i: abs(values.steps[i] - step))
    return values.values[index]
