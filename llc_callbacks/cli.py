"""The ``llc-callbacks`` console script: a run's logged LLC, and the LLC of its checkpoints.

``main`` is the entry point. Its help, and each command's (``llc-callbacks plot --help``), is
built from the ``*_DESCRIPTION`` and ``*_EXAMPLES`` constants below.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llc_callbacks.curvature import CURVATURES
from llc_callbacks.distributed import rank_and_world
from llc_callbacks.history import health_key, histories, llc_prefix, loss_key, read_rows, series
from llc_callbacks.keys import CURVATURE, metric_key
from llc_callbacks.plotting import Curves, component_names, plot_components, plot_llc_curve
from llc_callbacks.replay import (
    LIGHTNING,
    SPLITS,
    Checkpoint,
    find_checkpoints,
    hub_checkpoints,
    replay,
    watch,
)
from llc_callbacks.stages import detect_stages

PROG = "llc-callbacks"
# Default file names of the figures, in the folder the runs share.
CURVE_PNG, COMPONENTS_PNG = "llc_curve.png", "llc_components.png"
RUN_HELP = "a metrics.csv, a trainer_state.json, a folder holding either, or a W&B run folder"

DESCRIPTION = """\
Figures and tables of the local learning coefficient (LLC) that llc_callbacks logged
during training. Each command reads a run's logged history: a Lightning CSVLogger
metrics.csv, a transformers trainer_state.json, a folder holding either, or a W&B
offline run folder (wandb/offline-run-*, read with wandb). See
'llc-callbacks COMMAND --help' for what each command does and its options."""
EXAMPLES = """\
examples:
  llc-callbacks plot lightning_logs/version_0/metrics.csv
  llc-callbacks plot output/trainer_state.json --components
  llc-callbacks stages wandb/offline-run-20250101_120000-abc123
  llc-callbacks replay output --setup my_setup.py:setup"""

PLOT_DESCRIPTION = """\
Draw the LLC over training to a PNG, from a Lightning metrics.csv, a transformers
trainer_state.json or a W&B offline run folder: the LLC with its chain spread (+/- std)
as a band, the loss dashed on a second axis, a curve per run when given several, and
the curvature a run logged in a panel below; a single run's rising and falling stages
are shaded. Estimates that failed a health check (llc/healthy 0) are hollow markers.
Where the LLC's step does not increase from one estimate to the next (a second fit from
an earlier checkpoint logged into the same file), a new LLC history begins: a curve of
its own, dash-dotted and labelled "(restart k)". --restriction NAME draws the
restricted LLC NAME (a layer's or a head's, with its own spread where logged) of each
run beside its full LLC, in the same axes. --components draws every restricted LLC of
one run instead: a heatmap (component x step) marking each one's stage boundaries,
above their curves, of the run's last LLC history. Prints the path of the PNG it wrote."""
PLOT_EXAMPLES = """\
examples:
  llc-callbacks plot lightning_logs/version_0/metrics.csv
  llc-callbacks plot wandb/offline-run-* -o runs.png
  llc-callbacks plot output/trainer_state.json --restriction layer0 --restriction layer1
  llc-callbacks plot lightning_logs/version_0 --components"""

STAGES_DESCRIPTION = """\
Print the developmental stages of a run's LLC curve as a table, from a Lightning
metrics.csv, a transformers trainer_state.json or a W&B offline run folder. The
estimates are fitted with a piecewise-linear curve, in units of their chain spread
(llc_callbacks.stages.detect_stages); each stage is rising, falling or flat, and its
row gives its first and last step, the LLC's change and the loss's relative change
over it. A stage is flagged where the LLC moves while the loss stays flat. Where the
LLC's step does not increase from one estimate to the next (a second fit from an earlier
checkpoint logged into the same file), a new LLC history begins: each history is fitted
on its own and printed as a table of its own, under a line naming it. --restriction
NAME reads the restricted LLC NAME (a layer's or a head's) instead of the full LLC."""
STAGES_EXAMPLES = """\
examples:
  llc-callbacks stages lightning_logs/version_0/metrics.csv
  llc-callbacks stages output/trainer_state.json --restriction layer0.head1"""


