"""``calibrate``: sweep the step size (and optionally nbeta and localization) with full chains.

The rule, for each combination of nbeta and localization, from the largest step size down:

1. A step size passes when its chains are healthy (none diverged, a non-negative LLC, no
   ``localization`` problem) and their MALA acceptance is at least ``MALA_TARGET``.
2. The sweep stops at the first step size that passes. If the one above it failed on its
   acceptance alone, the step size between them where the acceptance, interpolated in log
   step size, reaches ``MALA_TARGET + MALA_AIM`` is tried too and taken if it passes.

Why acceptance: too large a step size inflates the LLC (SGLD's discretization bias grows with
the curvature the chains meet, and with the model's size), too small a one leaves the chains
climbing when draws begin and lowers it. On the deep linear networks of
``benchmarks/accuracy.py`` (30 to 100,000 parameters) the step size that lands near the
true learning coefficient shrinks about 35-fold with the model's size, and its MALA
acceptance stays near 0.9 throughout; the largest step size that reaches it also mixes
fastest.
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
from llc_callbacks.result import LLCResult

DEFAULT_STEP_SIZES = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
# The checks of LLCResult.problems that disqualify a setting (step_too_large is implied by an
# acceptance below MALA_TARGET).
DISQUALIFYING = ("init_loss", "diverged", "below_init", "localization")
# Least mean MALA acceptance of a chosen step size: the usual target of Langevin samplers.
MALA_TARGET = 0.9
# The interpolated step size aims this far above MALA_TARGET: measured acceptances vary by
# about 0.01 between runs, and one aimed at the target itself fails half the time.
MALA_AIM = 0.02


@dataclass(frozen=True)
class Calibration:
    """The outcome of a sweep.

    Attributes:
        rows: One dict per setting, in sweep order: ``step_size``, ``nbeta``,
            ``localization``, ``llc_mean``, ``llc_std``, every diagnostic, ``problems`` (the
            names of the failed checks) and ``ok`` (whether it passed the rule). Step sizes
            below the first that passed are not run.
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
        healthy = [row["step_size"] for row in self.rows if _healthy(row)]
        fallback = min(healthy or [row["step_size"] for row in self.rows])
        warnings.warn(
            "llc_callbacks: no step size passed calibration (see Calibration.rows); using"
            f" {fallback:g}. {_advice(self.rows)}",
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
    """Estimate the LLC at decreasing step sizes until one passes the rule, and recommend it.

    Each estimate uses ``config`` (chains, burn-in, draws, seed, ...) with the swept values
    replacing its own and the MALA acceptance measured; the module docstring states the rule.
    A sweep costs a few full estimates: those above the chosen step size (chains that diverge
    stop early), the chosen one and at most one interpolated.

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
            for step_size in sorted(_values("step_sizes", step_sizes, None), reverse=True)
        ]
        for nbeta in _values("nbetas", nbetas, config.nbeta)
        for localization in _values("localizations", localizations, config.localization)
    ]
    rows: list[dict[str, Any]] = []
    passing = []

    def run(setting: LLCConfig) -> dict[str, Any]:
        measured = dataclasses.replace(setting, mala=True)
        result = estimate_llc(
            model,
            loss_fn,
            data,
            measured,
            device=device,
            progress=progress,
            distributed=distributed,
            warn=False,
        )
        rows.append(_row(setting, result))
        if rows[-1]["ok"]:
            passing.append(setting)
        return rows[-1]

    for group in groups:
        above = None
        for setting in group:
            row = run(setting)
            if row["ok"]:
                between = None if above is None or not _healthy(above) else _between(row, above)
                if between is not None:
                    run(dataclasses.replace(setting, step_size=between))
                break
            above = row
    recommended = max(passing, key=lambda s: s.step_size, default=None)
    return Calibration(rows, recommended)


def _row(setting: LLCConfig, result: LLCResult) -> dict[str, Any]:
    row = {
        **result.diagnostics,
        "step_size": setting.step_size,
        "nbeta": setting.nbeta,
        "localization": setting.localization,
        "llc_mean": result.llc_mean,
        "llc_std": result.llc_std,
        "problems": list(result.problems()),
    }
    row["ok"] = _healthy(row) and row.get("mala_acceptance", math.nan) >= MALA_TARGET
    return row


def _healthy(row: dict[str, Any]) -> bool:
    return not set(row["problems"]) & set(DISQUALIFYING) and math.isfinite(row["llc_mean"])


def _advice(rows: list[dict[str, Any]]) -> str:
    """What would let a setting pass: told by the smallest step size swept, and why it failed."""
    smallest = min(rows, key=lambda row: row["step_size"])
    failed = set(smallest["problems"]) & set(DISQUALIFYING)
    if failed & {"localization", "below_init"}:
        return (
            f"The smallest step size failed {', '.join(sorted(failed))}: lower localization"
            " (pass localizations=[...]) or calibrate at weights that are a local minimum."
        )
    return (
        f"Pass smaller step_sizes: the smallest, {smallest['step_size']:g}, had MALA acceptance"
        f" {smallest.get('mala_acceptance', math.nan):.2f} (it must reach {MALA_TARGET})"
        + (" and diverged." if "diverged" in failed else ".")
    )


def _between(passed: dict[str, Any], failed: dict[str, Any]) -> float | None:
    """Where two step sizes' acceptances, linear in log step size, meet the aim.

    ``None`` when the acceptance of the one that passed is not above the aim.
    """
    low, high = passed["mala_acceptance"], failed["mala_acceptance"]
    if low <= MALA_TARGET + MALA_AIM:
        return None
    fraction = (low - MALA_TARGET - MALA_AIM) / (low - high)
    return float(passed["step_size"] * (failed["step_size"] / passed["step_size"]) ** fraction)


def _values(name: str, values: Sequence[Any] | None, default: Any) -> list[Any]:
    if values is None:
        return [default]
    values = list(values)
    if not values:
        raise ValueError(f"{name} must list at least one value")
    return values
