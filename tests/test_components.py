"""Per-head and per-component selections of real transformers architectures (issue: per-head
LLCs), on tiny models built from configs: each head's selection is exactly that head."""

import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

from llc_callbacks.components import (
    attention_heads,
    blocks,
    embeddings,
    key_value_groups,
    mlps,
    preview,
)

HEADS, KV_HEADS, HIDDEN = 4, 2, 32  # head size 8; grouped-query models share keys in pairs
SMALL = {"num_hidden_layers": 2, "num_attention_heads": HEADS, "hidden_size": HIDDEN}
CONFIGS = {
    "gpt2": T.GPT2Config(n_layer=2, n_head=HEADS, n_embd=HIDDEN, vocab_size=64, n_positions=16),
    "pythia": T.GPTNeoXConfig(**SMALL, intermediate_size=64, vocab_size=64),
    "llama": T.LlamaConfig(**SMALL, num_key_value_heads=KV_HEADS, intermediate_size=64,
                           vocab_size=64),
    "qwen2": T.Qwen2Config(**SMALL, num_key_value_heads=KV_HEADS, intermediate_size=64,
                           vocab_size=64),
    "mistral": T.MistralConfig(**SMALL, num_key_value_heads=KV_HEADS, intermediate_size=64,
                               vocab_size=64),
    "phi3": T.Phi3Config(**SMALL, num_key_value_heads=KV_HEADS, intermediate_size=64,
                         vocab_size=64, pad_token_id=0),
    "bert": T.BertConfig(**SMALL, intermediate_size=64, vocab_size=64),
    "roberta": T.RobertaConfig(**SMALL, intermediate_size=64, vocab_size=64,
                               max_position_embeddings=40),
    "opt": T.OPTConfig(**SMALL, ffn_dim=64, vocab_size=64, word_embed_proj_dim=HIDDEN),
}  # fmt: skip
# The attention's output projection in layer 1: its input holds every head's values, head by
# head (written out here, not taken from the code under test).
OUTPUT_PROJECTIONS = {
    "gpt2": "transformer.h.1.attn.c_proj",
    "pythia": "gpt_neox.layers.1.attention.dense",
    "llama": "model.layers.1.self_attn.o_proj",
    "qwen2": "model.layers.1.self_attn.o_proj",
    "mistral": "model.layers.1.self_attn.o_proj",
    "phi3": "model.layers.1.self_attn.o_proj",
    "bert": "bert.encoder.layer.1.attention.output.dense",
    "roberta": "roberta.encoder.layer.1.attention.output.dense",
    "opt": "model.decoder.layers.1.self_attn.out_proj",
}
# Layer 1's attention module; every projection in it is split between heads.
ATTENTION = {name: projection.rpartition(".")[0] for name, projection in OUTPUT_PROJECTIONS.items()}
ATTENTION["bert"] = "bert.encoder.layer.1.attention"
ATTENTION["roberta"] = "roberta.encoder.layer.1.attention"
GROUPED = {"llama", "qwen2", "mistral", "phi3"}


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[name]
    config._attn_implementation = "eager"
    if name in ("bert", "roberta"):
        return T.AutoModelForMaskedLM.from_config(config).eval()
    return T.AutoModelForCausalLM.from_config(config).eval()


def head_values(model, output_projection: str, zero_head: int | None = None) -> torch.Tensor:
    """The output projection's input (every head's values), shape (heads, batch, seq, size),
    and optionally with one head's values zeroed before the projection reads them."""
    module = model.get_submodule(output_projection)
    seen = {}

    def hook(_, args):
        values = args[0].clone()
        seen["values"] = values.reshape(*values.shape[:-1], HEADS, -1).movedim(-2, 0)
        if zero_head is not None:
            size = values.shape[-1] // HEADS
            values[..., zero_head * size : (zero_head + 1) * size] = 0
            return (values, *args[1:])
        return None

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            output = model(
                input_ids=torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1))
            )
    finally:
        handle.remove()
    return seen["values"], output.logits


def perturbed(model, masks, skip: str | None = None, keep: str | None = None) -> None:
    """Add noise to the selected weights (of the parameters under ``keep`` only, or all but
    those under ``skip``)."""
    parameters = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, mask in masks.items():
            if (skip and name.startswith(skip)) or (keep and not name.startswith(keep)):
                continue
            noise = torch.randn(mask.shape, generator=generator)
            parameters[name].add_(torch.where(mask, noise, 0.0))


