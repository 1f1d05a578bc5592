"""Essential dynamics: a model's outputs on a fixed probe set over training, and their PCA.

Hoogland et al. 2024 (arXiv:2402.02364) and Carroll et al. 2025 follow development as the path
of the model's outputs on fixed inputs: ``EssentialDynamics`` records that vector at scheduled
steps (by default each probe example's loss), ``result`` projects the trajectory onto its
principal components, and ``turning_points`` finds where the path in the leading components
changes direction, which tends to fall at the LLC's stage boundaries
(``llc_callbacks.stages``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llc_callbacks.data import batch_size, example, to_device
from llc_callbacks.estimator import model_device
from llc_callbacks.forked import LossFn
from llc_callbacks.isolation import isolated
from llc_callbacks.schedule import Schedule
from llc_callbacks.validation import check_float, check_int

OutputsFn = Callable[[nn.Module, Any], Tensor]

# Largest stored vector: 4096 float32 values, 16 KiB a record.
MAX_DIMS = 4096
# A point is a turn when it strays from the chord by more than this fraction of the path's
# extent. A corner between two equal legs that turn by an angle a lies tan(a / 2) / 2 of the
# extent from their chord, so 0.1 keeps turns of more than about 23 degrees, and jitter well
# below a tenth of the path's size is never taken for one.
TURN_TOLERANCE = 0.1


@dataclass(frozen=True, eq=False)
class DynamicsResult:
    """The principal components of a trajectory of outputs.

    Attributes:
        steps: The step of each record.
        explained_variance: Per component, its share of the centred trajectory's variance.
        projections: Shape ``(T, k)``: each record's coordinates on the ``k`` leading
            components, each signed so that its largest-magnitude coordinate is positive.
        turning_points: The steps at which the path in the leading components turns (see
            ``turning_points``).
    """

    steps: list[int]
    explained_variance: np.ndarray
    projections: np.ndarray
    turning_points: list[int]


class EssentialDynamics:
    """Record a model's outputs on a fixed probe set at scheduled steps, for their PCA.

    Each record is one float32 vector: every probe batch's ``outputs_fn(model, batch)``,
    flattened, or by default each probe example's loss (``loss_fn`` on a batch of that one
    example: one forward pass per example, so give ``outputs_fn`` for large probes). It runs
    in eval mode without gradients under ``llc_callbacks.isolation.isolated``, so training is
    left exactly as it was. Vectors longer than ``max_dims`` go through a fixed count sketch
    (each coordinate added, with a random sign, to one of ``max_dims`` buckets), which
    preserves inner products and distances in expectation, so the PCA is approximately that
    of the full outputs. ``T`` records take ``T x min(D, max_dims)`` float32 values for
    outputs of ``D`` values (and the sketch one bucket and sign per output).

    Give at most one of ``every_n_steps``, ``steps`` and ``log_spaced`` (see
    ``llc_callbacks.schedule.Schedule``); adapters fill in ``total_steps`` with
    ``set_total_steps``.

    Args:
        probe: A re-iterable of batches (a list, or a DataLoader) that gives the same
            batches in the same order on every pass: no shuffling nor random augmentation.
            Global RNGs are seeded with ``seed`` while it is read.
        outputs_fn: The outputs on one batch, ``outputs_fn(model, batch) -> Tensor``, such
            as the logits; by default the per-example losses.
        loss_fn: The loss of a batch, for the default outputs; or pass it to ``record``.
        every_n_steps: Record after every ``n``-th optimizer step.
        steps: Record after exactly these steps (0 is before training).
        log_spaced: Record about this many times at log-spaced steps up to ``total_steps``.
        total_steps: The length of training, for ``log_spaced``.
        at_start: Also record before the first step.
        at_end: Also record after the last step, if it was not already due.
        max_dims: The most values stored per record, at least 2.
        seed: Seeds the count sketch and the global RNGs while recording.

    Raises:
        ValueError: If an argument is out of range or ``probe`` is an iterator.
    """

    def __init__(
        self,
        probe: Iterable[Any],
        *,
        outputs_fn: OutputsFn | None = None,
        loss_fn: LossFn | None = None,
        every_n_steps: int | None = None,
        steps: Sequence[int] | None = None,
        log_spaced: int | None = None,
        total_steps: int | None = None,
        at_start: bool = False,
        at_end: bool = False,
        max_dims: int = MAX_DIMS,
        seed: int = 0,
    ) -> None:
        if not isinstance(probe, Iterable) or isinstance(probe, Iterator):
            raise ValueError(
                "probe must be a re-iterable of batches such as a list or a DataLoader,"
                f" got {type(probe).__name__}"
            )
        for name, fn in (("outputs_fn", outputs_fn), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
        check_int("max_dims", max_dims, minimum=2)
        check_int("seed", seed, minimum=0)
        self.probe = probe
        self.outputs_fn = outputs_fn
        self.loss_fn = loss_fn
        self.schedule = Schedule(
            every_n_steps=every_n_steps,
            steps=steps,
            log_spaced=log_spaced,
            total_steps=total_steps,
            at_start=at_start,
            at_end=at_end,
        )
        self.max_dims = max_dims
        self.seed = seed
        self._given_total_steps = total_steps
        self.restart()

    def restart(self) -> None:
        """Forget every record and the run's length (unless given at construction): a new run."""
        self.schedule = dataclasses.replace(self.schedule, total_steps=self._given_total_steps)
        self.steps: list[int] = []
        self.vectors: list[np.ndarray] = []
        self._last_step = -1
        self._dims: int | None = None
        self._sketch: tuple[Tensor, Tensor] | None = None

    def set_total_steps(self, total_steps: int) -> None:
        """Tell a ``log_spaced`` schedule how long training is, unless it was given already."""
        if self.schedule.total_steps is None:
            self.schedule = dataclasses.replace(self.schedule, total_steps=total_steps)

    def is_due(self, step: int, *, final: bool = False) -> bool:
        """Whether a record is due after ``step`` optimizer steps (never twice for a step).

        Args:
            step: Optimizer steps completed.
            final: Whether training has just ended (for ``at_end``).
        """
        return step > self._last_step and self.schedule.is_due(step, final=final)

    def maybe_record(
        self,
        step: int,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        final: bool = False,
        device: torch.device | str | None = None,
    ) -> bool:
        """Record the outputs if the schedule says so; call after every optimizer step.

        Args:
            step: Optimizer steps completed.
            model: The live model.
            loss_fn: The loss, for the default outputs, if not given at construction.
            final: Whether training has just ended (for ``at_end``).
            device: Where the probe batches go; by default the model's parameters' device.

        Returns:
            Whether a record was taken.
        """
        if not self.is_due(step, final=final):
            return False
        self.record(step, model, loss_fn, device=device)
        return True

    def record(
        self,
        step: int,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> np.ndarray:
        """Record the model's outputs on the probe now, whatever the schedule.

        Args:
            step: Optimizer steps completed, greater than that of the last record.
            model: The live model.
            loss_fn: The loss, for the default outputs, if not given at construction.
            device: Where the probe batches go; by default the model's parameters' device.

        Returns:
            The stored vector.

        Raises:
            ValueError: If neither ``outputs_fn`` nor a ``loss_fn`` is known, the step is not
                after the last record's, the probe is empty, or the number of outputs
                changed since the first record.
        """
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        if self.outputs_fn is None and loss_fn is None:
            raise ValueError(
                "the default outputs are per-example losses: pass loss_fn (here or at"
                " construction), or outputs_fn at construction"
            )
        if isinstance(step, bool) or not isinstance(step, int) or step <= self._last_step:
            bound = f"> {self._last_step}, the last record's" if self._last_step >= 0 else ">= 0"
            raise ValueError(f"step must be an integer {bound}, got {step!r}")
        device = torch.device(device) if device is not None else model_device(model)
        with isolated(model, self.seed), torch.no_grad():
            parts = [
                self._outputs(model, to_device(batch, device), loss_fn).detach().float().cpu()
                for batch in self.probe
            ]
        if not parts:
            raise ValueError("probe yielded no batches")
        vector = self._sketched(torch.cat([part.reshape(-1) for part in parts])).numpy()
        self.steps.append(step)
        self.vectors.append(vector)
        self._last_step = step
        return vector

    def result(self, components: int = 3, *, tolerance: float = TURN_TOLERANCE) -> DynamicsResult:
        """The principal components of the records so far (see ``trajectory_pca``).

        Args:
            components: Components to keep, at least 1.
            tolerance: For ``turning_points``, a fraction of the path's extent.

        Raises:
            ValueError: With fewer than 3 records.
        """
        if len(self.vectors) < 3:
            raise ValueError(
                f"essential dynamics needs at least 3 records, got {len(self.vectors)}"
            )
        return trajectory_pca(self.steps, np.stack(self.vectors), components, tolerance=tolerance)

    def state_dict(self) -> dict[str, Any]:
        """The records and schedule position for a checkpoint, as plain lists (JSON-ready)."""
        return {
            "steps": list(self.steps),
            "vectors": [vector.tolist() for vector in self.vectors],
            "last_step": self._last_step,
            "total_steps": self.schedule.total_steps,
            "dims": self._dims,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: no record is repeated, none is lost.

        Args:
            state: From ``state_dict``; vectors as lists, numpy arrays or tensors.
        """
        self.steps = [int(step) for step in state["steps"]]
        self.vectors = [np.asarray(vector, dtype=np.float32) for vector in state["vectors"]]
        self._last_step = int(state["last_step"])
        self._dims = None if state.get("dims") is None else int(state["dims"])
        self._sketch = None
        if state.get("total_steps") is not None:
            self.schedule = dataclasses.replace(self.schedule, total_steps=state["total_steps"])

    def save(self, path: str | Path, components: int = 3) -> None:
        """Write the steps and vectors to an ``.npz`` file, with the PCA once there are 3.

        The arrays are ``steps``, ``vectors`` (``T x dims``) and, from 3 records on,
        ``explained_variance``, ``projections`` and ``turning_points`` (steps) of ``result``.

        Args:
            path: The file; numpy adds ``.npz`` to a name without it.
            components: Principal components to keep.
        """
        arrays = {
            "steps": np.asarray(self.steps, dtype=np.int64),
            "vectors": np.stack(self.vectors) if self.vectors else np.empty((0, 0), np.float32),
        }
        if len(self.vectors) >= 3:
            result = self.result(components)
            arrays["explained_variance"] = result.explained_variance
            arrays["projections"] = result.projections
            arrays["turning_points"] = np.asarray(result.turning_points, dtype=np.int64)
        np.savez(path, **arrays)

    def _outputs(self, model: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
        """One batch's outputs: ``outputs_fn``, or the loss of each example."""
        if self.outputs_fn is not None:
            return self.outputs_fn(model, batch)
        losses = [loss_fn(model, example(batch, i)) for i in range(batch_size(batch))]
        return torch.stack([loss.reshape(()) for loss in losses])

    def _sketched(self, outputs: Tensor) -> Tensor:
        """The outputs, count-sketched down to ``max_dims`` values when longer.

        Raises:
            ValueError: If the number of outputs differs from that of earlier records.
        """
        dims = outputs.numel()
        if self._dims is not None and dims != self._dims:
            raise ValueError(
                f"the probe gave {dims} outputs, but {self._dims} at earlier records: the probe"
                " and outputs_fn must give the same number of values at every record"
            )
        self._dims = dims
        if dims <= self.max_dims:
            return outputs
        if self._sketch is None:
            generator = torch.Generator().manual_seed(self.seed)
            buckets = torch.randint(0, self.max_dims, (dims,), generator=generator)
            signs = torch.randint(0, 2, (dims,), generator=generator).float().mul_(2).sub_(1)
            self._sketch = buckets, signs
        buckets, signs = self._sketch
        return torch.zeros(self.max_dims).index_add_(0, buckets, outputs * signs)


def trajectory_pca(
    steps: Sequence[int],
    trajectory: np.ndarray,
    components: int = 3,
    *,
    tolerance: float = TURN_TOLERANCE,
) -> DynamicsResult:
    """The principal components of a trajectory, and the turning points of its path.

    The PCA is the SVD of the centred ``T x D`` trajectory. Turning points are sought in all
    ``k`` components kept, not only those explaining most of the variance: a leg in a
    direction of its own turns the path yet may explain a few percent of it, while jitter in
    the minor components stays below the tolerance, a fraction of the whole path's extent.

    Args:
        steps: The step of each record.
        trajectory: Shape ``(T, D)``, a record per row, ``T >= 3``.
        components: Components to keep, at least 1: ``k = min(components, T - 1, D)``.
        tolerance: For ``turning_points``.

    Returns:
        The result; for a constant trajectory the variances and projections are all 0.

    Raises:
        ValueError: If the shapes do not match or there are fewer than 3 records.
    """
    check_int("components", components, minimum=1)
    matrix = np.asarray(trajectory, dtype=np.float64)
    if matrix.ndim != 2 or len(matrix) < 3 or len(matrix) != len(steps):
        raise ValueError(
            "trajectory must have shape (T, D) with T >= 3 records, one per step; got shape"
            f" {matrix.shape} for {len(steps)} steps"
        )
    centred = matrix - matrix.mean(axis=0)
    left, singular, _ = np.linalg.svd(centred, full_matrices=False)
    k = min(components, len(matrix) - 1, matrix.shape[1])
    variances = singular**2
    total = variances.sum()
    explained = variances[:k] / total if total > 0 else np.zeros(k)
    projections = left[:, :k] * singular[:k]
    largest = projections[np.argmax(np.abs(projections), axis=0), np.arange(k)]
    projections *= np.where(largest < 0, -1.0, 1.0)
    turns = turning_points(projections, tolerance)
    return DynamicsResult(
        steps=[int(step) for step in steps],
        explained_variance=explained,
        projections=projections,
        turning_points=[int(steps[i]) for i in turns],
    )


def turning_points(path: np.ndarray, tolerance: float = TURN_TOLERANCE) -> list[int]:
    """Where a path turns: the interior vertices of its Ramer-Douglas-Peucker simplification.

    Starting from the chord between the first and last points, the point farthest from the
    chord (as a segment, so that a path doubling back on itself turns too) becomes a vertex
    if it lies more than ``tolerance`` times the path's extent (the largest distance between
    two of its points) away, and both halves are simplified the same way.

    Args:
        path: Shape ``(T, k)``, the points in order.
        tolerance: The threshold as a fraction of the extent, ``>= 0``.

    Returns:
        The indices of the turning points, in order; none for fewer than 3 points or a path
        that stays put.

    Raises:
        ValueError: If ``path`` is not two-dimensional.
    """
    check_float("tolerance", tolerance, positive=False)
    points = np.asarray(path, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"path must have shape (T, k), got {points.shape}")
    if len(points) < 3:
        return []
    extent = max(float(np.linalg.norm(points - point, axis=1).max()) for point in points)
    if extent == 0:
        return []
    threshold = tolerance * extent
    vertices, spans = [], [(0, len(points) - 1)]
    while spans:
        first, last = spans.pop()
        if last - first < 2:
            continue
        distances = _distances(points[first + 1 : last], points[first], points[last])
        farthest = int(np.argmax(distances))
        if distances[farthest] > threshold:
            vertex = first + 1 + farthest
            vertices.append(vertex)
            spans += [(first, vertex), (vertex, last)]
    return sorted(vertices)


def _distances(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Each point's distance from the segment between ``start`` and ``end``."""
    chord = end - start
    length = float(chord @ chord)
    along = np.zeros(len(points)) if length == 0 else (points - start) @ chord / length
    nearest = start + np.clip(along, 0.0, 1.0)[:, None] * chord
    return np.linalg.norm(points - nearest, axis=1)
