"""Reading exported traces: the column set of export.rs, every row kind, Parquet, and a CSV
written by the real `tern` binary."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import HEADER, MIB, SEC, block, fault, gap

from tern_analysis import intensity, io

REPO = Path(__file__).resolve().parents[2]


def fixture_rows():
    return [
        block(0, "flush", 0, 0, comm='sh, "quoted"'),
        block(2 * SEC, "read", MIB - 4096, 8192, comm='sh, "quoted"'),
        fault(int(2.5 * SEC), "write", 0x7F00_0000_1000),
        gap(3 * SEC, 4 * SEC, lost=17),
        # Imports may emit out of time order: this one was issued before the read above.
        block(SEC, "write", 3 * MIB, 4096, target="/dev/loop8", comm="w"),
        block(int(1.5 * SEC), "discard", 0, MIB),
        block(5 * SEC, "write-zeroes", 4 * MIB, 65536),
    ]


def test_columns_are_those_export_rs_writes():
    src = (REPO / "userspace/src/trace/export.rs").read_text()
    m = re.search(r'CSV_HEADER: &str =\s*"([^"]+)"', src)
    assert m, "CSV_HEADER not found in export.rs"
    assert m.group(1) == HEADER == ",".join(io.CSV_COLUMNS)


def check_fixture_accesses(acc: io.Accesses):
    # The first block target with data; data ops only (discard included), in time order.
    assert acc.target == "/dev/loop9"
    r = acc.requests
    assert list(r["op"]) == ["discard", "read", "write-zeroes"]
    assert list(r["offset"]) == [0, MIB - 4096, 4 * MIB]
    assert list(r["len"]) == [MIB, 8192, 65536]
    assert acc.gaps.values.tolist() == [[3 * SEC, 4 * SEC]]
    assert (acc.start_ns, acc.end_ns) == (int(1.5 * SEC), 5 * SEC + 1)


def test_every_row_kind_of_the_export_is_read(write_trace):
    df = io.read_table(write_trace(fixture_rows()))
    assert df["comm"].iloc[0] == 'sh, "quoted"' and df["lost"].iloc[3] == 17
    assert df["offset"].iloc[2] == 0x7F00_0000_1000  # a fault's address
    check_fixture_accesses(io.accesses(df))
    other = io.accesses(df, "/dev/loop8")
    assert other.requests.values.tolist() == [[SEC, "write", 3 * MIB, 4096]]
    with pytest.raises(io.TraceFormatError, match="loop8"):
        io.accesses(df, "/dev/sda")


def test_gap_bins_are_unknown(write_trace):
    acc = io.accesses(io.read_table(write_trace(fixture_rows())))
    inten = intensity.build(acc, 65536, MIB, SEC, acc.start_ns)
    # Bins from 1.5 s; the gap [3 s, 4 s) touches the second and third.
    assert inten.known.tolist() == [True, False, False, True]


def test_parquet_holds_the_same_table(write_trace, tmp_path):
    df = io.read_table(write_trace(fixture_rows()))
    io.write_parquet(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(io.read_table(tmp_path / "t.parquet"), df)


def test_a_table_without_the_export_columns_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(io.TraceFormatError, match="tern trace export"):
        io.read_table(tmp_path / "x.csv")


def test_a_csv_exported_by_the_tern_binary_is_read(write_trace, tmp_path, tern):
    src = write_trace(fixture_rows(), "in.csv")
    trace, out = tmp_path / "t.trace", tmp_path / "out.csv"
    for args in (
        ["trace", "import", "--format", "csv", str(src), "--out", str(trace)],
        ["trace", "export", "--format", "csv", str(trace), "--out", str(out)],
    ):
        subprocess.run([str(tern), *args], check=True, timeout=60, capture_output=True)
    assert out.read_text().splitlines()[0] == HEADER
    check_fixture_accesses(io.accesses(io.read_table(out)))
