"""Tiny transformers models built from configs (no downloads) and their data."""

from __future__ import annotations

import torch
from models import Bowl, bowl_sharpness
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

VOCAB, LENGTH = 64, 16


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


class TokenData(Dataset):
    """Sequences that count up modulo the vocabulary from a random start: learnable."""

    def __init__(self, samples: int = 256, classify: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, VOCAB, (samples, 1), generator=generator)
        self.ids = (starts + torch.arange(LENGTH)) % VOCAB
        self.classify = classify

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        if self.classify:
            return {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": ids[0] % 3,
            }
        return {"input_ids": ids, "labels": ids}


def options(tmp_path) -> dict:
    """The tests' ``TrainingArguments`` (TRL's configs extend them) as keywords."""
    return {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "max_steps": 12,
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }


def arguments(tmp_path, **changes) -> TrainingArguments:
    return TrainingArguments(**{**options(tmp_path), **changes})


def make_trainer(tmp_path, model=None, data=None, compute_loss_func=None, **changes) -> Trainer:
    return Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=arguments(tmp_path, **changes),
        train_dataset=data if data is not None else TokenData(),
        compute_loss_func=compute_loss_func,
    )


class BowlForTrainer(nn.Module):
    """A ``Bowl`` as a Trainer's model: ``forward(x)`` returns ``{"loss": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.bowl = Bowl()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.bowl(x)}


class ZerosData(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(1)}


class FollowSharpness(TrainerCallback):
    """Sets a BowlForTrainer's sharpness from the step; add it before the LLC callback."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.bowl.sharpness = bowl_sharpness(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.bowl.sharpness = bowl_sharpness(state.global_step)
