"""`python -m tern_analysis eval|naive|boosted|plot|convert`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import intensity, io
from .arima import ArimaConfig, ArimaModel
from .evaluation import evaluate, make_split
from .lru import LruModel
from .naive import naive_counts
from .recency import RecencyModel

EXAMPLES = """examples:
  tern trace export --format csv fio.trace --out fio.csv
  python -m tern_analysis eval fio.csv --train 0-50% --test 50-100% --horizon 10s --json
  python -m tern_analysis naive fio.csv --horizon 10s --units 4K,64K,1M --json
  python -m tern_analysis plot fio.csv --horizon 10s --out fio-arima.png
  python -m tern_analysis convert fio.csv --out fio.parquet
  tern predict features fio.trace --horizon 5s --unit 4K --out fio-4K.csv
  python -m tern_analysis boosted fio-4K.csv sqlite-4K.csv --out boosted.json
"""


def _split_args(p: argparse.ArgumentParser) -> None:
    """The trace and how it is split into training and scored horizons."""
    p.add_argument("trace", type=Path, help="a `tern trace export --format csv` file or .parquet")
    p.add_argument("--train", default="0-50%", type=intensity.parse_span)
    p.add_argument("--test", default="50-100%", type=intensity.parse_span)
    p.add_argument("--horizon", default="10s", help="the predicted window, e.g. 10s")
    p.add_argument("--target", help="the block target (default: the first in the trace)")
    p.add_argument("--max-windows", default=200, type=int, help="horizons scored at most")


def _eval_args(p: argparse.ArgumentParser) -> None:
    _split_args(p)
    p.add_argument("--step", help="time-series bin; divides the horizon (default: a quarter of it)")
    p.add_argument(
        "--unit", default="64K", type=intensity.parse_size, help="scored unit (power of two)"
    )
    p.add_argument(
        "--region-size",
        default="1M",
        type=intensity.parse_size,
        help="forecast region: a multiple of the unit",
    )
    p.add_argument(
        "--models", default="arima,lru,recency", help="comma-separated: arima, lru, recency"
    )
    p.add_argument(
        "--threshold",
        default=0.5,
        type=float,
        help="predict a unit when P(at least one access in the horizon) >= this",
    )
    p.add_argument("--budget", default="120s", help="wall-clock budget for fitting ARIMA")


def _step(horizon: int, text: str | None) -> int:
    if text:
        step = intensity.parse_duration(text)
        if horizon % step:
            raise ValueError(f"--step {text} does not divide the horizon")
        return step
    # A quarter of the horizon, like the Rust `ets` model, unless bins would be under 10 ms.
    return horizon // 4 if horizon % 4 == 0 and horizon // 4 >= 10_000_000 else horizon


def _run(args: argparse.Namespace):
    horizon = intensity.parse_duration(args.horizon)
    step = _step(horizon, args.step)
    if not 0 < args.threshold < 1:
        raise ValueError("--threshold is a probability: between 0 and 1, exclusive")
    acc = io.accesses(io.read_table(args.trace), args.target)
    split = make_split(acc, args.train, args.test, horizon, args.max_windows)
    inten = intensity.build(acc, args.unit, args.region_size, step, split.test_ns[0])
    models = []
    for name in args.models.split(","):
        if name == "arima":
            budget = intensity.parse_duration(args.budget) / 1e9
            models.append(ArimaModel(ArimaConfig(budget_s=budget)))
        elif name == "recency":
            models.append(RecencyModel(horizon // step))
        elif name == "lru":
            models.append(LruModel(horizon, split.train_ns[0]))
        else:
            raise ValueError(f"unknown model {name!r}: choose from arima, recency, lru")
    return acc, inten, split, evaluate(inten, models, split, args.threshold)


def _fmt(v: float | None) -> str:
    return "   n/a" if v is None else f"{100 * v:5.1f}%"


def cmd_eval(args: argparse.Namespace) -> int:
    acc, inten, split, results = _run(args)
    report = {
        "trace": str(args.trace),
        "target": acc.target,
        "unit": inten.unit,
        "region_size": inten.region_size,
        "horizon_ns": split.horizon_ns,
        "step_ns": inten.step_ns,
        "threshold": args.threshold,
        "span_ns": [acc.start_ns, acc.end_ns],
        "train_ns": list(split.train_ns),
        "test_ns": list(split.test_ns),
        "windows": split.windows,
        "scored_windows": len(split.scored),
        "gap_windows": split.gap_windows,
        "units": int(inten.units.size),
        "regions": int(inten.regions.size),
        "models": [{"name": r.name, **r.total.report(), "model": r.summary} for r in results],
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"{args.trace} ({acc.target}): {inten.units.size} units of {inten.unit} B in "
        f"{inten.regions.size} regions; {len(split.scored)} of {split.windows} test horizons "
        f"of {args.horizon} scored ({split.gap_windows} skipped for gaps)"
    )
    print(f"{'model':<10} {'precision':>9} {'coverage':>9} {'prec(B)':>9} {'cov(B)':>9}")
    for r in results:
        t = r.total
        print(
            f"{r.name:<10} {_fmt(t.precision):>9} {_fmt(t.coverage):>9} "
            f"{_fmt(t.precision_bytes):>9} {_fmt(t.coverage_bytes):>9}"
        )
        if r.summary:
            print(f"  {r.name}: {json.dumps(r.summary)}")
    return 0


def cmd_naive(args: argparse.Namespace) -> int:
    horizon = intensity.parse_duration(args.horizon)
    units = [intensity.parse_size(u) for u in args.units.split(",")]
    acc = io.accesses(io.read_table(args.trace), args.target)
    step = intensity.parse_duration(args.step) if args.step else None
    split = make_split(acc, args.train, args.test, horizon, args.max_windows, step)
    counts = naive_counts(acc, split, units)
    rows = [{"name": name, "unit": unit, **c.report()} for (name, unit), c in counts.items()]
    if args.json:
        json.dump(
            {"horizon_ns": horizon, "scored_windows": len(split.scored), "models": rows},
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    print(f"{'forecast':<14} {'unit':>8} {'F1':>6} {'F1 (4K blocks)':>15}")
    for r in rows:
        f1, fb = r["f1"], r["f1_blocks"]
        print(
            f"{r['name']:<14} {r['unit']:>8} {'-' if f1 is None else f'{f1:.3f}':>6} "
            f"{'-' if fb is None else f'{fb:.3f}':>15}"
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_forecasts

    _, inten, split, results = _run(args)
    plot_forecasts(inten, results, args.out, top=args.top)
    print(f"wrote {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    io.write_parquet(io.read_table(args.trace), args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_boosted(args: argparse.Namespace) -> int:
    from .boosted import train_and_export

    summary = train_and_export(
        args.rows,
        args.out,
        trees=args.trees,
        depth=args.depth,
        rate=args.rate,
        max_rows=args.max_rows,
    )
    print(json.dumps(summary))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tern_analysis",
        description="Offline ARIMA baseline and metrics for Tern traces.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("eval", help="precision and coverage of the next-horizon working set")
    _eval_args(e)
    e.add_argument("--json", action="store_true", help="print a JSON report")
    e.set_defaults(func=cmd_eval)
    n = sub.add_parser("naive", help="the naive forecasts' F1 by units and by 4 KiB blocks")
    _split_args(n)
    n.add_argument("--step", help="how far the forecast moves between windows (default: H)")
    n.add_argument("--units", default="4K,64K,1M", help="comma-separated units")
    n.add_argument("--json", action="store_true", help="print a JSON report")
    n.set_defaults(func=cmd_naive)
    pl = sub.add_parser("plot", help="plot predicted vs actual intensity (PNG)")
    _eval_args(pl)
    pl.add_argument("--out", type=Path, required=True, help="the PNG to write")
    pl.add_argument("--top", type=int, default=4, help="how many of the hottest regions to plot")
    pl.set_defaults(func=cmd_plot)
    b = sub.add_parser("boosted", help="train the boosted trees on `tern predict features` rows")
    b.add_argument("rows", type=Path, nargs="+", help="rows CSV files")
    b.add_argument("--out", type=Path, required=True, help="the model JSON to write")
    b.add_argument("--trees", type=int, default=60)
    b.add_argument("--depth", type=int, default=3)
    b.add_argument("--rate", type=float, default=0.1)
    b.add_argument("--max-rows", type=int, default=400_000)
    b.set_defaults(func=cmd_boosted)
    c = sub.add_parser("convert", help="store an exported CSV as Parquet")
    c.add_argument("trace", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
