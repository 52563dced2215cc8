"""3-D trajectories with GeoTDM (Han et al., NeurIPS 2024): N-body simulations, the EGTN denoiser, generation and forecasting, ADE/FDE (issue 17)."""
