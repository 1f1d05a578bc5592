"""Figures: chains, calibration, the LLC over training, essential dynamics, observables.

Needs matplotlib (``pip install llc-callbacks[plot]``). Figures are built without pyplot, so
nothing here touches the global matplotlib state; each function returns the figure and saves
it as PNG when given a path.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from llc_callbacks.calibration import Calibration
from llc_callbacks.dynamics import DynamicsResult
from llc_callbacks.history import Series, series
from llc_callbacks.keys import SUSCEPTIBILITY, metric_key, parse_key
from llc_callbacks.observables import loss_kernel
from llc_callbacks.result import LLCResult
from llc_callbacks.stages import Stage, detect_stages

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure

FIGSIZE, DPI = (8.0, 4.5), 100  # 800 x 450 pixels
# Shades of rising and falling stages; flagged ones (the LLC moves, the loss stays flat) hatched.
STAGE_COLORS = {"rising": "tab:red", "falling": "tab:green"}
FLAGGED_HATCH = "//"
# The legend entry of estimates that failed a health check, drawn hollow.
UNHEALTHY = "unhealthy"
# k-means of component curves (cluster_curves): seeded restarts, each at most so many steps.
KMEANS_RESTARTS, KMEANS_ITERATIONS, KMEANS_SEED = 10, 100, 0


def plot_traces(result: LLCResult, path: str | Path | None = None) -> Figure:
    """Each chain's minibatch loss over the draws, against the loss at ``w*``.

    A healthy estimate shows flat traces above the line; traces still rising mean too little
    burn-in, traces below it mean ``w*`` is not a minimum or the step size is too large.
    """
    figure = _figure()
    axes = figure.subplots()
    for chain, trace in enumerate(result.loss_trace):
        axes.plot(trace, linewidth=0.8, label=f"chain {chain}")
    axes.axhline(result.init_loss, color="black", linestyle="--", label="L(w*)")
    axes.set_xlabel("draw")
    axes.set_ylabel("minibatch loss")
    axes.set_title(f"LLC {result.llc_mean:.3g} ± {result.llc_std:.2g}")
    axes.legend(fontsize="small", ncol=2)
    return _save(figure, path)


def plot_calibration(calibration: Calibration, path: str | Path | None = None) -> Figure:
    """The estimate (± chain spread) against the step size, marking the recommendation."""
    figure = _figure()
    axes = figure.subplots()
    for ok, color, label in ((True, "tab:green", "passes"), (False, "tab:red", "fails")):
        rows = [r for r in calibration.rows if r["ok"] is ok and math.isfinite(r["llc_mean"])]
        axes.errorbar(
            [r["step_size"] for r in rows],
            [r["llc_mean"] for r in rows],
            yerr=[0.0 if math.isnan(r["llc_std"]) else r["llc_std"] for r in rows],
            fmt="o",
            color=color,
            label=label,
        )
    if calibration.recommended is not None:
        axes.axvline(
            calibration.recommended.step_size, color="black", linestyle="--", label="recommended"
        )
    axes.set_xscale("log")
    axes.set_xlabel("step size")
    axes.set_ylabel("LLC")
    axes.legend(fontsize="small")
    return _save(figure, path)


class Curves(NamedTuple):
    """One run's curves for ``plot_llc_curve``.

    Attributes:
        llc: The LLC mean against the step.
        spread: Its chain spread (std), drawn as a band around it.
        loss: The training loss, drawn on a second axis.
        label: The run's name in the legend.
        curvature: Curvature measured at the LLC's steps, by name (``hessian_trace``, ...),
            drawn in a panel below, each scaled to its largest magnitude.
        restart: Which LLC history of the run these are (``llc_callbacks.history.histories``):
            0 for its first, ``k`` for its ``k``-th restart, which continues the run of the
            curves before it.
    """

    llc: Series
    spread: Series | None = None
    loss: Series | None = None
    label: str | None = None
    curvature: Mapping[str, Series] | None = None
    restart: int = 0


def plot_llc_curve(*runs: Curves, path: str | Path | None = None) -> Figure:
    """The LLC over training, a curve per run, with its chain spread and the loss.

    Each run's spread is a band around its curve; the losses are dashed, on a second axis.
    Estimates that failed a health check (``Series.healthy``) are hollow markers, with a
    legend entry "unhealthy". A restarted history (``Curves.restart`` above 0) is a curve of
    its own in its run's colour, dash-dotted and labelled "(restart k)", never joined to the
    history before it. A single run's rising and falling stages (``llc_callbacks.stages``),
    fitted in each history on its own, are shaded, and hatched where the loss stays flat over
    them (flagged).
    Where runs hold curvature, a panel below draws the LLC and each curvature quantity divided
    by its largest magnitude, on the same step axis, so that their shapes compare.

    Args:
        runs: The curves of each run, a run's restarted histories after its first.
        path: Where to save the PNG.

    Returns:
        The figure; its first axes holds the LLC.

    Raises:
        ValueError: If no run is given.
    """
    if not runs:
        raise ValueError("plot_llc_curve needs the curves of at least one run")
    numbers = _run_numbers(runs)
    single = numbers[-1] == 0
    curved = [(run, number) for run, number in zip(runs, numbers, strict=True) if run.curvature]
    figure = _figure(rows=2 if curved else 1)
    if curved:
        axes, below = figure.subplots(2, 1, sharex=True)
        several = len({number for _, number in curved}) > 1
        for run, number in curved:
            style = "-." if run.restart else "-" if number == 0 else ":"
            suffix = (f" ({run.label})" if several and run.label else "") + _restarted(run)
            _scaled(below, run.llc, f"LLC{suffix}", "black", style)
            for index, (name, values) in enumerate(sorted(run.curvature.items())):
                _scaled(below, values, f"{name.replace('_', ' ')}{suffix}", f"C{index + 1}", style)
        below.set_ylabel("/ largest magnitude")
        below.set_xlabel("step")
        below.legend(fontsize="small", ncol=2)
    else:
        axes = figure.subplots()
    losses = axes.twinx() if any(run.loss is not None and run.loss.steps for run in runs) else None
    marked = False
    for run, number in zip(runs, numbers, strict=True):
        color = "tab:blue" if single else f"C{number}"
        name = (run.label or ("LLC" if single else f"run {number}")) + _restarted(run)
        style = "-." if run.restart else "-"
        marked |= _draw_estimates(axes, run.llc, color, style, name, marked)
        if run.spread is not None and run.spread.steps == run.llc.steps:
            low = [m - s for m, s in zip(run.llc.values, run.spread.values, strict=True)]
            high = [m + s for m, s in zip(run.llc.values, run.spread.values, strict=True)]
            axes.fill_between(run.llc.steps, low, high, color=color, alpha=0.2)
        if losses is not None and run.loss is not None and run.loss.steps:
            loss_color = "tab:orange" if single else color
            losses.plot(
                run.loss.steps, run.loss.values, color=loss_color, linewidth=1, linestyle="--"
            )
    if single:
        for run in runs:
            _shade_stages(axes, run)
    if not curved:
        axes.set_xlabel("step")
    axes.set_ylabel("LLC (± chain std)")
    if losses is not None:
        losses.set_ylabel("loss (dashed)")
    if marked or len(runs) > 1:
        axes.legend(fontsize="small")
    return _save(figure, path)


def _run_numbers(runs: Sequence[Curves]) -> list[int]:
    """Each curves' run, from 0: a restarted history continues the run of the curves before."""
    numbers: list[int] = []
    for run in runs:
        numbers.append(numbers[-1] + (run.restart == 0) if numbers else 0)
    return numbers


