"""The ``max_overhead`` budget: a ceiling on the estimates' share of the time, paced by the LLC
(issue: developmental stages)."""

import itertools

import pytest
import torch
from clocks import Clock
from models import TINY, ShuffledBatches

from llc_callbacks import LLCConfig, LLCMonitor
from llc_callbacks import budget as budget_module
from llc_callbacks.budget import PACE_FLAT, PACE_MOVING, Budget, pace


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    return clock


def train(budget, clock, steps, step_seconds, estimate_seconds, paces):
    """Steps of ``step_seconds`` each; an estimate of ``estimate_seconds`` where allowed.

    Returns:
        The steps estimated after, and the overhead after each estimate.
    """
    estimated, overheads = [], []
    for step in range(1, steps + 1):
        clock.now += step_seconds
        if budget.allows(step):
            budget.begin(step)
            clock.now += estimate_seconds
            budget.end(step, paces(step))
            estimated.append(step)
            overheads.append(budget.overhead())
    return estimated, overheads


def test_the_ceiling_holds_after_every_estimate_and_the_budget_is_used(clock):
    budget = Budget(0.1)
    estimated, overheads = train(budget, clock, 2000, 1.0, 5.0, lambda step: 1.0)
    assert estimated[0] == 1  # the first runs when due, before its cost is known
    # From the second estimate on, the total stays within the budget...
    assert all(overhead <= 0.1 + 1e-9 for overhead in overheads[1:])
    # ...and uses it: one estimate (5 s) per 50 s of training.
    assert budget.overhead() == pytest.approx(0.1, rel=0.05)
    assert all(b - a == 50 for a, b in itertools.pairwise(estimated[1:]))


def test_estimates_come_sooner_where_the_llc_moves_within_the_same_ceiling(clock):
    budget = Budget(0.1)

    def paces(step):  # flat for the first 1000 steps, then moving
        return PACE_FLAT if step <= 1000 else PACE_MOVING

    estimated, overheads = train(budget, clock, 2000, 1.0, 5.0, paces)
    flat = [b - a for a, b in itertools.pairwise(estimated) if b <= 1000]
    moving = [b - a for a, b in itertools.pairwise(estimated) if a > 1000]
    assert set(flat[1:]) == {100}  # twice the even spacing: credit builds up
    assert min(moving) == 25  # half of it, while the credit lasts
    assert all(overhead <= 0.1 + 1e-9 for overhead in overheads[1:])


def test_the_clock_is_read_again_at_the_planned_step(clock):
    # Steps take 1 s, then 0.25 s: a step planned from the mean step time comes too early,
    # and the budget plans a later one instead of going over.
    budget = Budget(0.1)
    estimated, overheads = [], []
    for step in range(1, 3001):
        clock.now += 1.0 if step <= 200 else 0.25
        if budget.allows(step):
            budget.begin(step)
            clock.now += 5.0
            budget.end(step, 1.0)
            estimated.append(step)
            overheads.append(budget.overhead())
    assert len(estimated) > 5
    assert all(overhead <= 0.1 + 1e-9 for overhead in overheads[1:])


def test_with_a_schedule_the_budget_is_a_ceiling(clock):
    def loss_fn(module, batch):  # each call costs 0.1 s of the stand-in clock
        clock.now += 0.1
        return torch.nn.functional.mse_loss(module(batch[0]), batch[1])

    x = torch.randn(64, 4)
    data = ShuffledBatches(x, x[:, :1], batch_size=16)
    model = torch.nn.Linear(4, 1)
    monitor = LLCMonitor(TINY, every_n_steps=10, at_end=True, max_overhead=0.05, stream=False)
    for step in range(1, 1001):
        clock.now += 1.0
        monitor.maybe_estimate(step, model, loss_fn, data, final=step == 1000)
    steps = [row["step"] for row in monitor.history]
    assert all(step % 10 == 0 for step in steps)  # only where the schedule has one
    assert 3 < len(steps) < 50, steps  # fewer than the 100 it has
    assert monitor.budget.overhead() <= 0.05


def rows(means, std=0.4, chains=4):
    return [
        {"step": i, "llc/mean": m, "llc/std": std, **{f"llc/chain_{c}": m for c in range(chains)}}
        for i, m in enumerate(means)
    ]


def test_pace_reads_how_far_the_llc_moved_in_standard_errors():
    # Standard error of the change: hypot(0.4, 0.4) / sqrt(4) = 0.28.
    assert pace(rows([1.0, 2.0]), "llc") == PACE_MOVING  # 3.5 standard errors
    assert pace(rows([1.0, 1.1]), "llc") == PACE_FLAT  # 0.35
    assert pace(rows([1.0, 1.4]), "llc") == 1.0  # 1.4
    assert pace(rows([1.0]), "llc") == 1.0
    assert pace(rows([1.0, float("nan")]), "llc") == 1.0


def test_a_budgeted_monitor_keeps_its_overhead_in_a_training_loop(clock):
    # The stand-in clock counts work, so that no load on the machine can move the verdict: a
    # training step costs 5 ms and each call of the loss 1 ms, training's and the chains'.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(256, 4)
    data = ShuffledBatches(x, x.sum(1, keepdim=True), batch_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss_fn(module, batch):
        clock.now += 1e-3
        return torch.nn.functional.mse_loss(module(batch[0]), batch[1])

    monitor = LLCMonitor(LLCConfig(num_burnin=20, num_draws=20), max_overhead=0.2, stream=False)
    inside = 0.0
    for step, batch in zip(range(1, 601), iter_forever(data), strict=False):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        clock.now += 5e-3
        mark = clock.now
        monitor.maybe_estimate(step, model, loss_fn, data)
        inside += clock.now - mark
    assert len(monitor.history) >= 4
    assert inside / (clock.now - inside) <= 0.2


def iter_forever(data):
    while True:
        yield from data


def test_bad_budgets_are_refused_naming_the_argument():
    for bad in (0, -0.1, float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="max_overhead must be a finite number > 0"):
            LLCMonitor(TINY, max_overhead=bad)
