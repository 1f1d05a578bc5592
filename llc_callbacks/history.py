"""A run's logged history, read back from what the trainers wrote.

Three formats: a Lightning ``CSVLogger`` ``metrics.csv``, a transformers
``trainer_state.json`` (its ``log_history``), and a W&B offline run folder (read with
``llc_callbacks.integrations.wandb``, which needs wandb installed) of a run whose process
has ended.

A file holds more than one LLC history when a logger is reused for a second ``fit`` from an
earlier checkpoint: its rows follow the first fit's, and the step goes back. ``histories``
splits the rows where the LLC's step does not increase: each run of increasing steps is one
history. A fit resumed under the same settings that estimates again at steps the first fit
estimated after the checkpoint reads as a new history from the first of those steps, as the
file cannot tell it from a restart under other settings (a new LLC history; the monitor
warns). A transformers ``trainer_state.json`` keeps only the checkpoint's log history on
resume, so its steps increase across a restart: there the monitor's ``{prefix}/restart``
marker, logged with a new history's first estimate, tells.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from llc_callbacks.keys import find_prefix, metric_key

# Where each format keeps the step, in order of preference.
STEP_KEYS = ("step", "trainer/global_step", "train/global_step", "_step")
# Loss keys the trainers write by default, in order of preference.
LOSS_KEYS = ("train/loss", "loss", "train_loss", "train_loss_step", "train/train_loss")


@dataclass(frozen=True)
class Series:
    """Values of one metric against the step, in step order.

    Attributes:
        steps: The steps.
        values: The values, one per step.
        healthy: Whether each value's estimate passed every health check; ``None`` where
            its health was not logged.
    """

    steps: list[int]
    values: list[float]
    healthy: list[bool] | None = None


def read_rows(run: Path) -> list[dict[str, float]]:
    """The logged rows of a run, each with a ``step``.

    Args:
        run: A ``metrics.csv``, a ``trainer_state.json``, a folder holding either, or a W&B
            offline run folder (holding ``run-*.wandb``).

    Returns:
        One dict per logged row with its numeric values and ``step``.

    Raises:
        FileNotFoundError: If ``run`` does not exist or holds none of the three formats.
    """
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist")
    if run.is_dir():
        for name in ("metrics.csv", "trainer_state.json"):
            if (run / name).is_file():
                return read_rows(run / name)
        if any(run.glob("run-*.wandb")):
            from llc_callbacks.integrations.wandb import history_rows  # needs wandb

            return _with_steps(history_rows(run))
        raise FileNotFoundError(
            f"{run} holds no metrics.csv (Lightning), trainer_state.json (transformers) or"
            " run-*.wandb (W&B offline run)"
        )
    if run.suffix == ".csv":
        with open(run, newline="") as file:
            return _with_steps(list(csv.DictReader(file)))
    if run.suffix == ".json":
        return _with_steps(json.loads(run.read_text()).get("log_history", []))
    raise FileNotFoundError(f"{run} is not a metrics.csv or a trainer_state.json")


def series(rows: list[dict[str, float]], key: str, healthy: str | None = None) -> Series:
    """The finite values of ``key`` against the step (NaN rows, failed estimates, dropped).

    The points are sorted by step: pass the rows of one history (``histories``).

    Args:
        rows: Rows with ``step`` and the metrics.
        key: The metric.
        healthy: The key of each estimate's health in the same row (``health_key``): a point
            is unhealthy where its row logged it other than 1.

    Returns:
        The values in step order, with their health where any row logged ``healthy``.
    """
    points = sorted(
        (int(row["step"]), row[key], healthy is None or row.get(healthy, 1.0) == 1.0)
        for row in rows
        if key in row and math.isfinite(row[key])
    )
    logged = healthy is not None and any(healthy in row for row in rows)
    return Series(
        [step for step, _, _ in points],
        [value for _, value, _ in points],
        [ok for _, _, ok in points] if logged else None,
    )


def histories(
    rows: list[dict[str, float]], key: str, restart: str | None = None
) -> list[list[dict[str, float]]]:
    """A run's rows split into its histories of ``key``, in file order.

    A new history starts at a row of ``key`` whose step is at or before that of the last row
    of ``key``; it takes the rows from where the file's step goes back after that last row
    (or from that row itself, if the step does not go back before it). It also starts at a
    row that logged ``restart``: the monitor marks the first estimate of a history that a
    resume under other settings started anew, which a transformers ``trainer_state.json``
    shows with steps that still increase.

    Args:
        rows: A run's rows in file order (``read_rows``).
        key: The metric whose histories to find, such as ``llc/mean``.
        restart: The key of the monitor's restart marker (``{prefix}/restart``).

    Returns:
        The rows of each history, together all of ``rows`` in their order; one list (all of
        ``rows``) where ``key``'s step always increases.
    """
    cuts, last = [], None
    for index, row in enumerate(rows):
        if key not in row:
            continue
        if last is not None and row["step"] <= rows[last]["step"]:
            back = (i for i in range(last + 1, index) if rows[i]["step"] < rows[i - 1]["step"])
            cuts.append(next(back, index))
        elif last is not None and restart in row:
            cuts.append(index)
        last = index
    return [rows[start:end] for start, end in pairwise([0, *cuts, len(rows)])]


def health_key(rows: list[dict[str, float]], prefix: str, restriction: str | None = None) -> str:
    """The key of an LLC's health: a restricted LLC's own where logged, else the full LLC's.

    A restricted LLC logs its own ``healthy`` with ``extra_metrics=("diagnostics",)``;
    without it the full LLC's health, from the same estimate, stands in.
    """
    own = metric_key(prefix, "healthy", restriction)
    if restriction is not None and not any(own in row for row in rows):
        return metric_key(prefix, "healthy")
    return own


def llc_prefix(rows: list[dict[str, float]]) -> str | None:
    """The prefix of the LLC metrics (``llc``, or ``train/llc`` as transformers logs it)."""
    return find_prefix({key for row in rows for key in row})


def loss_key(rows: list[dict[str, float]]) -> str | None:
    """The first of ``LOSS_KEYS`` that the run logged."""
    logged = {key for row in rows for key in row}
    return next((key for key in LOSS_KEYS if key in logged), None)


def _with_steps(raw: list[dict]) -> list[dict[str, float]]:
    rows = []
    for row in raw:
        values = {key: _number(value) for key, value in row.items()}
        values = {key: value for key, value in values.items() if value is not None}
        step = next((values[key] for key in STEP_KEYS if key in values), None)
        if step is not None:
            rows.append({**values, "step": int(step)})
    return rows


def _number(value: object) -> float | None:
    if isinstance(value, bool) or value in ("", None):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
