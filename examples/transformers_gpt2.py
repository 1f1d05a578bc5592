"""A tiny GPT-2, built from a config, trained by the transformers Trainer on text that ships
with Python; its LLC is logged by LLCTrainerCallback next to the loss.

The text is the source of Python's own ``json`` package, tokenized by characters: no download.
Run: ``python examples/transformers_gpt2.py`` (writes to ``outputs/transformers_gpt2``).
"""

import inspect
import json.decoder
import json.encoder
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from llc_callbacks import LLCConfig
from llc_callbacks.integrations.huggingface import LLCTrainerCallback


class CharacterChunks(Dataset):
    """Fixed-length chunks of a text, one token per character."""

    def __init__(self, text: str, length: int = 64) -> None:
        self.vocabulary = sorted(set(text))
        index = {char: i for i, char in enumerate(self.vocabulary)}
        ids = torch.tensor([index[char] for char in text])
        self.chunks = ids[: len(ids) // length * length].view(-1, length)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def main(
    steps: int = 300,
    every: int = 100,
    out: Path = Path("outputs/transformers_gpt2"),
    llc: LLCConfig | None = None,
):
    torch.manual_seed(0)
    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    data = CharacterChunks(text)
    config = GPT2Config(
        vocab_size=len(data.vocabulary),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data)
    # Short strongly localized chains: a curve's shape, quickly.
    llc = llc or LLCConfig(num_burnin=50, num_draws=100)
    trainer.add_callback(LLCTrainerCallback(llc, every_n_steps=every))
    trainer.train()
    rows = [row for row in trainer.state.log_history if "llc/mean" in row]
    for row in rows:
        print(f"step {row['step']:4d}  LLC {row['llc/mean']:6.2f} ± {row['llc/std']:.2f}")
    return rows


if __name__ == "__main__":
    main()
