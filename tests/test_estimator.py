import math
import random
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_helpers import TokenData, tiny_gpt2
from models import (
    DropoutBatchNormNet,
    ShuffledBatches,
    classification_batches,
    cross_entropy,
    mse_loss,
    rrr_problem,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks import LLCConfig, LLCMonitor, LLCResult, Restrictions, estimate_llc
from llc_callbacks.forked import ForkedModel

SHORT = LLCConfig(num_chains=3, num_burnin=20, num_draws=30, step_size=1e-3, localization=10.0)


def short(**changes) -> LLCConfig:
    return LLCConfig(**{**SHORT.__dict__, **changes})


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
@pytest.mark.parametrize("paired", [True, False])
def test_vectorized_and_sequential_chains_give_the_same_numbers(sampler, paired):
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    results = [
        estimate_llc(model, cross_entropy, data, short(sampler=sampler, paired=paired, vectorize=v))
        for v in (True, False)
    ]
    assert [r.vectorized for r in results] == [True, False]
    # Same operations batched or not: only float rounding differs (about 1e-7 relative per
    # step), far below the 1e-4 allowed after 50 steps. A chain's LLC is a difference of
    # losses: one near zero keeps the others' absolute error, not a relative one.
    np.testing.assert_allclose(results[0].loss_trace, results[1].loss_trace, rtol=1e-4, atol=1e-6)
    per_chain = [r.llc_per_chain for r in results]
    scale = np.abs(per_chain[0]).max()
    np.testing.assert_allclose(*per_chain, rtol=1e-4, atol=1e-4 * scale)


class ScaleByMaxWeight(nn.Module):
    """Calls .item() on a weight, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if self.linear.weight.abs().max().item() < 100 else 0.5
        return self.linear(x) * scale


def test_auto_falls_back_to_sequential_chains_saying_why_once_per_run():
    torch.manual_seed(0)
    model, data = ScaleByMaxWeight(), classification_batches()
    with pytest.warns(UserWarning, match=r"run one after another because torch\.func\.vmap"):
        auto = estimate_llc(model, cross_entropy, data, short())
    with warnings.catch_warnings(record=True) as caught:  # the advice, followed
        warnings.simplefilter("always")
        sequential = estimate_llc(model, cross_entropy, data, short(vectorize=False))
    assert not [w for w in caught if "one after another" in str(w.message)]
    assert not auto.vectorized
    np.testing.assert_array_equal(auto.loss_trace, sequential.loss_trace)
    monitor = LLCMonitor(short(), every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            monitor.maybe_estimate(step, model, cross_entropy, data)
    assert len([w for w in caught if "one after another" in str(w.message)]) == 1
    with pytest.raises(RuntimeError, match=r"vectorize=True but torch\.func\.vmap failed"):
        estimate_llc(model, cross_entropy, data, short(vectorize=True))


def test_input_require_grads_hooks_are_out_while_chains_run_and_back_after():
    model = tiny_gpt2()
    data = [batch for batch in DataLoader(TokenData(32), batch_size=8)]
    plain = estimate_llc(model, gpt2_loss, data, short())
    # Trainer and TRL both call enable_input_require_grads (gradient checkpointing, PEFT): the
    # second call adds a second hook and keeps the new handle only. vmap refuses
    # requires_grad_ inside.
    model.enable_input_require_grads()
    model.enable_input_require_grads()
    other = model.get_input_embeddings().register_forward_hook(lambda m, i, out: None)
    hooks = list(model.get_input_embeddings()._forward_hooks.items())
    assert len(hooks) == 3
    hooked = estimate_llc(model, gpt2_loss, data, short())
    assert hooked.vectorized
    np.testing.assert_array_equal(hooked.loss_trace, plain.loss_trace)
    assert list(model.get_input_embeddings()._forward_hooks.items()) == hooks  # same, in order

    def failing(model, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        estimate_llc(model, failing, data, short())
    assert list(model.get_input_embeddings()._forward_hooks.items()) == hooks
    other.remove()


def gpt2_loss(model, batch):
    return model(**batch).loss


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def test_training_state_is_exactly_as_before():
    torch.manual_seed(0)
    model = DropoutBatchNormNet()
    model.train()
    model.net[1].eval()  # mixed modes must come back module by module
    x, y = classification_batches()[0]
    cross_entropy(model, (x, y)).backward()
    dataset = TensorDataset(*map(torch.cat, zip(*classification_batches(), strict=True)))
    loader = DataLoader(dataset, batch_size=64, shuffle=True)  # its shuffle draws global RNG
    before = snapshot(model)
    estimate_llc(model, cross_entropy, loader, short())
    after = snapshot(model)
    for name in ("state", "grads"):
        assert before[name].keys() == after[name].keys()
        for key in before[name]:
            assert torch.equal(before[name][key], after[name][key]), (name, key)
    assert before["modes"] == after["modes"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])
    assert before["python_rng"] == after["python_rng"]


def test_same_seed_same_numbers_whatever_the_global_rng():
    model = DropoutBatchNormNet()
    dataset = TensorDataset(*map(torch.cat, zip(*classification_batches(), strict=True)))
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    torch.manual_seed(1)
    first = estimate_llc(model, cross_entropy, loader, short())
    torch.manual_seed(2)
    second = estimate_llc(model, cross_entropy, loader, short())
    other_seed = estimate_llc(model, cross_entropy, loader, short(seed=1))
    np.testing.assert_array_equal(first.loss_trace, second.loss_trace)
    assert first.llc_mean == second.llc_mean
    assert not np.array_equal(first.loss_trace, other_seed.loss_trace)


def test_a_chain_does_not_depend_on_how_many_chains_run():
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    two = estimate_llc(model, cross_entropy, data, short(num_chains=2, vectorize=False))
    four = estimate_llc(model, cross_entropy, data, short(num_chains=4, vectorize=False))
    np.testing.assert_array_equal(four.loss_trace[:2], two.loss_trace)


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_chains_in_flight_change_memory_not_numbers(in_flight):
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    restrictions = Restrictions(weights={"first": "net.0.*", "last": "net.4.*"})
    config = short(num_chains=4, mala=True)
    every = estimate_llc(model, cross_entropy, data, config, restrictions=restrictions)
    waves = estimate_llc(
        model,
        cross_entropy,
        data,
        short(num_chains=4, mala=True, chains_in_flight=in_flight),
        restrictions=restrictions,
    )
    # The same chains on the same minibatches, batched in groups of other sizes: only float
    # rounding differs (about 1e-7 relative per step), far below the 1e-4 allowed after 50.
    for a, b in [
        (every, waves),
        *[(every.restricted[n], waves.restricted[n]) for n in ("first", "last")],
    ]:
        np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.llc_per_chain, b.llc_per_chain, rtol=1e-4)
        assert a.diagnostics["mala_acceptance"] == pytest.approx(
            b.diagnostics["mala_acceptance"], rel=1e-4
        )


def test_noise_and_sums_in_small_pieces_keep_chains_independent_of_their_waves(monkeypatch):
    # Models beyond 4M weights draw noise and sum distances and MALA terms in pieces; with
    # pieces of 7 weights the small net goes through those paths on every step.
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    whole = estimate_llc(model, cross_entropy, data, short(num_chains=4, mala=True))
    monkeypatch.setattr("llc_callbacks.chains.PIECE", 7)
    monkeypatch.setattr("llc_callbacks.samplers.PIECE", 7)
    config = short(num_chains=4, mala=True)
    every = estimate_llc(model, cross_entropy, data, config)
    one = estimate_llc(
        model, cross_entropy, data, short(num_chains=4, mala=True, chains_in_flight=1)
    )
    # As in test_chains_in_flight_change_memory_not_numbers: float rounding only.
    np.testing.assert_allclose(every.loss_trace, one.loss_trace, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(every.llc_per_chain, one.llc_per_chain, rtol=1e-4)
    # Other pieces draw other noise: a different sample of the same posterior, so the
    # estimates differ, but the per-step health figures agree in kind.
    assert not np.array_equal(every.loss_trace, whole.loss_trace)
    assert 0.5 < every.diagnostics["mala_acceptance"] <= 1.0


def test_when_every_chain_diverges_the_estimate_is_nan_with_advice():
    model, data = rrr_problem(5, 3, 5, 2)
    with pytest.warns(UserWarning, match="all 3 chains diverged.*Lower step_size"):
        result = estimate_llc(model, mse_loss, data, short(step_size=10.0))
    assert math.isnan(result.llc_mean)
    assert result.diagnostics["num_diverged"] == 3
    assert np.isnan(result.llc_per_chain).all()


class Fragile(nn.Module):
    """A regular model whose loss is NaN once its weight strays 0.03 from zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def fragile_loss(model: Fragile, batch) -> torch.Tensor:
    loss = mse_loss(model, batch)
    return torch.where(model.w.abs().max() > 0.03, torch.full_like(loss, math.nan), loss)


def test_diverged_chains_are_counted_and_left_out_of_the_mean():
    x = torch.randn(2048, 1, generator=torch.Generator().manual_seed(0))
    data = ShuffledBatches(x, torch.zeros_like(x), batch_size=64)
    config = LLCConfig(num_chains=8, num_burnin=0, num_draws=100, step_size=1e-5, localization=1.0)
    with pytest.warns(UserWarning, match="of 8 chains diverged and are left out"):
        result = estimate_llc(Fragile(), fragile_loss, data, config)
    diverged = np.isnan(result.llc_per_chain)
    # With this seed the random walk (step 3e-3 per draw) leaves ±0.03 in some chains only.
    assert 0 < diverged.sum() < 8
    assert result.diagnostics["num_diverged"] == diverged.sum()
    assert result.llc_mean == pytest.approx(np.mean(result.llc_per_chain[~diverged]))
    assert np.isfinite(result.loss_trace[~diverged]).all()


@pytest.mark.slow
def test_pairing_removes_the_noise_of_the_initial_loss():
    model, data = rrr_problem(5, 3, 5, 2)
    x, y = data.tensors
    noisy = ShuffledBatches(
        x, y + torch.randn(y.shape, generator=torch.Generator().manual_seed(1)), batch_size=256
    )
    config = LLCConfig(
        num_burnin=200, num_draws=300, step_size=2e-3, localization=0.3, relative_error=None
    )

    def spread(paired: bool) -> float:
        means = [
            estimate_llc(
                model,
                mse_loss,
                noisy,
                LLCConfig(**{**config.__dict__, "seed": s, "paired": paired}),
            ).llc_mean
            for s in range(6)
        ]
        return float(np.std(means))

    # Unpaired, nβ times the standard error of L(w*) over 8 batches (about 0.6 here) dominates
    # the spread of the estimate across seeds; pairing removes it (measured: 0.25 vs 0.68).
    assert spread(paired=True) < spread(paired=False) / 1.5


def test_init_loss_is_the_mean_over_init_loss_batches_when_unpaired():
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    result = estimate_llc(model, cross_entropy, data, short(init_loss_batches=3, paired=False))
    model.eval()
    with torch.no_grad():
        expected = torch.stack([cross_entropy(model, b) for b in data[:3]]).mean().item()
    assert result.init_loss == pytest.approx(expected, rel=1e-6)


def test_paired_init_loss_is_the_mean_loss_at_the_weights_on_the_draws_batches():
    # The chains' first step takes the data's first batch (no batch is spent on L(w*) alone);
    # each draw's batch is the one after; every chain steps on the same batches.
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    config = short(num_burnin=3, num_draws=4)
    result = estimate_llc(model, cross_entropy, data, config, warn=False)
    model.eval()
    with torch.no_grad():
        drawn = [data[t % len(data)] for t in range(3, 7)]
        expected = torch.stack([cross_entropy(model, b) for b in drawn]).mean().item()
    assert result.init_loss == pytest.approx(expected, rel=1e-6)
    # The LLC is nbeta times the mean excess over that same L(w*).
    excess = np.nanmean(result.loss_trace) - result.init_loss
    assert result.llc_mean == pytest.approx(result.nbeta * excess, rel=1e-5)


def test_result_shapes_nbeta_and_metrics():
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches(batch_size=64)
    result = estimate_llc(model, cross_entropy, data, short(num_chains=2))
    assert isinstance(result, LLCResult)
    assert result.loss_trace.shape == (2, 30)
    assert result.llc_per_chain.shape == (2,)
    assert result.nbeta == pytest.approx(64 / math.log(64))
    assert result.llc_std == pytest.approx(np.std(result.llc_per_chain, ddof=1))
    assert result.elapsed_s > 0
    metrics = result.to_metrics(prefix="train/llc")
    assert set(metrics) == {
        "train/llc/mean",
        "train/llc/std",
        "train/llc/healthy",
        "train/llc/chain_0",
        "train/llc/chain_1",
        "train/llc/init_loss",
        "train/llc/diag/num_diverged",
        "train/llc/diag/frac_below_init",
        "train/llc/diag/rhat",
        "train/llc/diag/ess",
        "train/llc/diag/trend_z",
        "train/llc/diag/climb",
        "train/llc/diag/loc_sensitivity",
        "train/llc/diag/mala_acceptance",
        "train/llc/diag/burnin",
        "train/llc/diag/draws",
        "train/llc/diag/step_size",
        "train/llc/diag/warm",
    }
    assert metrics["train/llc/mean"] == result.llc_mean
    assert metrics["train/llc/healthy"] == float(not result.problems())
    assert all(isinstance(v, float) for v in metrics.values())
    assert set(result.to_metrics()) == {k.replace("train/llc", "llc") for k in metrics}


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def dict_loss(model: DictModel, batch: dict) -> torch.Tensor:
    labels = batch.pop("labels")  # as transformers' compute_loss does
    logits = model(**batch)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def dict_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (4, 16, 5), generator=generator)
    return [{"input_ids": i, "labels": i.roll(1, dims=1)} for i in ids]


