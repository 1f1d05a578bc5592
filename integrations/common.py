"""What the Lightning and transformers callbacks share: arguments, state key, figures.

Each callback keeps its explicit, typed signature (for LightningCLI and IDEs) and passes it
here; the trainer-specific parts (hooks, loss, data, logging calls) stay in its module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import numpy as np

from llc_callbacks.monitor import LLCMonitor
from llc_callbacks.plotting import component_names, plot_components, plot_traces, to_pixels
from llc_callbacks.validation import check_bool

# A receiver of a figure: ``sink(name, pixels, step)`` logs it as ``{prefix}/{name}``.
Sink = Callable[[str, np.ndarray, int], None]


class TrainerMonitor(LLCMonitor):
    """The callbacks' monitor: ``total_steps`` comes from the trainer when training starts."""

    total_steps_later = True


# The callbacks' own arguments, beside those they pass on to their monitor.
ADAPTER_ARGUMENTS = ("loss_fn", "dataloader", "log_trace_plot")


def build_monitor(arguments: Mapping[str, Any]) -> TrainerMonitor:
    """Validate a callback's arguments and build its monitor from the rest.

    Args:
        arguments: The callback's keyword arguments by name (``config``, the schedule,
            ``prefix``, ``on_error``, ``restrictions`` and ``ADAPTER_ARGUMENTS``).

    Raises:
        ValueError: For a bad argument, naming it.
    """
    loss_fn, dataloader, log_trace_plot = (arguments[name] for name in ADAPTER_ARGUMENTS)
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    if dataloader is not None and not isinstance(dataloader, Iterable):
        raise ValueError(f"dataloader must be an iterable of batches, got {dataloader!r}")
    check_bool("log_trace_plot", log_trace_plot)
    monitor_arguments = {k: v for k, v in arguments.items() if k not in ADAPTER_ARGUMENTS}
    return TrainerMonitor(**monitor_arguments)


def dataset_size(dataset: object) -> int | None:
    """The length of a training set, or ``None`` when it has none (an iterable dataset)."""
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    return size if size >= 2 else None


def state_key(
    owner: str, monitor: LLCMonitor, every_n_steps: int | None, log_spaced: int | None
) -> str:
    """The key a callback's state is saved under: its class, prefix, schedule and config.

    Two differently configured callbacks in one run keep separate states.
    """
    fields = {
        "prefix": monitor.prefix,
        "every_n_steps": every_n_steps,
        "steps": monitor.schedule.steps,
        "log_spaced": log_spaced,
        "config": repr(monitor.config),
    }
    return owner + json.dumps(fields, sort_keys=True)


def warn_if_state_is_stale(
    monitor: LLCMonitor, owner: str, key: str, saved_keys: Collection[str]
) -> None:
    """Warn when a checkpoint holds this kind of callback's state, but not under ``key``.

    A resumed run whose prefix, schedule or config changed would otherwise start a new LLC
    history without a word.
    """
    others = sorted(k for k in saved_keys if k.startswith(owner + "{") and k != key)
    if others and key not in saved_keys:
        monitor.warn_once(
            "stale_state",
            f"the checkpoint holds the state of a {owner} with another prefix, schedule or"
            f" config ({others[0][len(owner) :]}), not of this one ({key[len(owner) :]}): this"
            " run starts a new LLC history. Pass the same arguments to continue the saved one.",
        )


def log_trace_figure(monitor: LLCMonitor, sinks: list[Sink], step: int) -> None:
    """Send the chain traces of the last estimate to the sinks, if any and it ran."""
    result = monitor.last_result
    if result is not None and result.error is None:
        _log_figure(monitor, "trace", lambda: plot_traces(result), sinks, step)


def log_components_figure(monitor: LLCMonitor, sinks: list[Sink], step: int) -> None:
    """Send the restricted LLCs' heatmap to the sinks, if any and there is one to draw."""
    if component_names(monitor.history, monitor.prefix):
        history = monitor.history
        _log_figure(
            monitor, "components", lambda: plot_components(history, monitor.prefix), sinks, step
        )


def _log_figure(
    monitor: LLCMonitor, name: str, build: Callable[[], Any], sinks: list[Sink], step: int
) -> None:
    """Build a figure only when something receives it, under the monitor's error policy."""
    if not sinks:
        return
    with monitor.reporting(f"logging the {name} figure"):
        try:
            pixels = to_pixels(build())
        except ImportError as error:
            monitor.warn_once("matplotlib", f"no figures are logged: {error}")
            return
        for sink in sinks:
            sink(name, pixels, step)
