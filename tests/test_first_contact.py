"""What a newcomer meets: mistakes raise before the first optimizer step, the transformers
callback goes in ``Trainer(callbacks=[...])``, a small metric set, warnings that point at the
user's code, and an out-of-memory error that says what to change. Real trainers throughout."""

import inspect
import math
import re
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
import wandb
from hf_helpers import TokenData, arguments, make_trainer, tiny_gpt2
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import Classifier, loader, trainer
from models import TINY, DropoutBatchNormNet, classification_batches, cross_entropy
from torch.utils.data import DataLoader
from transformers import Trainer

from llc_callbacks import LLCConfig, LLCMonitor, Restrictions
from llc_callbacks.integrations.huggingface import LLCTrainerCallback
from llc_callbacks.integrations.lightning import LLCCallback
from llc_callbacks.measures import FreeEnergy

NOTE = "pass strict=False to warn instead"
NOTHING = Restrictions(weights={"nothing": "nothing.*"})


class SkipsEveryBatch(Classifier):
    """A ``training_step`` that returns ``None``: Lightning's way to skip a batch."""

    def training_step(self, batch, batch_idx):
        return None


def vector_loss(module, batch):
    return F.cross_entropy(module.net(batch[0]), batch[1], reduction="none")


def dict_loss(module, batch):  # the batches are (x, y) tuples
    return F.cross_entropy(module.net(batch["x"]), batch["y"])


LIGHTNING_MISTAKES = {
    "vector_loss": ({"loss_fn": vector_loss}, ValueError, "must return a scalar tensor"),
    "empty_loader": ({"dataloader": []}, ValueError, "yielded no batches"),
    "dict_batch": ({"loss_fn": dict_loss}, TypeError, "indices must be integers"),
    "pattern": ({"restrictions": NOTHING}, ValueError, "'nothing.*' matches no sampled"),
    "batches_of_one": ({"dataloader": loader(batch_size=1)}, ValueError, "at least 2"),
    "training_step_none": ({}, ValueError, r"training_step returned NoneType"),
}


def lightning_module(mistake: str) -> L.LightningModule:
    return SkipsEveryBatch() if mistake == "training_step_none" else Classifier()


@pytest.mark.parametrize("mistake", LIGHTNING_MISTAKES)
def test_a_lightning_mistake_raises_before_the_first_step(tmp_path, mistake):
    kwargs, error, message = LIGHTNING_MISTAKES[mistake]
    L.seed_everything(0, verbose=False)
    run = trainer(tmp_path, callbacks=[LLCCallback(TINY, every_n_steps=4, **kwargs)])
    with pytest.raises(error, match=message) as raised:
        run.fit(lightning_module(mistake), loader())
    assert run.global_step == 0
    assert any(NOTE in note for note in raised.value.__notes__)


@pytest.mark.parametrize("mistake", LIGHTNING_MISTAKES)
def test_a_lightning_mistake_warns_when_asked_and_training_goes_on(tmp_path, mistake):
    kwargs, _, message = LIGHTNING_MISTAKES[mistake]
    L.seed_everything(0, verbose=False)
    callback = LLCCallback(TINY, every_n_steps=4, strict=False, **kwargs)
    run = trainer(tmp_path, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(lightning_module(mistake), loader())
    assert run.global_step == 12
    (warning,) = [str(w.message) for w in caught if "before" in str(w.message)]
    assert re.search(message, warning)
    if mistake == "pattern":  # the restriction alone is left out
        assert [row["step"] for row in callback.monitor.history] == [4, 8, 12]
        assert all(math.isfinite(row["llc/mean"]) for row in callback.monitor.history)
    else:
        assert "LLC estimates are off for this run" in warning
        assert callback.monitor.history == []


def test_a_bad_restriction_leaves_the_full_llc_and_the_others_running(tmp_path):
    restrictions = Restrictions(weights={"first": "net.net.0.*", "nothing": "nothing.*"})
    callback = LLCCallback(TINY, every_n_steps=6, restrictions=restrictions, strict=False)
    L.seed_everything(0, verbose=False)
    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match="restriction 'nothing' failed the check"):
        trainer(tmp_path, callbacks=[callback], logger=logger).fit(Classifier(), loader())
    assert [row["step"] for row in callback.monitor.history] == [6, 12]
    for row in callback.monitor.history:
        assert math.isfinite(row["llc/mean"]) and math.isfinite(row["llc/first/mean"])
        assert not any(key.startswith("llc/nothing/") for key in row)

    hf = make_trainer(tmp_path / "hf")
    nothing = Restrictions(weights={"h0": "transformer.h.0.*", "nothing": "nothing.*"})
    hf.add_callback(LLCTrainerCallback(TINY, steps=[4], restrictions=nothing, strict=False))
    with pytest.warns(UserWarning, match="restriction 'nothing' failed the check"):
        hf.train()
    (row,) = [row for row in hf.state.log_history if "llc/mean" in row]
    assert math.isfinite(row["llc/mean"]) and math.isfinite(row["llc/h0/mean"])
    assert not any("nothing" in key for key in row)


