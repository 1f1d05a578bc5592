"""Loss kernel, Bayesian influence and susceptibilities from the chains, against closed forms.

Linear regression with a full batch: the localized tempered posterior is Gaussian, with
precision ``P = nbeta/n X^T X + gamma I`` and mean ``w*`` when ``w*`` is the least-squares
fit. SGLD (the unadjusted Langevin algorithm) with step ``eps`` has the same mean and the
stationary covariance ``S = P^-1 (I - eps P / 4)^-1``, exactly, for a Gaussian target. Each
example's loss ``l_i = (r_i - x_i.d)^2 / 2``, ``d ~ N(0, S)``, is a quadratic form of a
Gaussian vector, so by Isserlis' theorem
``Cov(l_i, l_j) = r_i r_j s_ij + s_ij^2 / 2`` with ``s_ij = x_i^T S x_j``. A weight-restricted
component's chains sample the same Gaussian in its own coordinates (the rest held at ``w*``).
"""

import numpy as np
import pytest
import torch
from hf_helpers import LENGTH, TokenData, tiny_gpt2
from torch.utils.data import DataLoader

from llc_callbacks import (
    LLCConfig,
    LLCMonitor,
    Probe,
    Restrictions,
    bif,
    estimate_llc,
    loss_kernel,
    susceptibility,
    token_losses,
)
from llc_callbacks.keys import KERNEL, SUSCEPTIBILITY, Key, metric_key, parse_key
from llc_callbacks.plotting import plot_loss_kernel, plot_susceptibilities

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


