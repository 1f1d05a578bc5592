"""The known learning coefficients the accuracy checks compare against."""

import itertools

import pytest

from llc_callbacks.theory import dln_learning_coefficient, rrr_learning_coefficient


@pytest.mark.parametrize(
    ("shape", "expected"), [((5, 3, 5, 0), 6.5), ((5, 3, 5, 2), 9.5), ((10, 6, 10, 3), 35.0)]
)
def test_reduced_rank_regression_matches_the_worked_examples(shape, expected):
    assert rrr_learning_coefficient(*shape) == expected


@pytest.mark.parametrize(
    ("widths", "rank", "expected"), [([3, 6, 6, 3], 1, 4.5), ([6, 5, 5, 4, 6], 1, 10.5)]
)
def test_deep_linear_networks_match_the_worked_examples(widths, rank, expected):
    assert dln_learning_coefficient(widths, rank) == expected


def test_deep_linear_formula_reduces_to_the_known_cases():
    # Aoyagi's formula for two layers is Aoyagi and Watanabe's for reduced-rank regression,
    # and one layer is a regular model with H_1 H_2 parameters.
    for m, h, n in itertools.product(range(1, 8), repeat=3):
        for r in range(min(m, h, n) + 1):
            assert dln_learning_coefficient([m, h, n], r) == rrr_learning_coefficient(m, h, n, r)
    for h1, h2 in itertools.product(range(1, 8), repeat=2):
        for r in range(min(h1, h2) + 1):
            assert dln_learning_coefficient([h1, h2], r) == h1 * h2 / 2


def test_a_true_rank_of_zero_leaves_only_the_singular_part():
    # Rank 0: the first term vanishes, and λ is at most half the parameter count.
    widths = [4, 7, 3, 5]
    parameters = sum(a * b for a, b in itertools.pairwise(widths))
    assert 0 < dln_learning_coefficient(widths, 0) < parameters / 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rrr_learning_coefficient(3, 2, 3, 3), "r must be at most min"),
        (lambda: rrr_learning_coefficient(0, 2, 3, 0), "m must be an integer >= 1"),
        (lambda: dln_learning_coefficient([4], 0), "at least an input and an output"),
        (lambda: dln_learning_coefficient([4, 2, 4], 3), "r must be at most the smallest"),
    ],
)
def test_bad_shapes_are_refused_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()
