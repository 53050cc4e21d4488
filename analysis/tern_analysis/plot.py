"""Predicted vs actual, as a PNG: per-horizon accesses of the busiest regions, and the size of
the predicted and actual working sets per horizon."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here or in CI
import matplotlib.pyplot as plt
import numpy as np

from .evaluation import ModelResult
from .intensity import Intensity


def plot_forecasts(inten: Intensity, results: list[ModelResult], out: Path, top: int = 4) -> None:
    if not results or not results[0].horizons:
        raise ValueError("nothing to plot: no test horizon was scored")
    horizons = results[0].horizons
    x = np.array([(h.window.from_ns + h.window.to_ns) / 2 - inten.start_ns for h in horizons]) / 1e9
    busiest = np.argsort(-sum(h.actual for h in horizons), kind="stable")[:top]
    fig, axes = plt.subplots(len(busiest) + 1, 1, figsize=(10, 2.4 * (len(busiest) + 1)))
    axes = np.atleast_1d(axes)
    for ax, row in zip(axes, busiest, strict=False):
        ax.plot(x, [h.actual[row] for h in horizons], "k-o", ms=3, label="actual")
        for k, r in enumerate(results):
            ax.plot(
                x,
                [h.expected[row] for h in r.horizons],
                "--",
                color=f"C{k}",
                label=f"{r.name} expected",
            )
        start = int(inten.regions[row]) * inten.region_size
        ax.set_title(f"region at {start / 2**20:.0f} MiB: accesses per horizon", fontsize=9)
        ax.set_ylabel("accesses")
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    ax.plot(x, [h.tally.actual for h in horizons], "k-o", ms=3, label="actual")
    for k, r in enumerate(results):
        c = f"C{k}"
        ax.plot(
            x, [h.tally.predicted for h in r.horizons], "--", color=c, label=f"{r.name} predicted"
        )
        ax.plot(x, [h.tally.hits for h in r.horizons], ":", color=c, label=f"{r.name} correct")
    ax.set_title(f"working set per horizon ({inten.unit // 1024} KiB units)", fontsize=9)
    ax.set_xlabel("time since the trace's start (s)")
    ax.set_ylabel("units")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
