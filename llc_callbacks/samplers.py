"""SGLD update rules over stacked chains.

Each rule updates flat weights of shape ``(chains, dim)`` in place: it takes the current
state, the gradient of the mean minibatch loss and a function that adds standard normal
noise, and returns the state with what the step used (as BlackJAX kernels return
``(state, info)``). In place, a chain holds its weights and gradient and nothing else of
their size (RMSprop: its running mean too). The loop that draws batches and noise lives in
``chains``.

The step (Welling and Teh convention, as in Lau et al. 2023 and devinterp)::

    w <- w - (eps / 2) * (nbeta * grad + gamma * (w - w_star)) + sqrt(eps) * xi
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

# Noise is drawn, and sums over weights are taken, in pieces of about this many numbers
# (16 MB in float32), so that no temporary of the weights' size is needed.
PIECE = 1 << 22

AddNoise = Callable[[Tensor, Tensor, Tensor | None], None]
"""``add_noise(weights, scale, factor)`` adds ``scale * factor * xi`` to ``weights`` in place,
``xi`` standard normal of the weights' shape, ``scale`` one number per chain, shape
``(chains,)`` (``factor`` ``None``: 1)."""


class SamplerState(NamedTuple):
    """What a chain carries from one step to the next.

    Attributes:
        weights: Flat weights, shape ``(chains, dim)``.
        square_avg: RMSprop running mean of squared loss gradients, same shape; ``None`` for
            plain SGLD.
    """

    weights: Tensor
    square_avg: Tensor | None = None


class StepInfo(NamedTuple):
    """What a step used besides the state, for checks such as MALA's acceptance.

    Attributes:
        precond: The diagonal preconditioner ``G`` of the step, or ``None`` (plain SGLD).
    """

    precond: Tensor | None = None


def sgld_step(
    state: SamplerState,
    grad: Tensor,
    anchor: Tensor,
    add_noise: AddNoise,
    *,
    step_size: Tensor,
    nbeta: float,
    localization: float,
) -> tuple[SamplerState, StepInfo]:
    """One SGLD step, in place on ``state.weights``.

    Args:
        state: Current weights.
        grad: Gradient of the mean minibatch loss at ``state.weights``; only read.
        anchor: The weights ``w*`` the chains are localized around, shape ``(dim,)``.
        add_noise: Adds standard normal noise (see ``AddNoise``).
        step_size: Each chain's step size epsilon, shape ``(chains,)``.
        nbeta: Inverse temperature multiplying the loss gradient.
        localization: Strength gamma of the pull towards ``anchor`` (not multiplied by nbeta).

    Returns:
        The state (its weights updated), and an empty ``StepInfo``.
    """
    # w + (eps * gamma / 2) * (w* - w) is a lerp; then the gradient and noise terms: three
    # passes over memory, no temporary of the weights' size.
    step_size = step_size.to(state.weights.dtype)
    eps = step_size[:, None]
    weights = state.weights.lerp_(anchor, eps * (localization / 2))
    weights.addcmul_(grad, eps, value=-nbeta / 2)
    add_noise(weights, step_size.sqrt(), None)
    return state, StepInfo()


def rmsprop_sgld_step(
    state: SamplerState,
    grad: Tensor,
    anchor: Tensor,
    add_noise: AddNoise,
    *,
    step_size: Tensor,
    nbeta: float,
    localization: float,
    alpha: float,
    eps: float,
) -> tuple[SamplerState, StepInfo]:
    """One RMSprop-preconditioned SGLD step (Hitchcock and Hoogland 2025), in place.

    The running mean ``v`` sees the loss gradient only; the preconditioner
    ``G = 1 / (sqrt(v) + eps)`` scales drift and localization, ``sqrt(G)`` scales the noise.
    Weights and ``v`` are updated in place; ``G`` and the drift are two temporaries of the
    weights' size.

    Args:
        state: Current weights and running mean of squared gradients (``None``: zeros).
        grad: Gradient of the mean minibatch loss at ``state.weights``; only read.
        anchor: The weights ``w*`` the chains are localized around, shape ``(dim,)``.
        add_noise: Adds standard normal noise (see ``AddNoise``).
        step_size: Each chain's step size epsilon, shape ``(chains,)``.
        nbeta: Inverse temperature multiplying the loss gradient.
        localization: Strength gamma of the pull towards ``anchor``.
        alpha: Decay of the running mean.
        eps: Added to ``sqrt(v)`` before inverting.

    Returns:
        The state (weights and ``v`` updated), and the preconditioner ``G`` it used.
    """
    weights = state.weights
    step_size = step_size.to(weights.dtype)
    square_avg = state.square_avg if state.square_avg is not None else torch.zeros_like(weights)
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    precond = square_avg.sqrt().add_(eps).reciprocal_()
    drift = torch.sub(weights, anchor).mul_(localization).add_(grad, alpha=nbeta).mul_(precond)
    weights.addcmul_(drift, step_size[:, None], value=-0.5)
    # The drift's buffer is free now: it holds sqrt(G), and G stays intact for StepInfo.
    add_noise(weights, step_size.sqrt(), torch.sqrt(precond, out=drift))
    return SamplerState(weights, square_avg), StepInfo(precond)


def mala_log_acceptance(
    weights: Tensor,
    new_weights: Tensor,
    anchor: Tensor,
    losses: Tensor,
    new_losses: Tensor,
    grad: Tensor,
    new_grad: Tensor,
    *,
    step_size: Tensor,
    nbeta: float,
    localization: float,
    precond: Tensor | None = None,
    mask: Tensor | None = None,
    total: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Log Metropolis-Hastings acceptance of a Langevin step, as MALA would compute it.

    With the potential ``U(w) = nbeta * L(w) + gamma/2 * ||w - w*||^2`` and a diagonal
    preconditioner ``G`` (1 for SGLD), the step proposes
    ``w' = w - eps/2 G grad U(w) + sqrt(eps G) xi``; MALA accepts it with probability
    ``min(1, exp(U(w) - U(w')) q(w | w') / q(w' | w))``. SGLD never rejects, but an acceptance
    near 0.9 says the step size keeps discretization error small.

    Args:
        weights: Weights before the step, shape ``(chains, dim)``.
        new_weights: Weights after the step.
        anchor: ``w*``, shape ``(dim,)``.
        losses: ``L_m(w)`` per chain.
        new_losses: ``L_m(w')`` per chain, on the same minibatch.
        grad: ``grad L_m(w)``.
        new_grad: ``grad L_m(w')``, on the same minibatch.
        step_size: Each chain's step size epsilon, shape ``(chains,)``.
        nbeta: Inverse temperature.
        localization: Strength gamma of the pull towards ``anchor``.
        precond: The diagonal preconditioner ``G`` of the step, or ``None`` for SGLD.
        mask: Which weights each chain moves (restricted chains); ``None``: all.
        total: Completes per-chain sums over these weights to sums over all of them (the
            other ranks' shards of a sharded model); ``None``: these are all.

    Returns:
        ``log min(1, acceptance ratio)`` per chain.
    """
    step_size = step_size.to(weights.dtype)
    sums = torch.zeros_like(losses)
    # Every other term is a sum over weights: summed in pieces of about PIECE numbers, so that
    # no temporary of the weights' size is made.
    width = max(1, PIECE // len(weights))
    for start in range(0, weights.shape[1], width):
        columns = slice(start, start + width)
        w, new_w, w_star = weights[:, columns], new_weights[:, columns], anchor[columns]
        g = None if precond is None else precond[:, columns]
        moved = None if mask is None else mask[:, columns]
        step = {"w_star": w_star, "g": g, "moved": moved, "step_size": step_size}
        step.update(nbeta=nbeta, localization=localization)
        sums += (localization / 2) * (
            (w - w_star).square().sum(dim=1) - (new_w - w_star).square().sum(dim=1)
        )
        sums += _log_proposal(w, new_w, new_grad[:, columns], **step)
        sums -= _log_proposal(new_w, w, grad[:, columns], **step)
    if total is not None:
        sums = total(sums)
    return (nbeta * (losses - new_losses) + sums).clamp(max=0.0)


def _log_proposal(
    to: Tensor,
    start: Tensor,
    start_grad: Tensor,
    *,
    w_star: Tensor,
    g: Tensor | None,
    moved: Tensor | None,
    step_size: Tensor,
    nbeta: float,
    localization: float,
) -> Tensor:
    """``log q(to | start)`` per chain, up to a constant, over some columns of the weights."""
    drift = start_grad * nbeta + (start - w_star) * localization
    if g is not None:
        drift = drift * g
    squares = (to - start + drift * (step_size[:, None] / 2)).square()
    if g is not None:
        squares = squares / g
    if moved is not None:  # a restricted chain proposes moves inside its mask only
        squares = squares * moved
    return -squares.sum(dim=1) / (2 * step_size)
