"""Markdown tables and the PNG charts of sjax.report."""

import numpy as np
import pytest

from sjax import report, stats


def test_markdown_table():
    table = report.markdown_table(("name", "score", "n"), [("owl", 0.123456, 50),
                                                           ("a|b", 1.0, 7)])
    assert table == ("| name | score  | n  |\n"
                     "|------|--------|----|\n"
                     "| owl  | 0.1235 | 50 |\n"
                     "| a\\|b | 1.0000 | 7  |\n")
    assert report.markdown_table(("a", "bb"), []) == "| a | bb |\n|---|----|\n"


def _png_shape(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path).shape


def test_bar_chart_draws_a_ci_at_zero_inside_the_axes(tmp_path):
    rates = [stats.rate_ci(np.r_[np.zeros(49), 0.5]), stats.rate_ci(np.full(50, 0.0)),
             stats.rate_ci(np.random.default_rng(0).uniform(0.2, 0.4, 50)),
             stats.mean_ci([0.3])]  # one value: no CI (nan), still drawn
    path = tmp_path / "sub" / "bars.png"
    lo, hi = report.bar_chart(path, ["one hit", "none", "some", "single"], rates, "t", "rate",
                              chance=0.5)
    assert rates[1]["lo"] == 0.0
    assert lo < -0.01 and hi > 0.5  # the whisker at 0 and the chance line are inside
    assert hi >= max(r["hi"] for r in rates[:3])
    h, w, _ = _png_shape(path)
    assert (h, w) == (504, 720)
    assert [p.name for p in path.parent.iterdir()] == ["bars.png"]  # no temporary left


def test_line_chart(tmp_path):
    x = [1, 2, 4]
    series = {"a": [stats.rate_ci(np.random.default_rng(s).uniform(0.8, 0.95, 10))
                    for s in x]}
    lo, hi = report.line_chart(tmp_path / "line.png", x, series, "t", "n", "accuracy")
    ends = [v for s in series["a"] for v in (s["lo"], s["hi"])]
    assert lo < min(ends) and max(ends) < hi
    assert lo > 0.5  # no forced 0: the band is not squashed
    assert _png_shape(tmp_path / "line.png")[:2] == (504, 780)


def test_write_report(tmp_path):
    report.write_report(tmp_path / "r.md", "Title", "body\n")
    assert (tmp_path / "r.md").read_text() == "# Title\n\nbody\n"


@pytest.mark.parametrize("values, want", [([0.0, 1.0], (-0.05, 1.05)), ([2.0, 2.0], (1.95, 2.05)),
                                          ([float("nan")], (-0.05, 1.05))])
def test_ylim(values, want):
    assert report._ylim(values) == pytest.approx(want)
