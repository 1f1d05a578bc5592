"""Leave the training process exactly as it was: RNG states, train/eval modes, hooks, warnings."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from llc_callbacks.attribution import Site, reattributed

# The qualified name of the forward hook ``PreTrainedModel.enable_input_require_grads`` adds.
INPUT_GRADS_HOOK = "PreTrainedModel.enable_input_require_grads.<locals>.make_inputs_require_grads"


@contextmanager
def isolated(model: nn.Module, seed: int) -> Iterator[None]:
    """Run a block with the model in eval mode and seeded global RNGs, then restore both.

    Inside, the global torch (CPU, and CUDA when initialized), numpy and Python RNGs are seeded
    with ``seed`` so that a shuffled DataLoader or a random loss gives the same batches for the
    same seed, and transformers' input-require-grads hooks are out (see
    ``input_require_grads_suspended``). On exit every RNG state, every module's ``training``
    flag and those hooks are put back, whatever happened inside.

    Args:
        model: The live model; only its modules' ``training`` flags and forward hooks
            change, and only inside.
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
        with input_require_grads_suspended(model):
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
def warnings_once(
    shown: set[tuple[str, type[Warning]]], origin: Site | None = None
) -> Iterator[None]:
    """Show each distinct warning raised in the block once, however often the block runs.

    Some libraries warn on every call (torch's notice that ``vmap`` has no batching rule for
    an attention kernel), and ``warnings.catch_warnings`` anywhere resets Python's own
    once-per-location memory, so the same notice would come with every estimate.

    Args:
        shown: The warnings already shown, by message and category; updated in place (a
            monitor keeps one set per run).
        origin: Where the callback or monitor was built: a warning that points into this
            package or a trainer is shown there (``attribution.reattributed``).
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
                filename, lineno = reattributed(warning, origin)
                warnings.warn_explicit(warning.message, warning.category, filename, lineno)


@contextmanager
def input_require_grads_suspended(model: nn.Module) -> Iterator[None]:
    """Take transformers' input-require-grads hooks out of the model inside the block.

    ``enable_input_require_grads`` (called by the Trainer's gradient checkpointing, by TRL's
    trainers and by PEFT) hooks the input embeddings to call ``output.requires_grad_(True)``,
    which ``torch.func.vmap`` rejects, so chains would fall back to a loop. Chains need no
    input gradients, and they run in eval mode, where no layer checkpoints. The hooks are
    found by their function (``INPUT_GRADS_HOOK``) on every submodule, since a second call
    of ``enable_input_require_grads`` adds hooks again and keeps only the new handles; on
    exit each hooks dict is put back exactly as it was.

    Args:
        model: The live model.
    """
    saved = []
    for module in model.modules():
        hooks = module._forward_hooks
        found = [k for k, h in hooks.items() if getattr(h, "__qualname__", "") == INPUT_GRADS_HOOK]
        if found:
            saved.append((hooks, list(hooks.items())))
            for key in found:
                del hooks[key]
    try:
        yield
    finally:
        for hooks, items in reversed(saved):
            hooks.clear()
            hooks.update(items)
