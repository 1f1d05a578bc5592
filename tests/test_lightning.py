"""LLCCallback with real Lightning trainers, loggers and W&B (offline) on CPU."""

import csv
import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from compare import assert_same_history
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning_helpers import BowlModule, Classifier, dataset, loader, trainer
from models import BOWL_CONFIG, BOWL_TURNS, TINY, fails_in_chains, interrupted_at
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks import EssentialDynamics, Restrictions
from llc_callbacks.integrations.lightning import LLCCallback, training_step_loss
from llc_callbacks.integrations.wandb import offline_run_dir
from llc_callbacks.measures import Traces

# What each estimate logs unless extra_metrics asks for more.
DEFAULT_KEYS = {"llc/mean", "llc/std", "llc/healthy", "llc/step_size", "llc/tuned"}


def fit(tmp_path, callbacks=(), make_module=Classifier, data=None, ckpt_path=None, **kwargs):
    """Seed, build the module, and fit it; return the module and the trainer."""
    L.seed_everything(0, verbose=False)
    module = make_module()
    run = trainer(tmp_path, callbacks=list(callbacks), **kwargs)
    run.fit(module, data if data is not None else loader(), ckpt_path=ckpt_path)
    return module, run


def csv_rows(logger: CSVLogger) -> list[dict]:
    with open(f"{logger.log_dir}/metrics.csv") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize("stream", [False, True], ids=["snapshots", "stream"])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, stream):
    plain, plain_run = fit(tmp_path / "a", logger=CSVLogger(tmp_path / "a"))
    callback = LLCCallback(TINY, every_n_steps=3, at_start=True, at_end=True, stream=stream)
    watched, watched_run = fit(tmp_path / "b", [callback], logger=CSVLogger(tmp_path / "b"))
    assert [row["step"] for row in callback.monitor.history] == [0, 3, 6, 9, 12]
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), watched.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    losses = [
        [r["train_loss"] for r in csv_rows(run.logger) if r["train_loss"]]
        for run in (plain_run, watched_run)
    ]
    assert len(losses[0]) == 12
    assert losses[0] == losses[1]


def test_csv_logger_gets_the_llc_at_exactly_the_scheduled_steps(tmp_path):
    callback = LLCCallback(TINY, every_n_steps=4, extra_metrics=("chains", "diagnostics"))
    _, run = fit(tmp_path, [callback], logger=CSVLogger(tmp_path))
    rows = csv_rows(run.logger)
    llc_steps = [int(r["step"]) for r in rows if r["llc/mean"]]
    assert llc_steps == [4, 8, 12]
    # Lightning logs the loss of the weights after k optimizer steps under step k, so every
    # LLC row has a loss row at the same step (except the final weights, never trained on).
    loss_steps = {int(r["step"]) for r in rows if r["train_loss"]}
    assert loss_steps == set(range(12))
    for row in (r for r in rows if r["llc/mean"]):
        assert all(row[f"llc/{key}"] for key in ("std", "chain_0", "chain_1", "init_loss"))
        assert all(row[f"llc/diag/{key}"] for key in ("num_diverged", "rhat", "ess"))


def test_wandb_run_file_holds_the_llc_at_the_scheduled_steps(tmp_path, wandb_dir, wandb_rows):
    callback = LLCCallback(TINY, steps=[2, 5, 11], at_end=True)
    logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    fit(tmp_path, [callback], logger=logger)
    logger.experiment.finish()  # the global wandb.run may be another
    rows = wandb_rows()
    llc = [row for row in rows if "llc/mean" in row]
    assert [row["trainer/global_step"] for row in llc] == [2, 5, 11, 12]
    assert [row["llc/mean"] for row in llc] == [h["llc/mean"] for h in callback.monitor.history]
    # The default keys of an estimate, and nothing else of the LLC's.
    assert all({k for k in row if k.startswith("llc/")} == DEFAULT_KEYS for row in llc)
    loss_steps = [row["trainer/global_step"] for row in rows if "train_loss" in row]
    assert loss_steps == list(range(12))


