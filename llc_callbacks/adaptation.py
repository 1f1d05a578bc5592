"""Each chain's own tuning inside one estimate: its step size, and when its burn-in and draws end.

Every rule here looks at one chain only, so a chain's numbers do not depend on which other
chains share its batch, its wave or its rank.

- Step size (``StepSizes``): before the draws a stochastic approximation (Robbins and Monro
  1951) drives it towards a target MALA acceptance, after a search for its scale as Stan
  starts its adaptation; it is frozen at the iterates' average for the draws, so the draws
  sample one fixed chain. On deep linear networks of 30 to 10^5 weights, the step size whose
  acceptance is about 0.9 is the one whose estimate lands near the known learning
  coefficient, while that step size shrinks about 35-fold with the size. How a cold chain's
  adaptation and burn-in are laid out, and why, is ``chains._Phases``'s.
- End of burn-in (``settled``): the chain's paired excess loss ``nbeta (L_m(w_t) - L_m(w*))``
  has stopped rising: over the last half of its burn-in so far, the last quarter's mean is
  at most ``SETTLED_Z`` standard errors above the quarter before (standard errors inflated
  for autocorrelation). The windows grow with the burn-in, so a slow climb (the directions
  that only the localization holds relax over ``1 / (eps gamma)`` steps, thousands) is seen
  as long as it lasts, not only the first fast rise. A chain started at ``w*`` climbs by the
  LLC itself before it levels off; a warm-started chain starts near its level.
- End of draws (``precise``): the chain's standard error, from its effective sample size
  (arviz-stats), is small enough that the mean of ``k`` such chains has a standard error of at
  most ``relative_error`` times the estimate.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from arviz_stats.base import array_stats
from torch import Tensor

# The refining iteration's gain, and how many of its latest iterates the frozen step size
# averages (see StepSizes).
GAIN, AVERAGE_OVER = 0.2, 50
# The search multiplies a step size by sqrt(2) at a time: in 10^5 dimensions the acceptance
# falls from near 1 to near 0, and the chain turns unstable, within a factor 2 of step size.
SEARCH_STEP = math.log(2) / 2
# A chain whose mean acceptance over HEAT_CHECKS measurements of its burn-in at a frozen step
# size falls more than HEAT_MARGIN below the target starts that burn-in over with COLD_MARGIN
# smaller steps (20 single-step acceptances average to within about 0.07 of their mean).
COLD_MARGIN, HEAT_CHECKS, HEAT_MARGIN = 0.7, 20, 0.1
# Decisions (the end of burn-in, of the draws) are taken every this many steps.
CHECK_EVERY = 50
# Burn-in lasts at least this long: long enough for the adaptation to converge from a cold
# start, or to correct a warm start's step size.
MIN_BURNIN_COLD, MIN_BURNIN_WARM = 200, 50
# Draws before the first stopping check: the effective sample size needs a few
# autocorrelation times.
MIN_DRAWS = 100
# A rise of the excess loss beyond this many standard errors means the chain still climbs.
SETTLED_Z = 2.0
# A chain whose loss goes NaN or infinite in burn-in restarts from its start with its step
# size divided by this, at most MAX_RESTARTS times before it counts as diverged; its step size
# then stays below half the one it diverged at.
RESTART_SHRINK, MAX_RESTARTS = 10.0, 3


class StepSizes:
    """Each chain's step size: fixed, or adapted during burn-in towards a MALA acceptance.

    Adaptation has two phases. A search multiplies a chain's step size by ``sqrt(2)`` after
    each acceptance above the target and divides it after each below, until the direction
    first reverses (as Stan finds a first step size); the step size goes back to the last
    one accepted, and the chain to its start. Then the stochastic approximation
    ``log eps += GAIN * (acceptance - target)`` refines it; the frozen step size is the
    geometric mean of its last ``AVERAGE_OVER`` iterates (an exponential moving average:
    Polyak's averaging, which removes the iterates' noise). The gain keeps the loop stable:
    the acceptance falls by up to about 5 per unit of ``log eps`` near the target in many
    dimensions, and ``GAIN * 5 = 1`` converges without oscillating, so the iteration does
    not amplify float rounding either (Stan's dual averaging, with its early gain of
    ``sqrt(t) / 0.05`` on single-step acceptances, swung the step size tenfold and made
    chains run in one batch or one at a time part ways). A warm start skips the search.

    Args:
        initial: Each chain's first step size, shape ``(chains,)``.
        adapt: Whether to adapt; if not, every chain keeps its initial step size.
        target: The MALA acceptance to aim for.
        warm: Which chains start from an earlier estimate's step size; ``None``: none.

    Attributes:
        current: The step sizes to use now, shape ``(chains,)``.
    """

    def __init__(
        self, initial: Tensor, adapt: bool, target: float, warm: Tensor | None = None
    ) -> None:
        self.adapt = adapt
        self.target = target
        self.current = initial.clone()
        warm = torch.zeros_like(initial, dtype=torch.bool) if warm is None else warm
        self._searching = ~warm & adapt
        self._any_searching = adapt
        self._direction = torch.zeros_like(initial)
        self._count = torch.zeros_like(initial)
        self._log_average = initial.log()
        self._log_ceiling = torch.full_like(initial, math.inf)

    def update(self, acceptance: Tensor, adapting: Tensor) -> Tensor:
        """One adaptation step for the chains still adapting.

        Args:
            acceptance: Each chain's MALA acceptance of its last step, shape ``(chains,)``.
            adapting: Which chains adapt (those in burn-in).

        Returns:
            Which chains' search ended at this step: the caller puts them back at their
            start, since the search's large steps can drive a chain far out before the
            acceptance falls (see ``chains._Phases``).
        """
        if not self.adapt:
            return torch.zeros_like(adapting)
        acceptance = acceptance.to(self.current.dtype)
        log_current = self.current.log()
        direction = torch.where(acceptance >= self.target, 1.0, -1.0)
        ended = adapting & self._searching & (self._direction != 0)
        ended &= direction != self._direction
        searching = self._searching & ~ended
        count = self._count + (~searching).to(self._count.dtype)
        step = torch.where(searching, direction * SEARCH_STEP, GAIN * (acceptance - self.target))
        step = torch.where(ended, -SEARCH_STEP, step)  # back to the last accepted size
        log_next = torch.minimum(log_current + step, self._log_ceiling)
        weight = 1 / count.clamp(1, AVERAGE_OVER)
        average = self._log_average + weight * (log_next - self._log_average)
        refining = adapting & ~searching
        self._log_average = torch.where(refining, average, self._log_average)
        self._count = torch.where(adapting, count, self._count)
        self._direction = torch.where(adapting, direction, self._direction)
        self._searching = torch.where(adapting, searching, self._searching)
        self.current = torch.where(adapting, log_next.exp(), self.current)
        return ended

    @property
    def searching(self) -> bool:
        """Whether a chain may still be searching, as of the last ``refresh`` (no host read)."""
        return self._any_searching

    def refresh(self) -> None:
        """Learn whether any chain still searches (a host read, while one may)."""
        if self._any_searching:
            self._any_searching = bool(self._searching.any())

    def freeze(self, rows: Tensor) -> None:
        """Fix the step sizes of ``rows`` (a boolean mask) at their refining iterates' mean."""
        if self.adapt:
            averaged = rows & (self._count > 0)
            self.current = torch.where(averaged, self._log_average.exp(), self.current)

    def scale(self, rows: Tensor, factor: float) -> None:
        """Multiply the (frozen) step sizes of ``rows`` by ``factor``."""
        self.current = torch.where(rows, self.current * factor, self.current)

    def restart(self, rows: Tensor) -> None:
        """Adapt ``rows`` again from ``RESTART_SHRINK`` smaller step sizes, searching anew.

        The step size stays below half the one the chain diverged at.
        """
        ceiling = (self.current / 2).log()
        self._log_ceiling = torch.where(rows, ceiling, self._log_ceiling)
        self.current = torch.where(rows, self.current / RESTART_SHRINK, self.current)
        zero = torch.zeros_like(self.current)
        self._searching = self._searching | rows
        self._any_searching = True
        self._direction = torch.where(rows, zero, self._direction)
        self._count = torch.where(rows, zero, self._count)
        self._log_average = torch.where(rows, self.current.log(), self._log_average)


