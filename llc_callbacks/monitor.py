"""``LLCMonitor``: when to estimate during training, the history, and the error policy.

The monitor knows nothing of trainers. An adapter (or a hand-written loop) calls
``maybe_estimate`` after every optimizer step with the step count, the model, a loss function
and data; the monitor decides whether an estimate is due, runs it, keeps the history and
returns flat metrics for the caller to log.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from llc_callbacks.budget import Budget, pace
from llc_callbacks.calibration import Calibration, calibrate
from llc_callbacks.config import LLCConfig
from llc_callbacks.curvature import CURVATURES, estimate_curvature
from llc_callbacks.distributed import rank_and_world
from llc_callbacks.estimator import estimate_llc
from llc_callbacks.forked import LossFn
from llc_callbacks.isolation import warnings_once
from llc_callbacks.keys import CURVATURE, KERNEL, SUSCEPTIBILITY, metric_key, parse_key
from llc_callbacks.observables import Probe, probe_sets, summarize
from llc_callbacks.preflight import preflight
from llc_callbacks.restrictions import Restrictions
from llc_callbacks.result import LLCResult
from llc_callbacks.schedule import Schedule
from llc_callbacks.stages import Boundary, StageTracker
from llc_callbacks.validation import check_choice, check_int

ON_ERROR = ("warn", "raise")
# With observables, how many of the most influential examples each estimate lists per pair.
OBSERVED_TOP = 5
# Modules whose frames a warning skips to reach the caller.
INTERNAL = ("llc_callbacks", "contextlib")
logger = logging.getLogger(__name__)


class LLCMonitor:
    """Runs LLC estimates on a schedule and keeps their history.

    Each estimate's seed is derived from ``config.seed`` and the step, so the same seed, step
    and config give the same numbers, after a resume from a checkpoint too. With
    ``config.step_size="auto"`` the first estimate runs ``calibrate`` (kept in
    ``self.calibration``) at the weights of its step (with ``at_start``, the untrained
    weights), logs the chosen ``{prefix}/step_size`` once, and every later estimate, after a
    resume too, uses that value (``self.config`` holds it).

    Before the first estimate, ``start`` checks the loss, the data and the restrictions once
    (``llc_callbacks.preflight``), so that a mistake surfaces when training starts.

    Example, in a hand-written loop::

        monitor = LLCMonitor(every_n_steps=100)
        for step, batch in enumerate(loader, start=1):
            ...  # forward, backward, optimizer.step()
            if metrics := monitor.maybe_estimate(step, model, loss_fn, loader):
                print(step, metrics["llc/mean"])

    Args:
        config: Sampling hyperparameters, the same for every estimate.
        every_n_steps: Estimate after every ``n``-th optimizer step.
        steps: Estimate after exactly these steps.
        log_spaced: Estimate about this many times at log-spaced steps up to ``total_steps``.
        total_steps: The length of training (needed by ``log_spaced``).
        at_start: Also estimate at step 0, before training.
        at_end: Also estimate when training ends.
        prefix: First part of every metric key.
        on_error: What happens when something the monitor runs fails (the check at the
            start, an estimate, or a side effect an adapter runs through ``reporting``):
            ``"warn"`` reports it with one warning and training goes on (a failed estimate
            logs NaN; a failed check at the start turns the estimates off for the run);
            ``"raise"``: the exception propagates.
        distributed: Split chains over the ranks of the initialized process group (every
            rank must then call the monitor at the same steps); ``None`` does so whenever a
            process group with more than one rank is initialized.
        restrictions: Weight- and data-restricted LLCs to estimate at every estimate too,
            logged as ``{prefix}/<name>/mean`` and so on. Under ``on_error="warn"`` one
            that fails is NaN on its own and the others are still reported.
        curvature: Curvature to measure at every estimate's weights too, any of
            ``"hessian_trace"``, ``"fisher_trace"`` and ``"top_eigenvalue"`` (see
            ``llc_callbacks.curvature``), logged as ``{prefix}/curvature/<name>`` with the
            traces' ``<name>_stderr``.
        dataset_size: The training set's size ``n``: every estimate then also logs the local
            free energy ``{prefix}/free_energy = n L(w*) + LLC log n`` (Watanabe's asymptotic
            expansion, with ``L(w*)`` the mean loss of the estimate's minibatches) and its
            spread over chains, ``{prefix}/free_energy_std = std log n``. The callbacks set it
            from their training set when it has a length.
        max_overhead: Keep the estimates' time within this share of the training time
            (0.1: training takes at most 10% longer), measured as training runs; estimates
            come sooner where the LLC moves and later where it is flat (``Budget``). Alone it
            spaces the estimates; with a schedule it is a ceiling on it (``at_start`` and
            ``at_end`` included). The first estimate runs when due, before its cost is known.
        observables: Named probe sets whose per-example losses the chains record (see
            ``estimate_llc``); every estimate then logs the loss kernel's mean correlation
            between each pair, ``{prefix}/kernel/<a>:<b>``, and keeps in ``influences`` the
            most influential examples of each on each (``llc_callbacks.observables.summarize``).
            Names hold no ``/`` or ``:``.
        susceptibility_base: The observable that samples the training data: every estimate
            then logs the whole model's and each weight restriction's susceptibility to every
            other observable (``susceptibility``), ``{prefix}/susceptibility/<source>`` and
            ``{prefix}/<restriction>/susceptibility/<source>``, and keeps them in
            ``susceptibilities``.

    Attributes:
        history: One row per estimate: ``step`` and the metrics.
        stages: The online stage detection; ``boundaries`` lists what it confirmed.
        budget: The ``max_overhead`` accounts (``Budget``), or ``None``.
        enabled: Whether estimates run (``False`` after a failed check under ``"warn"``).
        influences: The last estimate's rows ``[step, source, target, rank, example,
            influence]`` (with ``observables``).
        susceptibilities: The last estimate's rows ``[step, component, source,
            susceptibility, stderr]`` (with ``susceptibility_base``; component ``"full"`` for
            the whole model).

    Raises:
        ValueError: If an argument is out of range, or ``log_spaced`` is given without
            ``total_steps``; the message names it.
    """

    #: Whether ``total_steps`` may come after construction, through ``set_total_steps``
    #: (the adapters read it from their trainer when training starts).
    total_steps_later: ClassVar[bool] = False

    def __init__(
        self,
        config: LLCConfig | None = None,
        *,
        every_n_steps: int | None = None,
        steps: Sequence[int] | None = None,
        log_spaced: int | None = None,
        total_steps: int | None = None,
        at_start: bool = False,
        at_end: bool = False,
        prefix: str = "llc",
        on_error: Literal["warn", "raise"] = "warn",
        distributed: bool | None = None,
        restrictions: Restrictions | None = None,
        curvature: Sequence[str] = (),
        dataset_size: int | None = None,
        max_overhead: float | None = None,
        observables: Mapping[str, Iterable[Any] | Probe] | None = None,
        susceptibility_base: str | None = None,
    ) -> None:
        if isinstance(curvature, str):
            raise ValueError(f"curvature must be a sequence of names, got {curvature!r}")
        for name in curvature:
            check_choice("curvature", name, CURVATURES)
        check_int("dataset_size", dataset_size, minimum=2, optional=True)
        if config is not None and not isinstance(config, LLCConfig):
            raise ValueError(f"config must be an LLCConfig, got {type(config).__name__}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        check_choice("on_error", on_error, ON_ERROR)
        check_choice("distributed", distributed, (None, True, False))
        if restrictions is not None and not isinstance(restrictions, Restrictions):
            raise ValueError(
                f"restrictions must be Restrictions, got {type(restrictions).__name__}"
            )
        self.observables = probe_sets(observables)
        if susceptibility_base is not None:
            check_choice("susceptibility_base", susceptibility_base, tuple(self.observables))
        self.susceptibility_base = susceptibility_base
        self.influences: list[list[Any]] = []
        self.susceptibilities: list[list[Any]] = []
        self.config = config or LLCConfig()
        self.budget = Budget(max_overhead) if max_overhead is not None else None
        if self.budget is not None and all(k is None for k in (every_n_steps, steps, log_spaced)):
            every_n_steps = 1  # the budget alone spaces the estimates
        self.schedule = Schedule(
            every_n_steps=every_n_steps,
            steps=steps,
            log_spaced=log_spaced,
            total_steps=total_steps,
            at_start=at_start,
            at_end=at_end,
        )
        if log_spaced is not None and total_steps is None and not self.total_steps_later:
            raise ValueError(
                "log_spaced needs total_steps, the number of optimizer steps of the run"
            )
        self.prefix = prefix
        self.on_error = on_error
        self.distributed = distributed
        self.restrictions = restrictions
        self.curvature = tuple(curvature)
        self.dataset_size = dataset_size
        self.history: list[dict[str, float]] = []
        self.last_result: LLCResult | None = None
        self.calibration: Calibration | None = None
        self.stages = StageTracker()
        self.enabled = True
        self._started = False
        self._last_step = -1
        self._warned: set[str] = set()
        self._shown: set[tuple[str, type[Warning]]] = set()

    def set_total_steps(self, total_steps: int) -> None:
        """Tell a ``log_spaced`` schedule how long training is, unless it was given already."""
        if self.schedule.total_steps is None:
            self.schedule = dataclasses.replace(self.schedule, total_steps=total_steps)

    def set_dataset_size(self, dataset_size: int) -> None:
        """Tell the monitor the training set's size for the free energy, unless it was given."""
        if self.dataset_size is None:
            check_int("dataset_size", dataset_size, minimum=2)
            self.dataset_size = dataset_size

    def is_due(self, step: int, *, final: bool = False) -> bool:
        """Whether an estimate is due after ``step`` optimizer steps (never twice for a step).

        Args:
            step: Optimizer steps completed.
            final: Whether training has just ended (for ``at_end``).
        """
        return (
            self.enabled
            and step > self._last_step
            and self.schedule.is_due(step, final=final)
            and (self.budget is None or self.budget.allows(step, distributed=self._distributed()))
        )

    @property
    def boundaries(self) -> list[Boundary]:
        """The stage boundaries confirmed so far (see ``llc_callbacks.stages.StageTracker``)."""
        return self.stages.confirmed

    def start(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        *,
        device: torch.device | str | None = None,
    ) -> dict[str, float]:
        """Check, when training starts, what every estimate will need (see ``preflight``).

        The check forks the weights and runs one forward pass per data source; it leaves
        the model and training as they were. ``maybe_estimate`` runs it on its first call.

        Args:
            model: The model at its current weights.
            loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
            data: Re-iterable of batches.
            device: Where chains will run; defaults to the model's device.

        Returns:
            ``{prefix}/num_sampled`` (the weights each chain samples) and
            ``{prefix}/<name>/num_sampled`` per weight restriction, to log once; empty if the
            check failed under ``on_error="warn"``, which turns the estimates off.

        Raises:
            Exception: What the check raised, with ``on_error="raise"``.
        """
        self._started = True
        with (
            self.reporting("the check before the first LLC estimate", disable=True),
            warnings_once(self._shown),
        ):
            self.schedule.due_steps  # noqa: B018 (log_spaced needs total_steps by now)
            found = preflight(
                model,
                loss_fn,
                data,
                self.config,
                restrictions=self.restrictions,
                device=device,
                distributed=self._distributed(),
            )
            if rank_and_world()[0] == 0:
                logger.info(
                    "llc_callbacks: each estimate samples %d weights%s (checked in %.3f s)",
                    found.num_sampled,
                    "".join(f", {name!r} {n}" for name, n in found.restricted.items()),
                    found.seconds,
                )
            return {
                metric_key(self.prefix, "num_sampled", name): float(count)
                for name, count in [(None, found.num_sampled), *found.restricted.items()]
            }
        return {}

    def maybe_estimate(
        self,
        step: int,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        *,
        final: bool = False,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> dict[str, float] | None:
        """Estimate if one is due after ``step`` optimizer steps.

        The first call runs ``start`` first, unless it ran already.

        Args:
            step: Optimizer steps completed.
            model: The model at its current weights.
            loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
            data: Re-iterable of batches; each estimate iterates it afresh.
            final: Whether training has just ended (for ``at_end``).
            device: Where chains run; defaults to the model's device.
            progress: Show a progress bar while chains run (on a terminal).

        Returns:
            The estimate's metrics, or ``None`` if none was due.
        """
        if not self._started:
            self.start(model, loss_fn, data, device=device)
        if not self.is_due(step, final=final):
            return None
        return self.estimate(step, model, loss_fn, data, device=device, progress=progress)

    def estimate(
        self,
        step: int,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        *,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """Estimate now, record it under ``step`` and return its metrics.

        With ``on_error="warn"`` an exception becomes a warning and NaN ``mean`` and ``std``,
        and a failed restriction is NaN alone; the model and the training process are left
        as they were either way. Each failed health check (``LLCResult.problems``) is warned
        about once per run, on rank zero, and so is each distinct warning raised inside.

        After the estimate, the stages of the full and of every restricted LLC are detected
        anew; a boundary that this confirms (``StageTracker``) is logged as
        ``{prefix}/stage`` (``{prefix}/<name>/stage``) with the boundary's step as its value,
        and told in a log line.

        Raises:
            Exception: Whatever the estimate raised, with ``on_error="raise"``.
        """
        if self.budget is None:
            return self._estimate(step, model, loss_fn, data, device, progress)
        self.budget.begin(step)
        try:
            return self._estimate(step, model, loss_fn, data, device, progress)
        finally:
            self.budget.end(step, pace(self.history, self.prefix))

    def _estimate(
        self,
        step: int,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        device: torch.device | str | None,
        progress: bool,
    ) -> dict[str, float]:
        config = dataclasses.replace(self.config, seed=step_seed(self.config.seed, step))
        calibrated = config.step_size == "auto"
        try:
            with warnings_once(self._shown):
                if calibrated:
                    config = self._calibrate(model, loss_fn, data, config, device, progress)
                self.last_result = estimate_llc(
                    model,
                    loss_fn,
                    data,
                    config,
                    device=device,
                    restrictions=self.restrictions,
                    progress=progress,
                    distributed=self._distributed(),
                    warn=False,
                    strict=self.on_error == "raise",
                    observables=self.observables,
                )
            metrics = self.last_result.to_metrics(self.prefix)
            if self.observables:
                metrics.update(self._observed(step))
            if calibrated:
                metrics[metric_key(self.prefix, "step_size")] = config.step_size
            metrics.update(self._free_energy(self.last_result))
        except Exception as error:
            if self.on_error == "raise":
                raise
            warnings.warn(
                f"llc_callbacks: the LLC estimate at step {step} failed and is reported as NaN;"
                f" training goes on. {type(error).__name__}: {error}",
                stacklevel=_caller_level(),
            )
            self.last_result = None
            metrics = LLCResult.failed(config, str(error)).to_metrics(self.prefix)
        if self.curvature:
            with self.reporting("measuring the curvature"), warnings_once(self._shown):
                found = estimate_curvature(
                    model, loss_fn, data, self.curvature, seed=config.seed, device=device
                )
                metrics.update(
                    {metric_key(self.prefix, f"{CURVATURE}/{k}"): v for k, v in found.items()}
                )
        self._last_step = step
        self.history.append({"step": step, **metrics})
        boundaries: dict[str, float] = {}
        with self.reporting("detecting the LLC's stages"):
            boundaries = self._confirm_boundaries()
        self.history[-1].update(boundaries)
        metrics.update(boundaries)
        if self.last_result is not None:
            for check, message in self.last_result.problems().items():
                self.warn_once(check, f"at step {step}, {message}")
        return metrics

    @contextmanager
    def reporting(self, action: str, *, disable: bool = False) -> Iterator[None]:
        """Run a side effect (a figure, an image, a log call) under the error policy.

        Under ``on_error="warn"`` an exception inside is one warning per ``action`` and run,
        and the block is left; under ``"raise"`` it propagates.

        Args:
            action: What the block does, for the warning ("logging the trace figure").
            disable: Also turn the estimates off for the run when the block fails.
        """
        try:
            yield
        except Exception as error:
            if self.on_error == "raise":
                raise
            if disable:
                self.enabled = False
            consequence = "LLC estimates are off for this run" if disable else "training goes on"
            self.warn_once(
                f"failed: {action}",
                f"{action} failed; {consequence}. {type(error).__name__}: {error}",
                every_rank=True,
            )

    def warn_once(self, key: str, message: str, *, every_rank: bool = False) -> None:
        """Warn ``message`` the first time ``key`` comes up in this run.

        Args:
            key: What the warning is about; remembered in the state, so a resumed run does
                not repeat it.
            message: The warning, after ``"llc_callbacks: "``.
            every_rank: Warn on every rank; otherwise only on rank zero.
        """
        if key in self._warned:
            return
        self._warned.add(key)
        if every_rank or rank_and_world()[0] == 0:
            warnings.warn(
                f"llc_callbacks: {message} (warned once per run)", stacklevel=_caller_level()
            )

    def state_dict(self) -> dict[str, Any]:
        """History, schedule position, warnings, step size, stages and budget, for a checkpoint."""
        return {
            "history": [dict(row) for row in self.history],
            "last_step": self._last_step,
            "total_steps": self.schedule.total_steps,
            "warned": sorted(self._warned),
            "step_size": self.config.step_size,
            "stages": self.stages.state_dict(),
            **({"budget": self.budget.state_dict()} if self.budget is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: no estimate is repeated, none is skipped."""
        self.history = [dict(row) for row in state["history"]]
        self._last_step = int(state["last_step"])
        self._warned = set(state.get("warned", ()))
        saved_step_size = state.get("step_size", "auto")
        if self.config.step_size == "auto" and saved_step_size != "auto":
            self.config = dataclasses.replace(self.config, step_size=saved_step_size)
        if state.get("total_steps") is not None:
            self.schedule = dataclasses.replace(self.schedule, total_steps=state["total_steps"])
        if "stages" in state:
            self.stages.load_state_dict(state["stages"])
        if self.budget is not None and "budget" in state:
            self.budget.load_state_dict(state["budget"])

    def _observed(self, step: int) -> dict[str, float]:
        """The last estimate's observables' metrics; sets ``influences``, ``susceptibilities``."""
        summary = summarize(self.last_result, OBSERVED_TOP, self.susceptibility_base)
        self.influences = [[step, *row] for row in summary.influences]
        self.susceptibilities = [
            [step, component or "full", *row] for component, *row in summary.susceptibilities
        ]
        metrics = {metric_key(self.prefix, f"{KERNEL}/{k}"): v for k, v in summary.kernel.items()}
        for component, source, value, _ in summary.susceptibilities:
            metrics[metric_key(self.prefix, f"{SUSCEPTIBILITY}/{source}", component)] = value
        return metrics

    def _calibrate(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable[Any],
        config: LLCConfig,
        device: torch.device | str | None,
        progress: bool,
    ) -> LLCConfig:
        """Choose the step size for ``step_size="auto"`` and keep it for the rest of the run."""
        self.calibration = calibrate(
            model,
            loss_fn,
            data,
            config,
            device=device,
            progress=progress,
            distributed=self._distributed(),
        )
        step_size = self.calibration.chosen_step_size()
        logger.info("llc_callbacks: step_size='auto' chose %g for this run", step_size)
        self.config = dataclasses.replace(self.config, step_size=step_size)
        return dataclasses.replace(config, step_size=step_size)

    def _free_energy(self, result: LLCResult) -> dict[str, float]:
        """``n L(w*) + LLC log n`` and its spread, when the training set's size is known."""
        if self.dataset_size is None:
            return {}
        n, log_n = self.dataset_size, math.log(self.dataset_size)
        return {
            metric_key(self.prefix, "free_energy"): n * result.init_loss + result.llc_mean * log_n,
            metric_key(self.prefix, "free_energy_std"): result.llc_std * log_n,
        }

    def _confirm_boundaries(self) -> dict[str, float]:
        """Detect the stages after the newest estimate; the metrics of confirmed boundaries."""
        curves = sorted(
            {
                key.restriction
                for key in map(partial(parse_key, prefix=self.prefix), self.history[-1])
                if key is not None and key.field == "mean"
            },
            key=lambda curve: (curve is not None, curve or ""),
        )
        found = {}
        for boundary in self.stages.update(self.history, self.prefix, curves):
            if rank_and_world()[0] == 0:
                logger.info(
                    "llc_callbacks: %s stage boundary at step %d (%s, then %s), confirmed at"
                    " step %d",
                    "LLC" if boundary.curve is None else f"{boundary.curve!r} LLC",
                    boundary.step,
                    boundary.before,
                    boundary.after,
                    boundary.confirmed_at,
                )
            found[metric_key(self.prefix, "stage", boundary.curve)] = float(boundary.step)
        return found

    def _distributed(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        return rank_and_world()[1] > 1


def _caller_level() -> int:
    """The ``stacklevel`` of the first caller outside this package and ``contextlib``.

    A warning then points at the user's training loop or trainer, not at our internals.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def step_seed(seed: int, step: int) -> int:
    """The seed of the estimate after ``step`` optimizer steps of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
