"""The boosted trees: rows Tern exports are checked from the trace, the JSON export walks like
scikit-learn, and Tern's own walk of the trees gives the same probabilities."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import SEC
from test_naive import rows as trace_rows

from tern_analysis import boosted, io

MS = SEC // 1000


def synthetic(n=4000, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, size=(n, 3)).astype(np.float32)
    y = ((x[:, 0] < 3) ^ (x[:, 1] > 8) | (rng.uniform(size=n) < 0.05)).astype(np.int8)
    return boosted.Rows(x=x, y=y, features=["a", "b", "c"], sources=["synthetic"])


def test_the_export_walks_like_scikit_learn():
    rows = synthetic()
    model = boosted.train(rows, trees=12, depth=3)
    doc = boosted.export(model, rows.features, rows.sources)
    assert doc["format"] == "tern-boosted-trees" and len(doc["trees"]) == 12
    ours = boosted.probabilities(doc, rows.x)
    assert np.max(np.abs(ours - model.predict_proba(rows.x)[:, 1])) < 1e-12
    # It learned something: the rule is far better than the base rate.
    assert np.mean((ours > 0.5) == rows.y) > 0.9


def test_rows_of_one_class_are_refused():
    rows = synthetic()
    rows.y[:] = 0
    with pytest.raises(ValueError, match="nothing to learn"):
        boosted.train(rows)


def features(tern, trace, out, *extra):
    subprocess.run(
        [str(tern), "predict", "features", str(trace), "--range", "0-100%"]
        + ["--horizon", "1s", "--unit", "4K", "--out", str(out), *extra],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return pd.read_csv(out)


def test_tern_rows_match_the_trace_and_its_trees_score_like_python(write_trace, tmp_path, tern):
    src = write_trace(trace_rows(), "in.csv")
    trace = tmp_path / "t.trace"
    subprocess.run(
        [str(tern), "trace", "import", "--format", "csv", str(src), "--out", str(trace)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    df = features(tern, trace, tmp_path / "rows.csv")
    names = [c for c in df.columns if c not in boosted.NOT_FEATURES]
    assert names[:3] == ["age", "read_age", "write_age"] and "touched" in df.columns
    assert len(df) > 500 and 0 < df["touched"].sum() < len(df)

    # Labels, ages and touch counts recomputed from the trace, per 4 KiB unit.
    acc = io.accesses(io.read_table(src)).requests
    first = (acc["offset"] // 4096).astype("int64").to_numpy()
    last = ((acc["offset"] + acc["len"] - 1) // 4096).astype("int64").to_numpy()
    ts = acc["ts_ns"].to_numpy()
    touches: dict[int, list[int]] = {}
    for t, a, b in zip(ts, first, last, strict=True):
        for u in range(a, b + 1):
            touches.setdefault(int(u), []).append(int(t))
    for r in df.sample(n=300, random_state=0).itertuples():
        times = np.asarray(touches.get(int(r.unit), []), dtype=np.int64)
        before = times[times < r.at_ns]
        assert bool(r.touched) == bool(((times >= r.at_ns) & (times < r.at_ns + SEC)).any())
        assert r.touches == len(before)
        if len(before):
            assert r.age == pytest.approx((r.at_ns - before.max()) / SEC, rel=1e-5)
        else:
            assert r.age == 1e6

    # Trees trained on those rows, run by Tern: the same probabilities.
    rows = boosted.read_rows([tmp_path / "rows.csv"])
    model_path = tmp_path / "model.json"
    summary = boosted.train_and_export([tmp_path / "rows.csv"], model_path, trees=8, depth=3)
    assert summary["export_max_difference"] < 1e-9
    scored = features(tern, trace, tmp_path / "scored.csv", "--trees", str(model_path))
    assert scored.drop(columns="score").equals(df)
    doc = json.loads(model_path.read_text())
    assert np.max(np.abs(scored["score"].to_numpy() - boosted.probabilities(doc, rows.x))) < 1e-12

    # The model in the evaluation table, beside the hand-built table it refines.
    report = json.loads(
        subprocess.run(
            [str(tern), "predict", "eval", str(trace), "--horizon", "1s", "--unit", "4K"]
            + ["--models", "learned,boosted", "--trees", str(model_path), "--json"],
            check=True,
            timeout=120,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert [m["name"] for m in report["models"]] == ["learned", "boosted"]
    assert all(m["f1_blocks"] is not None for m in report["models"])


def test_a_model_for_other_features_is_refused(write_trace, tmp_path, tern):
    src = write_trace(trace_rows(), "in.csv")
    trace = tmp_path / "t.trace"
    subprocess.run(
        [str(tern), "trace", "import", "--format", "csv", str(src), "--out", str(trace)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    rows = synthetic()
    path = tmp_path / "other.json"
    path.write_text(json.dumps(boosted.export(boosted.train(rows, trees=2), ["a", "b", "c"], [])))
    done = subprocess.run(
        [str(tern), "predict", "eval", str(trace), "--horizon", "1s", "--models", "boosted"]
        + ["--trees", str(path)],
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "trained on the features" in done.stderr
