"""Streaming readings: chains that persist through training (issue: curves, not points)."""

import copy
import dataclasses
import logging
import math

import pytest
import torch
from clocks import Clock
from models import Bowl, DropoutBatchNormNet, classification_batches, cross_entropy, mse_loss

from llc_callbacks import LLCConfig, LLCMonitor, Restrictions, estimate_llc
from llc_callbacks import streaming as streaming_module
from llc_callbacks.curvature import mala_step_size
from llc_callbacks.diagnostics import MALA_MIN
from llc_callbacks.monitor import step_seed
from llc_callbacks.streaming import (
    MIN_STEPS,
    POOLED_DRAWS,
    RELAXATION,
    STREAM_SHARE,
    TUNING_STEPS,
)

# A short tuning reading; every reading draws num_draws steps (stream=True, max_overhead=None).
STREAMED = LLCConfig(num_chains=4, num_burnin=100, num_draws=20)


def train(monitor, steps, *, chain_loss=cross_entropy, on_step=None, first=1):
    """SGD on the dropout and BatchNorm net, the monitor asked after every step.

    Returns:
        The model's weights at each step the monitor read, by step.
    """
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = {}
    for step in range(first, steps + 1):
        optimizer.zero_grad()
        cross_entropy(model, data[step % len(data)]).backward()
        optimizer.step()
        if on_step is not None:
            on_step()
        if monitor.maybe_estimate(step, model, chain_loss, data):
            weights[step] = copy.deepcopy(model.state_dict())
    return weights


