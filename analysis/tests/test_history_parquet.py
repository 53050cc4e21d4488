"""History segments as Parquet: the real `tern` binary puts a trace into a directory store
(`tern history put`), and every .parquet object, read with pandas, holds the trace's records as
`tern trace export` reads them back, row for row."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import MIB, SEC, block, fault, gap

from tern_analysis import io


def run(tern: Path, *args: str) -> str:
    done = subprocess.run(
        [str(tern), *args], check=True, timeout=120, capture_output=True, text=True
    )
    return done.stdout


def rows() -> list[str]:
    """150 s of requests of two processes on two targets, a fault, a gap: three 60 s windows."""
    out = []
    for i in range(300):
        ts = i * SEC // 2 + 1000
        op = ("read", "write", "discard")[i % 3]
        if i % 4 == 0:
            out.append(block(ts, op, i * MIB, 4096 * (i % 8 + 1), target="/dev/loop8", comm="w"))
        else:
            out.append(block(ts, op, i * 8192, 8192, pid=43, comm='db, "main"', flags=""))
    out.append(fault(70 * SEC, "write", 0x7F00_0000_1000))
    out.append(gap(100 * SEC, 101 * SEC, lost=17))
    return out


def test_every_history_parquet_object_holds_its_segments_records(write_trace, tmp_path, tern):
    trace, ref, store = tmp_path / "t.trace", tmp_path / "ref.csv", tmp_path / "history"
    run(tern, "trace", "import", "--format", "csv", str(write_trace(rows())), "--out", str(trace))
    run(tern, "trace", "export", "--format", "csv", str(trace), "--out", str(ref))
    counts = json.loads(run(tern, "history", "put", str(store), str(trace), "--every", "60s"))

    traces = sorted(store.rglob("*.trace"))
    tables = sorted(store.rglob("*.parquet"))
    assert len(traces) == 3, traces
    assert tables == [t.with_suffix(".parquet") for t in traces]
    assert (counts["segments"], counts["tables"], counts["table_failures"]) == (3, 3, 0)
    # The listing names segments only: the tables are neither segments nor damage.
    listed = run(tern, "history", "ls", str(store), "--json").splitlines()
    assert sorted(json.loads(line)["stem"] for line in listed) == [t.stem for t in traces]

    for t in tables:
        part = pd.read_parquet(t)
        # Host and device as the object path names them, on every row.
        assert set(part["host"]) == {t.parent.parent.name}
        assert set(part["segment_device"]) == {t.parent.name}
    # One schema: the files concatenate as they are, as a query over a prefix reads them.
    got = pa.concat_tables([pq.read_table(t) for t in tables]).to_pandas()
    want = io.read_table(ref)
    assert len(got[got["kind"] != "process"]) == len(want) == 302

    # The export starts its clock at the trace's start; an imported trace starts at the epoch.
    assert (got["unix_ns"] == got["trace_ns"].astype("int64")).all()
    assert (got["time"] == pd.to_datetime(got["unix_ns"], unit="ns", utc=True)).all()

    def by_time(df: pd.DataFrame, kind: str, ts: str) -> pd.DataFrame:
        return df[df["kind"] == kind].sort_values([ts, "offset"]).reset_index(drop=True)

    g = by_time(got, "block", "trace_ns")
    w = by_time(want, "block", "ts_ns")
    assert g["trace_ns"].tolist() == w["ts_ns"].tolist()
    assert g["device"].astype(str).tolist() == w["target"].tolist()
    assert g["op"].astype(str).tolist() == w["op"].tolist()
    assert g["offset"].tolist() == w["offset"].tolist()
    assert g["len"].tolist() == w["len"].tolist()
    assert g["latency_ns"].tolist() == w["latency_ns"].tolist() == [1000] * 300
    assert g["pid"].tolist() == w["pid"].tolist()
    # A pid's name is known where its segment holds the process record (the tracer writes one
    # per pid and session, before its first event): here the first window's rows.
    known = g["comm"].notna()
    assert known[g["trace_ns"] < 60 * SEC].all()
    assert g.loc[known, "comm"].astype(str).tolist() == w.loc[known, "comm"].tolist()
    assert g["flag_names"].astype(str).tolist() == w["flags"].fillna("").tolist()
    per_device = g.groupby(g["device"].astype(str))["len"].sum().to_dict()
    assert per_device == w.groupby("target")["len"].sum().to_dict()

    f = got[got["kind"] == "fault"].iloc[0]
    assert (f["address"], f["pid"], f["tid"], f["ip"]) == (0x7F00_0000_1000, 7, 8, 4096)
    assert (f["trace_ns"], f["flag_names"]) == (70 * SEC, "write")

    gp = got[got["kind"] == "gap"].iloc[0]
    assert gp["time"] == pd.Timestamp(100 * SEC, unit="ns", tz="UTC")
    assert gp["end_time"] == pd.Timestamp(101 * SEC, unit="ns", tz="UTC")
    assert gp["lost_block"] + gp["lost_fault"] == 17

    # A process record names each pid once, before its first event.
    named = got[got["kind"] == "process"]
    assert set(zip(named["pid"], named["comm"].astype(str), strict=True)) == {
        (42, "w"),
        (43, 'db, "main"'),
    }