REPLAY_DESCRIPTION = """\
Estimate the LLC at every checkpoint a folder holds, in step order: a transformers
output_dir (checkpoint-N/), Lightning .ckpt files (found recursively), or a folder laid
out as the Hub's cache lays out a repository's revisions (refs/step1000 naming
snapshots/<commit>/); or, with --revisions, a Hub repository's revisions. --setup names
a Python function (pkg.module:function or path/to/file.py:function) that returns a
dict: "data" (a re-iterable of batches, the callback's data to get its numbers) and
optionally "loss_fn", "monitor" (an LLCMonitor: the config, restrictions, curvature,
observables and prefix the callback had) and "load" (checkpoint -> model). Without
"load", transformers checkpoints load with from_pretrained and Lightning ones need
--model-class; without "loss_fn", model(**batch).loss (transformers) or the module's
training_step (Lightning). Estimates go to --output (CSV or JSON; started again, it
repeats nothing) and, with --wandb-run, into that W&B run on its trainer's step axis;
the curve is drawn beside the output. --watch follows a folder that training is still
writing, until its last step, so that estimates never slow training down."""
REPLAY_EXAMPLES = """\
examples:
  llc-callbacks replay output --setup my_setup.py:setup
  llc-callbacks replay lightning_logs/version_0/checkpoints --setup my_setup.py:setup \\
      --model-class my_project.model:LitModel -o llc.csv
  llc-callbacks replay output --setup my_setup.py:setup --watch --device cuda:1
  llc-callbacks replay EleutherAI/pythia-70m --revisions step1000 step2000 step4000 \\
      --setup my_setup.py:setup
  llc-callbacks replay ~/.cache/huggingface/hub/models--EleutherAI--pythia-70m \\
      --setup my_setup.py:setup"""