def test_dict_batches_are_never_mutated_and_set_the_batch_size():
    torch.manual_seed(0)
    data = dict_batches()
    result = estimate_llc(DictModel(), dict_loss, data, short(num_chains=2))
    assert all(set(batch) == {"input_ids", "labels"} for batch in data)
    assert result.nbeta == pytest.approx(16 / math.log(16))


def test_tied_weights_are_sampled_once_and_both_paths_agree():
    torch.manual_seed(0)
    model, data = DictModel(), dict_batches()
    forked = ForkedModel(model, dict_loss, torch.device("cpu"), vectorize="auto")
    assert forked.anchor.numel() == 80  # the shared 10 x 8 matrix, once
    vectorized, sequential = (
        estimate_llc(model, dict_loss, data, short(vectorize=v)) for v in (True, False)
    )
    np.testing.assert_allclose(vectorized.loss_trace, sequential.loss_trace, rtol=1e-4)


def test_frozen_parameters_are_not_sampled():
    model = DropoutBatchNormNet()
    model.net[0].requires_grad_(False)
    forked = ForkedModel(model, cross_entropy, torch.device("cpu"), vectorize="auto")
    assert forked.layout.names == (
        "model.net.1.weight",
        "model.net.1.bias",
        "model.net.4.weight",
        "model.net.4.bias",
    )


