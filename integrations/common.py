"""What the Lightning and transformers callbacks share: arguments, state key, figures.

Each callback keeps its explicit, typed signature (for LightningCLI and IDEs) and passes it
here; the trainer-specific parts (hooks, loss, data, logging calls) stay in its module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from llc_callbacks.attribution import warn
from llc_callbacks.dynamics import EssentialDynamics
from llc_callbacks.measures import Figure, Traces
from llc_callbacks.measures.routing import Sink, TableSink, route
from llc_callbacks.monitor import LLCMonitor
from llc_callbacks.plotting import (
    component_names,
    plot_components,
    plot_essential_dynamics,
    plot_loss_kernel,
    plot_susceptibilities,
)
from llc_callbacks.validation import check_bool

# The columns of the confirmed stage boundaries' table, ``{prefix}/stages``.
STAGE_COLUMNS = ["curve", "step", "before", "after", "confirmed_at"]
# The columns of the most influential examples' table, ``{prefix}/influence``.
INFLUENCE_COLUMNS = ["step", "source", "target", "rank", "example", "influence"]
# The columns of the susceptibilities' table, ``{prefix}/susceptibility``.
SUSCEPTIBILITY_COLUMNS = ["step", "component", "source", "susceptibility", "stderr"]
# The folder, in the run's folder, that holds each estimate's recorded observables.
OBSERVABLES_FOLDER = "observables"
# The file, in the run's folder, that holds the essential dynamics.
DYNAMICS_FILE = "essential_dynamics.npz"
logger = logging.getLogger(__name__)


class TrainerMonitor(LLCMonitor):
    """The callbacks' monitor: ``total_steps`` comes from the trainer when training starts."""

    total_steps_later = True


# The callbacks' own arguments, beside those they pass on to their monitor.
ADAPTER_ARGUMENTS = ("loss_fn", "dataloader", "log_trace_plot", "dynamics")


def build_monitor(arguments: Mapping[str, Any]) -> TrainerMonitor:
    """Validate a callback's arguments and build its monitor from the rest.

    Args:
        arguments: The callback's keyword arguments by name (``config``, the schedule,
            ``prefix``, ``on_error``, ``restrictions`` and ``ADAPTER_ARGUMENTS``).

    Raises:
        ValueError: For a bad argument, naming it.
    """
    loss_fn, dataloader, log_trace_plot, dynamics = (arguments[n] for n in ADAPTER_ARGUMENTS)
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    if dataloader is not None and not isinstance(dataloader, Iterable):
        raise ValueError(f"dataloader must be an iterable of batches, got {dataloader!r}")
    check_bool("log_trace_plot", log_trace_plot)
    if dynamics is not None and not isinstance(dynamics, EssentialDynamics):
        raise ValueError(f"dynamics must be EssentialDynamics, got {type(dynamics).__name__}")
    monitor_arguments = {k: v for k, v in arguments.items() if k not in ADAPTER_ARGUMENTS}
    if log_trace_plot:
        warn(
            "llc_callbacks: log_trace_plot=True is deprecated and goes in the next release:"
            " pass measures=[Traces()] (from llc_callbacks.measures)",
            None,
            FutureWarning,
        )
        monitor_arguments["measures"] = (*monitor_arguments["measures"], Traces())
    return TrainerMonitor(**monitor_arguments)


def next_run(
    owner: str,
    arguments: Mapping[str, Any],
    monitor: TrainerMonitor,
    dynamics: EssentialDynamics | None,
) -> TrainerMonitor:
    """A fresh monitor for a callback that runs again, its essential dynamics emptied.

    A callback reused in another trainer, ``fit`` or ``train()`` starts that run afresh, so
    that nothing of the run before (history, schedule position, chains, budget, warnings)
    is written into it; a resume then loads its checkpoint's state into the fresh monitor.
    The run before keeps its history on the monitor it had. One warning says so.

    Args:
        owner: The callback's class name, for the warning.
        arguments: The callback's arguments, as given to ``build_monitor``.
        monitor: The monitor of the run before.
        dynamics: The callback's essential dynamics, if any.
    """
    warn(
        f"llc_callbacks: this {owner} ran before, so its LLC history, schedule and chains"
        " start over for this run (the run before keeps its history in its monitor). Build"
        " one callback per run to keep each run's monitor at hand.",
        monitor.origin,
    )
    if dynamics is not None:
        dynamics.restart()
    fresh = build_monitor(arguments)
    fresh.origin = monitor.origin
    return fresh


