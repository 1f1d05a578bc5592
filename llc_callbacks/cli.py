"""The ``llc-callbacks`` console script.

``llc-callbacks plot RUN [-o OUT.png] [--loss KEY]`` draws the LLC (with its chain spread)
and the loss of a run to a PNG, from a Lightning ``metrics.csv``, a transformers
``trainer_state.json`` or a W&B offline run folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llc_callbacks.history import llc_key, loss_key, read_rows, series
from llc_callbacks.plotting import plot_llc_curve


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script; return its exit status (0 on success, 2 on bad input)."""
    parser = argparse.ArgumentParser(prog="llc-callbacks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="draw the LLC and loss curves of a run to PNG")
    plot.add_argument("run", type=Path, help="metrics.csv, trainer_state.json or W&B run folder")
    plot.add_argument("-o", "--output", type=Path, help="PNG to write (default: next to RUN)")
    plot.add_argument("--loss", help="the loss key to draw (default: the trainer's loss)")
    args = parser.parse_args(argv)
    try:
        output = _plot(args.run, args.output, args.loss)
    except (FileNotFoundError, ValueError) as error:
        print(f"llc-callbacks: error: {error}", file=sys.stderr)
        return 2
    print(output)
    return 0


def _plot(run: Path, output: Path | None, loss: str | None) -> Path:
    rows = read_rows(run)
    mean_key = llc_key(rows)
    if mean_key is None:
        raise ValueError(f"{run} has no LLC metrics (no key ending in 'llc/mean')")
    loss = loss or loss_key(rows)
    if loss is not None and not any(loss in row for row in rows):
        raise ValueError(f"{run} has no '{loss}' values")
    output = output or (run if run.is_dir() else run.parent) / "llc_curve.png"
    plot_llc_curve(
        series(rows, mean_key),
        series(rows, mean_key.removesuffix("mean") + "std"),
        series(rows, loss) if loss else None,
        path=output,
    )
    return output


if __name__ == "__main__":
    sys.exit(main())
