"""The ARIMA baseline forecasts series with known structure, and falls back where it must."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import MIB, SEC, block

from tern_analysis import intensity, io
from tern_analysis.arima import ArimaConfig, ArimaModel, fit_series, forecast_series
from tern_analysis.evaluation import evaluate, make_split

FOREVER = float("inf")


def periodic(n, rng):
    t = np.arange(n)
    return 20 + 8 * np.sin(2 * np.pi * t / 8) + rng.normal(0, 0.5, n)


def test_a_periodic_series_is_forecast_far_better_than_its_mean():
    rng = np.random.default_rng(1)
    y = periodic(112, rng)
    train, truth = y[:96], 20 + 8 * np.sin(2 * np.pi * np.arange(96, 112) / 8)
    fit = fit_series(train, ArimaConfig(), FOREVER)
    assert fit.why == "aic" and fit.order[0] >= 1 and fit.order[1] == 0
    err = np.abs(forecast_series(fit, train, 16) - truth).mean()
    mean_err = np.abs(train.mean() - truth).mean()
    # Stationary ARMA forecasts are damped towards the mean: "far better", not exact.
    assert err < 0.34 * mean_err, (err, mean_err)


def test_a_trending_series_is_differenced_and_its_trend_continued():
    rng = np.random.default_rng(2)
    y = 5 + 0.5 * np.arange(90) + rng.normal(0, 0.3, 90)
    train, truth = y[:80], 5 + 0.5 * np.arange(80, 90)
    fit = fit_series(train, ArimaConfig(), FOREVER)
    assert fit.why == "aic" and fit.order[1] == 1
    assert np.abs(forecast_series(fit, train, 10) - truth).mean() < 1.0


def test_gaps_in_the_history_are_tolerated():
    rng = np.random.default_rng(3)
    y = periodic(112, rng)
    train = y[:96].copy()
    train[40:48] = np.nan  # a gap: unknown, not zero
    truth = 20 + 8 * np.sin(2 * np.pi * np.arange(96, 112) / 8)
    fit = fit_series(train, ArimaConfig(), FOREVER)
    assert fit.why == "aic"
    assert np.abs(forecast_series(fit, train, 16) - truth).mean() < 2.0


@pytest.mark.parametrize(
    ("series", "why"),
    [
        (np.full(40, 3.0), "flat"),
        (np.zeros(40), "flat"),
        (np.array([0.0] * 38 + [5.0, 1.0]), "sparse"),
        (np.array([1.0, 2.0, 3.0]), "short"),
    ],
)
def test_series_arima_cannot_use_fall_back_to_their_mean(series, why):
    fit = fit_series(series, ArimaConfig(), FOREVER)
    assert fit.why == why and fit.result is None
    assert forecast_series(fit, series, 4) == pytest.approx(np.full(4, series.mean()))


def test_fitting_stops_at_the_budget():
    rng = np.random.default_rng(4)
    fit = fit_series(periodic(96, rng), ArimaConfig(), deadline=time.monotonic() - 1)
    assert fit.why == "budget"


def test_model_predicts_the_steady_region_and_not_the_one_touched_once(write_trace):
    rng = np.random.default_rng(5)
    rows = [block(0, "read", 5 * MIB, 4096)]  # region 5: once, at the start
    for b in range(60):  # region 0: 3-7 reads in every 1 s bin for 60 s
        for k in range(rng.integers(3, 8)):
            rows.append(block(b * SEC + k * 1000, "read", k * 4096, 4096))
    acc = io.accesses(io.read_table(write_trace(rows)))
    split = make_split(acc, (0, 0.5), (0.5, 1.0), 5 * SEC)
    inten = intensity.build(acc, 65536, MIB, SEC, split.test_ns[0])
    model = ArimaModel(ArimaConfig(budget_s=30))
    [res] = evaluate(inten, [model], split)
    assert len(res.horizons) == 5  # whole 5 s horizons in 29.5 s
    assert res.total.precision == 1.0 and res.total.coverage == 1.0
    assert model.summary()["fitted"] == 1
    assert model.summary()["fallback_to_mean"] == {"sparse": 1}


@pytest.mark.parametrize("trending", [False, True])
def test_moving_the_filter_on_forecasts_as_refiltering_the_whole_history_would(trending):
    rng = np.random.default_rng(6)
    y = 5 + 0.5 * np.arange(120) + rng.normal(0, 0.3, 120) if trending else periodic(120, rng)
    y[100:104] = np.nan  # a gap after the training part
    fit = fit_series(y[:80], ArimaConfig(), FOREVER)
    assert fit.why == "aic" and fit.order[1] == int(trending)
    fitted = fit.result
    for end in (80, 90, 110, 120):  # horizon by horizon, as the evaluation does
        moved = forecast_series(fit, y[:end], 5)
        refiltered = np.clip(fitted.apply(y[:end]).forecast(5), 0, None)
        assert moved == pytest.approx(refiltered, rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError, match="back in time"):
        forecast_series(fit, y[:100], 5)
