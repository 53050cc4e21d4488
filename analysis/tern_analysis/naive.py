"""The two naive forecasts every model must beat, and F1 by units and by 4 KiB blocks, written
from their definitions (not from the Rust code) to check `tern predict eval`'s rows for them
(userspace/src/predict/naive.rs, eval.rs):

- `last-horizon` claims the units touched in [t - H, t); `ever-touched` every unit touched
  since the training part's start (what the model has been shown) and before t;
- by units: a claimed unit is a hit when the window touched it;
- by blocks: a claimed unit claims all its 4 KiB blocks; the window's blocks are the distinct
  4 KiB blocks its requests cover; a hit is a claimed block the window touched.

The windows are those of `make_split` (the test part tiled in horizons, gaps skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .evaluation import Split
from .io import Accesses

BLOCK = 4096
NAIVE = ("last-horizon", "ever-touched")


@dataclass
class Counts:
    predicted: int = 0
    actual: int = 0
    hits: int = 0
    predicted_blocks: int = 0
    actual_blocks: int = 0
    hit_blocks: int = 0

    @staticmethod
    def _f1(hits: int, predicted: int, actual: int) -> float | None:
        return 2 * hits / (predicted + actual) if predicted + actual else None

    @property
    def f1(self) -> float | None:
        return self._f1(self.hits, self.predicted, self.actual)

    @property
    def f1_blocks(self) -> float | None:
        return self._f1(self.hit_blocks, self.predicted_blocks, self.actual_blocks)

    def report(self) -> dict:
        return {
            "predicted_units": self.predicted,
            "actual_units": self.actual,
            "hit_units": self.hits,
            "predicted_blocks": self.predicted_blocks,
            "actual_blocks": self.actual_blocks,
            "hit_blocks": self.hit_blocks,
            "f1": self.f1,
            "f1_blocks": self.f1_blocks,
        }


def _touched(offsets: np.ndarray, lengths: np.ndarray, size: int) -> set[int]:
    """The units of `size` bytes the requests cover."""
    out: set[int] = set()
    for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
        out.update(range(off // size, (off + n + size - 1) // size))
    return out


def naive_counts(acc: Accesses, split: Split, units: list[int]) -> dict[tuple[str, int], Counts]:
    """Per (forecast, unit), the counts summed over the split's scored windows."""
    req = acc.requests
    ts = req["ts_ns"].to_numpy()
    off = req["offset"].to_numpy().astype(np.int64)
    ln = req["len"].to_numpy()
    start = split.train_ns[0]
    h = split.horizon_ns
    out = {(name, u): Counts() for name in NAIVE for u in units}
    for w in split.scored:
        first, at, end = np.searchsorted(ts, [start, w.from_ns, w.to_ns])
        recent = np.searchsorted(ts, max(start, w.from_ns - h))
        window_blocks = _touched(off[at:end], ln[at:end], BLOCK)
        for u in units:
            per = u // BLOCK
            actual = _touched(off[at:end], ln[at:end], u)
            blocks_in: dict[int, int] = {}
            for b in window_blocks:
                blocks_in[b // per] = blocks_in.get(b // per, 0) + 1
            claims = {
                "last-horizon": _touched(off[recent:at], ln[recent:at], u),
                "ever-touched": _touched(off[first:at], ln[first:at], u),
            }
            for name, claimed in claims.items():
                c = out[(name, u)]
                c.predicted += len(claimed)
                c.actual += len(actual)
                c.hits += len(claimed & actual)
                c.predicted_blocks += len(claimed) * per
                c.actual_blocks += len(window_blocks)
                c.hit_blocks += sum(blocks_in.get(x, 0) for x in claimed)
    return out
