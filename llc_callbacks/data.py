"""Batches: cycled for the chains, moved to a device, split into examples, never mutated."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


def cycle_batches(
    data: Iterable[Any], device: torch.device, float_dtype: torch.dtype
) -> Iterator[Any]:
    """Yield batches from ``data`` forever, restarting it when it runs out.

    Each pass calls ``iter(data)`` again (a shuffled DataLoader reshuffles); nothing is cached.

    Args:
        data: Any re-iterable of batches, such as a DataLoader.
        device: Where every tensor of a batch is moved.
        float_dtype: The precision the chains' forward pass runs in
            (``ForkedModel.precision``).

    Yields:
        Copies of the batches' containers with their tensors on ``device`` and floating-point
        tensors in ``float_dtype``.

    Raises:
        ValueError: If ``data`` yields no batch, or is an iterator that cannot restart.
    """
    passes = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            yield to_device(batch, device, float_dtype)
        if empty:
            raise ValueError(
                "data yielded no batches"
                if passes == 0
                else "data ran out and cannot restart: pass a re-iterable such as a DataLoader,"
                " not an iterator"
            )
        passes += 1


def map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """A copy of a batch's containers with ``fn`` applied to every tensor.

    Dicts (and other mappings) become dicts, lists stay lists, tuples (named ones too) stay
    tuples; anything else is kept as it is.
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {key: map_tensors(value, fn) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(value, fn) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(value, fn) for value in batch)
    return batch


def to_device(
    batch: Any, device: torch.device | None = None, float_dtype: torch.dtype | None = None
) -> Any:
    """A copy of a batch's containers with every tensor moved to ``device``.

    New containers (see ``map_tensors``), so that a loss function that pops keys never
    touches the caller's batch. Tensors are not copied unless they move or change type; a
    host tensor bound for CUDA goes through pinned memory, so that the copy does not make
    the host wait for the device.

    Args:
        batch: A tensor or nested containers of tensors.
        device: Where tensors go; ``None`` leaves them where they are.
        float_dtype: Type for floating-point tensors; ``None`` keeps theirs.

    Returns:
        The batch in new containers.
    """

    def move(tensor: Tensor) -> Tensor:
        dtype = float_dtype if float_dtype is not None and tensor.is_floating_point() else None
        if _from_host(tensor, device) and not tensor.is_pinned():
            # From pageable memory CUDA copies synchronously; from pinned memory it does not.
            tensor = tensor.pin_memory()
        return tensor.to(device=device, dtype=dtype, non_blocking=True)

    return map_tensors(batch, move)


def _from_host(tensor: Tensor, device: torch.device | None) -> bool:
    """Whether moving ``tensor`` to ``device`` copies host memory to a CUDA device."""
    return (
        device is not None and torch.device(device).type == "cuda" and tensor.device.type == "cpu"
    )


def example(batch: Any, index: int) -> Any:
    """Example ``index`` of a batch as a batch of one: every tensor sliced on its first axis."""
    return map_tensors(batch, lambda t: t[index : index + 1] if t.dim() > 0 else t)


def sampling_size(loss_fn: Callable[..., Any], batch: Any) -> int:
    """What ``nbeta="batch"`` counts in a minibatch: the examples its loss averages over.

    ``loss_fn.count_examples(batch)`` where the loss defines it (a preference loss averages
    over pairs, two rows each), else ``batch_size(batch)``.

    Raises:
        ValueError: If the loss defines no count and the batch holds no tensor with a
            leading dimension.
    """
    count = getattr(loss_fn, "count_examples", None)
    return int(count(batch)) if callable(count) else batch_size(batch)


def batch_size(batch: Any) -> int:
    """The number of examples in a batch: the leading size of its first tensor.

    Raises:
        ValueError: If the batch holds no tensor with a leading dimension.
    """
    if isinstance(batch, Tensor) and batch.dim() > 0:
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, Iterable) and not isinstance(values, (str, bytes, Tensor)):
        for value in values:
            try:
                return batch_size(value)
            except ValueError:
                continue
    raise ValueError(
        "cannot infer the batch size for nbeta='batch' from a batch without tensors;"
        " pass nbeta as a number"
    )
