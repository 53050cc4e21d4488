"""A transcription of the Rust `lru` baseline (userspace/src/predict/hotset.rs), so that the
two harnesses can be checked against each other model for model: on the same trace and
split, `python -m tern_analysis eval --models lru` and `tern predict eval --models lru` must
give the same counts.

A unit last read (written) `age` before the horizon's start, read (written) `n` times since
the training part's start, is claimed with probability exp(-age / (horizon * (1 + ln(1 + n))));
its probability of an access is the larger of the read and write ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .intensity import Intensity


@dataclass
class LruModel:
    horizon_ns: int
    #: The training part's start: what the model has seen begins there.
    from_ns: int
    name: str = "lru"

    def fit(self, inten: Intensity, first: int, train_end: int) -> None:
        """Nothing to fit: the state is the history itself."""

    def forecast(
        self, inten: Intensity, first: int, at: int, steps: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per unit the probability of an access in the horizon from bin `at`; per region the
        sum of its units' probabilities."""
        now = inten.start_ns + at * inten.step_ns
        acc = inten.accesses
        ts = acc["ts_ns"].to_numpy()
        lo, hi = np.searchsorted(ts, [self.from_ns, now])
        rows = np.searchsorted(inten.units, acc["unit"].to_numpy()[lo:hi])
        write = acc["write"].to_numpy()[lo:hi]
        p = np.zeros(inten.units.size)
        for kind in (False, True):
            sel = write == kind
            n = np.bincount(rows[sel], minlength=inten.units.size)
            last = np.full(inten.units.size, np.iinfo(np.int64).min)
            np.maximum.at(last, rows[sel], ts[lo:hi][sel])
            seen = n > 0
            scale = self.horizon_ns * (1.0 + np.log1p(n[seen]))
            p[seen] = np.maximum(p[seen], np.exp(-(now - last[seen]) / scale))
        return p, np.bincount(inten.unit_region, weights=p, minlength=inten.regions.size)

    def summary(self) -> dict:
        return {}