def test_low_precision_models_are_sampled_in_float32_and_left_alone():
    torch.manual_seed(0)
    model = DropoutBatchNormNet().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(x.to(torch.bfloat16), y) for x, y in classification_batches()]
    result = estimate_llc(model, cross_entropy, data, short())
    assert np.isfinite(result.llc_mean)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_inside_no_grad_and_inference_mode(context):
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    expected = estimate_llc(model, cross_entropy, data, short())
    with context():
        result = estimate_llc(model, cross_entropy, data, short())
    np.testing.assert_array_equal(result.loss_trace, expected.loss_trace)


def test_progress_bar_is_shown_on_request_on_a_terminal_only(capsys, monkeypatch):
    torch.manual_seed(0)
    model, data = DropoutBatchNormNet(), classification_batches()
    estimate_llc(model, cross_entropy, data, short(), progress=True)
    assert "LLC chains" not in capsys.readouterr().err  # a log file gets no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    estimate_llc(model, cross_entropy, data, short(), progress=True)
    assert "LLC chains" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (
            lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
            r"scalar tensor.*shape \(64,\)",
        ),
        (lambda m, b: {"loss": cross_entropy(m, b)}, "scalar tensor.*got dict"),
    ],
)
def test_a_loss_that_is_not_a_scalar_tensor_is_refused(loss_fn, message):
    with pytest.raises(ValueError, match=message):
        estimate_llc(DropoutBatchNormNet(), loss_fn, classification_batches(), short())


def test_bad_arguments_are_refused_early():
    model, data = DropoutBatchNormNet(), classification_batches()
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module"):
        estimate_llc(lambda x: x, cross_entropy, data)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        estimate_llc(model, "cross_entropy", data)
    with pytest.raises(ValueError, match="config must be an LLCConfig"):
        estimate_llc(model, cross_entropy, data, {"num_chains": 2})
    with pytest.raises(ValueError, match="data yielded no batches"):
        estimate_llc(model, cross_entropy, [], short())
    with pytest.raises(ValueError, match="cannot restart"):
        estimate_llc(model, cross_entropy, iter(data), short())
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        estimate_llc(model.requires_grad_(False), cross_entropy, data, short())


def test_a_nan_loss_at_the_current_weights_gives_nan_with_a_warning():
    model = DropoutBatchNormNet()
    with torch.no_grad():
        model.net[0].bias.fill_(math.nan)
    with pytest.warns(UserWarning, match="loss at the current weights is nan"):
        result = estimate_llc(model, cross_entropy, classification_batches(), short())
    assert math.isnan(result.llc_mean)
