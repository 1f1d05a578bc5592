"""Cost of recording observables (per-example losses on the draws) against the plain estimate.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/observables.py``

On the trained MLP of ``mlp.py`` (minibatches of 256), ``LLCConfig(num_draws=200,
relative_error=None)`` (4 chains, up to 1,000 + 200 steps), with a probe set of 256 training
examples recorded on every draw and on every tenth, against the same estimate without
observables, in this run (best of 3). Then
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
    compare("MLP", model, loss_fn, data, probe, "256 examples", repeats)
    model, data, probe = small_gpt2()
    compare("GPT-2", model, lm_loss, data, probe, f"32 x {LENGTH - 1} tokens", repeats)


def compare(
    name: str, model: torch.nn.Module, loss, data, probe, values: str, repeats: int
) -> None:
    """Print the plain estimate's time and the cost of observing on every draw and every tenth."""
    plain = best_of(
        repeats,
        lambda: estimate_llc(
            model, loss, data, LLCConfig(num_draws=200, relative_error=None), warn=False
        ),
    )
    print(f"{name} plain estimate: {plain:.2f} s")
    for every in (1, 10):
        config = LLCConfig(num_draws=200, relative_error=None, observe_every=every)
        seconds = best_of(
            repeats,
            lambda c=config: estimate_llc(
                model, loss, data, c, warn=False, observables={"probe": probe}
            ),
        )
        print(
            f"{name} observables on every {every:2d} draw(s) ({config.observed_draws} records of"
            f" {values}): {seconds:.2f} s, {seconds / plain:.2f}x the plain estimate"
        )


def small_gpt2() -> tuple[GPT2LMHeadModel, DataLoader, Probe]:
    """A 2-layer GPT-2 (random init), its batches of 8 sequences, 32 sequences per token."""
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
    return model, data, probe


def lm_loss(model: GPT2LMHeadModel, batch: dict) -> torch.Tensor:
    return model(**batch).loss


if __name__ == "__main__":
    main()
