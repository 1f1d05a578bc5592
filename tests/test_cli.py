"""The `llc-callbacks` console script on small runs written by hand: help, restrictions, errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from models import FIGURE_SIZE, png_size

from llc_callbacks import cli
from llc_callbacks.cli import main

STEPS = [3 * (i + 1) for i in range(12)]
# The full LLC rises then levels off; layer0 rises all along, layer1 rises then falls.
CURVES = {
    None: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0],
    "layer0": [0.5 + 0.25 * i for i in range(12)],
    "layer1": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5],
}
LOSS = [2.0 * 0.9**i for i in range(12)]


def rows(prefix: str, restrictions, spread) -> list[dict[str, float]]:
    """A row of estimates per step: each curve's mean and, where ``spread(name)``, its std."""
    found = []
    for index, step in enumerate(STEPS):
        row = {"step": step}
        for name in (None, *restrictions):
            key = prefix if name is None else f"{prefix}/{name}"
            row[f"{key}/mean"] = CURVES[name][index]
            if spread(name):
                row[f"{key}/std"] = 0.05 + 0.01 * index
        found.append(row)
    return found


def lightning_run(folder: Path, restrictions=("layer0", "layer1"), spread=bool) -> Path:
    """A Lightning-style metrics.csv in ``folder``; ``spread(name)``: whether it has a std."""
    folder.mkdir(parents=True, exist_ok=True)
    estimates = rows("llc", restrictions, lambda name: name is None or spread(name))
    for row, loss in zip(estimates, LOSS, strict=True):
        row["train_loss"] = loss
    path = folder / "metrics.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(estimates[0]))
        writer.writeheader()
        writer.writerows(estimates)
    return path


def transformers_run(folder: Path) -> Path:
    """A transformers-style trainer_state.json: estimates and losses in separate log entries."""
    folder.mkdir(parents=True, exist_ok=True)
    losses = [{"step": step, "loss": loss} for step, loss in zip(STEPS, LOSS, strict=True)]
    history = [*rows("llc", ("layer0", "layer1"), lambda name: True), *losses]
    path = folder / "trainer_state.json"
    path.write_text(json.dumps({"log_history": history, "global_step": STEPS[-1]}))
    return path


@pytest.fixture(params=["metrics.csv", "trainer_state.json"])
def run(request, tmp_path) -> Path:
    """A run with the restricted LLCs layer0 and layer1, in each format."""
    if request.param == "metrics.csv":
        return lightning_run(tmp_path / "version_0")
    return transformers_run(tmp_path / "output")


def plot(capsys, *args: str) -> Path:
    """Run `plot`, check that it succeeded and drew a figure; the PNG it says it wrote."""
    assert main(["plot", *args]) == 0, capsys.readouterr().err
    output = Path(capsys.readouterr().out.splitlines()[-1])
    assert output.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    assert png_size(output) == FIGURE_SIZE
    return output


def assert_names_the_unknown_restriction(error: str, run: Path, known: str) -> None:
    assert error.startswith("llc-callbacks: error:"), error
    assert f"{run} logged no restricted LLC 'layer9'" in error
    assert f"(it logged {known})" in error


def stage_rows(output: str) -> list[list[str]]:
    """The rows of a stages table, split into columns, without its header."""
    header, *table = output.splitlines()
    assert header.split()[:3] == ["start", "end", "kind"]
    return [line.split() for line in table]


