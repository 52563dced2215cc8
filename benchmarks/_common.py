r"""What the benchmarks share: the peer libraries' interfaces, run metadata, and result tables.

**Peers in σ-space.** diffusers' schedulers and k-diffusion's samplers work with the noise level
:math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda}` (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models") and, for the Karras-type ones, with the scaled state
:math:`\tilde x = x/\alpha`. :class:`SigmaInterface` turns a flowdiff problem (a path and an exact or
trained field) into what they call: a denoiser :math:`D(\tilde x, \tilde\sigma) = E[x_1 | x_t = \alpha\tilde x]`
at the :math:`t` with :math:`\lambda(t) = -\log\tilde\sigma` (exact inverse ``path.t_of_log_snr``), and a
noise predictor on VP states, each counting its calls so that every library spends the same budget.
:func:`run_diffusers` and :func:`run_kdiff` drive one sampler on such a problem;
:func:`load_k_sampling` imports ``k_diffusion/sampling.py`` alone (the package's ``__init__``
pulls torchvision and a CUDA torch, DESIGN.md).

**flow_matching** (Lipman et al. 2024, "Flow Matching Guide and Code"): :func:`flow_matching_log_likelihood`
calls its ``ODESolver.compute_likelihood`` from data (its ``t = 1``) to noise (``t = 0``).

**Metadata and tables.** :func:`run_metadata` records the machine, the versions (flowdiff, torch,
python and the installed peers), the date and the threads; :func:`metadata_line` says it in one
sentence for a table's header. :func:`markdown_table` renders rows, :func:`write_results` writes
``benchmarks/results/<stem>.md`` and ``<stem>.json`` (the JSON carries the metadata).

Import from a benchmark script as ``from _common import ...`` (the scripts run from any folder:
``sys.path`` gets the benchmarks folder first, as Python does for the script's own folder).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DIFFUSERS_BASE",
    "RESULTS",
    "SigmaInterface",
    "diffusers_configs",
    "flow_matching_log_likelihood",
    "kdiff_configs",
    "load_k_sampling",
    "markdown_table",
    "metadata_line",
    "package_version",
    "run_diffusers",
    "run_kdiff",
    "run_metadata",
    "sigma_range",
    "write_results",
]

RESULTS = Path(__file__).resolve().parent / "results"

#: diffusers' DDPM table (1000 linear betas), the peers' default on ``Discrete.linear()`` problems.
DIFFUSERS_BASE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}

_PEERS = ("diffusers", "k-diffusion", "flow_matching", "torchdiffeq", "scipy")


# ---------------------------------------------------------------------------------------
# Run metadata
# ---------------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (``None`` when it is not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(**extra: Any) -> dict[str, Any]:
    """Where and with what a benchmark ran: date (UTC), machine, versions, threads, load; plus ``extra``.

    ``versions`` holds flowdiff, torch, python and every installed peer library
    (diffusers, k-diffusion, flow_matching, torchdiffeq, scipy).
    """
    versions = {"flowdiff": package_version("flowdiff"), "torch": torch.__version__, "python": platform.python_version()}
    versions.update({name: v for name in _PEERS if (v := package_version(name)) is not None})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": versions,
        **extra,
    }


def metadata_line(meta: dict[str, Any]) -> str:
    """One sentence for a results file: device, cores, threads, load, versions, date."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    load = meta.get("load_average_1min")
    busy = f", 1-min load average {load:.2f}" if load is not None else ""
    return (
        f"{meta['device']} ({meta['machine']}, {meta['cpu_count']} cores, {meta['torch_threads']} torch thread(s){busy}); "
        f"{versions}; {meta['date']}."
    )


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table (header, rule, one line per row) as a list of lines; cells are ``str()``-ed."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_results(stem: str, markdown: str | Sequence[str], payload: dict[str, Any], out: Path = RESULTS,
                  indent: int = 1) -> tuple[Path, Path]:
    """Write ``out/<stem>.md`` (text or lines) and ``out/<stem>.json`` (``payload``, non-JSON values as
    floats or strings); returns the two paths."""
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    text = markdown if isinstance(markdown, str) else "\n".join(markdown)
    md_path.write_text(text if text.endswith("\n") else text + "\n")

    def default(value: Any) -> Any:
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value)
        if isinstance(value, (Tensor, Path)):
            return str(value) if isinstance(value, Path) else value.tolist()
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)

    json_path.write_text(json.dumps(payload, indent=indent, default=default) + "\n")
    return md_path, json_path


