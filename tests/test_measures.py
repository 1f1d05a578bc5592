"""Measures next to the LLC: a user's own, logged by Lightning and transformers as the LLC is
(and by replay: test_replay), told about the run, checkpointed, and run under the error
policy."""

import csv
import math

import pytest
import torch
import wandb
from hf_helpers import make_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning_helpers import Classifier, loader
from lightning_helpers import trainer as lightning_trainer
from models import TINY, DropoutBatchNormNet, classification_batches, cross_entropy
from user_measures import ChainTable, Count, WeightNorm

from llc_callbacks import LLCMonitor
from llc_callbacks.integrations.huggingface import LLCTrainerCallback
from llc_callbacks.integrations.lightning import LLCCallback
from llc_callbacks.measures import Curvature, Run


def norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.parameters()))


@pytest.mark.slow
def test_a_measure_of_your_own_is_logged_by_lightning_and_transformers(tmp_path):
    callback = LLCCallback(TINY, steps=[6, 12], measures=[WeightNorm(), Count()])
    module, logger = Classifier(), CSVLogger(tmp_path / "lightning")
    lightning_trainer(tmp_path, callbacks=[callback], logger=logger).fit(module, loader())
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["llc/mean"]]
    assert [int(row["step"]) for row in rows] == [6, 12]
    # The last reading came after the last step: the weights it measured are the final ones.
    assert float(rows[-1]["llc/weight_norm"]) == pytest.approx(norm(module))
    assert [float(row["llc/count"]) for row in rows] == [1.0, 2.0]

    trainer = make_trainer(tmp_path / "transformers")
    trainer.add_callback(LLCTrainerCallback(TINY, steps=[6, 12], measures=[WeightNorm()]))
    trainer.train()
    rows = [row for row in trainer.state.log_history if "llc/mean" in row]
    assert [row["step"] for row in rows] == [6, 12]
    assert rows[-1]["llc/weight_norm"] == pytest.approx(norm(trainer.model))


def test_a_measures_tables_and_figures_go_to_lightnings_wandb_logger(
    tmp_path, wandb_dir, wandb_rows
):
    callback = LLCCallback(TINY, steps=[4, 8], measures=[ChainTable()])
    logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    lightning_trainer(tmp_path, callbacks=[callback], logger=logger).fit(Classifier(), loader())
    logger.experiment.finish()
    rows = wandb_rows()
    for key, kind in (("llc/chains", "table-file"), ("llc/chains_plot", "images/separated")):
        logged = [row for row in rows if row.get(f"{key}/_type") == kind]
        assert [row["trainer/global_step"] for row in logged] == [4, 8], key
    assert "llc/chains" not in callback.monitor.history[-1]  # tables stay out of the history


def test_a_measures_tables_and_figures_go_to_the_trainers_wandb_run(
    tmp_path, wandb_dir, wandb_rows
):
    trainer = make_trainer(tmp_path, report_to="wandb")
    trainer.add_callback(LLCTrainerCallback(TINY, steps=[4, 8], measures=[ChainTable()]))
    trainer.train()
    wandb.finish()
    rows = wandb_rows()
    for key, kind in (("llc/chains", "table-file"), ("llc/chains_plot", "image-file")):
        logged = [row for row in rows if row.get(f"train/{key}/_type") == kind]
        assert [row["train/global_step"] for row in logged] == [4, 8], key


@pytest.mark.slow
def test_a_measure_is_told_about_the_run_and_its_state_is_checkpointed(tmp_path):
    count = Count()
    callback = LLCCallback(TINY, every_n_steps=4, measures=[count])
    lightning_trainer(tmp_path, callbacks=[callback]).fit(Classifier(), loader())
    assert count.run == Run(total_steps=12, dataset_size=256, prefix="llc")
    # Each reading is handed the rows of the readings before it.
    assert [row["llc/seen"] for row in callback.monitor.history] == [0.0, 1.0, 2.0]
    assert callback.state_dict()["measures"] == [{"count": 3}]
    resumed = Count()
    LLCMonitor(TINY, every_n_steps=4, measures=[resumed]).load_state_dict(callback.state_dict())
    assert resumed.count == 3


def test_a_measure_that_fails_is_one_warning_and_the_llc_and_other_measures_go_on():
    model, data = DropoutBatchNormNet(), classification_batches()
    monitor = LLCMonitor(TINY, every_n_steps=1, measures=[Count(fail_at=1), WeightNorm()])
    with pytest.warns(UserWarning, match="measuring the count failed; training goes on"):
        for step in (1, 2):
            monitor.maybe_estimate(step, model, cross_entropy, data)
    first, second = monitor.history
    assert "llc/count" not in first and second["llc/count"] == 1.0
    for row in (first, second):  # the LLC and the other measure, at every reading
        assert math.isfinite(row["llc/mean"]) and "llc/weight_norm" in row
    strict = LLCMonitor(TINY, steps=[1], measures=[Count(fail_at=1)], on_error="raise")
    with pytest.raises(RuntimeError, match="no count at this step"):
        strict.maybe_estimate(1, model, cross_entropy, data)


@pytest.mark.parametrize("measures", [Curvature(), ["hessian_trace"], [WeightNorm, Count()]])
def test_measures_must_be_measure_objects(measures):
    with pytest.raises(ValueError, match="measures must be a sequence of Measure objects"):
        LLCMonitor(measures=measures)
    with pytest.raises(ValueError, match="measures must be a sequence of Measure objects"):
        LLCCallback(measures=measures)
