"""Leave the training process exactly as it was: RNG states, train/eval modes, warnings."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


@contextmanager
def isolated(model: nn.Module, seed: int) -> Iterator[None]:
    """Run a block with the model in eval mode and seeded global RNGs, then restore both.

    Inside, the global torch (CPU, and CUDA when initialized), numpy and Python RNGs are seeded
    with ``seed`` so that a shuffled DataLoader or a random loss gives the same batches for the
    same seed. On exit every RNG state and every module's ``training`` flag is put back,
    whatever happened inside.

    Args:
        model: The live model; only its modules' ``training`` flags change, and only inside.
        seed: Seed for the global RNGs inside the block.
    """
    modes = [(module, module.training) for module in model.modules()]
    cuda = torch.cuda.is_initialized()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        model.eval()
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        np.random.seed(seed)
        random.seed(seed)
        yield
    finally:
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextmanager
def warnings_once(shown: set[tuple[str, type[Warning]]]) -> Iterator[None]:
    """Show each distinct warning raised in the block once, however often the block runs.

    Some libraries warn on every call (torch's notice that ``vmap`` has no batching rule for
    an attention kernel), and ``warnings.catch_warnings`` anywhere resets Python's own
    once-per-location memory, so the same notice would come with every estimate.

    Args:
        shown: The warnings already shown, by message and category; updated in place (a
            monitor keeps one set per run).
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        # Shown outside the block, under the caller's own warning filters.
        for warning in caught:
            key = (str(warning.message), warning.category)
            if key not in shown:
                shown.add(key)
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