def test_stages_of_an_unknown_restriction_exit_2_listing_the_known_ones(run, capsys):
    assert main(["stages", str(run), "--restriction", "layer9"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no empty table
    assert_names_the_unknown_restriction(captured.err, run, "layer0, layer1")


def test_stages_of_a_run_without_restrictions_says_it_has_none(tmp_path, capsys):
    run = lightning_run(tmp_path, restrictions=())
    assert main(["stages", str(run), "--restriction", "layer9"]) == 2
    assert_names_the_unknown_restriction(capsys.readouterr().err, run, "none")


def test_stages_of_a_restriction_are_those_of_its_own_curve(run, capsys):
    tables = {}
    for name in (None, "layer0", "layer1"):
        assert main(["stages", str(run), *(["--restriction", name] if name else [])]) == 0
        tables[name] = [row[2] for row in stage_rows(capsys.readouterr().out)]
    assert tables == {
        None: ["rising", "flat"],
        "layer0": ["rising"],
        "layer1": ["rising", "falling"],
    }


@pytest.mark.parametrize(
    "command, description, examples",
    [
        ([], cli.DESCRIPTION, cli.EXAMPLES),
        (["plot"], cli.PLOT_DESCRIPTION, cli.PLOT_EXAMPLES),
        (["stages"], cli.STAGES_DESCRIPTION, cli.STAGES_EXAMPLES),
    ],
)
def test_help_describes_each_command_with_examples(command, description, examples, capsys):
    assert main([*command, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"usage: llc-callbacks {' '.join(command)}".rstrip())
    assert "metrics.csv" in description and "trainer_state.json" in description
    # Both as written, line for line: the formatter keeps the description's and examples' lines.
    for paragraph in (description, examples):
        start = lines.index(paragraph.splitlines()[0])
        assert lines[start : start + len(paragraph.splitlines())] == paragraph.splitlines()
    example_lines = [line for line in examples.splitlines() if line.startswith("  llc-callbacks ")]
    assert len(example_lines) >= 2
    if command:
        assert all(line.split()[1] == command[0] for line in example_lines)


def test_plot_draws_the_restricted_llcs_asked_for(run, tmp_path, capsys):
    full = plot(capsys, str(run), "-o", str(tmp_path / "full.png"))
    one = plot(capsys, str(run), "--restriction", "layer0", "-o", str(tmp_path / "one.png"))
    both = ["--restriction", "layer0", "--restriction", "layer1"]
    two = plot(capsys, str(run), *both, "-o", str(tmp_path / "two.png"))
    other = plot(capsys, str(run), "--restriction", "layer1", "-o", str(tmp_path / "other.png"))
    figures = [path.read_bytes() for path in (full, one, two, other)]
    assert len(set(figures)) == len(figures)  # each restriction adds its own curve


def test_plot_draws_a_restricted_llcs_spread_where_logged(tmp_path, capsys):
    figures = []
    for spread in (True, False):
        run = lightning_run(tmp_path / str(spread), spread=lambda name, spread=spread: spread)
        figures.append(plot(capsys, str(run), "--restriction", "layer0").read_bytes())
    assert figures[0] != figures[1]


def test_plot_of_several_runs_with_a_restriction(tmp_path, capsys):
    runs = [lightning_run(tmp_path / "a"), transformers_run(tmp_path / "b")]
    output = plot(capsys, *map(str, runs), "--restriction", "layer1")
    assert output == tmp_path / cli.CURVE_PNG  # in the folder the runs share


def test_plot_of_an_unknown_restriction_exits_2_listing_the_known_ones(run, tmp_path, capsys):
    output = tmp_path / "never.png"
    args = ["plot", str(run), "--restriction", "layer0", "--restriction", "layer9"]
    assert main([*args, "-o", str(output)]) == 2
    assert_names_the_unknown_restriction(capsys.readouterr().err, run, "layer0, layer1")
    assert not output.exists()


def test_plot_components_draws_the_heatmap_beside_the_run(run, capsys):
    components = plot(capsys, str(run.parent), "--components")
    assert components == run.parent / "llc_components.png"
    curve = plot(capsys, str(run.parent))
    assert curve == run.parent / "llc_curve.png"
    assert components.read_bytes() != curve.read_bytes()


def test_plot_components_of_a_run_without_restrictions_exits_2(tmp_path, capsys):
    run = lightning_run(tmp_path, restrictions=())
    assert main(["plot", str(run), "--components"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("llc-callbacks: error:")
    assert f"{run} logged no restricted LLC (llc/<name>/mean)" in error
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "train_loss"], "--components draws no loss"),
        (["--restriction", "layer0"], "--restriction: not allowed with argument --components"),
    ],
)
def test_plot_components_refuses_options_it_cannot_honour(run, extra, message, capsys):
    assert main(["plot", str(run), "--components", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not list(run.parent.glob("*.png"))


def test_plot_components_of_several_runs_exits_2(tmp_path, capsys):
    runs = [lightning_run(tmp_path / "a"), lightning_run(tmp_path / "b")]
    assert main(["plot", *map(str, runs), "--components"]) == 2
    assert "--components draws one run, got 2" in capsys.readouterr().err


def test_the_installed_script_exits_2_on_an_unknown_restriction(tmp_path):
    run = lightning_run(tmp_path)
    script = Path(sys.executable).parent / "llc-callbacks"
    done = subprocess.run(
        [script, "stages", run, "--restriction", "layer9"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert_names_the_unknown_restriction(done.stderr, run, "layer0, layer1")
