"""Measures of a user's own (``llc_callbacks.measures.Measure`` subclasses), for the tests."""

from __future__ import annotations

from typing import Any

from llc_callbacks.measures import Figure, Measure, Output, Reading, Run, Table


class WeightNorm(Measure):
    """The weights' Euclidean norm at each reading, ``{prefix}/weight_norm``."""

    name = "the weight norm"

    def measure(self, reading: Reading) -> dict[str, float]:
        squares = sum(p.detach().pow(2).sum() for p in reading.model.parameters())
        return {"weight_norm": float(squares**0.5)}


class Count(Measure):
    """Counts readings in its state, and keeps what ``start`` was told."""

    name = "the count"

    def __init__(self, fail_at: int | None = None) -> None:
        self.count = 0
        self.run: Run | None = None
        self.fail_at = fail_at

    def start(self, run: Run) -> None:
        self.run = run

    def measure(self, reading: Reading) -> dict[str, float]:
        if reading.step == self.fail_at:
            raise RuntimeError("no count at this step")
        self.count += 1
        return {"count": float(self.count), "seen": float(len(reading.history))}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


class ChainTable(Measure):
    """Each chain's LLC at the reading: a table and a figure of them."""

    name = "the chain table"

    def measure(self, reading: Reading) -> dict[str, Output]:
        result = reading.result
        if result is None:
            return {}
        rows = [[reading.step, chain, float(v)] for chain, v in enumerate(result.llc_per_chain)]

        def bars() -> Any:
            from matplotlib.figure import Figure as Drawing

            drawing = Drawing(figsize=(4, 3))
            drawing.subplots().bar([row[1] for row in rows], [row[2] for row in rows])
            return drawing

        return {"chains": Table(["step", "chain", "llc"], rows), "chains_plot": Figure(bars)}
