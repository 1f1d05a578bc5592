"""Plots and the `llc-callbacks plot` console script, on histories made by real short runs."""

import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import wandb
from hf_helpers import make_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning_helpers import Classifier, loader, trainer
from models import FIGURE_SIZE, TINY, mse_loss, png_size, rrr_problem

from llc_callbacks import calibrate, estimate_llc
from llc_callbacks.cli import main
from llc_callbacks.integrations.huggingface import LLCTrainerCallback
from llc_callbacks.integrations.lightning import LLCCallback
from llc_callbacks.plotting import plot_calibration, plot_traces


def lightning_run(tmp_path, logger) -> None:
    L.seed_everything(0, verbose=False)
    run = trainer(tmp_path, callbacks=[LLCCallback(TINY, every_n_steps=3)], logger=logger)
    run.fit(Classifier(), loader())


@pytest.fixture
def csv_run(tmp_path) -> Path:
    logger = CSVLogger(tmp_path)
    lightning_run(tmp_path, logger)
    return Path(logger.log_dir) / "metrics.csv"


@pytest.fixture
def trainer_state(tmp_path) -> Path:
    hf = make_trainer(tmp_path)
    hf.add_callback(LLCTrainerCallback(TINY, every_n_steps=3))
    hf.train()
    hf.save_state()
    return tmp_path / "trainer_state.json"


def wandb_runs(folder: Path, count: int) -> list[Path]:
    """``count`` Lightning runs logged to W&B offline under ``folder``, their run folders."""
    for _ in range(count):
        logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(folder))
        lightning_run(folder, logger)
        logger.experiment.finish()
        wandb.teardown()  # finish() returns before the run file is complete; this waits
    return sorted(folder.glob("wandb/offline-run-*"))


@pytest.fixture
def wandb_run(wandb_dir) -> Path:
    (run,) = wandb_runs(wandb_dir, 1)
    return run


@pytest.mark.parametrize("run", ["csv_run", "trainer_state", "wandb_run"])
def test_plot_draws_each_history_format_to_png(run, request, tmp_path, capsys):
    path = request.getfixturevalue(run)
    output = tmp_path / f"{run}.png"
    assert main(["plot", str(path), "-o", str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(output)
    assert output.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    assert png_size(output) == FIGURE_SIZE


def test_plot_draws_several_runs_in_one_figure(wandb_dir, capsys):
    runs = wandb_runs(wandb_dir, 2)  # as `llc-callbacks plot logs/wandb/offline-run-*` finds
    assert len(runs) == 2
    assert main(["plot", *map(str, runs)]) == 0
    output = wandb_dir / "wandb" / "llc_curve.png"  # in the folder the runs share
    assert capsys.readouterr().out.splitlines()[-1] == str(output)
    assert png_size(output) == FIGURE_SIZE


def test_plot_writes_next_to_the_run_by_default(csv_run):
    assert main(["plot", str(csv_run.parent)]) == 0
    assert png_size(csv_run.parent / "llc_curve.png") == FIGURE_SIZE


@pytest.mark.slow
def test_the_console_script_is_installed(csv_run, tmp_path):
    script = Path(sys.executable).parent / "llc-callbacks"
    done = subprocess.run(
        [script, "plot", csv_run, "-o", tmp_path / "cli.png"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert png_size(tmp_path / "cli.png") == FIGURE_SIZE


def test_bad_input_exits_non_zero_with_a_clear_message(tmp_path, csv_run, capsys):
    cases = [
        (tmp_path / "missing.csv", "missing.csv does not exist"),
        (tmp_path, "holds no metrics.csv \\(Lightning\\), trainer_state.json"),
    ]
    no_llc = tmp_path / "no_llc.csv"
    no_llc.write_text("step,train_loss\n0,1.0\n1,0.5\n")
    cases.append((no_llc, "has no LLC metrics"))
    for path, message in cases:
        assert main(["plot", str(path)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("llc-callbacks: error:")
        assert re.search(message, error), error
    assert main(["plot", str(csv_run), "--loss", "val_loss"]) == 2
    assert "has no 'val_loss' values" in capsys.readouterr().err


def test_trace_and_calibration_plots(tmp_path):
    model, data = rrr_problem(5, 3, 5, 2)
    result = estimate_llc(model, mse_loss, data, TINY, warn=False)
    plot_traces(result, tmp_path / "traces.png")
    calibration = calibrate(model, mse_loss, data, TINY, step_sizes=[1e-4, 1e-3, 1e2])
    plot_calibration(calibration, tmp_path / "calibration.png")
    for name in ("traces", "calibration"):
        assert png_size(tmp_path / f"{name}.png") == FIGURE_SIZE
