"""Chains that tune themselves: step sizes adapted towards a MALA acceptance, burn-ins that end
when chains settle, draws that stop when the estimate is precise, and warm starts."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from models import DropoutBatchNormNet, classification_batches, cross_entropy

from llc_callbacks import LLCConfig, LLCMonitor, Restrictions, estimate_llc
from llc_callbacks.adaptation import MIN_DRAWS, StepSizes, precise, settled
from llc_callbacks.chains import COLD_MARGIN, MAX_RESTARTS, ChainStart, _Phases

# An isotropic quadratic in DIM dimensions: its localized posterior is N(0, I / H) with
# H = nbeta * CURVATURE + gamma, and MALA's acceptance depends on the step size alone.
DIM, CURVATURE, NBETA, GAMMA = 200, 1.0, 50.0, 1.0


class Quadratic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(DIM))

    def forward(self, batch):
        return 0.5 * CURVATURE * self.w.square().sum() + 0 * batch.sum()


def quadratic_loss(model, batch):
    return model(batch)


def mala_acceptance(step_size: float, samples: int = 20_000) -> float:
    """MALA's mean acceptance at equilibrium for N(0, I / H), by exact Monte Carlo."""
    rng = np.random.default_rng(0)
    h = NBETA * CURVATURE + GAMMA
    w = rng.normal(0, 1 / math.sqrt(h), (samples, DIM))
    new = w - step_size / 2 * h * w + math.sqrt(step_size) * rng.normal(size=(samples, DIM))

    def log_q(to, start):
        return -np.square(to - start + step_size / 2 * h * start).sum(1) / (2 * step_size)

    potential = 0.5 * h * (np.square(w).sum(1) - np.square(new).sum(1))
    log_ratio = potential + log_q(w, new) - log_q(new, w)
    return float(np.minimum(1.0, np.exp(log_ratio)).mean())


def step_size_for(target: float) -> float:
    """The step size whose equilibrium acceptance is ``target``, by bisection in log space."""
    low, high = 1e-5, 1e-1
    for _ in range(40):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if mala_acceptance(middle) > target else (low, middle)
    return math.sqrt(low * high)


def test_adaptation_reaches_the_step_size_whose_acceptance_is_the_target():
    known = step_size_for(0.9)
    config = LLCConfig(
        num_chains=4, num_burnin=1000, num_draws=200, nbeta=NBETA, localization=GAMMA
    )
    result = estimate_llc(Quadratic(), quadratic_loss, [torch.zeros(8)] * 4, config, warn=False)
    # Each chain adapts on its own single-step acceptances: 200 of them here, each near 0 or
    # 1 at this size, so its average is within about +-0.03 of the target and the step size
    # within about +-25% of the known one (the acceptance falls by about 1.5 per unit of
    # log step size near 0.9 here: 0.03 / 1.5 = 2% in log space, and the search's first
    # estimate is at most sqrt(2) off before refining).
    np.testing.assert_allclose(result.step_sizes, known, rtol=0.25)
    # The quadratic's LLC is DIM / 2 in the limit; at this nbeta and gamma the localized
    # posterior gives DIM / 2 * nbeta h / (nbeta h + gamma), and the chains at the adapted
    # step size land within their standard error (4 chains) and SGLD's step-size bias.
    expected = DIM / 2 * NBETA * CURVATURE / (NBETA * CURVATURE + GAMMA)
    assert result.llc_mean == pytest.approx(expected, rel=0.1)
    assert result.diagnostics["mala_acceptance"] == pytest.approx(0.9, abs=0.08)


def test_a_fixed_step_size_stays_fixed_and_burns_in_for_num_burnin():
    model, data = DropoutBatchNormNet(), classification_batches()
    config = LLCConfig(num_chains=2, num_burnin=60, num_draws=40, step_size=3e-4)
    result = estimate_llc(model, cross_entropy, data, config, warn=False)
    assert result.step_sizes.tolist() == pytest.approx([3e-4, 3e-4])
    assert result.burnin.tolist() == [60, 60] and result.draws.tolist() == [40, 40]


