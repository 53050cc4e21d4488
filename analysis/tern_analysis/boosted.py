"""Gradient-boosted trees over the per-unit features `tern predict features` exports.

Each row is a candidate unit at a moment of a trace: its features then (ages in horizons,
periods touched, region and zone activity, ...) and whether the next horizon touched it.
scikit-learn's GradientBoostingClassifier learns the probability of "touched"; the trees are
written as JSON in the format `userspace/src/predict/boosted.rs` reads (node arrays per tree,
a node sends `x[feature] <= threshold` left), so Tern runs them without Python. The export is
checked here: the JSON, walked the way Tern walks it, must give scikit-learn's probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FORMAT = "tern-boosted-trees"
VERSION = 1
# Columns of a rows file that are not features.
NOT_FEATURES = ("at_ns", "unit", "touched", "score")


@dataclass
class Rows:
    x: np.ndarray
    y: np.ndarray
    features: list[str]
    sources: list[str]


def read_rows(paths: list[Path]) -> Rows:
    """Reads rows files; every file must carry the same feature columns."""
    frames, features, sources = [], None, []
    for p in paths:
        df = pd.read_csv(p)
        if "touched" not in df.columns:
            raise ValueError(f"{p} has no `touched` column: is it `tern predict features` output?")
        cols = [c for c in df.columns if c not in NOT_FEATURES]
        if features is None:
            features = cols
        elif cols != features:
            raise ValueError(f"{p} has the features {cols}, the first file {features}")
        frames.append(df)
        sources.append(p.name)
    if not frames:
        raise ValueError("no rows files given")
    df = pd.concat(frames, ignore_index=True)
    return Rows(
        x=df[features].to_numpy(dtype=np.float32),
        y=df["touched"].to_numpy(dtype=np.int8),
        features=features,
        sources=sources,
    )


def train(
    rows: Rows,
    trees: int = 60,
    depth: int = 3,
    rate: float = 0.1,
    max_rows: int = 400_000,
    seed: int = 0,
):
    """Fits the trees (on a random sample of at most `max_rows` rows)."""
    from sklearn.ensemble import GradientBoostingClassifier

    if len(np.unique(rows.y)) < 2:
        raise ValueError("the rows are all touched or all untouched: nothing to learn")
    rng = np.random.default_rng(seed)
    idx = np.arange(len(rows.y))
    if len(idx) > max_rows:
        idx = rng.choice(idx, size=max_rows, replace=False)
    model = GradientBoostingClassifier(
        n_estimators=trees, max_depth=depth, learning_rate=rate, subsample=0.8, random_state=seed
    )
    model.fit(rows.x[idx], rows.y[idx])
    return model


def export(model, features: list[str], trained_on: list[str]) -> dict:
    """The model as Tern's JSON document."""
    x0 = np.zeros((1, len(features)), dtype=np.float32)
    rate = float(model.learning_rate)
    # The initial raw score, from the public API: the decision minus the trees' part.
    trees_part = sum(float(est[0].predict(x0)[0]) for est in model.estimators_)
    base = float(model.decision_function(x0)[0]) - rate * trees_part
    out = []
    for est in model.estimators_:
        t = est[0].tree_
        out.append(
            {
                "feature": [int(f) for f in t.feature],
                "threshold": [float(v) for v in t.threshold],
                "left": [int(c) for c in t.children_left],
                "right": [int(c) for c in t.children_right],
                "value": [float(v) for v in t.value[:, 0, 0]],
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "features": features,
        "base_score": base,
        "learning_rate": rate,
        "trained_on": trained_on,
        "trees": out,
    }


def probabilities(doc: dict, x: np.ndarray) -> np.ndarray:
    """Walks the JSON document's trees as Tern does: the check of the export."""
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError("not a tern-boosted-trees version 1 document")
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    raw = np.full(len(x), doc["base_score"], dtype=np.float64)
    for t in doc["trees"]:
        node = np.zeros(len(x), dtype=np.int64)
        left = np.asarray(t["left"])
        right = np.asarray(t["right"])
        feature = np.asarray(t["feature"])
        threshold = np.asarray(t["threshold"])
        value = np.asarray(t["value"])
        while True:
            inner = left[node] >= 0
            if not inner.any():
                break
            f = feature[node[inner]]
            go_left = x[inner, f] <= threshold[node[inner]]
            node[inner] = np.where(go_left, left[node[inner]], right[node[inner]])
        raw += doc["learning_rate"] * value[node]
    return 1.0 / (1.0 + np.exp(-raw))


def train_and_export(paths: list[Path], out: Path, **kwargs) -> dict:
    """Trains on rows files, writes the model and returns a summary."""
    rows = read_rows(paths)
    model = train(rows, **kwargs)
    doc = export(model, rows.features, rows.sources)
    sample = rows.x[: min(len(rows.x), 20_000)]
    ours = probabilities(doc, sample)
    theirs = model.predict_proba(sample)[:, 1]
    worst = float(np.max(np.abs(ours - theirs))) if len(sample) else 0.0
    if worst > 1e-9:
        raise ValueError(f"the exported trees differ from scikit-learn's by {worst}")
    out.write_text(json.dumps(doc) + "\n")
    p = probabilities(doc, rows.x)
    return {
        "rows": int(len(rows.y)),
        "touched": int(rows.y.sum()),
        "trees": len(doc["trees"]),
        "files": rows.sources,
        "log_loss": float(
            -np.mean(rows.y * np.log(p + 1e-12) + (1 - rows.y) * np.log(1 - p + 1e-12))
        ),
        "export_max_difference": worst,
    }
