"""``calibrate``: sweep the step size (and optionally nbeta and localization) with short chains.

The rule: recommend the largest step size that

1. passes the health checks: chains stable (none diverged), flat after burn-in (not
   drifting), not below the initial loss (a non-negative LLC), and with ``config.mala`` a MALA
   acceptance of at least ``MALA_MIN``; and
2. agrees with the next smaller step size of the sweep, which also passes the checks: their
   estimates differ by at most ``AGREEMENT`` (10%) of the smaller one's.

Too small a step size mixes too slowly: its estimate is still rising with the step size (or
its chains drift). Too large a one diverges, falls below the initial loss, or, before that,
overestimates: SGLD's discretization bias grows about linearly with the step size, so on a
grid with steps of about 3x, agreeing within 10% with a step size a third as large bounds
that bias at about 15%. The rule picks the largest step size on the plateau between.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llc_callbacks.config import LLCConfig, NBeta
from llc_callbacks.estimator import estimate_llc
from llc_callbacks.forked import LossFn

DEFAULT_STEP_SIZES = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
# The checks of LLCResult.problems that disqualify a setting.
DISQUALIFYING = ("init_loss", "diverged", "below_init", "drifting", "mala")
# Largest relative difference from the next smaller step size for a step size to be chosen.
AGREEMENT = 0.1


@dataclass(frozen=True)
class Calibration:
    """The outcome of a sweep.

    Attributes:
        rows: One dict per setting, in sweep order: ``step_size``, ``nbeta``,
            ``localization``, ``llc_mean``, ``llc_std``, every diagnostic, ``problems`` (the
            names of the failed checks), ``agrees`` (with the next smaller step size; ``None``
            for the smallest) and ``ok`` (whether it passed the rule).
        recommended: The config with the recommended setting, or ``None`` if none passed.
    """

    rows: list[dict[str, Any]]
    recommended: LLCConfig | None

    def chosen_step_size(self) -> float:
        """The recommended step size.

        If none passed the rule, the smallest step size that passed the health checks (or
        else the smallest swept), with a warning.
        """
        if self.recommended is not None:
            return self.recommended.step_size
        healthy = [row["step_size"] for row in self.rows if not row["problems"]]
        fallback = min(healthy or [row["step_size"] for row in self.rows])
        warnings.warn(
            "llc_callbacks: no step size passed calibration (see Calibration.rows); using"
            f" {fallback:g}. Raise num_burnin or num_draws, widen the step sizes, or check that"
            " the weights are at a minimum.",
            stacklevel=2,
        )
        return fallback


def calibrate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig = LLCConfig(),
    *,
    step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
    nbetas: Sequence[NBeta] | None = None,
    localizations: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    distributed: bool = False,
) -> Calibration:
    """Estimate the LLC with every combination of the given settings and recommend one.

    Each estimate uses ``config`` (chains, burn-in, draws, seed, ...) with the swept values
    replacing its own; the module docstring states the rule.

    Args:
        model: The model at the weights to estimate at.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: Re-iterable of batches.
        config: Everything but the swept values.
        step_sizes: Step sizes to try.
        nbetas: Values of ``nbeta`` to try; ``None`` keeps ``config.nbeta``.
        localizations: Values of ``localization`` to try; ``None`` keeps ``config``'s.
        device: Where chains run.
        progress: Show a progress bar for each estimate.
        distributed: Split chains over ranks, as in ``estimate_llc``.

    Returns:
        The table of settings and the recommendation (the largest step size passing the rule;
        among settings with that step size, the first in sweep order).

    Raises:
        ValueError: If a list is empty or a swept value is invalid for ``LLCConfig``.
    """
    groups = [
        [
            dataclasses.replace(config, step_size=step_size, nbeta=nbeta, localization=localization)
            for step_size in sorted(_values("step_sizes", step_sizes, None))
        ]
        for nbeta in _values("nbetas", nbetas, config.nbeta)
        for localization in _values("localizations", localizations, config.localization)
    ]
    rows, passing = [], []
    for group in groups:
        previous = None
        for setting in group:
            result = estimate_llc(
                model,
                loss_fn,
                data,
                setting,
                device=device,
                progress=progress,
                distributed=distributed,
                warn=False,
            )
            failed = [name for name in result.problems() if name in DISQUALIFYING]
            healthy = not failed and math.isfinite(result.llc_mean)
            agrees = None if previous is None else _agree(result.llc_mean, previous)
            rows.append(
                {
                    "step_size": setting.step_size,
                    "nbeta": setting.nbeta,
                    "localization": setting.localization,
                    "llc_mean": result.llc_mean,
                    "llc_std": result.llc_std,
                    **result.diagnostics,
                    "problems": failed,
                    "agrees": agrees,
                    "ok": healthy and bool(agrees),
                }
            )
            if rows[-1]["ok"]:
                passing.append(setting)
            previous = result.llc_mean if healthy else None
    recommended = max(passing, key=lambda s: s.step_size, default=None)
    return Calibration(rows, recommended)


def _agree(estimate: float, smaller_step_estimate: float) -> bool:
    return abs(estimate - smaller_step_estimate) <= AGREEMENT * abs(smaller_step_estimate)


def _values(name: str, values: Sequence[Any] | None, default: Any) -> list[Any]:
    if values is None:
        return [default]
    values = list(values)
    if not values:
        raise ValueError(f"{name} must list at least one value")
    return values