def test_draws_stop_once_the_estimate_is_precise_and_not_before_min_draws():
    config = LLCConfig(num_chains=2, num_burnin=300, num_draws=600, nbeta=NBETA)
    data = [torch.zeros(8)] * 4
    loose = estimate_llc(Quadratic(), quadratic_loss, data, config, warn=False)
    assert all(MIN_DRAWS <= d < 600 for d in loose.draws)  # about 5% reached early
    full = dataclasses.replace(config, relative_error=None)
    every = estimate_llc(Quadratic(), quadratic_loss, data, full, warn=False)
    assert every.draws.tolist() == [600, 600]
    assert np.isnan(loose.loss_trace[:, loose.draws.max() :]).all()


def test_settled_tells_a_rising_series_from_a_level_one():
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    rising = 100 * (1 - np.exp(-steps / 300)) + rng.normal(0, 1, 400)
    level = 100 + rng.normal(0, 1, 400)
    # An AR(1) series with correlation 0.9: its window means wander by more than iid noise,
    # which the inflated standard error allows for.
    correlated = np.empty(400)
    correlated[0] = 0
    for t in range(1, 400):
        correlated[t] = 0.9 * correlated[t - 1] + rng.normal(0, 1)
    assert not settled(rising)
    assert settled(level) and settled(100 + correlated)


def test_precise_compares_the_standard_error_with_the_estimate():
    rng = np.random.default_rng(0)
    draws = 10 + rng.normal(0, 1, 200)  # se 0.07, against 5% of 10 times sqrt(4)
    assert precise(draws, chains=4, relative_error=0.05)
    assert not precise(draws - 9.9, chains=4, relative_error=0.05)  # the same se, mean 0.1


def test_the_search_ends_where_the_acceptance_crosses_the_target_and_restarts_shrink():
    steps = StepSizes(torch.full((2,), 1e-3, dtype=torch.float64), True, 0.9)
    adapting = torch.tensor([True, True])
    for _ in range(3):  # accepted: the search grows the step size by sqrt(2) each time
        assert not steps.update(torch.ones(2), adapting).any()
    np.testing.assert_allclose(steps.current, 1e-3 * 2**1.5)
    ended = steps.update(torch.tensor([0.0, 1.0]), adapting)
    assert ended.tolist() == [True, False]  # the first chain's acceptance fell below
    assert steps.current[0] == pytest.approx(1e-3 * 2)  # back to the last size accepted
    steps.restart(torch.tensor([False, True]))
    assert steps.current[1] == pytest.approx(1e-3 * 2**2 / 10)


def test_a_chain_heating_up_in_its_burn_in_starts_over_with_smaller_steps(monkeypatch):
    # The burn-in's watched acceptances are replaced by a constant: below the target's margin
    # every window of HEAT_CHECKS cools the chain (at most MAX_RESTARTS times), above it none;
    # until the first window ends, the two runs are the same chains.
    watch = _Phases.watch
    config = LLCConfig(num_chains=2, num_burnin=1500, num_draws=100, nbeta=NBETA)
    step_sizes = {}
    for acceptance in (0.5, 0.95):
        monkeypatch.setattr(
            _Phases,
            "watch",
            lambda self, rows, t, a, c=acceptance: watch(self, rows, t, torch.full_like(a, c)),
        )
        data = [torch.zeros(8)] * 4
        result = estimate_llc(Quadratic(), quadratic_loss, data, config, warn=False)
        step_sizes[acceptance] = result.step_sizes
    ratio = step_sizes[0.5] / step_sizes[0.95]
    np.testing.assert_allclose(ratio, COLD_MARGIN**MAX_RESTARTS, rtol=1e-6)


