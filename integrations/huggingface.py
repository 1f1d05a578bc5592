"""transformers adapter: ``LLCTrainerCallback`` logs LLC estimates through the Trainer."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import (
    AutoConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from llc_callbacks.config import LLCConfig
from llc_callbacks.dynamics import EssentialDynamics
from llc_callbacks.forked import LossFn
from llc_callbacks.integrations import common, trl_trainers
from llc_callbacks.measures import Measure
from llc_callbacks.measures.routing import route
from llc_callbacks.observables import Probe
from llc_callbacks.replay import Checkpoint, Loader
from llc_callbacks.restrictions import Restrictions

logger = logging.getLogger(__name__)


class LLCTrainerCallback(TrainerCallback):
    """Estimate the LLC of a ``Trainer``'s model on a schedule and log it through the Trainer.

    Usage::

        trainer = Trainer(model, args, train_dataset=data, callbacks=[LLCTrainerCallback()])

    or ``trainer.add_callback(LLCTrainerCallback(...))``. The callback finds the Trainer
    that runs it when the Trainer is built (``on_init_end``) or when training starts, and
    uses its loss, data and logging. Metrics go through transformers' ``Trainer.log`` (not
    a subclass's override, such as TRL's, which would merge its buffered metrics), so
    ``state.log_history`` and every ``report_to`` integration get them at
    ``state.global_step`` (W&B shows ``train/llc/mean`` on the ``train/global_step`` axis,
    next to ``train/loss``), and the loss log of the same step is kept. Each estimate logs
    ``{prefix}/mean``, ``{prefix}/std`` and ``{prefix}/healthy`` (and ``extra_metrics``).
    Under ``torchrun`` the chains are split over the processes and gathered.

    When training starts, the callback checks the loss, the data and the restrictions once
    and logs ``{prefix}/num_sampled``, as ``LLCCallback`` does: a mistake it finds raises
    from ``trainer.train()`` before the first step (``strict``).

    Args:
        config: Sampling hyperparameters, fixed for the run.
        every_n_steps: Estimate after every ``n``-th optimizer step (the default, with 100,
            when no schedule is given).
        steps: Estimate after exactly these optimizer steps.
        log_spaced: Estimate about this many times at log-spaced steps over the run.
        at_start: Also estimate before the first optimizer step.
        at_end: Also estimate when training ends.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; by default
            ``trainer.compute_loss`` (labels, label smoothing, ``compute_loss_func`` and
            subclass overrides included), and inside TRL's ``SFTTrainer``, ``DPOTrainer``
            and ``GRPOTrainer`` a loss of the same meaning that runs batched over chains
            (``trl_trainers.objective``). Either way it gets its own copy of the batch dict.
        dataloader: Where batches come from; by default a loader over the Trainer's training
            set, owned by the callback (same dataset, per-device batch size and collator,
            shuffled, no workers, not split across processes); in a ``GRPOTrainer``, the
            completions of its first generation.
        prefix: First part of every metric key (``"llc"``, ``"probe/llc"``); two LLC
            callbacks of one Trainer need different ones.
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
            metrics). At the end of training their heatmap (``plot_components``) goes to W&B
            as ``train/{prefix}/components`` when the Trainer reports to wandb.
        curvature: Deprecated: ``measures=[Curvature(...)]`` (see ``LLCMonitor``).
        dataset_size: The training set's size ``n``, which the measures are told
            (``FreeEnergy``'s); by default the length of the Trainer's training set, when it
            has one.
        max_overhead: The share of the training time the LLC may take: the readings'
            length, with ``stream``; the snapshot estimates' spacing, without (see
            ``LLCMonitor``).
        dynamics: Record the essential dynamics on its own schedule (its default loss is
            ``loss_fn``'s); at the end of training their PCA figure, with the LLC's stage
            boundaries, goes to W&B as ``train/{prefix}/essential_dynamics`` when the Trainer
            reports to wandb, and the records are saved as ``essential_dynamics.npz`` in
            ``args.output_dir``.
        observables: Named probe sets (re-iterables of batches, or ``Probe``) whose
            per-example (or per-token) losses the chains record (see ``estimate_llc``): each
            estimate logs the loss kernel's mean correlations ``{prefix}/kernel/<a>:<b>``,
            sends the most influential examples as the table ``{prefix}/influence`` and the
            kernel's heatmap as ``{prefix}/loss_kernel`` to W&B (when the Trainer reports to
            wandb), and saves the recorded losses as ``observables/step_<step>.npz`` in
            ``args.output_dir``.
        susceptibility_base: The observable sampling the training data: each estimate also
            logs every component's susceptibility to every other observable (see
            ``LLCMonitor``), sends them as the table ``{prefix}/susceptibility``, and at the
            end of training their curves as the figure ``{prefix}/susceptibilities``.
        stream: Read the LLC from chains that persist through training: tuned once, then
            continued at every scheduled step around the current weights, at the step sizes
            they were tuned to, for a share of the training time (``max_overhead``); the default.
            ``False``: a snapshot estimate at every scheduled step (see ``LLCMonitor``).
        measures: What to compute next to the LLC at every reading (``Curvature``,
            ``FreeEnergy``, ``Traces``, or a ``Measure`` of your own): metrics as
            ``{prefix}/<name>``, tables and figures to W&B when the Trainer reports to wandb.

    Stage boundaries that the monitor confirms (``{prefix}/stage``) also go to W&B as the
    table ``train/{prefix}/stages``.

    Attributes:
        monitor: The ``LLCMonitor`` that schedules the estimates and keeps their history.
        trainer: The Trainer that runs the callback, once found (``None`` before).

    Raises:
        ValueError: For a bad argument, naming it; when training starts, for another LLC
            callback with the same prefix.
        RuntimeError: When training starts, if no Trainer runs the callback.
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
        if isinstance(config, Trainer):
            raise ValueError(
                "LLCTrainerCallback takes no trainer: pass it to Trainer(callbacks=[...]) or"
                " trainer.add_callback(...), and it finds the Trainer itself"
            )
        arguments = dict(locals())  # the signature's arguments, by name
        del arguments["self"]
        self.monitor = common.build_monitor(arguments)
        self._arguments = arguments
        self._runs = 0
        self._held = common.HeldError()
        self.dynamics = dynamics
        self.trainer: Trainer | None = None
        self.loss_fn = loss_fn
        self.dataloader = dataloader
        # The monitor's state travels in TrainerState.stateful_callbacks under this key.
        self.state_key = common.state_key("LLCTrainerCallback", self.monitor.prefix)
        self._data: Iterable[Any] | None = None
        self._objective: trl_trainers.Objective | None = None
        self._started = False

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Find the Trainer being built with ``callbacks=[...]``."""
        self.trainer = _running_trainer() or self.trainer

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        train_dataloader: DataLoader | None = None,
        **kwargs: Any,
    ) -> None:
        """Restore a resumed run's history, check the inputs, and estimate if ``at_start``.

        The callback follows the Trainer that runs it: a callback that ran before (in this or
        another Trainer) starts this run with a fresh monitor (``common.next_run``).

        Raises:
            RuntimeError: If no Trainer runs the callback.
            ValueError: If another LLC callback of the Trainer has the same prefix.
        """
        self.trainer = _running_trainer() or self.trainer
        if self.trainer is None:
            raise RuntimeError(
                "LLCTrainerCallback found no transformers.Trainer running it: pass it to"
                " Trainer(callbacks=[...]) or trainer.add_callback(...)"
            )
        if self._runs:
            self.monitor = common.next_run(
                "LLCTrainerCallback", self._arguments, self.monitor, self.dynamics
            )
        self._runs += 1
        common.refuse_same_prefix(self, self.trainer.callback_handler.callbacks)
        self.monitor.follow_precision(
            "bfloat16" if args.bf16 else "float16" if args.fp16 else None,
            next(model.parameters()).device.type,
        )
        if self.dataloader is None:  # the Trainer's batches: a step's share of its examples
            self.monitor.follow_batches_per_step(_batches_per_step(self.trainer, args))
        with self.monitor.checking("choosing the LLC estimates' loss"):
            own = self.loss_fn is None
            self._objective = trl_trainers.objective(self.trainer) if own else None
        if own and self._objective is None and args.label_smoothing_factor > 0:
            self.monitor.warn_once(
                "label_smoothing",
                f"label_smoothing_factor={args.label_smoothing_factor}: the Trainer's loss is"
                " smoothed, not the negative log-likelihood the LLC is defined for. Pass"
                " loss_fn=model_loss (llc_callbacks.integrations.huggingface) to sample the"
                " model's own loss.",
            )
        saved = state.stateful_callbacks or {}
        common.warn_if_state_is_stale(self.monitor, "LLCTrainerCallback", self.state_key, saved)
        if self.state_key in saved:
            common.load_callback_state(self.monitor, self.dynamics, saved[self.state_key])
            if self._objective is not None:
                self._objective.load_state_dict(saved[self.state_key].get("objective", {}))
        self.monitor.set_total_steps(state.max_steps)
        if self.dynamics is not None:
            self.dynamics.set_total_steps(state.max_steps)
        size = common.dataset_size(self.trainer.train_dataset)
        if size is not None:
            self.monitor.set_dataset_size(size)
        with self.monitor.checking("choosing the LLC estimates' data"):
            self._data = self._chains_data(train_dataloader, args)
        self._started = False
        self._maybe_start(control, model)
        self._maybe_estimate(args, state, control, model)
        self._maybe_record(state, model)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Raise what the last step's estimate raised, now that its checkpoint is written."""
        self._held.release()

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Estimate and record the essential dynamics after an optimizer step, where due.

        The Trainer saves the step's checkpoint after this hook: what the estimate raises (an
        interrupt, a failure under ``on_error="raise"``) is raised once it is written.
        """
        with self._held.holding():
            if self._objective is not None and self._objective.observe(self.trainer):
                self._save_state(state)
                self._maybe_start(control, model)
            self._maybe_estimate(args, state, control, model)
            self._maybe_record(state, model)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Raise what the step's estimate raised, now that the step is saved."""
        self._held.release()

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Estimate at the end of training if ``at_end``; the end-of-run figures and files."""
        self._held.release()
        self._maybe_estimate(args, state, control, model, final=True)
        self._maybe_record(state, model, final=True)
        sinks = self._image_sinks(args, state)
        common.log_components_figure(self.monitor, sinks, state.global_step)
        common.log_susceptibilities_figure(self.monitor, sinks, state.global_step)
        if self.dynamics is not None:
            folder = Path(args.output_dir) if state.is_world_process_zero else None
            common.finish_dynamics(self.monitor, self.dynamics, sinks, folder, state.global_step)

    def _chains_data(
        self, train_dataloader: DataLoader | None, args: TrainingArguments
    ) -> Iterable[Any]:
        """The chains' batches: the given loader, else the objective's, else the callback's own."""
        own = partial(_own_loader, train_dataloader, args)
        if self._objective is None:
            return self.dataloader if self.dataloader is not None else own()
        if not self._objective.ready() and self.monitor.schedule.at_start:
            raise ValueError(
                f"at_start=True: {self._objective.note}, so there is nothing to estimate on"
                " before it: drop at_start"
            )
        return self._objective.data(self.dataloader, own)

    def _maybe_start(self, control: TrainerControl, model: nn.Module) -> None:
        """The check before the first estimate, once its data exist; say what the chains sample."""
        if self._started or (self._objective is not None and not self._objective.ready()):
            return
        self._started = True
        if self._objective is not None and self.trainer.is_world_process_zero():
            logger.info("llc_callbacks: %s", self._objective.note)
        if self.monitor.enabled:
            with _chains_ready(model):
                metrics = self.monitor.start(
                    model, self._loss_fn(), self._data, device=next(model.parameters()).device
                )
            self._log(control, metrics)

    def _maybe_estimate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module,
        final: bool = False,
    ) -> None:
        step = state.global_step
        if not self._started or not self.monitor.is_due(step, final=final):
            return
        with _chains_ready(model):
            metrics = self.monitor.estimate(
                step,
                model,
                self._loss_fn(),
                self._data,
                device=next(model.parameters()).device,
                progress=state.is_world_process_zero and not args.disable_tqdm,
            )
        self._save_state(state)
        self._log(control, metrics)
        common.log_stage_table(self.monitor, self._table_sinks(args, state), step)
        folder = Path(args.output_dir) if state.is_world_process_zero else None
        tables, images = self._table_sinks(args, state), self._image_sinks(args, state)
        common.log_observables(self.monitor, tables, images, folder, step)
        route(self.monitor, self.monitor.produced, tables, images, step)

    def _maybe_record(self, state: TrainerState, model: nn.Module, final: bool = False) -> None:
        """Record the essential dynamics if they are due."""
        dynamics = self.dynamics
        if dynamics is None or not dynamics.is_due(state.global_step, final=final):
            return
        with self.monitor.reporting("recording the essential dynamics"), _chains_ready(model):
            dynamics.record(state.global_step, model, self._loss_fn())
        self._save_state(state)

    def _save_state(self, state: TrainerState) -> None:
        """Put the callback's state where the Trainer saves it with every checkpoint."""
        with self.monitor.reporting("saving the LLC state"):
            saved = common.callback_state(self.monitor, self.dynamics)
            if self._objective is not None:
                saved["objective"] = self._objective.state_dict()
            state.stateful_callbacks[self.state_key] = saved

    def _loss_fn(self) -> LossFn:
        if self.loss_fn is not None:
            return self.loss_fn
        return self._trainer_loss if self._objective is None else self._objective.loss_fn

    def _log(self, control: TrainerControl, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        # Trainer.log resets control.should_log: without this, the loss due at this very step
        # would not be logged. transformers' own Trainer.log, not a subclass's: TRL's merges
        # its buffered training metrics into whatever is logged next, and clears them.
        should_log = control.should_log
        with self.monitor.reporting("logging the LLC metrics"):
            Trainer.log(self.trainer, dict(metrics))
        control.should_log = should_log

    def _image_sinks(self, args: TrainingArguments, state: TrainerState) -> list[common.Sink]:
        """The W&B run the Trainer reports to, on the main process: the receiver of figures."""
        return [partial(_log_image, self.monitor.prefix)] if _reports_to_wandb(args, state) else []

    def _table_sinks(self, args: TrainingArguments, state: TrainerState) -> list[common.TableSink]:
        """The W&B run the Trainer reports to, on the main process: the receiver of tables."""
        return [partial(_log_table, self.monitor.prefix)] if _reports_to_wandb(args, state) else []

    def _trainer_loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return self.trainer.compute_loss(model, batch)


def _running_trainer() -> Trainer | None:
    """The Trainer whose method is on the calling stack (it calls its callbacks' events).

    Events receive the model, optimizer and data but not the Trainer; ``Trainer.__init__``
    (for ``on_init_end``) and ``Trainer.train`` (for ``on_train_begin``) are on the stack
    when the callback handler calls them.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None


def _reports_to_wandb(args: TrainingArguments, state: TrainerState) -> bool:
    """Whether this is the main process of a Trainer reporting to a live W&B run."""
    if "wandb" not in args.report_to or not state.is_world_process_zero:
        return False
    import wandb  # only when the Trainer reports to wandb

    return wandb.run is not None


def _log_image(prefix: str, name: str, pixels: np.ndarray, step: int) -> None:
    import wandb

    wandb.log({f"train/{prefix}/{name}": wandb.Image(pixels), "train/global_step": step})


def _log_table(prefix: str, name: str, columns: list[str], rows: list[list], step: int) -> None:
    import wandb

    table = wandb.Table(columns=columns, data=rows)
    wandb.log({f"train/{prefix}/{name}": table, "train/global_step": step})


def _batches_per_step(trainer: Trainer, args: TrainingArguments) -> int:
    """The per-process batches of one optimizer step: accumulation x data-parallel processes.

    As ``Trainer.get_total_train_batch_size`` counts them: tensor-, context- and
    sequence-parallel processes share their batches.
    """
    shared = trainer.get_tp_size() * trainer.get_cp_size() * trainer.get_sp_size()
    return args.gradient_accumulation_steps * (args.world_size // shared)


@contextmanager
def _chains_ready(model: nn.Module) -> Iterator[None]:
    """While chains run, undo accelerate's autocast wrapper of ``model.forward``, if any.

    The chains run their own autocast (``LLCConfig.autocast``, by default the Trainer's on
    CUDA, none on the CPU) around the loss and its gradient.
    """
    original = model.__dict__.get("_original_forward")
    patched = model.__dict__.get("forward")
    if original is None or patched is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = patched


def _own_loader(train_dataloader: DataLoader | None, args: TrainingArguments) -> DataLoader:
    """A DataLoader like the Trainer's, for the callback alone.

    Same dataset (after the Trainer removed unused columns), per-device batch size and
    collator; but its own iterator and sampler, shuffled by the estimate's seed, and not split
    across processes, so that chain ``i`` sees the same batches on any process.
    """
    if train_dataloader is None:
        raise ValueError(
            "LLCTrainerCallback found no training dataloader; pass dataloader=... to it"
        )
    dataset = train_dataloader.dataset
    return DataLoader(
        dataset,
        batch_size=train_dataloader.batch_size or args.per_device_train_batch_size,
        shuffle=not isinstance(dataset, IterableDataset),
        collate_fn=train_dataloader.collate_fn,
        drop_last=args.dataloader_drop_last,
    )


def model_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The loss a transformers model computes from a batch with ``labels``: ``model(**batch).loss``.

    What ``Trainer.compute_loss`` returns for such a model without a ``compute_loss_func``
    or label smoothing; the default loss of ``llc-callbacks replay`` for transformers
    checkpoints.
    """
    return model(**batch).loss


def pretrained_loader(model_class: type[PreTrainedModel] | None = None) -> Loader:
    """A ``load`` for ``llc_callbacks.replay``: ``from_pretrained`` on a checkpoint's folder.

    Only the model's files are read (no optimizer, scheduler or RNG states).

    Args:
        model_class: The model's class; ``None``: the first of ``architectures`` in the
            checkpoint's ``config.json``, from ``transformers``.

    Returns:
        ``load(checkpoint) -> PreTrainedModel``, in eval mode on the CPU.

    Raises:
        ValueError: (from ``load``) If no class is given and ``config.json`` names none that
            transformers has.
    """

    def load(checkpoint: Checkpoint) -> PreTrainedModel:
        where: dict[str, Any] = {}
        source: str | Path = checkpoint.path
        if checkpoint.repo is not None:  # a Hub revision, from the Hub or its cache
            source = checkpoint.repo
            where = {
                "revision": checkpoint.revision,
                "cache_dir": checkpoint.cache_dir,
                "local_files_only": checkpoint.path.is_dir(),  # listed from the cache
            }
        cls = model_class or _architecture(source, where)
        return cls.from_pretrained(source, **where)

    return load


def _architecture(source: str | Path, where: dict[str, Any]) -> type[PreTrainedModel]:
    """The model class a checkpoint's config names (``architectures``)."""
    import transformers

    names = AutoConfig.from_pretrained(source, **where).architectures or []
    found = [getattr(transformers, name) for name in names if hasattr(transformers, name)]
    if not found:
        raise ValueError(
            f"the config of {source} names no transformers model class (architectures:"
            f" {names!r}); pass model_class=..."
        )
    return found[0]