class HeldError:
    """An exception from a step's estimate, held until the trainer has saved that step.

    Trainers save a step's checkpoint after their callbacks' step hooks, so an interrupt
    (Ctrl-C) or a failure under ``on_error="raise"`` inside an estimate would lose it. The
    adapters hold it instead and raise it at the next hook that comes after the save (the
    next step's start, the end of training, transformers' ``on_save``), before another
    optimizer step. The monitor's state leaves the interrupted estimate out, so a resume
    from that checkpoint runs it.
    """

    def __init__(self) -> None:
        self._error: BaseException | None = None

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Hold what the block raises (``KeyboardInterrupt`` and any ``Exception``)."""
        try:
            yield
        except (KeyboardInterrupt, Exception) as error:
            self._error = error

    def release(self) -> None:
        """Raise the held exception, if there is one."""
        error, self._error = self._error, None
        if error is not None:
            raise error


def dataset_size(dataset: object) -> int | None:
    """The length of a training set, or ``None`` when it has none (an iterable dataset)."""
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    return size if size >= 2 else None


def state_key(owner: str, prefix: str) -> str:
    """The key a callback's state is saved under: its class and prefix, as Lightning writes one.

    Two callbacks in one run have different prefixes (``refuse_same_prefix``), so they keep
    separate states.
    """
    return f"{owner}{ {'prefix': prefix}!r}"


def refuse_same_prefix(callback: object, callbacks: Iterable[object]) -> None:
    """Refuse a second LLC callback of the trainer with the same prefix.

    Raises:
        ValueError: If another of ``callbacks`` has a monitor with ``callback``'s prefix.
    """
    prefix = callback.monitor.prefix  # type: ignore[attr-defined]
    for other in callbacks:
        monitor = getattr(other, "monitor", None)
        if other is not callback and isinstance(monitor, LLCMonitor) and monitor.prefix == prefix:
            raise ValueError(
                f"two LLC callbacks log under prefix={prefix!r} ({type(callback).__name__} and"
                f" {type(other).__name__}): their metrics would share one column. Give each its"
                " own prefix=..."
            )


def warn_if_state_is_stale(
    monitor: LLCMonitor, owner: str, key: str, saved_keys: Collection[str]
) -> None:
    """Warn when a checkpoint holds this kind of callback's state, but not under ``key``.

    A resumed run whose prefix changed would otherwise start a new LLC history without a
    word (a changed schedule or config is ``LLCMonitor.load_state_dict``'s to tell).
    """
    others = sorted(k for k in saved_keys if k.startswith(owner + "{") and k != key)
    if others and key not in saved_keys:
        monitor.warn_once(
            "stale_state",
            f"the checkpoint holds the LLC state of a {owner} saved as {others[0]!r}, not of"
            f" this one, {key!r}: this run starts a new LLC history. Pass the saved prefix to"
            " continue it.",
        )


def callback_state(monitor: LLCMonitor, dynamics: EssentialDynamics | None) -> dict[str, Any]:
    """What a callback checkpoints: its monitor's state, and its essential dynamics' if any."""
    state = monitor.state_dict()
    if dynamics is not None:
        state["dynamics"] = dynamics.state_dict()
    return state


def load_callback_state(
    monitor: LLCMonitor, dynamics: EssentialDynamics | None, state: dict[str, Any]
) -> None:
    """Continue from ``callback_state``."""
    monitor.load_state_dict(state)
    if dynamics is not None and "dynamics" in state:
        dynamics.load_state_dict(state["dynamics"])


def log_stage_table(monitor: LLCMonitor, sinks: list[TableSink], step: int) -> None:
    """Send every confirmed stage boundary as a table, when the estimate at ``step`` added one."""
    boundaries = monitor.boundaries
    if not sinks or not boundaries or boundaries[-1].confirmed_at != step:
        return
    rows = [[b.curve or "full", b.step, b.before, b.after, b.confirmed_at] for b in boundaries]
    with monitor.reporting("logging the stage table"):
        for sink in sinks:
            sink("stages", STAGE_COLUMNS, rows, step)


def log_observables(
    monitor: LLCMonitor,
    sinks: list[TableSink],
    image_sinks: list[Sink],
    folder: Path | None,
    step: int,
) -> None:
    """Send the estimate's observables' tables and kernel heatmap; save what it recorded.

    Args:
        monitor: The callback's monitor, after an estimate with ``observables``.
        sinks: Receivers of the tables ``{prefix}/influence`` and, with a susceptibility
            base, ``{prefix}/susceptibility``.
        image_sinks: Receivers of the figure ``{prefix}/loss_kernel``.
        folder: The run's folder: the recorded losses go to
            ``observables/step_<step>.npz`` there (one array per observable, ``(chains,
            records, values)``, and per weight restriction's, as ``<restriction>/<name>``);
            ``None`` not to save.
        step: The estimate's step.
    """
    result = monitor.last_result
    if result is None or not result.observables:
        return
    _log_figure(monitor, "loss_kernel", lambda: plot_loss_kernel(result), image_sinks, step)
    with monitor.reporting("logging the observables"):
        for sink in sinks:
            sink("influence", INFLUENCE_COLUMNS, monitor.influences, step)
            if monitor.susceptibility_base is not None:
                sink("susceptibility", SUSCEPTIBILITY_COLUMNS, monitor.susceptibilities, step)
        if folder is not None:
            (folder / OBSERVABLES_FOLDER).mkdir(parents=True, exist_ok=True)
            arrays = dict(result.observables)
            for component, restricted in result.restricted.items():
                arrays.update({f"{component}/{n}": a for n, a in restricted.observables.items()})
            np.savez(folder / OBSERVABLES_FOLDER / f"step_{step}.npz", **arrays)


def finish_dynamics(
    monitor: LLCMonitor,
    dynamics: EssentialDynamics,
    sinks: list[Sink],
    folder: Path | None,
    step: int,
) -> None:
    """At the end of training: save the essential dynamics and send their figure.

    The figure marks the full LLC's confirmed stage boundaries. Nothing happens with fewer
    than 3 records.

    Args:
        monitor: The callback's monitor, for its error policy and boundaries.
        dynamics: The records.
        sinks: Receivers of the figure, logged as ``{prefix}/essential_dynamics``.
        folder: Where ``DYNAMICS_FILE`` goes (the run's folder), or ``None`` not to save.
        step: The step to log the figure at.
    """
    if len(dynamics.steps) < 3:
        return
    if folder is not None:
        with monitor.reporting("saving the essential dynamics"):
            folder.mkdir(parents=True, exist_ok=True)
            dynamics.save(folder / DYNAMICS_FILE)
            logger.info("llc_callbacks: essential dynamics saved to %s", folder / DYNAMICS_FILE)
    boundaries = [b.step for b in monitor.boundaries if b.curve is None]
    _log_figure(
        monitor,
        "essential_dynamics",
        lambda: plot_essential_dynamics(dynamics.result(), boundaries),
        sinks,
        step,
    )


def log_components_figure(monitor: LLCMonitor, sinks: list[Sink], step: int) -> None:
    """Send the restricted LLCs' heatmap to the sinks, if any and there is one to draw."""
    if component_names(monitor.history, monitor.prefix):
        history = monitor.history
        _log_figure(
            monitor, "components", lambda: plot_components(history, monitor.prefix), sinks, step
        )


def log_susceptibilities_figure(monitor: LLCMonitor, sinks: list[Sink], step: int) -> None:
    """Send the susceptibilities over training to the sinks, if the monitor logged any."""
    if monitor.susceptibilities:  # an estimate logged them
        history = monitor.history
        _log_figure(
            monitor,
            "susceptibilities",
            lambda: plot_susceptibilities(history, monitor.prefix),
            sinks,
            step,
        )


def _log_figure(
    monitor: LLCMonitor, name: str, build: Callable[[], Any], sinks: list[Sink], step: int
) -> None:
    """Build a figure only when something receives it, under the monitor's error policy."""
    route(monitor, {name: Figure(build)}, [], sinks, step)
