"""Training reaches its end whatever the estimates and figures do, and mistakes surface at
step 0: real Lightning and transformers runs, W&B offline, matplotlib made unimportable."""

import csv
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
from hf_helpers import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning_helpers import Classifier, loader, trainer
from models import TINY, classification_batches, fails_in_chains

from llc_callbacks import LLCConfig, Restrictions
from llc_callbacks.integrations.huggingface import LLCTrainerCallback
from llc_callbacks.integrations.lightning import LLCCallback, training_step_loss
from llc_callbacks.measures import Traces

FIRST_LAYER = Restrictions(weights={"first": "net.net.0.*"})


def fit(tmp_path, callback, **kwargs) -> L.Trainer:
    """Fit the classifier for 12 steps with a checkpoint at the end; return the trainer."""
    L.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    options = {"enable_checkpointing": True, "callbacks": [callback, checkpoints], **kwargs}
    run = trainer(tmp_path, **options)
    run.fit(Classifier(), loader())
    return run


def llc_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "llc_callbacks" in str(w.message)]


def without_matplotlib(monkeypatch) -> None:
    """Make every import of matplotlib fail, as on an install without the plot extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_lightning_reaches_its_end_when_every_estimate_fails(tmp_path, wandb_dir, wandb_rows):
    broken = fails_in_chains(training_step_loss)
    callback = LLCCallback(TINY, every_n_steps=4, loss_fn=broken, restrictions=FIRST_LAYER)
    logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    with pytest.warns(UserWarning, match="estimate at step 4 failed"):
        run = fit(tmp_path, callback, logger=logger)
    logger.experiment.finish()
    assert run.global_step == 12
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    rows = wandb_rows()
    llc = [(row["trainer/global_step"], row["llc/mean"]) for row in rows if "llc/mean" in row]
    assert [step for step, _ in llc] == [4, 8, 12]
    assert all(math.isnan(value) for _, value in llc)
    assert not [row for row in rows if "llc/components/_type" in row]  # nothing to draw


def test_transformers_reaches_its_end_when_every_estimate_fails(tmp_path):
    broken = fails_in_chains(lambda model, batch: model(**batch).loss)
    hf = make_trainer(tmp_path, save_strategy="steps", save_steps=12)
    restrictions = Restrictions(weights={"embeddings": "transformer.w*e.*"})
    hf.add_callback(
        LLCTrainerCallback(TINY, every_n_steps=4, loss_fn=broken, restrictions=restrictions)
    )
    with pytest.warns(UserWarning, match="estimate at step 4 failed"):
        hf.train()
    assert hf.state.global_step == 12
    assert (tmp_path / "checkpoint-12").is_dir()
    llc = [row["llc/mean"] for row in hf.state.log_history if "llc/mean" in row]
    assert len(llc) == 3 and all(math.isnan(value) for value in llc)


def test_without_matplotlib_figures_are_one_warning_in_lightning(
    tmp_path, wandb_dir, monkeypatch, wandb_rows
):
    without_matplotlib(monkeypatch)
    callback = LLCCallback(TINY, every_n_steps=4, measures=[Traces()], restrictions=FIRST_LAYER)
    logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = fit(tmp_path, callback, logger=logger)
    logger.experiment.finish()
    assert run.global_step == 12
    (warning,) = [m for m in llc_warnings(caught) if "matplotlib" in m]
    assert "pip install 'llc-callbacks[plot]'" in warning
    rows = wandb_rows()
    assert [row["trainer/global_step"] for row in rows if "llc/mean" in row] == [4, 8, 12]


@pytest.mark.parametrize("report_to", ["none", "wandb"])
def test_without_matplotlib_figures_are_built_only_for_a_receiver(
    tmp_path, wandb_dir, monkeypatch, report_to
):
    without_matplotlib(monkeypatch)
    hf = make_trainer(tmp_path, report_to=report_to)
    restrictions = Restrictions(weights={"embeddings": "transformer.w*e.*"})
    hf.add_callback(
        LLCTrainerCallback(TINY, every_n_steps=4, measures=[Traces()], restrictions=restrictions)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.train()
    assert hf.state.global_step == 12
    about_matplotlib = [m for m in llc_warnings(caught) if "matplotlib" in m]
    # Without W&B nothing receives a figure, so none is built and nothing is missing.
    assert len(about_matplotlib) == (1 if report_to == "wandb" else 0)


class FailsOnSecondPass:
    """A data source whose first pass (the check at the start) works and whose next raises."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if self.passes > 1:
            raise OSError("the source went away")
        return iter(classification_batches(samples=128, batch_size=32))


