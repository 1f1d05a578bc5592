"""TRL's SFT, DPO and GRPO trainers on a tiny GPT-2 and a tokenizer built in code."""

from __future__ import annotations

import torch
from datasets import Dataset
from example_modules import load_example
from hf_helpers import options
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

# Times and speeds in the logs, which differ between two runs of the same training.
TIMED = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time")


# The tokenizer, model and letter runs of examples/finetuning.py.
_finetuning = load_example("finetuning")
LETTERS, tokenizer, tiny_lm, letters = (
    _finetuning.LETTERS,
    _finetuning.tokenizer,
    _finetuning.tiny_lm,
    _finetuning.letters,
)


def _starts(samples: int, seed: int) -> list[int]:
    return torch.randint(0, 26, (samples,), generator=torch.Generator().manual_seed(seed)).tolist()


def completions(samples: int = 64) -> Dataset:
    """Prompt-completion pairs: four letters, then the next three to six."""
    starts = _starts(samples, 0)
    return Dataset.from_dict(
        {
            "prompt": [letters(s, 4) for s in starts],
            "completion": [letters(s + 4, 3 + s % 4) for s in starts],
        }
    )


def preferences(samples: int = 64) -> Dataset:
    """The right continuation chosen over the same letters reversed, of unequal lengths."""
    starts = _starts(samples, 1)
    return Dataset.from_dict(
        {
            "prompt": [letters(s, 4) for s in starts],
            "chosen": [letters(s + 4, 3 + s % 3) for s in starts],
            "rejected": [letters(s + 4, 2 + s % 4)[::-1] for s in starts],
        }
    )


def prompts(samples: int = 64) -> Dataset:
    return Dataset.from_dict({"prompt": [letters(s, 4) for s in _starts(samples, 2)]})


def alphabet_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """How many letters of each completion continue the alphabet from its prompt."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        start = LETTERS.index(prompt[-1]) + 1
        rewards.append(float(sum(c == letters(start, 8)[i] for i, c in enumerate(completion[:8]))))
    return rewards


def common_args(tmp_path, **changes) -> dict:
    return {**options(tmp_path), "max_steps": 6, **changes}


def sft_trainer(tmp_path, callbacks=(), **changes) -> SFTTrainer:
    tok = tokenizer()
    args = SFTConfig(**common_args(tmp_path, per_device_train_batch_size=8, **changes))
    return SFTTrainer(
        model=tiny_lm(tok),
        args=args,
        train_dataset=completions(),
        processing_class=tok,
        callbacks=list(callbacks),
    )


def dpo_trainer(tmp_path, callbacks=(), peft_config=None, **changes) -> DPOTrainer:
    """With ``peft_config`` the reference is the model with its adapters disabled."""
    tok = tokenizer()
    args = DPOConfig(**common_args(tmp_path, per_device_train_batch_size=8, **changes))
    return DPOTrainer(
        model=tiny_lm(tok),
        # The same initial weights, as TRL would load them from the model's path.
        ref_model=None if peft_config is not None else tiny_lm(tok),
        args=args,
        train_dataset=preferences(),
        processing_class=tok,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )


def grpo_trainer(tmp_path, callbacks=(), **changes) -> GRPOTrainer:
    tok = tokenizer()
    options = {
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        **changes,
    }
    return GRPOTrainer(
        model=tiny_lm(tok),
        reward_funcs=alphabet_reward,
        args=GRPOConfig(**common_args(tmp_path, **options)),
        train_dataset=prompts(),
        processing_class=tok,
        callbacks=list(callbacks),
    )


def lora_dpo_trainer(tmp_path, callbacks=(), **changes) -> DPOTrainer:
    """DPO of a LoRA adapter: the reference is the model with the adapter disabled."""
    lora = LoraConfig(r=4, target_modules=["c_attn"])
    return dpo_trainer(tmp_path, callbacks, peft_config=lora, **changes)


TRAINERS = {
    "sft": sft_trainer,
    "dpo": dpo_trainer,
    "lora_dpo": lora_dpo_trainer,
    "grpo": grpo_trainer,
}


def training_rows(trainer) -> list[dict]:
    """The trainer's log rows but the LLC's, without times and speeds."""
    return [
        {k: v for k, v in row.items() if k not in TIMED}
        for row in trainer.state.log_history
        if not any(key.startswith("llc/") for key in row)
    ]
