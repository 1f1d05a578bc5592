"""A tiny GPT-2 pretrained briefly, then fine-tuned with TRL's SFT, then DPO: its LLC and
per-head LLCs through the three phases, on one step axis, and a figure of them side by side.

The task is the alphabet. Pretraining reads runs of letters in steps of one and of two
(``abcdef``, ``acegik``); SFT teaches to continue a four-letter prompt in steps of one; DPO
prefers that continuation to the one in steps of two. Tokens are letters (a tokenizer built
in code): no download. Each phase is its own TRL trainer with one ``LLCTrainerCallback``,
which picks the phase's loss itself (the next-token NLL, the completion NLL, the DPO loss).

Run: ``python examples/finetuning.py`` (writes ``outputs/finetuning/finetuning.png`` and
``llc.json``; a few minutes on a CPU).
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from llc_callbacks import LLCConfig, Restrictions
from llc_callbacks.components import attention_heads
from llc_callbacks.integrations.huggingface import LLCTrainerCallback

LETTERS = string.ascii_lowercase
PHASES = ("pretraining", "SFT", "DPO")
# Chains shorter than the defaults' (at most 1,000 + 1,000 steps), so that the five curves of
# eleven estimates take a few minutes on a CPU: a curve's shape, not each value to 5%.
SHORT = LLCConfig(num_burnin=150, num_draws=150)


def tokenizer() -> PreTrainedTokenizerFast:
    """One token per letter (a BPE without merges), and pad, end and unknown tokens."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *LETTERS])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_lm(tok: PreTrainedTokenizerFast, seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer, 2-head GPT-2 of width 32 (about 27,000 weights), randomly initialised."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=len(tok),
        n_positions=32,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def letters(start: int, length: int, stride: int = 1) -> str:
    """Letters from ``start`` on in steps of ``stride``, wrapping around the alphabet."""
    return "".join(LETTERS[(start + stride * i) % 26] for i in range(length))


def datasets(samples: int = 512, seed: int = 0) -> dict[str, Dataset]:
    """Each phase's data: texts, prompt-completion pairs, preference pairs."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 26, (samples,), generator=generator).tolist()
    strides = torch.randint(1, 3, (samples,), generator=generator).tolist()
    return {
        "pretraining": Dataset.from_dict(
            {"text": [letters(s, 12, k) for s, k in zip(starts, strides, strict=True)]}
        ),
        "SFT": Dataset.from_dict(
            {
                "prompt": [letters(s, 4) for s in starts],
                "completion": [letters(s + 4, 4) for s in starts],
            }
        ),
        "DPO": Dataset.from_dict(
            {
                "prompt": [letters(s, 4) for s in starts],
                "chosen": [letters(s + 4, 4) for s in starts],
                "rejected": [letters(s + 4, 4, 2) for s in starts],
            }
        ),
    }


def main(
    steps: tuple[int, int, int] = (300, 150, 150),
    every: int = 75,
    out: Path = Path("outputs/finetuning"),
    config: LLCConfig | None = None,
) -> list[dict]:
    """Train through the three phases, estimating every ``every`` steps of each.

    Args:
        steps: Optimizer steps of pretraining, SFT and DPO.
        every: Steps between estimates within a phase (each phase also estimates at its start).
        out: Where the trainers, ``llc.json`` and ``finetuning.png`` go.
        config: The chains' settings; by default ``SHORT``.

    Returns:
        Every estimate's row, with ``phase`` and ``step`` counted over the whole run.
    """
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    model = tiny_lm(tok)
    data = datasets()
    restrictions = Restrictions(weights=attention_heads(model))
    rows: list[dict] = []
    offset = 0
    for phase, count in zip(PHASES, steps, strict=True):
        callback = LLCTrainerCallback(
            config or SHORT, every_n_steps=every, at_start=True, restrictions=restrictions
        )
        options = {
            "output_dir": str(out / phase),
            "max_steps": count,
            "per_device_train_batch_size": 16,
            "learning_rate": 3e-3 if phase == "pretraining" else 1e-3,
            "logging_steps": 10,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "use_cpu": True,
            "seed": 0,
        }
        if phase == "DPO":
            trainer = DPOTrainer(
                model=model,
                ref_model=copy.deepcopy(model),  # the SFT model is DPO's reference
                args=DPOConfig(**options),
                train_dataset=data[phase],
                processing_class=tok,
                callbacks=[callback],
            )
        else:
            trainer = SFTTrainer(
                model=model,
                args=SFTConfig(**options),
                train_dataset=data[phase],
                processing_class=tok,
                callbacks=[callback],
            )
        trainer.train()
        for row in callback.monitor.history:
            rows.append({**row, "phase": phase, "step": offset + row["step"]})
        offset += count
    (out / "llc.json").write_text(json.dumps(rows, indent=1))
    path = out / "finetuning.png"
    plot_phases(rows, list(restrictions.weights), path)
    print(
        f"{'phase':>12} {'step':>5} {'LLC':>7} "
        + " ".join(f"{h:>12}" for h in restrictions.weights)
    )
    for row in rows:
        heads = " ".join(f"{row[f'llc/{h}/mean']:12.2f}" for h in restrictions.weights)
        print(f"{row['phase']:>12} {row['step']:5d} {row['llc/mean']:7.2f} {heads}")
    print(f"Figure: {path}")
    return rows


def plot_phases(rows: list[dict], heads: list[str], path: Path) -> None:
    """The full LLC and each head's, one panel per phase, sharing the LLC axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PHASES), figsize=(12, 3.6), sharey="row")
    for ax, phase in zip(axes, PHASES, strict=True):
        mine = [row for row in rows if row["phase"] == phase]
        steps = [row["step"] for row in mine]
        ax.plot(steps, [row["llc/mean"] for row in mine], "k-o", label="full model")
        for head in heads:
            ax.plot(steps, [row[f"llc/{head}/mean"] for row in mine], "-", lw=1, label=head)
        ax.set_title(phase)
        ax.set_xlabel("step")
    axes[0].set_ylabel("LLC")
    axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
