"""LLCMonitor on its own, in a hand-written loop, and its schedules."""

import dataclasses
import math
import warnings

import pytest
import torch
from models import TINY, DropoutBatchNormNet, classification_batches, cross_entropy

from llc_callbacks import LLCMonitor, Restrictions, estimate_llc, log_spaced_steps
from llc_callbacks.integrations.common import TrainerMonitor
from llc_callbacks.monitor import step_seed
from llc_callbacks.schedule import Schedule


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
    monitor = LLCMonitor(TINY, steps=[7], stream=False)
    metrics = monitor.maybe_estimate(7, model, cross_entropy, data)
    config = dataclasses.replace(TINY, seed=step_seed(TINY.seed, 7))
    every = estimate_llc(model, cross_entropy, data, config).to_metrics()
    assert monitor.history == [{"step": 7, **every}]  # the history keeps every metric
    assert metrics == {key: every[key] for key in ("llc/mean", "llc/std", "llc/healthy")}
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


def test_a_monitor_that_followed_another_loop_raises_naming_the_fix():
    monitor = LLCMonitor(TINY, every_n_steps=5)
    train(monitor)
    first = [dict(row) for row in monitor.history]
    with pytest.raises(
        ValueError,
        match=r"step 0 comes before .* last estimate, at step 10.* one LLCMonitor per run",
    ):
        train(monitor)  # a second loop counts from step 0 again
    assert monitor.history == first  # nothing of the second run was written into the first's


@pytest.mark.parametrize(
    ("schedule", "said"),
    [
        ({"every_n_steps": 1000}, "every_n_steps=1000 is more than the run's 150 optimizer"),
        ({"steps": [200, 300]}, r"steps \[200, 300\] come after .*: no LLC estimate runs"),
        ({"steps": [100, 300]}, r"steps \[300\] come after .*: those estimates do not run"),
        ({"steps": [200], "at_end": True}, r"steps \[200\] .*: those estimates do not run"),
    ],
)
def test_a_schedule_beyond_the_run_is_said_when_its_length_is_known(schedule, said):
    monitor = LLCMonitor(TINY, **schedule)
    with pytest.warns(UserWarning, match=said):
        monitor.set_total_steps(150)
    # The advice, followed: scheduled within the run, nothing is said.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LLCMonitor(TINY, every_n_steps=100, at_end=True).set_total_steps(150)
        LLCMonitor(TINY, steps=[100, 150]).set_total_steps(150)
        LLCMonitor(TINY, at_end=True).set_total_steps(50)  # every 100 steps is the default