def vector_lm_loss(model, batch):
    return model(**batch).logits.mean(dim=(1, 2))


HF_MISTAKES = {
    "vector_loss": ({"loss_fn": vector_lm_loss}, ValueError, "must return a scalar tensor"),
    "empty_loader": ({"dataloader": []}, ValueError, "yielded no batches"),
    "pattern": ({"restrictions": NOTHING}, ValueError, "'nothing.*' matches no sampled"),
    "batches_of_one": (
        {"dataloader": DataLoader(TokenData(samples=8), batch_size=1)},
        ValueError,
        "at least 2",
    ),
}


@pytest.mark.parametrize("mistake", HF_MISTAKES)
def test_a_transformers_mistake_raises_before_the_first_step(tmp_path, mistake):
    kwargs, error, message = HF_MISTAKES[mistake]
    callback = LLCTrainerCallback(TINY, every_n_steps=4, **kwargs)
    hf = Trainer(
        model=tiny_gpt2(), args=arguments(tmp_path), train_dataset=TokenData(), callbacks=[callback]
    )
    with pytest.raises(error, match=message) as raised:
        hf.train()
    assert hf.state.global_step == 0
    assert any(NOTE in note for note in raised.value.__notes__)


def test_the_transformers_callback_goes_in_the_trainers_callbacks(tmp_path, wandb_dir, wandb_rows):
    plain = make_trainer(tmp_path / "plain")
    plain.train()
    callback = LLCTrainerCallback(TINY, steps=[4, 8])
    watched = Trainer(
        model=tiny_gpt2(),
        args=arguments(tmp_path / "watched", report_to="wandb"),
        train_dataset=TokenData(),
        callbacks=[callback],
    )
    assert callback.trainer is watched  # found when the Trainer was built
    watched.train()
    wandb.finish()
    logged = [
        (row["step"], row["llc/mean"]) for row in watched.state.log_history if "llc/mean" in row
    ]
    assert [step for step, _ in logged] == [4, 8]
    assert logged == [(row["step"], row["llc/mean"]) for row in callback.monitor.history]
    rows = wandb_rows()
    in_wandb = [
        (r["train/global_step"], r["train/llc/mean"]) for r in rows if "train/llc/mean" in r
    ]
    assert in_wandb == logged
    for (name, a), (_, b) in zip(
        plain.model.state_dict().items(), watched.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_the_transformers_callback_added_later_finds_its_trainer(tmp_path):
    hf = make_trainer(tmp_path)
    callback = LLCTrainerCallback(TINY, steps=[3])
    hf.add_callback(callback)
    assert callback.trainer is None  # no Trainer was being built
    hf.train()
    assert callback.trainer is hf
    assert [row["step"] for row in callback.monitor.history] == [3]


def test_two_callbacks_with_one_prefix_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `LLCCallback`"):
        trainer(tmp_path, callbacks=[LLCCallback(TINY), LLCCallback(TINY)])
    run = trainer(tmp_path, callbacks=[LLCCallback(TINY)])
    run.callbacks.append(LLCCallback(TINY, every_n_steps=3))  # past Lightning's own check
    with pytest.raises(ValueError, match="two LLC callbacks log under prefix='llc'"):
        run.fit(Classifier(), loader())
    assert run.global_step == 0
    # Different prefixes are fine.
    trainer(tmp_path, callbacks=[LLCCallback(TINY), LLCCallback(TINY, prefix="llc_b")])

    callbacks = [LLCTrainerCallback(TINY), LLCTrainerCallback(TINY, every_n_steps=5)]
    hf = Trainer(
        model=tiny_gpt2(), args=arguments(tmp_path), train_dataset=TokenData(), callbacks=callbacks
    )
    with pytest.raises(ValueError, match="two LLC callbacks log under prefix='llc'"):
        hf.train()
    assert hf.state.global_step == 0


def test_each_estimate_logs_a_few_keys_unless_asked_for_more(tmp_path):
    L.seed_everything(0, verbose=False)
    default = LLCCallback(TINY, every_n_steps=6, dataset_size=256)
    run = trainer(tmp_path, callbacks=[default], logger=CSVLogger(tmp_path / "default"))
    run.fit(Classifier(), loader())
    with open(f"{run.logger.log_dir}/metrics.csv") as file:
        columns = {c for c in file.readline().strip().split(",") if c.startswith("llc/")}
    readings = {"llc/mean", "llc/std", "llc/healthy", "llc/step_size", "llc/tuned"}
    assert columns == readings | {"llc/num_sampled", "llc/num_chains"}
    kept = set(default.monitor.history[0])  # the history keeps what it does not log
    assert {"llc/chain_0", "llc/diag/rhat"} <= kept and "llc/free_energy" not in kept

    L.seed_everything(0, verbose=False)
    extra = ("chains", "diagnostics")
    more = LLCCallback(TINY, every_n_steps=6, extra_metrics=extra, measures=[FreeEnergy()])
    run = trainer(tmp_path, callbacks=[more], logger=CSVLogger(tmp_path / "more"))
    run.fit(Classifier(), loader())
    with open(f"{run.logger.log_dir}/metrics.csv") as file:
        columns = set(file.readline().strip().split(","))
    wanted = {"llc/chain_0", "llc/chain_1", "llc/init_loss", "llc/diag/rhat", "llc/free_energy"}
    assert wanted <= columns


def test_free_energy_without_a_dataset_size_is_a_mistake_at_the_start():
    model, data = DropoutBatchNormNet(), classification_batches()
    monitor = LLCMonitor(TINY, steps=[1], measures=[FreeEnergy()])
    with pytest.raises(ValueError, match=r"FreeEnergy needs the training set's size: pass Free"):
        monitor.maybe_estimate(0, model, cross_entropy, data)
    with pytest.warns(FutureWarning, match=r"pass measures=\[FreeEnergy\(\)\]"):
        old = LLCMonitor(TINY, steps=[1], extra_metrics=("free_energy",), dataset_size=512)
    assert [type(measure) for measure in old.measures] == [FreeEnergy]
    assert "llc/free_energy" in old.maybe_estimate(1, model, cross_entropy, data)


def test_the_transformers_console_line_of_an_estimate_is_short(tmp_path, capsys):
    hf = make_trainer(tmp_path, disable_tqdm=True)  # the Trainer prints each log row
    hf.add_callback(LLCTrainerCallback(TINY, steps=[4, 8]))
    hf.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if "llc/mean" in line]
    assert len(lines) == 2
    assert all(len(line) <= 200 for line in lines), lines


