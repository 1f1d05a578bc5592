"""Small LightningModules and loaders for the Lightning tests."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from models import Bowl, DropoutBatchNormNet, bowl_sharpness
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks import Restrictions

# The Classifier's first and last layers.
LAYERS = Restrictions(weights={"first": "net.net.0.*", "last": "net.net.4.*"})


class Classifier(L.LightningModule):
    """Dropout and BatchNorm, a logged loss, and an SGD optimizer."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = DropoutBatchNormNet(dropout=dropout)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class BowlModule(L.LightningModule):
    """A ``Bowl`` whose sharpness follows ``bowl_sharpness`` of the global step."""

    def __init__(self) -> None:
        super().__init__()
        self.bowl = Bowl()

    def training_step(self, batch, batch_idx):
        self.bowl.sharpness = bowl_sharpness(self.global_step)
        return self.bowl(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dataset(samples: int = 256) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 6, generator=generator)
    y = (x[:, :3] @ torch.randn(3, 3, generator=generator)).argmax(dim=1)
    return TensorDataset(x, y)


def loader(shuffle: bool = True, batch_size: int = 32) -> DataLoader:
    return DataLoader(dataset(), batch_size=batch_size, shuffle=shuffle)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    """A quiet CPU trainer logging every step."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 12,
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "default_root_dir": tmp_path,
        "logger": False,
    }
    return L.Trainer(**{**options, **kwargs})
