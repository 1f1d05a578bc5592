"""Essential dynamics: outputs on a probe set over training, their PCA and turning points, on
paths whose corners are known."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import FIGURE_SIZE, png_size
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks.dynamics import EssentialDynamics, trajectory_pca, turning_points
from llc_callbacks.plotting import plot_essential_dynamics

# A path of 31 records, 5 steps apart, in three straight legs that turn at steps 50 and 100.
CORNERS = [50, 100]


class Latent(nn.Module):
    """Outputs ``x @ W(theta)``: a fixed random linear map of a 3-D parameter ``theta``."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3))
        self.register_buffer(
            "basis", torch.randn(3, 6 * 30, generator=torch.Generator().manual_seed(1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.theta @ self.basis).view(6, 30)


def latent_probe():
    """Two batches of 5 inputs: 2 x 5 x 30 = 300 outputs."""
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(5, 6, generator=generator) for _ in range(2)]


def outputs(model, batch):
    return model(batch)


def legs(record: int) -> np.ndarray:
    """Along x for 10 records, then along y, then along z."""
    return np.clip(np.array([record, record - 10, record - 20]) / 10, 0, 1)


def follow(dynamics, path, noise=0.01, seed=0):
    """Set theta to each point of ``path`` (plus noise) at steps 0, 5, ... and record."""
    model = Latent()
    rng = np.random.default_rng(seed)
    for record in range(31):
        point = path(record) + rng.normal(0, noise, 3)
        with torch.no_grad():
            model.theta.copy_(torch.as_tensor(point, dtype=torch.float32))
        dynamics.maybe_record(5 * record, model)


@pytest.mark.parametrize("max_dims", [4096, 64])
@pytest.mark.parametrize("seed", range(3))
def test_turning_points_are_the_corners_of_a_three_leg_path(max_dims, seed):
    dynamics = EssentialDynamics(
        latent_probe(),
        outputs_fn=outputs,
        every_n_steps=5,
        at_start=True,
        max_dims=max_dims,
        seed=seed,
    )
    follow(dynamics, legs, seed=seed)
    assert dynamics.steps == list(range(0, 155, 5))
    assert all(v.shape == (min(300, max_dims),) and v.dtype == np.float32 for v in dynamics.vectors)
    result = dynamics.result()
    assert result.turning_points == CORNERS
    assert result.projections.shape == (31, 3)
    assert result.explained_variance.sum() == pytest.approx(1, abs=0.01)
    assert np.all(np.diff(result.explained_variance) <= 0)


@pytest.mark.parametrize("max_dims", [4096, 64])
def test_a_straight_path_has_no_turning_point(max_dims):
    dynamics = EssentialDynamics(
        latent_probe(), outputs_fn=outputs, every_n_steps=5, at_start=True, max_dims=max_dims
    )
    follow(dynamics, lambda record: np.array([1.0, 2.0, -1.0]) * record / 30)
    result = dynamics.result()
    assert result.turning_points == []
    assert result.explained_variance[0] > 0.99


def test_turning_points_of_paths_in_the_plane():
    # Distances are from the chord as a segment: a path that doubles back turns.
    out_and_back = np.concatenate([np.arange(11), np.arange(9, 2, -1)])[:, None].astype(float)
    assert turning_points(out_and_back) == [10]
    corner = np.array([[x, 0.0] for x in range(10)] + [[9.0, y] for y in range(1, 10)])
    assert turning_points(corner) == [9]
    # A turn of 10 degrees stays under the default tolerance, not under a smaller one.
    bend = np.array([[x, 0.0] for x in range(10)] + [[9 + x, x * np.tan(0.17)] for x in range(10)])
    assert turning_points(bend) == [] and turning_points(bend, tolerance=0.01) == [9]
    assert turning_points(np.zeros((5, 2))) == [] and turning_points(np.zeros((2, 2))) == []


def test_pca_of_a_known_trajectory():
    steps = [0, 10, 20, 30]
    trajectory = np.array([[0.0, 0, 0], [2, 0, 0], [4, 1, 0], [6, 1, 0]])
    result = trajectory_pca(steps, trajectory, components=5)
    # k = min(components, T - 1, D) = 3; the third component has no variance.
    assert result.projections.shape == (4, 3) and result.steps == steps
    centred = trajectory - trajectory.mean(axis=0)
    assert np.abs(result.projections).sum(axis=0)[2] < 1e-9
    assert result.explained_variance[0] > 0.9 and result.explained_variance[2] < 1e-12
    # Projections keep the distances between records.
    distances = np.linalg.norm(centred[:, None] - centred[None], axis=2)
    found = np.linalg.norm(result.projections[:, None] - result.projections[None], axis=2)
    np.testing.assert_allclose(found, distances, atol=1e-9)
    # Each component is signed so that its largest-magnitude coordinate is positive.
    assert result.projections[np.abs(result.projections[:, 0]).argmax(), 0] > 0


def test_the_count_sketch_sends_each_output_to_one_fixed_bucket_with_a_sign():
    model = nn.Module()
    model.register_buffer("values", torch.zeros(300))
    dynamics = EssentialDynamics(
        [torch.zeros(1)], outputs_fn=lambda model, batch: model.values, max_dims=64
    )
    sketched = []
    for step, index in enumerate([0, 100, 299, 100]):
        model.values.zero_()
        model.values[index] = 2.0
        vector = dynamics.record(step, model)
        (bucket,) = np.flatnonzero(vector)
        assert abs(vector[bucket]) == 2.0
        sketched.append((bucket, vector[bucket]))
    assert sketched[1] == sketched[3]


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))


