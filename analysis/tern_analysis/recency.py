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
    name: str = "recency"

    def fit(self, inten: Intensity, train_end: int) -> None:
        """Nothing to learn."""

    def forecast(self, inten: Intensity, at: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Accesses and bytes per region in the `steps` bins before `at`, as the expectation
        for the `steps` bins from `at`."""
        lo = max(0, at - steps)
        return inten.counts[:, lo:at].sum(axis=1), inten.bytes[:, lo:at].sum(axis=1)

    def summary(self) -> dict:
        return {}
