"""LLCTrainerCallback with a real transformers Trainer on CPU, tiny models built from configs."""

import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wandb
from compare import assert_same_history
from hf_helpers import (
    LENGTH,
    BowlForTrainer,
    FollowSharpness,
    TokenData,
    ZerosData,
    make_trainer,
    tiny_bert,
    tiny_gpt2,
)
from models import BOWL_CONFIG, BOWL_TURNS, TINY, fails_in_chains, interrupted_at
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, Subset
from transformers import set_seed

from llc_callbacks import EssentialDynamics, LLCConfig, Probe, Restrictions, token_losses
from llc_callbacks.forked import ForkedModel
from llc_callbacks.history import histories, read_rows
from llc_callbacks.integrations.huggingface import LLCTrainerCallback, model_loss
from llc_callbacks.measures import Traces


def train(tmp_path, callback_kwargs=None, resume=None, **changes):
    """Train with an LLCTrainerCallback (none if ``callback_kwargs`` is None)."""
    trainer = make_trainer(tmp_path, **changes)
    callback = None
    if callback_kwargs is not None:
        callback = LLCTrainerCallback(**{"config": TINY, **callback_kwargs})
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def llc_rows(trainer, key="llc/mean"):
    return [(row["step"], row[key]) for row in trainer.state.log_history if key in row]


