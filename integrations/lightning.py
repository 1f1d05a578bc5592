"""Lightning adapter: ``LLCCallback`` logs LLC estimates next to the loss."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler
from typing_extensions import override

from llc_callbacks.config import LLCConfig
from llc_callbacks.dynamics import EssentialDynamics
from llc_callbacks.forked import LossFn
from llc_callbacks.integrations import common
from llc_callbacks.measures import Measure
from llc_callbacks.measures.routing import route
from llc_callbacks.observables import Probe
from llc_callbacks.replay import Checkpoint, Loader
from llc_callbacks.restrictions import Restrictions

# Lightning's mixed precisions, and the autocast dtype each trains its forward passes in.
MIXED_PRECISION = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


class LLCCallback(Callback):
    """Estimate the LLC of the LightningModule on a schedule and log it to every logger.

    Each estimate logs ``llc/mean``, ``llc/std`` and ``llc/healthy`` (1 when every health
    check passed; a failed one is also a warning saying what to change), and ``extra_metrics``
    adds per-chain values, diagnostics and the free energy. They are logged with
    ``step=trainer.global_step``, the number of optimizer steps behind the weights, which is
    also the step Lightning logs the loss of those weights under. Under DDP the chains are
    split over the ranks and gathered, and rank zero logs.

    When training starts, the callback checks the loss, the data and the restrictions once
    (one forward pass per data source on the forked weights) and logs
    ``{prefix}/num_sampled``, the number of weights each chain samples: a mistake it finds
    stops the run before its first step, naming the argument and the fix (``strict``).

    Args:
        config: Sampling hyperparameters, fixed for the run.
        every_n_steps: Estimate after every ``n``-th optimizer step (the default, with 100,
            when no schedule is given). Gradient accumulation neither repeats nor skips one.
        steps: Estimate after exactly these optimizer steps.
        log_spaced: Estimate about this many times at log-spaced steps over the run.
        at_start: Also estimate before the first optimizer step.
        at_end: Also estimate when training ends.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``; by default the loss returned by
            the module's ``training_step`` (its ``self.log`` calls are dropped while chains
            run). Pass one if ``training_step`` has other side effects, such as updating
            torchmetrics, or returns ``None`` for some batches.
        dataloader: Where batches come from; by default a loader of the trainer's training
            set, owned by the callback (same dataset, batch size, collate function and
            shuffling, no workers, not split across ranks). Either way batches go through
            the module's batch-transfer hooks.
        prefix: First part of every metric key (``"llc"``, ``"probe/llc"``); two
            ``LLCCallback``s of one trainer need different ones (Lightning refuses two
            callbacks with the same ``state_key``).
        on_error: What a failure during training does, be it an estimate, a figure or a log
            call: ``"warn"``: one warning, NaN metrics for a failed estimate, and training
            goes on; ``"raise"``: training stops with the error.
        strict: Whether a mistake found when training starts (the check of the loss, data
            and restrictions, the choice of data) raises, naming the argument and the fix;
            ``False`` warns instead (see ``LLCMonitor``).
        extra_metrics: More keys per estimate: ``"chains"``, ``"diagnostics"`` (see
            ``LLCMonitor``; ``"free_energy"`` is deprecated: ``measures=[FreeEnergy()]``).
        log_trace_plot: Deprecated: ``measures=[Traces()]``.
        restrictions: Weight- and data-restricted LLCs to estimate too (``{prefix}/<name>/``
            metrics); data sources go through the module's batch-transfer hooks. At the end
            of training their heatmap (``plot_components``) goes to every ``WandbLogger`` as
            ``{prefix}/components`` (needs matplotlib).
        curvature: Deprecated: ``measures=[Curvature(...)]`` (see ``LLCMonitor``).
        dataset_size: The training set's size ``n``, which the measures are told
            (``FreeEnergy``'s); by default the length of the trainer's training set, when it
            has one.
        max_overhead: The share of the training time the LLC may take: the readings'
            length, with ``stream``; the snapshot estimates' spacing, without (see
            ``LLCMonitor``).
        dynamics: Record the essential dynamics on its own schedule (its probe batches go
            through the module's batch-transfer hooks, its default loss is ``loss_fn``'s); at
            the end of training their PCA figure, with the LLC's stage boundaries, goes to
            every ``WandbLogger`` as ``{prefix}/essential_dynamics`` and the records are saved
            as ``essential_dynamics.npz`` in ``trainer.log_dir``.
        observables: Named probe sets (re-iterables of batches, or ``Probe``) whose
            per-example (or per-token) losses the chains record (see ``estimate_llc``): each
            estimate logs the loss kernel's mean correlations ``{prefix}/kernel/<a>:<b>``,
            sends the most influential examples as the table ``{prefix}/influence`` and the
            kernel's heatmap as ``{prefix}/loss_kernel`` to every ``WandbLogger``, and saves
            the recorded losses as ``observables/step_<step>.npz`` in ``trainer.log_dir``.
        susceptibility_base: The observable sampling the training data: each estimate also
            logs every component's susceptibility to every other observable (see
            ``LLCMonitor``), sends them as the table ``{prefix}/susceptibility``, and at the
            end of training their curves as the figure ``{prefix}/susceptibilities``.
        stream: Read the LLC from chains that persist through training: tuned once, then
            continued at every scheduled step around the current weights, at the step sizes
            they were tuned to, for a share of the training time (``max_overhead``); the default.
            ``False``: a snapshot estimate at every scheduled step (see ``LLCMonitor``).
        measures: What to compute next to the LLC at every reading (``Curvature``,
            ``FreeEnergy``, ``Traces``, or a ``Measure`` of your own): metrics to every logger
            as ``{prefix}/<name>``, tables and figures to every ``WandbLogger``.

    Stage boundaries that the monitor confirms (``{prefix}/stage``) also go to every
    ``WandbLogger`` as the table ``{prefix}/stages``.

    Raises:
        ValueError: At construction for a bad argument, naming it; in ``setup`` for an
            unsupported strategy (FSDPStrategy, DeepSpeed), manual optimization without
            ``loss_fn``, or another LLC callback with the same prefix.
    """

    def __init__(
        self,
        config: LLCConfig | None = None,
        *,
        every_n_steps: int | None = None,
        steps: Sequence[int] | None = None,
        log_spaced: int | None = None,
        at_start: bool = False,
        at_end: bool = False,
        loss_fn: LossFn | None = None,
        dataloader: Iterable[Any] | None = None,
        prefix: str = "llc",
        on_error: Literal["warn", "raise"] = "warn",
        strict: bool = True,
        extra_metrics: Sequence[str] = (),
        log_trace_plot: bool = False,
        restrictions: Restrictions | None = None,
        curvature: Sequence[str] = (),
        dataset_size: int | None = None,
        max_overhead: float | Literal["auto"] | None = "auto",
        dynamics: EssentialDynamics | None = None,
        observables: Mapping[str, Iterable[Any] | Probe] | None = None,
        susceptibility_base: str | None = None,
        stream: bool = True,
        measures: Sequence[Measure] = (),
    ) -> None:
        arguments = dict(locals())  # the signature's arguments, by name
        del arguments["self"]
        self.monitor = common.build_monitor(arguments)
        self._arguments = arguments
        self._runs = 0
        self._held = common.HeldError()
        self.dynamics = dynamics
        self._probe = dynamics.probe if dynamics is not None else None
        self.loss_fn = loss_fn
        self.dataloader = dataloader
        self.restrictions = restrictions
        self._state_key = common.state_key("LLCCallback", self.monitor.prefix)
        self._data: Iterable[Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        supported = isinstance(strategy, (SingleDeviceStrategy, ModelParallelStrategy)) or (
            isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
        )
        if not supported:
            raise ValueError(
                f"LLCCallback does not support the {type(strategy).__name__}: its weights"
                " (FSDP's flat parameters, DeepSpeed's partitions) cannot be sampled. Use a"
                " single device, strategy='ddp', or ModelParallelStrategy with fully_shard"
                " in configure_model."
            )
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError(
                "LLCCallback needs loss_fn=... with manual optimization: training_step steps"
                " the optimizer itself, so it cannot serve as the loss."
            )
        if self._runs:  # a callback that fitted before starts afresh (a resume loads after)
            self.monitor = common.next_run(
                "LLCCallback", self._arguments, self.monitor, self.dynamics
            )
        self._runs += 1
        common.refuse_same_prefix(self, trainer.callbacks)
        self.monitor.follow_precision(
            MIXED_PRECISION.get(str(trainer.precision)), trainer.strategy.root_device.type
        )
        if self.dataloader is None:  # the trainer's batches: a step's share of its examples
            # Data-parallel replicas only: tensor-parallel ranks share their batches.
            replicas = (trainer.distributed_sampler_kwargs or {}).get("num_replicas", 1)
            self.monitor.follow_batches_per_step(trainer.accumulate_grad_batches * replicas)

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get("callbacks", {})
        common.warn_if_state_is_stale(self.monitor, "LLCCallback", self.state_key, saved)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if math.isfinite(total):
            self.monitor.set_total_steps(int(total))
            if self.dynamics is not None:
                self.dynamics.set_total_steps(int(total))
        if self.dynamics is not None:
            self.dynamics.probe = _ModuleBatches(self._probe, pl_module)
        size = common.dataset_size(getattr(trainer.train_dataloader, "dataset", None))
        if size is not None:
            self.monitor.set_dataset_size(size)
        with self.monitor.checking("choosing the LLC estimates' data"):
            loader = self.dataloader if self.dataloader is not None else _own_loader(trainer)
            self._data = _ModuleBatches(loader, pl_module)
        if self.restrictions is not None:
            sources = self.restrictions.sources
            self.monitor.restrictions = dataclasses.replace(
                self.restrictions,
                sources={name: _ModuleBatches(data, pl_module) for name, data in sources.items()},
            )
        if self.monitor.enabled:
            with _chain_ready(pl_module):
                metrics = self.monitor.start(
                    pl_module, self._loss_fn(), self._data, device=pl_module.device
                )
            self._log(trainer, metrics)
        self._maybe_estimate(trainer, pl_module)
        self._maybe_record(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._held.release()  # the step before was saved: raise what its estimate raised

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning runs ModelCheckpoint's hook after every other callback's: what this
        # step's estimate raises waits until the step's checkpoint is written.
        with self._held.holding():
            self._maybe_estimate(trainer, pl_module)
            self._maybe_record(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._held.release()
        self._maybe_estimate(trainer, pl_module, final=True)
        self._maybe_record(trainer, pl_module, final=True)
        step, sinks = trainer.global_step, self._image_sinks(trainer)
        common.log_components_figure(self.monitor, sinks, step)
        common.log_susceptibilities_figure(self.monitor, sinks, step)
        if self.dynamics is not None:
            folder = Path(trainer.log_dir or trainer.default_root_dir)
            common.finish_dynamics(
                self.monitor, self.dynamics, sinks, folder if trainer.is_global_zero else None, step
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return common.callback_state(self.monitor, self.dynamics)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        common.load_callback_state(self.monitor, self.dynamics, state_dict)

    def _maybe_estimate(
        self, trainer: Trainer, pl_module: LightningModule, *, final: bool = False
    ) -> None:
        step = trainer.global_step
        if not self.monitor.is_due(step, final=final):
            return
        with _chain_ready(pl_module):
            metrics = self.monitor.estimate(
                step,
                pl_module,
                self._loss_fn(),
                self._data,
                device=pl_module.device,
                progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            )
        self._log(trainer, metrics)
        tables, images = self._table_sinks(trainer), self._image_sinks(trainer)
        common.log_stage_table(self.monitor, tables, step)
        if self.monitor.observables:
            # trainer.log_dir broadcasts from rank zero: every rank reads it.
            folder = Path(trainer.log_dir or trainer.default_root_dir)
            saved = folder if trainer.is_global_zero else None
            common.log_observables(self.monitor, tables, images, saved, step)
        route(self.monitor, self.monitor.produced, tables, images, step)

    def _maybe_record(
        self, trainer: Trainer, pl_module: LightningModule, *, final: bool = False
    ) -> None:
        """Record the essential dynamics if they are due."""
        dynamics = self.dynamics
        if dynamics is None or not dynamics.is_due(trainer.global_step, final=final):
            return
        with (
            self.monitor.reporting("recording the essential dynamics"),
            _chain_ready(pl_module),
        ):
            dynamics.record(
                trainer.global_step, pl_module, self._loss_fn(), device=pl_module.device
            )

    def _loss_fn(self) -> LossFn:
        return self.loss_fn or training_step_loss

    def _log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero or not metrics:
            return
        with self.monitor.reporting("logging the LLC metrics"):
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _image_sinks(self, trainer: Trainer) -> list[common.Sink]:
        """Every ``WandbLogger``, on rank zero: the receivers of figures."""
        return [partial(_log_image, lg, self.monitor.prefix) for lg in _wandb_loggers(trainer)]

    def _table_sinks(self, trainer: Trainer) -> list[common.TableSink]:
        """Every ``WandbLogger``, on rank zero: the receivers of tables."""
        return [partial(_log_table, lg, self.monitor.prefix) for lg in _wandb_loggers(trainer)]


def _wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _log_image(logger: WandbLogger, prefix: str, name: str, pixels: np.ndarray, step: int) -> None:
    logger.log_image(f"{prefix}/{name}", [pixels], step=step)


def _log_table(
    logger: WandbLogger, prefix: str, name: str, columns: list[str], rows: list[list], step: int
) -> None:
    logger.log_table(f"{prefix}/{name}", columns=columns, data=rows, step=step)


def training_step_loss(module: LightningModule, batch: Any) -> Tensor:
    """The loss a LightningModule's ``training_step`` returns for a batch.

    Raises:
        ValueError: If ``training_step`` returns neither a tensor nor a dict with ``"loss"``.
    """
    if _takes_batch_idx(module):
        output = module.training_step(batch, 0)
    else:
        output = module.training_step(batch)
    if isinstance(output, Mapping) and "loss" in output:
        output = output["loss"]
    if not isinstance(output, Tensor):
        skipped = (
            " (Lightning's way to skip a batch: chains cannot skip one)" if output is None else ""
        )
        raise ValueError(
            f"training_step returned {type(output).__name__}{skipped}, not a loss tensor or a"
            " dict with 'loss'; pass loss_fn=... to LLCCallback"
        )
    return output


def module_loss(module: LightningModule, batch: Any) -> Tensor:
    """``training_step_loss`` outside a trainer, where ``self.log`` does nothing.

    The default loss of ``llc-callbacks replay`` for Lightning checkpoints, as
    ``LLCCallback``'s in training.
    """
    with _chain_ready(module):
        return training_step_loss(module, batch)


def checkpoint_loader(module_class: type[LightningModule]) -> Loader:
    """A ``load`` for ``llc_callbacks.replay``: a LightningModule at a ``.ckpt``'s weights.

    The module is built from the checkpoint's saved ``hyper_parameters`` (as
    ``load_from_checkpoint`` builds it) and given its ``state_dict``; the file is
    memory-mapped, so optimizer states and the rest are never read.

    Args:
        module_class: The LightningModule subclass that was trained.

    Returns:
        ``load(checkpoint) -> LightningModule``, in eval mode on the CPU.
    """

    def load(checkpoint: Checkpoint) -> LightningModule:
        saved = torch.load(checkpoint.path, map_location="cpu", mmap=True, weights_only=False)
        module = module_class(**saved.get("hyper_parameters", {}))
        module.load_state_dict(saved["state_dict"])
        return module.eval()

    return load


def _takes_batch_idx(module: LightningModule) -> bool:
    step = module.training_step
    function = getattr(step, "__func__", None)
    return _accepts_two(step) if function is None else _method_accepts_two(function)


@cache
def _method_accepts_two(function: Callable[..., Any]) -> bool:
    """``_accepts_two`` of a method, once per function (chains call it at every step)."""
    return _accepts_two(partial(function, None))


def _accepts_two(step: Callable[..., Any]) -> bool:
    parameters = inspect.signature(step).parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    return variadic or len(positional) >= 2


@contextmanager
def _chain_ready(module: LightningModule) -> Iterator[None]:
    """While chains run: ``self.log`` does nothing and compiled methods run uncompiled."""
    patches: dict[str, Any] = {"log": _ignore, "log_dict": _ignore}
    compiled = getattr(module, "_compiler_ctx", None)
    if compiled:
        patches["forward"] = compiled["original_forward"]
        patches["training_step"] = compiled["original_training_step"]
    saved = {name: module.__dict__[name] for name in patches if name in module.__dict__}
    module.__dict__.update(patches)
    try:
        yield
    finally:
        for name in patches:
            del module.__dict__[name]
        module.__dict__.update(saved)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


class _ModuleBatches:
    """A loader's batches through the module's batch-transfer hooks, as training sees them."""

    def __init__(self, loader: Iterable[Any], module: LightningModule) -> None:
        self.loader = loader
        self.module = module

    def __iter__(self) -> Iterator[Any]:
        module = self.module
        for batch in self.loader:
            batch = module.on_before_batch_transfer(batch, 0)
            batch = module.transfer_batch_to_device(batch, module.device, 0)
            yield module.on_after_batch_transfer(batch, 0)


def _own_loader(trainer: Trainer) -> DataLoader:
    """A DataLoader like the trainer's training loader, for the callback alone.

    It shares the dataset, batch size, collate function and shuffling, but not the iterator
    (persistent workers would otherwise be reset under training) nor a DistributedSampler
    (every rank must see the same batches so that chain ``i`` is the same on any rank).
    """
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise ValueError(
            "LLCCallback takes batches from a single training DataLoader, but the trainer has"
            f" {type(loader).__name__}; pass dataloader=... to LLCCallback"
        )
    if loader.batch_size is None:  # a custom batch sampler decides the batches
        return DataLoader(
            loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn
        )
    sampler = loader.sampler
    shuffle = isinstance(sampler, RandomSampler) or (
        isinstance(sampler, DistributedSampler) and sampler.shuffle
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=shuffle and not isinstance(loader.dataset, IterableDataset),
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
    )
