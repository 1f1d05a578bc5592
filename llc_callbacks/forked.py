"""A model's weights forked as flat float32 tensors, evaluated with ``functional_call``.

The live module is never written to: its trainable parameters are copied once into a flat
anchor ``w*`` of shape ``(dim,)``, chains are rows of a ``(chains, dim)`` tensor, and every
loss is computed by ``torch.func.functional_call`` on a thin wrapper whose ``forward`` calls
the user's ``loss_fn(model, batch)``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from llc_callbacks.data import to_device

LossFn = Callable[[nn.Module, Any], Tensor]


class _LossModule(nn.Module):
    """Holds the model so that ``functional_call`` swaps its weights inside ``loss_fn``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        # Not registered as a submodule even if it is one: only the model's weights are forked.
        self.__dict__["loss_fn"] = loss_fn

    def forward(self, batch: Any) -> Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn(model, batch) must return a scalar tensor (the mean loss), got "
                + (
                    f"a tensor of shape {tuple(loss.shape)}"
                    if isinstance(loss, Tensor)
                    else type(loss).__name__
                )
            )
        return loss.reshape(()).float()


@dataclass(frozen=True)
class Layout:
    """Where each sampled parameter lies in the flat weights, in order.

    Attributes:
        names: Names of the sampled parameters (prefixed ``model.``).
        shapes: Their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @functools.cached_property
    def numels(self) -> list[int]:
        """The number of weights of each parameter."""
        return [shape.numel() for shape in self.shapes]

    @functools.cached_property
    def slices(self) -> dict[str, slice]:
        """Each parameter's slice of the flat weights."""
        ends = itertools.accumulate(self.numels)
        return {
            name: slice(end - shape.numel(), end)
            for name, shape, end in zip(self.names, self.shapes, ends, strict=True)
        }

    def narrow(self, names: Collection[str]) -> tuple[Layout, Tensor]:
        """The layout of ``names`` alone, and where its flat weights lie in this one's.

        Args:
            names: Parameter names of this layout to keep, in any order.

        Returns:
            The narrower layout (in this one's order) and the index of its weights.
        """
        kept = [(n, s) for n, s in zip(self.names, self.shapes, strict=True) if n in names]
        slices = self.slices
        index = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n, _ in kept])
        return Layout(tuple(n for n, _ in kept), tuple(s for _, s in kept)), index