def test_readings_equal_a_hand_written_loop_that_continues_the_chains():
    monitor = LLCMonitor(STREAMED, every_n_steps=5, stream=True, max_overhead=None)
    weights = train(monitor, 20)
    # The loop: measure a step size from the curvature at the first weights and burn in at
    # it, then continue every chain from where it ended, around the new weights, at that
    # step size; every later reading takes num_draws steps per chain, the first of them, one
    # relaxation time 1 / (eps gamma) up to half of them, burning in.
    model, data = DropoutBatchNormNet(), classification_batches()
    starts, results, eps = None, [], math.nan  # eps: measured at the first reading
    for number, (step, state) in enumerate(weights.items()):
        model.load_state_dict(state)
        config = dataclasses.replace(
            STREAMED, seed=step_seed(STREAMED.seed, step), relative_error=None
        )
        if number:
            burnin = min(math.ceil(1 / (eps * config.localization)), STREAMED.num_draws // 2)
            config = dataclasses.replace(
                config, step_size=eps, num_burnin=burnin, num_draws=STREAMED.num_draws - burnin
            )
        else:
            eps = mala_step_size(model, cross_entropy, data, config)
            burnin = math.ceil(RELAXATION / (eps * config.localization))
            config = dataclasses.replace(config, step_size=eps, num_burnin=burnin)
        results.append(
            estimate_llc(model, cross_entropy, data, config, start=starts, keep_ends=True)
        )
        starts = results[-1].starts
    assert 0 < results[0].burnin[0] < STREAMED.num_burnin  # the relaxation time is shorter
    assert [row["step"] for row in monitor.history] == [5, 10, 15, 20]
    assert [row["llc/mean"] for row in monitor.history] == [r.llc_mean for r in results]
    assert [row["llc/tuned"] for row in monitor.history] == [1.0, 0.0, 0.0, 0.0]
    for row, result in zip(monitor.history, results, strict=True):
        # One step size for the run: the measured one, in every reading.
        assert result.step_sizes.tolist() == [eps] * 4
        assert row["llc/step_size"] == pytest.approx(eps)
    assert 0 < burnin < STREAMED.num_draws
    for result in results[1:]:
        assert result.burnin.tolist() == [burnin] * 4
        assert result.draws.tolist() == [STREAMED.num_draws - burnin] * 4


def test_a_first_reading_burns_in_for_the_relaxation_time_at_its_measured_step_size():
    # A snapshot estimate of the same config adapts its step size and burns in until its
    # chains settle: longer. A stream whose chains adapt (a step size of the user's, or
    # RMSprop: no measured step size) burns in at most TUNING_STEPS, its adaptation included.
    config = dataclasses.replace(STREAMED, num_burnin=1000, num_draws=10)
    streams = {
        name: LLCMonitor(changed, every_n_steps=5, stream=True, max_overhead=None)
        for name, changed in [
            ("measured", config),
            ("rmsprop", dataclasses.replace(config, sampler="rmsprop_sgld")),
        ]
    }
    snapshots = LLCMonitor(config, every_n_steps=5, stream=False)
    for monitor in [*streams.values(), snapshots]:
        train(monitor, 5)
    measured = streams["measured"].history[0]
    eps = measured["llc/step_size"]
    relaxed = math.ceil(RELAXATION / (eps * config.localization))
    assert measured["llc/diag/burnin"] == relaxed < TUNING_STEPS
    assert streams["rmsprop"].history[0]["llc/diag/burnin"] == TUNING_STEPS
    assert snapshots.history[0]["llc/diag/burnin"] > TUNING_STEPS


def test_a_reading_at_its_floor_of_steps_burns_in_for_half_of_them():
    # Readings at the floor that drew all their steps read 3.4 to 4.4 times the long chains
    # at a deep linear network's stage turn (benchmarks/curves.py): the floor burns in too.
    stream = streaming_module.Stream(max_overhead=0.01)
    stream.tune, stream.held, stream.step_seconds = False, 1e-3, 1.0  # relaxes over 10 steps
    planned = stream.plan(LLCConfig(localization=100.0, num_draws=1000), distributed=False)
    assert planned.num_burnin == MIN_STEPS // 2
    assert planned.num_burnin + planned.num_draws == MIN_STEPS
    assert planned.step_size == 1e-3


def test_the_measured_step_size_reaches_the_target_acceptance_on_a_gaussian():
    # A linear regression's loss is quadratic: its localized posterior is Gaussian, where
    # mala_step_size's formula holds (one batch, so that the chains sample one posterior).
    # 4 chains x 300 draws, measured on every tenth: 120 acceptances of spread about 0.1,
    # whose mean is within 0.02 of its expectation; the Hutchinson estimate's error moves
    # the step size by under 1% here (the localization's share of the trace is exact).
    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    data = [(x, x @ torch.randn(20, 3) + 0.5 * torch.randn(1024, 3))]
    model = torch.nn.Linear(20, 3)
    config = LLCConfig(num_chains=4, num_burnin=200, num_draws=300, mala=True, relative_error=None)
    eps = mala_step_size(model, mse_loss, data, config)
    accepted = {
        factor: estimate_llc(
            model, mse_loss, data, dataclasses.replace(config, step_size=factor * eps)
        ).diagnostics["mala_acceptance"]
        for factor in (1, 2)
    }
    assert accepted[1] == pytest.approx(config.target_acceptance, abs=0.04)
    # Twice the step size: 0.72 in theory (the log ratio's variance grows as eps^3); the
    # SGLD chain's own stationary law, wider than the posterior, accepts a little more (0.77).
    assert accepted[2] < accepted[1] - 0.05


def test_a_snapshot_monitor_adapts_its_step_sizes_at_every_estimate():
    # What streaming changes: without it, every estimate adapts its chains' step sizes anew.
    monitor = LLCMonitor(STREAMED, every_n_steps=5, stream=False)
    train(monitor, 20)
    assert "llc/tuned" not in monitor.history[0]
    assert len({row["llc/diag/step_size"] for row in monitor.history}) == 4


def test_max_overhead_sets_each_readings_draws_from_the_measured_times(monkeypatch):
    # Deterministic times: a training step takes 10 ms, each call of the chains' loss 1 ms.
    clock = Clock()
    monkeypatch.setattr(streaming_module.time, "perf_counter", clock)

    def chain_loss(model, batch):
        clock.now += 0.001
        return cross_entropy(model, batch)

    def step():
        clock.now += 0.010

    draws, shares = {}, {}
    for share in (0.5, 0.25):
        # A step size of the user's: the tuning reading burns in all of num_burnin at it.
        config = dataclasses.replace(STREAMED, num_burnin=150, num_draws=1000, step_size=1e-3)
        monitor = LLCMonitor(config, every_n_steps=50, stream=True, max_overhead=share)
        spent = []
        original = monitor.stream.read

        def timed(result, *, tuning, read=original, log=spent, stream=monitor.stream):
            log.append(clock.now - stream._began)
            return read(result, tuning=tuning)

        monkeypatch.setattr(monitor.stream, "read", timed)
        train(monitor, 300, chain_loss=chain_loss, on_step=step)
        # Per reading, its draws, and its steps after the first (a burn-in leads them).
        draws[share] = [int(row["llc/diag/draws"]) for row in monitor.history[:1]] + [
            int(row["llc/diag/burnin"] + row["llc/diag/draws"]) for row in monitor.history[1:]
        ]
        shares[share] = sum(spent) / (300 * 0.010)
    for share in draws:
        # The tuning reading draws MIN_STEPS (no time measured yet); the next one repays
        # the tuning's burn-in out of its share, the later ones draw a share of their own.
        first, repaying, *later = draws[share]
        assert first == MIN_STEPS and MIN_STEPS <= repaying < min(later) < 1000, draws
        # All readings, the tuning one included, took the share of the training time and
        # not more (the last reading's fork and L(w*), spread over fewer draws than the
        # reading before it, may take a few percent more).
        assert 0.9 * share < shares[share] <= 1.05 * share, shares
    # Half the share, about half the draws (each reading also forks and measures L(w*)).
    assert 0.3 < sum(draws[0.25]) / sum(draws[0.5]) < 0.6


def bowl_readings(sharpness, *, mala=False):
    """A streaming monitor reading a Bowl after each step, its sharpness set per step."""
    config = LLCConfig(
        num_chains=4, num_burnin=200, num_draws=50, nbeta=10.0, localization=10.0, mala=mala
    )
    monitor = LLCMonitor(config, every_n_steps=1, stream=True, max_overhead=None)
    model, data = Bowl(), [torch.zeros(4, 1)] * 4
    for step, value in enumerate(sharpness, start=1):
        model.sharpness = value
        monitor.maybe_estimate(step, model, mse_loss_free, data)
    return monitor


def mse_loss_free(model, batch):
    return model(batch)


def test_chains_that_become_unstable_are_flagged_and_tuned_again(recwarn):
    # Tuned at sharpness 10; at 1,000 the held step size is far past stability, so the
    # chains diverge; the next reading tunes them again, to a smaller step size.
    monitor = bowl_readings([10.0, 10.0, 1000.0, 1000.0, 1000.0])
    rows = monitor.history
    assert [row["llc/tuned"] for row in rows] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert [row["llc/healthy"] for row in rows] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert rows[2]["llc/diag/num_diverged"] > 0
    assert rows[3]["llc/step_size"] < rows[2]["llc/step_size"] / 10
    assert rows[4]["llc/step_size"] == rows[3]["llc/step_size"]
    assert any("diverged" in str(w.message) for w in recwarn)


def test_healthy_streaming_chains_are_not_flagged():
    # A Bowl of fixed sharpness: each reading (50 draws) samples the same Gaussian, and passes
    # every check, the pooled MALA acceptance and localization sensitivity too.
    monitor = bowl_readings([10.0] * 12, mala=True)
    rows = monitor.history
    assert [row["llc/tuned"] for row in rows] == [1.0] + [0.0] * 11
    assert all(row["llc/healthy"] == 1.0 for row in rows), rows
    assert all(math.isnan(row["llc/diag/rhat"]) for row in rows)
    assert all(math.isfinite(row["llc/diag/mala_acceptance"]) for row in rows[2:])


def test_a_step_size_that_the_loss_outgrows_is_flagged_and_tuned_again():
    # An MLP trained with Adam: its loss sharpens under the step size tuned at step 20, the
    # pooled MALA acceptance falls below MALA_MIN, that reading is flagged, and the next one
    # tunes the chains again from where they are, to a smaller step size, whose acceptance
    # (pooled once the readings since hold POOLED_DRAWS draws) is above MALA_MIN again.
    torch.manual_seed(0)
    x = torch.randn(2048, 8)
    y = x @ (torch.randn(8, 8) / 8**0.5) + 0.1 * torch.randn(2048, 8)
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 2048, 256)]
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU()
    )
    model.append(torch.nn.Linear(16, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    monitor = LLCMonitor(
        LLCConfig.accurate(num_draws=20), every_n_steps=20, stream=True, max_overhead=None
    )
    with pytest.warns(UserWarning, match=r"MALA acceptance is 0\.\d+ \(healthy near 0\.9\)"):
        for step in range(1, 361):
            optimizer.zero_grad()
            mse_loss(model, data[step % len(data)]).backward()
            optimizer.step()
            monitor.maybe_estimate(step, model, mse_loss, data)
    rows = monitor.history
    flagged = [i for i, row in enumerate(rows) if row["llc/healthy"] == 0.0 and i > 0]
    assert flagged, [row["llc/diag/mala_acceptance"] for row in rows]
    first = flagged[0]
    assert rows[first]["llc/diag/mala_acceptance"] < MALA_MIN
    assert [row["llc/tuned"] for row in rows[: first + 2]] == [1.0] + [0.0] * first + [1.0]
    assert rows[first + 1]["llc/step_size"] < rows[first]["llc/step_size"]
    assert rows[first + 1]["llc/diag/warm"] == 1.0  # from where the chains were
    pooled = POOLED_DRAWS // 20  # readings of 20 draws
    assert all(math.isnan(row["llc/diag/mala_acceptance"]) for row in rows[: pooled - 1])
    assert rows[first + pooled]["llc/diag/mala_acceptance"] > MALA_MIN


def test_a_resume_tunes_the_chains_again_and_says_so(caplog):
    first = LLCMonitor(STREAMED, every_n_steps=5, stream=True, max_overhead=None)
    train(first, 10)
    resumed = LLCMonitor(STREAMED, every_n_steps=5, stream=True, max_overhead=None)
    with caplog.at_level(logging.INFO, logger="llc_callbacks.monitor"):
        resumed.load_state_dict(first.state_dict())
    assert "the next reading tunes them again" in caplog.text
    train(resumed, 20, first=11)
    assert [row["step"] for row in resumed.history] == [5, 10, 15, 20]
    assert [row["llc/tuned"] for row in resumed.history] == [1.0, 0.0, 1.0, 0.0]


def test_a_checkpoint_of_snapshot_estimates_does_not_continue_a_stream():
    snapshots = LLCMonitor(STREAMED, every_n_steps=5, stream=False)
    train(snapshots, 10)
    streaming = LLCMonitor(STREAMED, every_n_steps=5, stream=True, max_overhead=None)
    with pytest.warns(UserWarning, match="stream: None in the checkpoint, True now"):
        streaming.load_state_dict(snapshots.state_dict())
    assert streaming.history == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stream": "yes"}, "stream must be True or False"),
        (
            {"stream": True, "config": LLCConfig(warm_start=False)},
            "stream=True continues each reading's chains",
        ),
        ({"stream": True, "max_overhead": 0}, "max_overhead"),
        (
            {"stream": True, "max_overhead": "fast"},
            "max_overhead must be a finite number > 0, 'auto' or None",
        ),
    ],
)
def test_bad_streaming_arguments_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLCMonitor(**kwargs)


