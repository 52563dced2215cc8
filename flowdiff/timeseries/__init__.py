"""Time-series forecasting with TSDiff (Kollovieh et al., NeurIPS 2023): windowed data, the denoiser, self-guidance and refinement, CRPS (issue 17)."""