def test_a_failing_restriction_fails_alone_in_lightning(tmp_path):
    restrictions = Restrictions(
        weights={"first": "net.net.0.*"}, sources={"flaky": FailsOnSecondPass()}
    )
    callback = LLCCallback(TINY, every_n_steps=6, restrictions=restrictions)
    with pytest.warns(UserWarning, match="restricted LLC 'flaky'.*OSError: the source went away"):
        run = fit(tmp_path, callback, logger=CSVLogger(tmp_path))
    with open(Path(run.logger.log_dir) / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["llc/mean"]]
    assert [int(row["step"]) for row in rows] == [6, 12]
    for row in rows:
        assert math.isfinite(float(row["llc/mean"])) and math.isfinite(float(row["llc/first/mean"]))
        assert math.isnan(float(row["llc/flaky/mean"]))


def test_each_trainer_logs_once_how_many_weights_are_sampled(tmp_path):
    class Frozen(Classifier):  # only the last layer trains, as with an adapter
        def __init__(self) -> None:
            super().__init__()
            self.net.net[:2].requires_grad_(False)

    L.seed_everything(0, verbose=False)
    run = trainer(
        tmp_path, callbacks=[LLCCallback(TINY, every_n_steps=6)], logger=CSVLogger(tmp_path)
    )
    run.fit(Frozen(), loader())
    with open(Path(run.logger.log_dir) / "metrics.csv") as file:
        counts = [
            (r["step"], r["llc/num_sampled"]) for r in csv.DictReader(file) if r["llc/num_sampled"]
        ]
    assert counts == [("0", str(float(16 * 3 + 3)))]

    hf = make_trainer(tmp_path / "hf")
    for name, parameter in hf.model.named_parameters():
        parameter.requires_grad_(name.startswith("transformer.h.1.mlp"))
    hf.add_callback(LLCTrainerCallback(TINY, every_n_steps=6))
    hf.train()
    logged = [
        (row["step"], row["llc/num_sampled"])
        for row in hf.state.log_history
        if "llc/num_sampled" in row
    ]
    sampled = sum(p.numel() for p in hf.model.parameters() if p.requires_grad)
    assert logged == [(0, sampled)]


class WarnsEveryCall(Classifier):
    def forward_warning(self) -> None:
        warnings.warn("a notice that repeats on every forward pass", UserWarning, stacklevel=1)

    def training_step(self, batch, batch_idx):
        if not self.training:  # the chains run in eval mode
            self.forward_warning()
        return super().training_step(batch, batch_idx)


def test_a_warning_that_repeats_in_every_estimate_is_shown_once(tmp_path):
    L.seed_everything(0, verbose=False)
    run = trainer(tmp_path, callbacks=[LLCCallback(TINY, every_n_steps=3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(WarnsEveryCall(), loader())
    repeated = [w for w in caught if "repeats on every forward pass" in str(w.message)]
    assert len(repeated) == 1


def test_a_resume_with_another_config_warns_that_the_history_starts_anew(tmp_path):
    first = LLCCallback(TINY, every_n_steps=3)
    run = fit(tmp_path / "first", first, max_steps=6)
    checkpoint = tmp_path / "six.ckpt"
    run.save_checkpoint(checkpoint)
    other = LLCCallback(LLCConfig(num_chains=3, num_burnin=5, num_draws=5), every_n_steps=3)
    L.seed_everything(0, verbose=False)
    resumed = trainer(tmp_path / "resumed", callbacks=[other])
    changed = r"saved with other settings \(.*config\.num_chains: 2 in the checkpoint, 3 now\)"
    with pytest.warns(UserWarning, match=changed + ".*starts a new LLC history"):
        resumed.fit(Classifier(), loader(), ckpt_path=checkpoint)
    assert [row["step"] for row in other.monitor.history] == [6, 9, 12]
    # The new history's first estimate carries the marker that plots draw it apart by.
    assert [row.get("llc/restart") for row in other.monitor.history] == [1.0, None, None]

    renamed = LLCCallback(TINY, every_n_steps=3, prefix="probe")
    resumed = trainer(tmp_path / "renamed", callbacks=[renamed])
    saved_as = r"saved as \"LLCCallback\{'prefix': 'llc'\}\", not of this one"
    with pytest.warns(UserWarning, match=saved_as + ".*Pass the saved prefix"):
        resumed.fit(Classifier(), loader(), ckpt_path=checkpoint)
    assert [row["step"] for row in renamed.monitor.history] == [6, 9, 12]

    same = LLCCallback(TINY, every_n_steps=3)
    resumed = trainer(tmp_path / "same", callbacks=[same])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(Classifier(), loader(), ckpt_path=checkpoint)
    assert not [m for m in llc_warnings(caught) if "new LLC history" in m]
    assert [row["step"] for row in same.monitor.history] == [3, 6, 9, 12]
    assert not any("llc/restart" in row for row in same.monitor.history)