def test_auto_is_a_share_of_the_training_time_for_a_stream_and_no_limit_for_snapshots():
    streaming = LLCMonitor()  # the default: streaming readings
    assert streaming.stream.max_overhead == STREAM_SHARE and streaming.budget is None
    snapshots = LLCMonitor(stream=False)  # snapshot estimates, every scheduled step
    assert snapshots.stream is None and snapshots.budget is None
    assert LLCMonitor(max_overhead=0.1, stream=False).budget.max_overhead == 0.1
    assert LLCMonitor(max_overhead=0.1).stream.max_overhead == 0.1


def test_restricted_llcs_stream_too():
    restrictions = Restrictions(weights={"first": "net.0.*"})
    monitor = LLCMonitor(
        STREAMED, every_n_steps=5, stream=True, max_overhead=None, restrictions=restrictions
    )
    train(monitor, 15)
    rows = monitor.history
    assert [row["llc/first/diag/warm"] for row in rows] == [0.0, 1.0, 1.0]
    # The restricted chains continue as the full ones do: the same burn-in out of the same
    # num_draws steps.
    for row in rows[1:]:
        assert row["llc/first/diag/burnin"] == row["llc/diag/burnin"] > 0
        assert row["llc/first/diag/burnin"] + row["llc/first/diag/draws"] == STREAMED.num_draws
    assert rows[2]["llc/first/diag/step_size"] == rows[0]["llc/first/diag/step_size"]
    assert all(math.isfinite(row["llc/first/mean"]) for row in rows)


