"""What a block of torch code asks of the machine: operators dispatched, and host reads.

Counts, unlike times, do not drift on a shared machine: ``benchmarks/step_cost.py`` reports
them per chain step, and the tests hold them constant in the number of chains.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# What makes the host wait for the device (or copy host data to it, which CUDA does
# synchronously from pageable memory): reading a tensor's values, and building a tensor
# from host values (an empty one, as transformers' key-value cache starts from, copies
# nothing and is left out).
HOST_READS: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.cpu,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.as_tensor,
        torch.tensor,
    }
)


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched inside the block, by name; views are left out.

    Views cost no kernel; every other operator is one (a proxy for CUDA launches on CPU).
    Backward's operators are counted too.

    Attributes:
        counts: Operators by name (``aten.mm``), and how many times each ran.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class HostRead(NamedTuple):
    """One host read: what was called, and the names of the functions it was called from.

    Attributes:
        name: The function's name (``item``, ``cpu``, ``as_tensor``, ...).
        callers: The names of the functions on the stack, innermost first.
    """

    name: str
    callers: tuple[str, ...]


class HostReads(TorchFunctionMode):
    """Records every ``HOST_READS`` call made inside the block, with its callers.

    Attributes:
        reads: The reads, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[HostRead] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and not _empty_host_data(func, args):
            frames = traceback.extract_stack()[:-1]
            callers = tuple(frame.name for frame in reversed(frames))
            self.reads.append(HostRead(getattr(func, "__name__", str(func)), callers))
        return func(*args, **(kwargs or {}))


def _empty_host_data(func: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    """Whether ``func`` builds a tensor from no host values at all (``torch.tensor([])``)."""
    if func not in (torch.as_tensor, torch.tensor) or not args:
        return False
    data = args[0]
    return isinstance(data, (list, tuple)) and len(data) == 0
