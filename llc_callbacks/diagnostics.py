"""Health checks of one estimate's chains, and the advice they give.

The thresholds below decide when a check fails; each failing check names what to change.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from arviz_stats.base import array_stats

from llc_callbacks.config import LLCConfig

# |trend_z| above this: the draws' last half differs from their first tenth by more than
# sampling noise explains (Geweke's test), so the chains were still drifting.
DRIFT_Z = 4.0
# R-hat above this: chains disagree (Vehtari et al. 2021 suggest 1.01 for final inference;
# short LLC chains are judged more leniently).
RHAT_MAX = 1.1
# climb above this, with trend_z above CLIMB_Z: the draws' last half lies that fraction above
# their mean, so the chains were still climbing towards the posterior and the LLC is low.
CLIMB_MAX = 0.05
CLIMB_Z = 2.0
# loc_sensitivity below this: the pull towards w* holds the chains and lowers the LLC by about
# that fraction (see localization_sensitivity), against the learning coefficient. Judged only
# at a localization of at most LAMBDA_LOCALIZATION, where the estimate aims at the learning
# coefficient (LLCConfig.accurate() uses 5); above it the localization is a setting of what
# is measured, as in a curve (the defaults use 100, published curves 100 to 300).
LOC_SENSITIVITY_MIN = -0.2
LAMBDA_LOCALIZATION = 10.0
# Mean MALA acceptance below this: steps too large for the local curvature, and the LLC
# inflated (on deep linear networks, acceptances of 0.55 to 0.74 came with +17% to +62%, and
# 0.80 to 0.88 with -6% to +12%).
MALA_MIN = 0.75


def chain_diagnostics(
    draws: np.ndarray,
    diverged: np.ndarray,
    distance: np.ndarray,
    localization: float,
    mala_acceptance: np.ndarray | None = None,
) -> dict[str, float]:
    """Summarize chains from their draws.

    Args:
        draws: ``nbeta * (L_m(w_t) - L(w*))`` (or the paired ``L_m(w_t) - L_m(w*)``), shape
            ``(chains, draws)``: each chain's LLC is the mean of its row.
        diverged: Boolean mask of chains whose loss went NaN or infinite, shape ``(chains,)``.
        distance: ``||w_t - w*||^2 / 2`` at each draw, shape ``(chains, draws)``.
        localization: The strength gamma of the pull towards ``w*``.
        mala_acceptance: Per-chain mean MALA acceptance, if it was measured.

    Returns:
        ``num_diverged``; ``frac_below_init``, the fraction of the healthy chains' draws with a
        loss below the loss at ``w*``; ``rhat``, the rank-normalized split R-hat over healthy
        chains (near 1 when they agree; NaN with fewer than two); ``ess``, their bulk
        effective sample size; ``trend_z``, Geweke's z-score of the last half of the draws
        against their first tenth (large when burn-in was too short; NaN under 40 draws);
        ``climb``, how far the mean of the draws' last half lies above the mean of all
        draws, relative to it (NaN when that mean is not positive); ``loc_sensitivity``, the
        estimate's elasticity to the localization, ``d log LLC / d log gamma`` (see
        ``localization_sensitivity``); and ``mala_acceptance`` when measured.
    """
    healthy = draws[~diverged]
    diagnostics = {"num_diverged": float(diverged.sum())}
    if healthy.size == 0:
        diagnostics.update(
            frac_below_init=math.nan,
            rhat=math.nan,
            ess=math.nan,
            trend_z=math.nan,
            climb=math.nan,
            loc_sensitivity=math.nan,
        )
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
        mean = healthy.mean()
        last_half = healthy[:, healthy.shape[1] // 2 :].mean()
        diagnostics["climb"] = float(last_half / mean - 1) if mean > 0 else math.nan
        diagnostics["loc_sensitivity"] = localization_sensitivity(
            healthy, distance[~diverged], localization
        )
    if mala_acceptance is not None:
        kept = mala_acceptance[~diverged]
        diagnostics["mala_acceptance"] = float(kept.mean()) if kept.size else math.nan
    return diagnostics


def localization_sensitivity(draws: np.ndarray, distance: np.ndarray, localization: float) -> float:
    """``d log LLC / d log gamma``, estimated from the draws of one posterior.

    Under the localized posterior ``exp(-nbeta L(w) - gamma ||w - w*||^2 / 2)``, the
    derivative of any mean ``E[f]`` with respect to gamma is ``-Cov(f, ||w - w*||^2 / 2)``.
    With ``f`` the draws' ``nbeta (L - L*)``, whose mean is the LLC, the elasticity is
    ``-gamma Cov(f, ||w - w*||^2 / 2) / LLC``. Along a quadratic direction of curvature
    ``h`` it equals ``-gamma / (nbeta h + gamma)``: the fraction by which the pull lowers
    that direction's contribution, so ``-0.3`` says the estimate lies about 30% below what a
    negligible localization would give. The covariance is taken within each chain after
    removing each series' least-squares line, so that chains still drifting (both series
    rising) do not read as a pull.

    Args:
        draws: ``nbeta (L_m(w_t) - L(w*))``, shape ``(chains, draws)``.
        distance: ``||w_t - w*||^2 / 2`` at the same draws.
        localization: gamma.

    Returns:
        The elasticity (at most 0 in expectation); NaN when the estimate is not positive or
        there are fewer than 3 draws.
    """
    mean = draws.mean()
    if not mean > 0 or draws.shape[1] < 3:
        return math.nan
    covariance = np.mean(_detrended(draws) * _detrended(distance))
    return float(-localization * covariance / mean)


def _detrended(series: np.ndarray) -> np.ndarray:
    """Each row minus its least-squares line over the draws."""
    time = np.arange(series.shape[1]) - (series.shape[1] - 1) / 2
    centered = series - series.mean(axis=1, keepdims=True)
    slope = centered @ time / (time @ time)
    return centered - slope[:, None] * time


def problems(
    llc_mean: float,
    init_loss: float,
    diagnostics: dict[str, float],
    config: LLCConfig,
    *,
    burnin: np.ndarray,
    draws: np.ndarray,
    more_steps: str | None = None,
) -> dict[str, str]:
    """The checks an estimate fails, each with what to change.

    The advice names the setting that acts on the chains as they ran: a burn-in that ended
    by the settling rule (``adaptation.settled``) is not lengthened by a larger ``num_burnin``,
    nor are draws that each chain ended at its own precision (``relative_error``) by a larger
    ``num_draws``.

    Args:
        llc_mean: The estimate.
        init_loss: ``L(w*)``.
        diagnostics: As returned by ``chain_diagnostics``.
        config: The hyperparameters used.
        burnin: The burn-in steps of each chain that did not diverge.
        draws: The draws of each chain that did not diverge.
        more_steps: What gives the chains more steps where ``num_burnin`` and ``num_draws``
            do not (a paced streaming reading): the advice of the checks that ask for more.

    Returns:
        ``{check: message}`` for each failing check, among ``init_loss`` (not finite),
        ``diverged`` (some or all chains), ``below_init`` (negative LLC), ``under_mixed``
        (``climb > CLIMB_MAX`` and ``trend_z > CLIMB_Z``: biased low), ``drifting``
        (otherwise ``|trend_z| > DRIFT_Z``), ``rhat`` (``> RHAT_MAX``), ``localization``
        (``loc_sensitivity < LOC_SENSITIVITY_MIN`` at a localization of at most
        ``LAMBDA_LOCALIZATION``: biased low) and ``step_too_large`` (MALA
        acceptance ``< MALA_MIN``: biased high).
    """
    if not math.isfinite(init_loss):
        return {"init_loss": f"the loss at the current weights is {init_loss}; the LLC is NaN."}
    found = {}
    chains = config.num_chains
    step_size = diagnostics.get("step_size", config.step_size)
    if config.step_size == "adapt":  # the advice is about what steers the adaptation
        smaller = f"raise target_acceptance (now {config.target_acceptance:g})"
    else:
        smaller = f"lower step_size (now {step_size:g})"
    diverged = int(diagnostics["num_diverged"])
    if diverged == chains:
        found["diverged"] = (
            f"all {chains} chains diverged (loss became NaN or infinite); the LLC is NaN."
            f" {smaller.capitalize()} or raise localization (now {config.localization:g})."
        )
        return found
    if diverged:
        found["diverged"] = (
            f"{diverged} of {chains} chains diverged and are left out of the LLC; {smaller}."
        )
    steps_too_large = diagnostics.get("mala_acceptance", 1.0) < MALA_MIN
    if llc_mean < 0:
        cause = (
            f"the steps are too large: {smaller}"
            if steps_too_large
            else "they are not a local minimum (early in training, or the loss still falls"
            f" fast): raise localization (now {config.localization:g}) to hold the chains"
            " nearer them, or estimate once the loss levels off"
        )
        found["below_init"] = (
            f"the LLC is negative ({llc_mean:.3g}): sampled losses fall below the loss at the"
            f" current weights, so {cause}."
        )
    longer = more_steps or _longer_draws(config, draws)
    capped = int((burnin >= config.num_burnin).sum())
    if more_steps:
        settle = more_steps
    elif capped:
        settle = (
            f"raise num_burnin (now {config.num_burnin}; {capped} of {len(burnin)} chains"
            " burned in for all of it)"
        )
        if config.step_size != "adapt":
            settle += f" or step_size (now {step_size:g})"
    else:  # each burn-in ended once its loss had levelled off
        settle = _slow_directions(config, step_size, burnin + draws) or longer
    if diagnostics["climb"] > CLIMB_MAX and diagnostics["trend_z"] > CLIMB_Z:
        found["under_mixed"] = (
            f"chains still climbing: the draws' last half lies {diagnostics['climb']:.0%} above"
            f" their mean, so the LLC is biased low: {settle}."
        )
    elif abs(diagnostics["trend_z"]) > DRIFT_Z:
        found["drifting"] = (
            f"chains still drifting (the draws' last half differs from their first tenth by"
            f" {diagnostics['trend_z']:.1f} standard errors): {settle}."
        )
    if diagnostics["rhat"] > RHAT_MAX:
        found["rhat"] = (
            f"chains disagree (R-hat {diagnostics['rhat']:.2f} > {RHAT_MAX}, over the"
            f" {int(draws.min())} draws every chain has): {longer}."
        )
    aims_at_lambda = config.localization <= LAMBDA_LOCALIZATION
    if aims_at_lambda and diagnostics["loc_sensitivity"] < LOC_SENSITIVITY_MIN:
        found["localization"] = (
            "the pull towards the current weights holds the chains (the LLC's elasticity to"
            f" localization is {diagnostics['loc_sensitivity']:.2f}), so the LLC is biased low."
            f" Lower localization (now {config.localization:g})."
        )
    if steps_too_large:
        found["step_too_large"] = (
            f"MALA acceptance is {diagnostics['mala_acceptance']:.2f} (healthy near 0.9): the"
            f" steps are too large for the curvature and the LLC is biased high: {smaller}."
        )
    return found


def _longer_draws(config: LLCConfig, draws: np.ndarray) -> str:
    """What makes every chain draw longer: ``num_draws``, unless chains stopped before it."""
    if config.relative_error is not None and draws.size and (draws < config.num_draws).any():
        return (
            f"pass relative_error=None (now {config.relative_error:g}) so that every chain"
            f" draws num_draws (now {config.num_draws}) instead of stopping at its own"
            f" precision (here after {_span(draws)} draws)"
        )
    return f"raise num_draws (now {config.num_draws})"


def _slow_directions(config: LLCConfig, step_size: float, ran: np.ndarray) -> str | None:
    """Advice when the directions that only the localization holds outlast the chains.

    Along them a chain relaxes over about ``2 / (step_size * localization)`` steps (its
    distance from ``w*`` is an AR(1) series with that time constant); if that exceeds every
    chain's steps, no burn-in that the settling rule ends lets them arrive.
    """
    relaxation = 2 / (step_size * config.localization)
    if relaxation <= ran.max():
        return None
    return (
        f"raise localization (now {config.localization:g}): along the directions that only it"
        f" holds, chains relax over about 2 / (step size x localization) = {relaxation:,.0f}"
        f" steps, more than the {_span(ran)} they ran"
    )


def _span(values: np.ndarray) -> str:
    """``"100"`` or ``"100 to 150"``: the least and the most of some counts."""
    low, high = int(values.min()), int(values.max())
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


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
