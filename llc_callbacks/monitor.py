"""``LLCMonitor``: when to estimate during training, the history, and the error policy.

The monitor knows nothing of trainers. An adapter (or a hand-written loop) calls
``maybe_estimate`` after every optimizer step with the step count, the model, a loss function
and data; the monitor decides whether an estimate is due, runs it, keeps the history and
returns flat metrics for the caller to log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from llc_callbacks.attribution import construction_site, warn
from llc_callbacks.budget import Budget, pace
from llc_callbacks.chains import ChainStart
from llc_callbacks.config import LLCConfig
from llc_callbacks.curvature import CURVATURES, mala_step_size
from llc_callbacks.distributed import rank_and_world
from llc_callbacks.estimator import estimate_llc, model_device
from llc_callbacks.forked import LossFn
from llc_callbacks.isolation import warnings_once
from llc_callbacks.keys import (
    EXTRA_METRICS,
    KERNEL,
    SUSCEPTIBILITY,
    check_prefix,
    extra_group,
    metric_key,
    parse_key,
)
from llc_callbacks.measures import Curvature, Figure, FreeEnergy, Measure, Reading, Run, Table
from llc_callbacks.observables import Probe, probe_sets, summarize
from llc_callbacks.preflight import preflight
from llc_callbacks.restrictions import Restrictions
from llc_callbacks.result import LLCResult
from llc_callbacks.schedule import Schedule
from llc_callbacks.sharded import is_sharded
from llc_callbacks.stages import Boundary, StageTracker
from llc_callbacks.streaming import STREAM_SHARE, Stream
from llc_callbacks.validation import check_bool, check_choice, check_int

ON_ERROR = ("warn", "raise")
# A chain step under CPU autocast against a float32 one, measured on CPU with
# benchmarks/step_cost.py (4 chains of its MLP, one thread, 2026-12-07, AMD EPYC): float16
# 3.0x; bfloat16 0.9x with the CPU's AVX-512 BF16 instructions and 4.6x without them (oneDNN
# and ATen held to AVX2). A 2-layer GPT-2 (n_embd 128) measured 8.6x, 1.1x and 6.0x.
CPU_AUTOCAST = {
    "bfloat16": "4.6x as long as one in float32 (0.9x on CPUs with AVX-512 BF16 instructions)",
    "float16": "3.0x as long as one in float32",
}
# With observables, how many of the most influential examples each estimate lists per pair.
OBSERVED_TOP = 5
logger = logging.getLogger(__name__)


class LLCMonitor:
    """Runs LLC estimates on a schedule and keeps their history.

    Each estimate's seed is derived from ``config.seed`` and the step. With
    ``config.warm_start`` (the default) every estimate after the first starts its chains
    where the previous estimate's ended: each chain's offset from the previous ``w*`` is added
    to the new one, with its step size (``estimate_llc(start=...)``); a restriction that is
    new starts cold. The same seed, steps and config give the same numbers in an
    uninterrupted run. The offsets (as large as the sampled weights, once per chain) are kept
    on the CPU between estimates but not in ``state_dict``, which keeps only the step sizes:
    after a resume the first estimate starts its chains at ``w*`` with the saved step sizes,
    so from then on the numbers differ from an uninterrupted run's by sampling noise.

    Before the first estimate, ``start`` checks the loss, the data and the restrictions once
    (``llc_callbacks.preflight``), so that a mistake surfaces when training starts: by
    default it raises there (``strict``). What fails later, during training, follows
    ``on_error``.

    Each estimate returns (for the caller to log) ``{prefix}/mean``, ``{prefix}/std`` and
    ``{prefix}/healthy`` (1 when every health check passed; a failed check is also one
    warning per run saying what to change), and ``{prefix}/<name>/mean`` and ``std`` per
    restriction; ``extra_metrics`` adds groups of keys; ``{prefix}/restart`` marks the first
    estimate of a history that a stale checkpoint started anew (``load_state_dict``).
    ``history`` keeps every metric of every estimate, logged or not.

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
        prefix: First part of every metric key: parts of letters, digits, ``_``, ``-`` and
            ``.`` joined by single ``/`` (``"llc"``, ``"probe/llc"``).
        on_error: What a failure during training does (an estimate, or a side effect an
            adapter runs through ``reporting``): ``"warn"`` reports it with one warning and
            training goes on (a failed estimate logs NaN, a failed restriction is NaN alone);
            ``"raise"``: the exception propagates.
        strict: Whether a mistake found before training raises (the check at the start, and
            what an adapter checks then through ``checking``), naming the argument and the
            fix. ``False`` (with ``on_error="warn"``) warns instead: a restriction that fails
            the check is left out for the run while the full LLC and the other restrictions
            go on, and any other failed check turns the estimates off for the run.
        extra_metrics: Groups of keys to return next to the default ones, any of
            ``"chains"`` (``{prefix}/chain_<i>``, each chain's estimate), ``"diagnostics"``
            (``{prefix}/init_loss``, ``{prefix}/diag/<name>`` and the restrictions'
            ``healthy``); for restrictions too. ``"free_energy"`` is deprecated (a
            ``FutureWarning``): ``measures=[FreeEnergy()]``.
        distributed: Split chains over the ranks of the initialized process group (every
            rank must then call the monitor at the same steps); ``None`` does so whenever a
            process group with more than one rank is initialized.
        restrictions: Weight- and data-restricted LLCs to estimate at every estimate too,
            logged as ``{prefix}/<name>/mean`` and so on. Under ``on_error="warn"`` one
            that fails is NaN on its own and the others are still reported.
        curvature: Deprecated (a ``FutureWarning``): ``measures=[Curvature(*curvature)]``.
        dataset_size: The training set's size ``n``, which the measures are told
            (``Run.dataset_size``; ``FreeEnergy``'s ``n``). The callbacks take it from their
            training set when it has a length.
        max_overhead: The share of the training time the LLC may take (0.35: training takes
            about 1.35 times as long), measured as training runs. With ``stream`` it sets
            the readings' length (see there); ``"auto"``, the default: ``STREAM_SHARE``
            (0.35). Without, it spaces the snapshot estimates: they come sooner where the LLC
            moves and later where it is flat (``Budget``); alone it spaces them, with a
            schedule it is a ceiling on it (``at_start`` and ``at_end`` included), and the
            first runs when due, before its cost is known; ``"auto"``: no limit. ``None``:
            no limit (with ``stream``, every reading draws ``config.num_draws`` steps).
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
        stream: Read the LLC from chains that persist through training
            (``llc_callbacks.streaming``): the first reading tunes the chains (a step size measured
            from the curvature, ``curvature.mala_step_size``, and a short burn-in); every later one
            continues the same chains around the current weights (their offsets carried over, as
            ``warm_start`` does), without adaptation, at the tuned step sizes, for as many steps as
            keep all readings, the tuning ones included, within ``max_overhead`` of the training
            time so far, the first of them burning in for one relaxation time ``1 / (eps gamma)``
            where all chains hold one step size. Each reading logs ``{prefix}/step_size`` and
            ``{prefix}/tuned`` (1 where it tuned the chains: the first, after a resume, and when
            chains became unstable). The default. ``False``: a snapshot estimate at every
            scheduled step, each tuning its own chains (warm-started from the last one's with
            ``config.warm_start``), as ``replay`` makes.
        measures: What to compute next to the LLC at every reading (``llc_callbacks.measures``:
            ``Curvature``, or a ``Measure`` of your own), under ``on_error``; their metrics
            are logged as ``{prefix}/<name>`` and kept in ``history``, their state in
            ``state_dict``.

    Attributes:
        history: One row per estimate: ``step`` and the metrics.
        produced: The ``Table``s and ``Figure``s the measures produced at the last reading,
            by name, for the caller to log (the callbacks send them to W&B).
        stages: The online stage detection; ``boundaries`` lists what it confirmed.
        budget: The ``max_overhead`` accounts (``Budget``), or ``None``.
        enabled: Whether estimates run (``False`` after a failed check with ``strict=False``).
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
        strict: bool = True,
        extra_metrics: Sequence[str] = (),
        distributed: bool | None = None,
        restrictions: Restrictions | None = None,
        curvature: Sequence[str] = (),
        dataset_size: int | None = None,
        max_overhead: float | Literal["auto"] | None = "auto",
        observables: Mapping[str, Iterable[Any] | Probe] | None = None,
        susceptibility_base: str | None = None,
        stream: bool = True,
        measures: Sequence[Measure] = (),
    ) -> None:
        if isinstance(curvature, str):
            raise ValueError(f"curvature must be a sequence of names, got {curvature!r}")
        for name in curvature:
            check_choice("curvature", name, CURVATURES)
        if isinstance(measures, Measure) or not all(isinstance(m, Measure) for m in measures):
            raise ValueError(
                "measures must be a sequence of Measure objects (llc_callbacks.measures),"
                f" got {measures!r}"
            )
        check_int("dataset_size", dataset_size, minimum=2, optional=True)
        if config is not None and not isinstance(config, LLCConfig):
            raise ValueError(f"config must be an LLCConfig, got {type(config).__name__}")
        check_prefix(prefix)
        check_choice("on_error", on_error, ON_ERROR)
        check_bool("strict", strict)
        if isinstance(extra_metrics, str):
            raise ValueError(f"extra_metrics must be a sequence of names, got {extra_metrics!r}")
        for name in extra_metrics:
            check_choice("extra_metrics", name, EXTRA_METRICS)
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
        check_bool("stream", stream)
        if stream and not self.config.warm_start:
            raise ValueError(
                "stream=True continues each reading's chains from the last one's: it needs"
                " LLCConfig(warm_start=True), got warm_start=False; or pass stream=False"
            )
        if max_overhead == "auto":
            max_overhead = STREAM_SHARE if stream else None
        elif isinstance(max_overhead, str):
            raise ValueError(
                f"max_overhead must be a finite number > 0, 'auto' or None, got {max_overhead!r}"
            )
        self.stream = Stream(max_overhead) if stream else None
        self.budget = Budget(max_overhead) if max_overhead is not None and not stream else None
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
        self.strict = strict
        self.extra_metrics = tuple(name for name in extra_metrics if name != "free_energy")
        self.distributed = distributed
        self.restrictions = restrictions
        self.measures = tuple(measures)
        self.produced: dict[str, Table | Figure] = {}
        if curvature:
            self.measures += (Curvature(*curvature),)
            names = ", ".join(map(repr, curvature))
            _deprecated("curvature=...", f"Curvature({names})")
        if "free_energy" in extra_metrics:
            self.measures += (FreeEnergy(),)
            _deprecated("extra_metrics=('free_energy',)", "FreeEnergy()")
        self.dataset_size = dataset_size
        self.history: list[dict[str, float]] = []
        self.last_result: LLCResult | None = None
        # Where the next estimate's chains start, by restriction (None: the full LLC).
        self._starts: dict[str | None, list[ChainStart | None]] = {}
        self.stages = StageTracker()
        self.enabled = True
        self._started = False
        self._last_step = -1
        self._warned: set[str] = set()
        # Whether the next estimate begins a history that a stale checkpoint started anew.
        self._restarted = False
        self._shown: set[tuple[str, type[Warning]]] = set()
        # Where warnings point from inside a trainer's hooks: the line that built this.
        self.origin = construction_site()
        # What makes estimates comparable along a run, kept with the state: a resume
        # under other settings starts a new history (``load_state_dict``).
        self.settings = _settings(self.schedule, self.config) | ({"stream": True} if stream else {})

    def set_total_steps(self, total_steps: int) -> None:
        """Tell the monitor how long training is, for a ``log_spaced`` schedule (unless given).

        Warns, once, when no estimate would run (``every_n_steps=1000`` in a run of 150
        steps, without ``at_start`` or ``at_end``), or when some of ``steps`` come after the
        run's last step.
        """
        if self.schedule.total_steps is None:
            self.schedule = dataclasses.replace(self.schedule, total_steps=total_steps)
        missed = self.schedule.beyond(total_steps)
        if missed is not None:
            self.warn_once("schedule", f"{missed}. Schedule them within the run.")

    def set_dataset_size(self, dataset_size: int) -> None:
        """Tell the monitor the training set's size for the free energy, unless it was given."""
        if self.dataset_size is None:
            check_int("dataset_size", dataset_size, minimum=2)
            self.dataset_size = dataset_size

    def follow_precision(self, autocast: str | None, device_type: str) -> None:
        """Run CUDA chains under training's mixed precision, unless the config names its own.

        Chains on another device run in float32: CPU autocast is slower than float32
        (``CPU_AUTOCAST``); one log line says so.

        Args:
            autocast: ``"bfloat16"`` or ``"float16"`` when training runs under
                ``torch.autocast`` in that dtype, else ``None`` (see ``LLCConfig.autocast``).
            device_type: Where the chains run, as ``torch.device.type`` (``"cuda"``).
        """
        if self.config.autocast is not None or autocast is None:
            return
        if device_type == "cuda":
            self.config = dataclasses.replace(self.config, autocast=autocast)
        elif rank_and_world()[0] == 0:
            logger.info(
                "llc_callbacks: training runs under %s autocast; the chains run in float32 on"
                " %s, where autocast is slower (LLCConfig(autocast=...) to follow it anyway)",
                autocast,
                device_type,
            )

    def follow_batches_per_step(self, batches_per_step: int) -> None:
        """Count an optimizer step's examples in ``nbeta="batch"``, unless the config sets it.

        Args:
            batches_per_step: The training batches of one optimizer step: gradient
                accumulation steps x data-parallel ranks (see ``LLCConfig.batches_per_step``).

        Raises:
            ValueError: If ``batches_per_step`` is not an integer >= 1.
        """
        check_int("batches_per_step", batches_per_step, minimum=1)
        if self.config.batches_per_step is None:
            self.config = dataclasses.replace(self.config, batches_per_step=batches_per_step)

    def is_due(self, step: int, *, final: bool = False) -> bool:
        """Whether an estimate is due after ``step`` optimizer steps (never twice for a step).

        Args:
            step: Optimizer steps completed.
            final: Whether training has just ended (for ``at_end``).

        Raises:
            ValueError: If ``step`` comes before the last estimate's: the monitor followed
                another run, whose history it holds.
        """
        if step < self._last_step:
            raise ValueError(
                f"step {step} comes before this LLCMonitor's last estimate, at step"
                f" {self._last_step}: it followed another run and holds that run's history."
                " Build one LLCMonitor per run (or load_state_dict a checkpoint's state to"
                " resume one)."
            )
        if self.stream is not None:
            self.stream.start()
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
        the model and training as they were. Each measure is then told about the run
        (``Measure.start``). ``maybe_estimate`` runs it on its first call.

        Args:
            model: The model at its current weights.
            loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
            data: Re-iterable of batches.
            device: Where chains will run; defaults to the model's device.

        Returns:
            ``{prefix}/num_sampled`` (the weights each chain samples),
            ``{prefix}/num_chains`` and ``{prefix}/<name>/num_sampled`` per weight
            restriction, to log once; empty if the check failed with ``strict=False``, which
            turns the estimates off.

        Raises:
            Exception: What the check raised, unless ``strict=False`` and
                ``on_error="warn"``; the message names the argument and the fix.
        """
        self._started = True
        failures: dict[str, str] | None = None if self._raises_at_start() else {}
        with (
            self.checking("the check before the first LLC estimate"),
            warnings_once(self._shown, self.origin),
        ):
            self.schedule.due_steps  # noqa: B018 (log_spaced needs total_steps by now)
            self._warn_if_cpu_autocast(model, device)
            found = preflight(
                model,
                loss_fn,
                data,
                self.config,
                restrictions=self.restrictions,
                device=device,
                distributed=self._distributed(),
                failures=failures,
            )
            run = Run(self.schedule.total_steps, self.dataset_size, self.prefix)
            for measure in self.measures:
                measure.start(run)
            for name, message in (failures or {}).items():
                self.warn_once(
                    f"failed: restriction {name}",
                    f"restriction {name!r} failed the check before training and is left out"
                    f" for the run; the full LLC and the other restrictions go on. {message}",
                )
            if failures and self.restrictions is not None:
                self.restrictions = self.restrictions.without(failures)
            if rank_and_world()[0] == 0:
                logger.info(
                    "llc_callbacks: each estimate samples %d weights%s (checked in %.3f s)",
                    found.num_sampled,
                    "".join(f", {name!r} {n}" for name, n in found.restricted.items()),
                    found.seconds,
                )
            counts = [(None, found.num_sampled), *found.restricted.items()]
            return {
                metric_key(self.prefix, "num_sampled", name): float(n) for name, n in counts
            } | {metric_key(self.prefix, "num_chains"): float(self.config.num_chains)}
        return {}

    def _warn_if_cpu_autocast(self, model: nn.Module, device: torch.device | str | None) -> None:
        """Warn, once, when the config asks for autocast and the chains run on the CPU."""
        autocast = self.config.autocast
        device = torch.device(device) if device is not None else model_device(model)
        if autocast is not None and device.type == "cpu":
            self.warn_once(
                "cpu_autocast",
                f"LLCConfig(autocast={autocast!r}) with the chains on the CPU, where a chain"
                f" step under autocast took {CPU_AUTOCAST[autocast]} (benchmarks/step_cost.py)."
                " Leave autocast unset to run the chains in float32.",
            )

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

        Returns:
            The metrics to log: the default keys and the ``extra_metrics`` groups asked for
            (``history`` keeps them all).

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
        tuning = self.stream is not None and self.stream.tune
        distributed = self._distributed()
        try:
            with warnings_once(self._shown, self.origin):
                if self.stream is not None:
                    # A run's first reading may measure its step size; not one that continues a
                    # checkpoint's step sizes, nor a sharded model's (no fork to take it on).
                    measure = None
                    if not self._starts and not is_sharded(model):
                        measure = partial(
                            mala_step_size,
                            model,
                            loss_fn,
                            data,
                            device=device,
                            distributed=distributed,
                        )
                    config = self.stream.plan(config, distributed=distributed, measure=measure)
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
                    start=self._starts if config.warm_start else None,
                    keep_ends=config.warm_start,
                )
            if config.warm_start:
                self._starts = self.last_result.starts
            if self.stream is not None:
                self.last_result = self.stream.read(self.last_result, tuning=tuning)
            metrics = self.last_result.to_metrics(self.prefix)
            if self.observables:
                metrics.update(self._observed(step))
        except Exception as error:
            if self.on_error == "raise":
                raise
            warn(
                f"llc_callbacks: the LLC estimate at step {step} failed and is reported as NaN;"
                f" training goes on. {type(error).__name__}: {error}",
                self.origin,
            )
            self.last_result = None
            metrics = LLCResult.failed(config, str(error)).to_metrics(self.prefix)
            if self.stream is not None:
                self.stream.read(None, tuning=tuning)
        if self.stream is not None:
            if self.stream.cold:  # chains diverged, or the reading failed: tune anew
                self._starts = {}
            metrics.update(self._streamed(tuning))
        reading = Reading(
            step, model, loss_fn, data, device, config.seed, self.last_result, self.history
        )
        self.produced = {}
        for measure in self.measures:
            with (
                self.reporting(f"measuring {measure.name}"),
                warnings_once(self._shown, self.origin),
            ):
                for name, found in measure.measure(reading).items():
                    if isinstance(found, Table | Figure):
                        self.produced[name] = found
                    else:
                        metrics[metric_key(self.prefix, name)] = float(found)
        if self._restarted:
            metrics[metric_key(self.prefix, "restart")] = 1.0
            self._restarted = False
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
        return self.logged(metrics)

    @contextmanager
    def reporting(self, action: str) -> Iterator[None]:
        """Run a side effect during training (a figure, a log call) under ``on_error``.

        Under ``on_error="warn"`` an exception inside is one warning per ``action`` and run,
        and the block is left; under ``"raise"`` it propagates.

        Args:
            action: What the block does, for the warning ("logging the trace figure").
        """
        try:
            yield
        except Exception as error:
            if self.on_error == "raise":
                raise
            self.warn_once(
                f"failed: {action}",
                f"{action} failed; training goes on. {type(error).__name__}: {error}",
                every_rank=True,
            )

    @contextmanager
    def checking(self, action: str) -> Iterator[None]:
        """Run a check before training under ``strict``.

        By default an exception inside propagates, with a note that ``strict=False`` warns
        instead; with ``strict=False`` and ``on_error="warn"`` it is one warning, the block
        is left and the estimates are off for the run.

        Args:
            action: What the block checks, for the warning ("choosing the estimates' data").
        """
        try:
            yield
        except Exception as error:
            if self._raises_at_start():
                error.add_note(
                    f"llc_callbacks: found before training, by {action}; pass strict=False"
                    " to warn instead and train without the LLC"
                )
                raise
            self.enabled = False
            self.warn_once(
                f"failed: {action}",
                f"{action} failed; LLC estimates are off for this run."
                f" {type(error).__name__}: {error}",
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
            warn(f"llc_callbacks: {message} (warned once per run)", self.origin)

    def state_dict(self) -> dict[str, Any]:
        """History, schedule position, warnings, step sizes, stages, budget and measures' states.

        It also holds ``settings`` (the schedule and the config), which ``load_state_dict``
        compares with its own.
        """
        return {
            "settings": self.settings,
            "history": [dict(row) for row in self.history],
            "last_step": self._last_step,
            "total_steps": self.schedule.total_steps,
            "warned": sorted(self._warned),
            "restarted": self._restarted,
            "step_sizes": {
                name or "": [None if s is None else s.step_size for s in starts]
                for name, starts in self._starts.items()
            },
            "stages": self.stages.state_dict(),
            **({"budget": self.budget.state_dict()} if self.budget is not None else {}),
            **({"stream": self.stream.state_dict()} if self.stream is not None else {}),
            "measures": [measure.state_dict() for measure in self.measures],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: no estimate is repeated, none is skipped.

        A state saved under other settings (another schedule or config: estimates that do
        not compare) is not loaded: one warning names each field that differs, and the run
        starts a new history, whose first estimate also returns ``{prefix}/restart`` (1) so
        that plots of the logged rows draw it apart (``llc_callbacks.history.histories``).
        """
        changed = changed_settings(state.get("settings", {}), self.settings)
        if changed:
            self.warn_once(
                "stale_state",
                f"the checkpoint's LLC state was saved with other settings ({changed}): this"
                " run starts a new LLC history. Pass the saved values to continue it.",
            )
            self._restarted = True
            return
        self.history = [dict(row) for row in state["history"]]
        self._last_step = int(state["last_step"])
        self._warned = set(state.get("warned", ()))
        self._restarted = bool(state.get("restarted", False))
        self._starts = {
            name or None: [None if s is None else ChainStart(None, s) for s in sizes]
            for name, sizes in state.get("step_sizes", {}).items()
        }
        if state.get("total_steps") is not None:
            self.schedule = dataclasses.replace(self.schedule, total_steps=state["total_steps"])
        if "stages" in state:
            self.stages.load_state_dict(state["stages"])
        # By position: a measure added since the checkpoint starts afresh.
        for measure, saved in zip(self.measures, state.get("measures", ()), strict=False):
            measure.load_state_dict(saved)
        if self.budget is not None and "budget" in state:
            self.budget.load_state_dict(state["budget"])
        if self.stream is not None and "stream" in state:
            self.stream.load_state_dict(state["stream"])
            if rank_and_world()[0] == 0:
                logger.info(
                    "llc_callbacks: resumed at step %d; the chains' places are not in the"
                    " checkpoint, so the next reading tunes them again from the weights"
                    " (%s)",
                    self._last_step,
                    metric_key(self.prefix, "tuned"),
                )

    def _streamed(self, tuning: bool) -> dict[str, float]:
        """A streaming reading's ``{prefix}/tuned`` and the ``{prefix}/step_size`` it drew at."""
        result = self.last_result
        step_size = math.nan if result is None else result.diagnostics.get("step_size", math.nan)
        return {
            metric_key(self.prefix, "tuned"): float(tuning),
            metric_key(self.prefix, "step_size"): step_size,
        }

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

    def logged(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics to log: the default ones and the ``extra_metrics`` groups asked for."""
        return {
            key: value
            for key, value in metrics.items()
            if (group := extra_group(parse_key(key, self.prefix))) is None
            or group in self.extra_metrics
        }

    def _distributed(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        return rank_and_world()[1] > 1

    def _raises_at_start(self) -> bool:
        return self.strict or self.on_error == "raise"


def _deprecated(argument: str, measure: str) -> None:
    """Warn that ``argument`` goes in the next release, for ``measures=[measure]``."""
    warn(
        f"llc_callbacks: {argument} is deprecated and goes in the next release: pass"
        f" measures=[{measure}] (from llc_callbacks.measures)",
        construction_site(),
        FutureWarning,
    )


def _settings(schedule: Schedule, config: LLCConfig) -> dict[str, Any]:
    """The schedule and config as plain values (JSON, as transformers saves states)."""
    fields = {
        "every_n_steps": schedule.every_n_steps,
        "steps": schedule.steps,
        "log_spaced": schedule.log_spaced,
        **{f"config.{name}": value for name, value in dataclasses.asdict(config).items()},
    }
    return json.loads(json.dumps(fields))


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Each field that differs, ``"name: saved -> current"``; empty if none (or none saved)."""
    if not saved:
        return ""
    return "; ".join(
        f"{name}: {saved.get(name)!r} in the checkpoint, {current.get(name)!r} now"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    )


def step_seed(seed: int, step: int) -> int:
    """The seed of the estimate after ``step`` optimizer steps of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
