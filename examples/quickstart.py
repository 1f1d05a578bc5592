"""Estimate the LLC of a small MLP before and after training, and print both.

Run: ``make demo`` (or ``python examples/quickstart.py`` in the project's environment).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks import LLCConfig, estimate_llc


def main() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(4096, 8)
    targets = torch.sin(inputs[:, :2].sum(dim=1, keepdim=True))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=256, shuffle=True)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)

    config = LLCConfig(num_chains=4, num_burnin=200, num_draws=200)
    before = estimate_llc(model, loss_fn, loader, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for batch in loader:
            optimizer.zero_grad()
            loss_fn(model, batch).backward()
            optimizer.step()
    after = estimate_llc(model, loss_fn, loader, config)
    params = sum(p.numel() for p in model.parameters())
    print(f"MLP with {params} parameters (a regular model would have LLC {params / 2:.0f})")
    for name, result in (("at initialization", before), ("after training", after)):
        print(
            f"LLC {name:>17}: {result.llc_mean:7.2f} ± {result.llc_std:5.2f}"
            f"  (loss {result.init_loss:.4f}, R-hat {result.diagnostics['rhat']:.2f},"
            f" {result.elapsed_s:.1f} s)"
        )


if __name__ == "__main__":
    main()