def test_tensorboard_logger_gets_the_llc(tmp_path):
    callback = LLCCallback(TINY, every_n_steps=6)
    _, run = fit(tmp_path, [callback], logger=TensorBoardLogger(tmp_path))
    events = EventAccumulator(run.logger.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("llc/mean")] == [6, 12]
    assert [e.value for e in events.Scalars("llc/mean")] == pytest.approx(
        [h["llc/mean"] for h in callback.monitor.history]
    )


def test_gradient_accumulation_neither_repeats_nor_skips_an_estimate(tmp_path):
    callback = LLCCallback(TINY, every_n_steps=2)
    fit(tmp_path, [callback], max_steps=6, accumulate_grad_batches=3)
    assert [row["step"] for row in callback.monitor.history] == [2, 4, 6]


def test_log_spaced_schedule_spans_the_run(tmp_path):
    callback = LLCCallback(TINY, log_spaced=4)
    fit(tmp_path, [callback], max_steps=27)
    assert [row["step"] for row in callback.monitor.history] == [1, 3, 9, 27]


def test_log_spaced_needs_a_run_of_known_length(tmp_path):
    endless = {"max_steps": -1, "max_epochs": -1}
    strict = LLCCallback(TINY, log_spaced=4, on_error="raise")
    with pytest.raises(ValueError, match=r"log_spaced needs total_steps.*max_steps"):
        fit(tmp_path, [strict], **endless)
    assert strict.monitor.history == []

    class StopAtStep8(L.Callback):  # the run's length is not known in advance
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 8

    lenient = LLCCallback(TINY, log_spaced=4, strict=False)
    with pytest.warns(UserWarning, match=r"estimates are off.*log_spaced needs total_steps"):
        _, run = fit(tmp_path, [lenient, StopAtStep8()], **endless)
    assert run.global_step == 8 and lenient.monitor.history == []


def test_custom_loss_and_dataloader_are_used(tmp_path):
    calls = []

    def loss_fn(module, batch):
        calls.append(batch[0].shape[0])
        return torch.nn.functional.cross_entropy(module.net(batch[0]), batch[1])

    callback = LLCCallback(TINY, every_n_steps=6, loss_fn=loss_fn, dataloader=loader(batch_size=8))
    fit(tmp_path, [callback])
    assert calls and set(calls) == {8}
    assert len(callback.monitor.history) == 2


def test_progress_bar_follows_the_trainers_on_a_terminal(tmp_path, capsys, monkeypatch):
    fit(tmp_path, [LLCCallback(TINY, every_n_steps=12)], enable_progress_bar=True)
    assert "LLC chains" not in capsys.readouterr().err  # not a terminal: no bar in the log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    fit(tmp_path, [LLCCallback(TINY, every_n_steps=12)], enable_progress_bar=False)
    assert "LLC chains" not in capsys.readouterr().err
    fit(tmp_path, [LLCCallback(TINY, every_n_steps=12)], enable_progress_bar=True)
    assert "LLC chains" in capsys.readouterr().err


def test_mixed_precision_chains_on_the_cpu_run_in_float32(tmp_path):
    # CPU autocast is slower than float32 (LLCMonitor's CPU_AUTOCAST): chains on the CPU
    # leave it out. At step 0 the weights are the seeded initialization in both runs, so the
    # estimates are the same numbers.
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        callback = LLCCallback(TINY, steps=[0])
        fit(tmp_path, [callback], precision=precision, max_steps=1)
        results[precision] = callback.monitor.last_result
    assert results["bf16-mixed"].precision == results["32-true"].precision == "float32"
    assert results["bf16-mixed"].llc_mean == results["32-true"].llc_mean
    assert results["bf16-mixed"].llc_per_chain.tolist() == results["32-true"].llc_per_chain.tolist()


def test_batch_nbeta_counts_the_batches_of_an_accumulated_step(tmp_path):
    callback = LLCCallback(TINY, steps=[2])
    fit(tmp_path, [callback], accumulate_grad_batches=3, max_steps=2)
    assert callback.monitor.config.batches_per_step == 3
    examples = 3 * 32  # three of the loader's batches of 32 per optimizer step
    assert callback.monitor.last_result.nbeta == pytest.approx(examples / math.log(examples))
    # A loader of the user's own counts its batches as they are.
    own = LLCCallback(TINY, steps=[2], dataloader=loader(batch_size=8))
    fit(tmp_path / "own", [own], accumulate_grad_batches=3, max_steps=2)
    assert own.monitor.config.batches_per_step is None
    assert own.monitor.last_result.nbeta == pytest.approx(8 / math.log(8))