# ---------------------------------------------------------------------------------------
# σ-space peers: the problem's interface
# ---------------------------------------------------------------------------------------


def sigma_range(path: Any) -> tuple[float, float, float, float]:
    """``(α(t_min), α(t_max), σ̃_max, σ̃_min)`` of a Gaussian path, σ̃ = σ/α = exp(−λ), in float64."""
    table = path.table([path.t_min, path.t_max])
    alpha0, alpha1 = table.alpha.tolist()
    sigma_max, sigma_min = torch.exp(-table.log_snr).tolist()
    return alpha0, alpha1, sigma_max, sigma_min


class SigmaInterface:
    """What the peer drivers call: a denoiser and a noise predictor at a noise level σ̃ = σ/α,
    counting calls, and the error to ``self.reference``.

    Subclasses set ``path`` (a Gaussian path), ``t0``, ``t1`` (the sampled interval), ``x_vp``
    (the shared start, a VP state at ``t0``), ``x_tilde`` (= ``x_vp / α(t0)``), ``sigma_min``,
    ``sigma_max`` and ``reference``, and define ``_denoise(x, t)`` / ``_noise(x, t)`` on VP states.
    """

    path: Any
    t0: float
    t1: float
    x_vp: Tensor
    x_tilde: Tensor
    sigma_min: float
    sigma_max: float
    reference: Tensor
    calls: int = 0

    def _denoise(self, x: Tensor, t: float) -> Tensor:
        raise NotImplementedError

    def _noise(self, x: Tensor, t: float) -> Tensor:
        raise NotImplementedError

    def t_of_sigma(self, sigma_tilde: float) -> float:
        """The time whose σ/α is ``sigma_tilde`` (λ = −log σ̃), clipped to ``[t0, t1]``."""
        t = float(self.path.t_of_log_snr(torch.tensor([-math.log(sigma_tilde)], dtype=torch.float64)))
        return min(max(t, self.t0), self.t1)

    def denoise_tilde(self, x_tilde: Tensor, sigma_tilde: float) -> Tensor:
        """D(x̃, σ̃) = E[x1 | x_t = α x̃] at the t with σ/α = σ̃ (one call)."""
        self.calls += 1
        t = self.t_of_sigma(sigma_tilde)
        return self._denoise(x_tilde * float(self.path.alpha(torch.tensor(t, dtype=torch.float64))), t)

    def noise_vp(self, x_vp: Tensor, sigma_tilde: float) -> Tensor:
        """ε̂(x, σ̃) for a VP-state input (one call)."""
        self.calls += 1
        return self._noise(x_vp, self.t_of_sigma(sigma_tilde))

    def error(self, x: Tensor) -> float:
        """Median over samples of the per-sample RMS distance to the reference."""
        x = x.to(torch.float64)
        if not torch.isfinite(x).all():
            return float("nan")
        rms = ((x - self.reference.to(torch.float64)) ** 2).flatten(1).mean(dim=1).sqrt()
        return float(rms.median())


# ---------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------


