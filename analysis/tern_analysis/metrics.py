"""Precision and coverage of a predicted next-horizon working set, as `tern predict eval`
defines them (userspace/src/predict/eval.rs).

The working set of a horizon is the set of units accessed in it (any operation). Per horizon:

- precision = |predicted ∩ actual| / |predicted|
- coverage  = |predicted ∩ actual| / |actual|    (recall)
- precision_bytes: of the bytes a prefetch of the predicted units would move (a whole unit
  each), the share the horizon then used (per hit unit, its accessed bytes up to one unit);
- coverage_bytes: of the bytes the horizon accessed (request bytes, repeats included), the
  share inside predicted units.

Over several horizons the numerators and denominators are summed before dividing (a
micro-average), so a busy horizon weighs more than an idle one. A ratio whose denominator is
zero (nothing predicted, or nothing accessed) is undefined: None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


@dataclass
class Tally:
    """Sums over horizons from which the four ratios are computed."""

    predicted: int = 0
    actual: int = 0
    hits: int = 0
    predicted_bytes: int = 0
    used_bytes: int = 0
    actual_bytes: int = 0
    covered_bytes: int = 0

    def __iadd__(self, other: Tally) -> Tally:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    @property
    def precision(self) -> float | None:
        return _ratio(self.hits, self.predicted)

    @property
    def coverage(self) -> float | None:
        return _ratio(self.hits, self.actual)

    @property
    def precision_bytes(self) -> float | None:
        return _ratio(self.used_bytes, self.predicted_bytes)

    @property
    def coverage_bytes(self) -> float | None:
        return _ratio(self.covered_bytes, self.actual_bytes)

    def report(self) -> dict:
        """The ratios and the sums behind them, for JSON."""
        return {
            "precision": self.precision,
            "coverage": self.coverage,
            "precision_bytes": self.precision_bytes,
            "coverage_bytes": self.coverage_bytes,
            **asdict(self),
        }


def score(predicted: np.ndarray, accessed_bytes: np.ndarray, unit: int) -> Tally:
    """Scores one horizon. Arrays are indexed by unit: `predicted` is a boolean mask,
    `accessed_bytes` the bytes the horizon accessed in each unit (0: not accessed)."""
    predicted = np.asarray(predicted, dtype=bool)
    accessed = np.asarray(accessed_bytes, dtype=np.int64)
    actual = accessed > 0
    hit = predicted & actual
    return Tally(
        predicted=int(predicted.sum()),
        actual=int(actual.sum()),
        hits=int(hit.sum()),
        predicted_bytes=int(predicted.sum()) * unit,
        used_bytes=int(np.minimum(accessed[hit], unit).sum()),
        actual_bytes=int(accessed.sum()),
        covered_bytes=int(accessed[hit].sum()),
    )
