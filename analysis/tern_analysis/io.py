"""Reading traces exported by `tern trace export --format csv` (or the same table as Parquet).

The columns are those of `CSV_HEADER` in userspace/src/trace/export.rs. Three kinds of rows
matter here: `block` requests (`target`, `op`, `offset`, `len` in bytes), `fault` rows (page
faults: `offset` is the virtual address, `len` 4096) and `gap` rows (`ts_ns`..`end_ns`, a window
in which the kernel dropped events: nothing can be concluded about I/O inside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: The exported columns, in order (userspace/src/trace/export.rs, `CSV_HEADER`).
CSV_COLUMNS = [
    "kind",
    "ts_ns",
    "end_ns",
    "target",
    "op",
    "offset",
    "len",
    "latency_ns",
    "pid",
    "tid",
    "ip",
    "flags",
    "comm",
    "lost",
]

_DTYPES = {
    "kind": "string",
    "ts_ns": "Int64",
    "end_ns": "Int64",
    "target": "string",
    "op": "string",
    "offset": "UInt64",
    "len": "Int64",
    "latency_ns": "Int64",
    "pid": "Int64",
    "tid": "Int64",
    "ip": "UInt64",
    "flags": "string",
    "comm": "string",
    "lost": "Int64",
}

#: Operations that move data: they make a region part of the working set. Flushes carry no
#: range; discards drop data rather than use it.
DATA_OPS = ("read", "write", "write-zeroes")


class TraceFormatError(ValueError):
    """The file is not a trace export this package understands."""


@dataclass(frozen=True)
class Accesses:
    """The data accesses of a trace and the windows in which events were lost.

    `requests` has one row per access: `ts_ns`, `space` (the block target's name, or
    `pid N` for page faults: each is its own address space), `op`, `offset`, `len`.
    `gaps` has `start_ns`, `end_ns`. `start_ns`/`end_ns` bound everything in the trace.
    """

    requests: pd.DataFrame
    gaps: pd.DataFrame
    start_ns: int
    end_ns: int


def read_table(path: str | Path) -> pd.DataFrame:
    """Reads an exported trace table: CSV, or Parquet when the name ends in `.parquet`."""
    path = Path(path)
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        # pyarrow parses large exports several times faster than the default engine.
        df = pd.read_csv(path, dtype=_DTYPES, engine="pyarrow")
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise TraceFormatError(
            f"{path} lacks the columns {missing}; export the trace with "
            "`tern trace export --format csv TRACE --out FILE`"
        )
    return df.astype({c: _DTYPES[c] for c in CSV_COLUMNS})


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Stores an exported table as Parquet (several times smaller and faster to read)."""
    df.to_parquet(path, engine="pyarrow", index=False)


def accesses(df: pd.DataFrame, kinds: tuple[str, ...] = ("block",)) -> Accesses:
    """Selects the data accesses of the given row kinds (`block`, `fault`) and the gaps."""
    unknown = set(kinds) - {"block", "fault"}
    if unknown:
        raise TraceFormatError(f"unknown access kinds {sorted(unknown)}: use block and/or fault")
    parts = []
    if "block" in kinds:
        b = df[(df["kind"] == "block") & df["op"].isin(DATA_OPS) & (df["len"] > 0)]
        parts.append(
            pd.DataFrame(
                {
                    "ts_ns": b["ts_ns"],
                    "space": b["target"].fillna("?"),
                    "op": b["op"],
                    "offset": b["offset"],
                    "len": b["len"],
                }
            )
        )
    if "fault" in kinds:
        f = df[df["kind"] == "fault"]
        parts.append(
            pd.DataFrame(
                {
                    "ts_ns": f["ts_ns"],
                    "space": "pid " + f["pid"].astype("string"),
                    "op": f["op"],
                    "offset": f["offset"],
                    "len": f["len"],
                }
            )
        )
    req = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    # Imported traces may be out of time order (they are emitted at completion).
    req = req.astype(
        {"ts_ns": "int64", "space": "string", "op": "string", "offset": "uint64", "len": "int64"}
    )
    req = req.sort_values("ts_ns", kind="stable").reset_index(drop=True)

    g = df[df["kind"] == "gap"]
    gaps = pd.DataFrame(
        {
            "start_ns": g["ts_ns"].astype("int64").to_numpy(),
            "end_ns": g["end_ns"].fillna(g["ts_ns"]).astype("int64").to_numpy(),
        }
    )
    times = [df["ts_ns"].dropna().astype("int64").to_numpy()]
    times.append(df["end_ns"].dropna().astype("int64").to_numpy())
    all_t = np.concatenate(times)
    if all_t.size == 0:
        raise TraceFormatError("the trace has no records")
    return Accesses(req, gaps, int(all_t.min()), int(all_t.max()))
