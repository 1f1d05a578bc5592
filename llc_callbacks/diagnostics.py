"""Health checks of one estimate's chains."""

from __future__ import annotations

import warnings

import numpy as np
from arviz_stats.base import array_stats


def chain_diagnostics(excess: np.ndarray, diverged: np.ndarray) -> dict[str, float]:
    """Summarize chains from the per-draw loss in excess of the loss at ``w*``.

    Args:
        excess: ``L_m(w_t) - L(w*)`` (or the paired ``L_m(w_t) - L_m(w*)``), shape
            ``(chains, draws)``: the values whose mean, times nbeta, is each chain's LLC.
        diverged: Boolean mask of chains whose loss went NaN or infinite, shape ``(chains,)``.

    Returns:
        ``num_diverged``; ``frac_below_init``, the fraction of the healthy chains' draws with a
        loss below the loss at ``w*`` (a large value means ``w*`` is not a local minimum or the
        step size is too large); ``rhat``, the rank-normalized split R-hat over healthy chains
        (near 1 when chains agree; NaN with fewer than two); ``ess``, their bulk effective
        sample size.
    """
    healthy = excess[~diverged]
    diagnostics = {"num_diverged": float(diverged.sum())}
    if healthy.size == 0:
        return {**diagnostics, "frac_below_init": np.nan, "rhat": np.nan, "ess": np.nan}
    with warnings.catch_warnings():
        # A constant trace has zero variance: arviz-stats warns and returns NaN, which we keep.
        warnings.simplefilter("ignore", RuntimeWarning)
        rhat = array_stats.rhat(healthy, chain_axis=0, draw_axis=1) if len(healthy) > 1 else np.nan
        ess = array_stats.ess(healthy, chain_axis=0, draw_axis=1)
    return {
        **diagnostics,
        "frac_below_init": float(np.mean(healthy < 0)),
        "rhat": float(rhat),
        "ess": float(ess),
    }
