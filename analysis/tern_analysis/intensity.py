"""Per-region access intensity: how many accesses (and bytes) each region saw in each time bin.

A region is an aligned extent of `region_size` bytes of one address space (a block target, or
one process's memory for page faults). An access that straddles regions counts once in each,
with the bytes that fall inside it. Bins that overlap a gap in the trace are unknown: their
values are NaN in `series`, and they are never scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .io import Accesses

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TIME_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000}
_TIME_UNITS["h"] = 60 * _TIME_UNITS["m"]


def parse_size(text: str) -> int:
    """`1M`, `64k`, `4096`, `1MiB` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"bad size {text!r}: write a positive size such as 1M, 64k or 4096")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_duration(text: str) -> int:
    """`10s`, `500ms`, `2m`, `1h` -> nanoseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"bad duration {text!r}: write a positive duration such as 10s or 500ms")
    return round(float(m.group(1)) * _TIME_UNITS[m.group(2)])


def parse_span(text: str) -> tuple[float, float]:
    """`0-50%` -> (0.0, 0.5): a part of the trace's duration."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*%\s*", text)
    if not m:
        raise ValueError(f"bad span {text!r}: write a percentage range such as 0-50%")
    lo, hi = float(m.group(1)) / 100, float(m.group(2)) / 100
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"bad span {text!r}: need 0 <= start < end <= 100")
    return lo, hi


@dataclass(frozen=True)
class Intensity:
    """Dense per-region time series on a grid of `step_ns` bins from `start_ns`.

    `regions` lists (`space`, `region`) per row of `counts`/`bytes`, which are
    (regions x bins) arrays; `known[b]` is False when bin b overlaps a gap.
    """

    regions: pd.DataFrame
    counts: np.ndarray
    bytes: np.ndarray
    known: np.ndarray
    start_ns: int
    step_ns: int
    region_size: int

    @property
    def n_bins(self) -> int:
        return self.known.size

    def series(self, row: int, end_bin: int) -> np.ndarray:
        """Accesses per bin of one region over bins [0, end_bin), NaN where unknown."""
        y = self.counts[row, :end_bin].astype(float)
        y[~self.known[:end_bin]] = np.nan
        return y

    def bin_at(self, frac: float) -> int:
        """The bin boundary nearest to a fraction of the grid's length."""
        return round(frac * self.n_bins)


def build(acc: Accesses, region_size: int, step_ns: int) -> Intensity:
    """Bins the accesses of a trace into per-region series."""
    n_bins = max(1, -(-(acc.end_ns - acc.start_ns + 1) // step_ns))
    req = acc.requests
    off = req["offset"].to_numpy(dtype=np.uint64)
    ln = req["len"].to_numpy(dtype=np.uint64)
    end = off + ln
    first = off // np.uint64(region_size)
    last = (end - np.uint64(1)) // np.uint64(region_size)
    span = (last - first + np.uint64(1)).astype(np.int64)
    # One row per (access, region it touches); nearly all accesses touch one region.
    idx = np.repeat(np.arange(len(req)), span)
    within = np.arange(idx.size) - np.repeat(np.cumsum(span) - span, span)
    region = first[idx] + within.astype(np.uint64)
    lo = np.maximum(off[idx], region * np.uint64(region_size))
    hi = np.minimum(end[idx], (region + np.uint64(1)) * np.uint64(region_size))
    nbytes = (hi - lo).astype(np.int64)
    ts = req["ts_ns"].to_numpy(dtype=np.int64)[idx]
    bins = (ts - acc.start_ns) // step_ns

    keys = pd.DataFrame({"space": req["space"].to_numpy()[idx], "region": region})
    codes = keys.groupby(["space", "region"], sort=True).ngroup().to_numpy()
    regions = keys.drop_duplicates().sort_values(["space", "region"])
    counts = np.zeros((len(regions), n_bins))
    nb = np.zeros((len(regions), n_bins))
    np.add.at(counts, (codes, bins), 1.0)
    np.add.at(nb, (codes, bins), nbytes.astype(float))

    known = np.ones(n_bins, dtype=bool)
    for g_start, g_end in acc.gaps.itertuples(index=False):
        b0 = max(0, (int(g_start) - acc.start_ns) // step_ns)
        b1 = min(n_bins - 1, (int(g_end) - acc.start_ns) // step_ns)
        known[b0 : b1 + 1] = False
    return Intensity(
        regions.reset_index(drop=True), counts, nb, known, acc.start_ns, step_ns, region_size
    )