def settled(excess: np.ndarray) -> bool:
    """Whether a chain's excess loss has stopped rising (see the module's docstring).

    Args:
        excess: Its paired excess losses since its burn-in began, in step order.

    Returns:
        ``True`` if, over the last half of them, the last quarter's mean exceeds the quarter
        before by at most ``SETTLED_Z`` standard errors.
    """
    excess = np.asarray(excess, dtype=float)
    quarter = len(excess) // 4
    first, second = excess[-2 * quarter : -quarter], excess[-quarter:]
    error = math.hypot(_mean_error(first), _mean_error(second))
    rise = second.mean() - first.mean()
    return bool(rise <= SETTLED_Z * error) if error > 0 else bool(rise <= 0)


def precise(draws: np.ndarray, chains: int, relative_error: float) -> bool:
    """Whether a chain has drawn enough for the estimate's precision.

    Args:
        draws: The chain's draws so far, ``nbeta`` times its paired excess losses.
        chains: How many chains the estimate averages.
        relative_error: The largest standard error of the estimate, relative to it.

    Returns:
        ``True`` if ``sd / sqrt(ess) <= relative_error * |mean| * sqrt(chains)``, with the
        chain's effective sample size ``ess``: ``chains`` such chains then give a mean whose
        standard error is at most ``relative_error`` of it.
    """
    draws = np.asarray(draws, dtype=float)
    spread = draws.std()
    if spread == 0:
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ess = float(array_stats.ess(draws[None], chain_axis=0, draw_axis=1))
    if not ess > 0:
        return False
    return spread / math.sqrt(ess) <= relative_error * abs(draws.mean()) * math.sqrt(chains)


def _mean_error(values: np.ndarray) -> float:
    """The standard error of a series' mean, inflated by its lag-1 autocorrelation (AR(1))."""
    centered = values - values.mean()
    variance = centered.var()
    if not variance > 0:
        return 0.0
    rho = float(np.clip(np.mean(centered[1:] * centered[:-1]) / variance, 0.0, 0.99))
    return math.sqrt(variance / len(values) * (1 + rho) / (1 - rho))