# What a --setup function may return, beside "data".
SETUP_KEYS = ("data", "loss_fn", "monitor", "load")
# Why Lightning checkpoints cannot load without being told their module's class.
NEEDS_MODULE_CLASS = (
    "Lightning checkpoints need --model-class MODULE:CLASS (the LightningModule that was"
    " trained), or 'load' in what --setup returns"
)
# The default output, in the replayed folder.
REPLAY_CSV = "llc_replay.csv"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script.

    Args:
        argv: The arguments after the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success and after ``--help``, 2 on bad arguments or input
        (with a message on stderr). Under torchrun, ``replay`` ends the process itself (exit
        0) once every rank is done.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # argparse exits after --help and on bad arguments
        return int(stop.code or 0)
    try:
        if args.command == "stages":
            _print_stages(args.run, args.restriction)
            return 0
        if args.command == "replay":
            with _ranks_joined():
                output = _replay(args)
                if output is not None:  # rank 0 reports, under torchrun
                    print(output)
            return 0
        if args.components:
            output = _plot_components(args.runs, args.output, args.loss)
        else:
            output = _plot(args.runs, args.output, args.loss, args.restrictions)
    except (FileNotFoundError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(output)
    return 0


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EXAMPLES, formatter_class=raw
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plot = commands.add_parser(
        "plot",
        help="draw the LLC and loss curves of runs to a PNG",
        description=PLOT_DESCRIPTION,
        epilog=PLOT_EXAMPLES,
        formatter_class=raw,
    )
    plot.add_argument("runs", type=Path, nargs="+", metavar="RUN", help=RUN_HELP)
    plot.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="PNG",
        help=f"the PNG to write (default: {CURVE_PNG}, or {COMPONENTS_PNG} with"
        " --components, in the folder the runs share)",
    )
    plot.add_argument(
        "--loss", metavar="KEY", help="the loss key to draw (default: the trainer's loss)"
    )
    drawn = plot.add_mutually_exclusive_group()
    drawn.add_argument(
        "--restriction",
        action="append",
        default=[],
        dest="restrictions",
        metavar="NAME",
        help="also draw the restricted LLC NAME, beside the full LLC (repeat for several)",
    )
    drawn.add_argument(
        "--components",
        action="store_true",
        help="draw all of one run's restricted LLCs as a heatmap above their curves",
    )
    stages = commands.add_parser(
        "stages",
        help="print the stages of a run's LLC curve",
        description=STAGES_DESCRIPTION,
        epilog=STAGES_EXAMPLES,
        formatter_class=raw,
    )
    stages.add_argument("run", type=Path, metavar="RUN", help=RUN_HELP)
    stages.add_argument(
        "--restriction", metavar="NAME", help="a restricted LLC's name (default: the full LLC)"
    )
    replay = commands.add_parser(
        "replay",
        help="estimate the LLC at every saved checkpoint of a run",
        description=REPLAY_DESCRIPTION,
        epilog=REPLAY_EXAMPLES,
        formatter_class=raw,
    )
    replay.add_argument(
        "source",
        type=Path,
        metavar="CHECKPOINTS",
        help="the folder of checkpoints, or with --revisions a Hub repository's id",
    )
    replay.add_argument(
        "--revisions",
        nargs="+",
        metavar="REVISION",
        help="the Hub revisions to estimate at, each naming its step (step1000 ...)",
    )
    replay.add_argument(
        "--cache-dir", type=Path, metavar="FOLDER", help="--revisions: the Hub cache to use"
    )
    replay.add_argument(
        "--setup", required=True, metavar="MODULE:FUNCTION", help="returns the data and options"
    )
    replay.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help=f"a .csv or .json to write (default: {REPLAY_CSV} in CHECKPOINTS, or here)",
    )
    replay.add_argument(
        "--model-class",
        metavar="MODULE:CLASS",
        help="the model's class: a LightningModule (needed for Lightning checkpoints), or a"
        " transformers class other than config.json's",
    )
    replay.add_argument("--device", help="where chains run (default: cpu)")
    replay.add_argument("--wandb-run", metavar="ID", help="the W&B run to log into")
    replay.add_argument("--wandb-project", metavar="NAME", help="that run's W&B project")
    replay.add_argument(
        "--split",
        choices=SPLITS,
        default="checkpoints",
        help="under torchrun: share the checkpoints (default) or each estimate's chains",
    )
    replay.add_argument(
        "--watch", action="store_true", help="follow a folder that training is writing"
    )
    replay.add_argument(
        "--until", type=int, metavar="STEP", help="--watch: the last step to wait for"
    )
    replay.add_argument(
        "--idle",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="--watch: stop after this long without a new checkpoint (default: 600)",
    )
    replay.add_argument(
        "--poll",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="--watch: seconds between looks at the folder (default: 10)",
    )
    return parser


def _replay(args: argparse.Namespace) -> Path | None:
    """Run ``llc-callbacks replay``; the path of the curve it drew.

    Under torchrun only rank 0 draws; the other ranks return ``None``.
    """
    setup = _entry_point(args.setup, "--setup")()
    if not isinstance(setup, Mapping) or "data" not in setup:
        raise ValueError(f"--setup {args.setup} must return a dict with 'data', got {setup!r}")
    unknown = sorted(set(setup) - set(SETUP_KEYS))
    if unknown:
        raise ValueError(
            f"--setup {args.setup} returned unknown keys {unknown}; accepted: {list(SETUP_KEYS)}"
        )
    model_class = _entry_point(args.model_class, "--model-class") if args.model_class else None
    source, present, folder = _replay_source(args)
    if "load" not in setup and model_class is None and any(c.kind == LIGHTNING for c in present):
        raise ValueError(NEEDS_MODULE_CLASS)
    load = setup.get("load") or partial(_load, model_class)
    loss_fn = setup.get("loss_fn") or _loss
    output = args.output or folder / REPLAY_CSV
    options = {
        "output": output,
        "wandb_run": args.wandb_run,
        "wandb_project": args.wandb_project,
        "device": _join_ranks(args.device),
        "split": args.split,
    }
    monitor = setup.get("monitor")
    if args.watch:
        watch(
            args.source,
            load,
            loss_fn,
            setup["data"],
            monitor,
            until=args.until,
            idle=args.idle,
            poll=args.poll,
            **options,
        )
    else:
        replay(source, load, loss_fn, setup["data"], monitor, **options)
    if rank_and_world()[0] != 0:
        return None
    curve = output.with_suffix(".png")
    plot_llc_curve(*_curves(output, None, None, []), path=curve)
    print(output)
    return curve