def losses(trainer):
    return [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
def test_tiny_models_train_with_estimates_on_schedule(tmp_path, make_model):
    data = TokenData(classify=make_model is tiny_bert)
    trainer, callback = train(
        tmp_path, {"every_n_steps": 4, "at_start": True}, model=make_model(), data=data
    )
    assert [row["step"] for row in callback.monitor.history] == [0, 4, 8, 12]
    assert llc_rows(trainer) == [(r["step"], r["llc/mean"]) for r in callback.monitor.history]
    assert all(math.isfinite(value) for _, value in llc_rows(trainer))
    assert callback.monitor.last_result.vectorized  # vmap works for GPT-2 and BERT


@pytest.mark.parametrize("stream", [False, True], ids=["snapshots", "stream"])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, stream):
    plain, _ = train(tmp_path / "plain")
    schedule = {"every_n_steps": 3, "at_start": True, "at_end": True, "stream": stream}
    watched, _ = train(tmp_path / "watched", schedule)
    for (name, a), (_, b) in zip(
        plain.model.state_dict().items(), watched.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # Every step's loss is logged, also at the steps where the LLC was logged.
    assert losses(watched) == losses(plain)
    assert [step for step, _ in losses(plain)] == list(range(1, 13))


def test_a_callback_reused_by_another_trainer_logs_each_runs_own_llc(tmp_path):
    # Both Trainers built first (a notebook cell run twice), then trained in turn; the second
    # runs longer than the first, past the first's last estimate.
    callback = LLCTrainerCallback(TINY, every_n_steps=4)
    first = make_trainer(tmp_path / "a", max_steps=8)
    first.add_callback(callback)
    second = make_trainer(tmp_path / "b", max_steps=16)
    second.add_callback(callback)
    first.train()
    first_rows, first_monitor = llc_rows(first), callback.monitor
    set_seed(0)  # training's dropout draws from the global generator, as alone's below
    with pytest.warns(UserWarning, match="LLCTrainerCallback ran before, so its LLC history"):
        second.train()
    assert callback.trainer is second
    assert llc_rows(first) == first_rows and [s for s, _ in first_rows] == [4, 8]
    assert [row["step"] for row in first_monitor.history] == [4, 8]
    # The second run's LLC is what a callback of its own would have logged.
    alone = make_trainer(tmp_path / "alone", max_steps=16)
    own = LLCTrainerCallback(TINY, every_n_steps=4)
    alone.add_callback(own)
    set_seed(0)
    alone.train()
    assert [step for step, _ in llc_rows(second)] == [4, 8, 12, 16]
    assert llc_rows(second) == llc_rows(alone)
    assert_same_history(callback.monitor.history, own.monitor.history)


def test_an_interrupt_in_an_estimate_keeps_the_steps_checkpoint_and_a_resume_continues(
    tmp_path, ctrl_c
):
    # Cold chains, so that the resumed history can equal an uninterrupted one exactly.
    kwargs = {"config": dataclasses.replace(TINY, warm_start=False), "every_n_steps": 3}
    kwargs["stream"] = False  # snapshot estimates, each of its step alone
    interrupted = make_trainer(tmp_path / "run", save_strategy="steps", save_steps=6)
    loss = interrupted_at(model_loss, lambda: interrupted.state.global_step, 6)
    callback = LLCTrainerCallback(**kwargs, loss_fn=loss)
    interrupted.add_callback(callback)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C inside the step-6 estimate
        interrupted.train()
    assert interrupted.state.global_step == 6  # no step after it
    checkpoint = tmp_path / "run" / "checkpoint-6"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["global_step"] == 6
    history = saved["stateful_callbacks"][callback.state_key]["history"]
    assert [row["step"] for row in history] == [3]  # the interrupted estimate is left out
    resumed, resumed_callback = train(
        tmp_path / "resumed", {**kwargs, "loss_fn": model_loss}, resume=str(checkpoint)
    )
    full, full_callback = train(tmp_path / "full", {**kwargs, "loss_fn": model_loss})
    assert [row["step"] for row in resumed_callback.monitor.history] == [3, 6, 9, 12]
    assert_same_history(resumed_callback.monitor.history, full_callback.monitor.history)
    assert llc_rows(resumed) == llc_rows(full)  # step 3's row came with the checkpoint


def test_label_smoothing_is_said_and_the_models_own_loss_clears_it(tmp_path):
    with pytest.warns(UserWarning, match="label_smoothing_factor=0.1: .* loss_fn=model_loss"):
        _, smoothed = train(tmp_path / "a", {"steps": [6]}, label_smoothing_factor=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, own = train(
            tmp_path / "b", {"steps": [6], "loss_fn": model_loss}, label_smoothing_factor=0.1
        )
    assert not [w for w in caught if "label_smoothing" in str(w.message)]
    # Same training, same weights: the two callbacks sampled different losses.
    (a,), (b,) = smoothed.monitor.history, own.monitor.history
    assert a["llc/init_loss"] != pytest.approx(b["llc/init_loss"], rel=1e-3)


def test_wandb_run_file_holds_the_llc_next_to_the_loss(tmp_path, wandb_dir, wandb_rows):
    trainer, callback = train(tmp_path, {"steps": [3, 7, 12]}, report_to="wandb")
    wandb.finish()
    rows = wandb_rows()
    llc = [
        (row["train/global_step"], row["train/llc/mean"]) for row in rows if "train/llc/mean" in row
    ]
    assert (
        llc == llc_rows(trainer) == [(r["step"], r["llc/mean"]) for r in callback.monitor.history]
    )
    assert [step for step, _ in llc] == [3, 7, 12]
    # The default keys of an estimate, and nothing else of the LLC's.
    keys = {f"train/llc/{key}" for key in ("mean", "std", "healthy", "step_size", "tuned")}
    assert all(
        {key for key in row if key.startswith("train/llc/")} == keys
        for row in rows
        if "train/llc/mean" in row
    )
    loss_steps = [row["train/global_step"] for row in rows if "train/loss" in row]
    assert loss_steps == list(range(1, 13))


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    # Cold chains: each estimate depends on its step and weights alone (see the next test).
    cold = dataclasses.replace(TINY, warm_start=False)
    kwargs = {"every_n_steps": 3, "at_start": True, "config": cold, "stream": False}
    full, full_callback = train(tmp_path / "full", kwargs, save_strategy="steps", save_steps=6)
    checkpoint = tmp_path / "full" / "checkpoint-6"
    resumed, callback = train(tmp_path / "resumed", kwargs, resume=str(checkpoint))
    assert [row["step"] for row in callback.monitor.history] == [0, 3, 6, 9, 12]
    assert_same_history(callback.monitor.history, full_callback.monitor.history)
    assert llc_rows(resumed) == llc_rows(full)


def test_a_resume_under_other_settings_is_marked_so_that_plots_draw_it_apart(tmp_path):
    kwargs = {"every_n_steps": 3, "config": TINY}
    train(tmp_path / "full", kwargs, save_strategy="steps", save_steps=6)
    other = {"steps": [9, 12], "config": dataclasses.replace(TINY, num_chains=3)}
    with pytest.warns(UserWarning, match="starts a new LLC history"):
        train(
            tmp_path / "resumed",
            other,
            resume=str(tmp_path / "full" / "checkpoint-6"),
            save_strategy="steps",
            save_steps=6,
        )
    # The checkpoint's log history (estimates at 3 and 6) goes on with the new one's (9, 12):
    # steps that increase, told apart by the marker on the new history's first estimate.
    rows = read_rows(tmp_path / "resumed" / "checkpoint-12")
    assert [row["step"] for row in rows if "llc/restart" in row] == [9]
    parts = histories(rows, "llc/mean", "llc/restart")
    assert [[row["step"] for row in part if "llc/mean" in row] for part in parts] == [
        [3, 6],
        [9, 12],
    ]


def test_a_warm_started_run_resumes_with_its_step_sizes_in_trainer_state(tmp_path):
    kwargs = {"every_n_steps": 3}
    full, callback = train(tmp_path / "full", kwargs, save_strategy="steps", save_steps=6)
    checkpoint = tmp_path / "full" / "checkpoint-6"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"][callback.state_key]["step_sizes"]
    at_six = next(r for r in callback.monitor.history if r["step"] == 6)
    assert len(saved[""]) == TINY.num_chains and at_six["llc/diag/step_size"] == pytest.approx(
        math.exp(np.mean(np.log(saved[""])))
    )
    resumed, again = train(tmp_path / "resumed", kwargs, resume=str(checkpoint))
    assert [row["step"] for row in again.monitor.history] == [3, 6, 9, 12]
    assert_same_history(again.monitor.history[:2], callback.monitor.history[:2])
    warm = {row["step"]: row["llc/diag/warm"] for row in again.monitor.history}
    # Warm from the second estimate on; after the resume, the first starts cold (no offsets
    # in the checkpoint), the next warm again.
    assert warm == {3: 0.0, 6: 1.0, 9: 0.0, 12: 1.0}
    # Training itself is the same, warm or not.
    assert losses(resumed) == losses(full)


def test_the_default_loss_is_what_the_trainer_optimizes(tmp_path):
    def doubled(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].flatten(0, 1)
        return 2 * F.cross_entropy(logits, labels[:, 1:].flatten())

    at_start = {"steps": [0]}
    _, plain = train(tmp_path / "plain", at_start, max_steps=1)
    _, custom = train(tmp_path / "custom", at_start, max_steps=1, compute_loss_func=doubled)
    _, smooth = train(tmp_path / "smooth", at_start, max_steps=1, label_smoothing_factor=0.5)
    init = {
        name: callback.monitor.history[0]["llc/init_loss"]
        for name, callback in (("plain", plain), ("custom", custom), ("smooth", smooth))
    }
    assert init["custom"] == pytest.approx(2 * init["plain"], rel=1e-5)
    # Label smoothing pops "labels" from the batch dict; every chain and the paired forward
    # pass still found them, so the estimate is finite, and smoothing changed the loss.
    assert init["smooth"] != pytest.approx(init["plain"], rel=1e-3)
    assert math.isfinite(smooth.monitor.history[0]["llc/mean"])


def test_mixed_precision_chains_on_the_cpu_run_in_float32_and_the_model_keeps_its_forward(
    tmp_path,
):
    # CPU autocast is slower than float32 (LLCMonitor's CPU_AUTOCAST): chains on the CPU run
    # the model's own forward, not accelerate's autocast wrapper, in float32. At step 0 the
    # weights are the seeded initialization in both runs, so the estimates are the same.
    _, plain = train(tmp_path / "fp32", {"steps": [0]}, max_steps=1)
    trainer, mixed = train(tmp_path / "bf16", {"steps": [0, 2]}, max_steps=2, bf16=True)
    assert mixed.monitor.config.autocast is None
    assert mixed.monitor.last_result.precision == plain.monitor.last_result.precision == "float32"
    assert mixed.monitor.history[0]["llc/mean"] == plain.monitor.history[0]["llc/mean"]
    # accelerate's autocast wrapper is still the model's forward after the estimates.
    assert "_original_forward" in vars(trainer.model) and "forward" in vars(trainer.model)


@pytest.mark.slow
def test_batch_nbeta_counts_an_accumulated_steps_examples(tmp_path):
    # One step of 16 examples, as 4 accumulated batches of 4 or as one batch of 16: nearly
    # the same weights (transformers normalises the accumulated loss over the step's tokens;
    # only dropout's masks differ), and nbeta = 16 / log 16 for both, so the estimates agree.
    config = LLCConfig(num_chains=4, num_burnin=200, num_draws=200)
    results = {}
    for name, changes in {
        "one batch": {"per_device_train_batch_size": 16},
        "accumulated": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4},
    }.items():
        _, callback = train(tmp_path / name, {"config": config, "steps": [12]}, **changes)
        results[name] = callback.monitor.last_result
    assert results["accumulated"].config.batches_per_step == 4
    one, accumulated = results["one batch"], results["accumulated"]
    assert one.nbeta == accumulated.nbeta == pytest.approx(16 / math.log(16))
    # Within 3 combined standard errors (std over 4 chains / sqrt(4), each): seed 0 reads
    # 5.58 +- 0.15 and 5.53 +- 0.13 (seeds 1 to 3 differed by 0.07, 0.13 and 2.1 at combined
    # errors of 0.26, 0.48 and 2.2). Counting the micro-batch alone (nbeta = 4 / log 4) read
    # 7.98 +- 0.42, 5.3 combined errors from the batch of 16.
    error = math.hypot(one.llc_std, accumulated.llc_std) / math.sqrt(config.num_chains)
    assert abs(one.llc_mean - accumulated.llc_mean) < 3 * error


def test_gradient_accumulation_neither_repeats_nor_skips(tmp_path):
    _, callback = train(tmp_path, {"every_n_steps": 2}, max_steps=6, gradient_accumulation_steps=3)
    assert [row["step"] for row in callback.monitor.history] == [2, 4, 6]
    assert callback.monitor.config.batches_per_step == 3  # nbeta counts a step's examples


@pytest.mark.slow
def test_gradient_checkpointing_and_torch_compile(tmp_path):
    _, plain = train(tmp_path / "plain", {"steps": [0, 3]}, max_steps=3)
    _, checkpointed = train(
        tmp_path / "checkpointed", {"steps": [0, 3]}, max_steps=3, gradient_checkpointing=True
    )
    _, compiled = train(
        tmp_path / "compiled",
        {"steps": [0, 3]},
        max_steps=3,
        torch_compile=True,
        torch_compile_backend="eager",
    )
    expected = [row["llc/mean"] for row in plain.monitor.history]
    for callback in (checkpointed, compiled):
        # Chains stay vectorized (no fallback to a loop, whose rounding differs): same numbers.
        assert callback.monitor.last_result.vectorized
        assert [row["llc/mean"] for row in callback.monitor.history] == expected


def test_gradient_checkpointing_training_is_bit_identical_and_keeps_its_hook(tmp_path):
    plain, _ = train(tmp_path / "plain", max_steps=3, gradient_checkpointing=True)
    watched, _ = train(
        tmp_path / "watched", {"steps": [0, 3]}, max_steps=3, gradient_checkpointing=True
    )
    for (name, a), (_, b) in zip(
        plain.model.state_dict().items(), watched.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert losses(watched) == losses(plain)
    # The input-require-grads hook, out while chains ran, is back in place.
    handle = watched.model._require_grads_hook
    assert list(watched.model.get_input_embeddings()._forward_hooks) == [handle.id]


def test_a_failing_estimate_warns_logs_nan_and_training_goes_on(tmp_path):
    broken = fails_in_chains(lambda model, batch: model(**batch).loss)
    with pytest.warns(UserWarning, match="estimate at step 4 failed.*RuntimeError: boom"):
        trainer, _ = train(tmp_path, {"every_n_steps": 4, "loss_fn": broken})
    assert trainer.state.global_step == 12
    assert [step for step, _ in llc_rows(trainer)] == [4, 8, 12]
    assert all(math.isnan(value) for _, value in llc_rows(trainer))
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, {"every_n_steps": 4, "loss_fn": broken, "on_error": "raise"})


def test_custom_loss_and_dataloader(tmp_path):
    seen = []

    def loss_fn(model, batch):
        seen.append(batch["input_ids"].shape[0])
        return model(**batch).loss

    loader = torch.utils.data.DataLoader(TokenData(), batch_size=4)
    _, callback = train(tmp_path, {"steps": [6], "loss_fn": loss_fn, "dataloader": loader})
    assert set(seen) == {4}
    assert len(callback.monitor.history) == 1


def test_progress_bar_follows_disable_tqdm_on_a_terminal(tmp_path, capsys, monkeypatch):
    train(tmp_path, {"steps": [1]}, max_steps=1, disable_tqdm=False)
    assert "LLC chains" not in capsys.readouterr().err  # not a terminal: no bar in the log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(tmp_path, {"steps": [1]}, max_steps=1, disable_tqdm=True)
    assert "LLC chains" not in capsys.readouterr().err
    train(tmp_path, {"steps": [1]}, max_steps=1, disable_tqdm=False)
    assert "LLC chains" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"steps": [2], "every_n_steps": 3}, "at most one of"),
        ({"loss_fn": 1}, "loss_fn must be callable"),
        ({"dataloader": 1.5}, "dataloader must be an iterable"),
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"strict": "yes"}, "strict must be True or False"),
        ({"extra_metrics": ("chain",)}, "extra_metrics must be one of 'chains'"),
        ({"prefix": "llc/"}, "prefix must be one or more parts"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLCTrainerCallback(**kwargs)


def test_the_trainer_is_not_an_argument(tmp_path):
    with pytest.raises(ValueError, match=r"takes no trainer: pass it to Trainer\(callbacks="):
        LLCTrainerCallback(make_trainer(tmp_path))


def test_trace_plots_go_to_wandb_as_images(tmp_path, wandb_dir, wandb_rows):
    train(tmp_path, {"steps": [4, 8], "measures": [Traces()]}, report_to="wandb")
    wandb.finish()
    rows = wandb_rows()
    images = [row for row in rows if "train/llc/trace/_type" in row]
    assert [row["train/global_step"] for row in images] == [4, 8]
    assert all(row["train/llc/trace/width"] == 800 for row in images)


@pytest.mark.slow
def test_stage_boundaries_reach_log_history_once_each_across_a_resume(tmp_path):
    def bowl_run(folder, max_steps, resume=None):
        trainer = make_trainer(
            folder,
            model=BowlForTrainer(),
            data=ZerosData(),
            per_device_train_batch_size=4,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=20,
        )
        trainer.add_callback(FollowSharpness())
        callback = LLCTrainerCallback(BOWL_CONFIG, every_n_steps=1, stream=False)
        trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    bowl_run(tmp_path / "first", 20)
    resumed, callback = bowl_run(tmp_path / "resumed", 36, str(tmp_path / "first/checkpoint-20"))
    assert [b.step for b in callback.monitor.boundaries] == list(BOWL_TURNS)
    assert llc_rows(resumed, "llc/stage") == [
        (b.confirmed_at, b.step) for b in callback.monitor.boundaries
    ]


def probe_batch():
    """Four examples of TokenData as one batch."""
    data = TokenData()
    return [{key: torch.stack([data[i][key] for i in range(4)]) for key in data[0]}]


def test_essential_dynamics_are_recorded_saved_and_resumed_and_training_is_untouched(tmp_path):
    plain, _ = train(tmp_path / "plain")

    def callback_kwargs():
        return {"steps": [12], "dynamics": EssentialDynamics(probe_batch(), every_n_steps=3)}

    full, full_callback = train(
        tmp_path / "full", callback_kwargs(), save_strategy="steps", save_steps=6
    )
    for (name, a), (_, b) in zip(
        plain.model.state_dict().items(), full.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    dynamics = full_callback.dynamics
    assert dynamics.steps == [3, 6, 9, 12]
    assert len(dynamics.vectors[0]) == 4  # each probe sequence's loss
    saved = np.load(Path(full.args.output_dir) / "essential_dynamics.npz")
    assert saved["steps"].tolist() == dynamics.steps
    checkpoint = tmp_path / "full" / "checkpoint-6"
    _, resumed = train(tmp_path / "resumed", callback_kwargs(), resume=str(checkpoint))
    assert resumed.dynamics.steps == dynamics.steps
    np.testing.assert_allclose(resumed.dynamics.vectors, dynamics.vectors, rtol=1e-5)


def lora_gpt2(base_dtype: torch.dtype = torch.float32):
    config = LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    return get_peft_model(tiny_gpt2().to(base_dtype), config)  # the adapter stays float32


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_lora_model_samples_its_adapter_and_reads_its_base_weights_in_place(tmp_path, base_dtype):
    plain, _ = train(tmp_path / "plain", model=lora_gpt2(base_dtype))
    watched, callback = train(
        tmp_path / "watched", {"every_n_steps": 4}, model=lora_gpt2(base_dtype)
    )
    for (name, a), (_, b) in zip(
        plain.model.state_dict().items(), watched.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    model = watched.model
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < adapter < sum(p.numel() for p in model.parameters()) / 10
    assert llc_rows(watched, "llc/num_sampled") == [(0, adapter)]  # the adapter only
    assert [step for step, value in llc_rows(watched) if math.isfinite(value)] == [4, 8, 12]
    # The frozen base weights serve the chains where they live, in their own dtype: no copy
    # of them (no float32 copy of a bfloat16 base) is made.
    forked = ForkedModel(model, lambda m, batch: m(**batch).loss, torch.device("cpu"), "auto")
    base = {f"model.{n}": p for n, p in model.named_parameters() if not p.requires_grad}
    assert base and base.keys() <= forked.constants.keys()
    assert all(forked.constants[n].data_ptr() == p.data_ptr() for n, p in base.items())
    assert all(forked.constants[n].dtype == base_dtype for n in base)
    assert forked.precision == base_dtype  # most weights are the base's
    assert callback.monitor.last_result.precision == str(base_dtype).removeprefix("torch.")


def test_observables_reach_log_history_wandb_and_files_and_training_is_untouched(
    tmp_path, wandb_dir, wandb_rows
):
    plain, _ = train(tmp_path / "plain")
    probe = DataLoader(Subset(TokenData(), range(8)), batch_size=8)
    config = dataclasses.replace(TINY, observe_every=1)
    watched, callback = train(
        tmp_path / "watched",
        {
            "config": config,
            "steps": [4, 8],
            "observables": {"probe": probe, "tokens": Probe(probe, token_losses)},
            "restrictions": Restrictions(weights={"h0": "transformer.h.0.*"}),
            "susceptibility_base": "probe",
        },
        report_to="wandb",
    )
    wandb.finish()
    for (name, a), (_, b) in zip(
        plain.model.state_dict().items(), watched.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert losses(watched) == losses(plain)
    for pair in ("probe:probe", "probe:tokens", "tokens:tokens"):
        kernel = llc_rows(watched, f"llc/kernel/{pair}")
        assert [step for step, _ in kernel] == [4, 8]
        assert all(-1 <= value <= 1 for _, value in kernel)
    for key in ("llc/susceptibility/tokens", "llc/h0/susceptibility/tokens"):
        found = llc_rows(watched, key)
        assert [step for step, _ in found] == [4, 8] and all(math.isfinite(v) for _, v in found)
    rows = wandb_rows()
    for table in ("influence", "susceptibility", "loss_kernel"):
        logged = [row["train/global_step"] for row in rows if f"train/llc/{table}/_type" in row]
        assert logged == [4, 8], table
    assert len(callback.monitor.influences) == 4 * 5  # the top 5 of each ordered pair
    saved = np.load(Path(watched.args.output_dir) / "observables" / "step_4.npz")
    assert saved["probe"].shape == (config.num_chains, config.num_draws, 8)
    assert saved["tokens"].shape == (config.num_chains, config.num_draws, 8 * (LENGTH - 1))
