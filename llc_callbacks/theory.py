"""Learning coefficients known in closed form, to check estimates against."""

from __future__ import annotations

from llc_callbacks.validation import check_int


def rrr_learning_coefficient(m: int, h: int, n: int, r: int) -> float:
    """The learning coefficient of reduced-rank regression ``y = B A x`` at a rank-``r`` truth.

    Aoyagi and Watanabe (2005), "Stochastic complexities of reduced rank regression in
    Bayesian estimation", Neural Networks 18(7), Theorem 1. It holds for the per-example
    negative log-likelihood with unit noise, ``0.5 * ((f(x) - y) ** 2).sum(-1).mean()``.

    Args:
        m: Input width M.
        h: Hidden width H.
        n: Output width N.
        r: Rank r of the true map, at most ``min(m, h, n)``.

    Returns:
        The learning coefficient λ; for example 6.5 for ``(5, 3, 5, 0)``, 9.5 for
        ``(5, 3, 5, 2)`` and 35 for ``(10, 6, 10, 3)``.

    Raises:
        ValueError: If a width is below 1 or ``r`` is outside ``[0, min(m, h, n)]``.
    """
    for name, value in (("m", m), ("h", h), ("n", n)):
        check_int(name, value, minimum=1)
    check_int("r", r, minimum=0)
    if r > min(m, h, n):
        raise ValueError(f"r must be at most min(m, h, n) = {min(m, h, n)}, got {r}")
    if m + h < n + r:
        return (h * m - h * r + n * r) / 2
    if n + h < m + r:
        return (h * n - h * r + m * r) / 2
    if m + n < h + r:
        return m * n / 2
    value = (2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2) / 8
    return value + (1 / 8 if (m + h + n + r) % 2 else 0)