def test_errors_warn_and_report_nan_or_raise():
    def broken(model, batch):
        raise ValueError("bad batch")

    model, data = DropoutBatchNormNet(), classification_batches()
    monitor = LLCMonitor(TINY, steps=[1])
    with pytest.warns(UserWarning, match="at step 1 failed.*ValueError: bad batch"):
        metrics = monitor.estimate(1, model, broken, data)
    assert metrics.keys() == {"llc/mean", "llc/std", "llc/healthy", "llc/step_size", "llc/tuned"}
    assert math.isnan(metrics["llc/mean"]) and math.isnan(metrics["llc/std"])
    assert metrics["llc/healthy"] == 0.0
    assert monitor.history == [{"step": 1, **metrics}]
    with pytest.raises(ValueError, match="bad batch"):
        LLCMonitor(TINY, steps=[1], on_error="raise").estimate(1, model, broken, data)


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
    with pytest.raises(ValueError, match="log_spaced needs total_steps"):
        LLCMonitor(TINY, log_spaced=3)  # a hand-written loop must say how long it runs
    monitor = TrainerMonitor(TINY, log_spaced=3)  # an adapter fills it in from its trainer
    monitor.set_total_steps(100)
    monitor.set_total_steps(50)  # a resumed run must not move the schedule
    assert sorted(monitor.schedule.due_steps) == [1, 10, 100]
    restored = TrainerMonitor(TINY, log_spaced=3)
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
        ({"prefix": 3}, "prefix must be one or more parts"),
        ({"prefix": ""}, "prefix must be one or more parts"),
        ({"prefix": "llc/"}, r"joined by single '/' .*got 'llc/'"),
        ({"prefix": "a//b"}, "prefix must be one or more parts"),
        ({"prefix": "my llc"}, "prefix must be one or more parts"),
        ({"strict": 0}, "strict must be True or False"),
        ({"extra_metrics": "chains"}, "extra_metrics must be a sequence of names"),
        ({"extra_metrics": ["chains", "traces"]}, "extra_metrics must be one of"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLCMonitor(**kwargs)


def non_scalar_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


MISTAKES = {
    "non_scalar_loss": ({"loss_fn": non_scalar_loss}, "must return a scalar tensor"),
    "empty_data": ({"data": []}, "data: data yielded no batches"),
    "pattern": (
        {"restrictions": Restrictions(weights={"first": "nothing.*"})},
        "pattern 'nothing.*' matches no sampled parameter",
    ),
    "batches_of_one": (
        {"data": classification_batches(batch_size=1)},
        "nbeta='batch' needs a sampling batch size of at least 2",
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_raise_at_the_first_call_or_warn_when_asked(mistake):
    changes, message = MISTAKES[mistake]
    model = DropoutBatchNormNet()
    inputs = {"loss_fn": cross_entropy, "data": classification_batches(), **changes}
    restrictions = inputs.pop("restrictions", None)

    for raising in ({}, {"strict": False, "on_error": "raise"}):  # the default raises
        monitor = LLCMonitor(TINY, steps=[5], restrictions=restrictions, **raising)
        with pytest.raises(ValueError, match=message) as raised:
            monitor.maybe_estimate(0, model, inputs["loss_fn"], inputs["data"])
        assert any("pass strict=False to warn instead" in note for note in raised.value.__notes__)
        assert monitor.history == []

    lenient = LLCMonitor(TINY, every_n_steps=1, restrictions=restrictions, strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            lenient.maybe_estimate(step, model, inputs["loss_fn"], inputs["data"])
    (warning,) = [str(w.message) for w in caught if "the check before" in str(w.message)]
    assert message.split("(")[0] in warning
    if restrictions is None:
        assert "LLC estimates are off for this run" in warning
        assert not lenient.enabled and lenient.history == []
    else:  # the restriction alone is left out; the full LLC goes on
        assert "restriction 'first' failed the check before training and is left out" in warning
        assert [row["step"] for row in lenient.history] == [1, 2]
        assert all(math.isfinite(row["llc/mean"]) for row in lenient.history)
        assert not any(key.startswith("llc/first/") for key in lenient.history[-1])


def test_a_restriction_that_fails_the_check_is_left_out_and_the_others_go_on():
    model, data = DropoutBatchNormNet(), classification_batches()
    restrictions = Restrictions(
        weights={"good": "net.0.*", "missing": "nothing.*"},
        sources={"empty": [], "fine": classification_batches(seed=1)},
        combinations=[("missing", "fine"), ("good", "empty"), ("good", "fine")],
    )
    monitor = LLCMonitor(TINY, steps=[1], restrictions=restrictions, strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = monitor.start(model, cross_entropy, data)
        metrics = monitor.maybe_estimate(1, model, cross_entropy, data)
    left_out = sorted(m for m in map(str, (w.message for w in caught)) if "left out" in m)
    assert len(left_out) == 2
    assert "restriction 'empty'" in left_out[0] and "yielded no batches" in left_out[0]
    assert "restriction 'missing'" in left_out[1] and "matches no sampled" in left_out[1]
    assert set(started) == {"llc/num_sampled", "llc/num_chains", "llc/good/num_sampled"}
    assert {key.rsplit("/", 1)[0] for key in metrics} == {
        "llc",
        "llc/good",
        "llc/fine",
        "llc/good/fine",
    }
    assert all(math.isfinite(value) for value in metrics.values())


def test_the_start_reports_how_many_weights_each_estimate_samples():
    model = DropoutBatchNormNet()
    restrictions = Restrictions(weights={"first": "net.0.*", "last": "net.4.weight"})
    monitor = LLCMonitor(TINY, restrictions=restrictions)
    metrics = monitor.start(model, cross_entropy, classification_batches())
    assert metrics == {
        "llc/num_sampled": sum(p.numel() for p in model.parameters()),
        "llc/num_chains": TINY.num_chains,
        "llc/first/num_sampled": 6 * 16 + 16,
        "llc/last/num_sampled": 16 * 3,
    }


class RaisesOnSecondPass:
    """A data source whose first batch is fine and whose second pass raises."""

    def __init__(self) -> None:
        self.batches = classification_batches(samples=128)
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if self.passes > 1:
            raise OSError("the source went away")
        return iter(self.batches)


def test_a_failing_restriction_fails_alone():
    model, data = DropoutBatchNormNet(), classification_batches()
    restrictions = Restrictions(
        weights={"good": "net.0.*", "missing": "nothing.*"},
        sources={"flaky": RaisesOnSecondPass(), "fine": classification_batches(seed=1)},
        combinations=[("missing", "fine"), ("good", "fine")],
    )
    monitor = LLCMonitor(TINY, every_n_steps=1, restrictions=restrictions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = monitor.estimate(1, model, cross_entropy, data)
    for name in ("llc", "llc/good", "llc/fine", "llc/good/fine"):
        assert math.isfinite(metrics[f"{name}/mean"]), name
    for name in ("llc/missing", "llc/flaky", "llc/missing/fine"):
        assert math.isnan(metrics[f"{name}/mean"]), name
    failures = [str(w.message) for w in caught if "estimate failed" in str(w.message)]
    assert len(failures) == 3
    assert any("OSError: the source went away" in message for message in failures)
    assert any("'nothing.*' matches no sampled parameter" in message for message in failures)
    strict = LLCMonitor(TINY, every_n_steps=1, restrictions=restrictions, on_error="raise")
    with pytest.raises(ValueError, match="matches no sampled parameter"):
        strict.estimate(1, model, cross_entropy, data)


def test_trainers_mixed_precision_is_followed_on_cuda_only(caplog):
    on_cuda = LLCMonitor(TINY)
    on_cuda.follow_precision("bfloat16", "cuda")  # a device type, no GPU needed
    assert on_cuda.config.autocast == "bfloat16"
    on_cpu = LLCMonitor(TINY)
    with caplog.at_level("INFO", logger="llc_callbacks.monitor"):
        on_cpu.follow_precision("float16", "cpu")
    assert on_cpu.config.autocast is None
    assert "float16 autocast; the chains run in float32 on cpu" in caplog.text
    explicit = LLCMonitor(dataclasses.replace(TINY, autocast="float16"))
    explicit.follow_precision("bfloat16", "cuda")
    assert explicit.config.autocast == "float16"


def test_explicit_autocast_on_the_cpu_warns_once_with_the_measured_factor():
    model, data = DropoutBatchNormNet(), classification_batches()
    monitor = LLCMonitor(dataclasses.replace(TINY, autocast="bfloat16"), every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            monitor.maybe_estimate(step, model, cross_entropy, data)
    said = [str(w.message) for w in caught if "autocast='bfloat16'" in str(w.message)]
    assert len(said) == 1
    assert "chains on the CPU" in said[0] and "4.6x as long as one in float32" in said[0]
    assert monitor.last_result.precision == "bfloat16-mixed"  # warned, not overridden
    plain = LLCMonitor(TINY, every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain.maybe_estimate(1, model, cross_entropy, data)
    assert not [w for w in caught if "autocast" in str(w.message)]


def test_batches_per_step_follows_the_trainer_unless_the_config_sets_it():
    followed = LLCMonitor(TINY)
    followed.follow_batches_per_step(4)
    assert followed.config.batches_per_step == 4
    explicit = LLCMonitor(dataclasses.replace(TINY, batches_per_step=1))
    explicit.follow_batches_per_step(4)
    assert explicit.config.batches_per_step == 1
    with pytest.raises(ValueError, match=r"^batches_per_step must be an integer >= 1, got 0"):
        followed.follow_batches_per_step(0)
