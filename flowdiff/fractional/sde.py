r"""SDEs driven by MA-fBM, their variational posterior, the ELBO and the fit of a learnable Hurst index.

Daems, Opper, Crevecoeur, Birdal (ICLR 2024), "Variational Inference for SDEs Driven by Fractional Noise".

**Prior.** In the augmented state :math:`Z = (X, Y_1, \dots, Y_K)` (per latent dimension, each with its own
Brownian motion :math:`W`)

.. math::
    dY_k = -\gamma_k Y_k\,dt + dW,\qquad
    dX = b(X, t)\,dt + \sigma\,d\hat B^H = b(X, t)\,dt + \sigma \sum_k \omega_k\,dY_k ,

with :math:`b(x, t) = -\theta(x - \mu) + f(x, t)` (fractional OU plus an optional network :math:`f`) and the
optimal MA-fBM weights :math:`\omega(H)` (:class:`~flowdiff.fractional.markov.MAfBM`).

**Posterior.** The same structure with a control on the shared noise, :math:`dW \to u_\phi(Z, t)dt + dW`. By
Girsanov, :math:`\mathrm{KL}(Q\|P) = E_Q \tfrac12\int_0^T \|u_\phi\|^2 dt` (plus the KL of the initial Y(0)
for type I) and

.. math:: \mathrm{ELBO} = E_Q\Big[\sum_i \log p(o_i \mid X_{t_i})\Big] - \mathrm{KL}(Q\|P) \le \log p(o).

**Discretisation (ours).** The control is held constant over a step of length h, and the OU vector is moved
with its *exact* Gaussian transition (:func:`~flowdiff.fractional.markov.ou_step_matrices`), so there is no
stability limit :math:`\gamma_{\max} h < 1/2` and the KL :math:`\tfrac12\sum_n \|u_n\|^2 h` is exact for the
piecewise-constant control; X takes an Euler step in its drift and the exact increment :math:`\sigma\omega\cdot\Delta Y`
of the noise (exact when b = 0). The paper integrates everything with Euler/Stratonovich–Milstein.

**Guided control (ours, for linear drifts).** For :math:`b = -\theta(x - \mu)` the discretised prior is linear
Gaussian and the negative ELBO is a discrete LQ cost, :math:`E[\sum_n \tfrac12 h_n u_n^2 + \sum_i (X(t_i) - o_i)^2/2s^2]`;
its minimiser over piecewise-constant feedback controls comes from a backward Riccati recursion (the
discrete-time counterpart of the h-transform :math:`u^* = G^\top\nabla\log h`, in the spirit of the guided
proposals of Schauer, van der Meulen, van Zanten 2017, "Guided proposals for simulating multi-dimensional
diffusion bridges"). ``VariationalPosterior(guide=True)`` adds this control to the network's (whose last layer then
starts at zero) and draws Y(0) from the matching Gaussian. A piecewise-constant control cannot steer the noise
inside a step, so the ELBO stays O(step · noise rate / s²) below log p(o) per observation, more for rough paths;
``refine`` grades the grid towards the observations to remove most of that (needed for an unbiased Hurst fit).
:func:`log_likelihood` gives the exact marginal likelihood of the same discretised linear model (Kalman filter).

**Estimator.** The ELBO estimate is the mean log importance weight :math:`\log p(o|X) - \sum_n(\tfrac12 u_n^2 h_n + u_n\Delta W_n)`
(the zero-mean term :math:`u\Delta W` uses the Brownian increment sampled jointly with the OU transition); its
variance vanishes at the optimal control.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .._utils import check_float, check_int
from .markov import KINDS, MAfBM, _psd_sqrt, check_hurst, geometric_speeds, ou_step_matrices

__all__ = [
    "FractionalSDE", "VariationalPosterior", "ControlNet", "ELBOResult", "FitResult", "elbo", "fit",
    "log_likelihood", "gp_posterior", "fit_hurst", "HurstFit", "HURST_METHODS",
]


class FractionalSDE(nn.Module):
    """Prior SDE :math:`dX = [-\\theta(X - \\mu) + f(X, t)]dt + \\sigma\\,d\\hat B^H`, X(0) = x0, in ``dim`` independent
    dimensions sharing one Hurst index.

    Arguments:
        hurst: initial Hurst index in (0, 1).
        dim: latent dimension D.
        num_processes: K >= 1 OU processes; ``gamma_max``/``gamma_min``: their speed grid; ``kind``: "I" or "II";
            ``horizon``: the interval over which the weights are optimal (see :class:`MAfBM`).
        theta, mean, sigma, x0: scalars or (D,) values of the linear drift, the noise scale and the start.
        drift: optional extra drift f(x, t) -> (..., D) (an ``nn.Module`` is trained with the rest); the
            guided control and :func:`log_likelihood` need it to be absent (linear prior).
        learn_hurst, learn_sigma, learn_theta, learn_mean: which parameters are trainable. The Hurst index is
            :math:`\\mathrm{sigmoid}(\\rho)` of a raw parameter ρ, σ is :math:`e^{s}`.
    """

    def __init__(
        self,
        hurst: float = 0.5,
        *,
        dim: int = 1,
        num_processes: int = 5,
        gamma_max: float = 20.0,
        gamma_min: float | None = None,
        kind: str = "I",
        horizon: float = 6.0,
        theta: float | Tensor = 0.0,
        mean: float | Tensor = 0.0,
        sigma: float | Tensor = 1.0,
        x0: float | Tensor = 0.0,
        drift: Callable[[Tensor, Tensor], Tensor] | None = None,
        learn_hurst: bool = False,
        learn_sigma: bool = False,
        learn_theta: bool = False,
        learn_mean: bool = False,
    ) -> None:
        super().__init__()
        hurst = float(check_hurst(hurst))
        self.dim = check_int("dim", dim, low=1)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")
        self.kind = kind
        self.horizon = check_float("horizon", horizon, 0.0, low_open=True)
        self.register_buffer("speeds", geometric_speeds(num_processes, gamma_max, gamma_min))
        self.num_processes = int(self.speeds.numel())
        raw = torch.tensor(math.log(hurst / (1 - hurst)), dtype=torch.float64)
        self._set("raw_hurst", raw, learn_hurst)
        sig = self._vector("sigma", sigma)
        if (sig <= 0).any():
            raise ValueError(f"sigma must be positive, got sigma={sig.tolist()}")
        self._set("log_sigma", sig.log(), learn_sigma)
        self._set("theta", self._vector("theta", theta), learn_theta)
        self._set("mean", self._vector("mean", mean), learn_mean)
        self.register_buffer("x0", self._vector("x0", x0))
        if drift is not None and not callable(drift):
            raise TypeError(f"drift must be callable f(x, t) -> (..., D), got {type(drift).__name__}")
        self.drift = drift

    def _vector(self, name: str, value: float | Tensor) -> Tensor:
        v = torch.as_tensor(value, dtype=torch.float64).detach().clone().reshape(-1)
        if v.numel() == 1:
            v = v.expand(self.dim).clone()
        if v.numel() != self.dim or not torch.isfinite(v).all():
            raise ValueError(f"{name} must be a finite scalar or a vector of length dim={self.dim}, got {value!r}")
        return v

    def _set(self, name: str, value: Tensor, learn: bool) -> None:
        if learn:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    @property
    def hurst(self) -> Tensor:
        """The Hurst index, a 0-d tensor (differentiable when learnt)."""
        return torch.sigmoid(self.raw_hurst)

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    @property
    def is_linear(self) -> bool:
        return self.drift is None

    def fbm(self) -> MAfBM:
        """The MA-fBM of the current Hurst index (weights differentiable in it)."""
        return MAfBM(self.hurst, kind=self.kind, horizon=self.horizon, speeds=self.speeds.cpu())

    def drift_value(self, x: Tensor, t: float) -> Tensor:
        theta, mean = self.theta.to(x), self.mean.to(x)
        out = -theta * (x - mean)
        if self.drift is not None:
            tt = torch.full(x.shape[:-1], t, dtype=x.dtype, device=x.device)
            out = out + self.drift(x, tt)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, K={self.num_processes}, kind={self.kind!r}, hurst={float(self.hurst):.4g}"


class ControlNet(nn.Module):
    """The control :math:`u_\\phi(t, x, y)`: a tanh MLP on (sin t, cos t, x, y) (the paper's inputs), output (..., D).

    ``zero_init`` starts the output layer at zero (u = 0: the posterior starts at the prior, or at the guide).
    """

    def __init__(self, dim: int, num_processes: int, hidden: int = 64, depth: int = 2, zero_init: bool = False) -> None:
        super().__init__()
        dim = check_int("dim", dim, low=1)
        hidden = check_int("hidden", hidden, low=1)
        depth = check_int("depth", depth, low=1)
        layers: list[nn.Module] = []
        width = 2 + dim + dim * num_processes
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        out = nn.Linear(width, dim)
        if zero_init:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """t (...,), x (..., D), y (..., D, K) -> u (..., D)."""
        feats = torch.cat([torch.sin(t)[..., None], torch.cos(t)[..., None], x, y.flatten(-2)], dim=-1)
        return self.net(feats)


class VariationalPosterior(nn.Module):
    """Posterior SDE: the prior with :math:`dW \\to u\\,dt + dW`, u = network (+ the guided control).

    Arguments:
        sde: the prior :class:`FractionalSDE`.
        control: ``"mlp"`` (a :class:`ControlNet`), any module ``u(t, x, y)`` with the shapes of
            :meth:`ControlNet.forward`, or None (no network: u = guide, or u = 0 without a guide).
        hidden, depth: sizes of the default network.
        guide: add the exact backward-filter control of the linear prior (needs ``sde.is_linear``).
        initial: the law of the whitened Y(0) (type I only): ``"learned"`` (a Gaussian N(m, LLᵀ) in the
            coordinates where the prior is N(0, I), shared across observed paths), ``"prior"``, or ``"guided"``
            (the ELBO-optimal Gaussian given the observations; the default with ``guide=True``).
    """

    def __init__(
        self,
        sde: FractionalSDE,
        *,
        control: str | nn.Module | None = "mlp",
        hidden: int = 64,
        depth: int = 2,
        guide: bool = False,
        initial: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(sde, FractionalSDE):
            raise TypeError(f"sde must be a FractionalSDE, got {type(sde).__name__}")
        if guide and not sde.is_linear:
            raise ValueError("guide=True needs a linear prior drift (FractionalSDE without drift=)")
        self.guide = bool(guide)
        if control == "mlp":
            control = ControlNet(sde.dim, sde.num_processes, hidden, depth, zero_init=guide)
        elif control is not None and not isinstance(control, nn.Module):
            raise TypeError(f"control must be 'mlp', an nn.Module u(t, x, y) or None, got {control!r}")
        self.control = control
        initial = initial or ("guided" if guide else "learned")
        if initial not in ("learned", "prior", "guided"):
            raise ValueError(f"initial must be 'learned', 'prior' or 'guided', got initial={initial!r}")
        if initial == "guided" and not guide:
            raise ValueError("initial='guided' needs guide=True")
        self.initial = initial
        K, D = sde.num_processes, sde.dim
        if initial == "learned" and sde.kind == "I":
            self.initial_mean = nn.Parameter(torch.zeros(D, K, dtype=torch.float64))
            self.initial_tril = nn.Parameter(torch.zeros(D, K, K, dtype=torch.float64))  # strictly lower part
            self.initial_log_diag = nn.Parameter(torch.zeros(D, K, dtype=torch.float64))


@dataclass
class ELBOResult:
    """ELBO of each observed path (P,), averaged over the posterior samples, with its parts.

    ``elbo = log_likelihood - kl - kl_initial`` plus the zero-mean control variate -Σ u ΔW (the estimate is the mean
    log importance weight of the paths, whose variance vanishes at the optimal control); ``times`` is the simulation grid; ``paths`` (S, P, n + 1, D)
    the posterior samples of X on it when asked for.
    """

    elbo: Tensor
    log_likelihood: Tensor
    kl: Tensor
    kl_initial: Tensor
    times: Tensor
    paths: Tensor | None = None


@dataclass
class FitResult:
    """History of a :func:`fit`: the mean ELBO per observation and the Hurst index after each step."""

    elbo: list[float] = field(default_factory=list)
    hurst: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# helpers


def _prepare(sde: FractionalSDE, times, observations, obs_std, dt, t_end, refine):
    if not isinstance(observations, Tensor):
        raise TypeError(f"observations must be a torch.Tensor, got {type(observations).__name__}")
    if not observations.is_floating_point():
        raise TypeError(f"observations must be floating point, got dtype {observations.dtype}")
    obs = observations
    if obs.ndim == 1 and sde.dim == 1:
        obs = obs[:, None]
    if obs.ndim == 2:
        obs = obs[None]
    if obs.ndim != 3 or obs.shape[-1] != sde.dim:
        raise ValueError(
            f"observations must have shape (N, D) or (P, N, D) with D = sde.dim = {sde.dim}, got {tuple(observations.shape)}"
        )
    if not torch.isfinite(obs).all():
        raise ValueError("observations contain non-finite values")
    dtype, device = obs.dtype, obs.device
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1).cpu()
    if times.numel() != obs.shape[1]:
        raise ValueError(f"times has {times.numel()} entries but observations have N = {obs.shape[1]}")
    if not torch.isfinite(times).all() or (times < 0).any() or (times.diff() <= 0).any():
        raise ValueError(f"times must be finite, non-negative and strictly increasing, got {times[:5].tolist()}...")
    dt = check_float("dt", dt, 0.0, low_open=True)
    refine = check_float("refine", refine, 0.0, 1.0)
    last = float(times.max())
    t_end = last if t_end is None else check_float("t_end", t_end, last)
    if t_end <= 0:
        raise ValueError("t_end (default: the last observation time) must be positive")
    std = torch.as_tensor(obs_std, dtype=torch.float64).reshape(-1)
    if std.numel() == 1:
        std = std.expand(sde.dim)
    if std.numel() != sde.dim or not torch.isfinite(std).all() or (std <= 0).any():
        raise ValueError(f"obs_std must be positive (a scalar or one per dimension D={sde.dim}), got {obs_std!r}")
    # The grid: uniform steps of at most dt between consecutive observation times, graded towards each
    # observation when refine > 0 (a piecewise-constant control cannot steer the noise inside a step, and the
    # optimal control varies on the scale tau + tau*, tau the time to the observation, tau* the lag over which
    # the noise of X reaches the observation std): steps of refine * (tau + tau*), capped at dt.
    floor = _noise_scale(sde, float(std.min())) if refine > 0 else 0.0
    steps: list[float] = []
    obs_at: dict[int, int] = {}
    anchors = times.tolist()
    if anchors[0] == 0.0:
        obs_at[0] = 0
    prev = 0.0
    for j, b in list(enumerate(anchors)) + [(None, t_end)]:
        if b <= prev:
            continue
        if j is not None and refine > 0:
            piece, tau = [], 0.0
            while tau < b - prev - 1e-12:
                step = min(dt, refine * (tau + floor), b - prev - tau)
                if b - prev - tau - step < 0.25 * step:  # no sliver at the start of the interval
                    step = b - prev - tau
                piece.append(step)
                tau += step
            piece.reverse()
        else:
            n = max(1, math.ceil((b - prev) / dt - 1e-9))
            piece = [(b - prev) / n] * n
        steps += piece
        if j is not None:
            obs_at[len(steps)] = j
        prev = b
    return obs, dtype, device, steps, obs_at, std.to(dtype=dtype, device=device)


def _noise_scale(sde: FractionalSDE, obs_std: float) -> float:
    """The lag tau* at which the increment of X = σ B̂^H has the observation variance: σ² Var B̂(tau*) = obs_std²."""
    with torch.no_grad():
        lags = torch.logspace(-9, math.log10(sde.horizon), 120, dtype=torch.float64)
        fbm = MAfBM(float(sde.hurst), kind=sde.kind, horizon=sde.horizon, speeds=sde.speeds.cpu())
        var = torch.diagonal(fbm.covariance(lags)) * float(sde.sigma.max()) ** 2
    above = (var >= obs_std**2).nonzero()
    return float(lags[above[0, 0]]) if len(above) else sde.horizon


class _Linear:
    """Matrices of the discretised linear prior per dimension: z' = A z + a0 + B u + L ξ, ξ ~ N(0, Q(h)), per step h."""

    def __init__(self, sde: FractionalSDE, dtype: torch.dtype, device) -> None:
        self.sde = sde
        self.K, self.D = sde.num_processes, sde.dim
        self.dtype, self.device = dtype, device
        self.omega = sde.fbm().weights.to(dtype=dtype, device=device)
        self.sigma = sde.sigma.to(dtype=dtype, device=device)
        self.theta = sde.theta.to(dtype=dtype, device=device)
        self.mean = sde.mean.to(dtype=dtype, device=device)
        self.so = self.sigma[:, None] * self.omega  # (D, K)
        c = _psd_sqrt(MAfBM(0.5, kind=sde.kind, speeds=sde.speeds.cpu()).initial_covariance())
        self.c_sqrt = c.to(dtype=dtype, device=device)  # prior Y(0) = c_sqrt @ eps
        self._ou: dict[float, tuple[Tensor, Tensor, Tensor]] = {}
        self._mat: dict[float, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def ou(self, h: float):
        if h not in self._ou:
            self._ou[h] = tuple(
                m.to(dtype=self.dtype, device=self.device)
                for m in ou_step_matrices(self.sde.speeds.cpu(), h, with_increment=True)
            )
        return self._ou[h]

    def matrices(self, h: float):
        if h in self._mat:
            return self._mat[h]
        K, D, so = self.K, self.D, self.so
        decay, gain, q_sqrt = self.ou(h)
        q_sqrt = q_sqrt[:K]  # rows of ξ in the joint (ξ, ΔW) square root
        A = torch.zeros(D, K + 1, K + 1, dtype=so.dtype, device=so.device)
        A[:, 0, 0] = 1 - h * self.theta
        A[:, 0, 1:] = so * (decay - 1)
        A[:, 1:, 1:] = torch.diag(decay)
        a0 = torch.zeros(D, K + 1, dtype=so.dtype, device=so.device)
        a0[:, 0] = h * self.theta * self.mean
        B = torch.cat([(so * gain).sum(-1, keepdim=True), gain.expand(D, K)], dim=-1)  # (D, K+1)
        L = torch.cat([so[:, None, :], torch.eye(K, dtype=so.dtype, device=so.device).expand(D, K, K)], dim=1)
        Lq = L @ q_sqrt
        self._mat[h] = (A, a0, B, Lq @ Lq.transpose(-1, -2))
        return self._mat[h]


def _riccati(lin: _Linear, steps: list[float], obs_at: dict[int, int], obs: Tensor, std: Tensor):
    """Backward Riccati recursion of the discrete LQ problem whose value is the negative best ELBO.

    For the discretised linear prior, maximising the ELBO over piecewise-constant controls is the LQ problem
    min E[Σ_n ½ h_n u_n² + Σ_i (x(t_i) - o_i)²/(2 s²)] with z' = A z + a0 + B u + noise. With the value
    V_n(z) = ½ zᵀ S_n z - s_nᵀ z + const, the optimal control of step n is
    u_n = -Bᵀ(S (A z + a0) - s)/(h_n + Bᵀ S B) with (S, s) = (S_{n+1}, s_{n+1}).
    Returns per step (feedback F_n (D, Dz), offset c_n (P, D)) with u_n = c_n - F_n (A z + a0), and (S_0, s_0).
    """
    D, Dz = lin.D, lin.K + 1
    P = obs.shape[0]
    dtype, device = lin.dtype, lin.device
    e = torch.zeros(Dz, dtype=dtype, device=device)
    e[0] = 1
    S = torch.zeros(D, Dz, Dz, dtype=dtype, device=device)
    s = torch.zeros(P, D, Dz, dtype=dtype, device=device)
    prec = 1.0 / std**2  # (D,)
    feedback: list[Tensor] = [None] * len(steps)  # type: ignore[list-item]
    offset: list[Tensor] = [None] * len(steps)  # type: ignore[list-item]
    for n in range(len(steps), 0, -1):
        if n in obs_at:
            S = S + prec[:, None, None] * torch.outer(e, e)
            s = s + (prec * obs[:, obs_at[n], :])[..., None] * e
        A, a0, B, _ = lin.matrices(steps[n - 1])
        SB = (S @ B[..., None])[..., 0]  # (D, Dz)
        c = steps[n - 1] + (B * SB).sum(-1)  # (D,)
        F = SB / c[:, None]
        Bs = (B * s).sum(-1)  # (P, D)
        feedback[n - 1], offset[n - 1] = F, Bs / c
        S_t = S - SB[:, :, None] * SB[:, None, :] / c[:, None, None]
        s_t = s - SB * (Bs / c)[..., None]
        s = (((s_t - (S_t @ a0[..., None])[..., 0])[..., None, :]) @ A)[..., 0, :]
        S = A.transpose(-1, -2) @ S_t @ A
        S = 0.5 * (S + S.transpose(-1, -2))
    if 0 in obs_at:
        S = S + prec[:, None, None] * torch.outer(e, e)
        s = s + (prec * obs[:, obs_at[0], :])[..., None] * e
    return feedback, offset, S, s


def _gaussian_kl_whitened(mean: Tensor, chol: Tensor) -> Tensor:
    """KL(N(m, LLᵀ) || N(0, I)) over the last dimension(s): mean (..., K), chol (..., K, K)."""
    K = mean.shape[-1]
    tr = (chol**2).sum((-1, -2))
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1).abs()).sum(-1)
    return 0.5 * (tr + (mean**2).sum(-1) - K - logdet)