class ForkedModel:
    """Functional loss and gradient evaluations of a model at forked weights.

    Args:
        model: The live model; only read.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        device: Where the forked weights live and the chains run.
        vectorize: ``True`` to require ``vmap`` over chains, ``False`` to loop over chains,
            ``"auto"`` to try ``vmap`` on the first evaluation and fall back to the loop, with a
            warning saying why, when the model does not support it.
        share_frozen: Use frozen float32 parameters on ``device`` as they are, without a copy
            (a LoRA model's base weights): chains only read them. ``False`` copies them too,
            for a caller that overwrites ``constants``.

    Attributes:
        layout: The sampled parameters' names and shapes, in flat order.
        anchor: The flat float32 weights ``w*``.
        constants: Every other tensor the model uses (frozen parameters, buffers), forked:
            float32 copies on ``device``, but with ``share_frozen`` frozen float32 parameters
            already there, which are the live tensors, detached.
        param_ids: Sampled parameter name by the live tensor's ``id``.
        aliases: For tied weights, each other name of a sampled parameter.
        vectorized: Whether chains run batched with ``vmap``; ``None`` until a batched
            evaluation decides it under ``"auto"``.

    Raises:
        ValueError: If the model has no trainable parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        device: torch.device,
        vectorize: bool | str,
        *,
        share_frozen: bool = True,
    ) -> None:
        self._wrapper = _LossModule(model, loss_fn)
        named = [
            *self._wrapper.named_parameters(remove_duplicate=False),
            *self._wrapper.named_buffers(remove_duplicate=False),
        ]
        canonical: dict[int, str] = {}
        for name, tensor in named:
            canonical.setdefault(id(tensor), name)
        # Tied weights are sampled once and passed under every name, which lets
        # functional_call skip its own (slow) search for ties.
        self._aliases = [(n, canonical[id(t)]) for n, t in named if canonical[id(t)] != n]
        unique = [(n, t) for n, t in named if canonical[id(t)] == n]
        trainable = [(n, t) for n, t in unique if isinstance(t, nn.Parameter) and t.requires_grad]
        if not trainable:
            raise ValueError("model has no parameters with requires_grad=True to sample")
        self.layout = Layout(tuple(n for n, _ in trainable), tuple(p.shape for _, p in trainable))
        self.param_ids = {id(t): name for name, t in trainable}
        sampled = set(self.layout.names)
        self.aliases = {alias: name for alias, name in self._aliases if name in sampled}
        self.anchor = torch.cat(
            [p.detach().reshape(-1).to(device=device, dtype=torch.float32) for _, p in trainable]
        )
        self.constants = {
            n: t.detach() if share_frozen and _usable(t, device) else _fork(t, device)
            for n, t in unique
            if n not in sampled
        }
        self._vectorize = vectorize
        self.vectorized: bool | None = None if vectorize == "auto" else bool(vectorize)
        self._model_name = type(model).__name__

    def restricted_to(self, names: Collection[str]) -> tuple[ForkedModel, Tensor]:
        """A fork that samples only ``names``; the other parameters stay constant at ``w*``.

        Restricted chains that never move a parameter need neither its gradient nor its
        noise: sampling the rest alone saves both.

        Args:
            names: Sampled parameter names (as in ``self.layout.names``) to keep sampling.

        Returns:
            The narrower fork, and the positions of its flat weights in this fork's.
        """
        narrow = copy.copy(self)
        narrow.layout, index = self.layout.narrow(names)
        index = index.to(self.anchor.device)
        narrow.anchor = self.anchor[index]
        frozen = {
            name: weights
            for name, weights in self.unflatten(self.anchor).items()
            if name not in narrow.layout.names
        }
        narrow.constants = {**self.constants, **frozen}
        return narrow, index

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of flat weights ``(..., dim)`` as named parameters ``(..., *shape)``."""
        lead = flat.shape[:-1]
        pieces = flat.split(self.layout.numels, dim=-1)
        return {
            name: piece.view(*lead, *shape)
            for name, piece, shape in zip(
                self.layout.names, pieces, self.layout.shapes, strict=True
            )
        }

    def loss_at_anchor(self, batch: Any) -> Tensor:
        """The loss at ``w*`` on one batch, without gradients."""
        with torch.no_grad():
            return self._loss(self.unflatten(self.anchor), batch)

    def loss_and_grad(self, weights: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        """Losses and flat loss gradients of every chain on one shared batch.

        Args:
            weights: Flat weights, shape ``(chains, dim)``.
            batch: One minibatch, already on the device.

        Returns:
            Losses of shape ``(chains,)`` and gradients of shape ``(chains, dim)``.

        Raises:
            RuntimeError: If ``vectorize=True`` and the model does not support ``vmap``.
        """
        if self.vectorized is False or (len(weights) == 1 and self._vectorize == "auto"):
            return self._looped(weights, batch)  # one chain gains nothing from vmap
        try:
            result = self._vmapped(weights, batch)
        except Exception as error:
            if self._vectorize is True:
                raise RuntimeError(
                    f"vectorize=True but torch.func.vmap failed on {self._model_name}: {error}"
                ) from error
            if self.vectorized is None:
                # A loss that fails one chain at a time too fails for its own reasons: raise
                # that, and blame vmap only when the chains run without it.
                result = self._looped(weights, batch)
                self._report_fallback(error)
                self.vectorized = False
                return result
            raise
        self.vectorized = True
        return result

    def _loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        tensors = {**params, **self.constants}
        for alias, name in self._aliases:
            tensors[alias] = tensors[name]
        # Fresh containers for every call: a loss that pops keys must not empty the batch
        # for the next chain or for the paired forward pass.
        return functional_call(self._wrapper, tensors, (to_device(batch),), tie_weights=False)

    def _vmapped(self, weights: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        # vmap batches the forward pass only; one ordinary backward pass through the batched
        # graph gives every chain's gradient (chains are independent, so the gradient of
        # their summed losses is each chain's own), faster than vmapping the backward too.
        leaves = self._leaves(weights)
        params = dict(zip(self.layout.names, leaves, strict=True))
        losses = vmap(self._loss, in_dims=(0, None))(params, batch)
        grads = torch.autograd.grad(losses.sum(), leaves, materialize_grads=True)
        return losses.detach(), self._flatten(grads, len(weights))

    def _looped(self, weights: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        losses, grads = [], []
        for chain_weights in weights:
            leaves = self._leaves(chain_weights)
            loss = self._loss(dict(zip(self.layout.names, leaves, strict=True)), batch)
            grads.append(
                self._flatten(torch.autograd.grad(loss, leaves, materialize_grads=True), 1)
            )
            losses.append(loss.detach())
        return torch.stack(losses), torch.cat(grads)

    def _leaves(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of flat weights as autograd leaves."""
        return [view.detach().requires_grad_() for view in self.unflatten(flat).values()]

    @staticmethod
    def _flatten(grads: tuple[Tensor, ...], chains: int) -> Tensor:
        return torch.cat([g.reshape(chains, -1) for g in grads], dim=1)

    def _report_fallback(self, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        warnings.warn(
            f"llc_callbacks: chains of {self._model_name} run one after another because "
            f"torch.func.vmap does not support this model ({reason}). Pass vectorize=False to "
            "skip the attempt.",
            stacklevel=5,
        )


def _usable(tensor: Tensor, device: torch.device) -> bool:
    """Whether a frozen parameter can serve the chains as it is: float32, on their device."""
    return (
        isinstance(tensor, nn.Parameter)
        and tensor.dtype == torch.float32
        and tensor.device == torch.device(device)
    )


def _fork(tensor: Tensor, device: torch.device) -> Tensor:
    """A detached copy on ``device``; floating tensors become float32."""
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device=device, dtype=dtype, copy=True)
