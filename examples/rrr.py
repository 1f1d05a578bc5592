"""Reduced-rank regression: LLC estimates with the defaults beside the known learning coefficients.

For y = B A x + noise with input M, hidden H, output N and a true map of rank r, Aoyagi and
Watanabe (2005) give the learning coefficient exactly. With unit Gaussian noise, 20,000
examples and the per-example negative log-likelihood as the loss, ``LLCConfig()`` lands within
8% of it on these four (``benchmarks/accuracy.py`` measures more models).
Run: ``python examples/rrr.py``.
"""

from torch.utils.data import DataLoader

from llc_callbacks import LLCConfig, estimate_llc
from llc_callbacks.theory import (
    deep_linear_network,
    gaussian_nll,
    regression_data,
    rrr_learning_coefficient,
)


def main(
    cases=((5, 3, 5, 0), (5, 3, 5, 2), (4, 3, 8, 1), (10, 6, 10, 3)),
    config: LLCConfig | None = None,
    samples: int = 20_000,
):
    """Estimate each case ``(M, H, N, r)`` at its truth and print it beside λ."""
    config = config or LLCConfig()
    print(f"{'(M, H, N, r)':>14} {'true λ':>8} {'estimate':>18}")
    rows = []
    for m, h, n, r in cases:
        model = deep_linear_network([m, h, n], r)  # B A with A of rank r
        data = DataLoader(regression_data(model, m, n, samples), batch_size=500, shuffle=True)
        result = estimate_llc(model, gaussian_nll, data, config)
        truth = rrr_learning_coefficient(m, h, n, r)
        print(f"{(m, h, n, r)!s:>14} {truth:8.2f} {result.llc_mean:9.2f} ± {result.llc_std:5.2f}")
        rows.append(((m, h, n, r), truth, result.llc_mean))
    return rows


if __name__ == "__main__":
    main()
