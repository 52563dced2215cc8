r"""N-body simulators: charged particles and springs, as in the NRI/EGNN/GeoTDM setups.

Charged particles (Kipf et al. 2018, *Neural Relational Inference for Interacting Systems*; Satorras et
al. 2021, *E(n) Equivariant Graph Neural Networks*; Han et al. 2024, *Geometric Trajectory Diffusion
Models*): ``particles`` bodies in 3-D with charges :math:`q_i = \pm 1` (probability ½ each), initial
positions :math:`x_i \sim N(0, \mathrm{loc\_std}^2 I)`, initial velocities of norm ``vel_norm`` in a
uniformly random direction, and the Coulomb-like force

.. math:: F_i = \sum_{j \ne i} q_i q_j \frac{x_i - x_j}{\lVert x_i - x_j \rVert^3},

each component clipped to :math:`\pm` ``max_force`` (100, NRI's :math:`0.1/\Delta t`), so like charges repel.
Potential energy :math:`U = \sum_{i<j} q_i q_j / r_{ij}` (exact below the clip).

Springs (Kipf et al. 2018): each pair is joined with probability ½ by a spring of constant
``k`` (0.1), :math:`F_i = -k \sum_j A_{ij} (x_i - x_j)`, :math:`U = \tfrac k2 \sum_{i<j} A_{ij}
r_{ij}^2`, initial positions :math:`N(0, 0.5^2 I)`, no walls (NRI's box of size 5 is left out, as in
the 3-D EGNN variant).

Both are integrated with velocity Verlet (leapfrog; NRI uses the symplectic Euler variant of the same
order of stability) at :math:`\Delta t = 10^{-3}` and recorded every ``sample_every`` = 100 steps, so one
frame is 0.1 time units; frame 0 is the initial state. Unit masses: total momentum is conserved exactly
(up to round-off) except in steps where the force clip acts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._utils import check_float, check_int

__all__ = ["NBody", "simulate_charged", "simulate_springs", "nbody_energy"]


class NBody(NamedTuple):
    """A simulated batch: ``positions``/``velocities`` of shape ``(n, frames, particles, 3)``, the
    ``interaction`` matrix ``(n, particles, particles)`` (:math:`q_i q_j` for charges, :math:`A_{ij}`
    for springs; zero diagonal), ``charges`` ``(n, particles)`` (charged only, else ``None``) and
    ``clipped``: ``(n,)`` whether the force clip acted in the trajectory."""

    positions: np.ndarray
    velocities: np.ndarray
    interaction: np.ndarray
    charges: np.ndarray | None
    clipped: np.ndarray


def _rng(seed: int | None, generator: np.random.Generator | None) -> np.random.Generator:
    if generator is not None and seed is not None:
        raise ValueError("give either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, np.random.Generator):
            raise TypeError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
        return generator
    if seed is not None:
        seed = check_int("seed", seed, 0)
    return np.random.default_rng(seed)


def _forces(x: np.ndarray, interaction: np.ndarray, kind: str, k: float, max_force: float) -> tuple[np.ndarray, np.ndarray]:
    """Forces ``(n, P, 3)`` and, per trajectory, whether a component was clipped."""
    diff = x[:, :, None, :] - x[:, None, :, :]  # x_i - x_j
    if kind == "springs":
        return -k * np.einsum("nij,nijd->nid", interaction, diff), np.zeros(x.shape[0], dtype=bool)
    r2 = (diff ** 2).sum(-1)
    p = x.shape[1]
    r2[:, np.arange(p), np.arange(p)] = 1.0
    f = np.einsum("nij,nijd->nid", interaction / r2 ** 1.5, diff)
    clipped = (np.abs(f) > max_force).any(axis=(1, 2))
    return np.clip(f, -max_force, max_force), clipped


def _simulate(kind: str, n: int, frames: int, particles: int, seed, generator, dt: float, sample_every: int,
              loc_std: float, vel_norm: float, k: float, max_force: float, return_all: bool):
    n = check_int("n", n, 1)
    frames = check_int("frames", frames, 1)
    particles = check_int("particles", particles, 2)
    sample_every = check_int("sample_every", sample_every, 1)
    dt = check_float("dt", dt, 0.0, low_open=True)
    loc_std = check_float("loc_std", loc_std, 0.0, low_open=True)
    vel_norm = check_float("vel_norm", vel_norm, 0.0)
    rng = _rng(seed, generator)
    x = rng.standard_normal((n, particles, 3)) * loc_std
    v = rng.standard_normal((n, particles, 3))
    v *= vel_norm / np.linalg.norm(v, axis=-1, keepdims=True)
    charges = None
    if kind == "charged":
        charges = rng.choice(np.array([-1.0, 1.0]), size=(n, particles))
        interaction = charges[:, :, None] * charges[:, None, :]
    else:
        upper = np.triu(rng.random((n, particles, particles)) < 0.5, 1).astype(np.float64)
        interaction = upper + upper.transpose(0, 2, 1)
    interaction[:, np.arange(particles), np.arange(particles)] = 0.0
    pos = np.empty((n, frames, particles, 3))
    vel = np.empty((n, frames, particles, 3))
    pos[:, 0], vel[:, 0] = x, v
    f, clipped = _forces(x, interaction, kind, k, max_force)
    for frame in range(1, frames):
        for _ in range(sample_every):  # velocity Verlet
            v = v + 0.5 * dt * f
            x = x + dt * v
            f, c = _forces(x, interaction, kind, k, max_force)
            clipped |= c
            v = v + 0.5 * dt * f
        pos[:, frame], vel[:, frame] = x, v
    if not np.isfinite(pos).all():
        raise FloatingPointError(f"the {kind} simulation produced non-finite positions; reduce dt={dt}")
    if return_all:
        return NBody(pos, vel, interaction, charges, clipped)
    return pos


def simulate_charged(n: int, frames: int = 30, particles: int = 5, *, seed: int | None = None,
                     generator: np.random.Generator | None = None, dt: float = 1e-3, sample_every: int = 100,
                     loc_std: float = 1.0, vel_norm: float = 0.5, max_force: float = 100.0,
                     return_all: bool = False) -> np.ndarray | NBody:
    """Charged-particle trajectories (module docstring; the GeoTDM/EGNN "charged" setup).

    Arguments:
        n: number of independent systems.
        frames: recorded frames (GeoTDM: 30, condition on 10 and forecast 20).
        particles: bodies per system (5).
        seed / generator: the random initial state (a seed or a ``numpy.random.Generator``).
        dt, sample_every: integration step and steps per recorded frame.
        loc_std, vel_norm, max_force: initial position scale, initial speed, force clip per component.
        return_all: return an :class:`NBody` (velocities, charges, ...) instead of the positions.

    Returns:
        positions ``(n, frames, particles, 3)`` float64, or an :class:`NBody`.
    """
    max_force = check_float("max_force", max_force, 0.0, low_open=True)
    return _simulate("charged", n, frames, particles, seed, generator, dt, sample_every, loc_std, vel_norm,
                     0.0, max_force, return_all)


def simulate_springs(n: int, frames: int = 30, particles: int = 5, *, seed: int | None = None,
                     generator: np.random.Generator | None = None, dt: float = 1e-3, sample_every: int = 100,
                     loc_std: float = 0.5, vel_norm: float = 0.5, k: float = 0.1,
                     return_all: bool = False) -> np.ndarray | NBody:
    """Spring-system trajectories (module docstring; NRI's "springs" in 3-D without walls).

    Same arguments as :func:`simulate_charged`; ``k`` is the spring constant.
    """
    k = check_float("k", k, 0.0)
    return _simulate("springs", n, frames, particles, seed, generator, dt, sample_every, loc_std, vel_norm,
                     k, np.inf, return_all)


def nbody_energy(sim: NBody, k: float = 0.1) -> np.ndarray:
    """Total energy ``(n, frames)`` (kinetic + potential, unit masses) of an :class:`NBody`;
    springs when ``sim.charges`` is ``None`` (constant ``k``), else the charged potential."""
    x, v, a = sim.positions, sim.velocities, sim.interaction
    kinetic = 0.5 * (v ** 2).sum(axis=(-1, -2))
    r2 = ((x[:, :, :, None, :] - x[:, :, None, :, :]) ** 2).sum(-1)
    iu = np.triu_indices(x.shape[2], 1)
    pair = a[:, None][..., iu[0], iu[1]]
    r2 = r2[..., iu[0], iu[1]]
    potential = (pair / np.sqrt(r2)).sum(-1) if sim.charges is not None else 0.5 * k * (pair * r2).sum(-1)
    return kinetic + potential
