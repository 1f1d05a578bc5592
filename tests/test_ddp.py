"""LLCCallback under strategy="ddp" with 2 CPU processes (gloo), run as a script."""

import csv
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_script import CONFIG, STEPS, estimate_loader, loss_fn, observables
from lightning_helpers import Classifier
from processes import python

from llc_callbacks import LLCMonitor

pytestmark = pytest.mark.slow  # make test-fast skips it

HERE = Path(__file__).parent


def run_script(out: Path, mode: str) -> subprocess.CompletedProcess:
    return python(HERE / "ddp_script.py", out, mode)


def logged_llc_steps(out: Path) -> list[int]:
    (metrics,) = out.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics) as file:
        return [int(r["step"]) for r in csv.DictReader(file) if r["llc/mean"]]


@pytest.mark.parametrize("mode", ["ok", "one_in_flight", "stream"])
def test_ddp_splits_chains_logs_once_and_matches_a_single_process(tmp_path, mode):
    done = run_script(tmp_path, mode)
    assert done.returncode == 0, done.stderr[-3000:]
    histories = [json.loads((tmp_path / f"history_{r}.json").read_text()) for r in (0, 1)]
    assert histories[0] == histories[1]  # every rank ends with the same numbers
    assert [row["step"] for row in histories[0]] == STEPS
    assert logged_llc_steps(tmp_path) == STEPS  # rank zero logged each estimate once
    # Health checks (10 draws: chains disagree) are warned about on rank zero only.
    # The chains sample a loader of the script's own, whose batches count as they are.
    assert [json.loads((tmp_path / f"batches_{r}.json").read_text()) for r in (0, 1)] == [None] * 2
    shown = [json.loads((tmp_path / f"warnings_{r}.json").read_text()) for r in (0, 1)]
    if mode == "stream":  # tuned at step 4, continued at step 8 on each chain's rank
        assert [row["llc/tuned"] for row in histories[0]] == [1.0, 0.0]
        assert histories[0][1]["llc/diag/warm"] == 1.0
    else:  # a continuing reading judges no R-hat of its own, so only these warn
        assert any(message.startswith("llc_callbacks: at step ") for message in shown[0])
    assert shown[1] == []

    # One process, the same weights, batches and seeds: 3 chains in one vmap instead of 2 + 1
    # (or, with one in flight, 1 + 1 + 1).
    # Streaming: the tuning reading, then the same chains continued on their ranks.
    stream = mode == "stream"
    single = LLCMonitor(
        CONFIG, steps=STEPS, distributed=False, observables=observables(), stream=stream
    )
    for step, row in zip(STEPS, histories[0], strict=True):
        module = Classifier(dropout=0.0)
        module.load_state_dict(torch.load(tmp_path / f"weights_{step}.pt"))
        single.estimate(step, module, loss_fn, estimate_loader())
        metrics = single.history[-1]
        chains = [f"llc/chain_{i}" for i in range(3)]
        # Only float rounding differs between batched sizes (about 1e-7 per step).
        np.testing.assert_allclose(
            [row[k] for k in chains], [metrics[k] for k in chains], rtol=1e-4, atol=1e-6
        )
        # The observables recorded on each rank travel with its chains: the kernel of all
        # 3 chains' records is the single process's, up to the same rounding.
        kernel = "llc/kernel/probe:probe"
        np.testing.assert_allclose(row[kernel], metrics[kernel], rtol=1e-3, atol=1e-5)


def test_a_failure_on_one_rank_is_reported_on_all_without_deadlock(tmp_path):
    done = run_script(tmp_path, "fail_on_rank_1")
    assert done.returncode == 0, done.stderr[-3000:]
    shown = [json.loads((tmp_path / f"warnings_{r}.json").read_text()) for r in (0, 1)]
    for messages in shown:  # each rank warns about the estimates it could not make
        failures = [m for m in messages if "estimate at step" in m]
        assert len(failures) == len(STEPS)
        assert all(
            "failed on rank 1: RuntimeError: chains failed on rank 1 only" in m for m in failures
        )
    histories = [json.loads((tmp_path / f"history_{r}.json").read_text()) for r in (0, 1)]
    for history in histories:
        assert [row["step"] for row in history] == STEPS
        assert all(math.isnan(row["llc/mean"]) for row in history)
    assert logged_llc_steps(tmp_path) == STEPS


def test_a_budget_plans_the_same_steps_on_every_rank(tmp_path):
    # Each rank times its own training; their plans differ unless they agree on one.
    done = run_script(tmp_path, "budget")
    assert done.returncode == 0, done.stderr[-3000:]
    histories = [json.loads((tmp_path / f"history_{r}.json").read_text()) for r in (0, 1)]
    steps = [row["step"] for row in histories[0]]
    assert steps == [row["step"] for row in histories[1]]
    assert len(steps) >= 2 and steps[0] == 1
    assert logged_llc_steps(tmp_path) == steps
    # The chains sample the trainer's batches: nbeta="batch" counts both ranks' of a step.
    assert [json.loads((tmp_path / f"batches_{r}.json").read_text()) for r in (0, 1)] == [2, 2]


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    assert not torch.distributed.is_initialized()
