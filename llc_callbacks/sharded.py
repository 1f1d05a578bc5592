"""Chains through a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each parameter of such a model is a ``DTensor`` whose ``to_local()`` is this rank's rows: no
rank holds the whole model, so the chains cannot be forked. They run through the live module
instead, one chain at a time on every rank: its local shards take the chain's weights, the
forward and backward passes gather and reduce-scatter as in training (every rank feeds the
same batch, so FSDP's gradient, averaged over ranks, is that batch's), and the SGLD update is
local to each shard. The shards saved at ``w*`` (the only copy of the weights this costs), the
gradients and the buffers are written back afterwards, whatever happened.

Chain ``i`` draws its noise from its own generator over the global flat weights, in pieces of
``PIECE`` numbers as the unsharded chains do, and each rank adds the part that falls in its
rows: the noise, and so the estimate, do not depend on the number of ranks.

A failure on one rank before or after the model's forward pass (its data, its ``loss_fn``) is
announced to the others at the next step's check, an all-reduce on entering the forward pass
and another before the backward pass, so every rank raises instead of waiting; a failure
inside the sharded forward or backward pass itself cannot be announced without the
collectives FSDP is waiting on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from tqdm.auto import tqdm

from llc_callbacks.chains import ChainTraces, chain_generator
from llc_callbacks.config import LLCConfig
from llc_callbacks.data import batch_size, cycle_batches
from llc_callbacks.forked import LossFn
from llc_callbacks.samplers import PIECE


class OtherRankError(RuntimeError):
    """Raised on the ranks whose own step succeeded when another rank's failed."""


class _Shard(NamedTuple):
    """One sampled parameter's rows on this rank.

    Attributes:
        param: The sharded parameter.
        local: Its local rows, flat (a view: writing it writes the parameter).
        start: Where those rows begin in the global flat weights (all parameters in order).
    """

    param: nn.Parameter
    local: Tensor
    start: int


