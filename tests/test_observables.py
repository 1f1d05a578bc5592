"""Loss kernel and Bayesian influence from the chains, against closed forms.

Linear regression with a full batch: the localized tempered posterior is Gaussian, with
precision ``P = nbeta/n X^T X + gamma I`` and mean ``w*`` when ``w*`` is the least-squares
fit. SGLD (the unadjusted Langevin algorithm) with step ``eps`` has the same mean and the
stationary covariance ``S = P^-1 (I - eps P / 4)^-1``, exactly, for a Gaussian target. Each
example's loss ``l_i = (r_i - x_i.d)^2 / 2``, ``d ~ N(0, S)``, is a quadratic form of a
Gaussian vector, so by Isserlis' theorem
``Cov(l_i, l_j) = r_i r_j s_ij + s_ij^2 / 2`` with ``s_ij = x_i^T S x_j``.
"""

import numpy as np
import pytest
import torch

from llc_callbacks import LLCConfig, LLCMonitor, bif, estimate_llc, loss_kernel
from llc_callbacks.keys import KERNEL, Key, metric_key, parse_key

N, NOISE = 64, 0.5


def regression(inputs: torch.Tensor, seed: int = 0):
    """A linear model at its least-squares fit to noisy targets, and its full-batch data."""
    generator = torch.Generator().manual_seed(seed)
    targets = inputs @ torch.randn(inputs.shape[1], 1, generator=generator)
    targets += NOISE * torch.randn(len(inputs), 1, generator=generator)
    model = torch.nn.Linear(inputs.shape[1], 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(inputs, targets).solution.T)
    return model, [(inputs, targets)]


def half_squared_error(model, batch):
    return 0.5 * (model(batch[0]) - batch[1]).square().mean()


def sample(model, data, probe, **changes):
    settings = dict(num_chains=4, num_burnin=200, num_draws=20_000, step_size=0.006)
    settings.update(localization=1.0, nbeta=float(N), mala=False, observe_every=10)
    config = LLCConfig(**{**settings, **changes})
    result = estimate_llc(
        model, half_squared_error, data, config, observables={"probe": probe}, warn=False
    )
    return result, config


def test_the_loss_kernel_is_isserlis_covariance_of_the_gaussian_posterior():
    inputs = torch.randn(N, 3, generator=torch.Generator().manual_seed(1))
    model, data = regression(inputs)
    probe = [(inputs[:8], data[0][1][:8])]
    result, config = sample(model, data, probe)
    kernel = loss_kernel(result, "probe")

    x = inputs.double().numpy()
    precision = config.nbeta / N * x.T @ x + config.localization * np.eye(3)
    ula = np.linalg.inv(precision) @ np.linalg.inv(np.eye(3) - config.step_size * precision / 4)
    xp = x[:8]
    residuals = (probe[0][1].double() - model(probe[0][0]).double()).detach().numpy()[:, 0]
    s = xp @ ula @ xp.T
    expected = np.outer(residuals, residuals) * s + s**2 / 2
    # Standard error of a sample covariance of nearly Gaussian variables (the r_i x_i.d term
    # dominates the quadratic one here): sqrt((V_i V_j + C_ij^2) / N_eff). Records 10 steps
    # apart correlate by at most (1 - eps lambda_min / 2)^10 ~ 0.25, so N_eff >= N / 3
    # counts the autocorrelation conservatively. 5 standard errors: p < 1e-6 per entry.
    variances = np.diag(expected)
    draws = kernel.draws / 3
    stderr = np.sqrt((np.outer(variances, variances) + expected**2) / draws)
    assert kernel.value.shape == (8, 8)
    np.testing.assert_array_less(np.abs(kernel.value - expected), 5 * stderr)
    # The chains' own spread agrees with that error within a factor of 3 (4 chains).
    assert 1 / 3 < np.median(kernel.stderr / stderr) < 3

    influence = bif(result, "probe", "probe")
    np.testing.assert_allclose(influence.value, -kernel.value)
    correlations = loss_kernel(result, "probe", correlation=True).value
    np.testing.assert_allclose(np.diag(correlations), 1.0)


def test_the_loss_kernel_separates_two_tasks():
    # Task A reads inputs 0-1, task B inputs 2-3: their posteriors are independent, so the
    # kernel is block diagonal; within a block, examples correlate through shared weights.
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(N, 4, generator=generator)
    inputs[: N // 2, 2:] = 0
    inputs[N // 2 :, :2] = 0
    model, data = regression(inputs, seed=3)
    probe = [(torch.cat([inputs[:6], inputs[-6:]]), torch.cat([data[0][1][:6], data[0][1][-6:]]))]
    result, _ = sample(model, data, probe, num_draws=5_000)
    correlations = np.abs(loss_kernel(result, "probe", correlation=True).value)
    within = np.concatenate(
        [correlations[:6, :6][~np.eye(6, dtype=bool)], correlations[6:, 6:][~np.eye(6, dtype=bool)]]
    )
    across = correlations[:6, 6:]
    # Across tasks only sampling noise remains: ~1/sqrt(N_eff) ~ 0.04 at 2,000 records.
    assert across.mean() < 0.1
    assert within.mean() > 5 * across.mean()


def test_observables_above_the_memory_budget_are_refused_before_sampling():
    model, data = regression(torch.randn(N, 3))
    with pytest.raises(ValueError, match=r"observables would take .* MB .*observables_max_mb"):
        sample(model, data, [(torch.randn(1000, 3), torch.randn(1000, 1))], observables_max_mb=1)


def test_unknown_observable_names_are_refused_with_the_known_ones():
    model, data = regression(torch.randn(N, 3))
    result, _ = sample(model, data, data, num_draws=20)
    with pytest.raises(ValueError, match=r"'code' is not an observable.*'probe'"):
        loss_kernel(result, "code")


def test_recording_observables_changes_no_chain():
    model, data = regression(torch.randn(N, 3, generator=torch.Generator().manual_seed(4)))
    config = LLCConfig(num_chains=2, num_burnin=10, num_draws=30, step_size=0.006, nbeta=float(N))
    plain = estimate_llc(model, half_squared_error, data, config, warn=False)
    observed = estimate_llc(
        model, half_squared_error, data, config, warn=False, observables={"all": data}
    )
    np.testing.assert_array_equal(plain.loss_trace, observed.loss_trace)
    assert observed.observables["all"].shape == (2, 3, N)  # draws 0, 10 and 20
    assert plain.observables == {}


@pytest.mark.parametrize(
    ("observables", "message"),
    [
        ({"a:b": [1]}, "names hold no '/' or ':'"),
        ({"a/b": [1]}, "names hold no '/' or ':'"),
        ({"a": iter([1])}, r"observables\['a'\] must be a re-iterable"),
    ],
)
def test_the_monitor_refuses_bad_observables_at_construction(observables, message):
    with pytest.raises(ValueError, match=message):
        LLCMonitor(every_n_steps=1, observables=observables)


def test_kernel_keys_read_back_with_their_pair():
    key = metric_key("llc", f"{KERNEL}/train:query")
    assert parse_key(key, "llc") == Key("llc", None, "kernel/train:query")
