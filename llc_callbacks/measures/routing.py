"""Where the tables and figures of measures go: one routing for the callbacks and ``replay``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from llc_callbacks.measures.base import Figure, Table
from llc_callbacks.plotting import to_pixels

# A receiver of a figure: ``sink(name, pixels, step)`` logs it as ``{prefix}/{name}``.
Sink = Callable[[str, np.ndarray, int], None]
# A receiver of a table: ``sink(name, columns, rows, step)`` logs it as ``{prefix}/{name}``.
TableSink = Callable[[str, list[str], list[list[Any]], int], None]


class Policy(Protocol):
    """The monitor's error policy, as routing uses it (``LLCMonitor``)."""

    def reporting(self, action: str) -> AbstractContextManager[None]:
        """A block whose exception becomes one warning, or propagates (``on_error``)."""
        ...

    def warn_once(self, key: str, message: str, *, every_rank: bool = False) -> None:
        """Warn ``message`` the first time ``key`` comes up in the run."""
        ...


def render(policy: Policy, name: str, build: Callable[[], Any]) -> np.ndarray | None:
    """A figure's pixels, built under ``policy``; ``None`` if it failed or needs matplotlib.

    Without matplotlib: one warning per run naming the ``plot`` extra.
    """
    with policy.reporting(f"logging the {name} figure"):
        try:
            return to_pixels(build())
        except ImportError as error:
            policy.warn_once("matplotlib", f"no figures are logged: {error}")
    return None


def route(
    policy: Policy,
    produced: Mapping[str, Table | Figure | np.ndarray],
    table_sinks: list[TableSink],
    image_sinks: list[Sink],
    step: int,
) -> None:
    """Send each table to ``table_sinks`` and each figure (or its pixels) to ``image_sinks``.

    A figure is built only when an image sink takes it; a failing sink follows ``policy``.
    """
    for name, item in produced.items():
        if isinstance(item, Table):
            with policy.reporting(f"logging the {name} table"):
                for sink in table_sinks:
                    sink(name, item.columns, item.rows, step)
            continue
        if not image_sinks:
            continue
        pixels = render(policy, name, item.build) if isinstance(item, Figure) else item
        if pixels is not None:
            with policy.reporting(f"logging the {name} figure"):
                for sink in image_sinks:
                    sink(name, pixels, step)
