"""3-D trajectories with GeoTDM (Han et al., NeurIPS 2024, *Geometric Trajectory Diffusion Models*):
N-body simulations (charged particles, springs), the EGTN denoiser, the learnable geometric prior,
unconditional generation and conditional forecasting, ADE/FDE and baselines (issue 17; docs/trajectories.md).

>>> x = fd.trajectories.simulate_charged(3000, 30, seed=0)            # doctest: +SKIP
>>> model = fd.trajectories.GeoTDM().fit(x, context_frames=10)        # doctest: +SKIP
>>> samples = model.forecast(x_test[:, :10], num_samples=5)           # (B, 5, 20, 5, 3)  # doctest: +SKIP
"""

from .egtn import EGTN, GeometricPrior, SpatialLayer, TemporalLayer, canonical_frame, pair_features
from .metrics import ade_fde, classification_score, constant_velocity, last_frame, marginal_score
from .model import DeterministicEGTN, GeoTDM, TrajectoryDenoiser, check_trajectories
from .simulate import NBody, nbody_energy, simulate_charged, simulate_springs

__all__ = [
    "GeoTDM", "DeterministicEGTN", "TrajectoryDenoiser", "EGTN", "GeometricPrior", "SpatialLayer", "TemporalLayer",
    "canonical_frame", "pair_features", "check_trajectories", "simulate_charged", "simulate_springs", "nbody_energy", "NBody",
    "ade_fde", "constant_velocity", "last_frame", "marginal_score", "classification_score",
]
