"""Sampling hyperparameters for LLC estimation, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from llc_callbacks.validation import check_bool, check_choice, check_float, check_int

NBeta = float | Literal["batch", "dataset"]
SAMPLERS = ("sgld", "rmsprop_sgld")
VECTORIZE = ("auto", True, False)
AUTOCAST = (None, "bfloat16", "float16")
COMPILE = (False, True, "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class LLCConfig:
    """Hyperparameters of one LLC estimate; keep them fixed through a training run.

    The defaults aim at an LLC curve through training, read by chains that persist
    (``LLCMonitor(stream=True)``): a localization (``100``, as published curves of language
    models use, 100 to 300) strong enough that a chain relaxes along the directions the loss
    leaves flat within a few dozen steps (over about ``2 / (eps gamma)``), so that chains
    keep up with weights that move; ``nbeta = B / log B``, and 4 chains that tune themselves
    (``llc_callbacks.adaptation``): each adapts its step size during burn-in towards a MALA
    acceptance of 0.9, ends its burn-in once its loss has settled (at most 1,000 steps), and
    (a snapshot estimate) draws until the estimate's standard error is 5% of it (at most
    1,000 draws). The level then sits below the learning coefficient (about half of it on
    deep linear networks), a curve's shape and turns kept (``benchmarks/curves.py``);
    ``LLCConfig.accurate()`` aims at the learning coefficient itself (``docs/accuracy.md``).

    Args:
        num_chains: Independent SGLD chains; the estimate is their mean, the spread their std.
        num_burnin: The most steps per chain before draws are recorded: with
            ``step_size="adapt"`` burn-in ends earlier, once the chain has settled; with a
            number, it lasts exactly this long.
        num_draws: The most steps per chain whose minibatch losses enter the estimate (all
            of them with ``relative_error=None``, or with observables).
        step_size: ``"adapt"``: each chain tunes its own SGLD step size during burn-in (from
            1e-4, or from the previous estimate's) towards ``target_acceptance``, then keeps
            it for its draws. A number: that step size epsilon for every chain and step; too
            large makes chains diverge or fall below the initial loss, too small leaves them
            climbing (``calibrate`` sweeps it).
        target_acceptance: The MALA acceptance an adapting step size aims for.
        relative_error: Each chain draws until the estimate's standard error (from its
            effective sample size) is at most this fraction of the estimate; ``None``: every
            chain draws ``num_draws``.
        warm_start: In a monitor or callback, start each estimate's chains where the
            previous estimate's ended (their offsets from its weights, and their step sizes;
            see ``LLCMonitor``). ``estimate_llc`` takes the start as its own argument.
        localization: Strength gamma of the pull back towards the current weights; the
            estimate falls as it grows (``LLCResult.diagnostics["loc_sensitivity"]``).
        nbeta: Inverse temperature n*beta. ``"batch"`` uses ``B / log B`` with ``B`` the
            examples of ``batches_per_step`` sampling batches (devinterp's convention);
            ``"dataset"`` uses ``n / log n`` with ``n = dataset_size`` (needs a much smaller
            step size); a number is used as is.
        dataset_size: The ``n`` of ``nbeta="dataset"``; must be left unset otherwise.
        batches_per_step: ``nbeta="batch"`` counts the examples of this many sampling
            batches: the micro-batches of one optimizer step (gradient accumulation steps x
            data-parallel ranks), so that the estimate does not depend on how a step's batch
            is split. ``None``: 1 in ``estimate_llc`` and a hand-written loop, the trainer's
            in the callbacks.
        sampler: ``"sgld"`` or ``"rmsprop_sgld"`` (RMSprop-preconditioned SGLD).
        rmsprop_alpha: Decay of the running mean of squared gradients (``rmsprop_sgld``).
        rmsprop_eps: Added to ``sqrt(v)`` in the preconditioner ``1 / (sqrt(v) + eps)``.
        paired: Average ``L_m(w_t) - L_m(w*)`` on the same minibatch (much less spread between
            chains, one extra forward pass per draw) instead of ``L_m(w_t) - L(w*)``.
        seed: Seeds the chains' noise and the data order; same seed, same numbers.
        vectorize: Run chains batched with ``torch.func.vmap`` (``True``), one after another
            (``False``), or batched when the model supports it (``"auto"``).
        init_loss_batches: Minibatches averaged for ``L(w*)`` when ``paired=False`` (paired,
            ``L(w*)`` is the mean of the draws' losses at ``w*``, on their minibatches).
        mala: Also measure the MALA acceptance on every tenth draw (one more gradient each);
            healthy near 0.9, low when the step size is too large and the LLC inflated.
        chains_in_flight: At most this many chains are held in memory and step together; the
            others run afterwards, in waves, on the same minibatches (kept in memory for
            them), so the numbers do not depend on it but for float rounding. Each chain in
            flight takes twice the sampled weights' float32 size plus activations.
            ``"auto"``: every chain at once on CPU; on CUDA as many as fit in 80% of the free
            memory, at a footprint measured on the first batch.
        observe_every: With ``observables`` (see ``estimate_llc``), record their per-example
            losses on every this-many-th draw.
        observables_max_mb: The most memory (MB, float32) the recorded observables may take:
            chains x records x examples x 4 bytes; an estimate that would need more is
            refused before it starts.
        autocast: Run the chains' forward and backward passes under ``torch.autocast`` in
            this dtype (``"bfloat16"`` or ``"float16"``), as mixed-precision training does;
            their float32 weights take the updates. ``None``: no autocast, but in a
            callback whose chains run on CUDA, which follows the trainer's mixed precision
            (``bf16-mixed``, ``16-mixed``; ``bf16=True``, ``fp16=True``); on the CPU
            autocast is slower than float32 (``LLCMonitor`` warns when it is asked for).
        compile: Compile the chains' batched forward and backward pass with
            ``torch.compile(fullgraph=True)``: ``True`` in its default mode, or a mode's
            name (``"reduce-overhead"``: CUDA graphs, for shapes that stay the same); the
            first estimate pays the compilation (see the README's "Cost"). Needs
            ``vectorize`` to batch the chains; one chain at a time runs uncompiled.

    Raises:
        ValueError: If a value is outside its accepted range; the message names the argument.
    """

    num_chains: int = 4
    num_burnin: int = 1000
    num_draws: int = 1000
    step_size: float | Literal["adapt"] = "adapt"
    target_acceptance: float = 0.9
    relative_error: float | None = 0.05
    warm_start: bool = True
    localization: float = 100.0
    nbeta: NBeta = "batch"
    dataset_size: int | None = None
    batches_per_step: int | None = None
    sampler: Literal["sgld", "rmsprop_sgld"] = "sgld"
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.1
    paired: bool = True
    seed: int = 0
    vectorize: Literal["auto"] | bool = "auto"
    init_loss_batches: int = 8
    mala: bool = True
    chains_in_flight: int | Literal["auto"] = "auto"
    observe_every: int = 10
    observables_max_mb: float = 256.0
    autocast: Literal["bfloat16", "float16"] | None = None
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False

    def __post_init__(self) -> None:
        check_int("num_chains", self.num_chains, minimum=1)
        check_int("num_burnin", self.num_burnin, minimum=0)
        check_int("num_draws", self.num_draws, minimum=1)
        if self.step_size != "adapt":
            try:
                check_float("step_size", self.step_size, positive=True)
            except ValueError:
                raise ValueError(
                    f"step_size must be a finite number > 0 or 'adapt', got {self.step_size!r}"
                ) from None
        check_float("target_acceptance", self.target_acceptance, positive=True)
        if self.target_acceptance >= 1:
            raise ValueError(f"target_acceptance must be in (0, 1), got {self.target_acceptance!r}")
        if self.relative_error is not None:
            check_float("relative_error", self.relative_error, positive=True)
        check_float("localization", self.localization, positive=False)
        if isinstance(self.nbeta, str):
            if self.nbeta not in ("batch", "dataset"):
                raise ValueError(
                    f"nbeta must be 'batch', 'dataset' or a positive number, got {self.nbeta!r}"
                )
        else:
            check_float("nbeta", self.nbeta, positive=True)
        if self.nbeta == "dataset":
            if self.dataset_size is None:
                raise ValueError("dataset_size is required when nbeta='dataset'")
            check_int("dataset_size", self.dataset_size, minimum=2)
        elif self.dataset_size is not None:
            raise ValueError(
                f"dataset_size is only used with nbeta='dataset', got nbeta={self.nbeta!r}"
            )
        check_int("batches_per_step", self.batches_per_step, minimum=1, optional=True)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_float("rmsprop_alpha", self.rmsprop_alpha, positive=True)
        if self.rmsprop_alpha >= 1:
            raise ValueError(f"rmsprop_alpha must be in (0, 1), got {self.rmsprop_alpha!r}")
        check_float("rmsprop_eps", self.rmsprop_eps, positive=True)
        check_bool("paired", self.paired)
        check_bool("warm_start", self.warm_start)
        check_int("seed", self.seed, minimum=0)
        check_choice("vectorize", self.vectorize, VECTORIZE)
        check_int("init_loss_batches", self.init_loss_batches, minimum=1)
        check_bool("mala", self.mala)
        if self.chains_in_flight != "auto":
            try:
                check_int("chains_in_flight", self.chains_in_flight, minimum=1)
            except ValueError:
                raise ValueError(
                    "chains_in_flight must be an integer >= 1 or 'auto',"
                    f" got {self.chains_in_flight!r}"
                ) from None
        check_int("observe_every", self.observe_every, minimum=1)
        check_float("observables_max_mb", self.observables_max_mb, positive=True)
        check_choice("autocast", self.autocast, AUTOCAST)
        check_choice("compile", self.compile, COMPILE)
        if self.compile is not False and self.vectorize is False:
            raise ValueError(
                "compile compiles the batched chains: it needs vectorize=True or 'auto',"
                " got vectorize=False"
            )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """``autocast`` as a torch dtype."""
        return None if self.autocast is None else getattr(torch, self.autocast)

    @property
    def compile_mode(self) -> str | None:
        """``compile`` as ``torch.compile``'s mode, or ``None`` when the chains run eagerly."""
        if self.compile is False:
            return None
        return "default" if self.compile is True else self.compile

    @property
    def observed_draws(self) -> int:
        """How many draws record the observables: every ``observe_every``-th."""
        return len(range(0, self.num_draws, self.observe_every))

    @classmethod
    def accurate(cls, **changes: object) -> LLCConfig:
        """For the learning coefficient itself: the defaults until the curves' ones.

        A localization (``5``) weak enough to leave the posterior's shape to the loss and
        strong enough for chains to relax within an estimate (over about ``1 / (eps gamma)``
        steps, hundreds). Checked against deep linear networks whose learning coefficient is
        known, from 30 to 100,000 weights (within 15%: ``benchmarks/accuracy.py``,
        ``docs/accuracy.md``). Streaming chains relax too slowly at it to keep up with
        weights that move (``benchmarks/curves.py``).

        Args:
            **changes: Fields to set otherwise, as in ``LLCConfig(...)``.

        Returns:
            The config.
        """
        return cls(**{"localization": 5.0, **changes})

    def resolve_nbeta(self, batch_size: int) -> float:
        """The inverse temperature n*beta for a sampling batch size.

        Args:
            batch_size: Number of examples in one sampling minibatch.

        Returns:
            ``B / log B`` with ``B = batch_size x batches_per_step``, ``n / log n`` or the
            given number, as ``nbeta`` asks.

        Raises:
            ValueError: If ``nbeta="batch"`` and ``B`` is below 2.
        """
        if self.nbeta == "batch":
            examples = batch_size * (self.batches_per_step or 1)
            if examples < 2:
                raise ValueError(
                    f"nbeta='batch' needs a sampling batch size of at least 2, got {batch_size};"
                    " pass nbeta as a number"
                )
            return examples / math.log(examples)
        if self.nbeta == "dataset":
            return self.dataset_size / math.log(self.dataset_size)
        return float(self.nbeta)
