"""Replay over saved checkpoints: the numbers the callbacks logged, written where runs are."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_helpers import TokenData, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import LAYERS, Classifier, loader, trainer
from processes import HANG_S, TORCHRUN, environment, run
from replay_script import COLD, CONFIG, token_loader
from user_measures import ChainTable, WeightNorm

from llc_callbacks import LLCMonitor
from llc_callbacks.cli import main
from llc_callbacks.history import read_rows
from llc_callbacks.integrations.huggingface import LLCTrainerCallback, model_loss, pretrained_loader
from llc_callbacks.integrations.lightning import LLCCallback, checkpoint_loader, module_loss
from llc_callbacks.measures import Curvature
from llc_callbacks.replay import find_checkpoints, hub_checkpoints, replay, watch

EVERY = 4
HERE = Path(__file__).parent
# What the Lightning run adds to the full LLC, as the replay must.
# Measures of the package's and of a user's; ChainTable's table and figure reach W&B only.
MEASURES = [Curvature("hessian_trace"), WeightNorm(), ChainTable()]
LIGHTNING_EXTRAS = {"restrictions": LAYERS, "measures": MEASURES}
RESTRICTED = ("llc/first/mean", "llc/last/mean", "llc/curvature/hessian_trace", "llc/weight_norm")


def logged(history: list[dict], key: str = "llc/mean") -> dict[int, float]:
    return {row["step"]: row[key] for row in history if key in row}


def classifier(source, **options):
    """``replay`` of the Lightning classifier's checkpoints with the callback's settings."""
    monitor = LLCMonitor(CONFIG, stream=False, **LIGHTNING_EXTRAS)
    return replay(
        source,
        checkpoint_loader(Classifier),
        module_loss,
        loader(),
        monitor,
        progress=False,
        **options,
    )


def gpt2(source, *, follow=replay, config=CONFIG, load=None, **options):
    """``replay`` (or ``watch``) of the tiny GPT-2's checkpoints with the callback's settings."""
    load = load or pretrained_loader()
    return follow(
        source,
        load,
        model_loss,
        token_loader(),
        LLCMonitor(config, stream=False),
        **{"progress": False, **options},
    )


@pytest.fixture(scope="module")
def transformers_run(tmp_path_factory):
    """A Trainer run that saves a checkpoint at every estimate, and what the callback logged."""
    folder = tmp_path_factory.mktemp("hf")
    callback = LLCTrainerCallback(
        CONFIG, every_n_steps=EVERY, loss_fn=model_loss, dataloader=token_loader(), stream=False
    )
    trainer = make_trainer(
        folder, data=TokenData(64), save_strategy="steps", save_steps=EVERY, max_steps=3 * EVERY
    )
    trainer.add_callback(callback)
    trainer.train()
    return folder, logged(trainer.state.log_history)


def test_transformers_checkpoints_give_the_logged_estimates(transformers_run, tmp_path):
    folder, expected = transformers_run
    assert sorted(expected) == [4, 8, 12]
    checkpoints = find_checkpoints(folder)
    assert [c.step for c in checkpoints] == [4, 8, 12]
    rows = gpt2(folder, output=tmp_path / "llc.json")
    replayed = logged(rows)
    assert replayed.keys() == expected.keys()
    for step, value in expected.items():
        # The same computation on the same weights, read back from safetensors: float rounding.
        assert math.isclose(replayed[step], value, rel_tol=1e-5), (step, replayed[step], value)
    saved = json.loads((tmp_path / "llc.json").read_text())["log_history"]
    assert [row["step"] for row in saved] == [4, 8, 12]


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """A Lightning run checkpointing at every estimate, and the metrics.csv it wrote."""
    folder = tmp_path_factory.mktemp("lightning")
    checkpoints = ModelCheckpoint(
        dirpath=folder / "checkpoints", every_n_train_steps=EVERY, save_top_k=-1
    )
    callback = LLCCallback(
        CONFIG, every_n_steps=EVERY, dataloader=loader(), stream=False, **LIGHTNING_EXTRAS
    )
    run = trainer(
        folder,
        max_steps=3 * EVERY,
        callbacks=[checkpoints, callback],
        enable_checkpointing=True,
        logger=CSVLogger(folder, name="", version=""),
    )
    run.fit(Classifier(), loader())
    rows = read_rows(folder / "metrics.csv")
    return folder, logged(rows), {key: logged(rows, key) for key in RESTRICTED}


def test_lightning_checkpoints_give_the_logged_estimates_into_a_csv(lightning_run, tmp_path):
    folder, expected, extras = lightning_run
    assert sorted(expected) == [4, 8, 12]
    output = tmp_path / "metrics.csv"
    rows = classifier(folder / "checkpoints", output=output)
    assert [c.kind for c in find_checkpoints(folder)] == ["lightning"] * 3
    for step, value in expected.items():
        assert math.isclose(logged(rows)[step], value, rel_tol=1e-5), step
    for key, values in extras.items():  # restricted LLCs and measures, as logged
        assert sorted(values) == [4, 8, 12], key
        assert logged(rows, key) == pytest.approx(values, rel=1e-5), key
    # What llc-callbacks plot and stages read, as they read Lightning's metrics.csv.
    assert logged(read_rows(output)) == pytest.approx(logged(rows))
    assert main(["plot", str(output), "-o", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 0


def hub_cache(run, cache):
    """A Hub cache holding the run's checkpoints as revisions ``step<N>`` of ``local/tiny``."""
    repo = cache / "models--local--tiny"
    for step in (12, 4, 8):  # refs written out of order
        commit = f"{step:040x}"
        shutil.copytree(run / f"checkpoint-{step}", repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / f"step{step}").write_text(commit)
    (repo / "refs" / "main").write_text(f"{12:040x}")  # not a step: left out
    return repo