def mse(model, batch):
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


def regression_probe():
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(4, 3, generator=generator), torch.randn(4, 2, generator=generator))
        for _ in range(2)
    ]


@pytest.mark.parametrize("at_construction", [True, False])
def test_the_default_outputs_are_the_per_example_losses(at_construction):
    torch.manual_seed(0)
    model, batches = Regression(), regression_probe()
    inputs, targets = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    # A list of batches, or a DataLoader (of lists [x, y]) over the same examples in order.
    probe = batches if at_construction else DataLoader(TensorDataset(inputs, targets), 4)
    dynamics = EssentialDynamics(probe, loss_fn=mse if at_construction else None)
    vector = dynamics.record(0, model, None if at_construction else mse)
    with torch.no_grad():
        expected = (model.linear(inputs) - targets).square().mean(dim=1)
    np.testing.assert_allclose(vector, expected.numpy(), rtol=1e-6)
    assert dynamics.steps == [0] and dynamics.vectors[0] is vector


def test_recording_leaves_training_untouched():
    torch.manual_seed(0)
    model, probe = Regression(), regression_probe()
    model.train()
    mse(model, probe[0]).backward()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    seen = []

    def watched(model, batch):
        seen.append((model.training, torch.is_grad_enabled()))
        return model(batch[0])

    EssentialDynamics(probe, outputs_fn=watched).record(0, model)
    assert seen == [(False, False)] * 2
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters())
    assert all(module.training for module in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("max_dims", [4096, 64])
def test_a_resumed_run_continues_without_repeating_or_losing_records(max_dims, tmp_path):
    def run(dynamics, steps):
        model = Latent()
        for step in steps:
            with torch.no_grad():
                model.theta.copy_(torch.as_tensor(legs(step), dtype=torch.float32))
            dynamics.maybe_record(step, model, final=step == 30)

    def fresh():
        return EssentialDynamics(
            latent_probe(), outputs_fn=outputs, every_n_steps=4, at_end=True, max_dims=max_dims
        )

    whole = fresh()
    run(whole, range(31))
    first = fresh()
    run(first, range(13))
    resumed = fresh()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run(resumed, range(12, 31))  # the checkpoint's step comes again
    assert resumed.steps == whole.steps == [4, 8, 12, 16, 20, 24, 28, 30]
    for ours, theirs in zip(resumed.vectors, whole.vectors, strict=True):
        np.testing.assert_array_equal(ours, theirs)

    resumed.save(tmp_path / "dynamics.npz")
    saved, result = np.load(tmp_path / "dynamics.npz"), resumed.result()
    assert saved["steps"].tolist() == whole.steps
    np.testing.assert_array_equal(saved["vectors"], np.stack(whole.vectors))
    np.testing.assert_allclose(saved["projections"], result.projections)
    np.testing.assert_allclose(saved["explained_variance"], result.explained_variance)
    assert saved["turning_points"].tolist() == result.turning_points


def test_log_spaced_schedule_takes_total_steps_later():
    dynamics = EssentialDynamics(latent_probe(), outputs_fn=outputs, log_spaced=4)
    dynamics.set_total_steps(1000)
    model = Latent()
    recorded = [step for step in range(1001) if dynamics.maybe_record(step, model)]
    assert recorded == dynamics.steps == [1, 10, 100, 1000]


def test_a_restart_forgets_the_records_and_the_length_of_the_run_before():
    dynamics = EssentialDynamics(latent_probe(), outputs_fn=outputs, log_spaced=4)
    dynamics.set_total_steps(1000)
    model = Latent()
    for step in range(1001):
        dynamics.maybe_record(step, model)
    dynamics.restart()
    assert dynamics.steps == dynamics.vectors == []
    dynamics.set_total_steps(100)  # the next run's length, not the last run's
    recorded = [step for step in range(101) if dynamics.maybe_record(step, model)]
    assert recorded == dynamics.steps == [1, 5, 22, 100]


def test_bad_arguments_give_clear_errors():
    probe = latent_probe()
    with pytest.raises(ValueError, match="max_dims must be an integer >= 2"):
        EssentialDynamics(probe, outputs_fn=outputs, max_dims=1)
    with pytest.raises(ValueError, match="probe must be a re-iterable"):
        EssentialDynamics(iter(probe), outputs_fn=outputs)
    with pytest.raises(ValueError, match="every_n_steps and steps"):
        EssentialDynamics(probe, outputs_fn=outputs, every_n_steps=2, steps=[1])
    with pytest.raises(ValueError, match=r"pass loss_fn .* or outputs_fn"):
        EssentialDynamics(probe).record(0, Latent())
    dynamics = EssentialDynamics(probe, outputs_fn=outputs)
    dynamics.record(3, Latent())
    with pytest.raises(ValueError, match=r"step must be an integer > 3"):
        dynamics.record(3, Latent())
    dynamics.record(4, Latent())
    with pytest.raises(ValueError, match="at least 3 records, got 2"):
        dynamics.result()
    calls = []

    def shrinking(model, batch):
        """Each call drops one more example of the batch: 30 outputs fewer."""
        calls.append(batch)
        return model(batch[: 6 - len(calls)])

    changing = EssentialDynamics(probe, outputs_fn=shrinking)
    changing.record(0, Latent())  # 5 + 4 examples
    with pytest.raises(ValueError, match="gave 150 outputs, but 270 at earlier records"):
        changing.record(1, Latent())  # 3 + 2 examples
    with pytest.raises(ValueError, match="probe yielded no batches"):
        EssentialDynamics([], outputs_fn=outputs).record(0, Latent())
    with pytest.raises(ValueError, match="components must be an integer >= 1"):
        trajectory_pca([0, 1, 2], np.zeros((3, 2)), components=0)


def test_plot_marks_turning_points_and_stage_boundaries(tmp_path):
    dynamics = EssentialDynamics(latent_probe(), outputs_fn=outputs, every_n_steps=5, at_start=True)
    follow(dynamics, legs)
    result = dynamics.result()
    figure = plot_essential_dynamics(result, boundaries=[52, 99, 10_000], path=tmp_path / "ed.png")
    assert png_size(tmp_path / "ed.png") == FIGURE_SIZE
    first, second = figure.axes[:2]
    assert first.get_xlabel() == f"PC1 ({result.explained_variance[0]:.0%})"
    assert second.get_ylabel().startswith("PC3 (")
    assert [text.get_text() for text in first.get_legend().get_texts()] == [
        "turning point",
        "LLC stage boundary",
    ]
    # The boundaries inside the run are crossed at the records nearest them (steps 50, 100).
    crossed = first.collections[-1].get_offsets()
    np.testing.assert_allclose(crossed, result.projections[[10, 20], :2])
    assert figure.axes[-1].get_ylabel() == "step"
    two = trajectory_pca(result.steps, result.projections[:, :2], components=2)
    assert len(plot_essential_dynamics(two).axes) == 2  # one panel and its colorbar
