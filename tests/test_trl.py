"""LLCTrainerCallback inside TRL's SFT, DPO and GRPO trainers, real ones, on a tiny GPT-2."""

import copy
import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F
import wandb
from compare import assert_same_history
from models import TINY
from peft import LoraConfig
from test_torchrun import two_ranks
from transformers import TrainerCallback
from trl_helpers import TRAINERS, dpo_trainer, grpo_trainer, sft_trainer, training_rows

from llc_callbacks.integrations.huggingface import LLCTrainerCallback
from llc_callbacks.integrations.trl_trainers import (
    PAIR_LOSSES,
    PreferenceObjective,
    TokenObjective,
    completion_logps,
)

NOTE_LOGGER = "llc_callbacks.integrations.huggingface"


class MetricsSnapshot(TrainerCallback):
    """Copies the trainer's TRL metric buffers at every step's end, where it runs."""

    def __init__(self) -> None:
        self.trainer = None
        self.copies: list = []

    def on_step_end(self, args, state, control, **kwargs):
        self.copies.append(copy.deepcopy(self.trainer._metrics))


def buffers(trainer) -> dict:
    """TRL's metric buffers, train and eval, without times."""
    return {
        mode: {k: v for k, v in values.items() if k != "step_time"}
        for mode, values in trainer._metrics.items()
    }


def llc_rows(trainer) -> list[dict]:
    return [row for row in trainer.state.log_history if "llc/mean" in row]


