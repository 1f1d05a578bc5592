"""LLC estimates at saved checkpoints, in step order: a run replayed after training, or beside it.

``find_checkpoints`` lists what a folder holds: a transformers ``output_dir``
(``checkpoint-<step>/``), Lightning checkpoints (``*.ckpt``, the step from ``step=<step>`` in
the name or from the file), or a folder laid out as the Hub's cache lays out a repository's
revisions (``refs/<revision>`` naming ``snapshots/<commit>/``, revisions such as Pythia's
``step1000``; in the cache itself, ``models--<org>--<name>``, they load with
``from_pretrained(repo, revision=...)`` as from the Hub). ``hub_checkpoints`` names a
repository's revisions on the Hub.

``replay`` estimates at each checkpoint through an ``LLCMonitor``, so with the callback's
config, seed, loss and data it gives the numbers the callback logged at those steps (warm
starts included, when the checkpoints are the steps it estimated at), and writes them where
the run's other metrics are. ``watch`` does the same for a folder that training is still
writing: the way to estimate without slowing training.

Loading a checkpoint is the caller's ``load(checkpoint) -> nn.Module``;
``llc_callbacks.integrations.huggingface.pretrained_loader`` and
``llc_callbacks.integrations.lightning.checkpoint_loader`` load transformers and Lightning
checkpoints (model weights only, no optimizer states).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from llc_callbacks.attribution import warn
from llc_callbacks.distributed import rank_and_world
from llc_callbacks.forked import LossFn
from llc_callbacks.history import read_rows
from llc_callbacks.keys import metric_key
from llc_callbacks.measures import Figure, Table
from llc_callbacks.measures.routing import render, route
from llc_callbacks.monitor import LLCMonitor, changed_settings
from llc_callbacks.validation import check_choice, check_float, check_int

TRANSFORMERS, LIGHTNING = "transformers", "lightning"
# transformers' checkpoint folders; a revision's name (Pythia's "step1000"); Lightning's file
# names ("epoch=0-step=100.ckpt").
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")
REVISION_STEP = re.compile(r"(?:step|checkpoint-?)(\d+)")
LIGHTNING_STEP = re.compile(r"(?:^|-)step=(\d+)")
# A repository's folder in the Hub's cache.
HUB_CACHE_FOLDER = re.compile(r"models--(.+)")
# What a transformers checkpoint folder holds once the Trainer has written it whole: the
# trainer state comes after the weights.
COMPLETE_MARKER = "trainer_state.json"
SPLITS = ("checkpoints", "chains")
# A watched checkpoint that fails to load this many times is reported and skipped.
LOAD_TRIES = 3
# Per kind: the namespace and step key its trainer's W&B logger uses (Lightning's
# WandbLogger, transformers' WandbCallback).
WANDB_AXES = {LIGHTNING: ("", "trainer/global_step"), TRANSFORMERS: ("train/", "train/global_step")}
# One estimate of a replay: the checkpoint's kind, its row, its tables and rendered figures.
Made = tuple[str, dict[str, float], dict[str, Table | np.ndarray]]
Loader = Callable[["Checkpoint"], nn.Module]


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint.

    Attributes:
        step: The optimizer steps completed when it was saved.
        path: Its folder (transformers, a revision) or file (Lightning).
        kind: ``"transformers"`` (a folder ``from_pretrained`` reads) or ``"lightning"``.
        revision: The revision's name, for a Hub repository's; ``None`` otherwise.
        repo: The Hub repository's id (``"EleutherAI/pythia-70m"``), loaded with
            ``from_pretrained(repo, revision=revision, cache_dir=cache_dir)``; ``None``: the
            checkpoint is ``path``.
        cache_dir: The Hub cache that holds ``repo`` (``None``: the default cache).
    """

    step: int
    path: Path
    kind: str
    revision: str | None = None
    repo: str | None = None
    cache_dir: Path | None = None


