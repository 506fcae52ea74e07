"""Readable tables and PNG plots of results with 95% confidence intervals."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

from sjax.files import atomic_write, atomic_write_text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats to 4 decimals, '|' in a cell escaped."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)]) + "\n"


def _fmt(c) -> str:
    return (f"{c:.4f}" if isinstance(c, float) else str(c)).replace("|", "\\|")


def _ylim(values: Sequence[float]) -> tuple[float, float]:
    """The range of the finite `values` (means, CI ends, ...) with a 5% margin, so a CI
    ending at a bar's base 0 (a rate's) is drawn inside the axes, not on its bottom edge."""
    v = [float(x) for x in values if math.isfinite(x)] or [0.0, 1.0]
    pad = 0.05 * (max(v) - min(v) or 1.0)
    return min(v) - pad, max(v) + pad


def _ends(stats: Sequence[dict]) -> list[float]:
    return [s[k] for s in stats for k in ("mean", "lo", "hi")]


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib  # lazy: pyplot is slow to import and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, labels: Sequence[str], stats: Sequence[dict], title: str,
              ylabel: str, chance: float | None = None) -> tuple[float, float]:
    """Bars at each stat's mean with its [lo, hi] 95% CI as error bars; returns the y-range
    drawn, which holds every CI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.2))
    means = [s["mean"] for s in stats]
    err = [[m - s["lo"] for m, s in zip(means, stats)], [s["hi"] - m for m, s in zip(means, stats)]]
    ax.bar(range(len(labels)), means, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylim(*_ylim([0.0, *_ends(stats), *([] if chance is None else [chance])]))
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
        ax.legend()
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    ylim = ax.get_ylim()
    _save(fig, path, plt)
    return ylim


def line_chart(path: Path, x: Sequence, series: dict[str, Sequence[dict]], title: str,
               xlabel: str, ylabel: str) -> tuple[float, float]:
    """One line per series with a shaded 95% CI band; returns the y-range drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, stats in series.items():
        ax.plot(x, [s["mean"] for s in stats], marker="o", label=name)
        ax.fill_between(x, [s["lo"] for s in stats], [s["hi"] for s in stats], alpha=0.2)
    ax.set_ylim(*_ylim([v for stats in series.values() for v in _ends(stats)]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    ylim = ax.get_ylim()
    _save(fig, path, plt)
    return ylim


@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel of `effect_chart`: per label, unit values (dots) and a mean with CI."""

    labels: Sequence[str]
    cis: Sequence[dict]  # {'mean', 'lo', 'hi'}
    points: Sequence[Sequence[float]]
    title: str
    ylabel: str


def effect_chart(path: Path, panels: Sequence[Panel], title: str) -> list[tuple[float, float]]:
    """Side by side panels (each in its own units) of each unit's value (dots, e.g. one per
    seed) and the mean with its 95% CI (a bar with error bars), around a zero line (no
    effect); returns each panel's y-range drawn."""
    plt = _pyplot()
    width = sum(max(3.5, 1.2 * len(p.labels)) for p in panels) or 6
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(width, 4.4), squeeze=False)
    ylims = []
    for ax, p in zip(axes[0], panels):
        finite = [c if math.isfinite(c["lo"]) else {**c, "lo": c["mean"], "hi": c["mean"]}
                  for c in p.cis]
        means = [c["mean"] for c in finite]
        err = [[m - c["lo"] for m, c in zip(means, finite)],
               [c["hi"] - m for m, c in zip(means, finite)]]
        ax.bar(range(len(p.labels)), means, yerr=err, capsize=4, color="#9ecae1")
        for i, pts in enumerate(p.points):
            ax.plot([i] * len(pts), pts, "o", color="#08519c", ms=5)
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_xticks(range(len(p.labels)), p.labels, rotation=20, ha="right")
        ax.set_ylim(*_ylim([0.0, *_ends(finite), *(v for pts in p.points for v in pts)]))
        ax.set_ylabel(p.ylabel)
        ax.set_title(p.title, fontsize=10)
        ylims.append(ax.get_ylim())
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path, plt)
    return ylims


def _save(fig, path: Path, plt) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def write_report(path: Path, title: str, body: str) -> None:
    atomic_write_text(path, f"# {title}\n\n{body}")
