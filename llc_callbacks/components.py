"""Named weight selections of a transformer's parts: heads, key-value groups, MLPs, layers.

Each function inspects a transformers model (or a model holding one: a LightningModule, a
PEFT-wrapped model) and returns ``{name: {parameter name: boolean mask}}``, ready for
``Restrictions(weights=...)``, with names a person reads in W&B (``layer3.head5``).

A head's weights are the rows of its query, key and value projections (the output features
that compute its queries, keys and values, biases included) and the columns of the output
projection that read its values. Fused projections are split as each architecture lays them
out: GPT-2's ``c_attn`` holds all queries, then all keys, then all values; GPT-NeoX's
``query_key_value`` interleaves them per head; Phi-3's ``qkv_proj`` holds all queries, then
the key heads, then the value heads. Under grouped-query attention (fewer key-value heads
than query heads) a head's selection holds the key and value rows of its group, which the
other heads of the group share; ``key_value_groups`` gives disjoint units instead. The output
projection's bias serves every head and belongs to none.

Only sampled (trainable) weights are selected. With a LoRA adapter (``peft``) the chains
sample the adapter: a head then holds its rows of ``lora_B`` in the query, key and value
projections and its columns of ``lora_A`` in the output projection, the adapter weights
that act on that head alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Masks = dict[str, Tensor]
Side = Literal["out", "in"]


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its blocks and projections.

    Attributes:
        layers: The name of the blocks' ``ModuleList`` inside the pretrained model (its end).
        q: The query projection inside a block.
        k: The key projection (the same module as ``q`` when fused).
        v: The value projection (the same module as ``q`` when fused).
        out: The attention's output projection.
        mlp: The MLP's modules inside a block.
        fused: How a fused ``q``/``k``/``v`` lays out its output features: ``"blocks"`` (all
            queries, then all keys, then all values) or ``"interleaved"`` (per head: its
            query, key and value); ``None`` for separate projections.
    """

    layers: str
    q: str
    k: str
    v: str
    out: str
    mlp: tuple[str, ...]
    fused: Literal["blocks", "interleaved"] | None = None


_LLAMA = Layout(
    "layers",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    ("mlp",),
)
_BERT = Layout(
    "encoder.layer",
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    ("intermediate", "output"),
)
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("h", *["attn.c_attn"] * 3, "attn.c_proj", ("mlp",), "blocks"),
    "gpt_neox": Layout(
        "layers", *["attention.query_key_value"] * 3, "attention.dense", ("mlp",), "interleaved"
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "phi3": Layout("layers", *["self_attn.qkv_proj"] * 3, "self_attn.o_proj", ("mlp",), "blocks"),
    "bert": _BERT,
    "roberta": _BERT,
    "opt": Layout(
        "decoder.layers",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        ("fc1", "fc2"),
    ),
}


def attention_heads(
    model: nn.Module, *, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None
) -> dict[str, Masks]:
    """Every attention head's weights, as ``layer{i}.head{j}``.

    Args:
        model: A supported transformers model, or a module holding one.
        layers: Only these layers (0-based); all by default.
        heads: Only these heads of each layer; all by default.

    Returns:
        Masks by head name, layers in order and heads in order within a layer.

    Raises:
        ValueError: If the model holds no supported architecture (the message names what it
            found and how to pass masks by hand), or a layer or head is out of range.
    """
    found = _Found(model)
    selections = {}
    for i in found.layers(layers):
        for j in found.indices("heads", heads, found.heads):
            group = j // (found.heads // found.kv_heads)
            selections[f"layer{i}.head{j}"] = _merged(
                found.features(i, "q", j),
                found.features(i, "k", group),
                found.features(i, "v", group),
                found.features(i, "out", j),
            )
    return selections


