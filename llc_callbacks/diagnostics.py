"""Health checks of one estimate's chains, and the advice they give.

The thresholds below decide when a check fails; each failing check names what to change.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from arviz_stats.base import array_stats

# |trend_z| above this: the draws' last half differs from their first tenth by more than
# sampling noise explains (Geweke's test), so the chains were still drifting.
DRIFT_Z = 4.0
# R-hat above this: chains disagree (Vehtari et al. 2021 suggest 1.01 for final inference;
# short LLC chains are judged more leniently).
RHAT_MAX = 1.1
# Mean MALA acceptance below this: the step size is too large for the local curvature
# (around 0.9 is healthy).
MALA_MIN = 0.5


def chain_diagnostics(
    excess: np.ndarray, diverged: np.ndarray, mala_acceptance: np.ndarray | None = None
) -> dict[str, float]:
    """Summarize chains from the per-draw loss in excess of the loss at ``w*``.

    Args:
        excess: ``L_m(w_t) - L(w*)`` (or the paired ``L_m(w_t) - L_m(w*)``), shape
            ``(chains, draws)``: the values whose mean, times nbeta, is each chain's LLC.
        diverged: Boolean mask of chains whose loss went NaN or infinite, shape ``(chains,)``.
        mala_acceptance: Per-chain mean MALA acceptance, if it was measured.

    Returns:
        ``num_diverged``; ``frac_below_init``, the fraction of the healthy chains' draws with a
        loss below the loss at ``w*``; ``rhat``, the rank-normalized split R-hat over healthy
        chains (near 1 when they agree; NaN with fewer than two); ``ess``, their bulk
        effective sample size; ``trend_z``, Geweke's z-score of the last half of the draws
        against their first tenth (large when burn-in was too short; NaN under 40 draws);
        and ``mala_acceptance`` when measured.
    """
    healthy = excess[~diverged]
    diagnostics = {"num_diverged": float(diverged.sum())}
    if healthy.size == 0:
        diagnostics.update(frac_below_init=math.nan, rhat=math.nan, ess=math.nan, trend_z=math.nan)
    else:
        with warnings.catch_warnings():
            # A constant trace has zero variance: arviz-stats warns and returns NaN; we keep NaN.
            warnings.simplefilter("ignore", RuntimeWarning)
            rhat = (
                array_stats.rhat(healthy, chain_axis=0, draw_axis=1)
                if len(healthy) > 1
                else math.nan
            )
            diagnostics.update(
                frac_below_init=float(np.mean(healthy < 0)),
                rhat=float(rhat),
                ess=float(array_stats.ess(healthy, chain_axis=0, draw_axis=1)),
                trend_z=_trend_z(healthy),
            )
    if mala_acceptance is not None:
        kept = mala_acceptance[~diverged]
        diagnostics["mala_acceptance"] = float(kept.mean()) if kept.size else math.nan
    return diagnostics


def problems(
    llc_mean: float,
    init_loss: float,
    diagnostics: dict[str, float],
    num_chains: int,
    step_size: float,
) -> dict[str, str]:
    """The checks an estimate fails, each with what to change.

    Args:
        llc_mean: The estimate.
        init_loss: ``L(w*)``.
        diagnostics: As returned by ``chain_diagnostics``.
        num_chains: Chains run.
        step_size: The step size used.

    Returns:
        ``{check: message}`` for each failing check, among ``init_loss`` (not finite),
        ``diverged`` (some or all chains), ``below_init`` (negative LLC), ``drifting``
        (``|trend_z| > DRIFT_Z``), ``rhat`` (``> RHAT_MAX``) and ``mala`` (``< MALA_MIN``).
    """
    if not math.isfinite(init_loss):
        return {"init_loss": f"the loss at the current weights is {init_loss}; the LLC is NaN."}
    found = {}
    diverged = int(diagnostics["num_diverged"])
    if diverged == num_chains:
        found["diverged"] = (
            f"all {num_chains} chains diverged (loss became NaN or infinite); the LLC is NaN."
            f" Lower step_size (now {step_size:g}) or raise localization."
        )
        return found
    if diverged:
        found["diverged"] = (
            f"{diverged} of {num_chains} chains diverged and are left out of the LLC; consider a"
            f" smaller step_size (now {step_size:g})."
        )
    if llc_mean < 0:
        found["below_init"] = (
            f"the LLC is negative ({llc_mean:.3g}): sampled losses fall below the loss at the"
            " current weights, which are not a local minimum or the step_size"
            f" ({step_size:g}) is too large."
        )
    if abs(diagnostics["trend_z"]) > DRIFT_Z:
        found["drifting"] = (
            f"chains still drifting (the draws' last half differs from their first tenth by"
            f" {diagnostics['trend_z']:.1f} standard errors): raise num_burnin or step_size."
        )
    if diagnostics["rhat"] > RHAT_MAX:
        found["rhat"] = (
            f"chains disagree (R-hat {diagnostics['rhat']:.2f} > {RHAT_MAX}): raise num_draws"
            " or num_burnin."
        )
    if diagnostics.get("mala_acceptance", 1.0) < MALA_MIN:
        found["mala"] = (
            f"MALA acceptance is {diagnostics['mala_acceptance']:.2f} (healthy near 0.9): lower"
            f" step_size (now {step_size:g})."
        )
    return found


def _trend_z(healthy: np.ndarray) -> float:
    """Geweke's z-score, pooled over chains.

    The mean of the last half of the draws minus the mean of their first tenth, in standard
    errors (each from its segment's effective sample size).
    """
    draws = healthy.shape[1]
    if draws < 40:
        return math.nan
    first, last = healthy[:, : draws // 10], healthy[:, draws // 2 :]
    variance = sum(
        part.var() / array_stats.ess(part, chain_axis=0, draw_axis=1) for part in (first, last)
    )
    difference = last.mean() - first.mean()
    if not variance > 0:
        return 0.0 if difference == 0 else math.copysign(math.inf, difference)
    return float(difference / math.sqrt(variance))