def elbo(
    sde: FractionalSDE,
    posterior: VariationalPosterior,
    times: Tensor,
    observations: Tensor,
    obs_std: float | Tensor,
    *,
    num_samples: int = 16,
    dt: float = 0.01,
    refine: float = 0.0,
    t_end: float | None = None,
    return_paths: bool = False,
    generator: torch.Generator | None = None,
) -> ELBOResult:
    """Monte-Carlo ELBO of observations ``o_i ~ N(X(t_i), obs_std²)`` under ``sde``, one value per observed path.

    Arguments:
        times: observation times (N,), increasing, >= 0 (any values: the grid is built through them).
        observations: (N, D) for one path or (P, N, D) for P independent paths of the same prior.
        obs_std: observation noise std (> 0), scalar or (D,).
        num_samples: posterior samples S per observed path.
        dt: the largest simulation step. ``refine`` > 0 grades the grid towards each observation: steps of
            ``refine * (tau + tau*)`` (tau the time left to the observation, tau* the lag over which X = σB̂
            varies by obs_std), capped at dt. A piecewise-constant control cannot steer the noise inside a step,
            so with a uniform grid the ELBO loses O(dt·v/obs_std²) per observation, more for rough paths
            (small H), which biases a fitted Hurst index upwards; refine = 0.05-0.2 removes most of it
            (docs/fractional.md).
        t_end: end of the simulation (default: the last observation time).
    Returns an :class:`ELBOResult` (differentiable in the parameters of ``sde`` and ``posterior``), in the
    observations' dtype and device.
    """
    num_samples = check_int("num_samples", num_samples, low=1)
    obs, dtype, device, steps, obs_at, std = _prepare(sde, times, observations, obs_std, dt, t_end, refine)
    P, D, K, S = obs.shape[0], sde.dim, sde.num_processes, num_samples
    lin = _Linear(sde, dtype, device)
    if posterior.guide:
        # The guide is held fixed in the gradient (no backpropagation through the Riccati recursion): it is the
        # ELBO-optimal piecewise-constant control, so by the envelope theorem the partial derivative in the
        # prior's parameters is the derivative of the optimised ELBO (and the guide costs no backward pass).
        with torch.no_grad():
            guide_lin = _Linear(sde, dtype, device)
            feedback, offset, S0, s0 = _riccati(guide_lin, steps, obs_at, obs.detach(), std.detach())

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, generator=generator)

    x0 = sde.x0.to(dtype=dtype, device=device).expand(P, D)
    x = x0.expand(S, P, D)
    kl_init = torch.zeros(P, dtype=dtype, device=device)
    if sde.kind == "II":
        y = torch.zeros(S, P, D, K, dtype=dtype, device=device)
    else:
        if posterior.initial == "prior":
            eps = randn(S, P, D, K)
        elif posterior.initial == "learned":
            if not hasattr(posterior, "initial_mean"):
                raise ValueError("posterior was built for a type-II sde (no initial distribution); rebuild it for this sde")
            chol = torch.tril(posterior.initial_tril.to(dtype), -1) + torch.diag_embed(posterior.initial_log_diag.to(dtype).exp())
            m = posterior.initial_mean.to(dtype)
            eps = m + (chol @ randn(S, P, D, K, 1))[..., 0]
            kl_init = _gaussian_kl_whitened(m, chol).sum(-1).expand(P)
        else:  # guided: the ELBO-optimal Gaussian for the whitened Y(0) given X(0) = x0 (exp(-V_0) times the prior)
            W = guide_lin.c_sqrt
            syy, syx = S0[:, 1:, 1:], S0[:, 1:, 0]  # (D, K, K), (D, K)
            prec = torch.eye(K, dtype=dtype, device=device) + W @ syy @ W
            cov = torch.linalg.inv(prec)
            chol = torch.linalg.cholesky(0.5 * (cov + cov.transpose(-1, -2)))
            lin_term = s0[..., 1:] - syx * x0[..., None]  # (P, D, K)
            m = ((cov @ W) @ lin_term[..., None])[..., 0]
            eps = m + (chol @ randn(S, P, D, K, 1))[..., 0]
            kl_init = _gaussian_kl_whitened(m, chol.expand(P, D, K, K)).sum(-1)
        y = eps @ lin.c_sqrt  # c_sqrt is symmetric
    loglik = torch.zeros(S, P, dtype=dtype, device=device)
    kl = torch.zeros(S, P, dtype=dtype, device=device)
    martingale = torch.zeros(S, P, dtype=dtype, device=device)
    const = -0.5 * math.log(2 * math.pi) - torch.log(std)

    def observe(j, xv):
        return (const - 0.5 * ((obs[:, j, :] - xv) / std) ** 2).sum(-1)

    if 0 in obs_at:
        loglik = loglik + observe(obs_at[0], x)
    paths = [x] if return_paths else None
    t = 0.0
    grid = [0.0]
    for n, h in enumerate(steps):
        u = torch.zeros(S, P, D, dtype=dtype, device=device)
        if posterior.guide:
            A, a0, _, _ = guide_lin.matrices(h)
            z = torch.cat([x[..., None], y], dim=-1)
            pred = (A @ z[..., None])[..., 0] + a0
            u = u + offset[n] - (feedback[n] * pred).sum(-1)
        if posterior.control is not None:
            cdt = next((q.dtype for q in posterior.control.parameters()), dtype)  # the network keeps its own dtype
            tt = torch.full((S, P), t, dtype=cdt, device=device)
            u = u + posterior.control(tt, x.to(cdt), y.to(cdt)).to(dtype)
        decay, gain, joint_sqrt = lin.ou(h)
        noise = randn(S, P, D, K + 1) @ joint_sqrt  # (ξ, ΔW) jointly
        y_new = decay * y + gain * u[..., None] + noise[..., :K]
        x = x + h * sde.drift_value(x, t) + (lin.so * (y_new - y)).sum(-1)
        y = y_new
        kl = kl + 0.5 * h * (u**2).sum(-1)
        martingale = martingale + (u * noise[..., K]).sum(-1)
        t = t + h
        grid.append(t)
        if n + 1 in obs_at:
            loglik = loglik + observe(obs_at[n + 1], x)
        if return_paths:
            paths.append(x)
    if not (torch.isfinite(loglik).all() and torch.isfinite(kl).all()):
        raise FloatingPointError(
            f"non-finite ELBO terms (hurst={float(sde.hurst):.4g}, sigma={sde.sigma.tolist()}): "
            "lower the learning rate or the step dt"
        )
    ll, kv = loglik.mean(0), kl.mean(0)
    # log dP/dQ of the path = -Σ(½u²h + u ΔW): its mean is -KL, and the zero-mean term u ΔW cancels most of the
    # Monte-Carlo noise of log p(o | X) near the optimal control (the log importance weight is then constant).
    return ELBOResult(
        elbo=ll - kv - martingale.mean(0) - kl_init, log_likelihood=ll, kl=kv, kl_initial=kl_init,
        times=torch.tensor(grid, dtype=dtype, device=device),
        paths=torch.stack(paths, dim=2) if return_paths else None,
    )


