"""A model's weights forked as flat float32 tensors, evaluated with ``functional_call``.

The live module is never written to: its trainable parameters are copied once into a flat
float32 anchor ``w*`` of shape ``(dim,)``, chains are rows of a ``(chains, dim)`` tensor, and
every loss is computed by ``torch.func.functional_call`` on a thin wrapper whose ``forward``
calls the user's ``loss_fn(model, batch)``. The forward pass runs in the model's own precision:
each sampled weight is cast to its parameter's dtype on the way in (a bfloat16 model runs in
bfloat16, its float32 copies take the updates), and frozen parameters are used as they are.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import logging
import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from llc_callbacks.data import batch_size, map_tensors, to_device

LossFn = Callable[[nn.Module, Any], Tensor]
# ``observe(model, batch)``: one value per example, or per token, ``(batch, ...)``.
ObserveFn = Callable[[nn.Module, Any], Tensor]


class _LossModule(nn.Module):
    """Holds the model so that ``functional_call`` swaps its weights inside ``loss_fn``.

    ``forward(batch)`` is the scalar loss; ``forward(batch, observe)`` what ``observe(model,
    batch)`` records of a probe batch (``Probe.losses``), checked to be ``(batch, ...)``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        # Not registered as a submodule even if it is one: only the model's weights are forked.
        self.__dict__["loss_fn"] = loss_fn

    def forward(self, batch: Any, observe: ObserveFn | None = None) -> Tensor:
        if observe is not None:
            values = observe(self.model, batch)
            size = batch_size(batch)
            if not isinstance(values, Tensor) or values.ndim == 0 or len(values) != size:
                raise ValueError(
                    f"losses(model, batch) must return a tensor of shape (batch, ...) for a"
                    f" batch of {size}, got {_described(values)}"
                )
            return values.float()
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn(model, batch) must return a scalar tensor (the mean loss), got "
                f"{_described(loss)}"
            )
        return loss.reshape(()).float()