def find_checkpoints(source: str | Path) -> list[Checkpoint]:
    """The checkpoints a folder holds, in step order (one per step).

    A transformers checkpoint counts once its ``trainer_state.json`` is written (the Trainer
    writes it last); a Lightning file whose name holds no step is read for its
    ``global_step`` (a file that cannot be read is left out, with a warning).

    Args:
        source: A transformers ``output_dir``, a folder of Lightning ``.ckpt`` files (searched
            recursively), one ``.ckpt`` file, or a Hub-like folder (``refs/`` and
            ``snapshots/``).

    Returns:
        The checkpoints, sorted by step.

    Raises:
        FileNotFoundError: If ``source`` does not exist or holds no checkpoint.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_file():
        found = _lightning([source])
    elif (source / "refs").is_dir() and (source / "snapshots").is_dir():
        found = _revisions(source)
    else:
        found = _transformers(source) or _lightning(sorted(source.rglob("*.ckpt")))
    if not found:
        raise FileNotFoundError(
            f"{source} holds no checkpoint: no checkpoint-<step>/ folder with"
            f" {COMPLETE_MARKER} (transformers), no .ckpt file (Lightning), no refs/ and"
            " snapshots/ (a Hub-like folder of revisions)"
        )
    by_step: dict[int, Checkpoint] = {}
    for checkpoint in sorted(found, key=lambda c: (c.step, str(c.path))):
        by_step.setdefault(checkpoint.step, checkpoint)
    return list(by_step.values())


def hub_checkpoints(
    repo: str, revisions: Sequence[str], cache_dir: str | Path | None = None
) -> list[Checkpoint]:
    """A Hub repository's revisions as checkpoints, in step order (Pythia's ``step1000``, ...).

    Args:
        repo: The repository's id.
        revisions: Its revisions to estimate at, each naming its step (``step<N>``,
            ``checkpoint-<N>``).
        cache_dir: Where ``from_pretrained`` caches them (``None``: the default cache).

    Returns:
        One checkpoint per revision, which ``pretrained_loader`` loads from the Hub.

    Raises:
        ValueError: If a revision's name holds no step.
    """
    found = []
    for revision in revisions:
        match = REVISION_STEP.fullmatch(revision)
        if match is None:
            raise ValueError(
                f"revisions must name their step (step<N> or checkpoint-<N>), got {revision!r}"
            )
        where = Path(cache_dir) if cache_dir is not None else None
        found.append(
            Checkpoint(
                int(match.group(1)), Path(f"{repo}@{revision}"), TRANSFORMERS, revision, repo, where
            )
        )
    return sorted(found, key=lambda c: c.step)


def replay(
    checkpoints: str | Path | Sequence[Checkpoint],
    load: Loader,
    loss_fn: LossFn,
    data: Iterable[Any],
    monitor: LLCMonitor | None = None,
    *,
    output: str | Path | None = None,
    wandb_run: str | None = None,
    wandb_project: str | None = None,
    device: torch.device | str | None = None,
    split: Literal["checkpoints", "chains"] = "checkpoints",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Estimate the LLC at every checkpoint, in step order.

    Each estimate is ``monitor``'s, as in training (the estimate at step ``s`` is seeded by
    the config's seed and ``s``; with ``warm_start`` it starts where the previous
    checkpoint's ended), so with the callback's config, options, loss and data it equals
    what the callback logged at that step, to float rounding, as long as the checkpoints
    replayed are the steps the callback estimated at (a warm start follows the estimates
    before it). The monitor's schedule is not used: every checkpoint is estimated. A
    checkpoint that cannot be loaded is reported with a warning and skipped; a gap stays a
    gap.

    With ``output``, each estimate is appended as it is made, and the monitor's state is
    kept beside it (``<output>.state.json``): a replay started again over the same output
    repeats no estimate. Its next estimate starts cold, with the saved step sizes, as after
    a resumed training run.

    Under ``torchrun`` (a process group with more than one rank), ``split="checkpoints"``
    gives each rank a contiguous share of the checkpoints (warm starts within it, cold at
    its first) and rank 0 gathers and writes the results in step order;
    ``split="chains"`` runs every checkpoint on every rank with the chains split among
    them, as in training (for one large model).

    Args:
        checkpoints: A folder (see ``find_checkpoints``) or the checkpoints themselves.
        load: ``load(checkpoint) -> nn.Module``, the model at that checkpoint's weights.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: Re-iterable of batches; every estimate iterates it afresh.
        monitor: What each estimate is (config, restrictions, curvature, observables,
            prefix, ...), as the callback was given it, making snapshot estimates (a
            streaming monitor is refused); ``None``: ``LLCMonitor(stream=False)``. Its
            ``distributed`` is set from ``split``.
        output: A ``.csv`` (columns ``step`` and the metrics, as Lightning's ``metrics.csv``,
            which ``llc-callbacks plot`` reads) or ``.json`` (``{"log_history": rows}``, as
            transformers' ``trainer_state.json``) to write; ``None``: write nothing.
        wandb_run: The id of the W&B run to log into (resumed, in its project); the keys and
            the step axis are those the trainer's logger used (``trainer/global_step`` for
            Lightning checkpoints, ``train/...`` and ``train/global_step`` for transformers).
        wandb_project: The W&B project of ``wandb_run``.
        device: Where chains run; defaults to where ``load`` put the model.
        split: How ranks share the work under ``torchrun``.
        progress: Show a progress bar over the checkpoints (rank 0).

    Returns:
        One row per estimate, this replay's and an earlier one's in ``output``, in step
        order: ``step`` and every metric.

    Raises:
        ValueError: If ``output`` is neither ``.csv`` nor ``.json``, holds estimates made with
            other settings (config or schedule) than ``monitor``'s, or ``split`` is unknown.
        FileNotFoundError: If ``checkpoints`` is a folder holding none.
    """
    replayer = _Replayer(
        load, loss_fn, data, monitor or LLCMonitor(stream=False), output, device, split, progress
    )
    found = find_checkpoints(checkpoints) if isinstance(checkpoints, (str, Path)) else checkpoints
    with replayer.logging_to(wandb_run, wandb_project):
        replayer.run(list(found))
    return replayer.rows


