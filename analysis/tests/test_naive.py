"""The naive forecasts computed here from their definitions give `tern predict eval`'s rows."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import MIB, SEC, block, gap

from tern_analysis import cli, io
from tern_analysis.evaluation import make_split
from tern_analysis.naive import naive_counts

MS = SEC // 1000


def rows():
    """Reads and writes over 8 s: a block re-read every 300 ms, a file written forward in
    8 KiB requests, a random scatter, one request straddling a 64 KiB boundary."""
    out = []
    seed = 12345
    for i in range(80):
        t = i * 100 * MS
        if i % 3 == 0:
            out.append(block(t, "read", 5 * MIB, 4096))
        out.append(block(t + 1, "write", 2 * MIB + i * 8192, 8192))
        seed = (seed * 1103515245 + 12345) % (1 << 31)
        out.append(block(t + 2, "read", (seed % 4096) * 4096, 4096))
    out.append(block(4 * SEC + 7, "read", 65536 - 4096, 12288))
    return out


def test_by_hand_on_a_tiny_trace(write_trace):
    # Train 0-4 s, test 4-8 s, horizon 2 s: windows [4, 6) and [6, 8).
    trace = [
        block(0, "read", 0, 4096),
        block(3 * SEC, "read", 65536, 4096),
        block(5 * SEC, "read", 65536 + 4096, 4096),  # new block, recent 64 KiB unit
        block(7 * SEC, "read", 0, 4096),  # touched before the last horizon
        block(8 * SEC - 1, "write", 3 * MIB, 4096),
    ]
    acc = io.accesses(io.read_table(write_trace(trace)))
    split = make_split(acc, (0, 0.5), (0.5, 1), 2 * SEC)
    c = naive_counts(acc, split, [4096, 65536])
    # Window 1 at 4 s: last-horizon {unit 16} at 4K / {1} at 64K; actual {17} / {1}.
    # Window 2 at 6 s: last-horizon {17} / {1}; actual {0, 768} / {0, 48}.
    lh4, lh64 = c[("last-horizon", 4096)], c[("last-horizon", 65536)]
    assert (lh4.predicted, lh4.actual, lh4.hits) == (2, 3, 0)
    assert (lh64.predicted, lh64.actual, lh64.hits) == (2, 3, 1)
    assert (lh64.predicted_blocks, lh64.actual_blocks, lh64.hit_blocks) == (32, 3, 1)
    ev4 = c[("ever-touched", 4096)]
    # Ever touched: {0, 16} then {0, 16, 17}: window 2 hits block 0.
    assert (ev4.predicted, ev4.actual, ev4.hits) == (5, 3, 1)
    assert ev4.f1 == pytest.approx(2 / 8)


@pytest.mark.parametrize("step", [None, 300 * MS])
def test_the_rust_harness_gives_the_same_rows(write_trace, tmp_path, step, tern):
    src = write_trace([*rows(), gap(int(5.5 * SEC), int(5.6 * SEC))], "in.csv")
    trace = tmp_path / "t.trace"
    subprocess.run(
        [str(tern), "trace", "import", "--format", "csv", str(src), "--out", str(trace)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    args = ["--horizon", "1s", "--json", *(["--step", f"{step // MS}ms"] if step else [])]
    rust = json.loads(
        subprocess.run(
            [
                str(tern),
                "predict",
                "eval",
                str(trace),
                "--models",
                "last-horizon,ever-touched",
                "--unit",
                "4K,64K,1M",
                *args,
            ],
            check=True,
            timeout=120,
            capture_output=True,
            text=True,
        ).stdout
    )
    acc = io.accesses(io.read_table(src))
    split = make_split(acc, (0, 0.5), (0.5, 1), SEC, step_ns=step)
    assert (
        rust["scored_windows"] == len(split.scored)
        and rust["gap_windows"] == split.gap_windows >= 1
    )
    assert rust["windows"] == split.windows and split.windows >= (10 if step else 3)
    mine = naive_counts(acc, split, [4096, 65536, MIB])
    assert len(rust["models"]) == len(mine) == 6
    assert all(r["hit_units"] > 0 and r["hit_blocks"] > 0 for r in rust["models"])
    for r in rust["models"]:
        c = mine[(r["name"], r["unit"])]
        for key, value in c.report().items():
            assert r[key] == pytest.approx(value), (r["name"], r["unit"], key)


def test_the_command_prints_json(write_trace, capsys):
    path = write_trace(rows())
    assert cli.main(["naive", str(path), "--horizon", "1s", "--units", "4K,1M", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {(m["name"], m["unit"]) for m in report["models"]} == {
        ("last-horizon", 4096),
        ("last-horizon", MIB),
        ("ever-touched", 4096),
        ("ever-touched", MIB),
    }