def test_hub_revisions_are_replayed_in_step_order_from_the_cache(transformers_run, tmp_path):
    folder, expected = transformers_run
    repo = hub_cache(folder, tmp_path)
    checkpoints = find_checkpoints(repo)
    assert [(c.step, c.revision, c.repo) for c in checkpoints] == [
        (4, "step4", "local/tiny"),
        (8, "step8", "local/tiny"),
        (12, "step12", "local/tiny"),
    ]
    assert hub_checkpoints("local/tiny", ["step12", "step4", "step8"], tmp_path)[0].step == 4
    loaded = []

    def load(checkpoint):
        model = pretrained_loader()(checkpoint)
        loaded.append(model.name_or_path)
        return model

    rows = gpt2(repo, load=load)
    assert loaded == ["local/tiny"] * 3  # from_pretrained(repo, revision=...), not a path
    # Each revision's own weights: the numbers logged at its step.
    assert logged(rows) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="revisions must name their step"):
        hub_checkpoints("local/tiny", ["main"])


def test_a_truncated_checkpoint_is_reported_and_skipped(transformers_run, tmp_path):
    folder, expected = transformers_run
    copy = shutil.copytree(folder, tmp_path / "run")
    weights = copy / "checkpoint-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"checkpoint-8 \(step 8\) is skipped"):
        rows = gpt2(copy)
    assert sorted(logged(rows)) == [4, 12]  # a gap stays a gap
    assert logged(rows)[4] == pytest.approx(expected[4], rel=1e-5)


def test_a_restarted_replay_repeats_nothing(transformers_run, tmp_path):
    folder, _ = transformers_run
    loaded = []

    def load(checkpoint):
        loaded.append(checkpoint.step)
        return pretrained_loader()(checkpoint)

    output = tmp_path / "llc.csv"
    first = gpt2(find_checkpoints(folder)[:2], load=load, output=output)
    rows = gpt2(folder, load=load, output=output)
    assert loaded == [4, 8, 12]  # the second replay estimated step 12 only
    assert [row["step"] for row in rows] == [4, 8, 12]
    assert {s: v for s, v in logged(rows).items() if s < 12} == logged(first)
    assert [row["step"] for row in read_rows(output)] == [4, 8, 12]
    other = LLCMonitor(dataclasses.replace(CONFIG, num_chains=3), stream=False)
    with pytest.raises(ValueError, match=r"other settings \(config.num_chains: 2 in the check"):
        replay(folder, load, model_loss, token_loader(), other, output=output)


def test_replay_logs_into_a_wandb_run_on_the_trainers_step_axis(
    transformers_run, wandb_dir, wandb_rows
):
    folder, expected = transformers_run
    gpt2(folder, wandb_run="training-run")
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*-training-run")
    rows = [row for row in wandb_rows(run_dir) if "train/llc/mean" in row]
    assert [row["train/global_step"] for row in rows] == [4, 8, 12]
    assert [row["train/llc/mean"] for row in rows] == pytest.approx(
        [expected[s] for s in (4, 8, 12)], rel=1e-5
    )