def watch(
    folder: str | Path,
    load: Loader,
    loss_fn: LossFn,
    data: Iterable[Any],
    monitor: LLCMonitor | None = None,
    *,
    until: int | None = None,
    idle: float = 600.0,
    poll: float = 10.0,
    output: str | Path | None = None,
    wandb_run: str | None = None,
    wandb_project: str | None = None,
    device: torch.device | str | None = None,
    split: Literal["checkpoints", "chains"] = "checkpoints",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Follow a folder that training writes, estimating each checkpoint as it appears.

    A checkpoint is taken once complete: a transformers folder once its
    ``trainer_state.json`` is there, a Lightning file once its size has held for one poll;
    one that fails to load is tried again at the next poll, and reported and skipped after
    ``LOAD_TRIES`` tries. The watch stops once it has estimated the last step of training
    (a transformers checkpoint at its ``max_steps``, or ``until``), or when no new
    checkpoint has appeared for ``idle`` seconds. Started again over the same ``output``,
    it repeats nothing.

    Args:
        folder: What training writes checkpoints into (see ``find_checkpoints``).
        load: As in ``replay``.
        loss_fn: As in ``replay``.
        data: As in ``replay``.
        monitor: As in ``replay``.
        until: The last step to wait for; ``None``: read from transformers checkpoints.
        idle: Stop after this many seconds without a new checkpoint.
        poll: Seconds between looks at the folder.
        output: As in ``replay``.
        wandb_run: As in ``replay``.
        wandb_project: As in ``replay``.
        device: As in ``replay``.
        split: As in ``replay``.
        progress: As in ``replay``.

    Returns:
        The rows, as ``replay`` returns them.

    Raises:
        ValueError: If ``until``, ``idle`` or ``poll`` is out of range, or as ``replay``
            raises; under ``torchrun`` with ``split="checkpoints"`` (ranks would see the
            folder at different times: watch from one process, or with ``split="chains"``).
    """
    check_int("until", until, minimum=0, optional=True)
    check_float("idle", idle, positive=True)
    check_float("poll", poll, positive=True)
    if rank_and_world()[1] > 1 and split == "checkpoints":
        raise ValueError(
            "watch under torchrun needs split='chains' (every rank estimates every checkpoint"
            " as it appears); watch from one process to estimate checkpoints one by one"
        )
    replayer = _Replayer(
        load, loss_fn, data, monitor or LLCMonitor(stream=False), output, device, split, progress
    )
    sizes: dict[Path, int] = {}
    tries: dict[int, int] = {}
    last_new = time.monotonic()
    with replayer.logging_to(wandb_run, wandb_project):
        while True:
            ready = [c for c in _listed(folder) if _complete(c, sizes)]
            before = len(replayer.done)
            for checkpoint in replayer.run(ready, report=False):
                tries[checkpoint.step] = tries.get(checkpoint.step, 0) + 1
                if tries[checkpoint.step] >= LOAD_TRIES:
                    replayer.skip(checkpoint, f"it failed to load {LOAD_TRIES} times")
            if len(replayer.done) > before:
                last_new = time.monotonic()
            end = until if until is not None else _max_steps(ready)
            finished = end is not None and any(s >= end for s in replayer.done | replayer.skipped)
            if finished or time.monotonic() - last_new > idle:
                break
            time.sleep(poll)
    return replayer.rows


class _Replayer:
    """One monitor's estimates over checkpoints, and where they are written."""

    def __init__(
        self,
        load: Loader,
        loss_fn: LossFn,
        data: Iterable[Any],
        monitor: LLCMonitor,
        output: str | Path | None,
        device: torch.device | str | None,
        split: str,
        progress: bool,
    ) -> None:
        check_choice("split", split, SPLITS)
        if not isinstance(monitor, LLCMonitor):
            raise ValueError(f"monitor must be an LLCMonitor, got {type(monitor).__name__}")
        if monitor.stream is not None:
            raise ValueError(
                "monitor must make snapshot estimates: replay estimates every checkpoint on its"
                " own; pass LLCMonitor(stream=False, ...)"
            )
        self.rank, self.world = rank_and_world()
        self.split = split
        self.monitor = monitor
        monitor.distributed = split == "chains" and self.world > 1
        self.load, self.loss_fn, self.data, self.device = load, loss_fn, data, device
        self.progress = progress
        self.sink: _WandbSink | None = None
        self.output = _Output(Path(output)) if output is not None else None
        self.rows: list[dict[str, float]] = []
        if self.output is not None:
            self.rows = self.output.read()
            if (state := self.output.state()) is not None:
                changed = changed_settings(state.get("settings", {}), monitor.settings)
                if changed:
                    raise ValueError(
                        f"output {self.output.path} holds estimates made with other settings"
                        f" ({changed}): pass those settings to continue it, or another output"
                    )
                self.monitor.load_state_dict(state)
        self.started = False
        self.skipped: set[int] = set()

    @property
    def done(self) -> set[int]:
        """The steps estimated so far, by this replay or an earlier one in the output."""
        return {int(row["step"]) for row in self.rows}

    @contextmanager
    def logging_to(self, run_id: str | None, project: str | None) -> Iterator[None]:
        """Log the rows recorded meanwhile into the W&B run ``run_id`` too, if given."""
        if run_id is None:
            yield
            return
        self.sink = _WandbSink(run_id, project, self.monitor.prefix)
        try:
            yield
        finally:
            self.sink.finish()
            self.sink = None

    def run(self, checkpoints: list[Checkpoint], *, report: bool = True) -> list[Checkpoint]:
        """Estimate at each checkpoint not done yet; return those that failed to load.

        With ``report``, one that fails to load is reported and skipped for good.
        """
        todo = [c for c in checkpoints if c.step not in self.done | self.skipped]
        mine = self._share(todo)
        failed, made = [], []
        disable = not self.progress or self.rank > 0
        bar = tqdm(mine, desc="llc replay", unit="checkpoint", disable=disable)
        for checkpoint in bar:
            try:
                model = self.load(checkpoint)
                if self.device is not None:
                    model.to(self.device)
            except Exception as error:  # a truncated or unreadable file: the others go on
                if report:
                    self.skip(checkpoint, f"{type(error).__name__}: {error}")
                failed.append(checkpoint)
                continue
            if not self.started:
                self.monitor.start(model, self.loss_fn, self.data, device=self.device)
                self.started = True
            self.monitor.estimate(
                checkpoint.step, model, self.loss_fn, self.data, device=self.device
            )
            made.append((checkpoint.kind, dict(self.monitor.history[-1]), self._rendered()))
            if self.split == "chains" or self.world == 1:
                self._record(made)
                made = []
            del model
        if self.split == "checkpoints" and self.world > 1:
            self._gather(made)
        return failed

    def skip(self, checkpoint: Checkpoint, why: str) -> None:
        """Report a checkpoint that cannot be estimated, and leave it out from now on."""
        self.skipped.add(checkpoint.step)
        if self.rank == 0:
            warn(
                f"llc_callbacks: checkpoint {checkpoint.path} (step {checkpoint.step}) is"
                f" skipped: {why}",
                None,
            )

    def _share(self, todo: list[Checkpoint]) -> list[Checkpoint]:
        """This rank's checkpoints: all of them, or a contiguous share under torchrun."""
        if self.split == "chains" or self.world == 1:
            return todo
        per_rank = math.ceil(len(todo) / self.world)
        return todo[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _rendered(self) -> dict[str, Table | np.ndarray]:
        """The last estimate's tables and figures, the figures as pixels, for W&B (if any).

        Rendered on the rank that made them, so that ``_gather`` sends plain values.
        """
        if self.sink is None:
            return {}
        rendered: dict[str, Table | np.ndarray] = {}
        for name, item in self.monitor.produced.items():
            pixels = render(self.monitor, name, item.build) if isinstance(item, Figure) else item
            if pixels is not None:
                rendered[name] = pixels
        return rendered

    def _gather(self, made: list[Made]) -> None:
        """Every rank's rows to every rank, recorded in step order (written by rank 0)."""
        gathered: list[list[Made]] = [[] for _ in range(self.world)]
        dist.all_gather_object(gathered, made)
        self._record([item for part in gathered for item in part])

    def _record(self, made: list[Made]) -> None:
        """Keep new rows; rank 0 writes them, and logs them with their tables and figures."""
        made = sorted(made, key=lambda item: item[1]["step"])
        self.rows = sorted([*self.rows, *(row for _, row, _ in made)], key=lambda r: r["step"])
        if self.rank != 0:
            return
        if self.output is not None:
            self.output.write(self.rows, self.monitor.state_dict())
        if self.sink is not None:
            for kind, row, produced in made:
                step = int(row["step"])
                logged = self.monitor.logged({k: v for k, v in row.items() if k != "step"})
                self.sink.log(logged, step, kind)
                tables = [partial(self.sink.log_table, kind=kind)]
                images = [partial(self.sink.log_image, kind=kind)]
                route(self.monitor, produced, tables, images, step)


class _Output:
    """A CSV or JSON file of rows, and the monitor's state beside it."""

    def __init__(self, path: Path) -> None:
        if path.suffix not in (".csv", ".json"):
            raise ValueError(f"output must be a .csv or .json file, got {str(path)!r}")
        self.path = path
        self.state_path = path.with_name(path.name + ".state.json")

    def read(self) -> list[dict[str, float]]:
        return read_rows(self.path) if self.path.is_file() else []

    def state(self) -> dict[str, Any] | None:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else None

    def write(self, rows: list[dict[str, float]], state: dict[str, Any]) -> None:
        """Write every row (whole, then renamed into place) and the monitor's state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        if self.path.suffix == ".json":
            partial.write_text(json.dumps({"log_history": rows}, indent=1))
        else:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            with open(partial, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        partial.replace(self.path)
        self.state_path.write_text(json.dumps(state))


class _WandbSink:
    """The training run's W&B run, resumed by its id: rows on the trainer's step axis.

    The run is resumed at the first row, whose checkpoint says which trainer wrote it.
    """

    def __init__(self, run_id: str, project: str | None, prefix: str) -> None:
        self.run_id, self.project, self.prefix = run_id, project, prefix
        self.run: Any = None

    def log(self, metrics: dict[str, Any], step: int, kind: str) -> None:
        """Log one estimate's metrics at ``step`` as ``kind``'s logger logged the run's."""
        namespace, step_key = WANDB_AXES[kind]
        if self.run is None:
            import wandb  # only when asked for

            self.run = wandb.init(id=self.run_id, project=self.project, resume="allow")
            self.run.define_metric(step_key)
            self.run.define_metric(f"{namespace}{self.prefix}/*", step_metric=step_key)
        self.run.log({**{f"{namespace}{k}": v for k, v in metrics.items()}, step_key: step})

    def log_table(
        self, name: str, columns: list[str], rows: list[list[Any]], step: int, *, kind: str
    ) -> None:
        """Log a measure's table as ``{prefix}/{name}`` at ``step``."""
        import wandb

        table = wandb.Table(columns=columns, data=rows)
        self.log({metric_key(self.prefix, name): table}, step, kind)

    def log_image(self, name: str, pixels: np.ndarray, step: int, *, kind: str) -> None:
        """Log a measure's figure as the image ``{prefix}/{name}`` at ``step``."""
        import wandb

        self.log({metric_key(self.prefix, name): wandb.Image(pixels)}, step, kind)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _listed(folder: str | Path) -> list[Checkpoint]:
    try:
        return find_checkpoints(folder)
    except FileNotFoundError:
        return []  # nothing written yet


def _complete(checkpoint: Checkpoint, sizes: dict[Path, int]) -> bool:
    """Whether a watched checkpoint is whole: a Lightning file's size held for one poll."""
    if checkpoint.kind != LIGHTNING:
        return True  # listed only once its trainer state is written
    size = checkpoint.path.stat().st_size
    held = sizes.get(checkpoint.path) == size
    sizes[checkpoint.path] = size
    return held


def _max_steps(checkpoints: list[Checkpoint]) -> int | None:
    """The run's ``max_steps``, from the latest transformers checkpoint's trainer state."""
    for checkpoint in reversed(checkpoints):
        state = checkpoint.path / COMPLETE_MARKER
        if checkpoint.kind == TRANSFORMERS and state.is_file():
            try:
                return json.loads(state.read_text()).get("max_steps")
            except json.JSONDecodeError:  # still being written: read at the next poll
                return None
    return None


def _transformers(folder: Path) -> list[Checkpoint]:
    return [
        Checkpoint(int(match.group(1)), path, TRANSFORMERS)
        for path in sorted(folder.iterdir())
        if path.is_dir()
        and (match := CHECKPOINT_FOLDER.fullmatch(path.name))
        and (path / COMPLETE_MARKER).is_file()
    ]


def _revisions(folder: Path) -> list[Checkpoint]:
    """The revisions of a Hub-like folder; of the repository, in a Hub cache's folder."""
    cached = HUB_CACHE_FOLDER.fullmatch(folder.name)
    repo = cached.group(1).replace("--", "/") if cached else None
    found = []
    for ref in sorted((folder / "refs").rglob("*")):
        name = ref.relative_to(folder / "refs").as_posix()
        match = REVISION_STEP.fullmatch(ref.name)
        snapshot = folder / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        if match and snapshot is not None and snapshot.is_dir():
            cache_dir = folder.parent if repo else None
            step = int(match.group(1))
            found.append(Checkpoint(step, snapshot, TRANSFORMERS, name, repo, cache_dir))
    return found


def _lightning(files: list[Path]) -> list[Checkpoint]:
    found = []
    for path in files:
        match = LIGHTNING_STEP.search(path.stem)
        step = int(match.group(1)) if match else _saved_step(path)
        if step is not None:
            found.append(Checkpoint(step, path, LIGHTNING))
    return found


def _saved_step(path: Path) -> int | None:
    """A Lightning checkpoint's ``global_step``, read without loading its tensors."""
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return int(saved["global_step"])
    except Exception as error:
        warn(f"llc_callbacks: {path} is left out: its step could not be read ({error})", None)
        return None