def _join_ranks(device: str | None) -> str | None:
    """Under torchrun, join its process group (gloo, or NCCL with CUDA); the device to use.

    Each rank takes its local GPU when ``--device`` names CUDA without an index, or none.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    cuda = torch.cuda.is_available() and (device is None or device == "cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else device


@contextmanager
def _ranks_joined() -> Iterator[None]:
    """Leave the process group ``_join_ranks`` joined, if it did, once every rank is done.

    The process then ends at once: tearing gloo's threads down at the interpreter's exit
    sometimes aborts ("terminate called without an active exception") after a successful
    run, with or without ``destroy_process_group``; everything is written by then.
    """
    joined = torch.distributed.is_initialized()
    yield
    if torch.distributed.is_initialized() and not joined:
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _replay_source(args: argparse.Namespace) -> tuple[Path | list[Checkpoint], list, Path]:
    """What to replay, the checkpoints there now, and the folder of the default output."""
    if args.revisions:
        if args.watch:
            raise ValueError("--watch follows a folder; --revisions names Hub revisions")
        found = hub_checkpoints(args.source.as_posix(), args.revisions, args.cache_dir)
        return found, found, Path.cwd()
    source = args.source
    present = [] if args.watch and not source.exists() else find_checkpoints(source)
    return source, present, source if source.is_dir() else source.parent


def _load(model_class: type | None, checkpoint: Checkpoint) -> nn.Module:
    """A checkpoint's model, as its kind loads by default."""
    if checkpoint.kind == LIGHTNING:
        from llc_callbacks.integrations.lightning import checkpoint_loader

        if model_class is None:
            raise ValueError(NEEDS_MODULE_CLASS)
        return checkpoint_loader(model_class)(checkpoint)
    from llc_callbacks.integrations.huggingface import pretrained_loader

    return pretrained_loader(model_class)(checkpoint)


def _loss(model: nn.Module, batch: Any) -> Tensor:
    """The default loss: a LightningModule's ``training_step``, or ``model(**batch).loss``."""
    lightning = sys.modules.get("lightning.pytorch")
    if lightning is not None and isinstance(model, lightning.LightningModule):
        from llc_callbacks.integrations.lightning import module_loss

        return module_loss(model, batch)
    from llc_callbacks.integrations.huggingface import model_loss

    return model_loss(model, batch)


