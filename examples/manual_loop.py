"""A hand-written PyTorch training loop that tracks the LLC with ``LLCMonitor``.

Run: ``python examples/manual_loop.py`` (in the project's environment).
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks import LLCConfig, LLCMonitor


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def main(steps: int = 600, every: int = 100, config: LLCConfig | None = None) -> LLCMonitor:
    torch.manual_seed(0)
    inputs = torch.randn(2048, 16)
    labels = (inputs[:, :4] @ torch.randn(4, 4)).argmax(dim=1)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=128, shuffle=True)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = LLCMonitor(config, every_n_steps=every, at_start=True, at_end=True)

    monitor.maybe_estimate(0, model, loss_fn, loader)  # at_start: step 0
    step = 0
    while step < steps:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            step += 1
            if metrics := monitor.maybe_estimate(step, model, loss_fn, loader):
                print(f"step {step:4d}  loss {loss.item():.4f}  LLC {metrics['llc/mean']:6.2f}")
            if step == steps:
                break
    monitor.maybe_estimate(step, model, loss_fn, loader, final=True)  # at_end, if not done
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    history = main(args.steps, args.every).history
    print(f"{len(history)} estimates at steps {[row['step'] for row in history]}")
