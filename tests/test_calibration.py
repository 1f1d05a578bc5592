"""Health checks, calibrate() and step_size="auto" (issue: trustworthy estimates)."""

import dataclasses
import math
import warnings

import pytest
from models import (
    DropoutBatchNormNet,
    classification_batches,
    cross_entropy,
    mse_loss,
    rrr_problem,
)

from llc_callbacks import LLCConfig, LLCMonitor, calibrate, estimate_llc
from llc_callbacks.calibration import AGREEMENT
from llc_callbacks.theory import rrr_learning_coefficient

RRR = (10, 6, 10, 3)  # λ = 35
# Short chains for the sweep; the weak localization of the accuracy tests.
SWEEP = LLCConfig(num_burnin=500, num_draws=1000, localization=0.3)


@pytest.fixture(scope="module")
def rrr():
    return rrr_problem(*RRR)


@pytest.fixture(scope="module")
def calibration(rrr):
    model, data = rrr
    return calibrate(model, mse_loss, data, SWEEP, step_sizes=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])


@pytest.mark.slow
def test_calibrate_recommends_a_step_size_that_gets_the_known_llc(rrr, calibration):
    model, data = rrr
    recommended = calibration.recommended
    assert recommended is not None
    final = dataclasses.replace(recommended, num_burnin=1000, num_draws=2000)
    estimate = estimate_llc(model, mse_loss, data, final).llc_mean
    # Seeds 0-2 landed within 2% of λ; 15% is the tolerance.
    assert estimate == pytest.approx(rrr_learning_coefficient(*RRR), rel=0.15)


@pytest.mark.slow
def test_calibration_table_follows_the_documented_rule(calibration):
    rows = {row["step_size"]: row for row in calibration.rows}
    assert list(rows) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    assert rows[1e-4]["agrees"] is None  # nothing smaller to compare with
    assert "diverged" in rows[3e-2]["problems"] and not rows[3e-2]["ok"]
    for small, large in zip(calibration.rows, calibration.rows[1:], strict=False):
        if large["agrees"] is not None:
            difference = abs(large["llc_mean"] - small["llc_mean"])
            assert large["agrees"] == (difference <= AGREEMENT * abs(small["llc_mean"]))
        assert large["ok"] == (not large["problems"] and bool(large["agrees"]))
    best = max(row["step_size"] for row in calibration.rows if row["ok"])
    assert calibration.recommended.step_size == best == calibration.chosen_step_size()
    # Larger step sizes that did not diverge still failed: they overestimate (SGLD's bias).
    assert all(not row["ok"] for row in calibration.rows if row["step_size"] > best)


def test_a_step_size_100_times_the_recommended_is_flagged_divergent(rrr, calibration):
    model, data = rrr
    config = dataclasses.replace(SWEEP, step_size=100 * calibration.recommended.step_size)
    with pytest.warns(UserWarning, match="chains diverged.*Lower step_size"):
        result = estimate_llc(model, mse_loss, data, config)
    assert "diverged" in result.problems()


def test_a_burn_in_of_a_few_steps_is_flagged_as_drifting(rrr, calibration):
    model, data = rrr
    short = dataclasses.replace(calibration.recommended, num_burnin=2, num_draws=400)
    with pytest.warns(UserWarning, match="chains still drifting.*raise num_burnin"):
        result = estimate_llc(model, mse_loss, data, short)
    # The draws' last half sits far above their first tenth (seeds 0-4 gave 4.5 to 8.2,
    # against |z| <= 1.3 after 500 burn-in steps).
    assert result.diagnostics["trend_z"] > 4
    healthy = estimate_llc(model, mse_loss, data, dataclasses.replace(short, num_burnin=500))
    assert "drifting" not in healthy.problems()


