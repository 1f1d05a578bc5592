"""Every code block of the README and of docs/ runs: each page's Python blocks in order, in a
namespace of small stand-ins for the user's objects the pages name, then every page's shell
lines (which read the runs the Python blocks logged). Every relative link resolves."""

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import wandb
from hf_helpers import TokenData, tiny_gpt2
from lightning_helpers import Classifier, loader
from models import DropoutBatchNormNet, cross_entropy
from torch.utils.data import DataLoader
from trl_helpers import preferences, tiny_lm, tokenizer

from llc_callbacks import LLCConfig, calibrate, estimate_llc

pytestmark = pytest.mark.slow  # make test-fast skips it

ROOT = Path(__file__).parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)#:]+)\)")  # relative links: no scheme
# The README first: the plots page reads the runs its examples and the docs' log.
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(document: Path, language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(document.read_text()) if lang == language]


def stand_ins() -> dict:
    """The objects the README's examples assume, small."""
    torch.manual_seed(0)
    model = DropoutBatchNormNet()
    dataset = torch.utils.data.TensorDataset(torch.randn(512, 6), torch.randint(0, 3, (512,)))
    return {
        "module": Classifier(),
        "train_loader": loader(),
        "gpt2": tiny_gpt2(),
        "train_dataset": TokenData(),
        "model": model,
        "loss_fn": cross_entropy,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loader": DataLoader(dataset, batch_size=64, shuffle=True),
        "code_loader": DataLoader(TokenData(samples=128), batch_size=16),
        "prose_loader": DataLoader(TokenData(samples=96), batch_size=16),
        "tokenizer": tokenizer(),
        "policy": tiny_lm(tokenizer()),
        "reference": tiny_lm(tokenizer()),
        "pairs": preferences(),
    }


def short_defaults(monkeypatch) -> None:
    """The README's default configs with 20 + 20 chain steps: the blocks check plumbing, and
    4 x 2,000 steps per estimate would take minutes."""
    short = {"num_burnin": 20, "num_draws": 20}
    defaults = tuple(short.get(f.name, f.default) for f in dataclasses.fields(LLCConfig))
    monkeypatch.setattr(LLCConfig.__init__, "__defaults__", defaults)
    for function in (estimate_llc, calibrate):  # their default config was built at import
        monkeypatch.setattr(function, "__defaults__", (LLCConfig(),))


def test_every_link_of_the_readme_and_docs_resolves():
    for document in DOCUMENTS:
        for target in LINK.findall(document.read_text()):
            assert (document.parent / target).is_file(), (document.name, target)


def test_the_readme_is_short_and_the_docs_pages_are_there():
    assert len((ROOT / "README.md").read_text().splitlines()) < 300
    assert len(DOCUMENTS) >= 10


def test_every_code_block_of_the_readme_and_docs_runs(tmp_path, monkeypatch):
    short_defaults(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # runs land in wandb/offline-run-*
    ran = 0
    try:
        for document in DOCUMENTS:
            namespace = stand_ins()  # each page starts from the user's objects alone
            for code in blocks(document, "python"):
                exec(compile(code, str(document.relative_to(ROOT)), "exec"), namespace)
                ran += 1
    finally:
        wandb.finish()
    assert ran >= 15

    makefile = (ROOT / "Makefile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    commands = [
        line.strip()
        for document in DOCUMENTS
        for code in blocks(document, "bash")
        for line in code.splitlines()
        if line.strip()
    ]
    assert commands
    script = Path(sys.executable).parent / "llc-callbacks"
    for command in commands:
        if command.startswith("make "):
            assert re.search(rf"^{command.split()[1]}:", makefile, re.MULTILINE), command
        elif command.startswith("pip install -e"):
            wanted = re.findall(r"\[(\w+)\]", command)
            assert all(extra in extras for extra in wanted), command
        elif command.startswith("llc-callbacks "):
            done = subprocess.run(
                command.replace("llc-callbacks", str(script), 1),
                shell=True,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, (command, done.stderr)
            if command.startswith("llc-callbacks stages "):  # a table of stages
                assert done.stdout.split()[:3] == ["start", "end", "kind"], done.stdout
            else:  # the path of the figure
                assert Path(done.stdout.strip()).stat().st_size > 0
        else:
            raise AssertionError(f"the README has a command this test does not know: {command}")
    wandb.teardown()
