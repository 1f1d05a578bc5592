"""Chains through a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each parameter of such a model is a ``DTensor`` whose ``to_local()`` is this rank's rows: no
rank holds the whole model, so the chains cannot be forked. They run through the live module
instead, one chain at a time on every rank, through the same loop as every other chain
(``chains.run_chains``, with ``ShardedChains``): its local shards take the chain's weights,
the forward and backward passes gather and reduce-scatter as in training (every rank feeds
the same batch, so FSDP's gradient, averaged over ranks, is that batch's), the update is
local to each shard, and sums over weights (distances, MALA's acceptance) are all-reduced.
The shards saved at ``w*``, the gradients and the buffers are written back afterwards,
whatever happened.

Chain ``i`` draws its noise from its own generator over the global flat weights, as the
unsharded chains do (``chains._Noise``), and each rank adds the part that falls in its rows:
the noise, and so the estimate, do not depend on the number of ranks.

A failure on one rank before or after the model's forward pass (its data, its ``loss_fn``) is
announced to the others at the next step's check, an all-reduce on entering the forward pass
and another before the backward pass, so every rank raises instead of waiting; a failure
inside the sharded forward or backward pass itself cannot be announced without the
collectives FSDP is waiting on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from llc_callbacks.chains import (
    ChainGroup,
    ChainStart,
    ChainTraces,
    NoiseAhead,
    run_chains,
    run_chains_at_anchor,
    steps_ahead,
)
from llc_callbacks.config import LLCConfig
from llc_callbacks.data import cycle_batches, sampling_size
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
        check.guard(lambda: config.resolve_nbeta(sampling_size(loss_fn, first)))
        with torch.no_grad():
            _loss(model, loss_fn, first, check)
    return total


def sample_sharded(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: LLCConfig,
    progress: bool,
    starts: Sequence[ChainStart | None] = (),
    keep_ends: bool = False,
) -> tuple[ChainTraces, float, float]:
    """Run every chain through the sharded model, on every rank, with ``chains.run_chains``.

    The chains run one after another (a wave each) through ``ShardedChains``: the loop, the
    update rule, the step-size adaptation, the ends of burn-in and draws and the warm starts
    are those of the unsharded chains. Every rank takes the same decisions: they depend on
    the loss, which every rank computes from the same gathered weights and batch, and on sums
    over all ranks' weights.

    Args:
        model: A module sharded with ``fully_shard`` over a 1-D mesh (its trainable
            parameters are float32 ``DTensor`` s sharded on their first dimension).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: The same batches on every rank.
        config: Hyperparameters (plain SGLD).
        progress: Show a progress bar, when the output is a terminal.
        starts: Where each chain starts: offsets of this rank's rows (``ChainStart``).
        keep_ends: Keep each chain's end offset of this rank's rows in the traces' ``ends``.

    Returns:
        The chains' traces (rank zero's, on every rank, but for each rank's own ends), ``L(w*)``
        and the resolved ``n beta``.

    Raises:
        ValueError: If a parameter is sharded otherwise, or is not float32.
        OtherRankError: If another rank's step failed (that rank raises its own error).
    """
    shards, total = _shards(model)
    device = shards[0].local.device
    check = _Check(device)
    with _live_weights_restored(model, shards) as anchor, _checked_forward(model, check):
        chains = ShardedChains(model, loss_fn, shards, anchor, total, check)
        batches = _guarded(cycle_batches(data, device, torch.float32), check)
        first = next(batches)
        nbeta = config.resolve_nbeta(sampling_size(loss_fn, first))
        ids = range(config.num_chains)
        starts = [starts[i] if i < len(starts) else None for i in ids]
        group = ChainGroup(chains, list(ids), [None] * len(ids), starts)
        one_at_a_time = dataclasses.replace(config, chains_in_flight=1)
        traces, init_loss = run_chains_at_anchor(
            first,
            batches,
            chains.loss_at_anchor,
            config,
            lambda b: run_chains([group], b, one_at_a_time, nbeta, progress, None, keep_ends),
        )
    # Float rounding may differ between ranks (GPU reductions): every rank returns rank zero's
    # numbers, and keeps its own ends (offsets of its own rows).
    shared = [traces._replace(ends=[]), init_loss]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]._replace(ends=traces.ends), shared[1], nbeta


class ShardedChains:
    """A sharded model's chain as ``chains.run_chains`` runs it, one chain at a time.

    The chain's weights are this rank's rows of every sampled parameter, flat and in order
    (``(1, rows)``), as the loop and the update rule see any chain's; each forward pass
    writes them into the local shards first, and each gradient is read back from the
    shards' gradients. Sums over weights are completed over every rank (``total``), and the
    noise of the global flat weights is drawn in the unsharded chains' pieces (``noise``).
    Memory: training's, plus three copies of this rank's float32 rows (``w*``, the chain's
    weights and its gradient), and, on the steps where the MALA acceptance is measured, two
    more.

    Args:
        model: The sharded module.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        shards: Its sampled parameters' local rows.
        anchor: Those rows at ``w*``.
        total: The number of sampled weights over every rank.
        check: The all-reduce that tells every rank when one failed.
    """

    vectorized = False
    precision = torch.float32

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        shards: list[_Shard],
        anchor: list[Tensor],
        total: int,
        check: _Check,
    ) -> None:
        self.model, self.loss_fn, self.shards, self.check = model, loss_fn, shards, check
        self.anchor = torch.cat(anchor).detach()
        self.size = total
        sizes = [shard.local.numel() for shard in shards]
        self._places = [slice(end - n, end) for n, end in zip(sizes, np.cumsum(sizes), strict=True)]

    def loss_and_grad(
        self, weights: Tensor, batch: Any, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The chain's loss (``inf`` on every rank if any rank's is not finite) and gradient."""
        grads = torch.empty_like(weights) if out is None else out
        self._write(weights[0])
        for shard in self.shards:
            shard.param.grad = None
        loss = _loss(self.model, self.loss_fn, batch, self.check)
        loss.backward()  # even when not finite: FSDP's iteration ends with it
        for shard, place in zip(self.shards, self._places, strict=True):
            grad = shard.param.grad
            if grad is None:  # a parameter the loss does not use has a zero gradient
                grads[0, place].zero_()
            else:
                grads[0, place].copy_(grad.to_local().view(-1))
        value = (
            loss.detach().reshape(1)
            if self.check.finite
            else torch.full_like(grads[:, 0], math.inf)
        )
        return value, grads

    def loss_at_anchor(self, batch: Any) -> Tensor:
        """The loss at ``w*`` on one batch, without gradients."""
        self._write(self.anchor)
        with torch.no_grad():
            return _loss(self.model, self.loss_fn, batch, self.check).detach()

    def total(self, sums: Tensor) -> Tensor:
        """Per-chain sums over this rank's rows, summed over every rank."""
        sums = sums.clone()
        dist.all_reduce(sums)
        return sums

    def noise(self, generators: list[torch.Generator], movable: Tensor | None) -> _ShardNoise:
        """Each chain's noise over the global flat weights, this rank's rows of it."""
        return _ShardNoise(generators, self.shards, self._places, self.size)

    def _write(self, flat: Tensor) -> None:
        """Write the chain's rows into the shards, and drop any weights FSDP keeps gathered.

        A forward pass without backward (``loss_at_anchor``) leaves the root's weights
        gathered; the next forward pass would use them instead of gathering the new shards.
        """
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        with torch.no_grad():
            for shard, place in zip(self.shards, self._places, strict=True):
                shard.local.copy_(flat[place])