def sharing(name: str, head: int) -> set[int]:
    """The heads whose values change with ``head``'s selection: its key-value group."""
    if name not in GROUPED:
        return {head}
    size = HEADS // KV_HEADS
    return set(range(head // size * size, (head // size + 1) * size))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_heads_selection_moves_that_head_alone(name):
    model = tiny(name)
    projection = OUTPUT_PROJECTIONS[name]
    before, logits = head_values(model, projection)
    selections = attention_heads(model, layers=[1])
    assert list(selections) == [f"layer1.head{j}" for j in range(HEADS)]
    for head, masks in enumerate(selections.values()):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        perturbed(model, masks, skip=projection + ".")  # queries, keys and values
        after, _ = head_values(model, projection)
        moved = {j for j in range(HEADS) if not torch.allclose(after[j], before[j], atol=1e-6)}
        assert moved == sharing(name, head) and head in moved
        model.load_state_dict(state)
        # The output projection's selected weights read this head's values and no other's:
        # with this head's values zeroed, perturbing them changes nothing.
        _, blind_before = head_values(model, projection, zero_head=head)
        perturbed(model, masks, keep=projection + ".")
        _, blind = head_values(model, projection, zero_head=head)
        _, reading = head_values(model, projection)
        assert torch.allclose(blind, blind_before, atol=1e-5)
        assert not torch.allclose(reading, logits, atol=1e-4)
        model.load_state_dict(state)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_heads_and_groups_partition_the_attention_weights_and_counts_add_up(name):
    model = tiny(name)
    parameters = dict(model.named_parameters())
    units = key_value_groups(model, layers=[1])
    if name not in GROUPED:  # without grouped queries a group is a head
        assert [m.keys() for m in units.values()] == [
            m.keys() for m in attention_heads(model, layers=[1]).values()
        ]
    covered: dict[str, torch.Tensor] = {}
    for masks in units.values():
        for parameter, mask in masks.items():
            assert mask.shape == parameters[parameter].shape
            previous = covered.get(parameter, torch.zeros_like(mask, dtype=torch.int))
            covered[parameter] = previous + mask.int()
    # Every weight and bias of the attention's projections, once, but the output projection's
    # bias, which serves every head.
    projections = {
        parameter.rpartition(".")[0]
        for parameter in parameters
        if parameter.startswith(ATTENTION[name] + ".") and "norm" not in parameter.lower()
    }
    expected = {p for p in parameters if p.rpartition(".")[0] in projections} - {
        OUTPUT_PROJECTIONS[name] + ".bias"
    }
    assert set(covered) == expected
    assert all(bool((count == 1).all()) for count in covered.values())
    total = sum(parameters[p].numel() for p in expected)
    assert preview(units).splitlines()[-1].split()[-1] == f"{total:,}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mlps_blocks_and_embeddings(name):
    model = tiny(name)
    names = dict(model.named_parameters())
    layers = blocks(model)
    assert list(layers) == ["layer0", "layer1"]
    assert list(mlps(model, layers=[1])) == ["layer1.mlp"]
    for i in (0, 1):  # a layer holds its heads and its MLP
        held = set(layers[f"layer{i}"])
        assert set(mlps(model)[f"layer{i}.mlp"]) <= held
        assert {p for m in attention_heads(model, layers=[i]).values() for p in m} <= held
    embed = embeddings(model)["embed"]
    assert embed and all(mask.all() for mask in embed.values())
    assert all(p in names for p in embed)


def test_grouped_query_heads_share_their_groups_keys_and_values():
    heads = attention_heads(tiny("llama"), layers=[0])
    key = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(heads["layer0.head0"][key], heads["layer0.head1"][key])
    assert not (heads["layer0.head0"][key] & heads["layer0.head2"][key]).any()


def test_a_lora_model_selects_its_adapter_per_head():
    model = tiny("gpt2")
    config = LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # lora_B starts at 0; make the adapters act
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    heads = attention_heads(peft_model, layers=[1])
    selected = {p for masks in heads.values() for p in masks}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert selected <= trainable and selected  # the frozen base weights are not selected
    assert any("c_attn.lora_B" in p for p in selected) and any(
        "c_proj.lora_A" in p for p in selected
    )
    projection = "base_model.model." + OUTPUT_PROJECTIONS["gpt2"]
    before, _ = head_values(peft_model, projection)
    perturbed(peft_model, heads["layer1.head2"], skip=projection + ".")
    after, _ = head_values(peft_model, projection)
    moved = {j for j in range(HEADS) if not torch.allclose(after[j], before[j], atol=1e-6)}
    assert moved == {2}


def test_unknown_models_and_bad_filters_get_clear_errors():
    with pytest.raises(ValueError, match="found no transformers model in the Linear"):
        attention_heads(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model_type 'gptj'"):
        attention_heads(
            T.GPTJForCausalLM(
                T.GPTJConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, rotary_dim=4)
            )
        )
    with pytest.raises(ValueError, match="layers must be integers from 0 to 1"):
        attention_heads(tiny("gpt2"), layers=[2])
    with pytest.raises(ValueError, match="heads must be integers from 0 to 3"):
        attention_heads(tiny("gpt2"), heads=[-1])
