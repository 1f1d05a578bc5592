"""The tests' scripts and commands in fresh processes: one thread each, this folder importable,
and a wall-clock limit that only a hang reaches."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# A guard against a hang, not a speed check: the slowest scripts (the FSDP2 runs under
# torchrun, benchmarks/gpu_check.py --quick) take about a minute on a quiet 2-core machine
# and up to three beside two more test suites.
HANG_S = 30 * 60
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def environment(**extra: str) -> dict[str, str]:
    """This process's environment with one thread for torch, ``tests/`` on the path, ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE), **extra}


def run(command: list, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess:
    """Run ``command`` to its end in ``environment(**extra)``, its output captured as text."""
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=environment(**extra),
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )


def python(*args, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess:
    """Run this interpreter with ``args`` (a script and its arguments, or ``-c CODE``)."""
    return run([sys.executable, *args], cwd=cwd, **extra)
