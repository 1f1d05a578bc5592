"""Reduced-rank regression: LLC estimates beside the known learning coefficients.

For y = B A x with input M, hidden H, output N and a true map of rank r, Aoyagi and Watanabe
(2005) give the learning coefficient exactly; the estimates here land within about 10%.
Run: ``python examples/rrr.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llc_callbacks import LLCConfig, estimate_llc
from llc_callbacks.theory import rrr_learning_coefficient


def teacher(m: int, h: int, n: int, r: int) -> nn.Module:
    """The model at the true parameter: y = B A x with A and B of rank r."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(m, h, bias=False), nn.Linear(h, n, bias=False))
    with torch.no_grad():
        a = torch.randn(h, m, generator=generator)
        b = torch.randn(n, h, generator=generator)
        a[r:], b[:, r:] = 0, 0
        model[0].weight.copy_(a)
        model[1].weight.copy_(b)
    return model


def main(cases=((5, 3, 5, 0), (5, 3, 5, 2), (4, 3, 8, 1), (10, 6, 10, 3)), config=None):
    # A weak localization keeps the singular directions open; 1000 burn-in steps suffice.
    config = config or LLCConfig(num_burnin=1000, num_draws=2000, step_size=2e-3, localization=0.3)
    print(f"{'(M, H, N, r)':>14} {'true λ':>8} {'estimate':>18}")
    rows = []
    for case in cases:
        model = teacher(*case)
        x = torch.randn(8192, case[0])
        with torch.no_grad():
            data = DataLoader(TensorDataset(x, model(x)), batch_size=256, shuffle=True)
        result = estimate_llc(model, lambda mdl, b: F.mse_loss(mdl(b[0]), b[1]), data, config)
        truth = rrr_learning_coefficient(*case)
        print(f"{case!s:>14} {truth:8.2f} {result.llc_mean:9.2f} ± {result.llc_std:5.2f}")
        rows.append((case, truth, result.llc_mean))
    return rows


if __name__ == "__main__":
    main()