class TwoParts(torch.nn.Module):
    """A linear model whose weights on inputs 0-1 and 2-3 are two components."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(2, 1, bias=False)
        self.b = torch.nn.Linear(2, 1, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.a(inputs[:, :2]) + self.b(inputs[:, 2:])


def isserlis(x: np.ndarray, residuals: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """``Cov(l_i, l_j)`` of half squared errors under weights ``w* + d``, ``d ~ N(0, S)``."""
    s = x @ covariance @ x.T
    return np.outer(residuals, residuals) * s + s**2 / 2


def expected_loss(
    h: float, x: np.ndarray, x_source: np.ndarray, r_source: np.ndarray, nbeta: float
) -> float:
    """``E_h[L] - L(w*)`` under the exact posterior of the data ``(1 - h) q + h q'``.

    ``L`` is quadratic with zero gradient at ``w*``, so ``L(w* + d) - L(w*) = d^T H d / 2``
    and ``E[d^T H d] = m^T H m + tr(H C)`` for the posterior's mean ``m`` and covariance
    ``C = (nbeta H_h + I)^-1``; ``m = -C nbeta h grad L'(w*)``.
    """
    hessian = x.T @ x / len(x)
    mixed = (1 - h) * hessian + h * x_source.T @ x_source / len(x_source)
    covariance = np.linalg.inv(nbeta * mixed + np.eye(x.shape[1]))
    mean = -covariance @ (nbeta * h * -x_source.T @ r_source / len(x_source))
    return 0.5 * (mean @ hessian @ mean + np.trace(hessian @ covariance))


def test_susceptibility_is_the_linear_response_of_the_component_loss():
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(N, 4, generator=generator)
    targets = inputs @ torch.randn(4, 1, generator=generator) + NOISE * torch.randn(N, 1)
    model = TwoParts()
    fit = torch.linalg.lstsq(inputs, targets).solution.T
    with torch.no_grad():
        model.a.weight.copy_(fit[:, :2])
        model.b.weight.copy_(fit[:, 2:])
    # The source: inputs of larger scale on component a's side, targets near the fit's (a
    # residual adds a loss term linear in the weights, uncorrelated with L's quadratic one).
    shifted = torch.randn(8, 4, generator=generator) * torch.tensor([3.0, 3.0, 1.0, 1.0])
    shifted_targets = shifted @ fit.T + 0.1 * torch.randn(8, 1, generator=generator)
    data = [(inputs, targets)]
    config = LLCConfig(
        num_chains=4,
        num_burnin=200,
        num_draws=20_000,
        step_size=0.006,
        localization=1.0,
        nbeta=float(N),
        mala=False,
        observe_every=10,
    )
    result = estimate_llc(
        model,
        half_squared_error,
        data,
        config,
        restrictions=Restrictions(weights={"a": "a.*"}),
        observables={"train": data, "source": [(shifted, shifted_targets)]},
        warn=False,
    )

    x = torch.cat([inputs, shifted]).double().numpy()
    with torch.no_grad():
        residuals = torch.cat([targets, shifted_targets]) - model(torch.cat([inputs, shifted]))
    residuals = residuals.double().numpy()[:, 0]
    train, source = slice(0, N), slice(N, N + 8)

    def chi(kernel: np.ndarray) -> np.ndarray:
        """Per-example chi from the kernel of the training and source examples."""
        var_phi = kernel[train, train].mean()
        return -(kernel[train, source].mean(axis=0) - var_phi)

    for component, columns in (("a", slice(0, 2)), (None, slice(0, 4))):
        xc = x[:, columns]
        precision = config.nbeta / N * xc[train].T @ xc[train] + np.eye(xc.shape[1])
        ula = np.linalg.inv(precision) @ np.linalg.inv(
            np.eye(xc.shape[1]) - config.step_size * precision / 4
        )
        per_example = chi(isserlis(xc, residuals, ula))
        found = susceptibility(result, "source", "train", component)
        # The standard error of a sample covariance is sqrt(Var[(phi - E phi)(D - E D)] / N)
        # for D = L' - L. phi has no linear term here (grad L(w*) = 0), so phi and D are far
        # from Gaussian: that variance is taken from 200,000 exact draws of SGLD's stationary
        # Gaussian, and the records' autocorrelation counted as in the kernel test
        # (N_eff >= N / 3). 5 SE: p < 1e-6.
        d = np.random.default_rng(0).multivariate_normal(np.zeros(len(ula)), ula, 200_000)
        losses = (residuals - d @ xc.T) ** 2 / 2
        phi = losses[:, train].mean(axis=1)
        shift = losses[:, source].mean(axis=1) - phi
        product = (phi - phi.mean()) * (shift - shift.mean())
        stderr = np.sqrt(product.var() / (found.draws / 3))
        assert abs(found.value - per_example.mean()) < 5 * stderr, component
        assert abs(found.value) > 4 * stderr  # told apart from no response at all
        np.testing.assert_allclose(found.per_example.mean(), found.value, rtol=1e-9)
        assert found.per_example.shape == (8,)
        assert 1 / 3 < found.stderr / stderr < 3  # the chains' spread agrees

        # What chi means: (d/dh E_h[L]) / (n beta) at h = 0 for the exact posterior of the
        # data (1 - h) q + h q'; here in closed form, against a central difference.
        exact_chi = chi(isserlis(xc, residuals, np.linalg.inv(precision))).mean()
        parts = (xc[train], xc[source], residuals[source], config.nbeta)
        derivative = (expected_loss(1e-5, *parts) - expected_loss(-1e-5, *parts)) / 2e-5
        # rtol 1e-3, not 1e-9: w* is a float32 least-squares fit, so grad L(w*) is ~1e-7 rather
        # than the 0 both closed forms assume (a wrong sign or factor of n beta is far off).
        np.testing.assert_allclose(derivative / config.nbeta, exact_chi, rtol=1e-3)


def test_susceptibility_names_what_it_lacks():
    model, data = regression(torch.randn(N, 3))
    result, _ = sample(model, data, data, num_draws=20)
    with pytest.raises(ValueError, match=r"'code' is not an observable.*'probe'"):
        susceptibility(result, "code", "probe")
    with pytest.raises(ValueError, match=r"component 'head' is not a weight restriction.*none"):
        susceptibility(result, "probe", "probe", "head")


def gpt2_loss(model, batch):
    return model(**batch).loss


def test_token_losses_record_each_token_and_the_default_each_example():
    model = tiny_gpt2()
    probe = DataLoader(TokenData(samples=6), batch_size=3)
    config = LLCConfig(num_chains=2, num_burnin=0, num_draws=3, step_size=1e-4, observe_every=2)
    result = estimate_llc(
        model,
        gpt2_loss,
        DataLoader(TokenData(), batch_size=8),
        config,
        observables={"tokens": Probe(probe, token_losses), "examples": probe},
        warn=False,
    )
    tokens, examples = result.observables["tokens"], result.observables["examples"]
    assert tokens.shape == (2, 2, 6 * (LENGTH - 1))  # draws 0 and 2, every token but the first
    assert examples.shape == (2, 2, 6)
    # Draw 0 is at w*: every chain records the model's own per-token losses there (in eval
    # mode, as the chains run), and their mean per example is the example's loss.
    model.eval()
    with torch.no_grad():
        expected = torch.cat([token_losses(model, batch) for batch in probe])
    for chain in range(2):
        np.testing.assert_allclose(tokens[chain, 0], expected.flatten(), rtol=1e-4, atol=1e-5)
        per_example = tokens[chain, 0].reshape(6, LENGTH - 1).mean(axis=1)
        np.testing.assert_allclose(examples[chain, 0], per_example, rtol=1e-4)
    assert not np.allclose(tokens[:, 1], tokens[:, 0])  # the chains moved


def test_token_losses_skip_the_labels_marked_minus_100():
    model = tiny_gpt2().eval()
    batch = {"input_ids": TokenData(samples=2).ids, "labels": TokenData(samples=2).ids.clone()}
    batch["labels"][:, :5] = -100
    with torch.no_grad():
        found = token_losses(model, batch)
    assert found.shape == (2, LENGTH - 1)
    assert (found[:, :4] == 0).all() and (found[:, 4:] > 0).all()


def test_a_hook_of_the_wrong_shape_is_refused_before_sampling():
    model, data = regression(torch.randn(N, 3))
    with pytest.raises(ValueError, match=r"observables\['probe'\].*\(batch, \.\.\.\) for a batch"):
        sample(model, data, Probe(data, lambda model, batch: model(batch[0]).sum()))


def test_the_monitor_logs_each_components_susceptibility_to_each_other_observable():
    model, data = regression(torch.randn(N, 3, generator=torch.Generator().manual_seed(6)))
    config = LLCConfig(num_chains=2, num_burnin=300, num_draws=200, step_size=0.006, nbeta=float(N))
    monitor = LLCMonitor(
        config,
        every_n_steps=1,
        restrictions=Restrictions(weights={"w": "weight"}),
        observables={"train": data, "query": [(torch.randn(5, 3), torch.randn(5, 1))]},
        susceptibility_base="train",
    )
    metrics = monitor.estimate(3, model, half_squared_error, data)
    for component in (None, "w"):
        key = metric_key("llc", f"{SUSCEPTIBILITY}/query", component)
        assert np.isfinite(metrics[key])
        assert parse_key(key, "llc") == Key("llc", component, "susceptibility/query")
    assert metric_key("llc", f"{SUSCEPTIBILITY}/train") not in metrics  # not to itself
    assert [row[:3] for row in monitor.susceptibilities] == [
        [3, "full", "query"],
        [3, "w", "query"],
    ]
    with pytest.raises(ValueError, match=r"susceptibility_base must be one of 'train', 'query'"):
        LLCMonitor(every_n_steps=1, observables=monitor.observables, susceptibility_base="code")

    monitor.estimate(6, model, half_squared_error, data)
    (panel,) = plot_susceptibilities(monitor.history).axes
    assert panel.get_ylabel() == "toward query"
    lines = [line for line in panel.get_lines() if not line.get_label().startswith("_")]
    assert {line.get_label(): list(line.get_xdata()) for line in lines} == {
        "full": [3, 6],
        "w": [3, 6],
    }
    kernel = plot_loss_kernel(monitor.last_result).axes[0].get_images()[0].get_array()
    assert kernel.shape == (N + 5, N + 5)  # every value of both observables
    np.testing.assert_allclose(np.diag(kernel), 1.0)
    with pytest.raises(ValueError, match="no susceptibility"):
        plot_susceptibilities([{"step": 1, "llc/mean": 1.0}])
    with pytest.raises(ValueError, match="recorded no observables"):
        plot_loss_kernel(estimate_llc(model, half_squared_error, data, config, warn=False))
