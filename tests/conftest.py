"""Shared fixtures: one thread for torch, W&B offline in a temporary folder, the examples."""

import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import wandb
from example_modules import load_example

from llc_callbacks.integrations.wandb import history_rows, offline_run_dir

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _torch_seeded():
    """Every test starts from the same torch RNG state, whichever tests ran before it.

    pytest-randomly reseeds ``random`` and numpy before each test, not torch: a test that
    draws from torch's global generator would otherwise see numbers that depend on the order.
    """
    torch.manual_seed(0)


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """W&B in offline mode, writing under ``tmp_path``; finished and torn down afterwards.

    wandb caches its folder per process, so each test gets a fresh service.
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "llc-callbacks-test")
    yield tmp_path
    wandb.finish()
    wandb.teardown()


@pytest.fixture
def wandb_rows(wandb_dir):
    """Read back the history rows of an offline run, once they are all on disk.

    ``finish()`` returns before wandb-core has written the run file's last 32 KiB block (it
    only sends the service a notice); ``wandb.teardown()`` waits for the service to close
    every run's file. Call ``finish()`` on the run first.
    """

    def read(run_dir=None) -> list[dict]:
        wandb.teardown()
        return history_rows(run_dir if run_dir is not None else offline_run_dir(wandb_dir))

    return read


@pytest.fixture
def example():
    """Import an example script from ``examples/`` by its file name, without ``sys.path``."""
    return load_example


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Print the shuffled order's seed even under ``-q``, so that a failing order can be rerun."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order: --randomly-seed={seed}")


@pytest.fixture
def ctrl_c():
    """Ctrl-C as at a terminal: SIGINT raises KeyboardInterrupt, whatever the test process
    inherited (a shell's background job starts with SIGINT ignored, and Lightning ignores it
    after an interrupt); the handler before is put back afterwards."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
