"""A run's logged history, read back from what the trainers wrote.

Three formats: a Lightning ``CSVLogger`` ``metrics.csv``, a transformers
``trainer_state.json`` (its ``log_history``), and a W&B offline run folder (read with
``llc_callbacks.integrations.wandb``, which needs wandb installed) of a run whose process
has ended.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from llc_callbacks.keys import find_prefix

# Where each format keeps the step, in order of preference.
STEP_KEYS = ("step", "trainer/global_step", "train/global_step", "_step")
# Loss keys the trainers write by default, in order of preference.
LOSS_KEYS = ("train/loss", "loss", "train_loss", "train_loss_step", "train/train_loss")


@dataclass(frozen=True)
class Series:
    """Values of one metric against the step, in step order."""

    steps: list[int]
    values: list[float]


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


def series(rows: list[dict[str, float]], key: str) -> Series:
    """The finite values of ``key`` against the step (NaN rows, failed estimates, dropped)."""
    points = sorted(
        (int(row["step"]), row[key]) for row in rows if key in row and math.isfinite(row[key])
    )
    return Series([s for s, _ in points], [v for _, v in points])


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