def test_bad_output_is_refused_before_any_estimate(transformers_run, tmp_path):
    folder, _ = transformers_run
    with pytest.raises(ValueError, match=r"output must be a \.csv or \.json file"):
        gpt2(folder, output=tmp_path / "llc.txt")
    with pytest.raises(ValueError, match="split"):
        gpt2(folder, split="ranks")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        gpt2(tmp_path)
    streaming = LLCMonitor(CONFIG, stream=True)  # readings that continue along training
    with pytest.raises(ValueError, match=r"snapshot estimates.*LLCMonitor\(stream=False"):
        replay(folder, pretrained_loader(), model_loss, token_loader(), streaming)


def test_each_estimate_follows_the_one_before(transformers_run):
    folder, expected = transformers_run
    rows = gpt2(folder, config=COLD)
    # Cold chains give the first estimate (no estimate before it) but not the later ones:
    # the equality above holds because the replay warm-starts as the callback did.
    assert logged(rows)[4] == pytest.approx(expected[4], rel=1e-5)
    assert logged(rows)[8] != pytest.approx(expected[8], rel=1e-3)


# The watcher's wait for a new checkpoint: far above the training process's start and its
# one-second steps, however loaded the machine (it ends the watch only when training fails).
IDLE = 600


def test_watch_follows_a_folder_that_training_writes_to_its_end(tmp_path):
    run = tmp_path / "run"
    training = subprocess.Popen(
        [sys.executable, str(HERE / "replay_training.py"), str(run)],
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    alive = {}

    def load(checkpoint):
        alive[checkpoint.step] = training.poll() is None
        return pretrained_loader()(checkpoint)

    try:
        rows = gpt2(run, follow=watch, load=load, poll=0.2, idle=IDLE, output=tmp_path / "llc.csv")
    finally:
        _, errors = training.communicate(timeout=HANG_S)
    assert training.returncode == 0, errors[-3000:]
    assert [row["step"] for row in rows] == [4, 8, 12]  # stopped at max_steps
    assert alive[4]  # estimated while training went on
    finished = gpt2(run)
    assert logged(rows) == pytest.approx(logged(finished), rel=1e-6)
    again = gpt2(run, follow=watch, load=load, poll=0.2, idle=1, output=tmp_path / "llc.csv")
    assert len(alive) == 3 and [row["step"] for row in again] == [4, 8, 12]  # nothing repeated


@pytest.mark.slow
def test_torchrun_shares_checkpoints_or_chains_among_ranks(transformers_run, tmp_path):
    folder, expected = transformers_run
    done = run([*TORCHRUN, HERE / "replay_script.py", folder, tmp_path])
    assert done.returncode == 0, done.stderr[-3000:]
    shared = logged(json.loads((tmp_path / "checkpoints.json").read_text())["log_history"])
    alone = gpt2(folder, config=COLD)
    assert shared == pytest.approx(logged(alone), rel=1e-5)
    chains = logged(json.loads((tmp_path / "chains.json").read_text())["log_history"])
    assert chains == pytest.approx(expected, rel=1e-5)  # as the callback logged, warm starts too
    # The console script joins torchrun's process group itself; rank 0 writes and reports.
    (tmp_path / "setup.py").write_text(
        SETUP.replace("LLCMonitor(CONFIG, stream=False)", "LLCMonitor(COLD, stream=False)")
    )
    command = ["-m", "llc_callbacks.cli", "replay", str(folder), "-o", str(tmp_path / "cli.csv")]
    command += ["--setup", f"{tmp_path / 'setup.py'}:setup"]
    done = run([*TORCHRUN, *command])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "cli.csv"), str(tmp_path / "cli.png")]
    assert logged(read_rows(tmp_path / "cli.csv")) == pytest.approx(logged(alone), rel=1e-5)


SETUP = """
from replay_script import COLD, CONFIG, token_loader

from llc_callbacks import LLCMonitor


def setup():
    return {"data": token_loader(), "monitor": LLCMonitor(CONFIG, stream=False)}
"""


