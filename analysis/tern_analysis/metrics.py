"""Precision and coverage of a predicted next-horizon working set.

The working set of a horizon is the set of regions accessed in it. Per horizon:

- precision = |predicted ∩ actual| / |predicted|
- coverage  = |predicted ∩ actual| / |actual|    (recall)

and by bytes, each region weighted by its volume: a predicted region by the bytes the model
expects in it, an actual one by the bytes accessed in it, so that
precision_bytes = predicted bytes in regions that were accessed / all predicted bytes and
coverage_bytes = accessed bytes in regions that were predicted / all accessed bytes.

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
    predicted_bytes: float = 0.0
    actual_bytes: float = 0.0
    hit_predicted_bytes: float = 0.0
    hit_actual_bytes: float = 0.0

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
        return _ratio(self.hit_predicted_bytes, self.predicted_bytes)

    @property
    def coverage_bytes(self) -> float | None:
        return _ratio(self.hit_actual_bytes, self.actual_bytes)

    def report(self) -> dict:
        """The ratios and the sums behind them, for JSON."""
        return {
            "precision": self.precision,
            "coverage": self.coverage,
            "precision_bytes": self.precision_bytes,
            "coverage_bytes": self.coverage_bytes,
            **asdict(self),
        }


def score(
    predicted: np.ndarray,
    predicted_bytes: np.ndarray,
    actual_counts: np.ndarray,
    actual_bytes: np.ndarray,
) -> Tally:
    """Scores one horizon. Arrays are indexed by region: `predicted` is a boolean mask,
    `predicted_bytes` the volume the model expects per region, `actual_counts` and
    `actual_bytes` what the horizon really accessed."""
    predicted = np.asarray(predicted, dtype=bool)
    actual = np.asarray(actual_counts) > 0
    hit = predicted & actual
    pb = np.where(predicted, np.asarray(predicted_bytes, dtype=float), 0.0)
    ab = np.where(actual, np.asarray(actual_bytes, dtype=float), 0.0)
    return Tally(
        predicted=int(predicted.sum()),
        actual=int(actual.sum()),
        hits=int(hit.sum()),
        predicted_bytes=float(pb.sum()),
        actual_bytes=float(ab.sum()),
        hit_predicted_bytes=float(pb[hit].sum()),
        hit_actual_bytes=float(ab[hit].sum()),
    )
