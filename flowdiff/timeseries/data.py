r"""Series for forecasting: real series shipped inside installed packages, a synthetic seasonal panel, CSV files.

Real series (no download; statsmodels' data sets and statsforecast's AirPassengers):

=============  ==========  ======  ===============================================
name           frequency   season  what
=============  ==========  ======  ===============================================
air_passengers monthly     12      airline passengers 1949–1960 (Box & Jenkins)
co2            monthly     12      Mauna Loa CO₂, weekly averaged to months, gaps interpolated
elnino         monthly     12      Pacific sea-surface temperature 1950–2010
sunspots       yearly      11      yearly sunspot numbers 1700–2008
nile           yearly      1       Nile flow at Aswan 1871–1970
elec_equip     monthly     12      euro-area electrical equipment orders 1996–2012
macro_cpi      quarterly   4       US CPI 1959–2009 (statsmodels macrodata)
=============  ==========  ======  ===============================================

The synthetic panel follows the TSDiff protocol of the notes (hourly, daily and weekly cycles):
:math:`y_{it} = \ell_i (1 + a_i \sin(2\pi t/24 + \varphi_i) + b_i\sin(2\pi t/168 + \psi_i)) + 0.1\,\ell_i\,\varepsilon`,
clipped at 0, :math:`\ell \sim \mathrm{LogNormal}(3, 1)`, :math:`a \sim U(0.2, 0.6)`,
:math:`b \sim U(0, 0.3)` — Kollovieh et al. (2023), "Predict, Refine, Synthesize" (TSDiff).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["REAL_SERIES", "estimate_season_length", "load_series", "synthetic_panel", "synthetic_panel_mean", "read_series_csv", "holdout_split"]

#: name -> season length
REAL_SERIES = {"air_passengers": 12, "co2": 12, "elnino": 12, "sunspots": 11, "nile": 1, "elec_equip": 12,
               "macro_cpi": 4}


def load_series(name: str) -> tuple[np.ndarray, int]:
    """A real series shipped by an installed package: ``(values float64, season_length)``."""
    if name not in REAL_SERIES:
        raise ValueError(f"unknown series {name!r}; valid: {', '.join(REAL_SERIES)}")
    if name == "air_passengers":
        from statsforecast.utils import AirPassengers

        values = np.asarray(AirPassengers, dtype=np.float64)
    elif name == "co2":
        from statsmodels.datasets import co2

        frame = co2.load_pandas().data
        values = frame["co2"].resample("MS").mean().interpolate().to_numpy(dtype=np.float64)
    elif name == "elnino":
        from statsmodels.datasets import elnino

        frame = elnino.load_pandas().data
        values = frame.drop(columns="YEAR").to_numpy(dtype=np.float64).reshape(-1)
    elif name == "sunspots":
        from statsmodels.datasets import sunspots

        values = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=np.float64)
    elif name == "nile":
        from statsmodels.datasets import nile

        values = nile.load_pandas().data["volume"].to_numpy(dtype=np.float64)
    elif name == "elec_equip":
        from statsmodels.datasets import elec_equip

        values = elec_equip.load().data.iloc[:, 0].to_numpy(dtype=np.float64)
    else:
        from statsmodels.datasets import macrodata

        values = macrodata.load_pandas().data["cpi"].to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    return values, REAL_SERIES[name]


def synthetic_panel(num_series: int = 64, length: int = 8 * 168 + 24, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """The notes' hourly synthetic panel ``(num_series, length)`` (module docstring)."""
    rng = np.random.default_rng(seed)
    mean, level = _panel_cycles(rng, num_series, length)
    y = mean + noise * level * rng.standard_normal((num_series, length))
    return np.clip(y, 0, None)


