"""Scoring models on a train/test split of a trace, horizon by horizon, the way
`tern predict eval` does (userspace/src/predict/eval.rs):

- the history spans [first access or gap, last + 1 ns); `--train`/`--test` are fractions of it;
- the test part is walked from its start, a window every step (default one horizon), each a
  whole horizon (the one window it holds when not even one horizon fits);
  at most `max_windows` are scored, evenly spread; a horizon that overlaps a gap is skipped;
- at each horizon's start a model knows the history from the training part's start up to
  that instant (parameters are fitted on the training part only) and gives each unit a
  probability of at least one access in the horizon; those at >= `threshold` are its
  predicted working set, scored against the units the horizon accessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .intensity import Intensity
from .io import Accesses
from .metrics import Tally, score


class SplitError(ValueError):
    """The split leaves no horizon to score."""


@dataclass(frozen=True)
class Window:
    from_ns: int
    to_ns: int


@dataclass(frozen=True)
class Split:
    train_ns: tuple[int, int]
    test_ns: tuple[int, int]
    horizon_ns: int
    #: All horizons of the test part.
    windows: int
    #: The horizons to score (gap horizons left out).
    scored: list[Window]
    gap_windows: int


def _round(x: float) -> int:
    """Half away from zero, like Rust's `f64::round`, for non-negative x."""
    return math.floor(x + 0.5)


def make_split(
    acc: Accesses,
    train: tuple[float, float],
    test: tuple[float, float],
    horizon_ns: int,
    max_windows: int = 200,
    step_ns: int | None = None,
) -> Split:
    t0, t1 = acc.start_ns, acc.end_ns

    def at(f: float) -> int:
        return t0 + _round((t1 - t0) * f)

    train_ns, (test_from, test_to) = (at(train[0]), at(train[1])), (at(test[0]), at(test[1]))
    if test_to <= test_from:
        raise SplitError("the test part is empty: the trace is too short for this split")
    # A window every `step_ns` (default: one horizon, tiling the test part), each a whole
    # horizon (a forecast for a horizon is judged on one); the one window the test holds when
    # not even one fits.
    step = step_ns or horizon_ns
    if step <= 0:
        raise SplitError("the step must be longer than zero")
    span = test_to - test_from
    windows = (span - horizon_ns) // step + 1 if span >= horizon_ns else 1
    every = max(1, -(-windows // max(1, max_windows)))
    gaps = [(int(s), max(int(e), int(s) + 1)) for s, e in acc.gaps.itertuples(index=False)]
    scored, gap_windows = [], 0
    for w in range(0, windows, every):
        lo = test_from + w * step
        hi = min(lo + horizon_ns, test_to)
        if any(s < hi and lo < e for s, e in gaps):
            gap_windows += 1
        else:
            scored.append(Window(lo, hi))
    return Split(train_ns, (test_from, test_to), horizon_ns, windows, scored, gap_windows)


@dataclass
class Horizon:
    """One scored horizon of one model, kept for plots."""

    window: Window
    #: Expected accesses per region in the horizon.
    expected: np.ndarray
    #: Accesses per region in the horizon.
    actual: np.ndarray
    tally: Tally


@dataclass
class ModelResult:
    name: str
    total: Tally = field(default_factory=Tally)
    horizons: list[Horizon] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def evaluate(
    inten: Intensity, models: list, split: Split, threshold: float = 0.5
) -> list[ModelResult]:
    """Fits and scores each model on the split."""
    if inten.step_ns and split.horizon_ns % inten.step_ns:
        raise ValueError("the horizon must be a whole number of bins")
    first = max(0, inten.bin_of(split.train_ns[0]))
    train_end = max(first, min(inten.bin_of(split.train_ns[1]), inten.bin_of(split.test_ns[0])))
    acc = inten.accesses  # in time order
    ts = acc["ts_ns"].to_numpy()
    rows = np.searchsorted(inten.units, acc["unit"].to_numpy())
    nbytes = acc["bytes"].to_numpy()
    actuals = []
    for w in split.scored:
        lo, hi = np.searchsorted(ts, [w.from_ns, w.to_ns])
        bytes_per_unit = np.bincount(
            rows[lo:hi], weights=nbytes[lo:hi], minlength=inten.units.size
        ).astype(np.int64)
        counts_per_region = np.bincount(
            inten.unit_region[rows[lo:hi]], minlength=inten.regions.size
        )
        actuals.append((bytes_per_unit, counts_per_region))
    results = []
    for model in models:
        model.fit(inten, first, train_end)
        res = ModelResult(model.name)
        for w, (bytes_per_unit, counts_per_region) in zip(split.scored, actuals, strict=True):
            at = inten.bin_of(w.from_ns)
            steps = -(-(w.to_ns - w.from_ns) // inten.step_ns)
            p, expected = model.forecast(inten, first, at, steps)
            t = score(p >= threshold, bytes_per_unit, inten.unit)
            res.total += t
            res.horizons.append(Horizon(w, expected, counts_per_region, t))
        res.summary = model.summary()
        results.append(res)
    return results
