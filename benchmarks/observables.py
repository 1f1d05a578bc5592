"""Cost of recording observables (per-example losses on the draws) against the plain estimate.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/observables.py``

On the trained MLP of ``mlp.py`` (minibatches of 256), ``LLCConfig.fast()`` (4 chains,
200 + 200 steps), with a probe set of 256 training examples recorded on every draw and on
every tenth, against the same estimate without observables, in this run (best of 3). Then
per-token losses (``Probe(..., token_losses)``) of 32 sequences of 64 tokens on a 2-layer
GPT-2 (random init, batches of 8 sequences), against its plain estimate.
"""

import torch
from mlp import loss_fn, make_data, make_loader, trained_model
from timing import best_of
from torch.utils.data import DataLoader, Subset
from transformers import GPT2Config, GPT2LMHeadModel

from llc_callbacks import LLCConfig, Probe, estimate_llc, token_losses

VOCAB, LENGTH = 256, 64


def main(repeats: int = 3) -> None:
    torch.manual_seed(0)
    dataset = make_data()
    model, data = trained_model(dataset), make_loader(dataset)
    probe = DataLoader(Subset(dataset, range(256)), batch_size=256)
    plain = best_of(
        repeats, lambda: estimate_llc(model, loss_fn, data, LLCConfig.fast(), warn=False)
    )
    print(f"plain estimate: {plain:.2f} s")
    for every in (1, 10):
        config = LLCConfig.fast(observe_every=every)
        seconds = best_of(
            repeats,
            lambda c=config: estimate_llc(
                model, loss_fn, data, c, warn=False, observables={"probe": probe}
            ),
        )
        records = config.observed_draws
        print(
            f"observables on every {every:2d} draw(s) ({records} records of 256 examples):"
            f" {seconds:.2f} s, {seconds / plain:.2f}x the plain estimate"
        )
    per_token(repeats)


def per_token(repeats: int) -> None:
    """Per-token losses of a small GPT-2 on every draw and every tenth."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, VOCAB, (64, LENGTH))
    data = DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=8)
    probe = Probe(DataLoader([{"input_ids": i} for i in ids[:32]], batch_size=32), token_losses)

    def lm_loss(m: GPT2LMHeadModel, batch: dict) -> torch.Tensor:
        return m(**batch).loss

    plain = best_of(
        repeats, lambda: estimate_llc(model, lm_loss, data, LLCConfig.fast(), warn=False)
    )
    print(f"GPT-2 plain estimate: {plain:.2f} s")
    for every in (1, 10):
        config = LLCConfig.fast(observe_every=every)
        seconds = best_of(
            repeats,
            lambda c=config: estimate_llc(
                model, lm_loss, data, c, warn=False, observables={"tokens": probe}
            ),
        )
        print(
            f"GPT-2 per-token losses on every {every:2d} draw(s) ({config.observed_draws} records"
            f" of 32 x {LENGTH - 1} tokens): {seconds:.2f} s, {seconds / plain:.2f}x"
        )


if __name__ == "__main__":
    main()
