"""The shortest use: an MLP trained with Lightning, its LLC logged by one callback.

Run: ``python examples/lightning_mlp.py`` (writes CSV logs under ``outputs/lightning_mlp``).
"""

from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks.integrations.lightning import LLCCallback


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        loss = F.cross_entropy(self.net(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(steps: int = 600, every: int = 100, out: Path = Path("outputs/lightning_mlp")):
    L.seed_everything(0)
    inputs = torch.randn(4096, 16)
    labels = (inputs[:, :4] @ torch.randn(4, 4)).argmax(dim=1)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=128, shuffle=True)
    callback = LLCCallback(every_n_steps=every)  # the one line
    trainer = L.Trainer(max_steps=steps, logger=CSVLogger(out), callbacks=[callback])
    trainer.fit(MLP(), loader)
    for row in callback.monitor.history:
        print(f"step {row['step']:4d}  LLC {row['llc/mean']:6.2f} ± {row['llc/std']:.2f}")
    return callback.monitor.history


if __name__ == "__main__":
    main()