def test_bf16_true_weights_are_sampled_in_float32(tmp_path):
    callback = LLCCallback(TINY, every_n_steps=2)
    module, _ = fit(tmp_path, [callback], precision="bf16-true", max_steps=4)
    assert all(math.isfinite(row["llc/mean"]) for row in callback.monitor.history)
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())


class UnloggedClassifier(Classifier):
    """torch 2.13's dynamo cannot trace Lightning's self.log, so this one does not log."""

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])


def test_compiled_module_is_estimated_on_the_uncompiled_one(tmp_path):
    plain = LLCCallback(TINY, steps=[0, 2])
    fit(tmp_path, [plain], make_module=UnloggedClassifier, max_steps=2)
    compiled = LLCCallback(TINY, steps=[0, 2])

    def make_compiled():
        return torch.compile(UnloggedClassifier(), backend="eager")

    fit(tmp_path, [compiled], make_module=make_compiled, max_steps=2)
    assert [r["llc/mean"] for r in compiled.monitor.history] == pytest.approx(
        [r["llc/mean"] for r in plain.monitor.history]
    )


def test_resume_continues_schedule_history_and_seeds(tmp_path):
    # Lightning restores neither the global RNG nor a plain DataLoader's position (it replays a
    # batch on resume), so training itself resumes exactly only without dropout and with one
    # batch per epoch; then any difference in the estimates is the callback's.
    data = loader(shuffle=False, batch_size=256)

    def make_module():
        return Classifier(dropout=0.0)

    # Cold chains (warm_start=False): every estimate depends on its step and weights alone,
    # so a resumed run repeats an uninterrupted one exactly.
    cold = dataclasses.replace(TINY, warm_start=False)
    full = LLCCallback(cold, every_n_steps=3, at_start=True, stream=False)
    fit(tmp_path / "full", [full], make_module, data, max_steps=16)
    first = LLCCallback(cold, every_n_steps=3, at_start=True, stream=False)
    _, run = fit(tmp_path / "first", [first], make_module, data, max_steps=8)
    checkpoint = tmp_path / "eight.ckpt"
    run.save_checkpoint(checkpoint)
    resumed = LLCCallback(cold, every_n_steps=3, at_start=True, stream=False)
    fit(tmp_path / "resumed", [resumed], make_module, data, checkpoint, max_steps=16)
    assert [row["step"] for row in resumed.monitor.history] == [0, 3, 6, 9, 12, 15]
    assert_same_history(resumed.monitor.history, full.monitor.history)


def test_an_interrupt_in_an_estimate_keeps_the_steps_checkpoint_and_a_resume_continues(
    tmp_path, ctrl_c
):
    data = loader(shuffle=False, batch_size=256)  # as above: training itself resumes exactly

    def make_module():
        return Classifier(dropout=0.0)

    cold = dataclasses.replace(TINY, warm_start=False)
    found = {}
    loss = interrupted_at(training_step_loss, lambda: found["trainer"].global_step, 6)
    callback = LLCCallback(cold, every_n_steps=3, loss_fn=loss, stream=False)
    saving = ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=6, save_top_k=-1)
    L.seed_everything(0, verbose=False)
    found["trainer"] = run = trainer(
        tmp_path, callbacks=[callback, saving], enable_checkpointing=True, max_steps=12
    )
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C (inside the estimate)
        run.fit(make_module(), data)
    assert run.global_step == 6  # no step after it
    (checkpoint,) = (tmp_path / "checkpoints").glob("*step=6.ckpt")
    state = torch.load(checkpoint, weights_only=False)["callbacks"][callback.state_key]
    assert [row["step"] for row in state["history"]] == [3]  # the interrupted one left out
    resumed = LLCCallback(cold, every_n_steps=3, loss_fn=training_step_loss, stream=False)
    fit(tmp_path / "resumed", [resumed], make_module, data, checkpoint, max_steps=12)
    full = LLCCallback(cold, every_n_steps=3, loss_fn=training_step_loss, stream=False)
    fit(tmp_path / "full", [full], make_module, data, max_steps=12)
    assert [row["step"] for row in resumed.monitor.history] == [3, 6, 9, 12]
    assert_same_history(resumed.monitor.history, full.monitor.history)


