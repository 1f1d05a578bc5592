"""Time K weight restrictions in one vectorized pass against K separate estimates.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/restrictions.py``

A small GPT-2 (4 layers of 3 heads, built from a config) on token sequences; K = 4 is one
restriction per layer, K = 12 one per attention head (``llc_callbacks.components``: its
columns of the fused QKV weight and its rows of the output projection).
Both sides use ``estimate_restricted_llcs`` with the same chains, batches and seed, and give
the same numbers; the separate side calls it once per restriction. One pass shares the
batches, the initial loss and the paired forward pass at ``w*`` among all restrictions, and
runs restrictions that touch the same parameters as one vectorized batch.
"""

import argparse

import torch
from timing import best_of
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from llc_callbacks import LLCConfig, Restrictions, estimate_restricted_llcs
from llc_callbacks.components import attention_heads, blocks

LAYERS, HEADS, EMBED, VOCAB, LENGTH = 4, 3, 48, 64, 16


def model_and_data():
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=LAYERS,
        n_head=HEADS,
        n_embd=EMBED,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, VOCAB, (512, LENGTH))
    data = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=16, shuffle=True)
    return model, data


def loss_fn(model, batch):
    return model(**batch).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, data = model_and_data()
    config = LLCConfig(num_chains=4, num_burnin=20, num_draws=40, mala=False)
    params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 with {params} parameters, {config.num_chains} chains x 60 steps, batch 16")
    for label, selections in (("per layer", blocks(model)), ("per head", attention_heads(model))):

        def together(selections=selections):
            estimate_restricted_llcs(
                model, loss_fn, data, Restrictions(selections), config, warn=False
            )

        def separately(selections=selections):
            for name, selection in selections.items():
                restriction = Restrictions({name: selection})
                estimate_restricted_llcs(model, loss_fn, data, restriction, config, warn=False)

        together()  # warm-up: imports and vmap tracing
        one_pass, separate = best_of(args.repeats, together), best_of(args.repeats, separately)
        print(
            f"K = {len(selections):2d} ({label}): one pass {one_pass:6.2f} s,"
            f" {len(selections)} separate estimates {separate:6.2f} s,"
            f" ratio {separate / one_pass:.2f}x"
        )


if __name__ == "__main__":
    main()
