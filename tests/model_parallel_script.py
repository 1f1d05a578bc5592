"""Train with LLCCallback under ModelParallelStrategy (fully_shard) on 2 CPU processes.

Usage: python model_parallel_script.py OUT_DIR MODE, MODE "plain" (no callback), "ok" or
"fail_on_rank_1" (the chains' loss raises on rank 1 only). Run by test_fsdp.py. Writes each
rank's history and the llc_callbacks warnings it showed to OUT_DIR/rank_<rank>.json, and
rank zero's final weights (gathered) to OUT_DIR/weights.pt.
"""

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_helpers import dataset
from models import DropoutBatchNormNet
from ranks import leave
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from llc_callbacks import LLCConfig
from llc_callbacks.integrations.lightning import LLCCallback

MODE = "ok"  # set from the command line
CONFIG = LLCConfig(num_chains=3, num_burnin=10, num_draws=10)
STEPS = [4, 8]


class Sharded(L.LightningModule):
    """A classifier whose layers are sharded with fully_shard over the data-parallel mesh."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DropoutBatchNormNet(dropout=0.0)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loss_fn(module, batch):
    failing = MODE == "fail_on_rank_1" and torch.distributed.get_rank() == 1
    if failing and torch.is_grad_enabled():  # the check at the start passes
        raise RuntimeError("chains failed on rank 1 only")
    return F.cross_entropy(module.net(batch[0]), batch[1])


if __name__ == "__main__":
    OUT, MODE = Path(sys.argv[1]), sys.argv[2]
    L.seed_everything(0, verbose=False)
    callbacks = []
    if MODE != "plain":
        loader = DataLoader(dataset(), batch_size=32, shuffle=True)
        callbacks.append(LLCCallback(CONFIG, steps=STEPS, loss_fn=loss_fn, dataloader=loader))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=8,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    module = Sharded()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(dataset(), batch_size=16, shuffle=True))
    rank = trainer.global_rank
    history = callbacks[0].monitor.history if callbacks else []
    shown = [str(w.message) for w in caught if "llc_callbacks" in str(w.message)]
    (OUT / f"rank_{rank}.json").write_text(json.dumps({"history": history, "warnings": shown}))
    weights = {name: p.full_tensor() for name, p in module.named_parameters()}
    if rank == 0:
        torch.save(weights, OUT / "weights.pt")
    leave()