def _entry_point(text: str, option: str) -> Any:
    """The object ``pkg.module:name`` or ``path/to/file.py:name`` names."""
    where, _, name = text.rpartition(":")
    if not where or not name:
        raise ValueError(f"{option} must be MODULE:NAME or FILE.py:NAME, got {text!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"{option}: {where} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise ValueError(f"{option}: cannot import {where} ({error})") from None
    if not hasattr(module, name):
        raise ValueError(f"{option}: {where} has no {name!r}")
    return getattr(module, name)


def _llc_rows(run: Path) -> tuple[list[dict[str, float]], str]:
    """A run's logged rows and the prefix of its LLC metrics."""
    rows = read_rows(run)
    prefix = llc_prefix(rows)
    if prefix is None:
        raise ValueError(f"{run} has no LLC metrics (no key ending in 'llc/mean')")
    return rows, prefix


def _check_restrictions(
    run: Path, rows: list[dict[str, float]], prefix: str, names: Sequence[str]
) -> None:
    """Raise ``ValueError`` naming those of ``names`` that the run logged no LLC of."""
    known = component_names(rows, prefix)
    unknown = [name for name in names if name not in known]
    if unknown:
        logged = f"it logged {', '.join(known)}" if known else "it logged none"
        missing = ", ".join(f"'{name}'" for name in unknown)
        raise ValueError(f"{run} logged no restricted LLC {missing} ({logged})")


def _print_stages(run: Path, restriction: str | None) -> None:
    """Print the stages of a run's LLC, a table per history (``histories``)."""
    rows, prefix = _llc_rows(run)
    if restriction is not None:
        _check_restrictions(run, rows, prefix, [restriction])
    mean, loss = metric_key(prefix, "mean", restriction), loss_key(rows)
    parts = histories(rows, mean, metric_key(prefix, "restart"))
    for index, part in enumerate(parts):
        if len(parts) > 1:
            steps = [int(row["step"]) for row in part if mean in row]
            if index:
                print()
            restarted = f" (restart {index})" if index else ""
            print(
                f"history {index + 1} of {len(parts)}{restarted}: steps {steps[0]} to {steps[-1]}"
            )
        print(f"{'start':>8} {'end':>8} {'kind':8} {'LLC change':>11} {'loss change':>12} flagged")
        for stage in detect_stages(part, prefix, restriction, loss=loss):
            change = "-" if stage.loss_change is None else f"{stage.loss_change:+.1%}"
            flagged = "yes" if stage.flagged else ""
            print(
                f"{stage.start:8d} {stage.end:8d} {stage.kind:8} {stage.change:+11.4g}"
                f" {change:>12} {flagged}"
            )


def _folder(run: Path) -> Path:
    """The folder that names a run (the W&B run, Lightning's version_N, the output_dir)."""
    return run if run.is_dir() else run.parent


def _plot(
    runs: list[Path], output: Path | None, loss: str | None, restrictions: Sequence[str]
) -> Path:
    folders = [_folder(run) for run in runs]
    labels = [folder.name for folder in folders] if len(runs) > 1 else [None]
    names = list(dict.fromkeys(restrictions))
    curves = [
        curve
        for run, label in zip(runs, labels, strict=True)
        for curve in _curves(run, loss, label, names)
    ]
    output = output or Path(os.path.commonpath(folders)) / CURVE_PNG
    plot_llc_curve(*curves, path=output)
    return output


def _curves(run: Path, loss: str | None, label: str | None, names: list[str]) -> list[Curves]:
    """A run's full LLC (with its loss and curvature), then its restricted LLCs ``names``.

    Each LLC's histories (``histories``) are curves of their own, the first history first.
    """
    rows, prefix = _llc_rows(run)
    _check_restrictions(run, rows, prefix, names)
    loss = loss or loss_key(rows)
    if loss is not None and not any(loss in row for row in rows):
        raise ValueError(f"{run} has no '{loss}' values")
    curves = []
    for name in (None, *names):
        mean, healthy = metric_key(prefix, "mean", name), health_key(rows, prefix, name)
        for index, part in enumerate(histories(rows, mean, metric_key(prefix, "restart"))):
            llc = series(part, mean, healthy)
            spread = series(part, metric_key(prefix, "std", name))
            if name is None:
                keys = {
                    quantity: metric_key(prefix, f"{CURVATURE}/{quantity}")
                    for quantity in CURVATURES
                }
                curvature = {
                    quantity: series(part, key)
                    for quantity, key in keys.items()
                    if any(key in row for row in part)
                }
                title = label or ("full LLC" if names else None)
                losses = series(part, loss) if loss else None
                curves.append(Curves(llc, spread, losses, title, curvature, restart=index))
            else:
                title = name if label is None else f"{label}: {name}"
                curves.append(Curves(llc, spread, label=title, restart=index))
    return curves


def _plot_components(runs: list[Path], output: Path | None, loss: str | None) -> Path:
    if len(runs) > 1:
        raise ValueError(f"--components draws one run, got {len(runs)}")
    if loss is not None:
        raise ValueError("--components draws no loss (it flags stages by the logged init_loss)")
    (run,) = runs
    rows, prefix = _llc_rows(run)
    if not component_names(rows, prefix):
        raise ValueError(
            f"{run} logged no restricted LLC ({prefix}/<name>/mean) for --components to draw"
        )
    output = output or _folder(run) / COMPONENTS_PNG
    parts = histories(rows, metric_key(prefix, "mean"), metric_key(prefix, "restart"))
    if len(parts) > 1:
        last = f"the last of its {len(parts)} LLC histories (restart {len(parts) - 1})"
        print(f"{run}: drawing {last}", file=sys.stderr)
    plot_components(parts[-1], prefix, output)
    return output


if __name__ == "__main__":
    sys.exit(main())