def test_the_replay_command_writes_the_logged_estimates_and_their_curve(
    transformers_run, tmp_path, capsys
):
    folder, expected = transformers_run
    (tmp_path / "setup.py").write_text(SETUP)
    output = tmp_path / "llc.csv"
    command = [
        "replay",
        str(folder),
        "--setup",
        f"{tmp_path / 'setup.py'}:setup",
        "-o",
        str(output),
    ]
    assert main(command) == 0
    assert capsys.readouterr().out.split() == [str(output), str(tmp_path / "llc.png")]
    assert logged(read_rows(output)) == pytest.approx(expected, rel=1e-5)
    assert (tmp_path / "llc.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--setup", "nowhere.py:setup"], "--setup: nowhere.py does not exist"),
        (["--setup", "setup.py"], "--setup must be MODULE:NAME or FILE.py:NAME"),
        (["--setup", "setup.py:other"], "has no 'other'"),
        (["--setup", "setup.py:setup", "-o", "llc.txt"], r"output must be a \.csv or \.json"),
    ],
)
def test_the_replay_command_names_what_is_wrong(
    transformers_run, tmp_path, monkeypatch, capsys, options, message
):
    folder, _ = transformers_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "setup.py").write_text(SETUP)
    assert main(["replay", str(folder), *options]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_lightning_checkpoints_need_the_module_class(lightning_run, tmp_path, capsys):
    folder, expected, _ = lightning_run
    (tmp_path / "setup.py").write_text(
        "from lightning_helpers import LAYERS, loader\n"
        "from replay_script import CONFIG\n"
        "from llc_callbacks import LLCMonitor\n"
        "from llc_callbacks.measures import Curvature\n\n"
        "def setup():\n"
        "    monitor = LLCMonitor(\n"
        "        CONFIG, stream=False, restrictions=LAYERS, measures=[Curvature('hessian_trace')]\n"
        "    )\n"
        "    return {'data': loader(), 'monitor': monitor}\n"
    )
    command = ["replay", str(folder / "checkpoints"), "--setup", f"{tmp_path}/setup.py:setup"]
    assert main([*command, "-o", str(tmp_path / "none.csv")]) == 2
    assert "need --model-class MODULE:CLASS" in capsys.readouterr().err
    assert not (tmp_path / "none.csv").exists()
    output = tmp_path / "llc.csv"
    assert main([*command, "--model-class", "lightning_helpers:Classifier", "-o", str(output)]) == 0
    assert logged(read_rows(output)) == pytest.approx(expected, rel=1e-5)


def test_the_console_script_replays_hub_revisions(transformers_run, tmp_path):
    folder, expected = transformers_run
    hub_cache(folder, tmp_path / "hub")
    (tmp_path / "setup.py").write_text(SETUP)
    output = tmp_path / "llc.csv"
    command = [
        str(Path(sys.executable).parent / "llc-callbacks"),
        "replay",
        "local/tiny",
        "--revisions",
        "step4",
        "step8",
    ]
    command += ["step12", "--cache-dir", str(tmp_path / "hub"), "-o", str(output)]
    command += ["--setup", f"{tmp_path / 'setup.py'}:setup"]
    # Offline: from_pretrained(repo, revision=...) reads the cache without asking the Hub.
    done = run(command, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged(read_rows(output)) == pytest.approx(expected, rel=1e-5)


def test_a_truncated_lightning_checkpoint_is_reported_and_skipped(lightning_run, tmp_path):
    folder, expected, _ = lightning_run
    copy = shutil.copytree(folder / "checkpoints", tmp_path / "checkpoints")
    (broken,) = copy.glob("*step=8.ckpt")
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"step=8\.ckpt \(step 8\) is skipped"):
        rows = classifier(copy)
    assert sorted(logged(rows)) == [4, 12]
    assert logged(rows)[4] == pytest.approx(expected[4], rel=1e-5)


def test_a_lightning_replay_logs_on_lightnings_step_axis(lightning_run, wandb_dir, wandb_rows):
    folder, expected, extras = lightning_run
    classifier(folder / "checkpoints", wandb_run="lightning-run")
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*-lightning-run")
    rows = [row for row in wandb_rows(run_dir) if "llc/mean" in row]
    assert [row["trainer/global_step"] for row in rows] == [4, 8, 12]
    assert [row["llc/mean"] for row in rows] == pytest.approx([expected[s] for s in (4, 8, 12)])
    assert all("llc/first/mean" in row for row in rows)
    norms = extras["llc/weight_norm"]  # a measure of the user's, as the training run logged it
    assert [row["llc/weight_norm"] for row in rows] == pytest.approx([norms[s] for s in (4, 8, 12)])
    everything = wandb_rows(run_dir)
    for key, kind in (("llc/chains", "table-file"), ("llc/chains_plot", "image-file")):
        logged = [row for row in everything if row.get(f"{key}/_type") == kind]
        assert [row["trainer/global_step"] for row in logged] == [4, 8, 12], key
