"""TRL's trainers: what the chains sample inside ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``.

TRL's own losses cannot run in the chains: they go through a fused LM-head
``autograd.Function`` that ``vmap`` cannot batch, and they append to the trainer's metric
buffers with a host sync (``.item()``) per call. Each trainer gets here a plain loss of the
same meaning, computed from the logits, that runs batched over chains and touches nothing of
the trainer's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer
from typing_extensions import override

from llc_callbacks.data import to_device
from llc_callbacks.distributed import rank_and_world
from llc_callbacks.forked import LossFn

# The columns of GRPO's generation buffer the completion loss reads.
COMPLETION_COLUMNS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


class Objective:
    """What the chains sample inside one TRL trainer, in place of the trainer's own loss.

    Attributes:
        loss_fn: The chains' ``loss_fn(model, batch)``.
        note: What the chains compute, said once when training starts.
    """

    loss_fn: LossFn
    note: str

    def data(self, given: Iterable[Any] | None, default: Callable[[], Iterable[Any]]) -> Any:
        """The chains' batches: the user's ``given`` loader, else the callback's ``default``."""
        return given if given is not None else default()

    def ready(self) -> bool:
        """Whether the chains' data exist yet (GRPO's exist after its first generation)."""
        return True

    def observe(self, trainer: Trainer) -> bool:
        """Take what the data need from the trainer after a step; whether anything changed."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the objective (JSON-serializable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict``."""


def objective(trainer: Trainer) -> Objective | None:
    """The chains' objective inside a TRL trainer; ``None`` for any other ``Trainer``.

    Raises:
        ValueError: If the trainer's loss is one that has no plain equivalent here (some DPO
            loss types and options), naming the setting and ``loss_fn=...`` as the way out.
    """
    try:
        import trl
    except ImportError:
        return None
    if isinstance(trainer, trl.SFTTrainer):
        return TokenObjective()
    if isinstance(trainer, trl.DPOTrainer):
        return PreferenceObjective(trainer)
    if isinstance(trainer, trl.GRPOTrainer):
        return CompletionObjective(trainer)
    return None


class TokenObjective(Objective):
    """``SFTTrainer``: the mean token NLL over the labelled tokens (the trainer's masks)."""

    note = (
        "inside SFTTrainer the chains sample the mean token NLL over the labelled tokens"
        " (completion or assistant tokens where the trainer masks the rest), from the"
        " logits: TRL's fused LM head cannot run batched over chains"
    )

    def __init__(self) -> None:
        self.loss_fn = token_nll