def is_sharded(model: nn.Module) -> bool:
    """Whether any of the model's parameters is a ``DTensor`` (``fully_shard``, tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def refuse_unsupported(
    config: LLCConfig, distributed: bool, *, restricted: bool = False, observed: bool = False
) -> None:
    """Refuse what chains through a sharded model do not do yet, naming it.

    MALA's acceptance is not measured (an estimate's ``result.config.mala`` says so).

    Args:
        config: The hyperparameters asked for.
        distributed: Whether the chains may use the process group.
        restricted: Whether restricted LLCs are asked for.
        observed: Whether observables are asked for.

    Raises:
        ValueError: If anything but plain SGLD chains of all the weights, on every rank that
            holds a shard, is asked for.
    """
    asked = {
        "distributed=False (every rank holding a shard runs every chain)": not distributed,
        "restrictions": restricted,
        "observables": observed,
        f"sampler={config.sampler!r}": config.sampler != "sgld",
    }
    refused = [name for name, wanted in asked.items() if wanted]
    if refused:
        raise ValueError(
            "a model sharded with fully_shard is sampled by plain SGLD chains of all its"
            f" weights, with distributed=True; not with {', '.join(refused)}"
        )


def check_first_loss(
    model: nn.Module, loss_fn: LossFn, data: Iterable[Any], config: LLCConfig
) -> int:
    """Check a sharded model as estimates will use it: its shards, a batch, the loss at ``w*``.

    Returns:
        The number of weights each chain samples, over every rank.

    Raises:
        ValueError: If a parameter is sharded otherwise or is not float32, ``data`` yields no
            batch, ``nbeta`` cannot be resolved from it or the loss is not a scalar tensor.
        OtherRankError: If another rank's check failed.
    """
    shards, total = _shards(model)
    check = _Check(shards[0].local.device)
    with _live_weights_restored(model, shards), _checked_forward(model, check):
        batches = cycle_batches(data, shards[0].local.device, torch.float32)
        first = check.guard(lambda: next(batches))
        check.guard(lambda: config.resolve_nbeta(batch_size(first)))
        with torch.no_grad():
            _loss(model, loss_fn, first, check)
    return total


def sample_sharded(
    model: nn.Module, loss_fn: LossFn, data: Iterable[Any], config: LLCConfig, progress: bool
) -> tuple[ChainTraces, float, float]:
    """Run every chain through the sharded model, on every rank.

    Args:
        model: A module sharded with ``fully_shard`` over a 1-D mesh (its trainable
            parameters are float32 ``DTensor`` s sharded on their first dimension).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: The same batches on every rank.
        config: Hyperparameters (plain SGLD).
        progress: Show a progress bar, when the output is a terminal.

    Returns:
        The chains' traces, ``L(w*)`` and the resolved ``n beta``.

    Raises:
        ValueError: If a parameter is sharded otherwise, or is not float32.
        OtherRankError: If another rank's step failed (that rank raises its own error).
    """
    shards, total = _shards(model)
    device = shards[0].local.device
    check = _Check(device)
    with _live_weights_restored(model, shards) as anchor, _checked_forward(model, check):
        batches = cycle_batches(data, device, torch.float32)
        first = check.guard(lambda: next(batches))
        nbeta = config.resolve_nbeta(batch_size(first))
        init = [first] + [
            check.guard(lambda: next(batches)) for _ in range(config.init_loss_batches - 1)
        ]
        with torch.no_grad():
            init_loss = float(np.mean([_loss(model, loss_fn, b, check).item() for b in init]))
        steps = [
            check.guard(lambda: next(batches)) for _ in range(config.num_burnin + config.num_draws)
        ]
        draws = steps[config.num_burnin :]
        reference = np.full(config.num_draws, math.nan)
        if config.paired:
            with torch.no_grad():
                reference[:] = [_loss(model, loss_fn, b, check).item() for b in draws]
        trace = np.full((config.num_chains, config.num_draws), math.nan)
        distance = np.full((config.num_chains, config.num_draws), math.nan)
        diverged = np.zeros(config.num_chains, dtype=bool)
        bar = tqdm(
            total=config.num_chains * len(steps),
            desc="LLC chains",
            disable=None if progress else True,
            leave=False,
        )
        for chain in range(config.num_chains):
            generator = chain_generator(config.seed, chain, device)
            with torch.no_grad():
                for shard, saved in zip(shards, anchor, strict=True):
                    shard.local.copy_(saved)
            for t, batch in enumerate(steps):
                bar.update()
                loss = _loss(model, loss_fn, batch, check)
                draw = t - config.num_burnin
                if draw >= 0 and check.finite:
                    trace[chain, draw] = loss.item()
                    with torch.no_grad():
                        distance[chain, draw] = _half_square_distance(shards, anchor)
                for shard in shards:
                    shard.param.grad = None
                loss.backward()  # even when diverged: FSDP's iteration ends with it
                if not check.finite:  # on some rank, so on all
                    diverged[chain] = True
                    break
                with torch.no_grad():
                    _sgld_step(shards, anchor, generator, total, config, nbeta)
        bar.close()
    # Float rounding may differ between ranks (GPU reductions): every rank returns rank zero's.
    shared = [ChainTraces(trace, reference, distance, diverged, None, {}), init_loss]
    dist.broadcast_object_list(shared, src=0)
    return shared[0], shared[1], nbeta


def _shards(model: nn.Module) -> tuple[list[_Shard], int]:
    """The trainable parameters' local rows, in order, and the global number of weights."""
    shards, start = [], 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if not isinstance(param, DTensor):
            raise ValueError(
                f"a sharded model's trainable parameters must all be sharded; {name} is not"
                " (fully_shard the module that holds it, or its parent)"
            )
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),) or param.ndim == 0:
            raise ValueError(
                f"{name} is sharded as {param.placements} over a {param.device_mesh.ndim}-D mesh;"
                " chains support fully_shard's Shard(0) over a 1-D mesh only"
            )
        local = param.to_local()
        if local.dtype != torch.float32:
            raise ValueError(
                f"{name}'s shards are {local.dtype}; chains update float32 shards (keep the"
                " sharded parameters float32 and compute in lower precision with fully_shard's"
                " mp_policy)"
            )
        rows = param.shape[0]
        per_rank = math.ceil(rows / param.device_mesh.size())
        first_row = min(param.device_mesh.get_local_rank() * per_rank, rows)
        if local.shape[0] != min(per_rank, rows - first_row):
            raise ValueError(f"{name} is not sharded as torch.chunk shards its first dimension")
        row_numel = param.numel() // rows
        shards.append(_Shard(param, local.view(-1), start + first_row * row_numel))
        start += param.numel()
    if not shards:
        raise ValueError("model has no parameters with requires_grad=True to sample")
    return shards, start


