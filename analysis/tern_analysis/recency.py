"""The recency baseline: the next horizon's working set is the last horizon's.

It is what an LRU-like hot set predicts at the scale of one horizon, and what any forecasting
model must beat to earn its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .intensity import Intensity


@dataclass
class RecencyModel:
    #: Bins in one horizon: how far back it looks.
    horizon_bins: int
    name: str = "recency"

    def fit(self, inten: Intensity, first: int, train_end: int) -> None:
        """Nothing to learn."""

    def forecast(
        self, inten: Intensity, first: int, at: int, steps: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probability 1 for the units accessed in the horizon before `at`; per region, its
        accesses then as the expectation."""
        lo = max(first, at - self.horizon_bins)
        seen = inten.unit_counts[:, lo:at].sum(axis=1) > 0
        return seen.astype(float), inten.region_counts[:, lo:at].sum(axis=1)

    def summary(self) -> dict:
        return {}
