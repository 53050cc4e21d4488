"""The transcription of the Rust `lru` baseline gives the Rust unit test's answers."""

from __future__ import annotations

import math

from conftest import SEC, block

from tern_analysis import intensity, io
from tern_analysis.lru import LruModel

MS = SEC // 1000
UNIT = 4096


def test_recent_units_are_hot_and_old_ones_cool_off(write_trace):
    # As in hotset.rs: reads of units 1 and 2 at 0 and 800 ms, a write of unit 3 at 950 ms.
    rows = [
        block(0, "read", 1 * UNIT, UNIT),
        block(800 * MS, "read", 2 * UNIT, UNIT),
        block(950 * MS, "write", 3 * UNIT, UNIT),
        block(1500 * MS, "read", 9 * UNIT, UNIT),  # after the prediction: unseen
    ]
    acc = io.accesses(io.read_table(write_trace(rows)))
    inten = intensity.build(acc, UNIT, UNIT, 100 * MS, 1000 * MS)
    at = inten.bin_of(1000 * MS)
    assert list(inten.units) == [1, 2, 3, 9]

    p, _ = LruModel(100 * MS, 0).forecast(inten, 0, at, 1)
    # Horizon 100 ms at 1 s: unit 1 is 10 horizons old, unit 3 half a horizon.
    assert [x >= 0.5 for x in p] == [False, False, True, False]
    assert math.isclose(p[2], math.exp(-0.5 / (1 + math.log(2))))
    assert p[3] == 0.0

    p, _ = LruModel(10 * SEC, 0).forecast(inten, 0, at, 1)
    assert [x >= 0.5 for x in p] == [True, True, True, False]