def test_warnings_point_at_the_line_that_built_the_callback(tmp_path):
    def failing(module, batch):  # passes the check at the start, fails in every estimate
        if torch.is_grad_enabled():
            raise RuntimeError("boom")
        return F.cross_entropy(module.net(batch[0]), batch[1])

    line = inspect.currentframe().f_lineno + 1
    callback = LLCCallback(TINY, every_n_steps=6, loss_fn=failing)
    L.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=[callback]).fit(Classifier(), loader())
    ours = [w for w in caught if "llc_callbacks" in str(w.message)]
    assert any("estimate at step 6 failed" in str(w.message) for w in ours)
    assert {(w.filename, w.lineno) for w in ours} == {(__file__, line)}

    hf = make_trainer(tmp_path / "hf")
    # A snapshot estimate: TINY's chains are too short for its health checks.
    line = inspect.currentframe().f_lineno + 1
    hf.add_callback(LLCTrainerCallback(TINY, steps=[4], stream=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.train()
    ours = [w for w in caught if "llc_callbacks" in str(w.message)]
    assert ours  # health checks that TINY fails
    assert {(w.filename, w.lineno) for w in ours} == {(__file__, line)}


class HugeInChains(torch.nn.Module):
    """A linear model whose chains (which take gradients) need 16 TiB."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)

    def forward(self, x):
        if torch.is_grad_enabled():
            x = x + torch.zeros(2**42, dtype=torch.int8).sum()
        return self.linear(x)


def test_an_out_of_memory_error_names_chains_in_flight():
    model, data = HugeInChains(), classification_batches()
    config = LLCConfig(num_chains=4, num_burnin=2, num_draws=2, chains_in_flight=2)
    monitor = LLCMonitor(config, steps=[1], stream=False)  # a stream measures its step size first
    with pytest.warns(UserWarning, match="out of memory with 2 chains in flight") as caught:
        metrics = monitor.maybe_estimate(1, model, cross_entropy, data)
    (message,) = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    assert "chains_in_flight=2" in message and "LLCConfig(chains_in_flight=k)" in message
    assert "MB of float32 weights" in message and "can't allocate memory" in message
    assert math.isnan(metrics["llc/mean"])
    raising = LLCMonitor(config, steps=[1], on_error="raise", stream=False)
    with pytest.raises(RuntimeError, match=r"chains in flight \(chains_in_flight=2\)"):
        raising.maybe_estimate(1, model, cross_entropy, data)


def test_the_state_key_is_short(tmp_path):
    assert LLCCallback(TINY).state_key == "LLCCallback{'prefix': 'llc'}"
    assert LLCTrainerCallback(TINY, prefix="probe/llc").state_key == (
        "LLCTrainerCallback{'prefix': 'probe/llc'}"
    )
