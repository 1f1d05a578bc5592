"""The outcome of one LLC estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llc_callbacks.chains import ChainStart
from llc_callbacks.config import LLCConfig
from llc_callbacks.diagnostics import problems
from llc_callbacks.keys import DIAGNOSTICS, metric_key


@dataclass(frozen=True)
class LLCResult:
    """One LLC estimate with its chains and diagnostics.

    Attributes:
        llc_mean: Mean of the per-chain estimates over chains that did not diverge; NaN when
            all diverged.
        llc_std: Their standard deviation (``ddof=1``); NaN with fewer than two such chains.
        llc_per_chain: ``nbeta * mean_t(L_m(w_t) - L(w*))`` for each chain, NaN where the
            chain diverged; shape ``(chains,)``.
        loss_trace: Minibatch loss at each draw, shape ``(chains, draws)``; a diverged chain's
            row is NaN from the step it diverged.
        init_loss: ``L(w*)``: paired, the mean loss at ``w*`` on the draws' minibatches;
            unpaired, over ``config.init_loss_batches`` minibatches.
        diagnostics: ``num_diverged``, ``frac_below_init``, ``rhat``, ``ess``, ``trend_z``,
            ``climb``, ``loc_sensitivity`` and, when measured, ``mala_acceptance`` (see
            ``llc_callbacks.diagnostics.chain_diagnostics``; those that compare chains read
            the draws every healthy chain has); and the mean ``burnin`` and ``draws`` and
            the geometric mean ``step_size`` of the chains, and ``warm`` (1 when they started
            from an earlier estimate's ends).
        config: The hyperparameters used.
        nbeta: The inverse temperature used, resolved from ``config.nbeta``.
        vectorized: Whether the chains ran batched with ``vmap``.
        elapsed_s: Wall time of the estimate in seconds.
        precision: The dtype the chains' forward passes ran in (``"bfloat16"`` for a model held
            in bfloat16); their weights, updates and losses are float32 whatever it is.
        observables: Per observable (``estimate_llc(observables=...)``), each chain's
            per-example losses (or what its ``Probe.losses`` returns, flattened) on every
            ``config.observe_every``-th draw, shape ``(chains, records, values)``; NaN after
            a chain diverged.
        restricted: The weight- and data-restricted estimates, by name (see
            ``Restrictions``); empty when none were asked for.
        error: Why the estimate failed (``LLCResult.failed``), or ``None``.
        burnin: Each chain's burn-in steps, shape ``(chains,)``.
        draws: Each chain's draws, shape ``(chains,)``: its LLC is the mean of these.
        step_sizes: The step size each chain drew with, shape ``(chains,)``.
        warm: Whether its chains started where an earlier estimate's ended (``start``);
            ``False``: at ``w*`` (a first estimate, a new restriction, after a resume).
        ends: Where each chain ended (its offset from ``w*`` on the CPU, and its step size):
            ``estimate_llc(start=...)`` of a later estimate starts from them. Not compared.
        more_steps: What gives the chains more steps where ``config.num_burnin`` and
            ``config.num_draws`` do not (a paced streaming reading), for ``problems``' advice.
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    diagnostics: dict[str, float]
    config: LLCConfig
    nbeta: float
    vectorized: bool
    elapsed_s: float
    precision: str = "float32"
    observables: dict[str, np.ndarray] = field(default_factory=dict)
    restricted: dict[str, LLCResult] = field(default_factory=dict)
    error: str | None = None
    burnin: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    draws: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    step_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    warm: bool = False
    ends: list[ChainStart | None] = field(default_factory=list, repr=False, compare=False)
    more_steps: str | None = None

    @property
    def starts(self) -> dict[str | None, list[ChainStart | None]]:
        """Where this estimate's chains ended, by name, as ``estimate_llc(start=...)`` takes."""
        return {None: self.ends, **{name: r.ends for name, r in self.restricted.items()}}

    @classmethod
    def failed(cls, config: LLCConfig, error: str) -> LLCResult:
        """An estimate that could not run: NaN everywhere, and why.

        Args:
            config: The hyperparameters it was to use.
            error: What went wrong.
        """
        return cls(
            llc_mean=math.nan,
            llc_std=math.nan,
            llc_per_chain=np.full(config.num_chains, math.nan),
            loss_trace=np.empty((config.num_chains, 0)),
            init_loss=math.nan,
            diagnostics={},
            config=config,
            nbeta=math.nan,
            vectorized=False,
            elapsed_s=0.0,
            error=error,
        )

    def problems(self) -> dict[str, str]:
        """The health checks this estimate fails, each with what to change.

        Returns:
            ``{check: message}``, with ``<name>/<check>`` for the restricted estimates; empty
            when every check passes. See ``llc_callbacks.diagnostics.problems`` for the
            checks and their thresholds.
        """
        if self.error is not None:
            return {"failed": f"the estimate failed and is NaN: {self.error}"}
        return {**self._own_problems(), **restricted_problems(self.restricted)}

    def to_metrics(self, prefix: str = "llc") -> dict[str, float]:
        """Flat metrics for a logger.

        Args:
            prefix: First part of every key.

        Returns:
            ``{prefix}/mean``, ``{prefix}/std``, ``{prefix}/healthy`` (1.0 when every
            health check of ``problems`` passes, else 0.0), ``{prefix}/chain_<i>``,
            ``{prefix}/init_loss`` and ``{prefix}/diag/<name>`` for each diagnostic, as floats
            (only ``mean`` and ``std``, NaN, and ``healthy`` 0.0 for a failed estimate); and
            the same under ``{prefix}/<name>/`` for each restricted estimate (see
            ``llc_callbacks.keys``).
        """
        return {
            metric_key(prefix, field, restriction): value
            for restriction, result in [(None, self), *self.restricted.items()]
            for field, value in result._fields().items()
        }

    def _fields(self) -> dict[str, float]:
        fields = {"mean": self.llc_mean, "std": self.llc_std}
        if self.error is not None:
            return {**fields, "healthy": 0.0}
        fields["healthy"] = float(not self._own_problems())
        fields.update({f"chain_{i}": float(v) for i, v in enumerate(self.llc_per_chain)})
        fields["init_loss"] = self.init_loss
        fields.update({f"{DIAGNOSTICS}/{k}": float(v) for k, v in self.diagnostics.items()})
        return fields

    def _own_problems(self) -> dict[str, str]:
        """The checks this estimate fails, its restrictions' aside."""
        kept = np.isfinite(self.llc_per_chain)
        return problems(
            self.llc_mean,
            self.init_loss,
            self.diagnostics,
            self.config,
            burnin=self.burnin[kept],
            draws=self.draws[kept],
            more_steps=self.more_steps,
        )


def restricted_problems(results: dict[str, LLCResult]) -> dict[str, str]:
    """The failed checks of restricted estimates, as ``{"<name>/<check>": message}``."""
    return {
        f"{name}/{check}": f"restricted LLC {name!r}: {message}"
        for name, result in results.items()
        for check, message in result.problems().items()
    }
