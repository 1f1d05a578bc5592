"""Developmental stages on LLC curves (issue: developmental stages), on synthetic curves with
known boundaries and on pure noise."""

import csv
import itertools
import json
import logging

import numpy as np
import pytest
import torch
from models import BOWL_CONFIG, BOWL_TURNS, Bowl, bowl_sharpness

from llc_callbacks import LLCMonitor, cli
from llc_callbacks.history import Series
from llc_callbacks.plotting import Curves, plot_components, plot_llc_curve
from llc_callbacks.stages import CONFIRM_RUNS, StageTracker, detect_stages


def rows(values, standard_error=1.0, chains=4, prefix="llc"):
    """A history of estimates every 10 steps whose means have this standard error."""
    spread = standard_error * np.sqrt(chains)
    return [
        {
            "step": 10 * index,
            f"{prefix}/mean": float(value),
            f"{prefix}/std": spread,
            **{f"{prefix}/chain_{chain}": 0.0 for chain in range(chains)},
        }
        for index, value in enumerate(values)
    ]


def rise_fall_flat(seed: int) -> np.ndarray:
    """Rises for 15 estimates, falls for 15, then stays flat: 1.5 standard errors a step."""
    x = np.arange(45)
    truth = 1.5 * np.where(x <= 15, x, np.where(x <= 30, 30 - x, 0))
    return truth + np.random.default_rng(seed).normal(0, 1, len(x))


@pytest.mark.parametrize("seed", range(20))
def test_every_boundary_is_found_within_one_estimate(seed):
    stages = detect_stages(rows(rise_fall_flat(seed)))
    assert [stage.kind for stage in stages] == ["rising", "falling", "flat"]
    # The true turns are at estimates 15 (step 150) and 30 (step 300).
    assert abs(stages[0].end - 150) <= 10 and abs(stages[1].end - 300) <= 10
    assert stages[0].start == 0 and stages[-1].end == 440
    assert stages[1].start > stages[0].end and stages[2].start > stages[1].end


@pytest.mark.parametrize("seed", range(20))
def test_pure_noise_is_one_flat_stage(seed):
    noise = 5 + np.random.default_rng(1000 + seed).normal(0, 1, 40)
    stages = detect_stages(rows(noise))
    assert [(stage.kind, stage.start, stage.end) for stage in stages] == [("flat", 0, 390)]


def test_a_logged_run_without_per_chain_keys_reads_the_chain_count_logged_at_the_start():
    curve = rise_fall_flat(3)
    full = rows(curve, chains=16)
    logged = [{k: v for k, v in row.items() if "chain_" not in k} for row in full]
    start = {"step": 0, "llc/num_sampled": 100.0, "llc/num_chains": 16.0}
    assert detect_stages([start, *logged]) == detect_stages(full)
    # Without the count each estimate's spread would be taken for its standard error, 4x
    # too large: the stages would differ.
    assert detect_stages(logged) != detect_stages(full)


def test_a_stage_where_the_loss_stays_flat_is_flagged_and_restricted_curves_work_too():
    history = rows(rise_fall_flat(0), prefix="llc/head0")
    for row in history:
        row["train_loss"] = 1.0 if row["step"] < 150 else 0.5  # a drop, then flat
    stages = detect_stages(history, "llc", "head0", loss="train_loss")
    assert [stage.flagged for stage in stages] == [False, True, False]
    assert stages[1].loss_change == 0.0 and stages[0].loss_change == pytest.approx(-0.5)


def test_without_a_spread_the_noise_comes_from_the_curve():
    history = [
        {"step": row["step"], "llc/mean": row["llc/mean"]} for row in rows(rise_fall_flat(3))
    ]
    assert [stage.kind for stage in detect_stages(history)] == ["rising", "falling", "flat"]
    assert detect_stages(history[:2]) == []


