"""Predicted vs actual, as a PNG: per-horizon accesses of the hottest regions, and the size of
the predicted and actual working sets per horizon."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here or in CI
import matplotlib.pyplot as plt
import numpy as np

from .evaluation import ModelResult, Split
from .intensity import Intensity


def plot_forecasts(
    inten: Intensity, split: Split, results: list[ModelResult], out: Path, top: int = 4
) -> None:
    if not results or not results[0].horizons:
        raise ValueError("nothing to plot: no test horizon was scored")
    secs = inten.step_ns / 1e9
    starts = np.array([h.start_bin for h in results[0].horizons])
    test = slice(split.test_start, split.test_end)
    hottest = np.argsort(-inten.counts[:, test].sum(axis=1), kind="stable")[:top]
    fig, axes = plt.subplots(len(hottest) + 1, 1, figsize=(10, 2.4 * (len(hottest) + 1)))
    axes = np.atleast_1d(axes)
    x = (starts + split.steps / 2) * secs
    for ax, row in zip(axes, hottest, strict=False):
        actual = [inten.counts[row, s : s + split.steps].sum() for s in starts]
        ax.plot(x, actual, "k-o", ms=3, label="actual")
        for r in results:
            ax.plot(x, [h.expected[row] for h in r.horizons], "--", label=r.name)
        space, region = inten.regions.iloc[row]
        start = int(region) * inten.region_size
        ax.set_title(f"{space} @ {start / 2**20:.0f} MiB: accesses per horizon", fontsize=9)
        ax.set_ylabel("accesses")
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    ax.plot(x, [h.tally.actual for h in results[0].horizons], "k-o", ms=3, label="actual")
    for r in results:
        ax.plot(x, [h.tally.predicted for h in r.horizons], "--", label=f"{r.name} predicted")
        ax.plot(x, [h.tally.hits for h in r.horizons], ":", label=f"{r.name} correct")
    ax.set_title("working set per horizon (regions)", fontsize=9)
    ax.set_xlabel("time since trace start (s)")
    ax.set_ylabel("regions")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
