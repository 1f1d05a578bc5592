"""``Traces``: each reading's chain traces as a figure."""

from __future__ import annotations

from collections.abc import Mapping

from llc_callbacks.measures.base import Figure, Measure, Output, Reading
from llc_callbacks.plotting import plot_traces


class Traces(Measure):
    """Each reading's chain traces (``plotting.plot_traces``), the image ``{prefix}/trace``.

    Built only where a logger takes images (W&B; needs matplotlib: without it, one warning
    and no images). Nothing at a reading whose LLC failed.
    """

    name = "the trace figure"

    def measure(self, reading: Reading) -> Mapping[str, Output]:
        """The figure ``trace`` of the reading's chains."""
        result = reading.result
        if result is None or result.error is not None:
            return {}
        return {"trace": Figure(lambda: plot_traces(result))}