def _restarted(run: Curves) -> str:
    return f" (restart {run.restart})" if run.restart else ""


def _draw_estimates(
    axes: Axes, values: Series, color: str, style: str, label: str, marked: bool
) -> bool:
    """Draw an LLC curve with its unhealthy estimates hollow; whether it has any.

    The first hollow markers (``marked`` still ``False``) carry the legend entry.
    """
    unhealthy = {index for index, ok in enumerate(values.healthy or ()) if not ok}
    healthy = [index for index in range(len(values.steps)) if index not in unhealthy]
    axes.plot(
        values.steps,
        values.values,
        marker="o",
        markersize=3,
        color=color,
        linestyle=style,
        label=label,
        markevery=healthy if unhealthy else None,
    )
    if unhealthy:
        axes.plot(
            [values.steps[index] for index in sorted(unhealthy)],
            [values.values[index] for index in sorted(unhealthy)],
            linestyle="none",
            marker="o",
            markersize=5,
            markerfacecolor="white",
            markeredgecolor=color,
            label=None if marked else UNHEALTHY,
        )
    return bool(unhealthy)


def plot_components(
    history: list[dict[str, float]],
    prefix: str = "llc",
    path: str | Path | None = None,
    *,
    clusters: int | None = None,
) -> Figure:
    """Restricted LLCs over training: a heatmap (component x step) above their curves.

    Components are in natural order (``component_names``). Each component's stage boundaries
    (``llc_callbacks.stages``) are white ticks across its row of the heatmap, and its flagged
    stages (the LLC moves while the loss, the logged ``init_loss``, stays flat) are hatched.
    With ``clusters``, the components are grouped by the shape of their curves
    (``cluster_curves``): the heatmap rows go by cluster, a strip beside them colours and
    numbers each cluster, and the curves take their cluster's colour, a legend entry per cluster.

    Args:
        history: A monitor's or callback's history (rows with ``step`` and the metrics).
        prefix: The metric prefix.
        path: Where to save the PNG.
        clusters: How many clusters to group the components into; ``None`` for none.

    Returns:
        The figure; its first axes is the heatmap.

    Raises:
        ValueError: If the history holds no finite restricted LLC, or ``clusters`` is given
            and ``cluster_curves`` rejects it.
    """
    names = component_names(history, prefix)
    if not names:
        raise ValueError(f"the history holds no finite restricted LLC ({prefix}/<name>/mean)")
    grouped = None if clusters is None else cluster_curves(history, prefix, clusters)
    if grouped is not None:
        names = list(grouped)
    steps = [row["step"] for row in history]
    values = _component_values(history, prefix, names)
    figure = _figure()
    if grouped is None:
        heat, lines = figure.subplots(2, 1, sharex=True)
        beside = [heat]
    else:
        grid = figure.add_gridspec(2, 2, width_ratios=(40, 1))
        heat = figure.add_subplot(grid[0, 0])
        lines = figure.add_subplot(grid[1, 0], sharex=heat)
        strip = figure.add_subplot(grid[0, 1], sharey=heat)
        heat.tick_params(labelbottom=False)
        _draw_clusters(strip, grouped)
        beside = [heat, strip]
    edges = np.array([*steps, steps[-1] + 1]) if len(steps) == 1 else _edges(steps)
    image = heat.pcolormesh(edges, np.arange(len(names) + 1), values, shading="flat")
    heat.set_yticks(np.arange(len(names)) + 0.5, names, fontsize="small")
    figure.colorbar(image, ax=beside, label="LLC")
    loss = metric_key(prefix, "init_loss")
    for row, name in enumerate(names):
        stages = detect_stages(history, prefix, name, loss=loss)
        for stage in stages[:-1]:
            heat.plot([stage.end, stage.end], [row, row + 1], color="white", linewidth=1.5)
        for stage in stages:
            if stage.flagged:
                heat.fill_between(
                    [stage.start, stage.end], row, row + 1, hatch=FLAGGED_HATCH, fc="none", lw=0
                )
    if grouped is None:
        for name, row in zip(names, values, strict=True):
            lines.plot(steps, row, marker="o", markersize=2, label=name)
        columns = len(names) // 8
    else:
        sizes = Counter(grouped.values())
        columns = len(sizes) // 8
        for name, row in zip(names, values, strict=True):
            number = grouped[name]
            size = sizes.pop(number, None)  # a legend entry for each cluster's first curve
            label = None if size is None else f"cluster {number} ({size})"
            color = _cluster_color(number)
            lines.plot(steps, row, marker="o", markersize=2, color=color, label=label)
    lines.set_xlabel("step")
    lines.set_ylabel("LLC")
    lines.legend(fontsize="x-small", ncol=max(1, columns))
    return _save(figure, path)