def log_likelihood(
    sde: FractionalSDE,
    times: Tensor,
    observations: Tensor,
    obs_std: float | Tensor,
    *,
    dt: float = 0.01,
    refine: float = 0.0,
    t_end: float | None = None,
) -> Tensor:
    """Exact log marginal likelihood (P,) of the observations under the *discretised* linear prior (the model that
    :func:`elbo` simulates), by a Kalman filter on the augmented state; differentiable in the prior's parameters.

    Every ELBO of the same data and step is a lower bound of it (up to Monte-Carlo error).
    """
    if not sde.is_linear:
        raise ValueError("log_likelihood needs a linear prior drift (FractionalSDE without drift=)")
    obs, dtype, device, steps, obs_at, std = _prepare(sde, times, observations, obs_std, dt, t_end, refine)
    lin = _Linear(sde, dtype, device)
    P, D, K = obs.shape[0], sde.dim, sde.num_processes
    Dz = K + 1
    mean = torch.zeros(P, D, Dz, dtype=dtype, device=device)
    mean[..., 0] = sde.x0.to(dtype=dtype, device=device)
    cov = torch.zeros(D, Dz, Dz, dtype=dtype, device=device)
    if sde.kind == "I":
        cov[:, 1:, 1:] = lin.c_sqrt @ lin.c_sqrt
    where = obs_at
    total = torch.zeros(P, dtype=dtype, device=device)
    var_obs = std**2

    def update(j, mean, cov):
        s = cov[:, 0, 0] + var_obs  # (D,)
        v = obs[:, j, :] - mean[..., 0]  # (P, D)
        ll = (-0.5 * (torch.log(2 * math.pi * s) + v**2 / s)).sum(-1)
        gain = cov[:, :, 0] / s[:, None]  # (D, Dz)
        mean = mean + gain * v[..., None]
        cov = cov - gain[:, :, None] * gain[:, None, :] * s[:, None, None]
        return ll, mean, 0.5 * (cov + cov.transpose(-1, -2))

    if 0 in where:
        ll, mean, cov = update(where[0], mean, cov)
        total = total + ll
    for n in range(1, len(steps) + 1):
        A, a0, _, R = lin.matrices(steps[n - 1])
        mean = (A @ mean[..., None])[..., 0] + a0
        cov = A @ cov @ A.transpose(-1, -2) + R
        if n in where:
            ll, mean, cov = update(where[n], mean, cov)
            total = total + ll
    return total


