"""LLCMonitor on its own, in a hand-written loop, and its schedules."""

import dataclasses
import math

import pytest
import torch
from models import DropoutBatchNormNet, classification_batches, cross_entropy

from llc_callbacks import LLCConfig, LLCMonitor, estimate_llc, log_spaced_steps
from llc_callbacks.monitor import step_seed
from llc_callbacks.schedule import Schedule

TINY = LLCConfig(num_chains=2, num_burnin=5, num_draws=5, init_loss_batches=2)


def train(monitor: LLCMonitor | None, steps: int = 12) -> torch.nn.Module:
    """SGD on the dropout and BatchNorm net, asking the monitor after every step."""
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if monitor:
        monitor.maybe_estimate(0, model, cross_entropy, data)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        cross_entropy(model, data[step % len(data)]).backward()
        optimizer.step()
        if monitor:
            monitor.maybe_estimate(step, model, cross_entropy, data)
    if monitor:
        monitor.maybe_estimate(steps, model, cross_entropy, data, final=True)
    return model


def test_a_hand_written_loop_is_undisturbed_and_estimated_on_schedule():
    monitor = LLCMonitor(TINY, every_n_steps=5, at_start=True, at_end=True)
    watched, plain = train(monitor), train(None)
    for a, b in zip(watched.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [row["step"] for row in monitor.history] == [0, 5, 10, 12]
    assert all(math.isfinite(row["llc/mean"]) for row in monitor.history)


def test_each_estimate_is_seeded_by_its_step():
    model, data = DropoutBatchNormNet(), classification_batches()
    monitor = LLCMonitor(TINY, steps=[7])
    metrics = monitor.maybe_estimate(7, model, cross_entropy, data)
    config = dataclasses.replace(TINY, seed=step_seed(TINY.seed, 7))
    assert metrics == estimate_llc(model, cross_entropy, data, config).to_metrics()
    assert monitor.last_result.config.seed == step_seed(0, 7) != step_seed(0, 8)


def test_state_dict_resumes_without_repeating_or_skipping():
    first = LLCMonitor(TINY, every_n_steps=3)
    model, data = DropoutBatchNormNet(), classification_batches()
    for step in range(1, 7):
        first.maybe_estimate(step, model, cross_entropy, data)
    resumed = LLCMonitor(TINY, every_n_steps=3)
    resumed.load_state_dict(first.state_dict())
    assert not resumed.is_due(6)  # already estimated before the checkpoint
    for step in range(6, 10):
        resumed.maybe_estimate(step, model, cross_entropy, data)
    assert [row["step"] for row in resumed.history] == [3, 6, 9]
    assert resumed.history[:2] == first.history


def test_errors_warn_and_report_nan_or_raise():
    def broken(model, batch):
        raise ValueError("bad batch")

    model, data = DropoutBatchNormNet(), classification_batches()
    monitor = LLCMonitor(TINY, steps=[1])
    with pytest.warns(UserWarning, match="at step 1 failed.*ValueError: bad batch"):
        metrics = monitor.maybe_estimate(1, model, broken, data)
    assert math.isnan(metrics["llc/mean"]) and math.isnan(metrics["llc/std"])
    assert monitor.history == [{"step": 1, **metrics}]
    with pytest.raises(ValueError, match="bad batch"):
        LLCMonitor(TINY, steps=[1], on_error="raise").maybe_estimate(1, model, broken, data)


def test_schedules():
    assert Schedule().every_n_steps == 100
    every = Schedule(every_n_steps=4)
    assert [s for s in range(13) if every.is_due(s)] == [4, 8, 12]
    explicit = Schedule(steps=[5, 0, 5, 2])
    assert explicit.steps == (0, 2, 5)
    assert [s for s in range(8) if explicit.is_due(s)] == [0, 2, 5]
    assert Schedule(every_n_steps=4, at_start=True).is_due(0)
    assert Schedule(every_n_steps=4, at_end=True).is_due(7, final=True)
    assert not Schedule(every_n_steps=4).is_due(7, final=True)
    assert log_spaced_steps(27, 4) == [1, 3, 9, 27]
    assert log_spaced_steps(1000, 30)[:4] == [1, 2, 3, 4]  # rounding merges early steps
    logged = Schedule(log_spaced=4, total_steps=27)
    assert [s for s in range(30) if logged.is_due(s)] == [1, 3, 9, 27]
    with pytest.raises(ValueError, match="log_spaced needs total_steps"):
        Schedule(log_spaced=4).is_due(1)


def test_monitor_takes_the_total_steps_later_and_keeps_it_in_its_state():
    monitor = LLCMonitor(TINY, log_spaced=3)
    monitor.set_total_steps(100)
    monitor.set_total_steps(50)  # a resumed run must not move the schedule
    assert sorted(monitor.schedule.due_steps) == [1, 10, 100]
    restored = LLCMonitor(TINY, log_spaced=3)
    restored.load_state_dict(monitor.state_dict())
    assert restored.schedule.total_steps == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": -2}, "every_n_steps must be an integer >= 1"),
        ({"steps": [1], "log_spaced": 3}, "at most one of every_n_steps, steps and log_spaced"),
        ({"steps": "10"}, "steps must be a non-empty sequence of integers >= 0"),
        ({"steps": 10}, "steps must be a sequence of integers >= 0"),
        ({"total_steps": 0}, "total_steps must be an integer >= 1"),
        ({"at_end": 1}, "at_end must be True or False"),
        ({"on_error": "skip"}, "on_error must be one of"),
        ({"distributed": "yes"}, "distributed must be one of"),
        ({"prefix": 3}, "prefix must be a non-empty string"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLCMonitor(**kwargs)