@pytest.mark.slow
def test_mala_acceptance_is_high_for_a_good_step_size_and_low_for_a_large_one(rrr):
    model, data = rrr
    config = dataclasses.replace(SWEEP, num_draws=400, mala=True)
    good = estimate_llc(model, mse_loss, data, dataclasses.replace(config, step_size=1e-3))
    with pytest.warns(UserWarning, match="MALA acceptance is .* lower step_size"):
        large = estimate_llc(model, mse_loss, data, dataclasses.replace(config, step_size=1e-2))
    # Measured: 0.91-0.92 at 1e-3 over seeds 0-2, 0.47 at 1e-2.
    assert good.diagnostics["mala_acceptance"] > 0.8
    assert large.diagnostics["mala_acceptance"] < 0.6
    rmsprop = dataclasses.replace(config, sampler="rmsprop_sgld", step_size=2e-4)
    acceptance = estimate_llc(model, mse_loss, data, rmsprop).diagnostics["mala_acceptance"]
    assert 0 < acceptance <= 1


def test_a_monitor_warns_about_each_failed_check_once_per_run():
    model, data = DropoutBatchNormNet(), classification_batches()
    exploding = LLCConfig(num_chains=2, num_burnin=5, num_draws=40, step_size=100.0)
    monitor = LLCMonitor(exploding, every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 4):
            monitor.maybe_estimate(step, model, cross_entropy, data)
    diverged = [w for w in caught if "chains diverged" in str(w.message)]
    assert all(math.isnan(row["llc/mean"]) for row in monitor.history)
    assert len(diverged) == 1 and "warned once per run" in str(diverged[0].message)
    restored = LLCMonitor(exploding, every_n_steps=1)
    restored.load_state_dict(monitor.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored.maybe_estimate(4, model, cross_entropy, data)
    assert math.isnan(restored.history[-1]["llc/mean"])
    assert not [w for w in caught if "chains diverged" in str(w.message)]


@pytest.mark.slow
def test_auto_step_size_is_calibrated_once_logged_once_and_kept_across_resume(rrr):
    model, data = rrr
    config = dataclasses.replace(SWEEP, step_size="auto")
    monitor = LLCMonitor(config, steps=[1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default sweep finds a passing step size
        first = monitor.maybe_estimate(1, model, mse_loss, data)
    chosen = monitor.config.step_size
    assert chosen == monitor.calibration.recommended.step_size
    assert first["llc/step_size"] == chosen == monitor.last_result.config.step_size
    calibration = monitor.calibration
    second = monitor.maybe_estimate(2, model, mse_loss, data)
    assert "llc/step_size" not in second and monitor.calibration is calibration
    assert monitor.state_dict()["step_size"] == chosen

    resumed = LLCMonitor(config, steps=[1, 2, 3])
    resumed.load_state_dict(monitor.state_dict())
    resumed.maybe_estimate(3, model, mse_loss, data)
    assert resumed.calibration is None  # not calibrated again
    assert resumed.last_result.config.step_size == chosen


def test_no_passing_step_size_falls_back_with_a_warning(rrr):
    model, data = rrr
    calibration = calibrate(model, mse_loss, data, SWEEP, step_sizes=[10.0, 100.0])
    assert calibration.recommended is None
    with pytest.warns(UserWarning, match="no step size passed calibration.*using 10"):
        assert calibration.chosen_step_size() == 10.0


def test_calibrate_sweeps_nbeta_and_localization_too(rrr):
    model, data = rrr
    short = dataclasses.replace(SWEEP, num_burnin=50, num_draws=100)
    calibration = calibrate(
        model,
        mse_loss,
        data,
        short,
        step_sizes=[1e-3],
        nbetas=[10.0, "batch"],
        localizations=[1.0, 3.0],
    )
    assert [(r["nbeta"], r["localization"]) for r in calibration.rows] == [
        (10.0, 1.0),
        (10.0, 3.0),
        ("batch", 1.0),
        ("batch", 3.0),
    ]
    with pytest.raises(ValueError, match="step_sizes must list at least one value"):
        calibrate(model, mse_loss, data, short, step_sizes=[])


def test_config_accepts_auto_and_validates_mala():
    assert LLCConfig(step_size="auto").step_size == "auto"
    with pytest.raises(ValueError, match="step_size must be a finite number > 0 or 'auto'"):
        LLCConfig(step_size="fast")
    with pytest.raises(ValueError, match="mala must be True or False"):
        LLCConfig(mala="yes")