class _ShardNoise:
    """Adds noise to a sharded chain's rows (``samplers.AddNoise``).

    The global weights' noise is drawn as an unsharded chain's (``chains._Noise``): several
    steps at once for a model of up to ``PIECE / 2`` weights, else in ``PIECE`` s every
    step; each rank adds its rows' part.
    """

    def __init__(
        self,
        generators: list[torch.Generator],
        shards: list[_Shard],
        places: list[slice],
        total: int,
    ) -> None:
        (self.generator,) = generators
        self.shards, self.places, self.total = shards, places, total
        self._ahead: NoiseAhead | None = None

    def __call__(self, weights: Tensor, scale: Tensor, factor: Tensor | None) -> None:
        if steps_ahead(self.total) == 1:
            for start in range(0, self.total, PIECE):
                stop = min(start + PIECE, self.total)
                xi = torch.randn(stop - start, generator=self.generator, device=weights.device)
                self._add(weights, xi.mul_(scale[0]), start)
            return
        if self._ahead is None:
            self._ahead = NoiseAhead([self.generator], self.total, weights.device)
        self._add(weights, self._ahead.next()[0].mul_(scale[0]), 0)

    def _add(self, weights: Tensor, xi: Tensor, start: int) -> None:
        """Add this rank's part of the global noise ``xi``, which begins at weight ``start``."""
        stop = start + len(xi)
        for shard, place in zip(self.shards, self.places, strict=True):
            low, high = max(start, shard.start), min(stop, shard.start + shard.local.numel())
            if low < high:
                at = place.start + low - shard.start
                weights[0, at : at + high - low].add_(xi[low - start : high - start])


def _guarded(batches: Iterator[Any], check: _Check) -> Iterator[Any]:
    """The batches, each fetched under ``check`` (a rank whose data fails tells the others)."""
    while True:
        yield check.guard(lambda: next(batches))


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
