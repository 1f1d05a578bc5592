"""Comparing estimate histories, where NaN (a diagnostic with too few draws) equals NaN."""

import math


def assert_same_history(actual: list[dict], expected: list[dict]) -> None:
    assert [row.keys() for row in actual] == [row.keys() for row in expected]
    for got, want in zip(actual, expected, strict=True):
        for key, value in want.items():
            both_nan = isinstance(value, float) and math.isnan(value) and math.isnan(got[key])
            assert both_nan or got[key] == value, (got["step"], key, got[key], value)