class TwoQuadratics(torch.nn.Module):
    """Two blocks of weights, the second 16 times as curved: a restriction to the first
    needs other step sizes than the whole."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = torch.nn.Parameter(torch.zeros(DIM // 2))
        self.sharp = torch.nn.Parameter(torch.zeros(DIM // 2))

    def forward(self, batch):
        return 0.5 * self.flat.square().sum() + 8 * self.sharp.square().sum() + 0 * batch.sum()


def test_waves_and_restrictions_adapt_each_chain_on_its_own():
    model, data = TwoQuadratics(), [torch.zeros(8)] * 4
    config = LLCConfig(num_chains=3, num_burnin=450, num_draws=150, nbeta=NBETA)
    restrictions = Restrictions(weights={"flat": "flat"})
    together = estimate_llc(model, quadratic_loss, data, config, restrictions=restrictions)
    one_by_one = estimate_llc(
        model,
        quadratic_loss,
        data,
        dataclasses.replace(config, chains_in_flight=1),
        restrictions=restrictions,
    )
    # A chain's adaptation, burn-in and draws depend on it alone: only float rounding differs
    # between one vmapped batch and chains one at a time (about 1e-7 a step, carried through
    # 250 adapted steps: measured 6e-4 relative in a step size; 5e-3 allows 8x that).
    for a, b in (
        (together, one_by_one),
        (together.restricted["flat"], one_by_one.restricted["flat"]),
    ):
        np.testing.assert_allclose(a.step_sizes, b.step_sizes, rtol=5e-3)
        assert a.burnin.tolist() == b.burnin.tolist() and a.draws.tolist() == b.draws.tolist()
        np.testing.assert_allclose(a.llc_per_chain, b.llc_per_chain, rtol=5e-3, atol=1e-3)
    # The restriction to the flat block adapts to its own curvature: larger steps.
    assert together.restricted["flat"].step_sizes.min() > 2 * together.step_sizes.max()


def test_a_warm_start_begins_where_the_last_estimate_ended():
    model, data = Quadratic(), [torch.zeros(8)] * 4
    config = LLCConfig(num_chains=2, num_burnin=600, num_draws=200, nbeta=NBETA, localization=GAMMA)
    first = estimate_llc(model, quadratic_loss, data, config, warn=False, keep_ends=True)
    assert not first.warm and first.diagnostics["warm"] == 0.0
    offsets = [end.offset for end in first.ends]
    assert all(o.shape == (DIM,) and o.device.type == "cpu" for o in offsets)
    # A chain ends spread around w* as the posterior is: |offset|^2 about DIM / H.
    h = NBETA * CURVATURE + GAMMA
    assert all(0.5 < float(o.square().sum()) * h / DIM < 2 for o in offsets)
    later = dataclasses.replace(config, seed=1)
    second = estimate_llc(model, quadratic_loss, data, later, warn=False, start=first.starts)
    assert second.warm and second.diagnostics["warm"] == 1.0
    assert (second.burnin < first.burnin).all()  # no adaptation from scratch, settled early
    np.testing.assert_allclose(second.step_sizes, first.step_sizes, rtol=0.3)
    # The same posterior: the two estimates agree within their chains' spread.
    spread = math.hypot(first.llc_std, second.llc_std)
    assert abs(second.llc_mean - first.llc_mean) < 3 * spread
    # A start that does not fit the weights (another model's) keeps its step size only.
    wrong = {None: [ChainStart(torch.zeros(3), 1e-4), None]}
    cold = estimate_llc(model, quadratic_loss, data, config, warn=False, start=wrong)
    assert not cold.warm


def test_the_monitor_warm_starts_every_estimate_after_the_first():
    model, data = Quadratic(), [torch.zeros(8)] * 4
    config = LLCConfig(num_chains=2, num_burnin=600, num_draws=150, nbeta=NBETA)
    monitor = LLCMonitor(config, every_n_steps=1, extra_metrics=("diagnostics",), stream=False)
    warm = [monitor.maybe_estimate(step, model, quadratic_loss, data) for step in (1, 2, 3)]
    assert [m["llc/diag/warm"] for m in warm] == [0.0, 1.0, 1.0]
    # Later estimates cost less: shorter burn-ins.
    assert warm[2]["llc/diag/burnin"] < warm[0]["llc/diag/burnin"]
    cold = LLCMonitor(dataclasses.replace(config, warm_start=False), every_n_steps=1, stream=False)
    for step in (1, 2):
        cold.maybe_estimate(step, model, quadratic_loss, data)
    assert not cold.last_result.warm
