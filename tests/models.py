"""Small models with known learning coefficients, and fast in-memory batches."""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llc_callbacks import LLCConfig
from llc_callbacks.theory import deep_linear_network, regression_data

# Tiny chains for the tests that check plumbing, not accuracy.
TINY = LLCConfig(num_chains=2, num_burnin=5, num_draws=5)


def png_size(path) -> tuple[int, int]:
    """The width and height of a PNG file, read from its header."""
    with open(path, "rb") as file:
        data = file.read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# What every figure of llc_callbacks.plotting measures: FIGSIZE x DPI.
FIGURE_SIZE = (800, 450)


def fails_in_chains(loss_fn):
    """``loss_fn``, except that it raises where chains run (with gradients): the check at the
    start (without gradients) passes, every estimate fails."""

    def loss(model, batch):
        if torch.is_grad_enabled():
            raise RuntimeError("boom")
        return loss_fn(model, batch)

    return loss


def interrupted_at(loss_fn, now: Callable[[], int], step: int):
    """``loss_fn``, except that its first call where ``now()`` is ``step`` (inside that step's
    estimate) sends this process SIGINT, as Ctrl-C does: KeyboardInterrupt in the chains."""
    sent = []

    def loss(model, batch):
        if now() == step and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(model, batch)

    return loss


def dln_problem(widths: list[int], r: int, *, samples: int = 20_000, batch_size: int = 500):
    """The deep linear network of ``benchmarks/accuracy.py`` at its truth, and its data (unit
    noise; use ``llc_callbacks.theory.gaussian_nll``)."""
    model = deep_linear_network(widths, r)
    dataset = regression_data(model, widths[0], widths[-1], samples)
    return model, ShuffledBatches(*dataset.tensors, batch_size=batch_size)


class ShuffledBatches:
    """Minibatches of in-memory tensors, reshuffled on every pass by their own generator."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.tensors = tensors
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.tensors[0]), generator=self.generator)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            index = order[start : start + self.batch_size]
            yield tuple(t[index] for t in self.tensors)


def mse_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


class ReducedRankRegression(nn.Module):
    """``y = B A x`` with input M, hidden H, output N."""

    def __init__(self, m: int, h: int, n: int) -> None:
        super().__init__()
        self.a = nn.Linear(m, h, bias=False)
        self.b = nn.Linear(h, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def rrr_problem(m: int, h: int, n: int, r: int, *, samples: int = 8192, batch_size: int = 256):
    """A rank-``r`` teacher as the model (at the true parameter) and its noise-free data."""
    generator = torch.Generator().manual_seed(0)
    model = ReducedRankRegression(m, h, n)
    with torch.no_grad():
        a = torch.randn(h, m, generator=generator)
        b = torch.randn(n, h, generator=generator)
        a[r:] = 0
        b[:, r:] = 0
        model.a.weight.copy_(a)
        model.b.weight.copy_(b)
    return model, teacher_data(model, m, samples=samples, batch_size=batch_size)


class NormalCrossing(nn.Module):
    """``f(x) = w0 * w1**2 * x`` against targets 0: ``K(w) = w0**2 * w1**4``, so
    ``λ = min(1/2, 1/4) = 1/4`` at ``w* = 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w[0] * self.w[1] ** 2 * x


def teacher_data(model: nn.Module, inputs: int, *, samples: int = 8192, batch_size: int = 256):
    """Noise-free data labelled by ``model`` itself, so its weights are a minimum of the loss."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, inputs, generator=generator)
    with torch.no_grad():
        y = model(x)
    return ShuffledBatches(x, y, batch_size=batch_size)


class DropoutBatchNormNet(nn.Module):
    """A small classifier with the two layers whose train/eval behaviour differs."""

    def __init__(
        self, inputs: int = 6, hidden: int = 16, classes: int = 3, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def classification_batches(
    samples: int = 512, batch_size: int = 64, inputs: int = 6, seed: int = 0
):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=generator)
    y = (x[:, :3] @ torch.randn(3, 3, generator=generator)).argmax(dim=1)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, samples, batch_size)]


class LinearPlusRRR(nn.Module):
    """A regular linear map of x[:, :3] beside reduced-rank regression of x[:, 3:]: the loss is
    a sum over the two disjoint groups, so their learning coefficients add."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2, bias=False)  # 6 parameters: λ = 3
        self.rrr = ReducedRankRegression(5, 3, 5)  # rank 2 below: λ = 9.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.linear(x[:, :3]), self.rrr(x[:, 3:])], dim=1)


def linear_plus_rrr_problem(samples: int = 8192, batch_size: int = 256):
    """The model at a teacher's weights (RRR part of rank 2) and three noise-free data sets:
    both inputs, only the linear part's input, only the RRR part's input."""
    generator = torch.Generator().manual_seed(0)
    model = LinearPlusRRR()
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(2, 3, generator=generator))
        a = torch.randn(3, 5, generator=generator)
        b = torch.randn(5, 3, generator=generator)
        a[2:] = 0
        b[:, 2:] = 0
        model.rrr.a.weight.copy_(a)
        model.rrr.b.weight.copy_(b)
        x = torch.randn(samples, 8, generator=generator)
        only_linear, only_rrr = x.clone(), x.clone()
        only_linear[:, 3:] = 0
        only_rrr[:, :3] = 0
        sets = [
            ShuffledBatches(inputs, model(inputs), batch_size=batch_size, seed=i)
            for i, inputs in enumerate((x, only_linear, only_rrr))
        ]
    return model, *sets


# Chains that sample a Bowl closely (its relaxation time is under 40 of the 100 burn-in steps
# at the smallest sharpness, 0.1), cold and of fixed length, so that each estimate depends on
# its step alone and a resumed run repeats an uninterrupted one.
BOWL_CONFIG = LLCConfig(
    num_chains=8,
    num_burnin=100,
    num_draws=200,
    relative_error=None,
    warm_start=False,
    step_size=0.005,
    localization=10.0,
    nbeta=10.0,
    mala=False,
)
# Where the Bowl's LLC turns: it rises until step 12, falls until step 24, then stays flat.
BOWL_TURNS = (12, 24)


def bowl_sharpness(step: int) -> float:
    """The Bowl's sharpness after ``step`` steps: 0.1 up to 10 (log-linearly), back, flat."""
    rise, fall = BOWL_TURNS
    if step <= rise:
        exponent = -1 + 2 * step / rise
    else:
        exponent = max(-1.0, 1 - 2 * (step - rise) / (fall - rise))
    return 10.0**exponent


class Bowl(nn.Module):
    """``sharpness / 2 * ||w - w*||^2`` in ``weights`` weights, at its minimum ``w* = 0``.

    Gradients vanish at ``w*``, so training leaves the weights there, and the LLC follows the
    sharpness ``a``, which a test sets from the step (``bowl_sharpness``): chains with inverse
    temperature nβ and localization γ sample a Gaussian of precision nβa + γ per weight, so
    the estimate is about ``weights / 2 * nβa / (nβa + γ)``, from 0.9 to 9.1 under BOWL_CONFIG.
    """

    def __init__(self, weights: int = 20) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(weights))
        self.sharpness = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sharpness * self.w.square().sum() / 2 + 0 * x.sum()
