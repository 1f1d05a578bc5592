"""The update rules written out element by element: the SGLD step of Welling and Teh (2011) as
Lau et al. (2023, arXiv:2308.12108) use it, and RMSprop-SGLD (Hitchcock and Hoogland 2025)."""

import math

import torch

from llc_callbacks.samplers import (
    SamplerState,
    mala_log_acceptance,
    rmsprop_sgld_step,
    sgld_step,
)


def adding(noise):
    """``AddNoise`` with a fixed noise tensor."""

    def add_noise(weights, scale, factor):
        weights.add_((noise if factor is None else factor * noise) * scale[:, None])

    return add_noise


def chains(step_size, n=3):
    """The same step size for each of ``n`` chains, as the rules take it."""
    return torch.full((n,), step_size)


def random_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights, grad, noise = (torch.randn(3, 5, generator=generator) for _ in range(3))
    anchor = torch.randn(5, generator=generator)
    return weights, grad, noise, anchor


def test_sgld_step_is_the_welling_teh_update():
    weights, grad, noise, anchor = random_inputs()
    eps, nbeta, gamma = 1e-3, 46.0, 100.0
    expected = (
        weights - eps / 2 * (nbeta * grad + gamma * (weights - anchor)) + math.sqrt(eps) * noise
    )
    state, info = sgld_step(
        SamplerState(weights),
        grad,
        anchor,
        adding(noise),
        step_size=chains(eps),
        nbeta=nbeta,
        localization=gamma,
    )
    assert info.precond is None
    assert state.weights is weights  # in place: no second copy of the weights
    torch.testing.assert_close(state.weights, expected)


def test_sgld_step_does_not_scale_localization_by_nbeta():
    weights, _, _, anchor = random_inputs()
    zero = torch.zeros_like(weights)
    step = dict(step_size=chains(1e-2), localization=1.0)
    low = sgld_step(SamplerState(weights.clone()), zero, anchor, adding(zero), nbeta=1.0, **step)
    high = sgld_step(SamplerState(weights), zero, anchor, adding(zero), nbeta=1000.0, **step)
    torch.testing.assert_close(low[0].weights, high[0].weights)


def test_sgld_step_leaves_gradient_and_anchor_unchanged():
    weights, grad, noise, anchor = random_inputs()
    copies = [t.clone() for t in (grad, anchor)]
    sgld_step(
        SamplerState(weights),
        grad,
        anchor,
        adding(noise),
        step_size=chains(1e-3),
        nbeta=2.0,
        localization=3.0,
    )
    for original, copy in zip((grad, anchor), copies, strict=True):
        assert torch.equal(original, copy)


def test_rmsprop_sgld_preconditions_drift_and_noise_with_loss_gradient_statistics():
    weights, grad, noise, anchor = random_inputs()
    eps, nbeta, gamma, alpha, rms_eps = 1e-3, 46.0, 100.0, 0.9, 0.1
    square_avg = torch.rand_like(weights)
    v = alpha * square_avg + (1 - alpha) * grad**2  # the loss gradient only, not nβ·grad
    g = 1 / (v.sqrt() + rms_eps)
    expected = (
        weights
        - eps / 2 * g * (nbeta * grad + gamma * (weights - anchor))
        + math.sqrt(eps) * g.sqrt() * noise
    )
    state, info = rmsprop_sgld_step(
        SamplerState(weights, square_avg),
        grad,
        anchor,
        adding(noise),
        step_size=chains(eps),
        nbeta=nbeta,
        localization=gamma,
        alpha=alpha,
        eps=rms_eps,
    )
    torch.testing.assert_close(state.square_avg, v)
    torch.testing.assert_close(state.weights, expected)
    torch.testing.assert_close(info.precond, g)  # what MALA's acceptance needs


def test_rmsprop_sgld_starts_its_statistics_at_zero():
    weights, grad, noise, anchor = random_inputs()
    state, _ = rmsprop_sgld_step(
        SamplerState(weights),
        grad,
        anchor,
        adding(noise),
        step_size=chains(1e-3),
        nbeta=1.0,
        localization=0.0,
        alpha=0.99,
        eps=0.1,
    )
    torch.testing.assert_close(state.square_avg, 0.01 * grad**2)


def test_mala_acceptance_summed_in_pieces_equals_it_summed_at_once(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    weights, new_weights, grad, new_grad, precond = (
        torch.randn(3, 50, generator=generator) for _ in range(5)
    )
    anchor = torch.randn(50, generator=generator)
    losses, new_losses = torch.zeros(3), torch.full((3,), 1000.0)  # far uphill: rejected
    mask = torch.rand(3, 50, generator=generator) > 0.3
    arguments = (weights, new_weights, anchor, losses, new_losses, grad, new_grad)
    options = dict(
        step_size=chains(10.0), nbeta=5.0, localization=2.0, precond=0.5 + precond.abs(), mask=mask
    )
    whole = mala_log_acceptance(*arguments, **options)
    assert bool((whole < 0).all())  # not clamped: every term counts
    monkeypatch.setattr("llc_callbacks.samplers.PIECE", 7)  # 2 columns a piece for 3 chains
    torch.testing.assert_close(mala_log_acceptance(*arguments, **options), whole)


def test_each_chain_steps_with_its_own_step_size():
    weights, grad, noise, anchor = random_inputs()
    sizes = torch.tensor([1e-4, 1e-3, 1e-2])
    nbeta, gamma = 46.0, 2.0
    eps = sizes[:, None]
    expected = weights - eps / 2 * (nbeta * grad + gamma * (weights - anchor)) + eps.sqrt() * noise
    state, _ = sgld_step(
        SamplerState(weights.clone()),
        grad,
        anchor,
        adding(noise),
        step_size=sizes,
        nbeta=nbeta,
        localization=gamma,
    )
    torch.testing.assert_close(state.weights, expected)
    # A chain's MALA terms are its own step size's: the same as computing it alone.
    args = (weights, state.weights, anchor, torch.zeros(3), torch.zeros(3), grad, grad)
    together = mala_log_acceptance(*args, step_size=sizes, nbeta=nbeta, localization=gamma)
    for row in range(3):
        alone = mala_log_acceptance(
            *(a[row : row + 1] if a.dim() == 2 or a.shape == (3,) else a for a in args),
            step_size=sizes[row : row + 1],
            nbeta=nbeta,
            localization=gamma,
        )
        torch.testing.assert_close(alone[0], together[row])