def test_a_warm_started_run_resumes_with_its_step_sizes_and_cold_chains(tmp_path):
    data = loader(shuffle=False, batch_size=256)

    def make_module():
        return Classifier(dropout=0.0)

    first = LLCCallback(TINY, every_n_steps=3)
    _, run = fit(tmp_path / "first", [first], make_module, data, max_steps=6)
    assert first.monitor.last_result.warm  # step 6 started where step 3 ended
    ended = first.monitor.last_result.step_sizes
    checkpoint = tmp_path / "six.ckpt"
    run.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][first.state_key]
    # The checkpoint keeps each chain's step size, not its offsets (as large as the model).
    assert saved["step_sizes"] == {"": pytest.approx(list(ended))}
    resumed = LLCCallback(TINY, every_n_steps=3)
    fit(tmp_path / "resumed", [resumed], make_module, data, checkpoint, max_steps=9)
    (row,) = [row for row in resumed.monitor.history if row["step"] == 9]
    after = resumed.monitor.last_result
    assert not after.warm  # the chains started at w* ...
    adapted = TINY.num_burnin  # ... from the saved step sizes, adapted over a short burn-in
    assert after.burnin.tolist() == [adapted] * TINY.num_chains
    assert np.all(np.abs(np.log(after.step_sizes / ended)) <= adapted * np.log(2))
    assert math.isfinite(row["llc/mean"])


def test_a_callback_fitted_again_starts_a_new_history_and_checkpoints_only_it(tmp_path):
    callback = LLCCallback(TINY, every_n_steps=4)
    fit(tmp_path / "a", [callback], max_steps=8)
    first_history = callback.monitor.history
    with pytest.warns(UserWarning, match="LLCCallback ran before, so its LLC history"):
        _, second = fit(tmp_path / "b", [callback], logger=CSVLogger(tmp_path / "b"))
    assert [row["step"] for row in first_history] == [4, 8]  # kept on the first run's monitor
    # The second fit logs its own estimates, those of a callback of its own.
    alone = LLCCallback(TINY, every_n_steps=4)
    fit(tmp_path / "alone", [alone], logger=CSVLogger(tmp_path / "alone"))
    assert [row["step"] for row in callback.monitor.history] == [4, 8, 12]
    assert_same_history(callback.monitor.history, alone.monitor.history)
    logged = [int(r["step"]) for r in csv_rows(second.logger) if r.get("llc/mean")]
    assert logged == [4, 8, 12]
    second.save_checkpoint(tmp_path / "second.ckpt")
    saved = torch.load(tmp_path / "second.ckpt", weights_only=False)["callbacks"]
    assert_same_history(saved[callback.state_key]["history"], callback.monitor.history)


def test_a_schedule_that_cannot_fire_in_the_run_is_said_when_training_starts(tmp_path):
    callback = LLCCallback(TINY, every_n_steps=1000)
    with pytest.warns(UserWarning, match="every_n_steps=1000 .* 12 optimizer steps: no LLC"):
        fit(tmp_path, [callback])
    assert callback.monitor.history == []


def test_two_differently_configured_callbacks_keep_separate_state(tmp_path):
    a = LLCCallback(TINY, every_n_steps=4)
    b = LLCCallback(TINY, every_n_steps=6, prefix="llc_b")
    _, run = fit(tmp_path, [a, b])
    checkpoint = tmp_path / "two.ckpt"
    run.save_checkpoint(checkpoint)
    states = torch.load(checkpoint, weights_only=False)["callbacks"]
    assert states[a.state_key]["last_step"] == 12 and len(states[a.state_key]["history"]) == 3
    assert states[b.state_key]["last_step"] == 12 and len(states[b.state_key]["history"]) == 2
    assert "llc_b/mean" in states[b.state_key]["history"][0]


def test_a_failing_estimate_warns_logs_nan_and_training_goes_on(tmp_path):
    broken = fails_in_chains(training_step_loss)
    callback = LLCCallback(TINY, every_n_steps=4, loss_fn=broken)
    with pytest.warns(UserWarning, match="estimate at step 4 failed.*RuntimeError: boom"):
        _, run = fit(tmp_path, [callback], logger=CSVLogger(tmp_path))
    assert run.global_step == 12
    rows = [r for r in csv_rows(run.logger) if r["llc/mean"]]
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    assert all(math.isnan(float(r["llc/mean"])) for r in rows)


