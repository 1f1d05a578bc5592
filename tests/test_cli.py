"""The `llc-callbacks` console script on small runs written by hand: help, restrictions, errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger
from models import FIGURE_SIZE, png_size

from llc_callbacks import cli
from llc_callbacks.cli import main
from llc_callbacks.plotting import plot_llc_curve

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


# Two LLC histories in one metrics.csv, as two fits with one CSVLogger write it: the first
# to step 45, the second resumed from the checkpoint at step 10 under other settings (a new
# LLC history). Estimates by step; the first history's at step 30 failed a health check, and
# layer1 logged its own health (unhealthy at step 20) where layer0 did not.
FIRST = {10: 1.0, 20: 2.0, 30: 3.0, 40: 4.0}
SECOND = {20: 2.5, 30: 2.5, 40: 2.5, 50: 2.5}


def estimate(step: int, value: float, first: bool) -> dict[str, float]:
    healthy = 0.0 if first and step == 30 else 1.0
    row = {"llc/mean": value, "llc/std": 0.01, "llc/healthy": healthy}
    row |= {"llc/layer0/mean": value / 2, "llc/layer0/std": 0.01}
    layer1 = {"llc/layer1/mean": value / 4, "llc/layer1/std": 0.01}
    return row | layer1 | {"llc/layer1/healthy": 0.0 if first and step == 20 else 1.0}


def restarted_run(folder: Path) -> Path:
    """The metrics.csv of a run whose LLC restarted at step 20, losses every 5 steps."""
    logger = CSVLogger(folder)
    for start, end, estimates in ((5, 45, FIRST), (15, 55, SECOND)):
        for step in range(start, end + 1, 5):
            logger.log_metrics({"train_loss": 2.0 - step / 50}, step=step)
            if step in estimates:
                logger.log_metrics(estimate(step, estimates[step], estimates is FIRST), step)
        logger.save()
    return Path(logger.log_dir) / "metrics.csv"


def drawn(monkeypatch) -> list:
    """The figures `plot` draws from now on."""
    figures = []

    def keep(*runs, path=None):
        figures.append(plot_llc_curve(*runs, path=path))
        return figures[-1]

    monkeypatch.setattr(cli, "plot_llc_curve", keep)
    return figures


def test_plot_draws_each_history_of_a_restarted_run_on_its_own(tmp_path, capsys, monkeypatch):
    figures = drawn(monkeypatch)
    plot(capsys, str(restarted_run(tmp_path)))
    (figure,) = figures
    llc, loss = figure.axes  # the loss on the second axis
    for line in llc.lines + loss.lines:  # no curve steps back (a jump joining two histories)
        steps = list(line.get_xdata())
        assert steps == sorted(set(steps)), line.get_label()
    curves = {line.get_label(): line for line in llc.lines if line.get_label().startswith("LLC")}
    assert {label: list(line.get_xdata()) for label, line in curves.items()} == {
        "LLC": list(FIRST),
        "LLC (restart 1)": list(SECOND),
    }
    assert curves["LLC (restart 1)"].get_linestyle() == "-."
    assert [list(line.get_xdata()) for line in loss.lines] == [
        list(range(5, 50, 5)),
        list(range(15, 60, 5)),
    ]


def test_plot_draws_unhealthy_estimates_hollow(tmp_path, capsys, monkeypatch):
    figures = drawn(monkeypatch)
    run = restarted_run(tmp_path)
    plot(capsys, str(run), "--restriction", "layer0", "--restriction", "layer1")
    axes = figures[0].axes[0]
    lines = {line.get_label(): line for line in axes.lines}
    # Filled markers at the healthy estimates only: layer0 takes the full LLC's health,
    # layer1 logged its own.
    assert lines["full LLC"].get_markevery() == [0, 1, 3]
    assert lines["layer0"].get_markevery() == [0, 1, 3]
    assert lines["layer1"].get_markevery() == [0, 2, 3]
    assert lines["full LLC (restart 1)"].get_markevery() is None  # all healthy
    # Hollow markers at the others, the first with the legend entry.
    hollow = [line for line in axes.lines if line.get_markerfacecolor() == "white"]
    assert [list(line.get_xdata()) for line in hollow] == [[30], [30], [20]]
    assert [line.get_label() == "unhealthy" for line in hollow] == [True, False, False]
    assert "unhealthy" in [text.get_text() for text in axes.get_legend().get_texts()]


def test_plot_components_draws_the_last_history_of_a_restarted_run(tmp_path, capsys, monkeypatch):
    drawn_rows = []
    monkeypatch.setattr(cli, "plot_components", lambda rows, *_: drawn_rows.append(rows))
    run = restarted_run(tmp_path)
    assert main(["plot", str(run), "--components"]) == 0
    assert "drawing the last of its 2 LLC histories" in capsys.readouterr().err
    (rows,) = drawn_rows
    assert [row["step"] for row in rows if "llc/layer0/mean" in row] == list(SECOND)


def test_stages_fits_each_history_of_a_restarted_run_on_its_own(tmp_path, capsys):
    assert main(["stages", str(restarted_run(tmp_path))]) == 0
    first, second = capsys.readouterr().out.split("\n\n")
    assert first.splitlines()[0] == "history 1 of 2: steps 10 to 40"
    assert second.splitlines()[0] == "history 2 of 2 (restart 1): steps 20 to 50"
    tables = [stage_rows("\n".join(text.splitlines()[1:])) for text in (first, second)]
    assert [[row[:3] for row in table] for table in tables] == [
        [["10", "40", "rising"]],
        [["20", "50", "flat"]],
    ]
