"""transformers adapter: ``LLCTrainerCallback`` logs LLC estimates through the Trainer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llc_callbacks.config import LLCConfig
from llc_callbacks.forked import LossFn
from llc_callbacks.monitor import LLCMonitor
from llc_callbacks.plotting import plot_components, plot_traces, to_pixels
from llc_callbacks.restrictions import Restrictions
from llc_callbacks.validation import check_bool


class LLCTrainerCallback(TrainerCallback):
    """Estimate the LLC of a ``Trainer``'s model on a schedule and log it through the Trainer.

    Usage::

        trainer.add_callback(LLCTrainerCallback(trainer, every_n_steps=500))

    Metrics go through ``trainer.log``, so ``state.log_history`` and every ``report_to``
    integration get them at ``state.global_step`` (W&B shows ``train/llc/mean`` on the
    ``train/global_step`` axis, next to ``train/loss``), and the loss log of the same step is
    kept. Under ``torchrun`` the chains are split over the processes and gathered.

    Args:
        trainer: The Trainer whose loss, data and logging the callback uses.
        config: Sampling hyperparameters, fixed for the run.
        every_n_steps: Estimate after every ``n``-th optimizer step (the default, with 100,
            when no schedule is given).
        steps: Estimate after exactly these optimizer steps.
        log_spaced: Estimate about this many times at log-spaced steps over the run.
        at_start: Also estimate before the first optimizer step.
        at_end: Also estimate when training ends.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; by default
            ``trainer.compute_loss`` (labels, label smoothing, ``compute_loss_func`` and
            subclass overrides included). Either way it gets its own copy of the batch dict.
        dataloader: Where batches come from; by default a loader over the Trainer's training
            set, owned by the callback (same dataset, per-device batch size and collator,
            shuffled, no workers, not split across processes).
        prefix: First part of every metric key.
        on_error: ``"warn"`` reports a failed estimate as a warning and NaN metrics and
            training goes on; ``"raise"`` stops training with the error.
        log_trace_plot: Also log each estimate's chain traces (``plot_traces``) to W&B as an
            image ``train/{prefix}/trace`` when the Trainer reports to wandb (needs
            matplotlib).
        restrictions: Weight- and data-restricted LLCs to estimate too (``{prefix}/<name>/``
            metrics). At the end of training their heatmap (``plot_components``) goes to W&B
            as ``train/{prefix}/components`` when the Trainer reports to wandb.

    Raises:
        ValueError: For a bad argument, naming it.
    """

    def __init__(
        self,
        trainer: Trainer,
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
        log_trace_plot: bool = False,
        restrictions: Restrictions | None = None,
    ) -> None:
        check_bool("log_trace_plot", log_trace_plot)
        if not isinstance(trainer, Trainer):
            raise ValueError(
                f"trainer must be a transformers.Trainer, got {type(trainer).__name__}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise ValueError(f"dataloader must be an iterable of batches, got {dataloader!r}")
        self.monitor = LLCMonitor(
            config,
            every_n_steps=every_n_steps,
            steps=steps,
            log_spaced=log_spaced,
            at_start=at_start,
            at_end=at_end,
            prefix=prefix,
            on_error=on_error,
            restrictions=restrictions,
        )
        self.trainer = trainer
        self.loss_fn = loss_fn
        self.dataloader = dataloader
        self.log_trace_plot = log_trace_plot
        # The monitor's state travels in TrainerState.stateful_callbacks under this key.
        self.state_key = "LLCTrainerCallback" + json.dumps(
            {
                "prefix": prefix,
                "every_n_steps": every_n_steps,
                "steps": self.monitor.schedule.steps,
                "log_spaced": log_spaced,
                "config": repr(self.monitor.config),
            },
            sort_keys=True,
        )
        self._data: Iterable[Any] | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        train_dataloader: DataLoader | None = None,
        **kwargs: Any,
    ) -> None:
        """Restore a resumed run's history, choose the data, and estimate if ``at_start``."""
        saved = (state.stateful_callbacks or {}).get(self.state_key)
        if saved is not None:
            self.monitor.load_state_dict(saved)
        if self.monitor.schedule.log_spaced:
            self.monitor.set_total_steps(state.max_steps)
        self._data = (
            self.dataloader if self.dataloader is not None else _own_loader(train_dataloader, args)
        )
        self._maybe_estimate(args, state, control, model)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Estimate after an optimizer step if one is due."""
        self._maybe_estimate(args, state, control, model)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Estimate at the end of training if ``at_end`` and not already done."""
        self._maybe_estimate(args, state, control, model, final=True)
        if self.monitor.restrictions is not None and self.monitor.history:
            figure = plot_components(self.monitor.history, self.monitor.prefix)
            self._log_image(args, state, "components", figure)

    def _maybe_estimate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module,
        final: bool = False,
    ) -> None:
        step = state.global_step
        if not self.monitor.is_due(step, final=final):
            return
        with _float32_forward(model):
            metrics = self.monitor.estimate(
                step,
                model,
                self.loss_fn or self._trainer_loss,
                self._data,
                device=next(model.parameters()).device,
                progress=state.is_world_process_zero and not args.disable_tqdm,
            )
        # The state is saved with every checkpoint, so a resumed run continues from it.
        state.stateful_callbacks[self.state_key] = self.monitor.state_dict()
        # Trainer.log resets control.should_log: without this, the loss due at this very step
        # would not be logged.
        should_log = control.should_log
        self.trainer.log(dict(metrics))
        control.should_log = should_log
        if self.log_trace_plot and self.monitor.last_result is not None:
            self._log_image(args, state, "trace", plot_traces(self.monitor.last_result))

    def _log_image(
        self, args: TrainingArguments, state: TrainerState, name: str, figure: Any
    ) -> None:
        """Log a figure to W&B next to the Trainer's own logs, if the Trainer reports there."""
        if "wandb" not in args.report_to or not state.is_world_process_zero:
            return
        import wandb  # only when the Trainer reports to wandb

        if wandb.run is not None:
            image = wandb.Image(to_pixels(figure))
            key = f"train/{self.monitor.prefix}/{name}"
            wandb.log({key: image, "train/global_step": state.global_step})

    def _trainer_loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return self.trainer.compute_loss(model, batch)


@contextmanager
def _float32_forward(model: nn.Module) -> Iterator[None]:
    """While chains run, undo accelerate's autocast wrapper of ``model.forward``, if any."""
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
