"""Weight- and data-restricted LLCs: known answers, equivalences, errors, and per-head curves."""

import csv

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from hf_helpers import TokenData, make_trainer, tiny_gpt2
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning_helpers import trainer
from models import (
    FIGURE_SIZE,
    TINY,
    DropoutBatchNormNet,
    classification_batches,
    cross_entropy,
    linear_plus_rrr_problem,
    mse_loss,
    png_size,
)
from torch.utils.data import DataLoader

from llc_callbacks import LLCConfig, Restrictions, estimate_llc, estimate_restricted_llcs
from llc_callbacks.components import attention_heads
from llc_callbacks.integrations.huggingface import LLCTrainerCallback
from llc_callbacks.integrations.lightning import LLCCallback
from llc_callbacks.plotting import plot_components

# The accuracy tests' settings. Over seeds 0-4 the restricted estimates stayed within
# 0.89-1.06 (linear, λ = 3), 1.01-1.04 (RRR, λ = 9.5) and 1.00-1.04 (both, λ = 12.5) of the
# truth; 15% is the tolerance.
# 16 chains: over seeds 0-7, 4 chains' estimates of the 6-weight linear part spread by 10%
# (2.5 to 3.4, and 4.1 once), so 15% was 1.5 of their spreads; 16 chains halve it, for
# little more time on a model this small.
CONFIG = LLCConfig(num_chains=16, num_burnin=1000, num_draws=2000, step_size=2e-3, localization=0.3)
SHORT = LLCConfig(num_chains=3, num_burnin=20, num_draws=30, step_size=1e-3, localization=10.0)


@pytest.fixture  # Its batches reshuffle on every pass: each test gets a fresh copy.
def problem():
    return linear_plus_rrr_problem()


@pytest.mark.slow
def test_restricted_llcs_of_disjoint_groups_are_their_own_and_add_up(problem):
    model, both, only_linear, only_rrr = problem
    restrictions = Restrictions(
        weights={"linear": "linear.*", "rrr": model.rrr},
        sources={"only_linear": only_linear, "only_rrr": only_rrr},
        combinations=[("rrr", "only_rrr"), ("linear", "only_rrr")],
        partition=True,
    )
    result = estimate_llc(model, mse_loss, both, CONFIG, restrictions=restrictions, warn=False)
    llc = {name: r.llc_mean for name, r in result.restricted.items()}
    assert result.llc_mean == pytest.approx(12.5, rel=0.15)
    assert llc["linear"] == pytest.approx(3.0, rel=0.15)
    assert llc["rrr"] == pytest.approx(9.5, rel=0.15)
    # Data restrictions: on data that feeds only one part, the LLC of all weights is that
    # part's, and the other part's weights do not change the loss at all.
    assert llc["only_linear"] == pytest.approx(3.0, rel=0.15)
    assert llc["only_rrr"] == pytest.approx(9.5, rel=0.15)
    assert llc["rrr/only_rrr"] == pytest.approx(9.5, rel=0.15)
    assert llc["linear/only_rrr"] == 0.0
    metrics = result.to_metrics()
    assert metrics["llc/rrr/only_rrr/mean"] == llc["rrr/only_rrr"]
    assert {"llc/linear/std", "llc/linear/diag/rhat", "llc/only_rrr/chain_3"} <= set(metrics)


def test_a_restriction_to_all_weights_equals_no_restriction():
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    restrictions = Restrictions(weights={"everything": "*"})
    result = estimate_llc(model, cross_entropy, data, SHORT, restrictions=restrictions, warn=False)
    plain = estimate_llc(model, cross_entropy, data, SHORT, warn=False)
    # The same noise (chain i draws from generator i), batches and weights; only float
    # rounding differs between vmap batches of 6 and 3 chains.
    np.testing.assert_array_equal(result.restricted["everything"].loss_trace, result.loss_trace)
    np.testing.assert_allclose(result.loss_trace, plain.loss_trace, rtol=1e-5)


