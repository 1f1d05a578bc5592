"""``FreeEnergy``: the local free energy at every reading, from the LLC and ``L(w*)``."""

from __future__ import annotations

import math

from llc_callbacks.measures.base import Measure, Reading, Run
from llc_callbacks.validation import check_int


class FreeEnergy(Measure):
    """The local free energy ``n L(w*) + LLC log n`` and its spread over chains.

    Watanabe's asymptotic expansion of the Bayesian free energy around ``w*``, valid as ``n``
    grows, with ``L(w*)`` the mean loss of the reading's minibatches: logged as
    ``{prefix}/free_energy``, and ``{prefix}/free_energy_std = std log n``. Nothing is
    logged at a reading whose LLC failed.

    Args:
        dataset_size: The training set's size ``n``; by default the run's (the callbacks take
            it from a training set that has a length).

    Raises:
        ValueError: If ``dataset_size`` is not an integer >= 2; when training starts, if no
            ``n`` is known.
    """

    name = "the free energy"

    def __init__(self, dataset_size: int | None = None) -> None:
        check_int("dataset_size", dataset_size, minimum=2, optional=True)
        self.dataset_size = dataset_size
        self._n = dataset_size

    def start(self, run: Run) -> None:
        """Take ``n`` from the run unless given; without one, raise."""
        self._n = self.dataset_size or run.dataset_size
        if self._n is None:
            raise ValueError(
                "FreeEnergy needs the training set's size: pass FreeEnergy(dataset_size=n)"
            )

    def measure(self, reading: Reading) -> dict[str, float]:
        """``free_energy`` and ``free_energy_std`` of the reading's LLC."""
        result = reading.result
        if result is None or self._n is None:
            return {}
        log_n = math.log(self._n)
        return {
            "free_energy": self._n * result.init_loss + result.llc_mean * log_n,
            "free_energy_std": result.llc_std * log_n,
        }
