"""benchmarks/gpu_check.py runs on CPU in its quick form, so that it works when a GPU comes."""

from pathlib import Path

import pytest
from processes import python

pytestmark = pytest.mark.slow  # make test-fast skips it

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_the_gpu_check_passes_on_cpu_quick():
    done = python(BENCHMARKS / "gpu_check.py", "--device", "cpu", "--quick", cwd=BENCHMARKS)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == 9, done.stdout
    assert "chain step / training step, GPT-2" in done.stdout
    assert lines[-1].startswith("0 failed")