def test_the_one_pass_of_many_restrictions_equals_separate_runs():
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    mask = torch.zeros(16, 6, dtype=torch.bool)
    mask[:4] = True  # four units of the first layer
    weights = {"first": "net.0.*", "norm": model.net[1], "units": {"net.0.weight": mask}}
    together = estimate_restricted_llcs(model, cross_entropy, data, Restrictions(weights), SHORT)
    for name, selection in weights.items():
        alone = estimate_restricted_llcs(
            model, cross_entropy, data, Restrictions({name: selection}), SHORT
        )
        np.testing.assert_allclose(
            together[name].loss_trace, alone[name].loss_trace, rtol=1e-5, atol=1e-7
        )
    assert set(together) == set(weights)


@pytest.mark.parametrize(
    ("restrictions", "message"),
    [
        (dict(weights={"x": "nothing.*"}), r"weights\['x'\]: pattern 'nothing\.\*' matches no"),
        (dict(weights={"x": ["net.0.*", "net.9.*"]}), r"pattern 'net\.9\.\*' matches no"),
        (
            dict(weights={"a": "net.0.*", "b": "net.*"}, partition=True),
            r"weights\['a'\] and weights\['b'\] overlap, but partition=True",
        ),
        (dict(weights={"x": {"net.7.weight": torch.ones(1, dtype=torch.bool)}}), "not a sampled"),
        (dict(weights={"x": {"net.0.weight": torch.ones(3, 3, dtype=torch.bool)}}), "shape"),
        (dict(weights={"x": {"net.0.weight": torch.zeros(16, 6, dtype=torch.bool)}}), "selects no"),
        (dict(weights={"x": torch.nn.Linear(2, 2)}), "holds no sampled parameter"),
        (dict(weights={"x": 3}), "must be glob patterns, a module or a dict of masks"),
    ],
)
def test_bad_selections_are_refused_naming_them(restrictions, message):
    model, data = DropoutBatchNormNet(), classification_batches()
    with pytest.raises(ValueError, match=message):
        estimate_llc(model, cross_entropy, data, SHORT, restrictions=Restrictions(**restrictions))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"a/b": "x"}}, "without '/'"),
        ({"weights": {"": "x"}}, "non-empty strings"),
        ({"weights": {"a": "x"}, "sources": {"a": []}}, "both weights and sources"),
        ({"sources": {"s": 3}}, r"sources\['s'\] must be an iterable"),
        ({"weights": {"a": "x"}, "combinations": [("a", "s")]}, "pair a weights name"),
        ({"partition": "yes"}, "partition must be True or False"),
    ],
)
def test_bad_restrictions_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Restrictions(**kwargs)


class TinyGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_one_curve_per_attention_head_through_lightning(tmp_path, wandb_rows):
    L.seed_everything(0, verbose=False)
    module = TinyGPT()
    heads = attention_heads(module)  # one line: every head of the LightningModule's GPT-2
    assert list(heads) == ["layer0.head0", "layer0.head1", "layer1.head0", "layer1.head1"]
    restrictions = Restrictions(weights=heads, partition=True)
    callback = LLCCallback(TINY, every_n_steps=3, restrictions=restrictions)
    csv_logger = CSVLogger(tmp_path)
    wandb_logger = WandbLogger(project="llc-callbacks-test", offline=True, save_dir=str(tmp_path))
    run = trainer(tmp_path, callbacks=[callback], logger=[csv_logger, wandb_logger], max_steps=6)
    run.fit(module, DataLoader(TokenData(), batch_size=16, shuffle=True))
    wandb_logger.experiment.finish()
    with open(f"{csv_logger.log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    for name in heads:
        assert [int(r["step"]) for r in rows if r.get(f"llc/{name}/mean")] == [3, 6]
    rows = wandb_rows()
    assert any(row.get("llc/components/_type") == "images/separated" for row in rows)
    path = tmp_path / "heads.png"
    plot_components(callback.monitor.history, path=path)
    assert png_size(path) == FIGURE_SIZE


def test_the_transformers_callback_takes_restrictions_too(tmp_path):
    hf = make_trainer(tmp_path)
    restrictions = Restrictions(weights={"embeddings": "transformer.w*e.*"})
    hf.add_callback(LLCTrainerCallback(TINY, steps=[4], restrictions=restrictions))
    hf.train()
    logged = [row for row in hf.state.log_history if "llc/embeddings/mean" in row]
    assert [row["step"] for row in logged] == [4]
