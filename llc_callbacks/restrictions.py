"""Weight- and data-restricted LLCs (Wang et al. 2024, arXiv:2410.02984).

A weight restriction samples only the selected weights: outside its selection a chain moves
neither by drift nor by noise, so the rest stay at ``w*``. A data restriction replaces the
loss, in both the sampling and the average, by the loss on another data source. All weight
restrictions on one data source run as one vectorized batch of chains, with a mask per chain.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

from llc_callbacks.forked import ForkedModel
from llc_callbacks.validation import check_bool

# Glob patterns over parameter names (one or several), a submodule of the model, or boolean
# masks by parameter name (each the shape of its parameter: one attention head's rows of a
# fused QKV weight, say).
Selection = Union[str, Sequence[str], nn.Module, Mapping[str, Tensor]]  # noqa: UP007
# Names that would read as a field of the full LLC's metrics (see ``llc_callbacks.keys``).
RESERVED = (
    "diag",
    "mean",
    "std",
    "healthy",
    "init_loss",
    "num_sampled",
    "num_chains",
    "step_size",
)


@dataclass(frozen=True)
class Restrictions:
    """The restricted LLCs to estimate next to the full one.

    Each name in ``weights`` gives the LLC of those weights on the main data, each name in
    ``sources`` the LLC of all weights on that data, and each ``(weights name, sources name)``
    pair of ``combinations`` the LLC of those weights on that data, named
    ``"<weights name>/<sources name>"``. Metrics are ``llc/<name>/mean`` and so on.

    Args:
        weights: Named selections of weights (see ``Selection``).
        sources: Named data sources, each a re-iterable of batches for the same loss.
        combinations: Pairs of a ``weights`` name and a ``sources`` name.
        partition: Require the weight selections not to overlap.

    Raises:
        ValueError: If a name is empty, contains ``/`` or is used twice, a combination names
            an unknown selection or source, or a source is not iterable.
    """

    weights: Mapping[str, Selection] = field(default_factory=dict)
    sources: Mapping[str, Iterable[Any]] = field(default_factory=dict)
    combinations: Sequence[tuple[str, str]] = ()
    partition: bool = False

    def __post_init__(self) -> None:
        for kind in ("weights", "sources"):
            if not isinstance(getattr(self, kind), Mapping):
                raise ValueError(f"{kind} must map names to {kind}, got {getattr(self, kind)!r}")
            for name in getattr(self, kind):
                if not isinstance(name, str) or not name or "/" in name:
                    raise ValueError(
                        f"{kind} names must be non-empty strings without '/', got {name!r}"
                    )
                if name in RESERVED:
                    raise ValueError(
                        f"{kind} names must not be a metric's own name"
                        f" ({', '.join(RESERVED)}), got {name!r}"
                    )
        if shared := set(self.weights) & set(self.sources):
            raise ValueError(f"names used for both weights and sources: {sorted(shared)}")
        for name, source in self.sources.items():
            if not isinstance(source, Iterable):
                raise ValueError(f"sources[{name!r}] must be an iterable of batches")
        object.__setattr__(self, "combinations", tuple(map(tuple, self.combinations)))
        for pair in self.combinations:
            if len(pair) != 2 or pair[0] not in self.weights or pair[1] not in self.sources:
                raise ValueError(
                    f"combinations must pair a weights name with a sources name, got {pair!r}"
                    f" (weights: {sorted(self.weights)}, sources: {sorted(self.sources)})"
                )
        if len(set(self.combinations)) != len(self.combinations):
            raise ValueError("combinations lists a pair twice")
        check_bool("partition", self.partition)

    def without(self, names: Iterable[str]) -> Restrictions:
        """These restrictions less the named selections and sources, and their combinations."""
        left_out = set(names)
        return Restrictions(
            weights={k: v for k, v in self.weights.items() if k not in left_out},
            sources={k: v for k, v in self.sources.items() if k not in left_out},
            combinations=[
                (w, s) for w, s in self.combinations if w not in left_out and s not in left_out
            ],
            partition=self.partition,
        )

    def masks(
        self, forked: ForkedModel, *, failures: dict[str, str] | None = None
    ) -> dict[str, Tensor]:
        """Each weight selection as a boolean mask over the flat sampled weights.

        Args:
            forked: The fork whose flat weights the masks cover.
            failures: Where to record, by name, a selection that fails instead of raising
                (with ``partition``, both selections of an overlapping pair fail).

        Returns:
            The masks by name, without those recorded in ``failures``.

        Raises:
            ValueError: If ``failures`` is ``None`` and a pattern matches no sampled
                parameter, a module holds none, a mask names an unknown parameter or has the
                wrong shape or type, a selection is empty, or (with ``partition``) two
                selections overlap; the message names the selection and the offending
                pattern or parameter.
        """
        masks = {}
        for name, selection in self.weights.items():
            try:
                masks[name] = _mask(name, selection, forked)
            except ValueError as error:
                if failures is None:
                    raise
                failures[name] = str(error)
        if self.partition:
            for (a, mask_a), (b, mask_b) in itertools.combinations(list(masks.items()), 2):
                if a in masks and b in masks and (mask_a & mask_b).any():
                    message = f"weights[{a!r}] and weights[{b!r}] overlap, but partition=True"
                    if failures is None:
                        raise ValueError(message)
                    for name in (a, b):
                        failures[name] = message
                        masks.pop(name)
        return masks


def _mask(name: str, selection: Selection, forked: ForkedModel) -> Tensor:
    mask = torch.zeros_like(forked.anchor, dtype=torch.bool)
    if isinstance(selection, nn.Module):
        names = {
            forked.param_ids[id(p)] for p in selection.parameters() if id(p) in forked.param_ids
        }
        if not names:
            raise ValueError(
                f"weights[{name!r}]: the module holds no sampled parameter of the model"
            )
        for parameter in names:
            mask[forked.layout.slices[parameter]] = True
    elif isinstance(selection, Mapping):
        for parameter, part in selection.items():
            key = _sampled_name(forked, parameter)
            if key is None:
                raise ValueError(f"weights[{name!r}]: {parameter!r} is not a sampled parameter")
            shape = forked.layout.shapes[forked.layout.names.index(key)]
            if not isinstance(part, Tensor) or part.dtype != torch.bool or part.shape != shape:
                raise ValueError(
                    f"weights[{name!r}][{parameter!r}] must be a boolean tensor of shape"
                    f" {tuple(shape)}"
                )
            mask[forked.layout.slices[key]] |= part.reshape(-1).to(mask.device)
    else:
        patterns = [selection] if isinstance(selection, str) else selection
        if (
            not isinstance(patterns, Sequence)
            or not patterns
            or not all(isinstance(p, str) for p in patterns)
        ):
            raise ValueError(
                f"weights[{name!r}] must be glob patterns, a module or a dict of masks,"
                f" got {selection!r}"
            )
        for pattern in patterns:
            matched = {
                key
                for key in [*forked.layout.names, *forked.aliases]
                if fnmatch.fnmatchcase(key.removeprefix("model."), pattern)
            }
            if not matched:
                raise ValueError(
                    f"weights[{name!r}]: pattern {pattern!r} matches no sampled parameter"
                )
            for key in matched:
                mask[forked.layout.slices[forked.aliases.get(key, key)]] = True
    if not mask.any():
        raise ValueError(f"weights[{name!r}] selects no weight")
    return mask


def _sampled_name(forked: ForkedModel, parameter: str) -> str | None:
    key = "model." + parameter
    key = forked.aliases.get(key, key)
    return key if key in forked.layout.slices else None
