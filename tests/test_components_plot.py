"""The components heatmap (issue: per-head LLCs, Wang et al. 2024 arXiv:2410.02984): natural
order of the components, and their grouping by the shape of their curves."""

import numpy as np
import pytest
from models import FIGURE_SIZE, png_size

from llc_callbacks.plotting import cluster_curves, component_names, plot_components
from llc_callbacks.stages import detect_stages

STEPS = 20


def history(curves: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """Rows every 10 steps holding each named restricted LLC's mean."""
    return [
        {"step": 10 * index, **{f"llc/{name}/mean": float(c[index]) for name, c in curves.items()}}
        for index in range(STEPS)
    ]


def heads(seed: int = 0) -> dict[str, np.ndarray]:
    """Six heads: three rise then fall (at scales 1, 10 and 100), three rise steadily (at scales
    50, 2 and 0.3), each on a level of 5 scales with noise of 2% of a scale."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, STEPS)
    bump, ramp = np.sin(np.pi * x), x
    shapes = {
        "layer10.head0": (bump, 1.0),
        "layer2.head1": (ramp, 50.0),
        "layer2.head0": (bump, 10.0),
        "layer0.head3": (ramp, 2.0),
        "layer1.head2": (bump, 100.0),
        "layer1.head10": (ramp, 0.3),
    }
    return {
        name: scale * (5 + shape + 0.02 * rng.normal(size=STEPS))
        for name, (shape, scale) in shapes.items()
    }


BUMPS = {"layer10.head0", "layer2.head0", "layer1.head2"}
RAMPS = {"layer2.head1", "layer0.head3", "layer1.head10"}


def tick_labels(axes) -> list[str]:
    return [label.get_text() for label in axes.get_yticklabels()]


def test_components_come_in_natural_order():
    rows = history(
        {
            name: np.arange(STEPS, dtype=float)
            for name in ("layer10.head0", "layer2.head1", "layer2.head0")
        }
    )
    expected = ["layer2.head0", "layer2.head1", "layer10.head0"]
    assert component_names(rows) == expected
    assert tick_labels(plot_components(rows).axes[0]) == expected
    legend = plot_components(rows).axes[1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == expected


def test_natural_order_compares_every_run_of_digits_as_a_number():
    names = ["layer10.head0", "layer2.mlp", "embed", "layer2.head10", "layer2.head2", "layer0"]
    rows = history({name: np.ones(STEPS) for name in names})
    assert component_names(rows) == [
        "embed",
        "layer0",
        "layer2.head2",
        "layer2.head10",
        "layer2.mlp",
        "layer10.head0",
    ]


def test_clustering_groups_the_curves_by_shape_whatever_their_scale():
    found = cluster_curves(history(heads()), clusters=2)
    assert {name for name, number in found.items() if number == 1} == RAMPS  # has layer0.head3
    assert {name for name, number in found.items() if number == 2} == BUMPS
    # By cluster, then in natural order: the order of the heatmap rows.
    order = [
        "layer0.head3",
        "layer1.head10",
        "layer2.head1",
        "layer1.head2",
        "layer2.head0",
        "layer10.head0",
    ]
    assert list(found) == order
    assert tick_labels(plot_components(history(heads()), clusters=2).axes[0]) == order


@pytest.mark.parametrize("seed", range(5))
def test_clustering_is_deterministic_and_recovers_the_groups_under_other_noise(seed):
    rows = history(heads(seed))
    found = cluster_curves(rows, clusters=2)
    assert found == cluster_curves(rows, clusters=2)
    groups = {frozenset(n for n in found if found[n] == number) for number in (1, 2)}
    assert groups == {frozenset(BUMPS), frozenset(RAMPS)}


def test_one_cluster_and_one_per_component():
    rows = history(heads())
    assert set(cluster_curves(rows, clusters=1).values()) == {1}
    each = cluster_curves(rows, clusters=6)
    assert sorted(each.values()) == [1, 2, 3, 4, 5, 6]
    assert list(each) == component_names(rows)  # each its own cluster: natural order


def test_the_clustered_heatmap_keeps_each_components_stage_ticks_on_its_row():
    curves = heads()
    x = np.arange(STEPS)
    # layer1.head5 turns (rises 7 estimates, falls 7, then stays flat); in natural order
    # it is row 2, by cluster it moves to the bottom.
    turning = np.where(x <= 7, x, np.where(x <= 14, 14 - x, 0)).astype(float)
    curves["layer1.head5"] = 100 * (turning + 0.05 * np.random.default_rng(3).normal(size=STEPS))
    rows = history(curves)
    heat = plot_components(rows, clusters=3).axes[0]
    order = tick_labels(heat)
    assert order[-1] == "layer1.head5" and component_names(rows)[2] == "layer1.head5"
    expected = [
        (stage.end, (row, row + 1))
        for row, name in enumerate(order)
        for stage in detect_stages(rows, "llc", name)[:-1]
    ]
    assert any(y == (6, 7) for _, y in expected)  # the turning head has boundaries
    ticks = [(line.get_xdata()[0], tuple(line.get_ydata())) for line in heat.lines]
    assert ticks == expected


def test_the_curves_are_coloured_and_listed_by_cluster():
    figure = plot_components(history(heads()), clusters=2)
    lines = figure.axes[1]
    legend = [text.get_text() for text in lines.get_legend().get_texts()]
    assert legend == ["cluster 1 (3)", "cluster 2 (3)"]
    colours = [line.get_color() for line in lines.lines]
    assert len(set(colours[:3])) == 1 and len(set(colours[3:])) == 1
    assert colours[0] != colours[3]


def test_the_clustered_figure_has_the_usual_size(tmp_path):
    rows = history(heads())
    plot_components(rows, path=tmp_path / "plain.png")
    plot_components(rows, clusters=2, path=tmp_path / "c.png")
    assert png_size(tmp_path / "c.png") == png_size(tmp_path / "plain.png") == FIGURE_SIZE


@pytest.mark.parametrize("clusters", [0, -1, 7, 2.0, "2", True, None])
def test_bad_cluster_counts_are_rejected(clusters):
    with pytest.raises(ValueError, match="clusters"):
        cluster_curves(history(heads()), clusters=clusters)
    if clusters is not None:
        with pytest.raises(ValueError, match="clusters"):
            plot_components(history(heads()), clusters=clusters)


def test_clustering_needs_a_step_where_every_component_has_an_llc():
    rows = history(heads())
    for index, row in enumerate(rows):
        del row["llc/layer0.head3/mean" if index % 2 else "llc/layer2.head0/mean"]
    with pytest.raises(ValueError, match="every component"):
        cluster_curves(rows)
