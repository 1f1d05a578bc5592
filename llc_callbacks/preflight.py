"""``preflight``: check once, before training, what every estimate will need.

A mistake in the loss, the data or a restriction would otherwise surface at the first
scheduled estimate, possibly thousands of steps into training. The check costs one fork of
the weights (what an estimate forks too) and one forward pass without gradients per data
source, on its first batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from llc_callbacks.config import LLCConfig
from llc_callbacks.data import cycle_batches, sampling_size
from llc_callbacks.distributed import on_every_rank, rank_and_world
from llc_callbacks.estimator import check_inputs, fork, model_device, sampling
from llc_callbacks.forked import ForkedModel, LossFn
from llc_callbacks.restrictions import Restrictions
from llc_callbacks.sharded import check_first_loss, is_sharded, refuse_unsupported


class Preflight(NamedTuple):
    """What the check found.

    Attributes:
        num_sampled: Weights every full-LLC chain samples.
        restricted: Weights each weight restriction samples, by name.
        seconds: Wall time of the check.
    """

    num_sampled: int
    restricted: dict[str, int]
    seconds: float


def preflight(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig,
    *,
    restrictions: Restrictions | None = None,
    device: torch.device | str | None = None,
    distributed: bool = False,
    failures: dict[str, str] | None = None,
) -> Preflight:
    """Run, on the forked weights, the first step of every estimate's work.

    Forks the weights, evaluates ``loss_fn`` at them on the first batch of ``data`` and of
    every data source, resolves ``nbeta`` from those batches and builds every restriction's
    mask. Leaves the model and the training process as they were, like an estimate.

    Args:
        model: The model at its current weights.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: Re-iterable of batches.
        config: Sampling hyperparameters.
        restrictions: The restricted LLCs to check too.
        device: Where chains will run; defaults to the model's device.
        distributed: Check on every rank of the process group and fail on all if any fails.
        failures: Where to record, by name, a weight or data restriction whose check fails,
            instead of raising; the others are still checked. ``None``: raise.

    Returns:
        The numbers of sampled weights (of the restrictions that passed) and the check's
        wall time.

    Raises:
        ValueError: For what ``estimate_llc`` would refuse: an argument of the wrong type, a
            model with nothing to sample, data that yields no batch, a loss that is not a
            scalar tensor, ``nbeta="batch"`` with batches of one example, or a selection
            that matches nothing (the message names it).
        RuntimeError: When distributed, if the check failed on any rank (on every rank).
    """
    start = time.perf_counter()
    check_inputs(model, loss_fn, config, restrictions)
    restrictions = restrictions or Restrictions()
    device = torch.device(device) if device is not None else model_device(model)
    distributed = distributed and rank_and_world()[1] > 1
    if is_sharded(model):
        refuse_unsupported(
            config, distributed, restricted=bool(restrictions.weights or restrictions.sources)
        )
        with sampling(model, config, device):
            total = on_every_rank(lambda: check_first_loss(model, loss_fn, data, config))
        return Preflight(total, {}, time.perf_counter() - start)
    with sampling(model, config, device):
        forked = fork(model, loss_fn, config, device, distributed)

        def check() -> tuple[dict[str, int], dict[str, str]]:
            _first_loss(forked, data, config, "data")
            failed: dict[str, str] = {}
            for name, source in restrictions.sources.items():
                try:
                    _first_loss(forked, source, config, f"sources[{name!r}]")
                except Exception as error:
                    if failures is None:
                        raise
                    failed[name] = f"{type(error).__name__}: {error}"
            masks = restrictions.masks(forked, failures=None if failures is None else failed)
            return {name: int(mask.sum()) for name, mask in masks.items()}, failed

        restricted, failed = on_every_rank(check) if distributed else check()
    if failures is not None:
        failures.update(failed)
    return Preflight(forked.anchor.numel(), restricted, time.perf_counter() - start)


def _first_loss(forked: ForkedModel, data: Iterable[Any], config: LLCConfig, what: str) -> None:
    try:
        first = next(cycle_batches(data, forked.anchor.device, forked.precision))
        config.resolve_nbeta(sampling_size(forked.loss_fn, first))
        forked.loss_at_anchor(first)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from error
