"""Time-series forecasting with TSDiff (Kollovieh et al., NeurIPS 2023, "Predict, Refine, Synthesize:
Self-Guiding Diffusion Models for Probabilistic Time Series Forecasting"): windowed data, the denoiser,
observation self-guidance (mean-square and quantile) and refinement (ML and Langevin), CRPS/MASE and
baselines (issue 17). docs/timeseries.md has the measured table.

    model = fd.timeseries.TSDiff(context_length=36, prediction_length=12, season_length=12).fit(series)
    samples = model.forecast(series, num_samples=100)          # (100, 12), self-guided (quantile)
"""

from .baselines import holt_winters, probabilistic_seasonal_naive, seasonal_naive, statsforecast_model
from .conditional import ConditionalTSDiff
from .data import REAL_SERIES, holdout_split, load_series, read_series_csv, synthetic_panel
from .metrics import (QUANTILES, gaussian_crps, mase, mean_weighted_quantile_loss, normalized_crps,
                      quantile_losses, sample_crps)
from .model import TSDiff
from .network import TSDiffNet

__all__ = [
    "TSDiff", "ConditionalTSDiff", "TSDiffNet",
    "seasonal_naive", "probabilistic_seasonal_naive", "holt_winters", "statsforecast_model",
    "REAL_SERIES", "load_series", "synthetic_panel", "read_series_csv", "holdout_split",
    "QUANTILES", "quantile_losses", "mean_weighted_quantile_loss", "sample_crps", "normalized_crps",
    "gaussian_crps", "mase",
]
