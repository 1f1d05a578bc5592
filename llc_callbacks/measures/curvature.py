"""``Curvature``: the loss's curvature at every reading's weights, next to the LLC."""

from __future__ import annotations

from llc_callbacks.curvature import CURVATURES, estimate_curvature
from llc_callbacks.keys import CURVATURE
from llc_callbacks.measures.base import Measure, Reading
from llc_callbacks.validation import check_choice


class Curvature(Measure):
    """What people already log as curvature, at every reading's weights.

    Measured on forked weights by ``curvature.estimate_curvature`` (on the reading's first
    batch, seeded by the reading's seed) and logged as ``{prefix}/curvature/<name>``, with
    the traces' standard errors as ``<name>_stderr``.

    Args:
        *names: Any of ``"hessian_trace"`` (Hutchinson's estimator, 16 Rademacher probes),
            ``"fisher_trace"`` (the empirical Fisher trace over 64 examples) and
            ``"top_eigenvalue"`` (20 power iterations); all three if none is named.

    Raises:
        ValueError: If a name is not one of those.
    """

    name = "the curvature"

    def __init__(self, *names: str) -> None:
        for name in names:
            check_choice("Curvature", name, CURVATURES)
        self.names = names or CURVATURES

    def measure(self, reading: Reading) -> dict[str, float]:
        """``curvature/<name>`` (and ``<name>_stderr``) at the reading's weights."""
        found = estimate_curvature(
            reading.model,
            reading.loss_fn,
            reading.data,
            self.names,
            seed=reading.seed,
            device=reading.device,
        )
        return {f"{CURVATURE}/{name}": value for name, value in found.items()}
