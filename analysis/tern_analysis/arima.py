"""A statsmodels ARIMA baseline for per-region access intensity.

Per region, on the training bins: the differencing order d comes from a KPSS stationarity test
(d=1, with drift, when the series is not level-stationary; else d=0 with a constant), then
(p, q) from a small grid by AIC. Series that ARIMA cannot say anything useful about -- too
short, flat, or with almost no accesses -- and regions left when the time budget runs out get
the mean of their history instead; the summary counts each case. Fitting goes hottest region
first, so a budget cut drops the regions that matter least.

To forecast a horizon the fitted model's filter is run on to its start over the bins seen
since (no refit: `extend`, which costs a few ms where re-filtering the whole history with
`apply` costs fifty times more; differenced models are re-filtered, see `forecast_series`),
and the expected accesses per bin are summed over the horizon.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from statsmodels.tools.sm_exceptions import ConvergenceWarning, InterpolationWarning
from statsmodels.tsa.arima.model import ARIMA
from statsmodels.tsa.stattools import kpss

from .intensity import Intensity

#: (p, q) pairs tried for each region.
DEFAULT_ORDERS = ((0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1))


@dataclass(frozen=True)
class ArimaConfig:
    orders: tuple[tuple[int, int], ...] = DEFAULT_ORDERS
    #: Wall-clock budget for fitting all regions, in seconds.
    budget_s: float = 60.0
    #: Optimizer iterations per fit.
    maxiter: int = 50
    #: Known bins needed before ARIMA is tried.
    min_bins: int = 12
    #: Bins with at least one access needed before ARIMA is tried.
    min_active_bins: int = 3


@dataclass
class RegionFit:
    """How one region is forecast: `result` is None for the mean fallback, `why` says why."""

    why: str
    order: tuple[int, int, int] | None = None
    result: object | None = None
    #: Bins the result's filter has seen.
    nobs: int = 0


def choose_d(y: np.ndarray) -> int:
    """1 when KPSS rejects level stationarity at 5 %, else 0. `y` has no NaN."""
    if y.size < 8:
        return 0
    with warnings.catch_warnings():
        # The p-value is clipped to the table's range (0.01..0.1): fine for a 5 % decision.
        warnings.simplefilter("ignore", InterpolationWarning)
        _, pvalue, _, _ = kpss(y, regression="c", nlags="auto")
    return 1 if pvalue < 0.05 else 0


def fit_series(y: np.ndarray, cfg: ArimaConfig, deadline: float) -> RegionFit:
    """Fits one series (NaN = unknown bins) by the rules in the module doc."""
    known = y[~np.isnan(y)]
    if known.size < cfg.min_bins:
        return RegionFit("short")
    if np.ptp(known) == 0:
        return RegionFit("flat")
    if np.count_nonzero(known) < cfg.min_active_bins:
        return RegionFit("sparse")
    d = choose_d(known)
    trend = "c" if d == 0 else "t"
    # Orders are screened with Hannan-Rissanen (fast, no optimizer) where it applies -- no
    # unknown bins -- and only the winner gets the exact MLE; with gaps every order does.
    screen = "hannan_rissanen" if known.size == y.size else "statespace"
    ranked = []
    for p, q in cfg.orders:
        if time.monotonic() > deadline:
            break
        res = _fit(y, (p, d, q), trend, screen, cfg)
        if res is not None:
            ranked.append((res.aic, (p, d, q), res))
    if not ranked:
        return RegionFit("budget" if time.monotonic() > deadline else "failed")
    _, order, best = min(ranked, key=lambda r: r[0])
    if screen != "statespace" and order != (0, d, 0):
        best = _fit(y, order, trend, "statespace", cfg, best.params) or best
    return RegionFit("aic", order, best, y.size)


def _fit(y, order, trend, method, cfg, start_params=None):
    """One ARIMA fit, or None when the method cannot fit this order to this series."""
    kwargs = {"method_kwargs": {"maxiter": cfg.maxiter}} if method == "statespace" else {}
    try:
        with warnings.catch_warnings():
            # A fit that did not converge is still compared by AIC; a bad one loses.
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", UserWarning)
            # No standard errors: only the AIC and the forecast are used, and the numerical
            # Hessian would double the cost.
            res = ARIMA(y, order=order, trend=trend).fit(
                method=method, start_params=start_params, cov_type="none", **kwargs
            )
    except (ValueError, np.linalg.LinAlgError):
        return None
    return res if np.isfinite(res.aic) else None


def forecast_series(fit: RegionFit, history: np.ndarray, steps: int) -> np.ndarray:
    """Expected accesses in each of the next `steps` bins after `history` (never negative).
    `history` starts where the fitted series started; for a fitted region, `fit` is moved on
    to its end (so successive calls must not go back in time)."""
    if fit.result is None:
        known = history[~np.isnan(history)]
        mean = float(known.mean()) if known.size else 0.0
        return np.full(steps, mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if history.size < fit.nobs:
            raise ValueError("a region's forecast cannot go back in time")
        if fit.order[1] == 1:
            # statsmodels 0.14's `extend` loses the drift of a differenced model (its
            # forecasts restart from the wrong level): re-filter the whole history instead.
            out = fit.result.apply(history).forecast(steps)
            fit.nobs = history.size
        else:
            if history.size > fit.nobs:
                fit.result = fit.result.extend(history[fit.nobs :])
                fit.nobs = history.size
            out = fit.result.forecast(steps)
    return np.clip(np.nan_to_num(np.asarray(out, dtype=float)), 0.0, None)


@dataclass
class ArimaModel:
    """The per-region ARIMA baseline (see the module doc). A region's expected accesses are
    shared among its units by each unit's part of the region's past accesses, and a unit's
    probability of at least one access is Poisson's 1 - exp(-expected share), as the Rust
    `ets` model does."""

    config: ArimaConfig = field(default_factory=ArimaConfig)
    name: str = "arima"
    fits: list[RegionFit] = field(default_factory=list)
    fit_seconds: float = 0.0
    forecast_seconds: float = 0.0

    def fit(self, inten: Intensity, first: int, train_end: int) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.config.budget_s
        totals = inten.region_counts[:, first:train_end].sum(axis=1)
        self.fits = [RegionFit("unfitted")] * len(totals)
        for row in np.argsort(-totals, kind="stable"):
            if totals[row] == 0:
                self.fits[row] = RegionFit("flat")
            elif time.monotonic() > deadline:
                self.fits[row] = RegionFit("budget")
            else:
                y = inten.series(row, first, train_end)
                self.fits[row] = fit_series(y, self.config, deadline)
        self.fit_seconds = time.monotonic() - t0

    def forecast(
        self, inten: Intensity, first: int, at: int, steps: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per unit the probability of an access in bins [at, at + steps); per region the
        expected accesses."""
        t0 = time.monotonic()
        lam = np.array(
            [
                forecast_series(f, inten.series(row, first, at), steps).sum()
                for row, f in enumerate(self.fits)
            ]
        )
        unit_past = inten.unit_counts[:, first:at].sum(axis=1)
        region_past = inten.region_counts[:, first:at].sum(axis=1)[inten.unit_region]
        share = np.divide(
            unit_past, region_past, out=np.zeros_like(unit_past), where=region_past > 0
        )
        self.forecast_seconds += time.monotonic() - t0
        return 1.0 - np.exp(-lam[inten.unit_region] * share), lam

    def summary(self) -> dict:
        why = Counter(f.why for f in self.fits)
        orders = Counter(str(f.order) for f in self.fits if f.order is not None)
        return {
            "regions": len(self.fits),
            "fitted": why.get("aic", 0),
            "fallback_to_mean": {k: v for k, v in why.items() if k != "aic"},
            "orders": dict(orders.most_common()),
            "fit_seconds": round(self.fit_seconds, 3),
            "forecast_seconds": round(self.forecast_seconds, 3),
        }
