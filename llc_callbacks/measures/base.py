"""``Measure``: the protocol of what a monitor computes next to the LLC, with no-op defaults."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llc_callbacks.forked import LossFn
from llc_callbacks.result import LLCResult


@dataclass(frozen=True)
class Run:
    """What a measure is told once, when training starts.

    Attributes:
        total_steps: The run's optimizer steps, where known.
        dataset_size: The training set's size ``n``, where known.
        prefix: The monitor's prefix, under which the measure's metrics are logged.
    """

    total_steps: int | None
    dataset_size: int | None
    prefix: str


@dataclass(frozen=True)
class Reading:
    """What a measure is handed at each reading, after the LLC's chains ran.

    Attributes:
        step: Optimizer steps completed.
        model: The model at the reading's weights ``w*``; a measure leaves it as it was
            (weights, gradients, modes, RNG states): fork what it changes.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: Re-iterable of the reading's batches.
        device: Where the chains ran; ``None``: the model's device.
        seed: The reading's seed (derived from ``config.seed`` and the step).
        result: The reading's LLC, or ``None`` if it failed.
        history: The rows of the readings before this one (``step`` and their metrics).
    """

    step: int
    model: nn.Module
    loss_fn: LossFn
    data: Iterable[Any]
    device: torch.device | str | None
    seed: int
    result: LLCResult | None
    history: Sequence[Mapping[str, float]]


@dataclass(frozen=True)
class Table:
    """A table a measure produced, logged as ``{prefix}/<name>`` where tables go (W&B)."""

    columns: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Figure:
    """A figure a measure produced, logged as the image ``{prefix}/<name>`` (W&B).

    ``build() -> matplotlib Figure`` runs only when a logger receives it.
    """

    build: Callable[[], Any]


# What a measure returns per name: a metric, a table or a figure.
Output = float | Table | Figure


class Measure:
    """Something computed next to the LLC at each reading; subclass it and override ``measure``.

    The monitor calls ``start`` once when training starts and ``measure`` after every
    reading, under its ``on_error`` policy: with ``"warn"``, a measure that raises is one
    warning per run and logs nothing at that reading, and training goes on. What ``measure``
    returns is logged as ``{prefix}/<name>``: numbers next to ``{prefix}/mean`` (and kept in
    the monitor's history), ``Table``s and ``Figure``s where the trainer's loggers take them
    (W&B). ``state_dict`` goes into the monitor's checkpointed state.

    Example, the weights' norm next to the LLC::

        class WeightNorm(Measure):
            def measure(self, reading):
                norm = sum(p.detach().pow(2).sum() for p in reading.model.parameters())
                return {"weight_norm": float(norm.sqrt())}

    Attributes:
        name: What the measure is, for warnings ("measuring the curvature failed").
    """

    name = "a measure"

    def start(self, run: Run) -> None:
        """Training starts: what the run is (no-op by default)."""

    def measure(self, reading: Reading) -> Mapping[str, Output]:
        """What the measure found at one reading, by name under the monitor's prefix.

        Args:
            reading: The reading's step, model, loss, data and LLC.

        Returns:
            Names (letters, digits, ``_``, ``-``, ``.`` and single ``/``) and metrics,
            ``Table``s or ``Figure``s; none by default.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the measure (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict`` (nothing to do by default)."""