def test_the_stages_command_prints_a_table(tmp_path, capsys):
    path = tmp_path / "metrics.csv"
    history = rows(rise_fall_flat(0))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    assert cli.main(["stages", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "start",
        "end",
        "kind",
        "LLC",
        "change",
        "loss",
        "change",
        "flagged",
    ]
    assert [line.split()[2] for line in lines[1:]] == ["rising", "falling", "flat"]


def test_short_curves_give_contiguous_stages_of_at_least_two_estimates():
    # Boundaries never leave a stage of one estimate, whatever the curve (a regression: a
    # refined boundary once did, and its line fit was singular).
    generator = np.random.default_rng(0)
    for length in range(3, 9):
        for _ in range(30):
            values = generator.normal(0, 1, length) * generator.choice([0.1, 10.0])
            history = rows(values, standard_error=0.5)
            stages = detect_stages(history)
            assert stages[0].start == 0 and stages[-1].end == 10 * (length - 1)
            for before, after in itertools.pairwise(stages):
                assert after.start == before.end + 10
            assert all(stage.end > stage.start for stage in stages)


def confirm_online(history):
    """The boundaries a StageTracker confirms as the estimates of ``history`` come in."""
    tracker = StageTracker()
    for end in range(1, len(history) + 1):
        tracker.update(history[:end], "llc", [None])
    return tracker.confirmed


@pytest.mark.parametrize("seed", range(10))
def test_online_confirmation_finds_the_boundaries_and_nothing_on_noise(seed):
    # Measured on 50 seeds (see CONFIRM_RUNS): every true boundary confirmed within 2 estimates
    # but one of the 100, which was missed; these 10 seeds confirm both.
    confirmed = confirm_online(rows(rise_fall_flat(seed)))
    assert [(b.before, b.step) for b in confirmed] == [
        ("rising", pytest.approx(150, abs=20)),
        ("falling", pytest.approx(300, abs=20)),
    ]
    assert all(b.confirmed_at - b.step >= 10 * CONFIRM_RUNS for b in confirmed)
    assert confirm_online(rows(5 + np.random.default_rng(1000 + seed).normal(0, 1, 40))) == []


def estimate_bowl(monitor, steps):
    """Estimate a Bowl after each of ``steps``, its sharpness following the step."""
    model, data = Bowl(), [torch.zeros(4, 1)] * 4
    for step in steps:
        model.sharpness = bowl_sharpness(step)
        monitor.maybe_estimate(step, model, lambda module, batch: module(batch), data)


@pytest.mark.slow
def test_the_monitor_logs_each_boundary_once_and_a_resume_neither_repeats_nor_loses_one(caplog):
    caplog.set_level(logging.INFO, logger="llc_callbacks.monitor")
    full = LLCMonitor(BOWL_CONFIG, every_n_steps=1, stream=False)
    estimate_bowl(full, range(1, 37))
    boundaries = [(b.step, b.before, b.after) for b in full.boundaries]
    assert boundaries == [(BOWL_TURNS[0], "rising", "falling"), (BOWL_TURNS[1], "falling", "flat")]
    stage_rows = [(row["step"], row["llc/stage"]) for row in full.history if "llc/stage" in row]
    assert stage_rows == [(b.confirmed_at, b.step) for b in full.boundaries]
    assert (
        sum("stage boundary at step 12 (rising, then falling)" in m for m in caplog.messages) == 1
    )

    first = LLCMonitor(BOWL_CONFIG, every_n_steps=1, stream=False)
    estimate_bowl(first, range(1, 21))  # stops between the two confirmations
    assert len(first.boundaries) == 1
    resumed = LLCMonitor(BOWL_CONFIG, every_n_steps=1, stream=False)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint
    estimate_bowl(resumed, range(21, 37))
    assert resumed.boundaries == full.boundaries
    assert [(r["step"], r["llc/stage"]) for r in resumed.history if "llc/stage" in r] == stage_rows


def test_the_components_heatmap_marks_each_components_boundaries():
    turning = rows(rise_fall_flat(1), prefix="llc/head0")
    flat = rows(5 + np.random.default_rng(7).normal(0, 1, 45), prefix="llc/head1")
    history = [{**a, **b} for a, b in zip(turning, flat, strict=True)]
    heat = plot_components(history).axes[0]
    ticks = [(line.get_xdata()[0], tuple(line.get_ydata())) for line in heat.lines]
    # head0 (row 0 to 1) turns at steps 150 and 300; head1 (row 1 to 2) never.
    assert [y for _, y in ticks] == [(0, 1), (0, 1)]
    assert ticks[0][0] == pytest.approx(150, abs=10) and ticks[1][0] == pytest.approx(300, abs=10)


def test_the_llc_curve_hatches_the_stages_where_the_loss_stays_flat():
    history = rows(rise_fall_flat(0))
    llc = Series([r["step"] for r in history], [r["llc/mean"] for r in history])
    spread = Series(llc.steps, [r["llc/std"] / 2 for r in history])  # standard error 1
    loss = Series(llc.steps, [1.0 if step < 150 else 0.5 for step in llc.steps])
    axes = plot_llc_curve(Curves(llc, spread, loss)).axes[0]
    hatches = [patch.get_hatch() for patch in axes.patches]
    assert hatches == [None, "//"]  # rising with the loss falling; falling with it flat
