"""How the multi-process test scripts end."""

import os
import sys

import torch


def leave() -> None:
    """Wait for every rank, then exit without the interpreter's teardown.

    On a loaded machine, tearing down gloo's threads at exit (with or without
    ``destroy_process_group``) sometimes aborts with "terminate called without an active
    exception" (exit -6) after the run has succeeded; every script has written its record
    before it calls this, so nothing is lost by skipping the teardown.
    """
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
