"""The metrics against values computed by hand on tiny traces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MIB, SEC, block, gap

from tern_analysis import cli, intensity, io
from tern_analysis.evaluation import evaluate, make_split
from tern_analysis.metrics import Tally, score
from tern_analysis.recency import RecencyModel


def test_score_counts_units_and_bytes_as_the_rust_harness_does():
    unit = 65536
    # units:        0     1      2      3
    predicted = [True, True, False, True]
    accessed = [8192, 0, 4096, 3 * unit]  # unit 3 was accessed three times over
    t = score(predicted, accessed, unit)
    assert (t.predicted, t.actual, t.hits) == (3, 3, 2)
    assert t.precision == pytest.approx(2 / 3)
    assert t.coverage == pytest.approx(2 / 3)
    # A prefetch moves 3 whole units; of those the horizon used 8 KiB and (at most) 1 unit.
    assert t.precision_bytes == pytest.approx((8192 + unit) / (3 * unit))
    assert t.coverage_bytes == pytest.approx((8192 + 3 * unit) / (8192 + 4096 + 3 * unit))


def test_score_is_undefined_when_nothing_is_predicted_or_accessed():
    t = score(np.zeros(3, bool), np.zeros(3), 4096)
    assert t.precision is None and t.coverage is None
    assert t.precision_bytes is None and t.coverage_bytes is None


def test_tallies_sum_before_dividing():
    t = Tally()
    t += score([True], [4096], 4096)  # 1 of 1 right
    t += score([True, True, True], [0, 0, 0], 4096)  # 0 of 3
    assert t.precision == pytest.approx(1 / 4)  # not the mean of 1 and 0


def tiny_trace_rows():
    """8 s, 1 MiB units. Train: 0-4 s; test horizons (2 s): 4-6 s and 6-8 s.

    bin 0: region 5, only to start the history at 0
    bins 2-3: region 0 (4 KiB), region 1 (12 KiB)
    bins 4-5: region 0 (4 KiB), region 2 (2 x 4 KiB)
    bins 6-7: region 2 (4 KiB), region 3 (16 KiB)
    """
    return [
        block(0, "flush", 0, 0),  # flushes are not accesses: they bound nothing
        block(0, "read", 5 * MIB, 4096),  # the history starts at 0 ...
        block(int(2.5 * SEC), "read", 4096, 4096),
        block(int(3.2 * SEC), "write", 1 * MIB, 12288),
        block(int(4.1 * SEC), "read", 0, 4096),
        block(int(4.3 * SEC), "read", 2 * MIB, 4096),
        block(int(5.1 * SEC), "write", 2 * MIB + 8192, 4096),
        block(int(6.5 * SEC), "read", 2 * MIB, 4096),
        block(8 * SEC - 1, "write", 3 * MIB, 16384),  # ... and ends at 8 s
    ]


EVAL = ["--models", "recency", "--horizon", "2s", "--step", "1s", "--unit", "1M", "--json"]


def test_recency_on_a_tiny_trace_matches_hand_computed_values(write_trace, capsys):
    path = write_trace(tiny_trace_rows())
    assert cli.main(["eval", str(path), *EVAL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["windows"], report["scored_windows"]) == (2, 2)
    [m] = report["models"]
    # Horizon 4-6 s: predicted {0, 1}, actual {0: 4 KiB, 2: 8 KiB}: hit 0.
    # Horizon 6-8 s: predicted {0, 2}, actual {2: 4 KiB, 3: 16 KiB}: hit 2.
    assert (m["predicted"], m["actual"], m["hits"]) == (4, 4, 2)
    assert m["precision"] == pytest.approx(0.5)
    assert m["coverage"] == pytest.approx(0.5)
    assert m["precision_bytes"] == pytest.approx((4096 + 4096) / (4 * MIB))
    assert m["coverage_bytes"] == pytest.approx((4096 + 4096) / (12288 + 20480))


def test_a_horizon_overlapping_a_gap_is_not_scored(write_trace, capsys):
    path = write_trace([*tiny_trace_rows(), gap(int(6.2 * SEC), int(6.4 * SEC))])
    assert cli.main(["eval", str(path), *EVAL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["scored_windows"], report["gap_windows"]) == (1, 1)
    [m] = report["models"]
    assert (m["predicted"], m["actual"], m["hits"]) == (2, 2, 1)
    assert m["coverage_bytes"] == pytest.approx(4096 / 12288)


def test_an_access_straddling_units_counts_in_each_with_its_share(write_trace):
    acc = io.accesses(io.read_table(write_trace([block(0, "read", MIB - 4096, 12288)])))
    per_unit = intensity.unit_accesses(acc, 65536)
    assert per_unit[["unit", "bytes"]].values.tolist() == [[15, 4096], [16, 8192]]


def test_only_whole_horizons_are_scored_and_windows_are_spread(write_trace):
    acc = io.accesses(io.read_table(write_trace(tiny_trace_rows())))
    split = make_split(acc, (0, 0.5), (0.5, 1.0), 3 * SEC)
    # The test part is 4-8 s: one whole 3 s horizon; the last second is not a horizon.
    assert split.windows == 1
    assert [(w.from_ns, w.to_ns) for w in split.scored] == [(4 * SEC, 7 * SEC)]
    # A horizon longer than the test part: the one window it holds.
    split = make_split(acc, (0, 0.5), (0.5, 1.0), 10 * SEC)
    assert [(w.from_ns, w.to_ns) for w in split.scored] == [(4 * SEC, 8 * SEC)]
    split = make_split(acc, (0, 0.5), (0.5, 1.0), SEC, max_windows=2)
    assert split.windows == 4 and [w.from_ns for w in split.scored] == [4 * SEC, 6 * SEC]
    inten = intensity.build(acc, MIB, MIB, SEC, split.test_ns[0])
    [res] = evaluate(inten, [RecencyModel(1)], split)
    assert [h.window.from_ns for h in res.horizons] == [4 * SEC, 6 * SEC]


def test_cli_reports_a_bad_flag_as_a_sentence(write_trace, capsys):
    path = write_trace(tiny_trace_rows())
    assert cli.main(["eval", str(path), "--horizon", "3s", "--step", "2s"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_plot_writes_a_png_of_the_scored_horizons(write_trace, tmp_path, capsys):
    path, out = write_trace(tiny_trace_rows()), tmp_path / "p.png"
    args = ["plot", str(path), "--horizon", "2s", "--step", "1s", "--unit", "1M", "--out", str(out)]
    assert cli.main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
