"""Paths that link the base (t = 0) to the data (t = 1): Gaussian paths and stochastic interpolants."""

from __future__ import annotations

from typing import Any

from .gaussian import (
    EDM,
    PREDICTIONS,
    VE,
    VP,
    Cosine,
    Custom,
    Discrete,
    GaussianPath,
    Linear,
    PathCoefficients,
    PathTable,
    Shifted,
    SubVP,
    Trig,
)
from .conversions import (
    RBF,
    Constant,
    DanceGRPO,
    DiffusionCoefficient,
    FlowGRPO,
    ReverseDiffusion,
    TimeChange,
    Window,
    available_diffusions,
    diffusion_coefficient,
    time_change,
)
from .interpolants import GAMMAS, INTERPOLANT_TARGETS, INTERPOLANTS, Gamma, InterpolantSample, StochasticInterpolant

__all__ = [
    "GaussianPath", "PathCoefficients", "PathTable", "VP", "SubVP", "VE", "EDM", "Linear", "Trig", "Cosine", "Discrete",
    "Shifted", "Custom", "PREDICTIONS", "Gamma", "StochasticInterpolant", "InterpolantSample", "GAMMAS",
    "INTERPOLANTS", "INTERPOLANT_TARGETS", "get_path", "available_paths", "path_from_config",
    # conversions (issue 15): marginal-preserving SDE coefficients and path changes
    "DiffusionCoefficient", "FlowGRPO", "DanceGRPO", "RBF", "ReverseDiffusion", "Window", "Constant",
    "diffusion_coefficient", "available_diffusions", "TimeChange", "time_change",
]

_NAMED = {
    "vp": VP,
    "subvp": SubVP,
    "ve": VE,
    "edm": EDM,
    "linear": Linear,
    "trig": Trig,
    "cosine": Cosine,
    "ddpm": Discrete.linear,
}


def available_paths() -> list[str]:
    """Names accepted by :func:`get_path` (and the CLI's ``--path``)."""
    return sorted(_NAMED)


def get_path(name: str, **kwargs: Any) -> GaussianPath:
    """Build a Gaussian path by name, e.g. ``get_path("vp", beta_max=20.0)``."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _NAMED:
        raise ValueError(f"unknown path {name!r}; valid: {', '.join(available_paths())}")
    return _NAMED[key](**kwargs)


def path_from_config(config: dict) -> GaussianPath | StochasticInterpolant:
    """Rebuild a path from the dict written by its ``config()`` method."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    classes = {c.__name__: c for c in (VP, SubVP, VE, EDM, Linear, Trig, Cosine, Discrete, StochasticInterpolant)}
    if name == "Shifted":
        return Shifted(path_from_config(cfg["path"]), cfg["shift"])
    if name == "Discrete":
        return Discrete(cfg["betas"], t_min=cfg["t_min"], t_max=cfg["t_max"])
    if name == "Cosine":
        return Cosine(**cfg)
    if name not in classes:
        raise ValueError(f"unknown path config name {name!r}; valid: {', '.join(sorted(classes) + ['Shifted'])}")
    return classes[name](**cfg)