def key_value_groups(
    model: nn.Module, *, layers: Iterable[int] | None = None, groups: Iterable[int] | None = None
) -> dict[str, Masks]:
    """Each key-value group's weights, as ``layer{i}.kv{g}``: disjoint under grouped queries.

    A group holds its key and value rows and the query rows and output columns of every head
    that reads them. Without grouped-query attention a group is a head.

    Args:
        model: A supported transformers model, or a module holding one.
        layers: Only these layers; all by default.
        groups: Only these groups of each layer; all by default.

    Raises:
        ValueError: As ``attention_heads``.
    """
    found = _Found(model)
    per_group = found.heads // found.kv_heads
    selections = {}
    for i in found.layers(layers):
        for g in found.indices("groups", groups, found.kv_heads):
            members = range(g * per_group, (g + 1) * per_group)
            selections[f"layer{i}.kv{g}"] = _merged(
                found.features(i, "k", g),
                found.features(i, "v", g),
                *(found.features(i, part, j) for j in members for part in ("q", "out")),
            )
    return selections


def mlps(model: nn.Module, *, layers: Iterable[int] | None = None) -> dict[str, Masks]:
    """Each block's MLP, as ``layer{i}.mlp``.

    Raises:
        ValueError: As ``attention_heads``.
    """
    found = _Found(model)
    return {
        f"layer{i}.mlp": _merged(*(found.whole(f"{i}.{path}") for path in found.layout.mlp))
        for i in found.layers(layers)
    }


def blocks(model: nn.Module, *, layers: Iterable[int] | None = None) -> dict[str, Masks]:
    """Each block (attention, MLP and norms), as ``layer{i}``.

    Raises:
        ValueError: As ``attention_heads``.
    """
    found = _Found(model)
    return {f"layer{i}": found.whole(str(i)) for i in found.layers(layers)}


def embeddings(model: nn.Module) -> dict[str, Masks]:
    """The input embeddings as ``embed`` and an untied output head as ``unembed``.

    ``embed`` holds every sampled weight of the embedding tables outside the blocks (tokens,
    and positions and token types where the model learns them); ``unembed`` the output
    head's, when it is not tied to the token embedding. Either is left out when it holds no
    sampled weight.

    Raises:
        ValueError: As ``attention_heads``.
    """
    found = _Found(model)
    output = found.pretrained.get_output_embeddings()
    tables = [
        module
        for module in found.pretrained.modules()
        if isinstance(module, nn.Embedding) and module is not output
    ]
    inside = set(map(id, found.model.get_submodule(found.blocks_name).modules()))
    embed = _merged(*(found.module_masks(m) for m in tables if id(m) not in inside))
    head = found.module_masks(output) if output is not None else {}
    selections = {"embed": embed}
    if not head.keys() & embed.keys():
        selections["unembed"] = head
    return {name: masks for name, masks in selections.items() if masks}


def preview(selections: Mapping[str, Mapping[str, Tensor]]) -> str:
    """A table of each selection's name and number of weights, one line each.

    Args:
        selections: From the functions of this module, or masks of your own.

    Returns:
        The table, ending with the total over selections (overlaps counted twice).
    """
    counts = {
        name: sum(int(mask.sum()) for mask in masks.values()) for name, masks in selections.items()
    }
    width = max([len(name) for name in counts] + [9])
    lines = [f"{'component':{width}} {'weights':>12}"]
    lines += [f"{name:{width}} {count:>12,}" for name, count in counts.items()]
    lines.append(f"{'total':{width}} {sum(counts.values()):>12,}")
    return "\n".join(lines)


