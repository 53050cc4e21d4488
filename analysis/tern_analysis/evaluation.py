"""Scoring models on a train/test split of a trace, horizon by horizon.

The trace's duration is cut into bins of `step`; `horizon` is a whole number of bins. Models
are fitted on the training bins. The test part is walked in consecutive horizons: at the start
of each, a model sees the whole history before it (no refit) and forecasts the expected
accesses per region in the horizon; the regions whose probability of at least one access is
at least `threshold` (Poisson: expected accesses >= -ln(1 - threshold)) are its predicted
working set, scored against the regions really accessed. Horizons that overlap a gap in the
trace are skipped: their true working set is unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .intensity import Intensity
from .metrics import Tally, score


class SplitError(ValueError):
    """The split leaves no horizon to score."""


@dataclass(frozen=True)
class Split:
    train_end: int
    test_start: int
    test_end: int
    steps: int

    def windows(self) -> list[int]:
        """First bins of the test horizons (whole horizons only)."""
        return list(range(self.test_start, self.test_end - self.steps + 1, self.steps))


def make_split(
    inten: Intensity, train: tuple[float, float], test: tuple[float, float], steps: int
) -> Split:
    if train[0] != 0:
        raise SplitError("the training part must start at 0% (models learn from the start)")
    split = Split(inten.bin_at(train[1]), inten.bin_at(test[0]), inten.bin_at(test[1]), steps)
    if split.test_start < split.train_end:
        raise SplitError("the test part must start where the training part ends or later")
    if not split.windows():
        raise SplitError(
            f"the test part ({split.test_end - split.test_start} bins) is shorter than one "
            f"horizon ({steps} bins): use a shorter --horizon or a longer trace"
        )
    return split


@dataclass
class Horizon:
    """One scored horizon of one model, kept for plots."""

    start_bin: int
    expected: np.ndarray
    predicted: np.ndarray
    tally: Tally


@dataclass
class ModelResult:
    name: str
    total: Tally = field(default_factory=Tally)
    horizons: list[Horizon] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def evaluate(
    inten: Intensity, models: list, split: Split, threshold: float = 0.5
) -> tuple[list[ModelResult], int]:
    """Fits and scores each model; returns the results and the number of skipped horizons."""
    cut = -math.log(1.0 - threshold)
    windows = [
        w for w in split.windows() if inten.known[w : w + split.steps].all()
    ]
    skipped = len(split.windows()) - len(windows)
    results = []
    for model in models:
        model.fit(inten, split.train_end)
        res = ModelResult(model.name)
        for w in windows:
            lam, lam_bytes = model.forecast(inten, w, split.steps)
            predicted = lam >= cut
            t = score(
                predicted,
                lam_bytes,
                inten.counts[:, w : w + split.steps].sum(axis=1),
                inten.bytes[:, w : w + split.steps].sum(axis=1),
            )
            res.total += t
            res.horizons.append(Horizon(w, lam, predicted, t))
        res.summary = model.summary()
        results.append(res)
    return results, skipped