def _described(value: Any) -> str:
    """``a tensor of shape (...)`` or the type's name, for an error message."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


@dataclass(frozen=True)
class Layout:
    """Where each sampled parameter lies in the flat weights, in order.

    Attributes:
        names: Names of the sampled parameters (prefixed ``model.``).
        shapes: Their shapes.
        numels: The number of weights of each parameter.
        slices: Each parameter's slice of the flat weights.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    # Plain attributes, set once, which torch.compile reads without a graph break.
    numels: list[int] = field(init=False, repr=False, compare=False)
    slices: dict[str, slice] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        numels = [shape.numel() for shape in self.shapes]
        ends = itertools.accumulate(numels)
        slices = {
            name: slice(end - n, end) for name, n, end in zip(self.names, numels, ends, strict=True)
        }
        object.__setattr__(self, "numels", numels)
        object.__setattr__(self, "slices", slices)

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
        share_frozen: Use frozen parameters on ``device`` as they are, without a copy (a LoRA
            model's base weights): chains only read them. ``False`` copies them too, for a
            caller that overwrites ``constants``.
        autocast: Evaluate losses (and their gradients) under ``torch.autocast`` in this
            dtype; ``None``: in the model's own precision.
        compile: Take the batched chains' losses and gradients with a function compiled
            by ``torch.compile(fullgraph=True)`` in this mode (``torch.func.grad`` of their
            summed losses); ``None``: eagerly.

    Attributes:
        layout: The sampled parameters' names and shapes, in flat order.
        anchor: The flat float32 weights ``w*``.
        constants: Every other tensor the model uses, in its own dtype: frozen parameters
            already on ``device`` are the live tensors, detached (with ``share_frozen``);
            buffers, and frozen parameters elsewhere, are copies on ``device`` (buffers are
            copied so that a forward pass that writes one cannot touch the live model).
        precision: The dtype most of the model's floating-point weights are held in, which
            the forward pass runs in (but for ``autocast``) and batches' floating-point
            tensors are cast to.
        autocast: The dtype of ``torch.autocast`` around every loss, or ``None``.
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
        autocast: torch.dtype | None = None,
        compile: str | None = None,
    ) -> None:
        device = _indexed(torch.device(device))
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
        # Sampled weights go into the forward pass in their parameter's own dtype.
        self._dtypes = {n: p.dtype for n, p in trainable if p.dtype != torch.float32}
        self._dtypes.update(
            {a: self._dtypes[n] for a, n in self.aliases.items() if n in self._dtypes}
        )
        self.precision = _main_dtype(t for _, t in unique if isinstance(t, nn.Parameter))
        self.constants = {
            n: t.detach() if share_frozen and _usable(t, device) else _fork(t, device)
            for n, t in unique
            if n not in sampled
        }
        self._vectorize = vectorize
        self.vectorized: bool | None = None if vectorize == "auto" else bool(vectorize)
        self._model_name = type(model).__name__
        self.autocast = autocast
        self._compiled = (
            None
            if compile is None
            else torch.compile(self._grad_of_sum, fullgraph=True, mode=compile)
        )

    @property
    def precision_name(self) -> str:
        """What the forward passes run in, as ``LLCResult.precision`` names it.

        The dtype (``"float32"``, ``"bfloat16"``), or ``"<dtype>-mixed"`` under autocast.
        """
        if self.autocast is not None:
            return f"{str(self.autocast).removeprefix('torch.')}-mixed"
        return str(self.precision).removeprefix("torch.")

    @property
    def loss_fn(self) -> LossFn:
        """The loss the chains sample: ``loss_fn(model, batch) -> scalar tensor``."""
        return self._wrapper.loss_fn

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

    def observed(self, weights: Tensor, batch: Any, losses: ObserveFn | None = None) -> Tensor:
        """Each chain's losses on one probe batch, per example or per token, without gradients.

        Args:
            weights: Flat weights, shape ``(chains, dim)``.
            batch: One batch on the device; every tensor's first axis is the example.
            losses: ``losses(model, batch) -> (batch, ...)``, evaluated on the whole batch;
                ``None``: ``loss_fn`` on every example as a batch of one, vectorized over
                examples. Either is vectorized over chains when the chains are.

        Returns:
            The values, flattened per chain: shape ``(chains, observations)``.
        """

        def per_example(params: dict[str, Tensor]) -> Tensor:
            def one(single: Any) -> Tensor:
                return self._loss(params, map_tensors(single, lambda t: t.unsqueeze(0)))

            return vmap(one)(batch)

        def observe(params: dict[str, Tensor]) -> Tensor:
            if losses is None:
                return per_example(params)
            return self._loss(params, batch, losses)

        with torch.no_grad():
            if self.vectorized is False:
                found = torch.stack([observe(self.unflatten(row)) for row in weights])
            else:
                with _attention_kernels(weights.device):
                    found = vmap(observe)(self.unflatten(weights))
        return found.reshape(len(weights), -1)

    def loss_and_grad(
        self, weights: Tensor, batch: Any, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Losses and flat loss gradients of every chain on one shared batch.

        Each gradient is accumulated straight into its place in the flat gradients: no
        per-parameter copy of every chain's gradient is held beside them.

        Args:
            weights: Flat weights, shape ``(chains, dim)``.
            batch: One minibatch, already on the device.
            out: Where to write the gradients, shape ``(chains, dim)``; ``None``: a new tensor.

        Returns:
            Losses of shape ``(chains,)`` and the gradients (``out`` when given).

        Raises:
            RuntimeError: If ``vectorize=True`` and the model does not support ``vmap``.
        """
        grads = torch.empty_like(weights) if out is None else out
        if self.vectorized is False or (len(weights) == 1 and self._vectorize == "auto"):
            return self._looped(weights, batch, grads), grads  # one chain gains nothing from vmap
        try:
            losses = self._vmapped(weights, batch, grads)
        except Exception as error:
            if self._vectorize is True:
                raise RuntimeError(
                    f"vectorize=True but torch.func.vmap failed on {self._model_name}: {error}"
                ) from error
            if self.vectorized is None:
                # A loss that fails one chain at a time too fails for its own reasons: raise
                # that, and blame vmap only when the chains run without it.
                losses = self._looped(weights, batch, grads)
                self._report_fallback(error)
                self.vectorized = False
                return losses, grads
            raise
        self.vectorized = True
        return losses, grads

    def saved_bytes(self, batch: Any) -> int:
        """The CUDA memory one chain's forward pass at ``w*`` keeps for its backward, in bytes.

        Measured as the growth of ``torch.cuda.memory_allocated`` while the graph is held
        (the RNG states are restored, so the measurement draws nothing).

        Args:
            batch: One minibatch, already on the device (a CUDA device).
        """
        device = self.anchor.device
        with torch.random.fork_rng(devices=[device]):
            views = self.unflatten(self.anchor).items()
            leaves = {name: view.detach().requires_grad_() for name, view in views}
            before = torch.cuda.memory_allocated(device)
            loss = self._loss(leaves, batch)
            held = torch.cuda.memory_allocated(device) - before
            del loss
        return held

    def _loss(
        self, params: dict[str, Tensor], batch: Any, observe: ObserveFn | None = None
    ) -> Tensor:
        tensors = {**params, **self.constants}
        for name, dtype in self._dtypes.items():  # float32 weights into a half-precision model
            if name in tensors:
                tensors[name] = tensors[name].to(dtype)
        for alias, name in self._aliases:  # unless a leaf of its own came for the alias
            tensors.setdefault(alias, tensors[name])
        # Fresh containers for every call: a loss that pops keys must not empty the batch
        # for the next chain or for the paired forward pass.
        with _autocast(self.anchor.device, self.autocast):
            return functional_call(
                self._wrapper, tensors, (to_device(batch), observe), tie_weights=False
            )

    def _vmapped(self, weights: Tensor, batch: Any, grads: Tensor) -> Tensor:
        # vmap batches the forward pass only; one ordinary backward pass through the batched
        # graph gives every chain's gradient (chains are independent, so the gradient of
        # their summed losses is each chain's own), faster than vmapping the backward too.
        if self._compiled is not None:
            try:
                with _logging_ignored():
                    losses, found = self._compiled(weights, batch)
            except Exception as error:
                self._compiled = None
                self._report_fallback(error, "torch.compile", "run uncompiled", "compile=False")
            else:  # copies: CUDA graphs write their outputs over at the next call
                grads.copy_(found)
                return losses.clone()
        leaves = self._leaves(weights, grads)
        with _attention_kernels(weights.device):
            losses = vmap(self._loss, in_dims=(0, None))(leaves, batch)
        _backward(losses.sum(), leaves)
        return losses.detach()

    def _grad_of_sum(self, weights: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        """The batched losses and ``torch.func.grad`` of their sum, as one traceable function.

        What ``_vmapped`` computes, without autograd's leaves and hooks, so that
        ``torch.compile`` takes it as one graph; the gradients come out as a new tensor.
        """

        def summed(flat: Tensor) -> tuple[Tensor, Tensor]:
            with _attention_kernels(flat.device):
                losses = vmap(self._loss, in_dims=(0, None))(self.unflatten(flat), batch)
            return losses.sum(), losses

        grads, losses = torch.func.grad(summed, has_aux=True)(weights)
        return losses, grads

    def _looped(self, weights: Tensor, batch: Any, grads: Tensor) -> Tensor:
        losses = []
        for chain_weights, chain_grads in zip(weights, grads, strict=True):
            leaves = self._leaves(chain_weights, chain_grads)
            loss = self._loss(leaves, batch)
            _backward(loss, leaves)
            losses.append(loss.detach())
        return torch.stack(losses)

    def _leaves(self, flat: Tensor, grads: Tensor) -> dict[str, Tensor]:
        """Per-parameter views of flat weights as autograd leaves, by name.

        Each leaf's ``.grad`` is its view of ``grads``, zeroed: backward accumulates into it
        in place (a parameter the loss does not use keeps a zero gradient). A tied weight
        gets a leaf under each of its names, sharing its view of ``grads``, so that each use's
        gradient is added there as it comes rather than summed in a buffer of its own first.
        """
        grads.zero_()
        grad_views = self.unflatten(grads)
        leaves = {}
        for name, view in self.unflatten(flat).items():
            leaves[name] = view.detach().requires_grad_()
            leaves[name].grad = grad_views[name]
        for alias, name in self.aliases.items():
            if name not in leaves:  # a restricted fork holds it constant
                continue
            leaves[alias] = leaves[name].detach().requires_grad_()
            leaves[alias].grad = grad_views[name]
        return leaves

    def _report_fallback(
        self,
        error: Exception,
        what: str = "torch.func.vmap",
        instead: str = "run one after another",
        skip: str = "vectorize=False",
    ) -> None:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        warnings.warn(
            f"llc_callbacks: chains of {self._model_name} {instead} because {what} does not"
            f" support this model ({reason}). Pass {skip} to skip the attempt.",
            stacklevel=5,
        )


def _backward(loss: Tensor, leaves: dict[str, Tensor]) -> None:
    """Backward into the leaves' ``.grad`` views of the flat gradients.

    Those views are strided (rows of the flat buffer), which torch reports once as a breach of
    its gradient layout contract; accumulating into them is right, so the notice is dropped.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout")
        torch.autograd.backward(loss, inputs=list(leaves.values()))


def _attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """Attention kernels that batch under ``vmap``: on CUDA all but cuDNN's, on CPU the math.

    Under ``vmap``, cuDNN's scaled-dot-product attention returned NaN losses for a bfloat16
    GPT-2 (torch 2.11, NVIDIA H200), while flash attention, memory-efficient attention and
    the plain math gave the loop's numbers (``benchmarks/gpu_check.py``). On CPU, torch 2.13
    has no batching rule for its flash kernel: ``vmap`` would run it once per chain, where
    the math (matrix products and a softmax) runs once for every chain.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
    except ImportError:  # older torch has no cuDNN attention either
        return contextlib.nullcontext()
    if device.type == "cpu":
        return sdpa_kernel([SDPBackend.MATH])
    if device.type != "cuda":
        return contextlib.nullcontext()
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(kernels)


def _logging_ignored() -> contextlib.AbstractContextManager:
    """Let ``torch.compile`` trace through log calls (transformers' ``warning_once``) whole.

    A log call in a model's forward pass (transformers warns about its ``loss_type`` on every
    forward) is a graph break, which ``fullgraph=True`` refuses; the compiled chains skip it.
    """
    methods = ("debug", "info", "warning", "warning_once", "error")
    found = {getattr(logging.Logger, name) for name in methods if hasattr(logging.Logger, name)}
    ignored = torch._dynamo.config.ignore_logging_functions | found
    return torch._dynamo.config.patch(ignore_logging_functions=ignored)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``, or nothing when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as the current CUDA device (``cuda:0``), so that it compares equal to a tensor's."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _usable(tensor: Tensor, device: torch.device) -> bool:
    """Whether a frozen tensor can serve the chains as it is: a parameter on their device."""
    return isinstance(tensor, nn.Parameter) and tensor.device == device


def _fork(tensor: Tensor, device: torch.device) -> Tensor:
    """A detached copy on ``device``, in the tensor's own dtype."""
    return tensor.detach().to(device=device, copy=True)


def _main_dtype(parameters: Iterable[Tensor]) -> torch.dtype:
    """The floating-point dtype that holds the most of these weights (float32 if none)."""
    counts: collections.Counter[torch.dtype] = collections.Counter()
    for tensor in parameters:
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32
