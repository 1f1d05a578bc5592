"""Every example and the demo run, on small settings."""

import json
import math

import pytest
from compare import assert_same_history
from models import FIGURE_SIZE, TINY, png_size

from llc_callbacks import LLCConfig
from llc_callbacks.theory import rrr_learning_coefficient


@pytest.mark.slow
def test_the_demo_writes_the_png_and_a_wandb_run_with_llc_and_accuracy(
    tmp_path, wandb_rows, example
):
    # The demo's defaults with short chains: a tuning reading of at most 200 burn-in steps,
    # then 20 draws a reading (no time budget, so the same draws on any machine). 4 chains:
    # with 2, the rise to the peak fell within the chains' noise under some noise streams.
    short = LLCConfig(num_chains=4, num_burnin=200, num_draws=20)
    result = example("grokking").run(
        tmp_path, p=23, steps=300, estimates=5, config=short, max_overhead=None
    )
    assert png_size(result["png"]) == (800, 1200)
    rows = wandb_rows(result["wandb"])
    llc_steps = [row["trainer/global_step"] for row in rows if "llc/mean" in row]
    assert llc_steps[0] == 0 and llc_steps[-1] == 300 and len(llc_steps) >= 4
    assert sum("test_acc" in row for row in rows) >= 10
    assert sum("train_loss" in row for row in rows) >= 10
    assert {"crossed_90", "llc_peak", "llc_final", "final_test_acc"} <= set(result)
    assert set(result["moves"]) == {"LLC", "hessian_trace", "fisher_trace", "top_eigenvalue"}
    curvature = [row for row in rows if "llc/curvature/hessian_trace" in row]
    assert len(curvature) == len(llc_steps)
    assert all("llc/free_energy" in row for row in rows if "llc/mean" in row)
    # The LLC peaks while the network memorizes, then falls. The first estimates (steps 0
    # and 1) may differ by less than the chains' noise: seeds 0-3 gave rising, falling and
    # flat (0 to 1), rising, falling.
    kinds = [stage.kind for stage in result["stages"]]
    assert kinds[-2:] == ["rising", "falling"] and set(kinds[:-2]) <= {"flat"}
    assert result["stages"][-2].end <= result["llc_peak"][0] <= result["stages"][-1].start
    dynamics = result["dynamics"]
    assert len(dynamics.steps) >= 8 and dynamics.projections.shape[1] == 3
    assert (tmp_path / "csv" / "version_0" / "essential_dynamics.npz").is_file()


def test_the_demo_finds_the_transition_in_a_run(example):
    rows = [{"step": s, "test_acc": a} for s, a in ((0, 0.1), (10, 0.5), (20, 0.95), (30, 1.0))]
    rows += [{"step": s, "llc/mean": v} for s, v in ((0, 5.0), (10, 9.0), (20, 3.0), (30, 1.0))]
    summary = example("grokking").summarize(rows)
    assert summary["crossed_90"] == 20
    assert summary["llc_peak"] == (10, 9.0)
    assert (summary["llc_at_crossing"], summary["llc_final"]) == (3.0, 1.0)
    # Memorizing 5 -> 9, peak to end 9 -> 1, across the transition (50% at 10, 90% at 20) 9 -> 3.
    assert summary["moves"]["LLC"] == pytest.approx((9 / 5, 1 / 9, 3 / 9))
    assert [stage.kind for stage in summary["stages"]] == ["flat"]  # 4 estimates: no turn


@pytest.mark.slow
def test_lightning_mlp(tmp_path, example):
    history = example("lightning_mlp").main(steps=60, every=30, out=tmp_path)
    assert [row["step"] for row in history] == [30, 60]


@pytest.mark.slow
def test_transformers_gpt2(tmp_path, example):
    rows = example("transformers_gpt2").main(steps=20, every=10, out=tmp_path, llc=TINY)
    assert [row["step"] for row in rows] == [10, 20]


def test_finetuning_follows_the_llc_through_pretraining_sft_and_dpo(tmp_path, example):
    rows = example("finetuning").main(steps=(4, 2, 2), every=2, out=tmp_path, config=TINY)
    # Each phase estimates at its start and every 2 steps, on one step axis.
    expected = [("pretraining", 0), ("pretraining", 2), ("pretraining", 4), ("SFT", 4)]
    expected += [("SFT", 6), ("DPO", 6), ("DPO", 8)]
    assert [(row["phase"], row["step"]) for row in rows] == expected
    heads = [f"llc/layer{i}.head{j}/mean" for i in range(2) for j in range(2)]
    assert all(math.isfinite(row[key]) for row in rows for key in ["llc/mean", *heads])
    assert_same_history(json.loads((tmp_path / "llc.json").read_text()), rows)
    assert png_size(tmp_path / "finetuning.png")[0] > 0


def test_manual_loop(example):
    monitor = example("manual_loop").main(steps=40, every=20, config=TINY)
    assert [row["step"] for row in monitor.history] == [0, 20, 40]


def test_rrr_prints_estimates_beside_the_truth(capsys, example):
    short = LLCConfig(num_burnin=100, num_draws=200)
    ((_, truth, estimate),) = example("rrr").main(cases=[(5, 3, 5, 2)], config=short, samples=2_000)
    assert truth == rrr_learning_coefficient(5, 3, 5, 2) == 9.5 and math.isfinite(estimate)
    assert "9.50" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_per_layer_transformer(tmp_path, example):
    history, path = example("per_layer_transformer").main(
        steps=20, every=10, out=tmp_path, config=TINY
    )
    assert [row["step"] for row in history] == [0, 10, 20]
    names = [f"layer{i}.{part}" for i in range(3) for part in ("head0", "head1", "mlp")]
    assert all(f"llc/{name}/mean" in history[-1] for name in names)
    assert png_size(path) == FIGURE_SIZE
