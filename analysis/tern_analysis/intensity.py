"""Per-unit and per-region access counts in time bins.

As in `tern predict eval`: the disk is cut into aligned units (64 KiB by default, what a
prefetch moves and what is scored) grouped into regions (1 MiB by default, whose access
intensity is forecast). A request that straddles units is one access of each, with the bytes
that fall inside it. Bins that overlap a gap in the trace are unknown: NaN in `series`.
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


def unit_accesses(acc: Accesses, unit: int) -> pd.DataFrame:
    """One row per (request, unit it touches), in time order: `ts_ns`, `unit`, `bytes` inside
    that unit, and `write` (anything but a read)."""
    req = acc.requests
    u = np.uint64(unit)
    off = req["offset"].to_numpy(dtype=np.uint64)
    end = off + req["len"].to_numpy(dtype=np.uint64)
    first = off // u
    span = ((end - np.uint64(1)) // u - first + np.uint64(1)).astype(np.int64)
    idx = np.repeat(np.arange(len(req)), span)
    within = np.arange(idx.size) - np.repeat(np.cumsum(span) - span, span)
    units = first[idx] + within.astype(np.uint64)
    lo = np.maximum(off[idx], units * u)
    hi = np.minimum(end[idx], (units + np.uint64(1)) * u)
    return pd.DataFrame(
        {
            "ts_ns": req["ts_ns"].to_numpy(dtype=np.int64)[idx],
            "unit": units,
            "bytes": (hi - lo).astype(np.int64),
            "write": (req["op"] != "read").to_numpy(dtype=bool)[idx],
        }
    )


@dataclass(frozen=True)
class Intensity:
    """Dense access counts on a grid of `step_ns` bins from `start_ns`.

    `accesses` is the `unit_accesses` table. Row i of `unit_counts` is unit `units[i]`, in
    region row `unit_region[i]` of `region_counts` (region id `regions[j]`). `known[b]` is
    False when bin b overlaps a gap.
    """

    accesses: pd.DataFrame
    units: np.ndarray
    unit_region: np.ndarray
    regions: np.ndarray
    unit_counts: np.ndarray
    region_counts: np.ndarray
    known: np.ndarray
    start_ns: int
    step_ns: int
    unit: int
    region_size: int

    @property
    def n_bins(self) -> int:
        return self.known.size

    def bin_of(self, ts_ns: int) -> int:
        """The bin holding `ts_ns`."""
        return (ts_ns - self.start_ns) // self.step_ns

    def series(self, row: int, lo: int, hi: int) -> np.ndarray:
        """Accesses per bin of one region over bins [lo, hi), NaN where unknown."""
        y = self.region_counts[row, lo:hi].astype(float)
        y[~self.known[lo:hi]] = np.nan
        return y


def build(acc: Accesses, unit: int, region_size: int, step_ns: int, anchor_ns: int) -> Intensity:
    """Bins the accesses on a grid of `step_ns` that has a bin boundary at `anchor_ns` (the
    start of the test, so that horizons are whole bins) and covers the whole history."""
    if unit & (unit - 1) or not 4096 <= unit <= 1 << 30:
        raise ValueError(f"the unit {unit} must be a power of two from 4K to 1G")
    if region_size % unit:
        raise ValueError(f"the region size {region_size} is not a multiple of the unit {unit}")
    start = anchor_ns - -(-(anchor_ns - acc.start_ns) // step_ns) * step_ns
    n_bins = max(1, -(-(acc.end_ns - start) // step_ns))
    per_unit = unit_accesses(acc, unit)
    units, rows = np.unique(per_unit["unit"].to_numpy(), return_inverse=True)
    regions, unit_region = np.unique(units // np.uint64(region_size // unit), return_inverse=True)
    bins = (per_unit["ts_ns"].to_numpy() - start) // step_ns
    unit_counts = np.zeros((units.size, n_bins))
    np.add.at(unit_counts, (rows, bins), 1.0)
    region_counts = np.zeros((regions.size, n_bins))
    np.add.at(region_counts, unit_region, unit_counts)
    known = np.ones(n_bins, dtype=bool)
    for g_start, g_end in acc.gaps.itertuples(index=False):
        # [start, max(end, start + 1)), as in `tern predict eval`.
        b0 = max(0, (int(g_start) - start) // step_ns)
        b1 = min(n_bins, -(-(max(int(g_end), int(g_start) + 1) - start) // step_ns))
        known[b0:b1] = False
    return Intensity(
        per_unit,
        units,
        unit_region,
        regions,
        unit_counts,
        region_counts,
        known,
        start,
        step_ns,
        unit,
        region_size,
    )
