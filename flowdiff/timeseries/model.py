r"""TSDiff: an unconditional diffusion model of time-series windows, forecasting by self-guidance.

Kollovieh, Ansari, Bohlke-Schneider, Zschiegner, Wang, Wang (2023), "Predict, Refine, Synthesize:
Self-Guiding Diffusion Models for Probabilistic Time Series Forecasting" (NeurIPS).

**Model.** A window :math:`y \in \mathbb R^{C\times L}` (the series and its lag channels over
``L = context_length + prediction_length`` steps) is standardised by the mean and standard
deviation of its observed context, and a DDPM (Ho et al. 2020) with ``T`` steps and a linear
β table (paper: ``T = 100``, β from 1e-4 to 0.1) learns its distribution with the ε-prediction
loss. In flowdiff's time the schedule is :class:`flowdiff.paths.Discrete`: step ``k`` is
``t = 1 − k/T`` and :math:`\alpha(t)^2 = \bar\alpha_k`. (The paper scales by the mean absolute
context value; standardising is more robust on series whose level dwarfs their variation, e.g.
CO₂ at 350 ± 3 ppm, where mean scaling leaves the model to resolve differences of 1 %.)

**Observation self-guidance** (the paper's "Predict"). With the Tweedie estimate
:math:`\hat y(x_k) = (x_k - \sqrt{1-\bar\alpha_k}\,\hat\varepsilon)/\sqrt{\bar\alpha_k}` and the
observation mask ``M`` (the context, and lag entries that fall in it), each ancestral step is tilted
towards the observations:

.. math::
    x_{k-1} = \mu_\theta(x_k, k) - s\,\tilde\sigma_k^2\,\nabla_{x_k} E(\hat y(x_k)) + \tilde\sigma_k z,
    \qquad \tilde\sigma_k^2 = \beta_k\frac{1-\bar\alpha_{k-1}}{1-\bar\alpha_k},

with the mean-square energy :math:`E = \sum_M(\hat y - y_{obs})^2` (Gaussian observation
likelihood) or the quantile energy :math:`E_j = \sum_M \rho_{q_j}(y_{obs} - \hat y)` for sample
``j`` of ``S`` with :math:`q_j = j/(S+1)` (asymmetric-Laplace likelihood; TSDiff-Q), where
:math:`\rho_q(e) = \max(qe, (q-1)e)`. The gradient is taken at :math:`x_k` (the textbook form;
the paper's code takes it at the updated sample with the same ``k`` — either is fine).

**Refinement** (the paper's "Refine"). The model's single-step diffusion loss is a surrogate
energy of a full window, :math:`E(y) = \lVert\varepsilon_\theta(\sqrt{\bar\alpha_\tau}y +
\sqrt{1-\bar\alpha_\tau}\varepsilon, \tau) - \varepsilon\rVert^2 + \lambda\sum_M (y - y_{obs})^2`
(fresh ε each iteration), minimised from a base forecast by gradient descent (``"ml"``) or
sampled by Langevin dynamics :math:`y \leftarrow y - \eta\nabla E + \sqrt{2\eta}\,\gamma\,\xi`
(``"lmc"``).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..fields import Field
from ..paths import Discrete
from .ets import fit_holt_winters, holt_winters_paths
from .network import TSDiffNet

__all__ = ["TSDiff", "as_series_list", "check_context"]

GUIDANCES = ("quantile", "mean-square", "none")
REFINEMENTS = ("lmc", "ml")
#: base forecasters whose samples fit's backtest may choose to refine (the paper's "Refine") instead of
#: forecasting by self-guidance: the probabilistic seasonal naive and Holt–Winters ETS (statsmodels)
BASES = ("seasonal_naive", "holt_winters")
#: refinement strengths (Langevin iterations at the paper's step size 0.1) fit's backtest chooses from; on the
#: validation stretches of sm:dp and local_level (seed 5) 1-5 iterations scored best, on sm:unemp 20
REFINE_ITERATIONS = (1, 2, 5, 10, 20)


def _check_positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if int(value) < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def as_series_list(series: Any, name: str = "series") -> list[np.ndarray]:
    """One or several 1-D series as a list of float64 arrays; NaN/Inf and bad shapes are refused."""
    if isinstance(series, (list, tuple)) and len(series) > 0 and np.ndim(series[0]) >= 1:
        items = list(series)
    else:
        arr = np.asarray(series, dtype=np.float64) if not isinstance(series, torch.Tensor) else series.detach().cpu().double().numpy()
        if arr.ndim == 1:
            items = [arr]
        elif arr.ndim == 2:
            items = list(arr)
        else:
            raise ValueError(f"{name} must be a 1-D array, a 2-D array (one series per row) or a list of 1-D arrays, got shape {arr.shape}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().double().numpy()
        try:
            a = np.asarray(item, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name}[{i}] is not numeric: {error}") from None
        if a.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D, got shape {a.shape}")
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if inf:
            raise ValueError(f"{name}[{i}] holds {inf} infinite values (first at index {int(np.flatnonzero(np.isinf(a))[0])}); "
                             f"values must be finite")
        if nan:
            raise ValueError(f"{name}[{i}] holds {nan} missing (NaN) values (first at index {int(np.flatnonzero(np.isnan(a))[0])}); "
                             f"fill or drop them first (forecast() accepts missing context values with missing='mask')")
        out.append(a)
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def check_context(context: Any, need: int, name: str = "context", missing: str = "raise",
                  whole: bool = False) -> list[np.ndarray]:
    """Contexts as a list of 1-D float64 arrays of at least ``need`` values (the last ``need`` are used;
    ``whole=True``: the whole arrays, checked the same way)."""
    if missing not in ("raise", "mask"):
        raise ValueError(f"missing must be 'raise' or 'mask', got {missing!r}")
    if missing == "raise":
        items = as_series_list(context, name)
    else:
        arr = context
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().double().numpy()
        if isinstance(arr, (list, tuple)) and len(arr) > 0 and np.ndim(arr[0]) >= 1:
            items = [np.asarray(a, dtype=np.float64) for a in arr]
        else:
            a = np.asarray(arr, dtype=np.float64)
            items = [a] if a.ndim == 1 else list(a)
        for i, a in enumerate(items):
            if a.ndim != 1:
                raise ValueError(f"{name}[{i}] must be 1-D, got shape {a.shape}")
            if np.isinf(a).any():
                raise ValueError(f"{name}[{i}] holds infinite values; values must be finite (NaN marks a missing value)")
    out = []
    for i, a in enumerate(items):
        if a.size < need:
            raise ValueError(f"{name}[{i}] has {a.size} values; forecasting needs at least {need} (context_length plus the largest lag)")
        if np.isnan(a[-need:]).all():
            raise ValueError(f"{name}[{i}]: every one of the last {need} values is missing")
        out.append(a if whole else a[-need:])
    return out


def history_profile(values: np.ndarray, origin: int, season_length: int, seasons: int) -> np.ndarray:
    """The seasonal profile of ``values[:origin]``: ``(season_length,)``, entry ``j`` for the positions ``i`` with
    ``(i - origin) % season_length == j``.

    The last ``min(seasons, origin // season_length)`` whole seasons before ``origin`` are each centred on
    their own mean (which removes a level that moves from season to season) and averaged phase by phase
    (NaN-aware: with missing values the season levels and the profile are backfitted in turn; a phase with
    no observation gets 0); the profile is centred to sum to zero. This is the
    classical "method of simple averages" for seasonal indices (e.g. Hyndman & Athanasopoulos, *Forecasting:
    Principles and Practice*, 3rd ed., §3.4, with each season's mean in place of the moving-average trend,
    so no value after ``origin`` is needed).
    """
    m = int(season_length)
    k = min(int(seasons), int(origin) // m)
    if k < 1:
        return np.zeros(m)
    block = np.asarray(values[origin - k * m: origin], dtype=np.float64).reshape(k, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN seasons/phases (masked contexts)
        dev = block - np.nanmean(block, axis=1, keepdims=True)
        profile = np.nan_to_num(np.nanmean(dev, axis=0))
        # with missing values a season's mean is biased by the phases it lacks: backfit the season levels
        # (mean of the season minus the profile) and the profile in turn
        for _ in range(50 if np.isnan(block).any() else 0):
            level = np.nanmean(block - profile, axis=1, keepdims=True)
            profile = np.nan_to_num(np.nanmean(block - level, axis=0))
    return profile - profile.mean()


def _have_statsmodels() -> bool:
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    """Indices of at most ``k`` of ``n`` items, evenly spaced from the first to the last (all where ``k >= n``)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


#: significance level of the KPSS test in :func:`level_nonstationary` (Hyndman & Khandakar 2008 use 5 %)
TREND_LEVEL = 0.05


def level_nonstationary(values: np.ndarray, season_length: int, level: float = TREND_LEVEL) -> bool | None:
    """Whether the KPSS test rejects level stationarity of ``values`` with its seasonal component removed.

    Kwiatkowski, Phillips, Schmidt, Shin (1992), null hypothesis: stationary around a constant level; the
    long-run variance by Newey–West with the data-dependent bandwidth of Hobijn, Franses, Ooms (1998)
    (statsmodels' ``kpss(nlags="auto")``). Where a season is given and the series holds two of them plus one
    value, the seasonal component of a robust STL decomposition (Cleveland et al. 1990) is subtracted first, so
    a strong season alone does not reject. This is the unit-root step of Hyndman & Khandakar (2008), "Automatic
    time series forecasting: the forecast package for R" (auto.arima chooses first differences where KPSS
    rejects). ``None`` where statsmodels is not installed or the series is too short (< 12 finite values).
    """
    x = _deseasonalised(values, season_length)
    if x is None:
        return None
    from statsmodels.tsa.stattools import kpss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KPSS's "p-value outside the table" InterpolationWarning
        return bool(kpss(x, regression="c", nlags="auto")[1] < level)


def _deseasonalised(values: np.ndarray, season_length: int) -> np.ndarray | None:
    """The finite values with robust STL's seasonal component removed (where a season is given and the series
    holds two of them plus one value); ``None`` where statsmodels is missing or the series is too short (< 12
    finite values) or constant."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 12 or not _have_statsmodels() or np.ptp(x) == 0:
        return None
    from statsmodels.tsa.seasonal import STL

    if season_length > 1 and x.size >= 2 * season_length + 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = x - STL(x, period=season_length, robust=True).fit().seasonal
    return x


def level_mean_reverting(values: np.ndarray, season_length: int, level: float = TREND_LEVEL) -> bool | None:
    """Whether the augmented Dickey–Fuller test rejects a unit root in ``values`` with its seasonal component
    removed (as in :func:`level_nonstationary`): the level reverts to a mean, so where a window's context sits
    relative to it says where the horizon goes.

    Said and Dickey (1984), statsmodels' ``adfuller(regression="c", autolag="AIC")``. TSDiff's ``profile="ets"``
    representation (windows around Holt–Winters' path) hides that position from the model, so fit's backtest
    (with ``profile="auto"``) offers it only where this test does not reject. ``None`` where statsmodels is not installed or the series is
    too short (< 12 finite values) or constant."""
    x = _deseasonalised(values, season_length)
    if x is None:
        return None
    from statsmodels.tsa.stattools import adfuller

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(adfuller(x, regression="c", autolag="AIC")[1] < level)


def _base_samples(name: str, history: np.ndarray, horizon: int, season_length: int, num_samples: int,
                  seed: int) -> np.ndarray:
    """``(num_samples, horizon)`` samples of the base forecaster ``name`` (see ``BASES``) fit on ``history``."""
    from .baselines import holt_winters, probabilistic_seasonal_naive

    if name == "seasonal_naive":
        return probabilistic_seasonal_naive(history, horizon, season_length, num_samples, seed=seed)
    if name == "holt_winters":
        out = holt_winters(history, horizon, season_length, num_samples, seed=seed)
        if not np.isfinite(out).all():
            raise FloatingPointError("Holt-Winters produced non-finite samples")
        return out
    raise ValueError(f"base must be one of {', '.join(BASES)}, got {name!r}")


def widen(samples: np.ndarray, factor: float) -> np.ndarray:
    """Scale every path's deviation from the per-step median over the paths (axis -2) by ``factor``."""
    median = np.median(samples, axis=-2, keepdims=True)
    return median + factor * (samples - median)


#: spread factors fit's backtest chooses from (geometric, 1/√2 … √2). The trial models of the backtest see
#: fewer windows than the final model and sample narrower (more memorised) forecasts, so a wide grid
#: over-widens: with 0.5 … 4, the hourly synthetic series (seed 2026) chose 2.83 while the final model's
#: best factor on its test origins was 1.0 (CRPS 0.1025 vs 0.0756)
SPREADS = tuple(float(f"{2 ** (i / 4):.3f}") for i in range(-2, 3))
#: ... and for refined base forecasts, 1/2 … 2: their spread is mostly the base's own (fit on the same
#: histories in validation and forecasting, not a trial model's), and a base can be far off (Holt–Winters'
#: simulated paths on synth0 had twice the per-step sd of the probabilistic seasonal naive; the backtest chose
#: the grid's edge, 1/√2)
REFINE_SPREADS = tuple(float(f"{2 ** (i / 4):.3f}") for i in range(-4, 5))
#: the default guidance scale per guidance kind (``guidance_scale=None``). Quantile guidance: 1 (was 4 with a
#: backtest over 1, 2, 4 and 8 until session 37). On 12 held-out series the backtest's choice gave a mean test
#: CRPS of 1.00 x psnaive, scale 1 0.89 (best on 8 of them; persistent macro series such as unemp want 4-8, but
#: the validation did not find them: it favoured 4-8 also where every candidate's test CRPS rose with the
#: scale). benchmarks/timeseries_selection_study.py; docs/timeseries.md, "Guidance scale", session 37
DEFAULT_SCALES = {"quantile": 1.0, "mean-square": 2.0}
#: guidance scales fit's backtest scores, as factors on the default (the first is scored first; where time
#: allows one scale only, it is the one): quantile guidance scores its default only (see DEFAULT_SCALES);
#: mean-square guidance (opt-in, not re-measured) keeps the search over ¼ … 2 × its default
BACKTEST_SCALE_FACTORS = {"quantile": (1.0,), "mean-square": (1.0, 0.5, 2.0, 0.25)}
#: bounds of the final spread factor after fit rescales the validated one by the trial/final width ratio
SPREAD_LIMITS = (0.25, 4.0)


class TSDiff:
    """TSDiff (Kollovieh et al. 2023): fit an unconditional diffusion model on windows, forecast by self-guidance.

    Arguments:
        context_length: observed steps per window (>= 2).
        prediction_length: forecast horizon (>= 1).
        season_length: the seasonal period (1: none); sets the season time features and the
            seasonal-naive base of :meth:`refine`.
        lags: lag channels (in steps, each >= 1), denoised with the series as in the paper (default
            none: a single series is often too short to spare the history they need).
        hidden, blocks: width and depth of :class:`~flowdiff.timeseries.network.TSDiffNet`.
        diffusion_steps, beta_end: the DDPM table (linear β from 1e-4 to ``beta_end``).
        train_steps: optimiser updates of :meth:`fit`; ``max_seconds`` stops it earlier.
        batch_size, lr, ema_decay, grad_clip: training (Adam; sampling uses the EMA weights).
        guidance: ``"quantile"`` (TSDiff-Q, default), ``"mean-square"`` or ``"none"``.
        guidance_scale: the scale ``s`` (see the module docstring); ``None``: the default, 1 for quantile
            guidance; for mean-square guidance chosen by :meth:`fit`'s in-sample backtest among a quarter,
            half, once and twice 2 (see ``DEFAULT_SCALES`` and ``BACKTEST_SCALE_FACTORS``).
        difference: lag of the differencing inside the window (0: none); ``"auto"``: :meth:`fit` chooses
            by a rolling-origin backtest on the end of the training series (validation CRPS; ``selection``
            holds the scores, see ``_select_difference``) between 0 and the season, and also 1 (first
            differences) where the deseasonalised level is not stationary by the KPSS test
            (:func:`level_nonstationary`); without a usable season between 0 and 1. First differences are
            standardised without centring.
        spread: factor on each forecast path's deviation from the per-step median of the paths (a
            calibration of the model's spread); ``None``: chosen by the same backtest among ``SPREADS``.
        profile: with ``difference=0`` on a seasonal series whose context holds two seasons, the window is
            standardised around its context mean plus a seasonal profile, so the model learns deviations from
            it. ``True`` / ``"context"``: the context's phase means; ``"history"``: the phase means of the last
            ``PROFILE_SEASONS`` whole seasons of all the history before the forecast origin (each season
            centred on its own mean), see :func:`history_profile` — :meth:`forecast` then uses the whole
            series it is given, not only its last ``context_length`` values. ``"auto"``: fit's backtest scores
            ``"history"`` as a third candidate beside no and seasonal differencing (where the context holds two
            seasons), otherwise no profile. Default ``False``: measured in docs/timeseries.md, the candidate
            traded wins (elec_equip 0.74 -> 0.54 x psnaive) for losses (elnino 0.86 -> 1.00) and gave nothing on
            fresh hourly series, for one more trial model's time. ``"ets"``: with ``difference=0``, each
            window is standardised around the **Holt–Winters path of its forecast origin** (one-step predictions
            over the context, the multi-step forecast over the horizon; additive trend and season fit by
            statsmodels on the whole series given, :mod:`flowdiff.timeseries.ets`), so the model learns
            Holt–Winters' errors; :meth:`forecast` refits Holt–Winters on the whole history it is given. With
            ``"auto"`` fit's backtest also scores ``"ets"`` as a candidate, unless the Dickey–Fuller test finds
            the level mean-reverting (:func:`level_mean_reverting`). Not offered by default (session 39,
            docs/timeseries.md): on the 25 held-out series it was designed on, the mean CRPS went from 1.04 to
            1.01 x Holt–Winters' (unemp 2.41 -> 0.96 x), but on 8 fresh series it lost (mean 0.80 -> 0.86 x the
            probabilistic seasonal naive, mean CRPS 0.77 -> 0.83 x Holt–Winters'; seatbelts 0.96 -> 1.31).
        reflect: train on every standardised window and its mirror image ``y -> 2 loc - y`` (a random half
            of each batch is negated), so a model fit on one short series does not learn the drift its few,
            overlapping training windows share and extrapolate it into every forecast; ``"auto"`` (default):
            :meth:`fit`'s backtest chooses (mirroring also removes a real drift direction).
        base: how :meth:`forecast` forecasts by default. ``None`` (default): observation self-guidance; a name in
            ``BASES``: samples of that base forecaster (fit on the context given to :meth:`forecast`) refined
            by the model (:meth:`refine`, Langevin; the paper's "Refine"); ``"auto"``: :meth:`fit`'s
            backtest scores the refined bases with every trial model on the same validation origins as
            self-guidance and keeps whichever of the two scores lower (``refine_selection`` holds the scores).
            Not the default: on the 14 held-out runs of docs/timeseries.md it lowered CRPS on 6 seasonal series
            (unemp 0.47 -> 0.32 x psnaive, elec_equip 0.72 -> 0.48) but raised it on tbilrate (0.84 -> 1.00) and
            local_level seed 5 (1.16 -> 1.24), whose validation stretches favoured the refined base: mean CRPS
            0.1330 vs 0.1280 (Holt–Winters 0.1281).
        refine_iterations: Langevin iterations of that refinement; ``None``: chosen by the backtest among
            ``REFINE_ITERATIONS``.
        time_features: feed position-in-window and position-in-season channels to the network.
        seed: seeds the weights, the batches and (by default) the sampling noise.
        device, dtype: where the model lives (results follow the model's dtype).
    """

    def __init__(self, context_length: int, prediction_length: int, season_length: int = 1, *,
                 lags: Sequence[int] = (), hidden: int = 64, blocks: int | None = None,
                 diffusion_steps: int = 100, beta_end: float = 0.1, train_steps: int = 2000,
                 batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.995, grad_clip: float = 0.5,
                 guidance: str = "quantile", guidance_scale: float | None = None, time_features: bool = True,
                 difference: int | str = "auto", detrend: bool = False, log: bool | str = False,
                 spread: float | None = None, profile: bool | str = False, reflect: bool | str = "auto",
                 base: str | None = None, refine_iterations: int | None = None, max_seconds: float = 480.0, seed: int = 0, device: Any = "cpu", dtype: Any = torch.float32):
        self.context_length = _check_positive_int("context_length", context_length, 2)
        self.prediction_length = _check_positive_int("prediction_length", prediction_length, 1)
        self.season_length = _check_positive_int("season_length", season_length, 1)
        self.lags = tuple(_check_positive_int("lags[]", lag, 1) for lag in lags)
        if len(set(self.lags)) != len(self.lags):
            raise ValueError(f"lags must be distinct, got {tuple(lags)!r}")
        self.hidden = _check_positive_int("hidden", hidden, 1)
        self.blocks = None if blocks is None else _check_positive_int("blocks", blocks, 1)
        self.diffusion_steps = _check_positive_int("diffusion_steps", diffusion_steps, 2)
        if not (isinstance(beta_end, (int, float)) and 1e-4 < float(beta_end) < 1):
            raise ValueError(f"beta_end must lie in (1e-4, 1), got {beta_end!r}")
        self.beta_end = float(beta_end)
        self.train_steps = _check_positive_int("train_steps", train_steps, 1)
        self.batch_size = _check_positive_int("batch_size", batch_size, 1)
        self.lr, self.ema_decay, self.grad_clip = float(lr), float(ema_decay), float(grad_clip)
        if not (self.lr > 0 and 0 <= self.ema_decay < 1 and self.grad_clip >= 0):
            raise ValueError(f"need lr > 0, 0 <= ema_decay < 1, grad_clip >= 0; got {lr!r}, {ema_decay!r}, {grad_clip!r}")
        if guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCES)}, got {guidance!r}")
        self.guidance = guidance
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.scale_mode = "auto" if guidance_scale is None else "fixed"  # None: fit's backtest picks it
        if self.guidance_scale is not None and not (self.guidance_scale >= 0 and math.isfinite(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be finite and >= 0, got {guidance_scale!r}")
        self.time_features = bool(time_features)
        # spread: factor on every sample's deviation from the per-step median of the forecast paths (1: the
        # model's own spread); None: chosen by fit's backtest (a small model trained on one short series tends
        # to memorise its windows and sample too narrow a conditional: 50 % coverage of 80 % intervals on Nile)
        self.spread_mode = "auto" if spread is None else "fixed"
        self.spread = None if spread is None else float(spread)
        if self.spread is not None and not (self.spread > 0 and math.isfinite(self.spread)):
            raise ValueError(f"spread must be finite and > 0, got {spread!r}")
        # difference="auto": chosen in fit() by a rolling-origin backtest inside the training data between
        # none and seasonal differencing (where a season is known and the context holds two of them), or none
        # and first differences on a non-seasonal series (random-walk-like series need integrated increments:
        # their forecast spread grows like sqrt(h); on Nile first differences hurt, the backtest sees that)
        self.difference_mode = "auto" if difference == "auto" else "fixed"
        self.selection: dict = {}
        # fit's spread calibration: the factor the validation chose for the trial model, and the (trial, final)
        # models' mean per-step path sd at the forecast origin (spread = validated x spread_ratio)
        self.validated_spread: float | None = None
        self.spread_widths: tuple[float, float] | None = None
        self._trial_width: float | None = None
        self._path_cost: float | None = None  # wall seconds per sampled path, measured by fit's backtest
        if difference == "auto":
            difference = self.season_length if 1 < self.season_length <= self.context_length // 2 else 0
        self.difference = _check_positive_int("difference", difference, 0)
        if self.difference >= self.context_length:
            raise ValueError(f"difference must be < context_length={self.context_length}, got {self.difference}")
        if log not in (True, False):
            raise ValueError(f"log must be True or False, got {log!r}")
        self.log = bool(log)
        self.detrend = bool(detrend)
        if profile not in (True, False, "context", "history", "ets", "auto"):
            raise ValueError(f"profile must be True, False, 'context', 'history', 'ets' or 'auto', got {profile!r}")
        # profile="auto": fit's backtest scores the history profile as a candidate representation
        self.profile_mode = "auto" if profile == "auto" else "fixed"
        self.profile: bool | str = {True: "context", "auto": False}.get(profile, profile)
        if self.profile in ("history", "ets") and self.lags:
            raise ValueError(f"profile={self.profile!r} takes no lag channels, got lags={self.lags}")
        if self.profile == "ets" and not _have_statsmodels():
            raise ImportError("profile='ets' fits Holt-Winters with statsmodels: pip install statsmodels")
        # reflect: train on the standardised windows and their mirror images (y -> 2 loc - y); a model fit on
        # one short series otherwise learns the drift its few training windows happen to share and extrapolates
        # it (hourly synthetic series: the unconditional horizon mean rose to +0.8 sd, the forecast median
        # was 45 % further from the truth than the seasonal naive)
        # reflect="auto": fit's backtest chooses (mirroring also removes a real drift direction, e.g. a price
        # index's rise: macro_cpi went 0.89 -> 0.99 x psnaive when it became the default)
        if reflect not in (True, False, "auto"):
            raise ValueError(f"reflect must be True, False or 'auto', got {reflect!r}")
        self.reflect_mode = "auto" if reflect == "auto" else "fixed"
        self.reflect = True if reflect == "auto" else bool(reflect)
        if base is not None and base != "auto" and base not in BASES:
            raise ValueError(f"base must be None, 'auto' or one of {', '.join(BASES)}, got {base!r}")
        self.base_mode = "auto" if base == "auto" else "fixed"
        self.base: str | None = None if base == "auto" else base
        self.refine_selection: dict = {}
        self.refine_iterations_mode = "auto" if refine_iterations is None else "fixed"
        self.refine_iterations = 20 if refine_iterations is None else _check_positive_int("refine_iterations", refine_iterations, 1)
        self.max_seconds = float(max_seconds)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self._set_difference(self.difference)
        self.max_lag = max(self.lags, default=0)
        self.channels = 1 + len(self.lags)
        betas = torch.linspace(1e-4, self.beta_end, self.diffusion_steps, dtype=torch.float64)
        self.path = Discrete(betas)
        self._betas = betas
        self._alpha_bar = torch.cumprod(1 - betas, 0)
        self.net: TSDiffNet | None = None
        self.ema: TSDiffNet | None = None
        self.history: list[float] = []
        self.fit_seconds = 0.0

    def _set_difference(self, difference: int) -> None:
        self.difference = int(difference)
        self.length = self.context_length + self.prediction_length - self.difference
        self.inner_context = self.context_length - self.difference

    # ------------------------------------------------------------------ data
    def _features(self) -> Tensor | None:
        if not self.time_features:
            return None
        pos = torch.arange(self.length, dtype=torch.float64)
        feats = [2 * pos / max(self.length - 1, 1) - 1,
                 (pos >= self.inner_context).double() * 2 - 1]
        if self.season_length > 1:
            angle = 2 * math.pi * pos / self.season_length
            feats += [torch.sin(angle), torch.cos(angle)]
        return torch.stack(feats)[None].to(self.device, self.dtype)

    @property
    def num_features(self) -> int:
        if not self.time_features:
            return 0
        return 2 + (2 if self.season_length > 1 else 0)

    def _forward_transform(self, values: np.ndarray, name: str) -> np.ndarray:
        if not self.log:
            return values
        if (values[np.isfinite(values)] <= 0).any():
            raise ValueError(f"{name} holds values <= 0; log=True needs positive values")
        return np.log(values)

    def _represent(self, raw: np.ndarray) -> np.ndarray:
        """Raw windows ``(B, C, context + horizon)`` -> the modelled representation ``(B, C, length)``:
        differenced at lag ``difference`` inside the window (NaN where either value is missing)."""
        d = self.difference
        return raw[..., d:] - raw[..., :-d] if d else raw

    def _raw_windows(self, values: np.ndarray) -> np.ndarray:
        """All raw windows ``(W, C, context + horizon)`` of one series (lag channels from its history)."""
        full = self.context_length + self.prediction_length
        starts = np.arange(self.max_lag, values.size - full + 1)
        if starts.size == 0:
            return np.zeros((0, self.channels, full))
        index = starts[:, None] + np.arange(full)[None]
        return np.stack([values[index]] + [values[index - lag] for lag in self.lags], axis=1)

    def _normalise(self, windows: Tensor, observed: Tensor, offset: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Standardise each window by its observed context values of the series channel.

        ``loc`` ``(B, 1, length)``: the context mean (``detrend=False``; zero for first differences) or the least-squares line through
        the context, extended over the horizon (``detrend=True``), plus ``offset`` ``(B, length)`` where given
        (the history's seasonal profile, :meth:`_offsets`; the mean and line are then those of the context
        minus it); ``scale`` ``(B, 1, 1)``: the sd of the context around ``loc`` (floored at 1e-3 of the
        mean absolute value)."""
        ctx = windows[:, 0, : self.inner_context]
        mask = observed[:, 0, : self.inner_context]
        if offset is not None:
            ctx = ctx - offset[:, : self.inner_context]
        count = mask.sum(1).clamp(min=1)
        pos = torch.arange(self.length, device=windows.device, dtype=windows.dtype)
        mean = (ctx * mask).sum(1) / count
        if offset is not None and self.profile == "ets":
            mean = torch.zeros_like(mean)  # around Holt-Winters' path: the model learns its errors' level too
        elif offset is not None and not self.detrend:
            # around the history's profile the level is the last season's mean of the deseasonalised context
            # (the whole two-season context mean lags a moving level by a season)
            recent = torch.zeros_like(mask)
            recent[:, -self.season_length:] = 1
            recent = recent * mask
            mean = torch.where(recent.sum(1) > 0, (ctx * recent).sum(1) / recent.sum(1).clamp(min=1), mean)
        if self.difference == 1 and not self.detrend:
            # first differences are not centred: centring would carry the context's mean increment (a noisy
            # drift estimate: sd/sqrt(context) per step) over the whole horizon; uncentred, the model learns
            # from the data whether increments persist
            mean = torch.zeros_like(mean)
        loc = mean[:, None].expand(-1, self.length)
        if self.detrend:
            pc = pos[: self.inner_context]
            pmean = (pc[None] * mask).sum(1) / count
            dp = (pc[None] - pmean[:, None]) * mask
            slope = (dp * (ctx - mean[:, None])).sum(1) / (dp**2).sum(1).clamp(min=1e-12)
            loc = mean[:, None] + slope[:, None] * (pos[None] - pmean[:, None])
        m = self.season_length
        if self.profile == "context" and self._profile_fits:
            # the context's mean seasonal profile (phase means of its residuals), repeated over the window
            phase = torch.nn.functional.one_hot(pos.long() % m, m).to(windows.dtype)  # (length, m)
            resid = (ctx - loc[:, : self.inner_context]) * mask
            counts = mask @ phase[: self.inner_context]
            shape = (resid @ phase[: self.inner_context]) / counts.clamp(min=1)
            loc = loc + shape @ phase.T
        resid = (ctx - loc[:, : self.inner_context]) * mask
        var = (resid**2).sum(1) / count
        raw = windows[:, 0, : self.inner_context]  # the floor is relative to the series' own level
        floor = 1e-3 * ((raw.abs() * mask).sum(1) / count) + 1e-8
        scale = torch.maximum(var.sqrt(), floor)
        if offset is not None:
            loc = loc + offset
        loc, scale = loc[:, None, :], scale[:, None, None]
        return (windows - loc) / scale, loc, scale

    def _network_features(self) -> int:
        return self.num_features

    #: whole seasons of history (at most) behind ``profile="history"``
    PROFILE_SEASONS = 8

    @property
    def _profile_fits(self) -> bool:
        """A seasonal profile applies: no differencing, a season, and two of them in the context."""
        m = self.season_length
        return self.difference == 0 and 1 < m and 2 * m <= self.inner_context

    @property
    def _history_profiled(self) -> bool:
        return self.profile == "history" and self._profile_fits

    @property
    def _offset_kind(self) -> str | None:
        """What each window is standardised around besides its context mean: ``"history"`` (the history's seasonal
        profile), ``"ets"`` (the Holt–Winters path of its forecast origin, undifferenced windows only) or None."""
        if self._history_profiled:
            return "history"
        return "ets" if self.profile == "ets" and self.difference == 0 else None

    def _offsets(self, origins: list[tuple[np.ndarray, Any]]) -> Tensor:
        """``(B, length)``: for each (series, forecast origins) pair, the series' :func:`history_profile` at
        each origin laid over the window that ends its context there (``B`` = all origins, in order); with
        ``profile="ets"`` the Holt–Winters path of each origin (:func:`~flowdiff.timeseries.ets.holt_winters_paths`,
        fit on the whole series given)."""
        m, c = self.season_length, self.context_length
        if self._offset_kind == "ets":  # Holt-Winters fit on each series (history) given, its path at each origin
            short = [a.size for a, _ in origins if a.size < 4]
            if short:
                raise ValueError(f"profile='ets' fits Holt-Winters on the whole history given; it needs at least 4 "
                                 f"values, got a series of {short[0]}")
            rows = [holt_winters_paths(a, fit_holt_winters(a, m), ends, c, self.prediction_length) for a, ends in origins]
            return torch.as_tensor(np.concatenate(rows), device=self.device, dtype=self.dtype)
        phase = (np.arange(self.length) - c) % m
        rows = [history_profile(a, int(o), m, self.PROFILE_SEASONS)[phase] for a, ends in origins for o in ends]
        return torch.as_tensor(np.stack(rows), device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ fit
    def _build(self) -> None:
        torch.manual_seed(self.seed)
        self.net = TSDiffNet(self.channels, self.length, self._network_features(), self.hidden, self.blocks).to(self.device, self.dtype)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)

    def fit(self, series: Any, *, train_steps: int | None = None, verbose: bool = False) -> "TSDiff":
        """Train the unconditional model on every window of ``series`` (a 1-D array or a list of them); returns self.

        Raises ``ValueError`` for NaN/Inf values and for series shorter than
        ``context_length + prediction_length`` (+ the largest lag).
        """
        items = as_series_list(series)
        need = self.context_length + self.prediction_length + self.max_lag
        short = [(i, a.size) for i, a in enumerate(items) if a.size < need]
        if len(short) == len(items):
            i, n = short[0]
            raise ValueError(f"series[{i}] has {n} values; fit needs at least context_length + prediction_length"
                             f"{' + max(lags)' if self.max_lag else ''} = {need}")
        steps = self.train_steps if train_steps is None else _check_positive_int("train_steps", train_steps, 1)
        began = time.perf_counter()
        if "auto" in (self.difference_mode, self.scale_mode, self.spread_mode, self.reflect_mode, self.base_mode) and type(self) is TSDiff:
            self._select_difference(items, steps, verbose)
        # max_seconds bounds the whole fit, the backtest's trial models included (at least a quarter is left)
        # (less the final width probe, whose cost per path the backtest measured)
        probe = self.PROBE_PATHS * self._path_cost if self._trial_width is not None and self._path_cost else 0.0
        budget = max(self.max_seconds - (time.perf_counter() - began) - probe, self.max_seconds / 4)
        self._fit_fixed(items, steps, verbose, budget)
        if self._trial_width is not None:
            self.spread_widths = (self._trial_width, self._probe_width(self, items, self.guidance_scale))
            self._trial_width = None
            ratio = self.spread_ratio
            if ratio is not None and ratio > 0 and math.isfinite(ratio):
                self.spread = float(np.clip(self.validated_spread * ratio, *SPREAD_LIMITS))
            if verbose:
                print(f"spread: validated {self.validated_spread} x trial/final width {ratio} -> {self.spread}")
        return self

    @property
    def spread_ratio(self) -> float | None:
        """Trial model's over the final model's path width at the forecast origin (None before a calibration)."""
        if self.spread_widths is None or self.spread_widths[1] == 0:
            return None
        return self.spread_widths[0] / self.spread_widths[1]

    def _probe_width(self, model: "TSDiff", items: list[np.ndarray], scale: float | None) -> float:
        """Mean per-step sd of ``model``'s self-guided paths (spread 1) from the end of each training series.

        The forecast origin right after the data is out of sample for both the backtest's trial model and the
        final model, so the ratio of their widths there measures how much narrower or wider the final model
        samples than the trial whose spread factor the validation chose (:meth:`fit`).
        """
        need = self.context_length + self.max_lag
        ends = [a for a in items if a.size >= need][:self.PROBE_SERIES]
        per = max(self.MIN_PATHS, self.PROBE_PATHS // len(ends))  # PROBE_PATHS in all: its cost is planned
        paths = model.forecast(ends, per, guidance_scale=scale, spread=1.0, base=None, seed=self.seed + self.PROBE_SEED)
        return float(np.std(paths, axis=-2).mean())

    #: paths (in all, at least MIN_PATHS per series) and series (their last context) on which fit compares the
    #: widths of the trial and final models
    PROBE_PATHS = 100
    PROBE_SERIES = 8
    PROBE_SEED = 7919  # offset from the model's seed
    #: the most of max_seconds that one width probe may take; dearer probes are skipped (the validated spread is kept)
    PROBE_SHARE = 0.1
    #: the share of ``max_seconds`` after which fit's backtest stops scoring further guidance scales
    SELECTION_SHARE = 0.6
    #: sample paths per guidance scale that fit's backtest scores, over all its validation origins
    BACKTEST_PATHS = 400
    #: validation origins (each one horizon long) held out at the end of each training series by fit's selection
    VALIDATION_ORIGINS = 3
    #: ... or more: as many horizons as make up this fraction of the series (the choice between candidates
    #: on 3 horizons flipped between runs: season7 chose seasonal differencing at 0.059 vs 0.064 in
    #: validation, and no differencing was better on the test, 0.066 vs 0.088)
    VALIDATION_FRACTION = 0.2

    #: paths of the timing forecast that measures the cost of one sampled path (fit's backtest plan)
    TIMING_PATHS = 8
    #: the fewest validation origins and paths per origin a time-planned backtest scores
    MIN_ORIGINS = 4
    MIN_PATHS = 10

    def _path_seconds(self, trial: "TSDiff", context: np.ndarray) -> float:
        """Wall seconds per self-guided path of ``trial`` (one timed forecast of ``TIMING_PATHS`` paths)."""
        start = time.perf_counter()
        trial.forecast(context, self.TIMING_PATHS, spread=1.0, base=None)
        return max((time.perf_counter() - start) / self.TIMING_PATHS, 1e-9)

    def _plan_origins(self, held: list, paths: int, affordable: float) -> tuple[list, int]:
        """Validation origins and paths per origin such that one scored set holds about ``affordable`` paths.

        Unchanged where ``len(held) · paths`` fits; else at least ``MIN_PATHS`` (25 where possible) paths per
        origin on fewer origins (at least ``MIN_ORIGINS``), kept evenly spaced over the held-out stretches (and
        over the series of a panel).
        """
        if len(held) * paths <= affordable:
            return held, paths
        per = 25 if affordable >= 25 * self.MIN_ORIGINS else self.MIN_PATHS
        origins = int(np.clip(affordable // per, self.MIN_ORIGINS, len(held)))
        keep = _evenly_spaced(len(held), origins)
        held = [held[i] for i in keep]
        return held, int(np.clip(affordable // len(held), self.MIN_PATHS, paths))

    #: validation origins that fit's backtest forecasts, over all series of a panel
    MAX_ORIGINS = 16

    def _validation_split(self, items: list[np.ndarray]) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
        """The backtest's training series and held-out ``(history, horizon values)`` origins.

        Each series long enough keeps ``horizon + 1`` training windows at least and holds out the last
        ``VALIDATION_ORIGINS`` horizons, or ``VALIDATION_FRACTION`` of it where that is more; origins lie every half
        horizon inside the held-out stretch. At most ``MAX_ORIGINS`` are kept: the latest origin of every
        series in turn, then the one before, ..., so a panel is validated on all its series (where it has more
        series than ``MAX_ORIGINS``, on that many spread evenly over the panel), not only on its last one.
        """
        horizon = self.prediction_length
        need = self.context_length + self.prediction_length + self.max_lag
        train, per_series = [], []
        for a in items:
            # VALIDATION_ORIGINS horizons or VALIDATION_FRACTION of the series, whichever is more, but no more
            # than leave at least horizon + 1 training windows
            wanted = max(self.VALIDATION_ORIGINS, int(self.VALIDATION_FRACTION * a.size) // horizon)
            origins = min(wanted, (a.size - need - horizon) // horizon)
            if origins >= 1:
                cut = a.size - origins * horizon
                train.append(a[:cut])
                # origins every half horizon inside the held-out stretch (overlapping: more, cheaper evidence)
                stride = max(1, horizon // 2)
                per_series.append([(a[:cut + j], a[cut + j: cut + j + horizon])
                                   for j in range(0, origins * horizon - horizon + 1, stride)])
        if len(per_series) > self.MAX_ORIGINS:
            keep = _evenly_spaced(len(per_series), self.MAX_ORIGINS)
            per_series = [per_series[i] for i in keep]
        chosen: list[tuple[int, int]] = []  # (series, origin) pairs, latest first, series in turn
        for back in range(max((len(o) for o in per_series), default=0)):
            chosen += [(s, len(o) - 1 - back) for s, o in enumerate(per_series) if back < len(o)]
        chosen = sorted(chosen[:self.MAX_ORIGINS])
        return train, [per_series[s][j] for s, j in chosen]

    #: with ``profile="auto"`` fit's backtest scores windows around Holt-Winters' path (``profile="ets"``) on at
    #: most this many series (statsmodels fits Holt-Winters on each training series and on each
    #: history forecast from, 0.5-2 s per hourly series: a 64-series panel would spend minutes on it)
    ETS_MAX_SERIES = 8

    #: series tested by :meth:`_trending` at most (evenly spread over a panel)
    TREND_SERIES = 32

    def _trending(self, items: list[np.ndarray]) -> bool:
        """Whether first differences are a backtest candidate on a seasonal series: the KPSS test
        (:func:`level_nonstationary`) rejects level stationarity of the deseasonalised series, on at least half of
        the (at most ``TREND_SERIES``) series tested. On stationary series the candidate is not offered: the
        backtest's few overlapping origins can prefer it by chance (session 37: an AR(1)-plus-season series went
        from 0.86 to 1.34 x the probabilistic seasonal naive when first differences were always offered), while on
        the trending macro series it helped (M1 0.70 -> 0.45, real GDP 0.86 -> 0.74); docs/timeseries.md."""
        return self._vote(level_nonstationary, items)

    def _vote(self, test, items: list[np.ndarray]) -> bool:
        """Whether ``test(series, season_length)`` says yes on at least half of the (at most ``TREND_SERIES``,
        evenly spread) series it can decide on; False where it decides on none."""
        verdicts = [test(self._forward_transform(items[i], "series"), self.season_length)
                    for i in _evenly_spaced(len(items), self.TREND_SERIES)]
        tested = [v for v in verdicts if v is not None]
        return bool(tested) and 2 * sum(tested) >= len(tested)

    def _select_difference(self, items: list[np.ndarray], steps: int, verbose: bool) -> None:
        """Choose ``difference``, ``reflect``, the guidance scale and the spread by a rolling-origin backtest.

        The last ``VALIDATION_ORIGINS`` horizons of every series, or more where they make up less than
        ``VALIDATION_FRACTION`` of it, are held out (fewer where the rest would
        give fewer than ``horizon + 1`` training windows; none: seasonal differencing, mirrored windows, the
        default scale and spread are kept) and forecast from origins every half horizon inside them (5
        overlapping origins for 3 horizons; at most ``MAX_ORIGINS`` in all, the latest of each series in turn,
        see :meth:`_validation_split`). Trial models are trained on the
        rest with half the step budget each (and a share of ``max_seconds``) and forecast the held-out origins
        (50 paths each, fewer — at least 25 — where more than 8 origins would exceed ``BACKTEST_PATHS`` in
        all; where paths are dear — long windows — fewer origins and paths, planned from a timed forecast so
        every trial's first scale fits ``SELECTION_SHARE`` of ``max_seconds``, see :meth:`_plan_origins`;
        the scales ``BACKTEST_SCALE_FACTORS`` times the default unless ``guidance_scale`` was given: quantile
        guidance its default 1 only, mean-square ¼, ½, 1 and 2 times its default); each set of paths is also
        scored widened or narrowed by the factors ``SPREADS`` (1/√2 … √2, see :func:`widen`; unless ``spread``
        was given). Scales are scored breadth first (every candidate at the first, then every candidate at
        the next, ...); a scale whose sampling would end past
        ``SELECTION_SHARE`` of ``max_seconds`` is not scored, except each trial's first. Two stages:

        1. one trial per differencing candidate, with mirrored windows (``reflect=True``): no differencing and
           seasonal differencing where the context holds two seasons, and also first differences there where
           the KPSS test rejects a stationary level (:meth:`_trending`); **first differences** on a series
           without a usable season (a random walk's forecast spread grows like √h; integrated increments
           give that growth, a standardised level window does not); with ``profile="auto"``, on a seasonal
           series whose context holds two seasons, also ``"profile"``: no differencing, each window standardised around the seasonal
           profile of the whole history before its forecast origin (``profile="history"``; the last day
           repeated, which seasonal differences extrapolate, carries that day's noise into every forecast);
           and with ``profile="auto"``, where statsmodels is installed, no lags are modelled and the level does not
           mean-revert (:func:`level_mean_reverting`), ``"ets"``: no differencing, each
           window around the Holt–Winters path of its forecast origin (``profile="ets"``; trend-heavy series,
           whose level and slope a few overlapping windows cannot teach the network, are extrapolated by
           exponential smoothing and the model learns its errors);
        2. with ``reflect="auto"``, one more trial without mirrored windows at the best difference of stage 1
           (mirroring removes any drift direction, also a real one such as a price index's); skipped (mirrored
           windows kept) where its training and first scored set would not end within ``SELECTION_SHARE`` of
           ``max_seconds``.

        3. with ``base="auto"``, every trial model also **refines** the samples of each base forecaster in
           ``BASES`` (probabilistic seasonal naive; Holt–Winters where statsmodels is installed), fit on each
           validation context's whole history (:meth:`refine`, Langevin, the paper's "Refine"), scored with
           the same spreads; no extra training (measured cost: a few seconds per fit).

        The (difference, reflect, scale, spread) with the lowest pooled CRPS (mean weighted quantile loss) is
        kept; ``self.selection`` holds every score ({(difference, reflect, scale, spread): CRPS}). Where a
        refined base scores lower still, ``self.base`` names it and :meth:`forecast` refines that base by
        default with the chosen number of Langevin iterations (``REFINE_ITERATIONS``, scored from snapshots of one
        run; ``self.refine_selection``: {(difference, reflect, base, iterations, spread): CRPS}).
        Rolling-origin evaluation: Tashman (2000), "Out-of-sample tests of forecasting accuracy".
        """
        from .metrics import mean_weighted_quantile_loss

        seasonal = self.season_length if 1 < self.season_length <= self.context_length // 2 else 0
        self.selection = {}
        if self.profile_mode == "auto":
            self.profile = False  # a refit chooses afresh
        self.validated_spread = self.spread_widths = self._trial_width = None  # a refit calibrates afresh
        self._path_cost = None
        horizon = self.prediction_length
        train, held = self._validation_split(items)
        if not held:  # too short to hold anything out: seasonal differencing, mirroring, default scale and spread
            if self.difference_mode == "auto":
                self._set_difference(seasonal)
            if self.reflect_mode == "auto":
                self.reflect = True
            return
        # paths per origin: BACKTEST_PATHS in all per scored set (at most 50 per origin, at least 25), so the
        # sampling cost does not grow with the number of origins (measured: hourly series of 8 weeks, 16
        # origins x 50 paths, 3 candidates: the fit took 622 s wall with max_seconds=480)
        paths = int(min(50, max(25, self.BACKTEST_PATHS // len(held))))
        if self.scale_mode == "fixed" or self.guidance == "none":
            scales = [self._default_scale(self.guidance)]
        else:
            # the default first: where time allows one scale only (long windows) it is the one scored
            scales = [DEFAULT_SCALES[self.guidance] * f for f in BACKTEST_SCALE_FACTORS[self.guidance]]
        if self.difference_mode == "auto":
            candidates = [0, seasonal] if seasonal else [0, 1]
            if seasonal and self._trending(items):
                candidates.append(1)  # first differences where the level wanders (KPSS rejects), see _trending
            if seasonal and self.profile_mode == "auto" and not self.lags:
                candidates.append("profile")  # no differencing around the history's seasonal profile
            if (self.profile_mode == "auto" and not self.lags and len(items) <= self.ETS_MAX_SERIES
                    and _have_statsmodels() and not self._vote(level_mean_reverting, items)):
                candidates.append("ets")  # no differencing around Holt-Winters' path, unless the level mean-reverts
        else:
            candidates = [self.difference]
        spreads = SPREADS if self.spread_mode == "auto" else [self.spread]
        reflects = [True, False] if self.reflect_mode == "auto" else [self.reflect]
        trials = len(candidates) + len(reflects) - 1
        if trials == 1 and len(scales) * len(spreads) == 1 and self.base_mode == "fixed" and self.base is None:
            return
        kept: dict = {}  # the trial models by (difference, reflect), reused to score the refined bases

        def train_trial(candidate: Any, reflect: bool) -> None:
            profile = {"profile": "history", "ets": "ets"}.get(candidate, self.profile)
            config = {**self.config(), "difference": 0 if candidate in ("profile", "ets") else candidate, "profile": profile,
                      "reflect": reflect, "train_steps": max(1, steps // 2),
                      "max_seconds": self.max_seconds / (2 * trials + 1), "base": None}
            trial = TSDiff(**config, device=self.device, dtype=self.dtype)._fit_fixed(train, max(1, steps // 2), False)
            kept[(candidate, reflect)] = trial

        def score(candidate: Any, reflect: bool, scale: float, first: bool) -> None:
            # the backtest's sampling is bounded too: a scale whose sampling would end past SELECTION_SHARE of
            # max_seconds is not scored, except each trial's first (else its training was wasted; measured:
            # elnino's 16 origins x 4 scales x 2 trials made a default fit take 618 s wall on one idle core, past
            # the 10-minute budget; hourly windows with 3 candidates left the third unscored when scales went
            # trial by trial)
            if not first and cost * paths * len(contexts) > left():
                return
            samples = kept[(candidate, reflect)].forecast(contexts, paths, guidance_scale=scale, spread=1.0)
            # the spread is scored on the same paths (it only rescales them)
            for spread in spreads:
                self.selection[(candidate, reflect, scale, spread)] = float(mean_weighted_quantile_loss(widen(samples, spread), targets))
            if verbose:
                best = min(spreads, key=lambda f: self.selection[(candidate, reflect, scale, f)])
                print(f"difference={candidate} reflect={reflect} scale={scale}: validation CRPS "
                      f"{self.selection[(candidate, reflect, scale, spreads[len(spreads) // 2])]:.4f} "
                      f"(spread {best}: {self.selection[(candidate, reflect, scale, best)]:.4f})")

        began = time.perf_counter()
        for candidate in candidates:
            train_trial(candidate, reflects[0])
        # the sampling is planned to fit the time left (long windows: a scored path of a 2-week hourly context
        # costs ~7x one of a 2-day context; measured before this plan: context 168 on an 8-week hourly series
        # took 705 s wall at max_seconds=480, two scored sets of 400 paths ~175 s each)
        cost = self._path_cost = self._path_seconds(kept[(candidates[0], reflects[0])], held[-1][0])
        probe = self.PROBE_PATHS * cost  # the trial's width probe (fit keeps time for the final model's)
        calibrate = probe <= self.PROBE_SHARE * self.max_seconds
        probe = probe if calibrate else 0.0  # too dear: no width probes (below)

        def left() -> float:  # seconds of the backtest's share still free, the trial's width probe kept back
            return self.SELECTION_SHARE * self.max_seconds - probe - (time.perf_counter() - began)

        trial_seconds = (time.perf_counter() - began - self.TIMING_PATHS * cost) / len(candidates)
        if len(reflects) > 1 and left() - trial_seconds < (len(candidates) + 1) * self.MIN_ORIGINS * self.MIN_PATHS * cost:
            reflects = reflects[:1]  # no time for the unmirrored trial: mirrored windows are kept
        budget = left() - (trial_seconds if len(reflects) > 1 else 0.0)
        held, paths = self._plan_origins(held, paths, budget / ((len(candidates) + len(reflects) - 1) * cost))
        contexts = [h for h, _ in held]
        targets = np.stack([y for _, y in held])
        # breadth first: every candidate at the first scale, then every candidate at the next, ... so a time cut
        # leaves scales unscored, never a trained candidate
        for i, scale in enumerate(scales):
            for candidate in candidates:
                score(candidate, reflects[0], scale, i == 0)
        # stage 2: the best difference of stage 1 without mirrored windows, where its training and first scored set
        # still end within SELECTION_SHARE of max_seconds
        if len(reflects) > 1 and trial_seconds + cost * paths * len(contexts) < left():
            best = min(self.selection, key=self.selection.get)[0]
            train_trial(best, reflects[1])
            for i, scale in enumerate(scales):
                score(best, reflects[1], scale, i == 0)
        # refinement of base forecasters (the paper's "Refine") with every trial model, on the same origins
        self.refine_selection = {}
        bases = [b for b in BASES if b != "holt_winters" or _have_statsmodels()] if self.base_mode == "auto" else (
            [self.base] if self.base is not None else [])
        refine_spreads = REFINE_SPREADS if self.spread_mode == "auto" else [self.spread]
        strengths = REFINE_ITERATIONS if self.refine_iterations_mode == "auto" else [self.refine_iterations]
        for name in bases:
            try:
                initial = [_base_samples(name, c, horizon, self.season_length, paths, seed=self.seed + i)
                           for i, c in enumerate(contexts)]
            except Exception:  # noqa: BLE001 - a base that cannot be fit on these contexts is no candidate
                continue
            for (candidate, reflect), trial in kept.items():
                # bounded like the scales above: after 80 % of max_seconds no further trial refines (the
                # final model still gets its quarter of max_seconds)
                if self.refine_selection and time.perf_counter() - began > 0.8 * self.max_seconds:
                    break
                # the refinement strength (Langevin iterations) is scored from one run's snapshots
                runs = [trial.refine(c, x, iterations=max(strengths), snapshots=strengths) for c, x in zip(contexts, initial)]
                for j, iterations in enumerate(strengths):
                    refined = np.stack([run[j] for run in runs])
                    for spread in refine_spreads:
                        self.refine_selection[(candidate, reflect, name, iterations, spread)] = float(
                            mean_weighted_quantile_loss(widen(refined, spread), targets))
                if verbose:
                    best = min((k for k in self.refine_selection if k[:3] == (candidate, reflect, name)), key=self.refine_selection.get)
                    print(f"difference={candidate} reflect={reflect} refined {name}: best validation CRPS "
                          f"{self.refine_selection[best]:.4f} ({best[3]} iterations, spread {best[4]})")
        guided = min(self.selection, key=self.selection.get)
        refined_best = min(self.refine_selection, key=self.refine_selection.get) if self.refine_selection else None
        if refined_best is not None and (self.base is not None or self.refine_selection[refined_best] < self.selection[guided]):
            difference, reflect, name, iterations, spread = refined_best
            self.refine_iterations = int(iterations)
            same = {k: v for k, v in self.selection.items() if k[:2] == (difference, reflect)}
            scale = min(same, key=same.get)[2] if same else self._default_scale(self.guidance)
            self.base = name
        else:
            difference, reflect, scale, spread = guided
            self.base = None
            # fit rescales the validated spread to the final model's own width, unless the two width probes would
            # take more than PROBE_SHARE of max_seconds (long windows or a small max_seconds: the time goes to
            # training; the validated spread is kept)
            if self.spread_mode == "auto" and calibrate:
                self._trial_width = self._probe_width(kept[(difference, reflect)], items, scale)
        if difference in ("profile", "ets"):
            difference, self.profile = 0, {"profile": "history", "ets": "ets"}[difference]
        self._set_difference(difference)
        self.reflect = bool(reflect)
        if self.scale_mode == "auto":
            self.guidance_scale = float(scale)  # then used by forecast() for any guidance kind
        if self.spread_mode == "auto":
            self.spread = self.validated_spread = float(spread)

    def _fit_fixed(self, items: list[np.ndarray], steps: int, verbose: bool, max_seconds: float | None = None) -> "TSDiff":
        need = self.context_length + self.prediction_length + self.max_lag
        series = [self._forward_transform(a, "series") for a in items if a.size >= need]
        windows = np.concatenate([self._represent(self._raw_windows(a)) for a in series])
        data = torch.as_tensor(windows, device=self.device, dtype=self.dtype)
        offset = None
        if self._offset_kind:  # each window's profile (or Holt-Winters path) from the history before its own forecast origin
            full = self.context_length + self.prediction_length
            offset = self._offsets([(a, np.arange(self.max_lag, a.size - full + 1) + self.context_length) for a in series])
        data, _, _ = self._normalise(data, torch.ones_like(data), offset)
        self._build()
        assert self.net is not None and self.ema is not None
        features = self._features()
        generator = torch.Generator().manual_seed(self.seed)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        warmup = min(200, steps // 10 + 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda i: min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0)))))
        alpha_bar = self._alpha_bar.to(self.device, self.dtype)
        start = time.perf_counter()
        self.history = []
        for step in range(steps):
            rows = torch.randint(0, data.shape[0], (self.batch_size,), generator=generator).to(self.device)
            x0 = data[rows]
            if self.reflect:  # y -> 2 loc - y: the standardised window changes sign (half of each batch)
                flip = torch.randint(0, 2, (self.batch_size, 1, 1), generator=generator).to(self.device, self.dtype)
                x0 = x0 * (1 - 2 * flip)
            k = torch.randint(0, self.diffusion_steps, (self.batch_size,), generator=generator).to(self.device)
            noise = torch.randn(x0.shape, generator=generator, dtype=self.dtype).to(self.device)
            ab = alpha_bar[k][:, None, None]
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            t = 1 - (k + 1).to(self.dtype) / self.diffusion_steps
            loss = self._loss(x0, xt, t, noise, features)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"TSDiff.fit: non-finite loss {float(loss)} at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                decay = min(self.ema_decay, (1 + step) / (10 + step))
                for e, p in zip(self.ema.parameters(), self.net.parameters()):
                    e.lerp_(p, 1 - decay)
            self.history.append(float(loss.detach()))
            if verbose and step % 500 == 0:
                print(f"step {step} loss {float(loss):.4f}")
            if time.perf_counter() - start > (self.max_seconds if max_seconds is None else max_seconds):
                break
        self.fit_seconds = time.perf_counter() - start
        self.steps_done = step + 1
        return self

    def _loss(self, x0: Tensor, xt: Tensor, t: Tensor, noise: Tensor, features: Tensor | None) -> Tensor:
        """The unconditional ε-prediction loss over the whole window (lags included)."""
        assert self.net is not None
        return ((self.net(xt, t, features) - noise) ** 2).mean()

    # ------------------------------------------------------------------ sampling
    def field(self) -> Field:
        """The trained (EMA) network as a :class:`flowdiff.Field` on the :class:`~flowdiff.paths.Discrete` path."""
        self._check_fitted()
        features = self._features()
        ema = self.ema

        def model(x: Tensor, t: Tensor) -> Tensor:
            return ema(x, t, features)

        return Field(model, self.path, "noise")

    def _check_fitted(self) -> None:
        if self.ema is None:
            raise RuntimeError("TSDiff is not fitted: call fit(series) first")

    def _prepare(self, context: Any, missing: str) -> tuple[Tensor, Tensor, Tensor, Tensor, np.ndarray]:
        """Represented windows with the horizon unknown: (values, observed mask) normalised, loc, scale,
        and the raw (transformed) series channel ``(B, context + horizon)`` with NaN in the horizon."""
        need = self.context_length + self.max_lag
        histories = [self._forward_transform(c, "context") for c in check_context(context, need, missing=missing, whole=True)]
        contexts = [h[-need:] for h in histories]
        full = np.full((len(contexts), need + self.prediction_length), np.nan)
        full[:, :need] = np.stack(contexts)
        width = self.context_length + self.prediction_length
        chans = [full[:, self.max_lag:]] + [full[:, self.max_lag - lag: self.max_lag - lag + width] for lag in self.lags]
        raw = np.stack(chans, axis=1)
        win = self._represent(raw)
        observed = torch.as_tensor(~np.isnan(win), device=self.device, dtype=self.dtype)
        values = torch.as_tensor(np.nan_to_num(win), device=self.device, dtype=self.dtype)
        if (observed[:, 0, : self.inner_context].sum(1) < 1).any():
            raise ValueError("every context needs observed values in its last context_length steps "
                             f"(at least one pair {self.difference} steps apart when differencing)")
        offset = self._offsets([(h, [h.size]) for h in histories]) if self._offset_kind else None
        values, loc, scale = self._normalise(values, observed, offset)
        return values * observed, observed, loc, scale, raw[:, 0]

    def _integrate(self, raw: np.ndarray, horizon: np.ndarray) -> np.ndarray:
        """Undo the differencing: ``raw (B, context + horizon)`` (horizon NaN), modelled horizon values
        ``(B, S, H)`` -> forecasts ``(B, S, H)`` on the original scale."""
        d, c = self.difference, self.context_length
        if d == 0:
            out = horizon
        else:
            base = np.repeat(raw[:, None, :], horizon.shape[1], axis=1).copy()
            if np.isnan(base[:, :, c - d: c]).any():  # a missing anchor: carry the last observed value
                for b in range(base.shape[0]):
                    row = base[b, 0, :c]
                    last = row[~np.isnan(row)][-1]
                    filled = np.where(np.isnan(row), np.nan, row)
                    for i in range(c):
                        if np.isnan(filled[i]):
                            filled[i] = filled[i - 1] if i > 0 and not np.isnan(filled[i - 1]) else last
                    base[b, :, :c] = filled
            for j in range(horizon.shape[2]):
                base[:, :, c + j] = base[:, :, c + j - d] + horizon[:, :, j]
            out = base[:, :, c:]
        return np.exp(out) if self.log else out

    def _default_scale(self, guidance: str) -> float:
        if self.guidance_scale is not None:
            return self.guidance_scale
        return DEFAULT_SCALES.get(guidance, 1.0)

    def _energy(self, guidance: str, xhat: Tensor, target: Tensor, mask: Tensor, levels: Tensor) -> Tensor:
        err = (xhat - target) * mask
        if guidance == "mean-square":
            return (err**2).sum()
        e = target - xhat  # pinball rho_q(y - yhat)
        q = levels[:, None, None]
        return (torch.maximum(q * e, (q - 1) * e) * mask).sum()

    def forecast(self, context: Any, num_samples: int = 100, *, guidance: str | None = None,
                 guidance_scale: float | None = None, seed: int | None = None, missing: str = "raise",
                 spread: float | None = None, return_windows: bool = False,
                 base: str | None = "auto", iterations: int | None = None) -> np.ndarray:
        """Sample ``num_samples`` forecasts of the next ``prediction_length`` steps after ``context``.

        Arguments:
            context: a 1-D series (its last ``context_length`` + max-lag values are used), or a
                2-D array / list of series.
            num_samples: sample paths per context.
            guidance: ``"quantile"``, ``"mean-square"`` or ``"none"`` (default: the model's).
            guidance_scale: the scale ``s`` (default: the model's, else 1 for quantile, 2 for MS).
            seed: seed of the sampling noise (default: the model's seed).
            missing: ``"raise"`` (NaN in the context is an error) or ``"mask"`` (NaN marks a missing
                observation, left out of the guidance energy as in the paper's missing-value scenarios).
            spread: factor on each path's deviation from the per-step median of the paths (default: the
                one :meth:`fit`'s backtest chose, else 1 — the model's own spread).
            return_windows: also return the sampled windows in the modelled representation (differenced
                at lag ``difference``, de-standardised), ``(…, S, channels, length)`` (self-guidance only).
            base: ``"auto"`` (default): the model's ``base`` (chosen by :meth:`fit`'s backtest) unless
                ``guidance`` or ``guidance_scale`` is given (then self-guidance); ``None``: self-guidance; a
                name in ``BASES``: that base forecaster's samples, fit on each context, refined by
                :meth:`refine` (Langevin, ``iterations`` steps; default the model's ``refine_iterations``). Contexts with missing values are forecast by
                self-guidance.

        Returns:
            ``(num_samples, prediction_length)`` for one context, ``(B, num_samples, prediction_length)``
            for several; float64 numpy.
        """
        self._check_fitted()
        single = np.ndim(context) == 1 if not isinstance(context, (list, tuple)) else np.ndim(context[0]) == 0
        num_samples = _check_positive_int("num_samples", num_samples, 1)
        guidance = self.guidance if guidance is None else guidance
        if guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCES)}, got {guidance!r}")
        scale = self._default_scale(guidance) if guidance_scale is None else float(guidance_scale)
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"guidance_scale must be finite and >= 0, got {guidance_scale!r}")
        if base == "auto":
            base = self.base if guidance_scale is None and guidance == self.guidance else None
        elif base is not None and base not in BASES:
            raise ValueError(f"base must be 'auto', None or one of {', '.join(BASES)}, got {base!r}")
        values, observed, loc, scale_, raw = self._prepare(context, missing)
        histories = None
        if base is not None and not return_windows:
            try:  # the base forecaster is fit on the whole history given (no missing values), as in fit's backtest
                histories = as_series_list(context, "context")
            except ValueError:
                histories = None  # missing values: self-guidance
        if histories is not None:
            factor = (self.spread if self.spread is not None else 1.0) if spread is None else float(spread)
            if not (factor > 0 and math.isfinite(factor)):
                raise ValueError(f"spread must be finite and > 0, got {spread!r}")
            contexts = histories
            seed_ = self.seed if seed is None else int(seed)
            iterations = self.refine_iterations if iterations is None else iterations
            result = np.stack([self.refine(c, _base_samples(base, c, self.prediction_length, self.season_length,
                                                            num_samples, seed=seed_ + i), iterations=iterations, seed=seed_)
                               for i, c in enumerate(contexts)])
            if factor != 1.0:
                result = widen(result, factor)
            if not np.isfinite(result).all():
                raise FloatingPointError("TSDiff.forecast produced non-finite refined samples")
            return result[0] if single else result
        batch = values.shape[0]
        target = values.repeat_interleave(num_samples, 0)
        mask = observed.repeat_interleave(num_samples, 0)
        levels = (torch.arange(1, num_samples + 1, dtype=self.dtype, device=self.device) / (num_samples + 1)).repeat(batch)
        generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        x = self._sample(target, mask, levels, guidance, scale, generator)
        x = x.reshape(batch, num_samples, self.channels, self.length)
        windows = (x * scale_[:, None] + loc[:, None]).double().cpu().numpy()
        result = self._integrate(raw, windows[:, :, 0, self.inner_context:])
        factor = (self.spread if self.spread is not None else 1.0) if spread is None else float(spread)
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"spread must be finite and > 0, got {spread!r}")
        if factor != 1.0:
            result = widen(result, factor)
        if not np.isfinite(result).all():
            raise FloatingPointError("TSDiff.forecast produced non-finite samples (guidance_scale too large?)")
        if single:
            result, windows = result[0], windows[0]
        return (result, windows) if return_windows else result

    def _guidance_gradient(self, x: Tensor, t: Tensor, alpha_bar: Tensor, guidance: str, target: Tensor,
                           mask: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
        r"""Predicted noise and :math:`\nabla_x E(\hat y(x))` at ``x`` (one forward and one backward pass)."""
        assert self.ema is not None
        with torch.enable_grad():
            xin = x.detach().requires_grad_(True)
            eps = self.ema(xin, t, self._features())
            xhat = (xin - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            grad, = torch.autograd.grad(self._energy(guidance, xhat, target, mask, levels), xin)
        return eps.detach(), grad

    def _sample(self, target: Tensor, mask: Tensor, levels: Tensor, guidance: str, scale: float,
                generator: torch.Generator) -> Tensor:
        """Guided ancestral DDPM sampling of normalised windows (module docstring)."""
        ema, features = self.ema, self._features()
        assert ema is not None
        betas = self._betas.to(self.device, self.dtype)
        abar = self._alpha_bar.to(self.device, self.dtype)
        x = torch.randn(target.shape, generator=generator, dtype=self.dtype).to(self.device)
        guided = guidance != "none" and scale > 0
        for k in range(self.diffusion_steps - 1, -1, -1):
            t = torch.full((x.shape[0],), 1 - (k + 1) / self.diffusion_steps, dtype=self.dtype, device=self.device)
            ab, beta = abar[k], betas[k]
            ab_prev = abar[k - 1] if k > 0 else torch.ones((), dtype=self.dtype, device=self.device)
            if guided:
                eps, grad = self._guidance_gradient(x, t, ab, guidance, target, mask, levels)
            else:
                with torch.no_grad():
                    eps = ema(x, t, features)
            eps = eps.detach()
            mean = (x - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
            var = beta * (1 - ab_prev) / (1 - ab)
            if guided:
                # safeguard: windows are standardised, so no step needs to move a value by more than one
                # standard deviation; an untrained or badly scaled model otherwise diverges (1/sqrt(abar) ~ 13)
                mean = mean - (scale * var * grad).clamp(-1.0, 1.0)
            if k > 0:
                mean = mean + var.sqrt() * torch.randn(x.shape, generator=generator, dtype=self.dtype).to(self.device)
            x = mean
        return x

    # ------------------------------------------------------------------ refinement
    def refine(self, context: Any, initial: Any, *, method: str = "lmc", iterations: int = 20, step_size: float = 0.1,
               noise_scale: float = 0.1, regularization: float = 1.0, diffusion_step: int | None = None,
               seed: int | None = None, snapshots: Sequence[int] | None = None) -> np.ndarray:
        """Refine base forecasts ``initial`` ``(S, H)`` of one context with the model as an implicit density.

        ``method="ml"``: gradient descent on the energy; ``"lmc"``: Langevin dynamics with noise
        ``noise_scale`` (module docstring). ``diffusion_step`` is τ (default ``T/5``, the paper's 20 of 100).
        Returns ``(S, H)``; with ``snapshots`` (iteration counts, each <= ``iterations``) a list of the
        ``(S, H)`` forecasts after each of them, from the one run (how :meth:`fit`'s backtest scores the
        refinement strength).
        """
        self._check_fitted()
        if method not in REFINEMENTS:
            raise ValueError(f"method must be one of {', '.join(REFINEMENTS)}, got {method!r}")
        iterations = _check_positive_int("iterations", iterations, 1)
        marks = [] if snapshots is None else [_check_positive_int("snapshots[]", k, 1) for k in snapshots]
        if any(k > iterations for k in marks):
            raise ValueError(f"snapshots must be <= iterations={iterations}, got {list(snapshots or [])}")
        init = np.asarray(initial, dtype=np.float64)
        if init.ndim != 2 or init.shape[1] != self.prediction_length:
            raise ValueError(f"initial must have shape (S, {self.prediction_length}), got {init.shape}")
        if not np.isfinite(init).all():
            raise ValueError("initial forecasts hold non-finite values")
        tau = max(1, self.diffusion_steps // 5) if diffusion_step is None else _check_positive_int("diffusion_step", diffusion_step, 1)
        if tau > self.diffusion_steps:
            raise ValueError(f"diffusion_step must be <= {self.diffusion_steps}, got {tau}")
        values, observed, loc, scale, raw = self._prepare(context, "mask")
        if values.shape[0] != 1:
            raise ValueError("refine takes one context")
        count = init.shape[0]
        target = values.expand(count, -1, -1)
        mask = observed.expand(count, -1, -1)
        # the base forecasts in the modelled representation (differenced, standardised)
        full = np.repeat(raw, count, axis=0)
        full[:, self.context_length:] = self._forward_transform(init, "initial")
        represented = self._represent(full[:, None, :])[:, 0, self.inner_context:]
        y = target.clone()
        y[:, 0, self.inner_context:] = (torch.as_tensor(represented, device=self.device, dtype=self.dtype)
                                        - loc[:, 0, self.inner_context:]) / scale[:, 0]
        generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        ab = self._alpha_bar[tau - 1].to(self.device, self.dtype)
        t = torch.full((count,), 1 - tau / self.diffusion_steps, dtype=self.dtype, device=self.device)
        features = self._features()
        taken: dict = {}

        def back(y: Tensor) -> np.ndarray:
            horizon = (y.detach()[:, 0, self.inner_context:] * scale[:, 0] + loc[:, 0, self.inner_context:]).double().cpu().numpy()
            return self._integrate(raw, horizon[None])[0]

        for i in range(iterations):
            y = y.detach().requires_grad_(True)
            eps = torch.randn(y.shape, generator=generator, dtype=self.dtype).to(self.device)
            pred = self.ema(ab.sqrt() * y + (1 - ab).sqrt() * eps, t, features)
            energy = ((pred - eps) ** 2).sum() + regularization * (((y - target) * mask) ** 2).sum()
            grad, = torch.autograd.grad(energy, y)
            with torch.no_grad():
                y = y - step_size * grad
                if method == "lmc":
                    y = y + math.sqrt(2 * step_size) * noise_scale * torch.randn(y.shape, generator=generator, dtype=self.dtype).to(self.device)
            if i + 1 in marks:
                taken[i + 1] = back(y)
        return [taken[k] for k in marks] if snapshots is not None else back(y)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """The constructor arguments (JSON-serialisable)."""
        return {"context_length": self.context_length, "prediction_length": self.prediction_length,
                "season_length": self.season_length, "lags": list(self.lags), "hidden": self.hidden,
                "blocks": self.blocks, "diffusion_steps": self.diffusion_steps, "beta_end": self.beta_end,
                "train_steps": self.train_steps, "batch_size": self.batch_size, "lr": self.lr,
                "ema_decay": self.ema_decay, "grad_clip": self.grad_clip, "guidance": self.guidance,
                "guidance_scale": self.guidance_scale, "time_features": self.time_features,
                "difference": self.difference, "detrend": self.detrend, "log": self.log, "profile": self.profile, "reflect": self.reflect,
                "spread": self.spread, "base": self.base, "refine_iterations": self.refine_iterations, "max_seconds": self.max_seconds, "seed": self.seed}

    def state_dict(self) -> dict:
        self._check_fitted()
        assert self.ema is not None
        return {k: v.detach().cpu() for k, v in self.ema.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        """Write config and EMA weights to ``path`` (a ``.pt`` file) atomically; returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"kind": f"flowdiff.timeseries.{type(self).__name__}", "config": self.config(), "state": self.state_dict()}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: Any = "cpu") -> "TSDiff":
        """Load a model written by :meth:`save`."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=False)
        kind = f"flowdiff.timeseries.{cls.__name__}"
        if not isinstance(blob, dict) or blob.get("kind") != kind:
            found = blob.get("kind") if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(f"{path} is not a {cls.__name__} checkpoint (found {found!r})")
        model = cls(**blob["config"], device=device)
        model._build()
        assert model.ema is not None and model.net is not None
        model.ema.load_state_dict(blob["state"])
        model.net.load_state_dict(blob["state"])
        return model