def fit(
    sde: FractionalSDE,
    posterior: VariationalPosterior,
    times: Tensor,
    observations: Tensor,
    obs_std: float | Tensor,
    *,
    steps: int = 500,
    lr: float = 1e-2,
    num_samples: int = 16,
    dt: float = 0.01,
    refine: float = 0.0,
    t_end: float | None = None,
    path_batch: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, ELBOResult], None] | None = None,
) -> FitResult:
    """Maximise the ELBO over the trainable parameters of ``sde`` (e.g. the Hurst index) and ``posterior`` with Adam.

    ``path_batch`` draws that many of the P observed paths per step (all by default). The loss is the negative
    ELBO per observation (its scale does not depend on P or N).
    """
    import time

    steps = check_int("steps", steps, low=1)
    lr = check_float("lr", lr, 0.0, low_open=True)
    obs = observations if observations.ndim == 3 else (observations[None] if observations.ndim == 2 else observations)
    params = [p for p in list(sde.parameters()) + list(posterior.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("nothing to fit: neither the sde nor the posterior has trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    result = FitResult()
    start = time.process_time()
    n_obs = torch.as_tensor(times).numel() * sde.dim
    for step in range(steps):
        batch = observations
        if path_batch is not None and obs.ndim == 3 and path_batch < obs.shape[0]:
            pick = torch.randperm(obs.shape[0], generator=generator)[:path_batch]
            batch = obs[pick.to(obs.device)]
        res = elbo(sde, posterior, times, batch, obs_std, num_samples=num_samples, dt=dt, refine=refine, t_end=t_end, generator=generator)
        loss = -res.elbo.mean() / n_obs
        opt.zero_grad()
        loss.backward()
        opt.step()
        result.elbo.append(-float(loss.detach()))
        result.hurst.append(float(sde.hurst.detach()))
        if callback is not None:
            callback(step, res)
    result.cpu_seconds = time.process_time() - start
    return result


def gp_posterior(
    covariance: Callable[[Tensor, Tensor], Tensor],
    obs_times: Tensor,
    query_times: Tensor,
    obs_std: float,
    observations: Tensor | None = None,
    jitter: float = 1e-7,
) -> tuple[Tensor | None, Tensor]:
    """Posterior mean and std of a zero-mean Gaussian process at ``query_times`` given noisy observations.

    :math:`\\operatorname{Var} = k(t, t) - k(t, T)[K_{TT} + \\operatorname{diag}(s^2 + \\text{jitter})]^{-1}k(T, t)`;
    ``covariance(s, t)`` returns the (n, m) prior covariance (e.g. ``σ² MAfBM.covariance`` for :math:`X = \\sigma\\hat B^H`,
    or :func:`~flowdiff.fractional.markov.fbm_covariance`). float64. The mean is None without observations.
    """
    obs_std = check_float("obs_std", obs_std, 0.0)
    tq = torch.as_tensor(query_times, dtype=torch.float64).reshape(-1)
    to = torch.as_tensor(obs_times, dtype=torch.float64).reshape(-1)
    k_oo = covariance(to, to).to(torch.float64) + (obs_std**2 + jitter) * torch.eye(len(to), dtype=torch.float64)
    k_qo = covariance(tq, to).to(torch.float64)
    k_qq = torch.diagonal(covariance(tq, tq).to(torch.float64))
    sol = torch.linalg.solve(k_oo, k_qo.T)
    var = k_qq - (k_qo * sol.T).sum(-1)
    mean = None
    if observations is not None:
        mean = sol.T @ torch.as_tensor(observations, dtype=torch.float64).reshape(-1)
    return mean, var.clamp_min(0).sqrt()


#: Methods of :func:`fit_hurst`.
HURST_METHODS = ("likelihood", "elbo")


@dataclass
class HurstFit:
    """The result of :func:`fit_hurst`: the fitted prior, its Hurst index, the iterates and the cost."""

    hurst: float
    sde: FractionalSDE
    method: str
    history: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0


def fit_hurst(
    times: Tensor,
    observations: Tensor,
    obs_std: float | Tensor,
    *,
    method: str = "likelihood",
    hurst_init: float = 0.5,
    num_processes: int = 8,
    gamma_max: float = 200.0,
    kind: str = "I",
    horizon: float | None = None,
    theta_init: float = 0.5,
    learn_sigma: bool = True,
    learn_theta: bool = True,
    steps: int | None = None,
    lr: float = 0.05,
    dt: float = 0.05,
    refine: float = 0.1,
    num_samples: int = 4,
    generator: torch.Generator | None = None,
) -> HurstFit:
    r"""Learn the Hurst index of noisy observations of fractional Ornstein–Uhlenbeck paths (the documented entry point).

    The model is the MA-fBM prior :math:`dX = -\theta X dt + \sigma d\hat B^H` (Daems et al. 2024; K =
    ``num_processes`` OU processes, speeds up to ``gamma_max``, weights optimal on ``[0, horizon]``), with H, σ
    and θ learnt by Adam through the differentiable ω(H).

    * ``method="likelihood"`` (default): the exact log marginal likelihood of the discretised model
      (:func:`log_likelihood`, a Kalman filter; 150 steps by default). Measured (docs/fractional.md, 16 fOU
      paths, 20 observations with noise 0.1): Ĥ = 0.307 / 0.499 / 0.708 for H = 0.3 / 0.5 / 0.7, ≈ 10 CPU s each.
    * ``method="elbo"``: the variational fit of the paper (:func:`fit`, guided posterior, 150 steps by
      default; Ĥ the mean of the last quarter of the iterates). Its piecewise-constant-control gap biases Ĥ
      upwards at small H (0.429 for H = 0.3 at dt = 0.05, refine = 0.1); use a finer ``dt``/``refine``.

    Arguments:
        times: (N,) observation times (> 0; the paths start at X(0) = 0).
        observations: (P, N) or (P, N, 1) observed values (P paths).
        obs_std: the observation noise standard deviation.

    Returns:
        :class:`HurstFit`.
    """
    import time

    if method not in HURST_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(HURST_METHODS)}")
    check_hurst(hurst_init, "hurst_init")
    steps = check_int("steps", 150 if steps is None else steps, low=1)
    times = torch.as_tensor(times, dtype=torch.float64)
    obs = torch.as_tensor(observations, dtype=torch.float64)
    if obs.ndim == 2:
        obs = obs[..., None]
    if obs.ndim != 3 or obs.shape[-1] != 1 or obs.shape[1] != times.numel():
        raise ValueError(f"observations must be (P, N) or (P, N, 1) with N = len(times) = {times.numel()}, "
                         f"got shape {tuple(torch.as_tensor(observations).shape)}")
    t_end = float(times.max()) if horizon is None else check_float("horizon", horizon, 0.0, low_open=True)
    sde = FractionalSDE(hurst_init, num_processes=num_processes, gamma_max=gamma_max, kind=kind, horizon=t_end,
                        theta=theta_init, learn_hurst=True, learn_sigma=learn_sigma, learn_theta=learn_theta).double()
    start = time.process_time()
    if method == "likelihood":
        opt = torch.optim.Adam([p for p in sde.parameters() if p.requires_grad], lr=check_float("lr", lr, 0.0, low_open=True))
        history, objective = [], []
        for _ in range(steps):
            loss = -log_likelihood(sde, times, obs, obs_std, dt=dt).sum() / obs.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(float(sde.hurst.detach()))
            objective.append(-float(loss.detach()))
        hurst = history[-1]
    else:
        post = VariationalPosterior(sde, control=None, guide=True)
        res = fit(sde, post, times, obs, obs_std, steps=steps, lr=lr, num_samples=num_samples, dt=dt, refine=refine,
                  generator=generator)
        history, objective = res.hurst, res.elbo
        tail = history[-max(1, steps // 4):]
        hurst = sum(tail) / len(tail)
    return HurstFit(float(hurst), sde, method, history, objective, time.process_time() - start)
