"""Chains split over ``torch.distributed`` ranks and gathered back.

Every helper here is a collective: every rank must call it, whether its own work succeeded or
failed, so that a failure on one rank is raised on all of them instead of leaving the others
waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_chains(num_chains: int, rank: int, world_size: int) -> list[int]:
    """The chain indices a rank runs: every ``world_size``-th chain from ``rank``."""
    return list(range(rank, num_chains, world_size))


def on_every_rank(fn: Callable[[], T]) -> T:
    """Run ``fn`` here and return its result once every rank's ``fn`` has succeeded.

    Raises:
        RuntimeError: On every rank, if ``fn`` raised on any; the message names the ranks.
    """
    result = _attempt(fn)
    _exchange(result, share=False)
    return result


def gather_from_every_rank(fn: Callable[[], T]) -> list[T]:
    """Run ``fn`` here and return every rank's result, in rank order.

    Raises:
        RuntimeError: On every rank, if ``fn`` raised on any; the message names the ranks.
    """
    return _exchange(_attempt(fn), share=True)


def broadcast_from_rank_zero(tensors: Iterable[Tensor]) -> None:
    """Overwrite each tensor, in place, with rank zero's."""
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def _attempt(fn: Callable[[], T]) -> T | Exception:
    try:
        return fn()
    except Exception as error:
        return error


def _exchange(part: Any, *, share: bool) -> list[Any]:
    failed = isinstance(part, Exception)
    message = f"{type(part).__name__}: {part}" if failed else None
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (message, part if share and not failed else None))
    failures = [f"rank {rank}: {message}" for rank, (message, _) in enumerate(parts) if message]
    if failures:
        cause = part if failed else None
        raise RuntimeError("LLC estimate failed on " + "; ".join(failures)) from cause
    return [payload for _, payload in parts]
