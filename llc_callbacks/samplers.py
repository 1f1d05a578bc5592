"""SGLD update rules over stacked chains.

Each rule is a pure function of flat weights of shape ``(chains, dim)``: it takes the current
state, the gradient of the mean minibatch loss and standard normal noise, and returns the
next state. The loop that draws batches and noise lives in the estimator.

The step (Welling and Teh convention, as in Lau et al. 2023 and devinterp)::

    w <- w - (eps / 2) * (nbeta * grad + gamma * (w - w_star)) + sqrt(eps) * xi
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class SamplerState(NamedTuple):
    """What a chain carries from one step to the next.

    Attributes:
        weights: Flat weights, shape ``(chains, dim)``.
        square_avg: RMSprop running mean of squared loss gradients, same shape; ``None`` for
            plain SGLD.
    """

    weights: Tensor
    square_avg: Tensor | None = None


def sgld_step(
    state: SamplerState,
    grad: Tensor,
    noise: Tensor,
    anchor: Tensor,
    *,
    step_size: float,
    nbeta: float,
    localization: float,
) -> SamplerState:
    """One SGLD step.

    Args:
        state: Current weights.
        grad: Gradient of the mean minibatch loss at ``state.weights``.
        noise: Standard normal noise, same shape as the weights.
        anchor: The weights ``w*`` the chains are localized around, shape ``(dim,)``.
        step_size: Step size epsilon.
        nbeta: Inverse temperature multiplying the loss gradient.
        localization: Strength gamma of the pull towards ``anchor`` (not multiplied by nbeta).

    Returns:
        The state after the step.
    """
    # w + (eps * gamma / 2) * (w* - w) is a lerp; then the gradient and noise terms, in place
    # on the new tensor: three passes over memory instead of six.
    new = torch.lerp(state.weights, anchor, step_size * localization / 2)
    new.add_(grad, alpha=-step_size * nbeta / 2).add_(noise, alpha=math.sqrt(step_size))
    return SamplerState(new)


def rmsprop_sgld_step(
    state: SamplerState,
    grad: Tensor,
    noise: Tensor,
    anchor: Tensor,
    *,
    step_size: float,
    nbeta: float,
    localization: float,
    alpha: float,
    eps: float,
) -> SamplerState:
    """One RMSprop-preconditioned SGLD step (Hitchcock and Hoogland 2025).

    The running mean ``v`` sees the loss gradient only; the preconditioner
    ``G = 1 / (sqrt(v) + eps)`` scales drift and localization, ``sqrt(G)`` scales the noise.

    Args:
        state: Current weights and running mean of squared gradients.
        grad: Gradient of the mean minibatch loss at ``state.weights``.
        noise: Standard normal noise, same shape as the weights.
        anchor: The weights ``w*`` the chains are localized around, shape ``(dim,)``.
        step_size: Step size epsilon.
        nbeta: Inverse temperature multiplying the loss gradient.
        localization: Strength gamma of the pull towards ``anchor``.
        alpha: Decay of the running mean.
        eps: Added to ``sqrt(v)`` before inverting.

    Returns:
        The state after the step.
    """
    weights = state.weights
    square_avg = state.square_avg if state.square_avg is not None else torch.zeros_like(weights)
    square_avg = torch.lerp(square_avg, grad.square(), 1 - alpha)
    precond = (square_avg.sqrt() + eps).reciprocal()
    drift = (weights - anchor).mul_(localization).add_(grad, alpha=nbeta).mul_(precond)
    new = torch.add(weights, drift, alpha=-step_size / 2)
    new.addcmul_(precond.sqrt_(), noise, value=math.sqrt(step_size))
    return SamplerState(new, square_avg)
