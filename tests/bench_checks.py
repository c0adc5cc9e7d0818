"""Checks shared by the benchmark smoke tests: every figure measured, finite, in the shape printed."""

import math

from benchmarks.common import BenchResult


def positive_finite(values):
    values = list(values)
    assert values, "no measurements"
    for v in values:
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, values


def finite(values):
    values = list(values)
    assert values, "no measurements"
    for v in values:
        assert isinstance(v, (int, float)) and math.isfinite(v), values


def well_formed(result, name, title, scored=False):
    """The result's tables are rectangular and titled; with `scored`, every target has its measured/limit."""
    assert isinstance(result, BenchResult)
    assert (result.name, result.title) == (name, title)
    assert result.rows and all(len(row) == len(result.headers) for row in result.rows)
    for caption, headers, rows in result.extra_tables:
        assert rows and all(len(row) == len(headers) for row in rows), caption
    for t in result.targets:
        assert isinstance(t.met, bool), t
        if scored:
            assert t.score is not None and math.isfinite(t.score) and t.score > 0, t
            assert (t.score <= 1.0) == t.met, t  # the plot's line at 1.0 separates MET from MISSED
        # Every figure is a median over repeats: the plot's whisker spans the best and worst of them.
        if t.score_range is not None:
            best, worst = t.score_range
            assert 0 < best <= t.score * (1 + 1e-9) and t.score <= worst * (1 + 1e-9), t
    text = result.markdown()
    assert text.startswith("## " + title)
    return text
