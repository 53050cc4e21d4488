"""The metrics against values computed by hand on tiny traces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MIB, SEC, block, gap

from tern_analysis import cli, intensity, io
from tern_analysis.evaluation import SplitError, evaluate, make_split
from tern_analysis.metrics import Tally, score
from tern_analysis.recency import RecencyModel


def test_score_counts_and_weights_each_side_by_its_own_bytes():
    # regions:        0      1     2     3
    predicted = [True, True, False, True]
    predicted_bytes = [100.0, 300.0, 999.0, 600.0]
    actual_counts = [2, 0, 1, 5]
    actual_bytes = [8192, 0, 4096, 20480]
    t = score(predicted, predicted_bytes, actual_counts, actual_bytes)
    assert (t.predicted, t.actual, t.hits) == (3, 3, 2)
    assert t.precision == pytest.approx(2 / 3)
    assert t.coverage == pytest.approx(2 / 3)
    assert t.precision_bytes == pytest.approx((100 + 600) / 1000)
    assert t.coverage_bytes == pytest.approx((8192 + 20480) / (8192 + 4096 + 20480))


def test_score_is_undefined_when_nothing_is_predicted_or_accessed():
    t = score(np.zeros(3, bool), np.zeros(3), np.zeros(3), np.zeros(3))
    assert t.precision is None and t.coverage is None
    assert t.precision_bytes is None and t.coverage_bytes is None


def test_tallies_sum_before_dividing():
    t = Tally()
    t += score([True], [10.0], [1], [4096])  # 1 of 1 right
    t += score([True, True, True], [1.0] * 3, [0, 0, 0], [0] * 3)  # 0 of 3
    assert t.precision == pytest.approx(1 / 4)  # not the mean of 1 and 0


def tiny_trace_rows():
    """8 s, 1 MiB regions. Train: bins 0-3; test horizons (2 s): bins 4-5 and 6-7.

    bins 2-3: region 0 (4 KiB), region 1 (12 KiB)
    bins 4-5: region 0 (4 KiB), region 2 (2 x 4 KiB)
    bins 6-7: region 2 (4 KiB), region 3 (16 KiB)
    """
    return [
        block(0, "flush", 0, 0),  # the trace starts at 0 ...
        block(int(2.5 * SEC), "read", 4096, 4096),
        block(int(3.2 * SEC), "write", 1 * MIB, 12288),
        block(int(4.1 * SEC), "read", 0, 4096),
        block(int(4.3 * SEC), "read", 2 * MIB, 4096),
        block(int(5.1 * SEC), "write", 2 * MIB + 8192, 4096),
        block(int(6.5 * SEC), "read", 2 * MIB, 4096),
        block(int(7.0 * SEC), "write", 3 * MIB, 16384),
        block(8 * SEC - 1, "flush", 0, 0),  # ... and ends just before 8 s
    ]


def test_recency_on_a_tiny_trace_matches_hand_computed_values(write_trace, capsys):
    path = write_trace(tiny_trace_rows())
    assert cli.main(["eval", str(path), "--models", "recency", "--horizon", "2s",
                     "--step", "1s", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_horizons"] == 2
    m = report["models"]["recency"]
    # Horizon 4-5: predicted {0: 4 KiB, 1: 12 KiB}, actual {0: 4 KiB, 2: 8 KiB}: hit 0.
    # Horizon 6-7: predicted {0: 4 KiB, 2: 8 KiB}, actual {2: 4 KiB, 3: 16 KiB}: hit 2.
    assert (m["predicted"], m["actual"], m["hits"]) == (4, 4, 2)
    assert m["precision"] == pytest.approx(0.5)
    assert m["coverage"] == pytest.approx(0.5)
    assert m["precision_bytes"] == pytest.approx((4096 + 8192) / (16384 + 12288))
    assert m["coverage_bytes"] == pytest.approx((4096 + 4096) / (12288 + 20480))


def test_a_horizon_overlapping_a_gap_is_not_scored(write_trace, capsys):
    path = write_trace([*tiny_trace_rows(), gap(int(6.2 * SEC), int(6.4 * SEC))])
    assert cli.main(["eval", str(path), "--models", "recency", "--horizon", "2s",
                     "--step", "1s", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_horizons_in_gaps"] == 1
    m = report["models"]["recency"]
    assert (m["predicted"], m["actual"], m["hits"]) == (2, 2, 1)
    assert m["coverage_bytes"] == pytest.approx(4096 / 12288)


def test_an_access_straddling_regions_counts_in_each_with_its_share(write_trace):
    path = write_trace([block(0, "read", MIB - 4096, 12288)])
    inten = intensity.build(io.accesses(io.read_table(path)), MIB, SEC)
    assert list(inten.regions["region"]) == [0, 1]
    assert inten.counts[:, 0].tolist() == [1, 1]
    assert inten.bytes[:, 0].tolist() == [4096, 8192]


def test_split_shorter_than_a_horizon_is_refused(write_trace):
    inten = intensity.build(io.accesses(io.read_table(write_trace(tiny_trace_rows()))), MIB, SEC)
    with pytest.raises(SplitError, match="shorter than one horizon"):
        make_split(inten, (0, 0.5), (0.5, 1.0), 5)
    split = make_split(inten, (0, 0.5), (0.5, 1.0), 2)
    results, skipped = evaluate(inten, [RecencyModel()], split)
    assert skipped == 0 and [h.start_bin for h in results[0].horizons] == [4, 6]


def test_cli_reports_a_bad_flag_as_a_sentence(write_trace, capsys):
    path = write_trace(tiny_trace_rows())
    assert cli.main(["eval", str(path), "--horizon", "3s", "--step", "2s"]) == 2
    assert "not a whole number" in capsys.readouterr().err