@pytest.mark.parametrize(("kind", "stream"), [*((kind, False) for kind in TRAINERS), ("sft", True)])
def test_the_llc_is_logged_on_schedule_and_training_is_untouched(
    tmp_path, kind, stream, wandb_dir, wandb_rows, caplog
):
    plain = TRAINERS[kind](tmp_path / "plain")
    plain.train()
    callback = LLCTrainerCallback(TINY, every_n_steps=3, stream=stream)
    watched = TRAINERS[kind](tmp_path / "watched", report_to="wandb")
    before, after = MetricsSnapshot(), MetricsSnapshot()
    for added in (before, callback, after):
        watched.add_callback(added)
    before.trainer = after.trainer = watched
    with caplog.at_level(logging.INFO, logger=NOTE_LOGGER):
        watched.train()
    wandb.finish()
    steps = [row["step"] for row in callback.monitor.history]
    assert steps == [3, 6]
    logged = [(row["step"], row["llc/mean"]) for row in llc_rows(watched)]
    assert logged == [(r["step"], r["llc/mean"]) for r in callback.monitor.history]
    assert all(math.isfinite(value) for _, value in logged)
    in_wandb = [
        (r["train/global_step"], r["train/llc/mean"]) for r in wandb_rows() if "train/llc/mean" in r
    ]
    assert in_wandb == logged
    assert callback.monitor.last_result.vectorized
    notes = [
        r for r in caplog.records if r.name == NOTE_LOGGER and "the chains sample" in r.message
    ]
    assert len(notes) == 1
    # The estimates changed nothing of TRL's metric buffers, and no LLC row carries them.
    assert before.copies == after.copies
    streamed = {"llc/tuned", "llc/step_size"} if stream else set()
    assert all(
        set(row) == {"llc/mean", "llc/std", "llc/healthy", "epoch", "step", *streamed}
        for row in llc_rows(watched)
    )
    # Training as without the callback: every logged metric, the buffers, the weights.
    assert training_rows(watched) == training_rows(plain)
    assert buffers(watched) == buffers(plain)
    for (name, a), (_, b) in zip(
        plain.model.state_dict().items(), watched.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def perturbed(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every weight a little, as a chain does, so that no loss sits at its anchor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-2 * torch.randn(parameter.shape, generator=generator))


def test_the_sft_loss_is_the_token_nll_of_the_labelled_tokens(tmp_path):
    trainer = sft_trainer(tmp_path)
    model = trainer.model.eval()
    perturbed(model)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # prompts and padding are masked
    ours = TokenObjective().loss_fn(model, dict(batch))
    # By hand: the next-token log-probabilities of the labelled tokens, averaged.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logps = F.log_softmax(logits[:, :-1], dim=-1)
    mask = labels != -100
    picked = logps.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    by_hand = -(picked * mask).sum() / mask.sum()
    torch.testing.assert_close(ours, by_hand)  # float32 rounding of two sums
    with torch.no_grad():
        torch.testing.assert_close(ours, trainer.compute_loss(model, dict(batch)))


def dpo_losses(tmp_path, **changes) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Our DPO loss and TRL's own on one batch, at moved weights: (ours, TRL's, batch)."""
    trainer = dpo_trainer(tmp_path, **changes)
    objective = PreferenceObjective(trainer)
    model = trainer.model.eval()
    perturbed(model)
    loader = trainer.get_train_dataloader()
    raw = next(iter(loader))
    batch = next(iter(objective.data([raw], loader)))
    ours = objective.loss_fn(model, batch)
    with torch.no_grad():
        theirs = trainer.compute_loss(model, dict(raw))
    return ours, theirs, raw


@pytest.mark.parametrize("loss_type", sorted(PAIR_LOSSES))
def test_each_dpo_loss_type_equals_trls_own(tmp_path, loss_type):
    smoothing = {"robust": 0.1}.get(loss_type, 0.0)
    ours, theirs, _ = dpo_losses(tmp_path, loss_type=[loss_type], label_smoothing=smoothing)
    # TRL's fused LM head sums the same log-probabilities in tiles: float32 rounding.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference", ["precomputed", "peft"])
def test_the_dpo_loss_equals_trls_with_any_reference(tmp_path, reference):
    changes = (
        {"precompute_ref_log_probs": True}
        if reference == "precomputed"
        else {"peft_config": LoraConfig(r=4, target_modules=["c_attn"])}
    )
    ours, theirs, batch = dpo_losses(tmp_path, **changes)
    assert ("ref_chosen_logps" in batch) == (reference == "precomputed")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_dpo_loss_is_the_sigmoid_loss_by_hand_and_weights_mix_loss_types(tmp_path):
    ours, theirs, batch = dpo_losses(
        tmp_path / "mixed", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    trainer = dpo_trainer(tmp_path / "sigmoid")
    model = trainer.model.eval()
    perturbed(model)
    objective = PreferenceObjective(trainer)
    batch = next(iter(objective.data(None, trainer.get_train_dataloader)))
    pairs = batch["input_ids"].shape[0] // 2
    assert objective.loss_fn.count_examples(batch) == pairs == 8
    # By hand: beta times the chosen minus the rejected log-ratio to the reference model.
    mask = batch["completion_mask"]
    policy = completion_logps(model, batch["input_ids"], batch["attention_mask"], mask).sum(1)
    with torch.no_grad():
        reference = completion_logps(
            trainer.ref_model, batch["input_ids"], batch["attention_mask"], mask
        ).sum(1)
    ratio = policy - reference
    by_hand = -F.logsigmoid(trainer.beta * (ratio[:pairs] - ratio[pairs:])).mean()
    torch.testing.assert_close(objective.loss_fn(model, batch), by_hand)


def test_nbeta_batch_counts_preference_pairs(tmp_path):
    callback = LLCTrainerCallback(TINY, steps=[2])
    trainer = dpo_trainer(tmp_path, callbacks=[callback], max_steps=2)
    trainer.train()
    # A batch of 8 pairs has 16 rows: nbeta = B / log B with B = 8.
    assert callback.monitor.last_result.nbeta == pytest.approx(8 / math.log(8))


def test_a_dpo_loss_without_a_plain_equivalent_is_refused_before_training(tmp_path):
    callback = LLCTrainerCallback(TINY, every_n_steps=2)
    trainer = dpo_trainer(tmp_path, callbacks=[callback], loss_type=["aot"])
    with pytest.raises(ValueError, match=r"loss_type=\['aot'\].*loss_fn="):
        trainer.train()
    assert trainer.state.global_step == 0


def test_grpo_refuses_an_estimate_before_its_first_generation(tmp_path):
    callback = LLCTrainerCallback(TINY, every_n_steps=2, at_start=True)
    trainer = grpo_trainer(tmp_path, callbacks=[callback])
    with pytest.raises(ValueError, match=r"at_start=True.*first generation"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_a_resumed_run_continues_its_llc_history_exactly(tmp_path, kind):
    # Cold chains: each estimate depends on its step and weights alone.
    cold = dataclasses.replace(TINY, warm_start=False)

    def run(folder, resume=None):
        callback = LLCTrainerCallback(cold, every_n_steps=2, stream=False)
        trainer = TRAINERS[kind](folder, [callback], save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    full, full_callback = run(tmp_path / "full")
    resumed, callback = run(tmp_path / "resumed", str(tmp_path / "full" / "checkpoint-3"))
    assert [row["step"] for row in callback.monitor.history] == [2, 4, 6]
    assert_same_history(callback.monitor.history, full_callback.monitor.history)
    assert llc_rows(resumed) == llc_rows(full)
    if kind == "grpo":  # the kept completions came back from the checkpoint
        for column, kept in full_callback._objective.buffer.items():
            assert torch.equal(callback._objective.buffer[column], kept), column


@pytest.mark.slow
def test_grpo_under_torchrun_keeps_rank_zeros_completions_on_every_rank(tmp_path):
    records = two_ranks("trl_torchrun_script.py", tmp_path)
    assert all(record["world_size"] == 2 for record in records)
    # Each rank generated for its own prompts; both sample rank zero's completions.
    assert records[0]["kept"] == records[1]["kept"]
    assert records[0]["history"] == records[1]["history"]
    assert [row["step"] for row in records[0]["history"]] == [2, 4]
    assert all(record["vectorized"] for record in records)