def test_a_continuing_readings_advice_names_what_gives_it_more_steps():
    # Its burn-in is the stream's and its steps the share's: raising num_burnin would do
    # nothing, and num_draws only where it caps the steps.
    paced = LLCMonitor(STREAMED, every_n_steps=5, stream=True, max_overhead=0.5)
    fixed = LLCMonitor(STREAMED, every_n_steps=5, stream=True, max_overhead=None)
    for monitor in (paced, fixed):
        train(monitor, 10)
    told = {}
    for name, monitor in (("paced", paced), ("fixed", fixed)):
        result = monitor.last_result
        assert result.burnin.min() == result.config.num_burnin  # every chain burned in all
        unsettled = {**result.diagnostics, "rhat": 2.0, "climb": 0.5, "trend_z": 10.0}
        told[name] = dataclasses.replace(result, diagnostics=unsettled).problems()
    advice = "raise max_overhead (now 0.5) for more steps a reading."
    assert told["paced"]["rhat"].endswith(advice)
    assert told["paced"]["under_mixed"].endswith(advice)
    assert told["fixed"]["under_mixed"].endswith(
        "raise num_draws (now 20) for more steps a reading."
    )
    # A tuning reading's burn-in is num_burnin's: its advice names it.
    first = LLCMonitor(STREAMED, every_n_steps=5, stream=True, max_overhead=None)
    train(first, 5)
    assert first.last_result.more_steps is None