class _Found:
    """A supported pretrained model inside ``model``, its layout and attention shapes."""

    def __init__(self, model: nn.Module) -> None:
        from transformers import PreTrainedModel

        found = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, PreTrainedModel)
        ]
        if not found:
            raise ValueError(
                f"found no transformers model in the {type(model).__name__}; pass masks by hand:"
                " Restrictions(weights={name: {parameter name: boolean mask}})"
            )
        root, self.pretrained = found[0]
        self.model = model
        self.prefix = f"{root}." if root else ""
        config = self.pretrained.config
        model_type = getattr(config, "model_type", None)
        if model_type not in LAYOUTS:
            raise ValueError(
                f"per-component selections know {', '.join(sorted(LAYOUTS))}, but the model is"
                f" a {type(self.pretrained).__name__} (model_type {model_type!r}); pass masks"
                " by hand: Restrictions(weights={name: {parameter name: boolean mask}}), each"
                " mask the shape of its parameter (see llc_callbacks.components)"
            )
        self.layout = LAYOUTS[model_type]
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        hidden = int(config.hidden_size)
        self.head_dim = int(getattr(config, "head_dim", None) or hidden // self.heads)
        lists = [
            name
            for name, module in self.pretrained.named_modules()
            if isinstance(module, nn.ModuleList)
            and (name == self.layout.layers or name.endswith("." + self.layout.layers))
        ]
        if len(lists) != 1:
            raise ValueError(
                f"expected one {self.layout.layers!r} list of blocks in the"
                f" {type(self.pretrained).__name__}, found {lists}"
            )
        self.blocks_name = self.prefix + lists[0]
        self.count = len(self.model.get_submodule(self.blocks_name))
        self.trainable = {
            name for name, parameter in model.named_parameters() if parameter.requires_grad
        }

    def layers(self, chosen: Iterable[int] | None) -> list[int]:
        return self.indices("layers", chosen, self.count)

    def indices(self, what: str, chosen: Iterable[int] | None, count: int) -> list[int]:
        """``chosen`` checked against ``range(count)``, or all of it."""
        if chosen is None:
            return list(range(count))
        values = list(chosen)
        if not values or any(
            isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < count for v in values
        ):
            raise ValueError(
                f"{what} must be integers from 0 to {count - 1} (the model has {count}),"
                f" got {values!r}"
            )
        return sorted(set(values))

    def features(self, layer: int, part: Literal["q", "k", "v", "out"], unit: int) -> Masks:
        """The weights of one head's (or key-value group's) features of a projection."""
        size, heads, kv = self.head_dim, self.heads, self.kv_heads
        name = f"{self.blocks_name}.{layer}.{getattr(self.layout, part)}"
        if part == "out":
            return self._projection(name, "in", slice(unit * size, (unit + 1) * size))
        start = unit * size
        if self.layout.fused == "blocks":
            start += {"q": 0, "k": heads * size, "v": (heads + kv) * size}[part]
        elif self.layout.fused == "interleaved":
            start = unit * 3 * size + {"q": 0, "k": size, "v": 2 * size}[part]
        return self._projection(name, "out", slice(start, start + size))

    def whole(self, path: str) -> Masks:
        """Every sampled weight of a submodule of the blocks' list."""
        return self.module_masks(self.model.get_submodule(f"{self.blocks_name}.{path}"))

    def module_masks(self, module: nn.Module) -> Masks:
        """Every sampled weight of ``module``, as full masks."""
        names = {id(p): n for n, p in self.model.named_parameters() if n in self.trainable}
        return {
            names[id(p)]: torch.ones(p.shape, dtype=torch.bool)
            for p in module.parameters()
            if id(p) in names
        }

    def _projection(self, name: str, side: Side, features: slice) -> Masks:
        """The sampled weights of projection ``name`` that touch ``features`` on ``side``.

        A weight matrix holds the output features along its first axis (a ``Conv1D``'s along
        its second), a bias only output features; LoRA's ``lora_A`` mixes the inputs into its
        rank and ``lora_B`` maps its rank to the outputs.
        """
        from transformers.pytorch_utils import Conv1D

        module = self.model.get_submodule(name)
        masks = {}
        for local, parameter in module.named_parameters():
            full = f"{name}.{local}"
            if full not in self.trainable:
                continue
            owner = module.get_submodule(local.rpartition(".")[0])
            leaf = local.rpartition(".")[2]
            if re.search(r"(^|\.)lora_A\.", local):
                axes = {"in": 1}
            elif re.search(r"(^|\.)lora_B\.", local) or leaf == "bias":
                axes = {"out": 0}
            elif isinstance(owner, Conv1D):
                axes = {"in": 0, "out": 1}
            else:
                axes = {"out": 0, "in": 1}
            if side not in axes:
                continue  # shared by every head
            mask = torch.zeros(parameter.shape, dtype=torch.bool)
            mask.narrow(axes[side], features.start, features.stop - features.start).fill_(True)
            masks[full] = mask
        return masks


def _merged(*parts: Masks) -> Masks:
    """The union of several selections, mask by mask."""
    merged: Masks = {}
    for part in parts:
        for name, mask in part.items():
            merged[name] = merged[name] | mask if name in merged else mask.clone()
    return merged
