"""Estimates against known learning coefficients (Aoyagi and Watanabe 2005 for reduced-rank
regression; Aoyagi 2024 for deep linear networks; a regular model's d/2; a normal crossing's
min 1/(2k)).

Each case fixes its seed and hyperparameters. The devinterp ports use devinterp's tolerance,
15%: with their settings the estimates over seeds 0-3 stayed within 10% of the truth (RRR:
0.96-1.09 of λ; normal crossing: 0.95-0.98), so a failure means the estimator changed, not bad
luck. The deep linear networks check the defaults against the 20% goal they were chosen for.
"""

import pytest
import torch
from models import (
    NormalCrossing,
    dln_problem,
    mse_loss,
    rrr_problem,
    teacher_data,
)
from torch import nn

from llc_callbacks import LLCConfig, calibrate, estimate_llc
from llc_callbacks.calibration import MALA_TARGET
from llc_callbacks.theory import dln_learning_coefficient, gaussian_nll, rrr_learning_coefficient

pytestmark = pytest.mark.slow  # make test-fast skips it

RRR_CASES = [(5, 3, 5, 0), (5, 3, 5, 2), (4, 3, 8, 1), (10, 6, 10, 3)]
# nβ = B / log B with B = 256. A weak localization (0.3) keeps the flat directions of the
# singular models open while 1000 burn-in steps of size 2e-3 reach a flat trace.
RRR_CONFIG = LLCConfig(
    num_chains=4, num_burnin=1000, num_draws=2000, step_size=2e-3, localization=0.3
)


@pytest.fixture(scope="module")
def rrr_estimates():
    estimates = {}
    for case in RRR_CASES:
        model, data = rrr_problem(*case)
        estimates[case] = estimate_llc(model, mse_loss, data, RRR_CONFIG).llc_mean
    return estimates


@pytest.mark.parametrize("case", RRR_CASES, ids=lambda c: "M{}-H{}-N{}-r{}".format(*c))
def test_reduced_rank_regression_within_15_percent(rrr_estimates, case):
    truth = rrr_learning_coefficient(*case)
    assert rrr_estimates[case] == pytest.approx(truth, rel=0.15)


def test_reduced_rank_regression_estimates_rank_like_the_truth(rrr_estimates):
    by_truth = sorted(RRR_CASES, key=lambda c: rrr_learning_coefficient(*c))
    by_estimate = sorted(RRR_CASES, key=rrr_estimates.get)
    assert by_truth == by_estimate


def test_regular_model_gives_half_its_dimension():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)  # 15 parameters: λ = 7.5
    data = teacher_data(model, 4)
    result = estimate_llc(model, mse_loss, data, RRR_CONFIG)
    assert result.llc_mean == pytest.approx(7.5, rel=0.15)


def test_normal_crossing_gives_the_smallest_exponent():
    model = NormalCrossing()
    data = teacher_data(model, 1)
    # The posterior is a narrow cross through w* = 0, and a chain mixes slowly between its
    # arms. The exact tempered-posterior mean at nβ = 46, γ = 0.3 is 0.228 (1D quadrature);
    # λ itself is the nβ → ∞ limit, 0.25. 16 chains of 8000 draws at ε = 1e-3 gave 0.27 on
    # average over 31 seeds, spread 0.045 (0.21 to 0.40): SGLD's bias at this step size, and
    # a heavy upper tail. 64 chains halve the spread; the estimate must be nearer to 1/4
    # than to the next exponent, the 1/2 of a regular direction: below 0.375, above 0.125.
    config = LLCConfig(
        num_chains=64, num_burnin=1000, num_draws=8000, step_size=1e-3, localization=0.3
    )
    result = estimate_llc(model, mse_loss, data, config)
    assert 0.125 < result.llc_mean < 0.375


def test_rmsprop_sgld_on_reduced_rank_regression():
    model, data = rrr_problem(10, 6, 10, 3)
    # The preconditioner 1 / (sqrt(v) + 0.1) enlarges steps up to tenfold where gradients are
    # small, so the step size is a quarter of plain SGLD's (seeds 0-2 gave 1.06-1.08 of λ).
    config = LLCConfig(
        num_burnin=1000, num_draws=2000, step_size=5e-4, localization=0.3, sampler="rmsprop_sgld"
    )
    result = estimate_llc(model, mse_loss, data, config)
    assert result.llc_mean == pytest.approx(rrr_learning_coefficient(10, 6, 10, 3), rel=0.15)


# Deep linear networks under LLCConfig.accurate(): the goal is 20% from 10^2 to 10^4
# parameters. Measured with these seeds: 0.94, 0.88 and 0.96 of λ, the mean of 4 chains whose
# spread puts it within about 3% (one standard error); 6 to 8 s each on one thread. The checks
# that say which way an estimate is off have their own tests (test_calibration.py); here the
# pull of the weak localization must be negligible (its elasticity measured 0.00 to 0.01).
DLN_CASES = [([3, 6, 6, 3], 1), ([6, 5, 5, 4, 6], 1), ([20, 15, 15, 20], 5)]


@pytest.mark.parametrize("case", DLN_CASES, ids=lambda c: "-".join(map(str, c[0])))
def test_accurate_config_on_deep_linear_networks_within_20_percent(case):
    widths, rank = case
    model, data = dln_problem(widths, rank)
    result = estimate_llc(model, gaussian_nll, data, LLCConfig.accurate())
    assert result.llc_mean == pytest.approx(dln_learning_coefficient(widths, rank), rel=0.2)
    assert "localization" not in result.problems()


def test_calibrated_step_size_on_a_deep_linear_network_within_20_percent():
    # Measured: 0.88 of λ at the interpolated step size 2.0e-4 (acceptance 0.95), after 3e-4
    # missed the target (0.875) and 1e-4 passed (0.994).
    widths, rank = [6, 5, 5, 4, 6], 1
    model, data = dln_problem(widths, rank)
    fixed = LLCConfig.accurate(step_size=2e-4, relative_error=None)  # the sweep's lengths are fixed
    calibration = calibrate(model, gaussian_nll, data, fixed)
    chosen = calibration.rows[-1]  # the sweep stops at the step size it recommends
    assert chosen["step_size"] == calibration.recommended.step_size
    assert chosen["mala_acceptance"] >= MALA_TARGET
    assert chosen["llc_mean"] == pytest.approx(dln_learning_coefficient(widths, rank), rel=0.2)


def test_the_defaults_measure_a_consistent_fraction_of_the_learning_coefficient():
    # Localization 100, for curves: 0.48-0.52 and 0.54-0.55 of λ on 30 and 825 parameters
    # (seeds 0-2). The defaults are for a curve's shape and turns: the fraction must stay in
    # a band, not near 1 (LLCConfig.accurate() is for λ).
    fractions = []
    for widths, rank in [([5, 3, 5], 2), ([20, 15, 15, 20], 5)]:
        model, data = dln_problem(widths, rank)
        estimate = estimate_llc(model, gaussian_nll, data, LLCConfig()).llc_mean
        fractions.append(estimate / dln_learning_coefficient(widths, rank))
    assert all(0.3 < fraction < 0.7 for fraction in fractions)
