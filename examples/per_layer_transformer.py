"""Per-head and per-MLP LLC curves of a small transformer, from one Lightning callback.

Weight-restricted LLCs (Wang et al. 2024) sample one component's weights at a time: every
attention head and every MLP, named by ``llc_callbacks.components`` in one line, run in one
pass over the data next to the full LLC. The curves are drawn as a heatmap, ordered by layer
and clustered into three types by their shape, and as lines.
Run: ``python examples/per_layer_transformer.py`` (writes to ``outputs/per_layer``).
"""

from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from llc_callbacks import LLCConfig, Restrictions
from llc_callbacks.components import attention_heads, mlps, preview
from llc_callbacks.integrations.lightning import LLCCallback
from llc_callbacks.plotting import plot_components

LAYERS, VOCAB, LENGTH = 3, 32, 16
CLUSTERS = 3  # head and MLP types in the heatmap


class Counting(Dataset):
    """Sequences counting up modulo the vocabulary from random starts."""

    def __init__(self, samples: int = 1024) -> None:
        starts = torch.randint(0, VOCAB, (samples, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class TinyGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(
            n_layer=LAYERS,
            n_head=2,
            n_embd=32,
            vocab_size=VOCAB,
            n_positions=LENGTH,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.gpt = GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        loss = self.gpt(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main(steps: int = 300, every: int = 100, out: Path = Path("outputs/per_layer"), config=None):
    L.seed_everything(0)
    out.mkdir(parents=True, exist_ok=True)
    module = TinyGPT()
    parts = {**attention_heads(module), **mlps(module)}
    print(preview(parts))
    restrictions = Restrictions(weights=parts, partition=True)
    # Short strongly localized chains: per-layer curves to compare in shape, quickly.
    config = config or LLCConfig(num_burnin=100, num_draws=100)
    callback = LLCCallback(config, every_n_steps=every, at_start=True, restrictions=restrictions)
    trainer = L.Trainer(
        max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False
    )
    trainer.fit(module, DataLoader(Counting(), batch_size=32, shuffle=True))
    path = out / "per_layer.png"
    plot_components(callback.monitor.history, path=path, clusters=CLUSTERS)
    print(f"{'step':>4} {'LLC':>6} " + " ".join(f"{name:>12}" for name in parts))
    for row in callback.monitor.history:
        restricted = " ".join(f"{row[f'llc/{name}/mean']:12.2f}" for name in parts)
        print(f"{row['step']:4d} {row['llc/mean']:6.2f} {restricted}")
    print(f"Figure: {path}")
    return callback.monitor.history, path


if __name__ == "__main__":
    main()