def test_on_error_raise_stops_training(tmp_path):
    broken = fails_in_chains(training_step_loss)
    callback = LLCCallback(TINY, every_n_steps=4, loss_fn=broken, on_error="raise")
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, [callback])
    assert callback.monitor.history == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"every_n_steps": 5, "steps": [1]}, "at most one of every_n_steps, steps and log_spaced"),
        ({"steps": [3, -1]}, "steps must be a non-empty sequence of integers >= 0"),
        ({"log_spaced": 1}, "log_spaced must be an integer >= 2"),
        ({"at_start": "yes"}, "at_start must be True or False"),
        ({"on_error": "ignore"}, "on_error must be one of 'warn', 'raise'"),
        ({"prefix": ""}, "prefix must be one or more parts"),
        ({"prefix": "llc//x"}, "prefix must be one or more parts"),
        ({"strict": None}, "strict must be True or False"),
        ({"extra_metrics": ["diag"]}, "extra_metrics must be one of"),
        ({"loss_fn": "mse"}, "loss_fn must be callable"),
        ({"dataloader": 3}, "dataloader must be an iterable of batches"),
        ({"config": {"num_chains": 2}}, "config must be an LLCConfig"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLCCallback(**kwargs)


class _CPUFSDPStrategy(FSDPStrategy):
    """FSDP that Lightning lets a CPU trainer hold (it refuses the plain one before setup)."""


def test_fsdp_and_deepspeed_are_refused_in_setup(tmp_path):
    callback = LLCCallback(TINY)
    run = L.Trainer(accelerator="cpu", devices=1, strategy=_CPUFSDPStrategy(), logger=False)
    with pytest.raises(ValueError, match="does not support the _CPUFSDPStrategy"):
        callback.setup(run, Classifier(), "fit")
    run.strategy.__class__ = type("DeepSpeedStrategy", (DeepSpeedStrategy,), {})
    with pytest.raises(ValueError, match="does not support the DeepSpeedStrategy"):
        callback.setup(run, Classifier(), "fit")


class ManualClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization_needs_a_loss_fn(tmp_path):
    with pytest.raises(ValueError, match=r"needs loss_fn=\.\.\. with manual optimization"):
        fit(tmp_path, [LLCCallback(TINY)], make_module=ManualClassifier)

    def loss_fn(module, batch):
        return torch.nn.functional.cross_entropy(module.net(batch[0]), batch[1])

    callback = LLCCallback(TINY, every_n_steps=6, loss_fn=loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [callback], make_module=ManualClassifier)
    assert not [w for w in caught if "failed" in str(w.message)]
    assert [r["step"] for r in callback.monitor.history] == [6, 12]


def test_the_loss_comes_from_training_step_without_logging(tmp_path):
    _, plain = fit(tmp_path / "plain", logger=CSVLogger(tmp_path / "plain"), max_steps=3)
    callback = LLCCallback(TINY, every_n_steps=1)
    _, watched = fit(tmp_path / "watched", [callback], logger=CSVLogger(tmp_path), max_steps=3)
    # After each step the chains called training_step, and so self.log("train_loss"), 22
    # times; the logger holds only the real training losses, and the LLC rows no loss.
    losses = [
        [(r["step"], r["train_loss"]) for r in csv_rows(run.logger) if r["train_loss"]]
        for run in (plain, watched)
    ]
    assert losses[0] == losses[1]
    assert all(not r["train_loss"] for r in csv_rows(watched.logger) if r["llc/mean"])
    assert all(row["llc/init_loss"] > 0 for row in callback.monitor.history)


@pytest.mark.parametrize("deprecated", [False, True])
def test_trace_plots_go_to_wandb_as_images(tmp_path, wandb_dir, wandb_rows, deprecated):
    if deprecated:  # log_trace_plot=True, for one release
        with pytest.warns(FutureWarning, match=r"pass measures=\[Traces\(\)\]"):
            callback = LLCCallback(TINY, steps=[4, 8], log_trace_plot=True)
    else:
        callback = LLCCallback(TINY, steps=[4, 8], measures=[Traces()])
    logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    fit(tmp_path, [callback], logger=logger)
    logger.experiment.finish()  # the global wandb.run may be another
    rows = wandb_rows()
    images = [row for row in rows if "llc/trace/_type" in row]
    assert [row["trainer/global_step"] for row in images] == [4, 8]
    assert all(row["llc/trace/_type"] == "images/separated" for row in images)
    assert all((row["llc/trace/width"], row["llc/trace/height"]) == (800, 450) for row in images)


@pytest.mark.slow
def test_stage_boundaries_reach_csv_and_wandb_once_each_across_a_resume(
    tmp_path, wandb_dir, wandb_rows
):
    data = DataLoader(TensorDataset(torch.zeros(16, 1)), batch_size=4)
    first = LLCCallback(BOWL_CONFIG, every_n_steps=1, stream=False)
    first_csv = CSVLogger(tmp_path / "first")
    _, run = fit(tmp_path, [first], BowlModule, data, max_steps=20, logger=first_csv)
    checkpoint = tmp_path / "twenty.ckpt"
    run.save_checkpoint(checkpoint)
    resumed = LLCCallback(BOWL_CONFIG, every_n_steps=1, stream=False)
    resumed_csv = CSVLogger(tmp_path / "resumed")
    wandb_logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    fit(
        tmp_path,
        [resumed],
        BowlModule,
        data,
        checkpoint,
        max_steps=36,
        logger=[resumed_csv, wandb_logger],
    )
    wandb_logger.experiment.finish()

    assert [b.step for b in resumed.monitor.boundaries] == list(BOWL_TURNS)
    first_rule, second_rule = resumed.monitor.boundaries
    logged = [
        (int(row["step"]), float(row["llc/stage"]))
        for rows in (csv_rows(first_csv), csv_rows(resumed_csv))
        for row in rows
        if row.get("llc/stage")
    ]
    assert logged == [(b.confirmed_at, b.step) for b in resumed.monitor.boundaries]
    rows = wandb_rows()
    stages = [(row["trainer/global_step"], row["llc/stage"]) for row in rows if "llc/stage" in row]
    assert stages == [(second_rule.confirmed_at, second_rule.step)]  # this run's only
    tables = [row for row in rows if "llc/stages/_type" in row]
    assert [row["trainer/global_step"] for row in tables] == [second_rule.confirmed_at]
    table = json.loads(
        (offline_run_dir(wandb_dir) / "files" / tables[0]["llc/stages/path"]).read_text()
    )
    assert table["columns"] == ["curve", "step", "before", "after", "confirmed_at"]
    assert table["data"] == [
        ["full", b.step, b.before, b.after, b.confirmed_at] for b in (first_rule, second_rule)
    ]


def test_essential_dynamics_are_recorded_saved_and_drawn_and_training_is_untouched(
    tmp_path, wandb_dir, wandb_rows
):
    plain, _ = fit(tmp_path / "plain")
    probe = DataLoader(dataset(64), batch_size=32)
    dynamics = EssentialDynamics(probe, every_n_steps=2, at_start=True)
    callback = LLCCallback(TINY, steps=[6, 12], dynamics=dynamics)
    logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    watched, run = fit(tmp_path / "watched", [callback], logger=logger)
    logger.experiment.finish()
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), watched.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name  # dropout's RNG too: recording draws none of it
    assert dynamics.steps == [0, 2, 4, 6, 8, 10, 12]
    # The default outputs: each probe example's loss, through training_step.
    module = Classifier(dropout=0.0)
    module.load_state_dict(watched.state_dict())
    x, y = dataset(64).tensors
    losses = torch.nn.functional.cross_entropy(module.eval().net(x), y, reduction="none")
    np.testing.assert_allclose(dynamics.vectors[-1], losses.detach().numpy(), rtol=1e-5)
    saved = np.load(Path(run.log_dir) / "essential_dynamics.npz")
    assert saved["steps"].tolist() == dynamics.steps
    figures = [row for row in wandb_rows() if "llc/essential_dynamics/_type" in row]
    assert [row["trainer/global_step"] for row in figures] == [12]