def diffusers_configs() -> list[tuple[str, str, dict, str]]:
    """(label, scheduler class name, config overrides, how the run ends) of the deterministic schedulers."""
    out = []
    for order in (2, 3):
        for extra, tag in (({}, ""), ({"use_karras_sigmas": True}, " karras"), ({"use_lu_lambdas": True}, " lu")):
            out.append((f"DPMSolverMultistep {order}M{tag}", "DPMSolverMultistepScheduler",
                        {"solver_order": order, **extra}, "zero"))
    for order in (2, 3):
        for variant in ("bh1", "bh2"):
            for extra, tag in (({}, ""), ({"use_karras_sigmas": True}, " karras")):
                final = "sigma_min" if variant == "bh1" else "zero"  # bh1 + zero returns NaN (notes §5)
                out.append((f"UniPC p={order} {variant}{tag}", "UniPCMultistepScheduler",
                            {"solver_order": order, "solver_type": variant, "final_sigmas_type": final, **extra}, final))
    for order in (2, 3):
        for extra, tag in (({}, ""), ({"use_karras_sigmas": True}, " karras")):
            out.append((f"DEIS p={order}{tag}", "DEISMultistepScheduler", {"solver_order": order, **extra}, "sigma_min"))
    for extra, tag in (({}, ""), ({"use_karras_sigmas": True}, " karras")):
        out.append((f"Euler{tag}", "EulerDiscreteScheduler", {**extra}, "zero"))
        out.append((f"Heun{tag}", "HeunDiscreteScheduler", {**extra}, "zero"))
    # Other step placements diffusers offers: "trailing" spacing (Lin et al. 2024, recommended for
    # few steps) and exponential σ; the multistep solvers that are best above.
    for extra, tag in (({"timestep_spacing": "trailing"}, " trailing"), ({"use_exponential_sigmas": True}, " exponential")):
        for order in (2, 3):
            out.append((f"DPMSolverMultistep {order}M{tag}", "DPMSolverMultistepScheduler",
                        {"solver_order": order, **extra}, "zero"))
            out.append((f"UniPC p={order} bh2{tag}", "UniPCMultistepScheduler",
                        {"solver_order": order, "solver_type": "bh2", "final_sigmas_type": "zero", **extra}, "zero"))
            out.append((f"DEIS p={order}{tag}", "DEISMultistepScheduler", {"solver_order": order, **extra}, "sigma_min"))
    return out


def run_diffusers(problem: SigmaInterface, cls_name: str, overrides: dict, ending: str, nfe: int,
                  base: dict | None = None) -> tuple[float, int]:
    """One diffusers scheduler on ``problem`` with ``nfe`` model calls; ``(error, calls)``.

    ``base``: the scheduler's β table (default :data:`DIFFUSERS_BASE`). ``ending="sigma_min"``: the
    scheduler stops at σ̃_min and one explicit denoise (counted) ends the run.
    """
    import diffusers

    cls = getattr(diffusers, cls_name)
    two_evals = cls_name == "HeunDiscreteScheduler"
    denoise_after = ending == "sigma_min"  # the sampler stops at sigma_min: one explicit denoise
    budget = nfe - (1 if denoise_after else 0)
    steps = (budget + 1) // 2 if two_evals else budget
    if steps < 1:
        return float("nan"), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = cls(**(DIFFUSERS_BASE if base is None else base), **overrides)
        sched.set_timesteps(steps)
    karras_state = sched.init_noise_sigma > 1.5  # sigma~-space state (Euler, Heun)
    x = (problem.x_tilde if karras_state else problem.x_vp).clone()
    problem.calls = 0
    for t in sched.timesteps:
        if sched.step_index is None:
            sched._init_step_index(t)
        sigma = float(sched.sigmas[sched.step_index])
        inp = sched.scale_model_input(x, t)
        # VP-state input for the oracle: Karras-type schedulers scale x~ by 1/sqrt(sigma~^2 + 1) = alpha
        eps = problem.noise_vp(inp, sigma)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = sched.step(eps, t, x).prev_sample
    if denoise_after:
        sigma_last = float(sched.sigmas[-1])
        x_tilde = x if karras_state else x * math.sqrt(1.0 + sigma_last**2)
        x = problem.denoise_tilde(x_tilde, sigma_last)
    return problem.error(x), problem.calls


