"""Curvature next to the LLC: known answers for the Hessian trace, the empirical Fisher trace
and the top eigenvalue (issue: curvature and the local free energy)."""

import csv
import dataclasses
import math

import lightning.pytorch as L
import pytest
import torch
from hf_helpers import make_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning_helpers import Classifier, loader
from lightning_helpers import trainer as lightning_trainer
from models import FIGURE_SIZE, TINY, ShuffledBatches, png_size
from torch import nn

from llc_callbacks import LLCMonitor, cli
from llc_callbacks.curvature import CURVATURES, estimate_curvature
from llc_callbacks.integrations.huggingface import LLCTrainerCallback
from llc_callbacks.integrations.lightning import LLCCallback
from llc_callbacks.measures import Curvature, FreeEnergy
from llc_callbacks.theory import gaussian_nll, regression_data

EIGENVALUES = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
BATCHES = [torch.zeros(4, 1)]


class Quadratic(nn.Module):
    """``L(w) = (w - c)^T A (w - c) / 2`` with a known symmetric ``A``: its Hessian is ``A``."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator))
        self.register_buffer("hessian", rotation @ torch.diag(EIGENVALUES) @ rotation.T)
        self.register_buffer("center", torch.randn(6, generator=generator))
        self.w = nn.Parameter(torch.randn(6, generator=generator))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        offset = self.w - self.center
        return 0.5 * offset @ self.hessian @ offset + 0 * batch.sum()


def quadratic_loss(model: Quadratic, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def test_hessian_trace_and_top_eigenvalue_of_a_quadratic():
    model = Quadratic()
    found = estimate_curvature(model, quadratic_loss, BATCHES, probes=64)
    hessian = model.hessian
    # Rademacher probes: Var(v^T A v) = 2 * sum_{i != j} A_ij^2, so the mean of 64 probes has
    # this standard error; 4 of them bound a miss to 1 in 15,000.
    off_diagonal = (hessian.square().sum() - hessian.diagonal().square().sum()).item()
    stderr = math.sqrt(2 * off_diagonal / 64)
    assert found["hessian_trace"] == pytest.approx(EIGENVALUES.sum().item(), abs=4 * stderr)
    # The sample standard deviation of 64 probes is within 50% of the true one.
    assert found["hessian_trace_stderr"] == pytest.approx(stderr, rel=0.5)
    # Power iteration converges as (3/5)^(2k): 20 iterations leave 1e-9; the rest is float32.
    assert found["top_eigenvalue"] == pytest.approx(5.0, rel=1e-3)


def test_fisher_equals_hessian_for_a_linear_gaussian_model_at_its_truth():
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)  # the truth; y = W x + N(0, I)
    dataset = regression_data(model, 4, 3, samples=512)
    data = ShuffledBatches(*dataset.tensors, batch_size=512)
    found = estimate_curvature(model, gaussian_nll, data, probes=64, examples=512)
    # The batch's Hessian is its mean x x^T, once per output: trace 3 * mean ||x||^2 exactly.
    inputs = next(iter(data))[0]
    hessian_trace = 3 * inputs.square().sum(dim=1).mean().item()
    # Hutchinson's probes vary by the off-diagonal entries (4 standard errors, as above).
    assert found["hessian_trace"] == pytest.approx(
        hessian_trace, abs=4 * found["hessian_trace_stderr"]
    )
    # At the truth E[grad grad^T] = E[x x^T] per output, the Hessian: the empirical Fisher of
    # 512 examples lies within 4 of its standard errors (about 5% of it here).
    assert found["fisher_trace"] == pytest.approx(
        hessian_trace, abs=4 * found["fisher_trace_stderr"]
    )
    assert found["fisher_trace_stderr"] < 0.1 * hessian_trace


def test_curvature_leaves_the_model_as_it_was_and_checks_its_arguments():
    model = Quadratic()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state = torch.get_rng_state()
    model.train()
    estimate_curvature(model, quadratic_loss, BATCHES, ["top_eigenvalue"])
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert model.training and model.w.grad is None and torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="quantities must be one of 'hessian_trace'"):
        estimate_curvature(model, quadratic_loss, BATCHES, ["trace"])
    with pytest.raises(ValueError, match="probes must be an integer >= 2"):
        estimate_curvature(model, quadratic_loss, BATCHES, probes=1)
    with pytest.raises(ValueError, match="fisher_trace needs batches of at least 2 examples"):
        estimate_curvature(model, quadratic_loss, [torch.zeros(1, 1)], ["fisher_trace"])


@pytest.mark.slow
def test_lightning_logs_curvature_and_free_energy_at_the_llc_steps_without_changing_training(
    tmp_path, wandb_dir, wandb_rows
):
    def fit(callbacks, logger):
        L.seed_everything(0, verbose=False)
        module = Classifier()
        lightning_trainer(tmp_path, callbacks=callbacks, logger=logger).fit(module, loader())
        return module

    plain = fit([], CSVLogger(tmp_path / "plain"))
    callback = LLCCallback(TINY, steps=[4, 8], measures=[Curvature(), FreeEnergy()])
    csv_logger = CSVLogger(tmp_path / "watched")
    wandb_logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(wandb_dir))
    watched = fit([callback], [csv_logger, wandb_logger])
    wandb_logger.experiment.finish()
    pairs = zip(plain.parameters(), watched.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    keys = [f"llc/curvature/{name}" for name in CURVATURES] + ["llc/free_energy"]
    with open(f"{csv_logger.log_dir}/metrics.csv") as file:
        csv_rows = [row for row in csv.DictReader(file) if row["llc/mean"]]
    logged = [row for row in wandb_rows() if "llc/mean" in row]
    history = callback.monitor.history
    for rows in (csv_rows, logged):
        assert [
            int(row["step"] if "step" in row else row["trainer/global_step"]) for row in rows
        ] == [4, 8]
        for row, expected in zip(rows, history, strict=True):
            assert all(float(row[key]) == pytest.approx(expected[key]) for key in keys)
    # The training set has 256 examples: F = n L(w*) + LLC log n.
    first = history[0]
    assert first["llc/free_energy"] == pytest.approx(
        256 * first["llc/init_loss"] + first["llc/mean"] * math.log(256)
    )
    # The plot command draws the curvature of the run in a panel below the LLC.
    figure = tmp_path / "curves.png"
    assert cli.main(["plot", f"{csv_logger.log_dir}/metrics.csv", "-o", str(figure)]) == 0
    assert png_size(figure) == (FIGURE_SIZE[0], FIGURE_SIZE[1] * 5 // 3)
    # Early in training the weights are no minimum: only the Fisher trace must be positive.
    assert math.isfinite(first["llc/curvature/hessian_trace"])
    assert first["llc/curvature/fisher_trace"] > 0


@pytest.mark.slow
def test_transformers_log_history_holds_curvature_and_free_energy_at_the_llc_steps(tmp_path):
    def run(callback_kwargs):
        trainer = make_trainer(tmp_path)
        if callback_kwargs is not None:
            trainer.add_callback(LLCTrainerCallback(TINY, **callback_kwargs))
        trainer.train()
        return trainer

    plain = run(None)
    watched = run(
        {
            "steps": [3, 6],
            "measures": [Curvature("hessian_trace"), FreeEnergy()],
            "dataset_size": 1000,
            "extra_metrics": ("diagnostics",),
        }
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain.model.parameters(), watched.model.parameters(), strict=True)
    )
    rows = [row for row in watched.state.log_history if "llc/mean" in row]
    assert [row["step"] for row in rows] == [3, 6]
    for row in rows:
        assert math.isfinite(row["llc/curvature/hessian_trace"])
        assert row["llc/curvature/hessian_trace_stderr"] > 0
        # dataset_size given: it wins over the training set's 256.
        assert row["llc/free_energy"] == pytest.approx(
            1000 * row["llc/init_loss"] + row["llc/mean"] * math.log(1000)
        )
        assert "llc/curvature/top_eigenvalue" not in row


def test_monitor_refuses_unknown_curvature_and_a_bad_dataset_size():
    with pytest.raises(ValueError, match="Curvature must be one of 'hessian_trace'"):
        Curvature("trace")
    with pytest.raises(ValueError, match="curvature must be one of 'hessian_trace'"):
        LLCMonitor(curvature=["trace"])
    with pytest.raises(ValueError, match="curvature must be a sequence of names"):
        LLCMonitor(curvature="hessian_trace")
    with pytest.raises(ValueError, match="dataset_size must be an integer >= 2"):
        LLCMonitor(dataset_size=1)


def test_a_failing_curvature_is_one_warning_and_the_estimates_go_on():
    model, single = Quadratic(), [torch.zeros(1, 1)]  # the Fisher trace needs 2 examples
    config = dataclasses.replace(TINY, nbeta=10.0)
    monitor = LLCMonitor(config, every_n_steps=1, measures=[Curvature("fisher_trace")])
    with pytest.warns(UserWarning, match="measuring the curvature failed; training goes on"):
        for step in (1, 2):
            monitor.maybe_estimate(step, model, quadratic_loss, single)
    assert [row["step"] for row in monitor.history] == [1, 2]
    assert all(math.isfinite(row["llc/mean"]) for row in monitor.history)
    assert all("llc/curvature/fisher_trace" not in row for row in monitor.history)
    monitor = LLCMonitor(config, steps=[1], measures=[Curvature("fisher_trace")], on_error="raise")
    with pytest.raises(ValueError, match="fisher_trace needs batches of at least 2 examples"):
        monitor.maybe_estimate(1, model, quadratic_loss, single)


def test_the_curvature_keyword_still_works_for_a_release_and_names_the_measure():
    model, batches = Quadratic(), [torch.zeros(4, 1)]
    config = dataclasses.replace(TINY, nbeta=10.0)
    with pytest.warns(FutureWarning, match=r"measures=\[Curvature\('hessian_trace'\)\]"):
        old = LLCMonitor(config, steps=[1], curvature=["hessian_trace"])
    new = LLCMonitor(config, steps=[1], measures=[Curvature("hessian_trace")])
    rows = [m.maybe_estimate(1, model, quadratic_loss, batches) for m in (old, new)]
    assert rows[0]["llc/curvature/hessian_trace"] == rows[1]["llc/curvature/hessian_trace"]
