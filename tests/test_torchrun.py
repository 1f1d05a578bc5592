"""LLCTrainerCallback under torchrun --nproc_per_node=2 on CPU (gloo)."""

import json
import math
from pathlib import Path

import pytest
from processes import TORCHRUN, run
from torchrun_script import CHECK_LOSS_CALLS, STEPS, loss_calls_per_estimate

pytestmark = pytest.mark.slow  # make test-fast skips it

HERE = Path(__file__).parent


def two_ranks(script: str, out: Path) -> list[dict]:
    """Run ``tests/<script>`` under torchrun with 2 processes; each rank's JSON record."""
    done = run([*TORCHRUN, HERE / script, out])
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]


def test_torchrun_splits_chains_and_logs_once_per_scheduled_step(tmp_path):
    records = two_ranks("torchrun_script.py", tmp_path)
    assert all(record["world_size"] == 2 for record in records)
    # Rank 0 ran chains 0 and 2, rank 1 chain 1; all were gathered on every rank.
    assert [record["loss_calls"] for record in records] == [
        CHECK_LOSS_CALLS + len(STEPS) * loss_calls_per_estimate(chains) for chains in (2, 1)
    ]
    assert records[0]["history"] == records[1]["history"]
    assert [row["step"] for row in records[0]["history"]] == STEPS
    assert all(math.isfinite(row["llc/mean"]) for row in records[0]["history"])
    main = next(record for record in records if record["is_world_process_zero"])
    logged = [row["step"] for row in main["log_history"] if "llc/mean" in row]
    assert logged == STEPS  # once per scheduled step