# ---------------------------------------------------------------------------------------
# k-diffusion (k_diffusion/sampling.py only)
# ---------------------------------------------------------------------------------------


def load_k_sampling() -> types.ModuleType | None:
    """Import ``k_diffusion.sampling`` without the package ``__init__`` (torchvision, CLIP, …)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x: Tensor, target_dims: int) -> Tensor:
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims  # type: ignore[attr-defined]
    pkg.utils = utils  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "torchsde")}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    if importlib.util.find_spec("torchsde") is None:  # only the SDE samplers' Brownian trees need it
        sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        mspec = importlib.util.spec_from_file_location("k_diffusion.sampling", folder / "sampling.py")
        module = importlib.util.module_from_spec(mspec)  # type: ignore[arg-type]
        mspec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def kdiff_configs() -> list[tuple[str, str, str]]:
    """(label, sampler function, σ schedule) of the deterministic k-diffusion samplers."""
    out = []
    for fn in ("euler", "heun", "lms", "dpmpp_2m"):
        for sig in ("karras", "exponential"):
            out.append((f"k-diff {fn} {sig}", fn, sig))
    out.append(("k-diff dpm_fast", "dpm_fast", ""))
    return out


def run_kdiff(problem: SigmaInterface, kds: types.ModuleType, fn: str, sigmas_kind: str, nfe: int) -> tuple[float, int]:
    """One k-diffusion sampler on ``problem`` with ``nfe`` model calls; ``(error, calls)``."""

    def model(x: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        return problem.denoise_tilde(x, float(sigma.flatten()[0]))

    x = problem.x_tilde.clone()
    problem.calls = 0
    smin, smax = problem.sigma_min, problem.sigma_max
    if fn == "dpm_fast":  # ends at sigma_min: one explicit denoise
        if nfe - 1 < 1:
            return float("nan"), 0
        x = kds.sample_dpm_fast(model, x, smin, smax, nfe - 1, disable=True)
        x = problem.denoise_tilde(x, smin)
        return problem.error(x), problem.calls
    n = (nfe + 1) // 2 if fn == "heun" else nfe  # heun: 2(n-1) + 1 calls
    if n < 2 and fn != "euler":
        n = max(n, 1)
    getter = kds.get_sigmas_karras if sigmas_kind == "karras" else kds.get_sigmas_exponential
    if n == 1:
        sigmas = torch.tensor([smax, 0.0], dtype=torch.float64)
    else:
        sigmas = getter(n, smin, smax, device="cpu").to(torch.float64)
    sampler = getattr(kds, f"sample_{fn}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = sampler(model, x, sigmas, disable=True)
    return problem.error(x), problem.calls


# ---------------------------------------------------------------------------------------
# flow_matching
# ---------------------------------------------------------------------------------------


def flow_matching_log_likelihood(
    velocity: Callable[..., Tensor], x: Tensor, log_p0: Callable[[Tensor], Tensor],
    default_dtype: torch.dtype | None = None, **kwargs: Any,
) -> Tensor:
    """``log p(x)`` by flow_matching's ``ODESolver(velocity).compute_likelihood``, in float64.

    flow_matching's time runs from noise (0) to data (1) like flowdiff's; the likelihood is solved
    from the data backwards (``time_grid = [1, 0]``). ``kwargs`` go to ``compute_likelihood``
    (``method``, ``step_size``, ``atol``, ``rtol``, ``exact_divergence``); ``default_dtype`` is set
    around the call (its Hutchinson probes follow the default dtype).
    """
    from flow_matching.solver import ODESolver

    solver = ODESolver(velocity_model=velocity)
    old = torch.get_default_dtype()
    if default_dtype is not None:
        torch.set_default_dtype(default_dtype)
    try:
        _, log_prob = solver.compute_likelihood(
            x_1=x, log_p0=log_p0, time_grid=torch.tensor([1.0, 0.0], dtype=x.dtype), **kwargs
        )
    finally:
        torch.set_default_dtype(old)
    return log_prob.to(torch.float64)