def plot_loss_kernel(result: LLCResult, path: str | Path | None = None) -> Figure:
    """The loss kernel: correlations between the losses of every observable's examples.

    The observables' recorded values follow one another along both axes, in their order,
    separated by lines; blocks of strong correlation are groups of examples (tasks) that the
    same weight directions serve (Adam et al. 2025).

    Args:
        result: An estimate made with ``observables``.
        path: Where to save the PNG.

    Returns:
        The figure.

    Raises:
        ValueError: If the estimate recorded no observables.
    """
    names = list(result.observables)
    if not names:
        raise ValueError("the estimate recorded no observables (pass observables=...)")
    sizes = np.array([result.observables[name].shape[2] for name in names])
    kernel = np.block(
        [[loss_kernel(result, a, b, correlation=True).value for b in names] for a in names]
    )
    figure = _figure()
    axes = figure.subplots()
    image = axes.imshow(kernel, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    for edge in np.cumsum(sizes)[:-1] - 0.5:
        axes.axhline(edge, color="black", linewidth=0.8)
        axes.axvline(edge, color="black", linewidth=0.8)
    centers = np.cumsum(sizes) - sizes / 2 - 0.5
    axes.set_xticks(centers, names, fontsize="small")
    axes.set_yticks(centers, names, fontsize="small")
    axes.set_title(f"loss kernel ({result.observables[names[0]].shape[1]} records per chain)")
    figure.colorbar(image, ax=axes, label="correlation of losses")
    return _save(figure, path)


def plot_susceptibilities(
    history: list[dict[str, float]], prefix: str = "llc", path: str | Path | None = None
) -> Figure:
    """Susceptibilities over training: a panel per data source, a curve per component.

    Args:
        history: Rows with ``step`` and the metrics (a monitor's or callback's history, or
            ``llc_callbacks.history.read_rows`` of a run), holding
            ``{prefix}[/<component>]/susceptibility/<source>``.
        prefix: The metric prefix.
        path: Where to save the PNG.

    Returns:
        The figure; one axes per source, the x axis shared.

    Raises:
        ValueError: If the history holds no susceptibility.
    """
    found: dict[str, dict[str, str]] = {}  # source -> component -> key
    for row in history:
        for key in row:
            parsed = parse_key(key, prefix)
            if parsed and parsed.field.startswith(SUSCEPTIBILITY + "/"):
                source = parsed.field.removeprefix(SUSCEPTIBILITY + "/")
                found.setdefault(source, {})[parsed.restriction or "full"] = key
    if not found:
        raise ValueError(f"the history holds no susceptibility ({prefix}/susceptibility/...)")
    figure = _figure(rows=len(found))
    panels = figure.subplots(len(found), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (source, keys) in zip(panels, sorted(found.items()), strict=True):
        for component in sorted(keys, key=lambda name: (name != "full", _natural_key(name))):
            curve = series(history, keys[component])
            axes.plot(curve.steps, curve.values, marker="o", markersize=2, label=component)
        axes.axhline(0, color="grey", linewidth=0.5)
        axes.set_ylabel(f"toward {source}")
        axes.legend(fontsize="x-small", ncol=max(1, len(keys) // 8))
    panels[0].set_title("susceptibility of each component's loss")
    panels[-1].set_xlabel("step")
    return _save(figure, path)


def component_names(history: list[dict[str, float]], prefix: str = "llc") -> list[str]:
    """The restricted LLCs with at least one finite mean in a history, in natural order.

    Natural order compares runs of digits as numbers: ``layer2.head2`` comes before
    ``layer2.head10``, which comes before ``layer10.head0``.
    """
    names = set()
    for row in history:
        for key, value in row.items():
            parsed = parse_key(key, prefix)
            if parsed and parsed.restriction and parsed.field == "mean" and math.isfinite(value):
                names.add(parsed.restriction)
    return sorted(names, key=_natural_key)


def cluster_curves(
    history: list[dict[str, float]], prefix: str = "llc", clusters: int = 2
) -> dict[str, int]:
    """Group the restricted LLCs by the shape of their curves over training, with k-means.

    Wang et al. 2024 (arXiv:2410.02984) find the types of attention heads this way. Each
    component's curve, over the steps where every component has a finite LLC, is z-scored;
    k-means (k-means++ seeding, the best of ``KMEANS_RESTARTS`` runs from a fixed seed, so the
    result is the same every time) groups the z-scored curves.

    Args:
        history: A monitor's or callback's history (rows with ``step`` and the metrics).
        prefix: The metric prefix.
        clusters: How many clusters, from 1 to the number of components.

    Returns:
        Each component's cluster, numbered from 1 in the order in which the clusters' first
        members come in natural order (``component_names``). The entries go by cluster, then
        in natural order, as the heatmap rows of ``plot_components``. Fewer clusters than
        asked for come out only where curves coincide.

    Raises:
        ValueError: If ``clusters`` is not an int from 1 to the number of components, the
            history holds no finite restricted LLC, or no step holds one for every component.
    """
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters must be an int >= 1, got {clusters!r}")
    names = component_names(history, prefix)
    if not names:
        raise ValueError(f"the history holds no finite restricted LLC ({prefix}/<name>/mean)")
    if clusters > len(names):
        raise ValueError(
            f"clusters must be at most the number of components ({len(names)}), got {clusters}"
        )
    values = _component_values(history, prefix, names)
    shared = values[:, np.isfinite(values).all(axis=0)]
    if not shared.size:
        raise ValueError(
            "cannot cluster the curves: no step holds a finite restricted LLC for every component"
        )
    # z-scores, as the shape of a curve tells a component's role, not its level or scale: heads
    # that rise then fall group together however large their LLC. Flat curves (no spread
    # beyond rounding) become zeros rather than magnified rounding errors.
    centered = shared - shared.mean(axis=1, keepdims=True)
    spread = centered.std(axis=1, keepdims=True)
    flat = spread <= 1e-12 * np.abs(shared).max(axis=1, keepdims=True)
    shapes = np.divide(centered, spread, out=np.zeros_like(centered), where=~flat)
    labels = _kmeans(shapes, clusters)
    numbers: dict[int, int] = {}
    for label in labels:
        numbers.setdefault(int(label), len(numbers) + 1)
    found = {name: numbers[int(label)] for name, label in zip(names, labels, strict=True)}
    return dict(sorted(found.items(), key=lambda item: item[1]))  # stable: natural order within


def plot_essential_dynamics(
    result: DynamicsResult, boundaries: Sequence[int] = (), path: str | Path | None = None
) -> Figure:
    """The path of the outputs in PC1-PC2 and PC2-PC3 (PC1-PC2 alone with 2 components).

    Each panel is drawn by ``draw_dynamics_path``: records coloured by step, turning points
    circled, LLC stage boundaries (``llc_callbacks.stages``) crossed.

    Args:
        result: From ``EssentialDynamics.result``.
        boundaries: Steps of LLC stage boundaries, such as each stage's ``end``.
        path: Where to save the PNG.

    Raises:
        ValueError: If the result has fewer than 2 components.
    """
    points = result.projections
    if points.shape[1] < 2:
        raise ValueError(
            "plot_essential_dynamics needs at least 2 principal components, the result has"
            f" {points.shape[1]}"
        )
    figure = _figure()
    panels = figure.subplots(1, 2 if points.shape[1] >= 3 else 1, squeeze=False)[0]
    for axes, components in zip(panels, ((0, 1), (1, 2)), strict=False):
        image = draw_dynamics_path(axes, result, boundaries, components)
    if panels[0].get_legend_handles_labels()[0]:
        panels[0].legend(fontsize="small")
    figure.colorbar(image, ax=panels, label="step")
    return _save(figure, path)


def draw_dynamics_path(
    axes: Axes,
    result: DynamicsResult,
    boundaries: Sequence[int] = (),
    components: tuple[int, int] = (0, 1),
) -> PathCollection:
    """Draw the path of the outputs in two principal components on ``axes``.

    Records are coloured by step on a log scale beyond step 10; turning points are circled and
    LLC stage boundaries crossed at the record nearest each, where they fall within the
    recorded steps.

    Args:
        axes: Where to draw.
        result: From ``EssentialDynamics.result``.
        boundaries: Steps of LLC stage boundaries.
        components: The two components' indices (0 for PC1).

    Returns:
        The coloured points, for a colorbar.
    """
    from matplotlib.colors import SymLogNorm

    points, ratios = result.projections, result.explained_variance
    x, y = components
    steps = np.asarray(result.steps)
    turns = [result.steps.index(step) for step in result.turning_points]
    crossed = sorted(
        {int(np.argmin(np.abs(steps - b))) for b in boundaries if steps[0] <= b <= steps[-1]}
    )
    norm = SymLogNorm(linthresh=10, vmin=steps.min(), vmax=max(steps.max(), steps.min() + 1))
    axes.plot(points[:, x], points[:, y], color="0.7", linewidth=0.8, zorder=1)
    image = axes.scatter(points[:, x], points[:, y], c=steps, norm=norm, s=12, zorder=2)
    marks = (
        (turns, {"s": 80, "facecolors": "none", "edgecolors": "black", "label": "turning point"}),
        (crossed, {"s": 50, "marker": "x", "color": "tab:red", "label": "LLC stage boundary"}),
    )
    for zorder, (indices, style) in enumerate(marks, start=3):
        if indices:
            axes.scatter(points[indices, x], points[indices, y], zorder=zorder, **style)
    axes.set_xlabel(f"PC{x + 1} ({ratios[x]:.0%})")
    axes.set_ylabel(f"PC{y + 1} ({ratios[y]:.0%})")
    return image


def _natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """``name`` cut into runs of digits, as numbers, and of other characters, then ``name``."""
    parts = re.split(r"([0-9]+)", name)  # runs of digits at the odd positions
    return tuple(int(part) if index % 2 else part for index, part in enumerate(parts)), name


def _component_values(
    history: list[dict[str, float]], prefix: str, names: Sequence[str]
) -> np.ndarray:
    """Each component's LLC means at every row of a history (a row per name), NaN if missing."""
    return np.array(
        [[row.get(metric_key(prefix, "mean", name), math.nan) for row in history] for name in names]
    )


def _kmeans(points: np.ndarray, k: int) -> np.ndarray:
    """Each point's cluster (0 to ``k - 1``) by k-means: the least inertia of seeded restarts."""
    rng = np.random.default_rng(KMEANS_SEED)
    best, least = np.zeros(len(points), dtype=int), math.inf
    for _ in range(KMEANS_RESTARTS):
        centers = _kmeans_plus_plus(points, k, rng)
        labels = np.full(len(points), -1)
        for _ in range(KMEANS_ITERATIONS):
            distances = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
            assigned = distances.argmin(axis=1)
            if (assigned == labels).all():
                break
            labels = assigned
            # A cluster left empty keeps its center.
            centers = np.array(
                [
                    points[labels == j].mean(axis=0) if (labels == j).any() else centers[j]
                    for j in range(k)
                ]
            )
        inertia = distances[np.arange(len(points)), labels].sum()
        if inertia < least:
            best, least = labels, inertia
    return best


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` starting points (k-means++), each drawn by its squared distance to the nearest."""
    centers = [points[rng.integers(len(points))]]
    for _ in range(k - 1):
        nearest = np.min([((points - center) ** 2).sum(axis=1) for center in centers], axis=0)
        total = nearest.sum()
        index = (
            rng.choice(len(points), p=nearest / total) if total > 0 else rng.integers(len(points))
        )
        centers.append(points[index])
    return np.array(centers)


def _draw_clusters(strip: Axes, grouped: dict[str, int]) -> None:
    """Colour each cluster's heatmap rows on a strip beside them, the cluster's number on it."""
    numbers = list(grouped.values())
    for number in dict.fromkeys(numbers):
        first, size = numbers.index(number), numbers.count(number)
        strip.barh(
            first + size / 2, 1, height=size, color=_cluster_color(number), edgecolor="white"
        )
        strip.text(0.5, first + size / 2, str(number), ha="center", va="center", color="white")
    strip.set_xlim(0, 1)
    strip.set_xticks([])
    strip.tick_params(left=False, labelleft=False)


def _cluster_color(number: int) -> str:
    return f"C{(number - 1) % 10}"


def _edges(steps: list[float]) -> np.ndarray:
    """Cell edges around each step, halfway between neighbours."""
    centers = np.asarray(steps, dtype=float)
    middles = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - middles[0]], middles, [2 * centers[-1] - middles[-1]]])


def to_pixels(figure: Figure) -> np.ndarray:
    """The figure rendered as an RGBA array of shape ``(height, width, 4)``, for loggers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def _figure(rows: int = 1) -> Figure:
    """A figure of ``FIGSIZE``, taller by two thirds for a second row of panels."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'llc-callbacks[plot]'") from error
    width, height = FIGSIZE
    return Figure(figsize=(width, height * (1 + 2 * (rows - 1) / 3)), dpi=DPI, layout="constrained")


def _shade_stages(axes, run: Curves) -> None:
    """Shade the rising and falling stages of a run's LLC curve (``detect_stages``).

    Without the chain count the spread stands for the standard error, which errs towards
    fewer stages.
    """
    rows = [
        {"step": step, "llc/mean": value}
        for step, value in zip(run.llc.steps, run.llc.values, strict=True)
    ]
    if run.spread is not None and run.spread.steps == run.llc.steps:
        for row, spread in zip(rows, run.spread.values, strict=True):
            row["llc/std"] = spread
    if run.loss is not None:
        losses = zip(run.loss.steps, run.loss.values, strict=True)
        rows += [{"step": step, "loss": value} for step, value in losses]
    shade_stages(axes, detect_stages(rows, loss="loss" if run.loss is not None else None))


def shade_stages(axes: Axes, stages: Sequence[Stage], *, labels: bool = False) -> None:
    """Shade rising and falling stages over their steps, hatching the flagged ones.

    Args:
        axes: Where to draw, with steps on the x axis.
        stages: From ``detect_stages``.
        labels: Give each shade a legend label (its kind, and whether the loss stayed flat).
    """
    for stage in stages:
        if stage.kind in STAGE_COLORS:
            label = f"{stage.kind} stage" + (", loss flat" if stage.flagged else "")
            axes.axvspan(
                stage.start,
                stage.end,
                color=STAGE_COLORS[stage.kind],
                alpha=0.1,
                lw=0,
                hatch=FLAGGED_HATCH if stage.flagged else None,
                label=label if labels else None,
            )


def _scaled(axes, values: Series, label: str, color: str, style: str) -> None:
    """Draw a curve divided by its largest magnitude (as it is when that is 0 or NaN)."""
    largest = max((abs(v) for v in values.values if math.isfinite(v)), default=0.0)
    scaled = [v / largest for v in values.values] if largest > 0 else values.values
    axes.plot(values.steps, scaled, color=color, linestyle=style, marker=".", label=label)


def _save(figure: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        figure.savefig(path, dpi=DPI)
    return figure