def test_essential_dynamics_resume_from_a_checkpoint(tmp_path):
    data = loader(shuffle=False, batch_size=256)
    probe = DataLoader(dataset(64), batch_size=32)

    def make_module():
        return Classifier(dropout=0.0)

    def callback():
        return LLCCallback(TINY, steps=[12], dynamics=EssentialDynamics(probe, every_n_steps=3))

    full = callback()
    fit(tmp_path / "full", [full], make_module, data, max_steps=12)
    first = callback()
    _, run = fit(tmp_path / "first", [first], make_module, data, max_steps=6)
    checkpoint = tmp_path / "six.ckpt"
    run.save_checkpoint(checkpoint)
    resumed = callback()
    fit(tmp_path / "resumed", [resumed], make_module, data, checkpoint, max_steps=12)
    assert resumed.dynamics.steps == full.dynamics.steps == [3, 6, 9, 12]
    np.testing.assert_allclose(resumed.dynamics.vectors, full.dynamics.vectors, rtol=1e-5)


def test_observables_reach_csv_wandb_and_files_and_training_is_untouched(
    tmp_path, wandb_dir, wandb_rows
):
    plain, _ = fit(tmp_path / "plain")
    probes = {
        "train": DataLoader(torch.utils.data.Subset(dataset(), range(12)), batch_size=12),
        "query": DataLoader(torch.utils.data.Subset(dataset(), range(12, 18)), batch_size=6),
    }
    config = dataclasses.replace(TINY, observe_every=1)
    callback = LLCCallback(
        config,
        steps=[4, 8],
        observables=probes,
        restrictions=Restrictions(weights={"first": "net.net.0.*"}),
        susceptibility_base="train",
    )
    csv_logger = CSVLogger(tmp_path / "watched")
    wandb_logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    watched, _ = fit(tmp_path / "watched", [callback], logger=[csv_logger, wandb_logger])
    wandb_logger.experiment.finish()
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), watched.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    rows = csv_rows(csv_logger)
    for pair in ("train:train", "train:query", "query:query"):
        logged = [
            (int(r["step"]), float(r[f"llc/kernel/{pair}"]))
            for r in rows
            if r.get(f"llc/kernel/{pair}")
        ]
        assert [step for step, _ in logged] == [4, 8]
        assert all(-1 <= value <= 1 for _, value in logged)  # mean correlations
    tables = [row for row in wandb_rows() if "llc/influence/_type" in row]
    assert [row["trainer/global_step"] for row in tables] == [4, 8]
    table = json.loads(
        (offline_run_dir(wandb_dir) / "files" / tables[-1]["llc/influence/path"]).read_text()
    )
    assert table["columns"] == ["step", "source", "target", "rank", "example", "influence"]
    # Top 5 per ordered pair of the 2 observables: 4 pairs.
    assert len(table["data"]) == 20 and {row[0] for row in table["data"]} == {8}
    saved = np.load(Path(csv_logger.log_dir) / "observables" / "step_8.npz")
    draws = int(callback.monitor.history[-1]["llc/diag/draws"])  # a draw, a record
    assert 0 < draws <= TINY.num_draws
    assert saved["train"].shape == (TINY.num_chains, draws, 12)
    assert saved["query"].shape == (TINY.num_chains, draws, 6)
    assert saved["first/query"].shape == (TINY.num_chains, draws, 6)  # the component's
    for key in ("llc/susceptibility/query", "llc/first/susceptibility/query"):
        logged = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        assert [step for step, _ in logged] == [4, 8] and all(np.isfinite(v) for _, v in logged)
    tables = [row for row in wandb_rows() if "llc/susceptibility/_type" in row]
    assert [row["trainer/global_step"] for row in tables] == [4, 8]
    table = json.loads(
        (offline_run_dir(wandb_dir) / "files" / tables[-1]["llc/susceptibility/path"]).read_text()
    )
    assert table["columns"] == ["step", "component", "source", "susceptibility", "stderr"]
    assert [row[:3] for row in table["data"]] == [[8, "full", "query"], [8, "first", "query"]]
    figures = {
        name: [row["trainer/global_step"] for row in wandb_rows() if f"llc/{name}/_type" in row]
        for name in ("loss_kernel", "susceptibilities")
    }
    assert figures == {"loss_kernel": [4, 8], "susceptibilities": [12]}
