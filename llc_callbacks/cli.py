"""The ``llc-callbacks`` console script.

``llc-callbacks stages RUN [--restriction NAME]`` prints the developmental stages of a run's
LLC curve (``llc_callbacks.stages``) as a table.

``llc-callbacks plot RUN [RUN ...] [-o OUT.png] [--loss KEY]`` draws the LLC (with its chain
spread) and the loss of one run or several (a curve each) to a PNG, from a Lightning
``metrics.csv``, a transformers ``trainer_state.json`` or a W&B offline run folder; with the
curvature a run logged, in a panel below.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from llc_callbacks.curvature import CURVATURES
from llc_callbacks.history import llc_prefix, loss_key, read_rows, series
from llc_callbacks.keys import CURVATURE, metric_key
from llc_callbacks.plotting import Curves, plot_llc_curve
from llc_callbacks.stages import detect_stages


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script; return its exit status (0 on success, 2 on bad input)."""
    parser = argparse.ArgumentParser(prog="llc-callbacks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="draw the LLC and loss curves of runs to PNG")
    plot.add_argument(
        "runs", type=Path, nargs="+", help="metrics.csv, trainer_state.json or W&B run folders"
    )
    plot.add_argument(
        "-o", "--output", type=Path, help="PNG to write (default: llc_curve.png beside the run)"
    )
    plot.add_argument("--loss", help="the loss key to draw (default: the trainer's loss)")
    stages = commands.add_parser("stages", help="print the stages of a run's LLC curve")
    stages.add_argument("run", type=Path, help="metrics.csv, trainer_state.json or W&B run folder")
    stages.add_argument("--restriction", help="a restricted LLC's name (default: the full LLC)")
    args = parser.parse_args(argv)
    try:
        if args.command == "stages":
            _print_stages(args.run, args.restriction)
            return 0
        output = _plot(args.runs, args.output, args.loss)
    except (FileNotFoundError, ValueError) as error:
        print(f"llc-callbacks: error: {error}", file=sys.stderr)
        return 2
    print(output)
    return 0


def _llc_rows(run: Path) -> tuple[list[dict[str, float]], str]:
    """A run's logged rows and the prefix of its LLC metrics."""
    rows = read_rows(run)
    prefix = llc_prefix(rows)
    if prefix is None:
        raise ValueError(f"{run} has no LLC metrics (no key ending in 'llc/mean')")
    return rows, prefix


def _print_stages(run: Path, restriction: str | None) -> None:
    rows, prefix = _llc_rows(run)
    print(f"{'start':>8} {'end':>8} {'kind':8} {'LLC change':>11} {'loss change':>12} flagged")
    for stage in detect_stages(rows, prefix, restriction, loss=loss_key(rows)):
        loss = "-" if stage.loss_change is None else f"{stage.loss_change:+.1%}"
        flagged = "yes" if stage.flagged else ""
        print(
            f"{stage.start:8d} {stage.end:8d} {stage.kind:8} {stage.change:+11.4g}"
            f" {loss:>12} {flagged}"
        )


def _plot(runs: list[Path], output: Path | None, loss: str | None) -> Path:
    folders = [run if run.is_dir() else run.parent for run in runs]
    # A run is named by its folder (the W&B run, Lightning's version_N, the output_dir).
    labels = [folder.name for folder in folders] if len(runs) > 1 else [None]
    curves = [_curves(run, loss, label) for run, label in zip(runs, labels, strict=True)]
    output = output or Path(os.path.commonpath(folders)) / "llc_curve.png"
    plot_llc_curve(*curves, path=output)
    return output


def _curves(run: Path, loss: str | None, label: str | None) -> Curves:
    rows, prefix = _llc_rows(run)
    loss = loss or loss_key(rows)
    if loss is not None and not any(loss in row for row in rows):
        raise ValueError(f"{run} has no '{loss}' values")
    curvature = {
        name: series(rows, metric_key(prefix, f"{CURVATURE}/{name}"))
        for name in CURVATURES
        if any(metric_key(prefix, f"{CURVATURE}/{name}") in row for row in rows)
    }
    return Curves(
        series(rows, metric_key(prefix, "mean")),
        series(rows, metric_key(prefix, "std")),
        series(rows, loss) if loss else None,
        label,
        curvature,
    )


if __name__ == "__main__":
    sys.exit(main())
