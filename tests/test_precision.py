"""Models held in half precision: float32 chains, forward passes in the model's dtype."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from hf_helpers import LENGTH, VOCAB, tiny_gpt2
from torch.utils.data import DataLoader

from llc_callbacks import LLCConfig, estimate_llc
from llc_callbacks.forked import ForkedModel


def gpt2_loss(model, batch):
    return model(**batch).loss


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT-2 trained near a minimum of a language whose every second token repeats."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (128, LENGTH))
    ids[:, 1::2] = ids[:, 0::2]
    data = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=16)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):
        for batch in data:
            optimizer.zero_grad()
            gpt2_loss(model, batch).backward()
            optimizer.step()
    return model, data


def test_a_bfloat16_model_estimates_what_its_float32_twin_does(trained):
    model, data = trained
    half = copy.deepcopy(model).to(torch.bfloat16)
    full = copy.deepcopy(half).float()  # the same weights, exactly
    # A fixed step size and length: adapted ones would follow the rounding too.
    config = LLCConfig(
        num_chains=4, num_burnin=50, num_draws=100, step_size=2e-4, relative_error=None
    )
    found = estimate_llc(half, gpt2_loss, data, config, warn=False)
    expected = estimate_llc(full, gpt2_loss, data, config, warn=False)
    assert (found.precision, expected.precision) == ("bfloat16", "float32")
    assert not np.array_equal(found.loss_trace, expected.loss_trace)  # bfloat16 really ran
    # Both runs share seeds, batches and noise, so chain i differs only by bfloat16 rounding
    # in the forward pass. bfloat16 keeps 8 significant bits (u = 2^-8): a logit of size ~5
    # is off by ~0.02, which averages to ~1e-3 in the mean loss of 256 tokens. The estimate
    # is nbeta (5.8 at batches of 16) times the mean excess loss, whose error is at most
    # twice a loss's: about 0.014. 0.05 allows 3x that; measured: 0.002 (seeds 0-2). The
    # chains themselves spread by 0.2-0.3, so bfloat16 changes no conclusion.
    np.testing.assert_allclose(found.llc_per_chain, expected.llc_per_chain, atol=0.05)
    assert abs(found.llc_mean - expected.llc_mean) < 0.05


def test_chains_under_bfloat16_autocast_estimate_what_float32_chains_do(trained):
    model, data = trained
    config = LLCConfig(
        num_chains=4, num_burnin=50, num_draws=100, step_size=2e-4, relative_error=None
    )
    found = estimate_llc(model, gpt2_loss, data, replace(config, autocast="bfloat16"), warn=False)
    expected = estimate_llc(model, gpt2_loss, data, config, warn=False)
    assert (found.precision, expected.precision) == ("bfloat16-mixed", "float32")
    assert not np.array_equal(found.loss_trace, expected.loss_trace)  # autocast really ran
    # As for the bfloat16 model above: chain i differs only by bfloat16 rounding, here of
    # the matrix products alone (autocast keeps layer norms, softmax and the loss in
    # float32), so the same bound of 0.05 holds with room; measured: 0.0011 to 0.0014 (seeds
    # 0-2).
    np.testing.assert_allclose(found.llc_per_chain, expected.llc_per_chain, atol=0.05)
    assert abs(found.llc_mean - expected.llc_mean) < 0.05


def test_a_bfloat16_model_is_read_in_place_and_its_weights_sampled_in_float32(trained):
    model, data = trained
    half = copy.deepcopy(model).to(torch.bfloat16).eval()
    half.transformer.wte.weight.requires_grad_(False)
    forked = ForkedModel(half, gpt2_loss, torch.device("cpu"), "auto")
    frozen = half.transformer.wte.weight
    assert forked.constants["model.transformer.wte.weight"].data_ptr() == frozen.data_ptr()
    assert forked.anchor.dtype == torch.float32
    assert forked.precision == torch.bfloat16
    batch = next(iter(data))
    losses, grads = forked.loss_and_grad(forked.anchor.expand(2, -1).clone(), batch)
    assert losses.dtype == grads.dtype == torch.float32
    # Gradients reach the float32 weights through the cast to bfloat16.
    assert bool(grads.abs().sum(dim=1).gt(0).all())


def test_float16_batches_and_weights_follow_a_float16_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(torch.float16)
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))]

    def mse(m, batch):
        assert batch[0].dtype == torch.float16  # floating batches come in the model's dtype
        return torch.nn.functional.mse_loss(m(batch[0]).float(), batch[1].float())

    config = LLCConfig(num_chains=2, num_burnin=2, num_draws=4, nbeta=1.0)
    result = estimate_llc(model, mse, data, config, warn=False)
    assert result.precision == "float16"
    assert np.isfinite(result.llc_per_chain).all()
