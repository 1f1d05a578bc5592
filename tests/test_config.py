import math

import pytest

from llc_callbacks import LLCConfig


def test_defaults_are_valid_and_documented_values():
    config = LLCConfig()
    assert config.num_chains == 4
    assert config.nbeta == "batch"
    assert config.paired is True
    assert config.vectorize == "auto"
    assert config.sampler == "sgld"


@pytest.mark.parametrize(
    ("argument", "value", "accepted"),
    [
        ("num_chains", 0, ">= 1"),
        ("num_chains", 2.0, ">= 1"),
        ("num_chains", True, ">= 1"),
        ("num_burnin", -1, ">= 0"),
        ("num_draws", 0, ">= 1"),
        ("step_size", 0.0, "> 0"),
        ("step_size", -1e-4, "> 0"),
        ("step_size", math.nan, "> 0"),
        ("step_size", "1e-4", "> 0"),
        ("localization", -1.0, ">= 0"),
        ("localization", math.inf, ">= 0"),
        ("nbeta", 0.0, "> 0"),
        ("nbeta", "auto", "'batch', 'dataset' or a positive number"),
        ("batches_per_step", 0, ">= 1"),
        ("batches_per_step", 2.0, ">= 1"),
        ("batches_per_step", True, ">= 1"),
        ("sampler", "sgnht", "one of"),
        ("rmsprop_alpha", 1.0, r"\(0, 1\)"),
        ("rmsprop_alpha", 0.0, "> 0"),
        ("rmsprop_eps", 0.0, "> 0"),
        ("paired", 1, "True or False"),
        ("seed", -1, ">= 0"),
        ("vectorize", "yes", "one of 'auto', True, False"),
        ("vectorize", 1, "one of 'auto', True, False"),
        ("init_loss_batches", 0, ">= 1"),
        ("chains_in_flight", 0, ">= 1 or 'auto'"),
        ("chains_in_flight", "all", ">= 1 or 'auto'"),
        ("chains_in_flight", True, ">= 1 or 'auto'"),
        ("autocast", "bf16", "one of None, 'bfloat16', 'float16'"),
        ("compile", "fast", "one of False, True, 'default', 'reduce-overhead'"),
        ("compile", 1, "one of False, True"),
    ],
)
def test_bad_values_raise_naming_the_argument_and_the_range(argument, value, accepted):
    with pytest.raises(ValueError, match=rf"^{argument} .*{accepted}"):
        LLCConfig(**{argument: value})


def test_compiled_chains_need_batched_chains():
    with pytest.raises(ValueError, match=r"^compile .*vectorize=True or 'auto'"):
        LLCConfig(compile=True, vectorize=False)
    assert LLCConfig(compile=True).compile_mode == "default"
    assert LLCConfig(compile="reduce-overhead").compile_mode == "reduce-overhead"
    assert LLCConfig().compile_mode is None


def test_dataset_nbeta_needs_a_dataset_size_and_only_then():
    with pytest.raises(ValueError, match="dataset_size is required"):
        LLCConfig(nbeta="dataset")
    with pytest.raises(ValueError, match="dataset_size must be an integer >= 2"):
        LLCConfig(nbeta="dataset", dataset_size=1)
    with pytest.raises(ValueError, match="dataset_size is only used with nbeta='dataset'"):
        LLCConfig(dataset_size=1000)


def test_resolve_nbeta_follows_each_convention():
    assert LLCConfig().resolve_nbeta(256) == pytest.approx(256 / math.log(256))
    assert LLCConfig(nbeta="dataset", dataset_size=10_000).resolve_nbeta(256) == pytest.approx(
        10_000 / math.log(10_000)
    )
    assert LLCConfig(nbeta=30).resolve_nbeta(256) == 30.0
    with pytest.raises(ValueError, match="batch size of at least 2"):
        LLCConfig().resolve_nbeta(1)


def test_batch_nbeta_counts_the_examples_of_an_optimizer_step():
    # 4 accumulated batches of 4 are one step of 16 examples, as one batch of 16 is.
    assert LLCConfig(batches_per_step=4).resolve_nbeta(4) == LLCConfig().resolve_nbeta(16)
    assert LLCConfig(batches_per_step=2).resolve_nbeta(1) == pytest.approx(2 / math.log(2))
    assert LLCConfig(nbeta=30, batches_per_step=4).resolve_nbeta(4) == 30.0


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        LLCConfig().num_chains = 8


def test_defaults_aim_at_a_curve_and_accurate_at_the_learning_coefficient():
    config = LLCConfig()
    assert (config.localization, config.step_size) == (100.0, "adapt")
    assert (config.num_burnin, config.num_draws, config.mala) == (1000, 1000, True)
    assert (config.target_acceptance, config.relative_error, config.warm_start) == (
        0.9,
        0.05,
        True,
    )
    accurate = LLCConfig.accurate(num_chains=8)
    assert (accurate.localization, accurate.num_chains) == (5.0, 8)
    assert accurate.step_size == "adapt" and accurate.num_draws == 1000
    with pytest.raises(ValueError, match="localization"):
        LLCConfig.accurate(localization=-1.0)