def token_nll(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The mean NLL of the tokens whose label is not ``-100``: the model's own loss.

    What ``SFTTrainer`` minimises with ``loss_type="nll"`` and no ``num_items_in_batch``.
    """
    return model(**batch, use_cache=False).loss


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Each completion token's log-probability given what precedes it, zero elsewhere.

    Args:
        model: A causal language model.
        input_ids: ``(rows, length)`` prompt and completion tokens.
        attention_mask: ``(rows, length)``, zero on padding.
        completion_mask: ``(rows, length)``, one on the completion's tokens.
        temperature: What the logits are divided by (GRPO's sampling temperature).

    Returns:
        ``(rows, length - 1)``: position ``t`` holds ``log p(token t+1 | tokens <= t)``.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    picked = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return picked * completion_mask[:, 1:]


class PreferenceLoss:
    """A DPO loss of the trainer's ``beta``, loss types and weights, on pairs of completions.

    A batch stacks the chosen completions over the rejected ones (TRL's collator) and holds
    the reference model's log-probabilities of both (``ref_chosen_logps``,
    ``ref_rejected_logps``), fixed while the chains move.

    Args:
        beta: DPO's ``beta``.
        loss_types: TRL's loss types, summed with ``loss_weights``.
        loss_weights: One weight per loss type.
        label_smoothing: The ``robust`` loss's assumed share of flipped labels.
    """

    def __init__(
        self,
        beta: float,
        loss_types: list[str],
        loss_weights: list[float],
        label_smoothing: float,
    ) -> None:
        unknown = sorted(set(loss_types) - set(PAIR_LOSSES))
        if unknown:
            raise ValueError(
                f"DPOConfig(loss_type={unknown}) has no plain equivalent for the LLC chains"
                f" (supported: {sorted(PAIR_LOSSES)}): pass loss_fn=... to LLCTrainerCallback"
            )
        self.beta = beta
        self.terms = list(zip(loss_types, loss_weights, strict=True))
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """The mean over the batch's pairs of the weighted per-pair losses."""
        mask = batch["completion_mask"]
        per_token = completion_logps(model, batch["input_ids"], batch["attention_mask"], mask)
        chosen, rejected = per_token.sum(dim=1).chunk(2)
        pairs = _Pairs(
            chosen=chosen - batch["ref_chosen_logps"],
            rejected=rejected - batch["ref_rejected_logps"],
            lengths=mask.sum(dim=1).clamp(min=1).chunk(2),
            chosen_nll=-per_token.chunk(2)[0].sum() / mask[:, 1:].chunk(2)[0].sum().clamp(min=1),
            beta=self.beta,
            smoothing=self.label_smoothing,
        )
        return sum(weight * PAIR_LOSSES[kind](pairs).mean() for kind, weight in self.terms)

    def count_examples(self, batch: dict[str, Any]) -> int:
        """The preference pairs in a batch (half its rows): what ``nbeta="batch"`` counts."""
        return batch["input_ids"].shape[0] // 2


class _Pairs:
    """What the pair losses read: log-ratios to the reference, lengths, ``beta``."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)
        self.margin = self.chosen - self.rejected


def _normalised_margin(p: _Pairs) -> Tensor:
    return p.chosen / p.lengths[0] - p.rejected / p.lengths[1]


# Per-pair losses of TRL's DPO loss types, from the log-ratios chosen and rejected (the
# reverse KL divergence, TRL's default, without WPO weighting or LD-DPO's alpha).
PAIR_LOSSES: dict[str, Callable[[_Pairs], Tensor]] = {
    "sigmoid": lambda p: -F.logsigmoid(p.beta * p.margin),
    "hinge": lambda p: torch.relu(1 - p.beta * p.margin),
    "ipo": lambda p: (_normalised_margin(p) - 1 / (2 * p.beta)) ** 2,
    "robust": lambda p: (
        (
            -(1 - p.smoothing) * F.logsigmoid(p.beta * p.margin)
            + p.smoothing * F.logsigmoid(-p.beta * p.margin)
        )
        / (1 - 2 * p.smoothing)
    ),
    "bco_pair": lambda p: -F.logsigmoid(p.beta * p.chosen) - F.logsigmoid(-p.beta * p.rejected),
    "nca_pair": lambda p: (
        -F.logsigmoid(p.beta * p.chosen)
        - 0.5 * F.logsigmoid(-p.beta * p.chosen)
        - 0.5 * F.logsigmoid(-p.beta * p.rejected)
    ),
    "sppo_hard": lambda p: (p.chosen - 0.5 / p.beta) ** 2 + (p.rejected + 0.5 / p.beta) ** 2,
    "apo_zero": lambda p: 1 - torch.sigmoid(p.beta * p.chosen) + torch.sigmoid(p.beta * p.rejected),
    "apo_down": lambda p: torch.sigmoid(p.beta * p.chosen) + 1 - torch.sigmoid(p.beta * p.margin),
    "sigmoid_norm": lambda p: -F.logsigmoid(p.beta * _normalised_margin(p)),
    "sft": lambda p: p.chosen_nll.expand(p.chosen.shape),
}


class PreferenceObjective(Objective):
    """``DPOTrainer``: its DPO loss, with the reference log-probabilities held fixed.

    The reference log-probabilities come from the batch's precomputed columns
    (``precompute_ref_log_probs``), else from the reference model (or the PEFT model with its
    adapters disabled, as TRL takes it), once per minibatch the chains draw, shared by every
    chain.

    Raises:
        ValueError: For an f-divergence other than the reverse KL, WPO weighting, LD-DPO's
            ``ld_alpha`` or a loss type without a plain equivalent.
    """

    note = (
        "inside DPOTrainer the chains sample its DPO loss from the logits, with the reference"
        " log-probabilities computed once per minibatch: TRL's fused LM head cannot run"
        " batched over chains"
    )

    def __init__(self, trainer: Trainer) -> None:
        args = trainer.args
        for name, value, plain in [
            ("f_divergence_type", args.f_divergence_type, "reverse_kl"),
            ("use_weighting", args.use_weighting, False),
            ("ld_alpha", args.ld_alpha, None),
        ]:
            if value != plain:
                raise ValueError(
                    f"DPOConfig({name}={value!r}) has no plain equivalent for the LLC chains"
                    f" (supported: {plain!r}): pass loss_fn=... to LLCTrainerCallback"
                )
        self.trainer = trainer
        self.loss_fn = PreferenceLoss(
            trainer.beta, trainer.loss_types, trainer.loss_weights, trainer.label_smoothing
        )

    @override
    def data(self, given: Iterable[Any] | None, default: Callable[[], Iterable[Any]]) -> Any:
        return _WithReference(super().data(given, default), self.trainer)


class _WithReference:
    """A DPO trainer's batches with the reference log-probabilities of their completions.

    The reference is the trainer's ``ref_model``, else its PEFT model with the adapters
    disabled (or the adapter named ``"ref"``), as TRL takes it; the forward runs here rather
    than through ``trainer.compute_ref_log_probs``, which toggles gradient checkpointing on
    the live model and so adds a hook to it at every call.
    """

    def __init__(self, data: Iterable[dict[str, Any]], trainer: Trainer) -> None:
        self.data = data
        self.trainer = trainer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.data:
            if "ref_chosen_logps" not in batch:
                batch = to_device(batch, self.trainer.accelerator.device)
                chosen, rejected = self._reference_logps(batch)
                batch = {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
            yield batch

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        trainer = self.trainer
        model, adapters = trainer.ref_model, contextlib.nullcontext()
        if model is None:  # a PEFT model: TRL refuses any other trainer without a reference
            from trl.trainer.utils import use_adapter

            model = trainer.accelerator.unwrap_model(trainer.model)
            adapters = use_adapter(model, "ref" if "ref" in model.peft_config else None)
        with adapters:
            logps = completion_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        return logps.sum(dim=1).chunk(2)


class CompletionObjective(Objective):
    """``GRPOTrainer``: the policy's NLL of a fixed buffer of its own completions.

    GRPO's loss is a policy-gradient surrogate of rewards whose value says nothing of how
    well the model fits anything; its data are generated on-policy and replaced every few
    steps. The chains sample instead the mean NLL, at the trainer's sampling temperature, of
    the completion tokens of the trainer's first generation, kept for the whole run (and in
    its checkpoints), so that every estimate of a run measures one loss. Under ``torchrun``
    every rank keeps rank zero's.
    """

    note = (
        "inside GRPOTrainer the chains sample the policy's mean NLL (at its temperature) of"
        " the completions of the trainer's first generation, kept for the run; the first"
        " estimate can come after the first step"
    )

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.loss_fn = CompletionLoss(trainer.temperature)
        self.buffer: dict[str, Tensor] | None = None

    @override
    def data(self, given: Iterable[Any] | None, default: Callable[[], Iterable[Any]]) -> Any:
        return given if given is not None else _Buffer(self)

    @override
    def ready(self) -> bool:
        return self.buffer is not None

    @override
    def observe(self, trainer: Trainer) -> bool:
        generated = getattr(trainer, "_buffered_inputs", None)
        if self.buffer is not None or not generated:
            return False
        buffer = {
            column: torch.cat([part[column].detach().cpu() for part in generated])
            for column in COMPLETION_COLUMNS
        }
        if rank_and_world()[1] > 1:  # every rank's chains read rank zero's completions
            shared = [buffer]
            torch.distributed.broadcast_object_list(shared, src=0)
            buffer = shared[0]
        self.buffer = buffer
        return True

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        return {"completions": {column: t.tolist() for column, t in self.buffer.items()}}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "completions" in state:
            self.buffer = {c: torch.tensor(v) for c, v in state["completions"].items()}


class _Buffer:
    """The kept completions as batches of the trainer's per-device batch size, shuffled."""

    def __init__(self, owner: CompletionObjective) -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        buffer = self.owner.buffer
        if buffer is None:
            return iter(())
        rows = [
            {column: values[i] for column, values in buffer.items()}
            for i in range(len(buffer["prompt_ids"]))
        ]
        size = self.owner.trainer.args.per_device_train_batch_size
        return iter(DataLoader(rows, batch_size=size, shuffle=True))


class CompletionLoss:
    """The mean NLL of the completion tokens given their prompts, at a temperature.

    Args:
        temperature: What the logits are divided by, as when the completions were sampled.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The mean NLL over the batch's completion tokens."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        mask = torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], 1)
        logps = completion_logps(model, input_ids, attention_mask, mask, self.temperature)
        return -logps.sum() / mask[:, 1:].sum().clamp(min=1)