class _Check:
    """The all-reduce by which a rank whose step failed tells the others.

    Every rank calls ``passed`` at the same points of every step; a rank that failed calls
    ``failed`` once instead, at whichever point the others are waiting. The same all-reduce
    tells whether every rank's loss was finite, so that all agree on a divergence.

    Attributes:
        finite: Whether every rank's last checked loss was finite.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.finite = True

    def passed(self, loss: Tensor | None = None) -> None:
        """Go on if every rank's step so far succeeded.

        Args:
            loss: This rank's loss, to learn whether every rank's is finite.

        Raises:
            OtherRankError: If another rank's failed.
        """
        infinite = loss is not None and not bool(torch.isfinite(loss))
        failures, infinities = self._count(0, int(infinite))
        if failures:
            raise OtherRankError("stopped: another rank's chain step failed")
        if loss is not None:
            self.finite = not infinities

    def failed(self) -> None:
        """Tell the other ranks this rank's step failed."""
        self._count(1, 0)

    def guard(self, fn: Any) -> Any:
        """``fn()``, calling ``failed`` if it raises (its error goes on)."""
        try:
            return fn()
        except OtherRankError:
            raise
        except Exception:
            self.failed()
            raise

    def _count(self, failed: int, infinite: int) -> tuple[int, int]:
        flags = torch.tensor([failed, infinite], device=self.device)
        dist.all_reduce(flags)
        return int(flags[0]), int(flags[1])


def _outermost(model: nn.Module) -> list[FSDPModule]:
    """The FSDP modules inside no other: the roots, whose forward passes start the gathers."""
    names = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    return [
        model.get_submodule(name)
        for name in names
        if not any(other == "" or name.startswith(f"{other}.") for other in names if other != name)
    ]


def _loss(model: nn.Module, loss_fn: LossFn, batch: Any, check: _Check) -> Tensor:
    """``loss_fn(model, batch)``, checked on every rank before the backward pass.

    Raises:
        ValueError: If ``loss_fn`` does not return a scalar tensor.
    """

    def loss() -> Tensor:
        value = loss_fn(model, batch)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("loss_fn(model, batch) must return a scalar tensor (the mean loss)")
        return value.reshape(()).float()

    value = check.guard(loss)
    check.passed(value.detach())
    return value


@contextmanager
def _checked_forward(model: nn.Module, check: _Check) -> Iterator[None]:
    """Check every rank on entering each outermost FSDP module, before its own collectives."""
    handles = [
        module.register_forward_pre_hook(lambda module, args: check.passed(), prepend=True)
        for module in _outermost(model)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _live_weights_restored(model: nn.Module, shards: list[_Shard]) -> Iterator[list[Tensor]]:
    """Put back the shards, gradients and buffers as they were; use rank zero's buffers inside.

    Yields the saved shards, ``w*``'s local rows.

    Every rank samples the same posterior only if every rank's forward pass is the same: the
    buffers (BatchNorm's statistics are not synchronized by FSDP) are rank zero's inside.
    """
    saved = [shard.local.clone() for shard in shards]
    grads = [shard.param.grad for shard in shards]
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    try:
        for buffer, _ in buffers:
            dist.broadcast(buffer, src=0)
        yield saved
    except BaseException:
        # A forward pass that stopped midway left FSDP's iteration state behind.
        for root in _outermost(model):
            if hasattr(root, "reset_iter_state"):  # torch >= 2.13
                root.reset_iter_state()
        raise
    finally:
        # The root keeps its weights gathered after a forward pass without backward.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        with torch.no_grad():
            for shard, local in zip(shards, saved, strict=True):
                shard.local.copy_(local)
            for buffer, own in buffers:
                buffer.copy_(own)
        for shard, grad in zip(shards, grads, strict=True):
            shard.param.grad = grad


def _sgld_step(
    shards: list[_Shard],
    anchor: list[Tensor],
    generator: torch.Generator,
    total: int,
    config: LLCConfig,
    nbeta: float,
) -> None:
    """One SGLD update of the local rows, as ``samplers.sgld_step`` makes it of whole weights."""
    for shard, saved in zip(shards, anchor, strict=True):
        shard.local.lerp_(saved, config.step_size * config.localization / 2)
        grad = shard.param.grad
        if grad is not None:  # a parameter the loss does not use has a zero gradient
            shard.local.add_(grad.to_local().view(-1), alpha=-config.step_size * nbeta / 2)
    scale = math.sqrt(config.step_size)
    device = shards[0].local.device
    for start in range(0, total, PIECE):
        stop = min(start + PIECE, total)
        xi = torch.randn(stop - start, generator=generator, device=device)
        for shard in shards:
            low, high = max(start, shard.start), min(stop, shard.start + shard.local.numel())
            if low < high:
                shard.local[low - shard.start : high - shard.start].add_(
                    xi[low - start : high - start], alpha=scale
                )


def _half_square_distance(shards: list[_Shard], anchor: list[Tensor]) -> float:
    """``||w - w*||^2 / 2`` over every rank's rows."""
    local = sum(
        (shard.local - saved).square().sum() for shard, saved in zip(shards, anchor, strict=True)
    )
    total = torch.as_tensor(local, dtype=torch.float32, device=anchor[0].device).reshape(1)
    dist.all_reduce(total)
    return total.item() / 2
