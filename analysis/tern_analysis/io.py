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

#: Operations that touch data, as `tern predict eval` counts them: a read, or an operation that
#: modifies the disk (`Op::modifies`: write, discard, write-zeroes). Flushes carry no range.
DATA_OPS = ("read", "write", "discard", "write-zeroes")


class TraceFormatError(ValueError):
    """The file is not a trace export this package understands."""


@dataclass(frozen=True)
class Accesses:
    """The data accesses to one block target and the windows in which events were lost.

    `requests` has one row per request, in time order: `ts_ns`, `op`, `offset`, `len`.
    `gaps` has `start_ns`, `end_ns`. The history spans [`start_ns`, `end_ns`): from the
    first access or gap to just after the last, as in `tern predict eval`.
    """

    target: str
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


def accesses(df: pd.DataFrame, target: str | None = None) -> Accesses:
    """Selects the data accesses to `target` (default: the first block target in the table)
    and the gaps (events of every kind were lost in them, so they count for all targets)."""
    data = df[(df["kind"] == "block") & df["op"].isin(DATA_OPS) & (df["len"] > 0)]
    if target is None:
        if data.empty:
            raise TraceFormatError("the trace has no block reads or writes")
        target = str(data["target"].iloc[0])
    b = data[data["target"] == target]
    if b.empty:
        names = sorted(data["target"].dropna().unique())
        raise TraceFormatError(f"no reads or writes to {target!r}; the trace has {names}")
    # Imported traces may be out of time order (they are emitted at completion).
    req = (
        b[["ts_ns", "op", "offset", "len"]]
        .astype({"ts_ns": "int64", "op": "string", "offset": "uint64", "len": "int64"})
        .sort_values("ts_ns", kind="stable")
        .reset_index(drop=True)
    )
    g = df[df["kind"] == "gap"]
    starts = g["ts_ns"].astype("int64").to_numpy()
    gaps = pd.DataFrame(
        {"start_ns": starts, "end_ns": g["end_ns"].fillna(g["ts_ns"]).astype("int64").to_numpy()}
    )
    times = np.concatenate([req["ts_ns"].to_numpy(), starts])
    return Accesses(target, req, gaps, int(times.min()), int(times.max()) + 1)