def synthetic_panel_mean(num_series: int = 64, length: int = 8 * 168 + 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The noiseless cycles ``(num_series, length)`` and levels ``(num_series, 1)`` of :func:`synthetic_panel`
    with the same seed: its values are ``clip(mean + noise · level · N(0, 1), 0)`` (the exact predictive)."""
    return _panel_cycles(np.random.default_rng(seed), num_series, length)


def _panel_cycles(rng: np.random.Generator, num_series: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(length)
    level = rng.lognormal(3.0, 1.0, (num_series, 1))
    a = rng.uniform(0.2, 0.6, (num_series, 1))
    b = rng.uniform(0.0, 0.3, (num_series, 1))
    phi = rng.uniform(0, 2 * np.pi, (num_series, 1))
    psi = rng.uniform(0, 2 * np.pi, (num_series, 1))
    return level * (1 + a * np.sin(2 * np.pi * t / 24 + phi) + b * np.sin(2 * np.pi * t / 168 + psi)), level


def read_series_csv(path: str | Path, column: str | int | None = None) -> np.ndarray:
    """One numeric column of a CSV file (the last numeric one unless ``column`` names it) as float64.

    A header row is detected; empty cells and ``NaN`` become NaN (the model refuses them).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"series file not found: {path}")
    frame = pd.read_csv(path)
    if frame.shape[1] == 0 or frame.shape[0] == 0:
        raise ValueError(f"{path} holds no data")
    if all(_is_number(c) for c in frame.columns):  # no header row
        frame = pd.read_csv(path, header=None)
    if column is not None:
        if isinstance(column, int) and column not in frame.columns:
            column = frame.columns[column]
        if column not in frame.columns:
            raise ValueError(f"{path} has no column {column!r}; columns: {', '.join(map(str, frame.columns))}")
        series = pd.to_numeric(frame[column], errors="coerce")
    else:
        numeric = [c for c in frame.columns if pd.to_numeric(frame[c], errors="coerce").notna().mean() > 0.5]
        if not numeric:
            raise ValueError(f"{path} has no numeric column")
        series = pd.to_numeric(frame[numeric[-1]], errors="coerce")
    return series.to_numpy(dtype=np.float64)


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def holdout_split(values: np.ndarray, horizon: int, origins: int = 1) -> tuple[np.ndarray, list[int]]:
    """Training part and forecast origins for a rolling evaluation: the last ``origins·horizon`` values
    are held out; origin ``o`` forecasts ``values[o : o + horizon]``."""
    n = len(values)
    first = n - origins * horizon
    if first < 2:
        raise ValueError(f"series of {n} values is too short for {origins} origins of horizon {horizon}")
    return values[:first], [first + i * horizon for i in range(origins)]


def estimate_season_length(values, max_lag: int | None = None, threshold: float = 0.3) -> int:
    """The lag in ``[2, max_lag]`` where the autocorrelation of the linearly detrended series has its
    highest local maximum, if that is above ``threshold`` (1, no season, otherwise), refined to the lag within ±2
    of it whose first multiples (up to 4) have the highest mean autocorrelation (the comb). A multiple of the
    period can still win where its peak tops the period's by noise (weekly data: 14 for 7 on 3 of 8 seeds)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size < 8:
        return 1
    t = np.arange(x.size, dtype=np.float64)
    d = x - np.polyval(np.polyfit(t, x, 1), t)
    denominator = float((d**2).sum())
    if denominator == 0:
        return 1
    max_lag = min(int(max_lag) if max_lag else d.size // 3, d.size - 2)
    if max_lag < 2:
        return 1
    # autocorrelations up to 4 multiples of the longest candidate (as far as the series allows), for the comb below
    top = max(max_lag + 1, min(4 * (max_lag + 2), d.size - 2))
    acf = np.array([float((d[k:] * d[:-k]).sum()) / denominator for k in range(1, top + 1)])
    best, best_value = 1, threshold
    for k in range(2, max_lag + 1):
        value = acf[k - 1]
        if value > best_value and value >= acf[k - 2] and value >= acf[k]:
            best, best_value = k, value
    if best == 1:
        return 1

    def comb(k: int) -> float:  # mean autocorrelation at the first (up to 4) multiples of k
        multiples = np.arange(1, max(1, min(4, acf.size // k)) + 1) * k
        return float(acf[multiples - 1].mean())

    # the single peak is flat and noisy near the period (hourly data with a weekly cycle: 23 where the period is
    # 24, fresh 8-week synthetic series seed 31); the multiples of the true period all line up, a neighbour's
    # drift off them, so the neighbours (+-2) are compared on the comb
    near = [k for k in range(best - 2, best + 3) if 2 <= k <= max_lag]
    return max(near, key=comb)
