r"""GDSS: a system of SDEs over node features X and adjacency A, trained by per-component score matching.

Jo, Lee & Hwang (ICML 2022), "Score-based Generative Modeling of Graphs via the System of Stochastic
Differential Equations". In flowdiff's convention (t = 0 noise, t = 1 data) both components follow the
Gaussian path ``z_t = α(t) z_1 + σ(t) ε``, ``z = (X, A)``. The A-noise is symmetric with a zero diagonal,
which is the same as diffusing the strict upper triangle of A with i.i.d. noise; so a graph is *packed*
into one vector ``z = [vec(X), triu(A)]`` (:class:`GraphLayout`) and the joint network is an ordinary
flowdiff noise-prediction model ``ε̂(z, t; mask)``: :class:`GraphField` is a :class:`flowdiff.Field`, and
every library solver, likelihood or steering tool runs on it per component (``cond={"mask": mask}``).

Padding. Entries of absent nodes are always 0 in the data, so their exact noise prediction is
``z/σ(t)``; the field returns exactly that there, so padded entries follow the exact Gaussian reverse
process to 0 under any solver (no re-masking needed).

Training (:func:`train_gdss`): denoising score matching per component (GDSS eq. 7) with a shared
``t ~ U[t_min, t_max]`` and independent noises; the network predicts ε and the loss is
``½ Σ_valid (ε̂_X − ε_X)² + ½ Σ_valid (ε̂_A − ε_A)²`` per graph (sum over present entries, the upper
triangle for A), averaged over the batch. Adam, exponential lr decay, gradient clipping, EMA, as GDSS.
Checkpoints are atomic (:func:`flowdiff.train.checkpoint.save_checkpoint`) and a run resumes exactly.

Sampling (:func:`s4_sample`, :func:`generate`): node counts from the training set's empirical
distribution, any library solver (default: the probability-flow ODE with DPM-Solver++(2M), 100 NFE, measured
best) or the S4 solver (symmetric splitting, GDSS §3.3), then the data prediction at the end thresholded at
0.5 (quantisation).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..fields import Field
from ..paths import GaussianPath, get_path, path_from_config
from .data import GraphBatch, GraphDataError, check_graphs, make_graphs, node_count_distribution, permute, read_graphs, \
    to_dense, to_networkx, write_graphs
from .nets import PPGN, GraphTransformer, ScoreNetworkA, ScoreNetworkX, mask_adjacency, mask_nodes, spectral_features

__all__ = ["GraphLayout", "GDSSNetwork", "GraphField", "GraphTrainConfig", "train_gdss", "s4_sample", "generate",
           "load_graph_field", "gdss_loss", "GRAPH_RUN_KIND", "DEFAULT_NETWORK"]

GRAPH_RUN_KIND = "gdss-graphs"

#: :func:`generate`'s default sampler and budget (measured best on trained community_small models, docs/graphs.md).
DEFAULT_SOLVER, DEFAULT_STEPS = "dpm-solver++2m", 100
#: the weights :func:`generate` and ``flowdiff sample`` load from a run folder by default: the raw last weights
#: (measured better than the EMA with decay 0.999 on 2000/3000-step community_small runs, docs/graphs.md).
DEFAULT_WEIGHTS = "model"
#: Restart sampling (Xu et al. 2023) on top of the default ODE: 10 restarts from half log-SNR 2.5 back to 1.0, 10
#: calls each (measured on community_small, docs/graphs.md).
DEFAULT_RESTART: dict[str, Any] = {"log_snr": (1.0, 2.5), "repeats": 10, "restart_nfe": 10}

#: GDSS's community_small network sizes (X: depth 3, nhid 32; A: 5 layers, adim 32, nhid 32, c 2/8/4, 4 heads),
#: with our ``time_features``.
DEFAULT_NETWORK: dict[str, Any] = {
    "x": {"depth": 3, "hidden": 32, "time_features": 8},
    "a": {"num_layers": 5, "attn_dim": 32, "hidden": 32, "c_init": 2, "c_hidden": 8, "c_final": 4, "num_heads": 4,
          "num_linears": 2, "time_features": 8},
}

#: the graph transformer's sizes (``network={"kind": "transformer", "transformer": {...}}``).
DEFAULT_TRANSFORMER: dict[str, Any] = {"num_layers": 4, "node_dim": 64, "edge_dim": 32, "num_heads": 4, "ffn_mult": 2,
                                       "time_features": 16, "powers": 3}

#: the PPGN's sizes (``network={"kind": "ppgn", "ppgn": {...}}``; Maron et al. 2019).
DEFAULT_PPGN: dict[str, Any] = {"channels": 64, "num_layers": 4, "time_features": 16}


class GraphLayout:
    """Packing of ``(X (B, N, F), A (B, N, N))`` into ``z (B, N·F + N(N−1)/2)`` and back (A from its strict upper triangle)."""

    def __init__(self, max_nodes: int, num_features: int):
        self.max_nodes, self.num_features = int(max_nodes), int(num_features)
        self.x_size = self.max_nodes * self.num_features
        self.a_size = self.max_nodes * (self.max_nodes - 1) // 2
        self.size = self.x_size + self.a_size
        self._iu = torch.triu_indices(self.max_nodes, self.max_nodes, 1)

    @property
    def components(self) -> dict[str, slice]:
        """The slices of ``z`` holding X and A."""
        return {"x": slice(0, self.x_size), "adj": slice(self.x_size, self.size)}

    def pack(self, x: Tensor, adj: Tensor) -> Tensor:
        iu = self._iu.to(adj.device)
        return torch.cat([x.reshape(x.shape[0], -1), adj[:, iu[0], iu[1]]], dim=1)

    def unpack(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, n = z.shape[0], self.max_nodes
        x = z[:, : self.x_size].reshape(b, n, self.num_features)
        iu = self._iu.to(z.device)
        adj = z.new_zeros(b, n, n)
        adj[:, iu[0], iu[1]] = z[:, self.x_size:]
        return x, adj + adj.transpose(1, 2)

    def valid(self, mask: Tensor) -> Tensor:
        """(B, size) indicator of the entries of present nodes (and present node pairs)."""
        m = mask.to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype)
        return self.pack(m[:, :, None].expand(-1, -1, self.num_features), m[:, :, None] * m[:, None, :])


class GDSSNetwork(nn.Module):
    """The joint noise-prediction network ``(z, t, mask) -> ε̂`` (packed): :class:`~flowdiff.graphs.nets.ScoreNetworkX`
    for X and :class:`~flowdiff.graphs.nets.ScoreNetworkA` for A, each on the whole noisy graph."""

    def __init__(self, max_nodes: int, num_features: int, network: dict | None = None, prediction: str = "noise"):
        super().__init__()
        if prediction not in ("noise", "data"):
            raise ValueError(f"unknown prediction {prediction!r}; valid: noise (GDSS), data")
        #: what the raw output is read as on present entries: ε̂ (GDSS) or the data prediction x̂
        self.prediction = prediction
        network = dict(network or {})
        kind = network.pop("kind", "gdss")
        if kind not in ("gdss", "transformer", "ppgn"):
            raise ValueError(f"unknown network kind {kind!r}; valid: gdss (GDSS's GCN + GMH), transformer, ppgn")
        self.layout = GraphLayout(max_nodes, num_features)
        self.kind = kind
        if kind in ("transformer", "ppgn"):
            unknown = set(network) - {kind}
            if unknown:
                raise ValueError(f"unknown network section(s) {sorted(unknown)} for kind {kind!r}; valid: {kind}")
            defaults, cls = (DEFAULT_TRANSFORMER, GraphTransformer) if kind == "transformer" else (DEFAULT_PPGN, PPGN)
            cfg = {"kind": kind, kind: {**defaults, **network.get(kind, {})}}
            self.network_config = cfg
            try:
                self.net = cls(num_features, **cfg[kind])
            except TypeError as error:
                raise ValueError(f"bad network option: {error}") from None
            return
        cfg = {"x": {**DEFAULT_NETWORK["x"], **network.get("x", {})},
               "a": {**DEFAULT_NETWORK["a"], **network.get("a", {})}}
        unknown = set(network) - {"x", "a"}
        if unknown:
            raise ValueError(f"unknown network section(s) {sorted(unknown)}; valid: kind, x, a")
        self.network_config = cfg
        try:
            self.x_net = ScoreNetworkX(num_features, **cfg["x"])
            self.a_net = ScoreNetworkA(num_features, **cfg["a"])
        except TypeError as error:
            raise ValueError(f"bad network option: {error}") from None

    def forward(self, z: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        x, adj = self.layout.unpack(z)
        m = mask.to(z.dtype)
        x, adj = mask_nodes(x, m), mask_adjacency(adj, m)
        if self.kind in ("transformer", "ppgn"):
            return self.layout.pack(*self.net(x, adj, m, t))
        k = self.x_net.spectral
        # one eigendecomposition per call when both networks use the same spectral features
        spectral = spectral_features(adj, m, k) if k and k == self.a_net.spectral else None
        return self.layout.pack(self.x_net(x, adj, m, t, spectral), self.a_net(x, adj, m, t, spectral))


class _JointNoise:
    """The field's model: the network on present entries, the exact ``z/σ`` on padded ones."""

    def __init__(self, network: GDSSNetwork, path: GaussianPath):
        self.network, self.path = network, path

    def __call__(self, z: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            raise ValueError("a GraphField needs the node flags: pass cond={'mask': mask} (B, max_nodes)")
        if mask.shape != (z.shape[0], self.network.layout.max_nodes):
            raise ValueError(f"mask must have shape {(z.shape[0], self.network.layout.max_nodes)}, got {tuple(mask.shape)}")
        out = self.network(z, t, mask)
        valid = self.network.layout.valid(mask.to(z.dtype))
        sigma = self.path.sigma(t).to(z.dtype)[:, None]
        if self.network.prediction == "data":
            out = (z - self.path.alpha(t).to(z.dtype)[:, None] * out) / sigma
        return valid * out + (1 - valid) * z / sigma


class GraphField(Field):
    """A trained GDSS model as a :class:`flowdiff.Field` over packed graphs (noise prediction).

    Attributes:
        network: the :class:`GDSSNetwork`; ``layout``: its :class:`GraphLayout`;
        node_distribution: probabilities of node counts 0..max_nodes (for sampling node flags);
        info: the run's data description (name, sizes, ...).
    Call the field with ``cond={"mask": mask}`` (``mask`` (B, max_nodes)).
    """

    def __init__(self, network: GDSSNetwork, path: GaussianPath, node_distribution: Sequence[float],
                 info: dict | None = None):
        super().__init__(_JointNoise(network, path), path, "noise")
        self.network, self.layout = network, network.layout
        probs = torch.as_tensor(list(node_distribution), dtype=torch.float64)
        if probs.ndim != 1 or probs.shape[0] != self.layout.max_nodes + 1 or probs.sum() <= 0 or (probs < 0).any():
            raise ValueError(f"node_distribution must be {self.layout.max_nodes + 1} non-negative probabilities")
        self.node_distribution = probs / probs.sum()
        self.info = dict(info or {})

    def __repr__(self) -> str:
        return f"GraphField(max_nodes={self.layout.max_nodes}, num_features={self.layout.num_features}, path={self.path!r})"

    def sample_masks(self, num_graphs: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device: Any = "cpu") -> Tensor:
        """Node flags (num_graphs, max_nodes): node counts drawn from :attr:`node_distribution`, first nodes present."""
        counts = torch.multinomial(self.node_distribution, num_graphs, replacement=True, generator=generator)
        ar = torch.arange(self.layout.max_nodes)
        return (ar[None, :] < counts[:, None]).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def gdss_loss(network: GDSSNetwork, path: GaussianPath, batch: GraphBatch, generator: torch.Generator | None = None,
              t: Tensor | None = None, time_sampler: Any = None) -> tuple[Tensor, dict[str, float]]:
    """Per-component denoising score matching (GDSS eq. 7).

    Noise prediction (GDSS): the batch mean of ``½Σ(ε̂_X−ε_X)² + ½Σ(ε̂_A−ε_A)²`` over present entries.
    Data prediction: the same score-matching loss with the min-SNR-5 weighting of Hang et al. (2023,
    "Efficient Diffusion Training via Min-SNR Weighting Strategy"): ``½ min(SNR, 5) Σ(x̂ − x)²`` per component,
    SNR = α²/σ² (= the ε-loss weighted by min(SNR, 5)/SNR ≤ 1: less weight near the data end, where the
    ε of a {0, 1} adjacency is nearly unpredictable and dominated the unweighted loss).
    ``time_sampler``: a :class:`flowdiff.losses.TimeSampler` for ``t`` (its importance weights multiply the
    per-graph loss); default ``t ~ U[t_min, t_max]`` (GDSS).
    Returns ``(loss, parts)`` with ``parts = {"x": …, "adj": …}``.
    """
    layout = network.layout
    z1 = layout.pack(batch.x, batch.adj)
    b = z1.shape[0]
    weight = None
    if t is None and time_sampler is not None:
        t, weight = time_sampler.sample(b, generator=generator, dtype=z1.dtype)
        t, weight = t.clamp(path.t_min, path.t_max).to(z1.device), weight.to(z1.device)
    elif t is None:
        t = path.t_min + (path.t_max - path.t_min) * torch.rand(b, generator=generator, dtype=z1.dtype)
        t = t.to(z1.device)
    noise = torch.randn(z1.shape, generator=generator, dtype=z1.dtype).to(z1.device)
    alpha, sigma = path.alpha(t).to(z1.dtype)[:, None], path.sigma(t).to(z1.dtype)[:, None]
    valid = layout.valid(batch.mask.to(z1.dtype))
    zt = alpha * z1 + sigma * noise
    out = network(zt, t, batch.mask)
    if getattr(network, "prediction", "noise") == "data":
        snr = (alpha / sigma) ** 2
        sq = 0.5 * torch.clamp(snr, max=5.0) * (out - z1) ** 2 * valid
    else:
        sq = 0.5 * (out - noise) ** 2 * valid
    if weight is not None:
        sq = sq * weight[:, None]
    parts = {name: sq[:, sl].sum(1).mean() for name, sl in layout.components.items()}
    return parts["x"] + parts["adj"], {k: float(v.detach()) for k, v in parts.items()}


@dataclass
class GraphTrainConfig:
    """Options of :func:`train_gdss` (defaults: the recipe behind ``flowdiff train --data community_small``).

    ``data``: a generator name (:data:`flowdiff.graphs.data.DATASETS`) or a graph file/folder
    (:func:`~flowdiff.graphs.data.read_graphs`); ``num_graphs`` graphs are generated with ``data_seed``
    (ignored for files). ``max_nodes``/``num_features`` default to the data's largest graph and largest
    degree + 1. ``path``: a dict for :func:`flowdiff.paths.get_path` (``{"name": "vp", ...}``).
    """

    data: str = "community_small"
    num_graphs: int = 1000
    data_seed: int = 0
    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 5e-3
    lr_decay: float = 0.999
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema: float = 0.999
    augment: bool = True
    max_nodes: int | None = None
    num_features: int | None = None
    path: dict = dc_field(default_factory=lambda: {"name": "vp", "beta_min": 0.1, "beta_max": 20.0})
    network: dict = dc_field(default_factory=dict)
    prediction: str = "noise"
    time_sampler: Any = "uniform"
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 100
    threads: int | None = None

    def check(self) -> "GraphTrainConfig":
        for name in ("num_graphs", "steps", "batch_size", "checkpoint_every", "keep_last", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("lr_decay", 0.0, 1.0), ("ema", 0.0, 1.0),
                             ("weight_decay", -1e-300, math.inf), ("grad_clip", 0.0, math.inf)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo < v <= hi) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number in ({lo:g}, {hi:g}], got {v!r}")
        if not isinstance(self.path, dict) or "name" not in self.path:
            raise ValueError(f"path must be a dict with a 'name' (e.g. {{'name': 'vp'}}), got {self.path!r}")
        _time_sampler(self.time_sampler, get_path(**self.path))
        return self


def _time_sampler(spec: Any, path: GaussianPath) -> Any:
    """``None`` for ``"uniform"`` (GDSS's draw, kept bit-for-bit), else the :class:`flowdiff.losses.TimeSampler` of a
    name (``"edm"``, ``"logit-normal"``) or a config dict (``{"name": "edm", "p_mean": -1.2, "p_std": 1.2}``)."""
    from ..losses.time_samplers import make_time_sampler, time_sampler_from_config

    if spec == "uniform" or spec is None:
        return None
    try:
        if isinstance(spec, str):
            return make_time_sampler(spec, path)
        if isinstance(spec, dict):
            return time_sampler_from_config(spec, path)
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad time_sampler {spec!r}: {error}") from None
    raise ValueError(f"time_sampler must be 'uniform', 'edm', 'logit-normal' or a config dict, got {spec!r}")


def _load_data(cfg: GraphTrainConfig) -> tuple[list, str]:
    from .data import DATASETS

    key = cfg.data.lower().replace("-", "_")
    if key in DATASETS:
        return make_graphs(key, cfg.num_graphs, seed=cfg.data_seed), key
    if not Path(cfg.data).exists():
        raise ValueError(f"unknown graph data {cfg.data!r}; valid: {', '.join(DATASETS)} or a graph file/folder")
    return read_graphs(cfg.data), str(Path(cfg.data).resolve())


class _EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def train_gdss(output_dir: str | Path, config: GraphTrainConfig | None = None, resume: bool = True,
               log: Callable[[str], None] | None = None, device: Any = "cpu") -> GraphField:
    """Train a GDSS model into ``output_dir`` (atomic checkpoints every ``checkpoint_every`` steps and at the end).

    If ``output_dir`` already holds a GDSS run and ``resume``, training continues from its latest checkpoint with
    the stored configuration (bit-for-bit the same as an uninterrupted run on the same machine). The training
    graphs are written to ``output_dir/train_graphs.txt``. Returns the trained :class:`GraphField` (EMA weights).

    Raises:
        ValueError: bad options; :class:`~flowdiff.graphs.data.GraphDataError`: unusable graphs (too large,
        all empty); :class:`flowdiff.train.NonFiniteLossError`: a NaN/inf loss (no update applied).
    """
    from ..train.checkpoint import list_checkpoints, load_checkpoint, load_training_state, remove_temporary_files

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(out)
    say = log or (lambda s: None)
    existing = list_checkpoints(out)
    state = None
    if existing and resume:
        model_state, ema_state, saved = load_checkpoint(out)
        if saved.get("kind") != GRAPH_RUN_KIND:
            raise ValueError(f"{out} holds a run that is not a GDSS graph run")
        cfg = GraphTrainConfig(**saved["train"])
        info = saved["graphs"]
        state = load_training_state(Path(saved["checkpoint_dir"]))
        graphs = read_graphs(out / "train_graphs.txt")
        say(f"resuming {out} at step {state['step']}")
    else:
        if existing:
            raise ValueError(f"{out} already holds a run (pass resume=True or another folder)")
        cfg = (config or GraphTrainConfig()).check()
        raw, source = _load_data(cfg)
        graphs, counts = check_graphs(raw, cfg.max_nodes, where=source)
        max_nodes = cfg.max_nodes or max(g.number_of_nodes() for g in graphs)
        max_degree = max(d for g in graphs for _, d in g.degree())
        num_features = cfg.num_features or max_degree + 1
        info = {"data": source, "num_train_graphs": len(graphs), "max_nodes": max_nodes, "num_features": num_features,
                "node_distribution": node_count_distribution(graphs, max_nodes), "skipped": counts,
                "path": get_path(**cfg.path).config(), "network": None}
        write_graphs(graphs, out / "train_graphs.txt")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    network = GDSSNetwork(info["max_nodes"], info["num_features"], cfg.network, cfg.prediction).to(device)
    info["network"] = network.network_config
    info["prediction"] = cfg.prediction
    data = to_dense(graphs, info["max_nodes"], info["num_features"], device=device)
    resumed = (model_state, ema_state, state) if state is not None else None
    return _fit(out, cfg, info, network, data, resumed, say, device)


def _fit(out: Path, cfg: Any, info: dict, network: GDSSNetwork, data: GraphBatch,
         resumed: tuple[dict, dict, dict] | None, say: Callable[[str], None], device: Any) -> GraphField:
    """The GDSS optimisation shared by graph and molecule runs: Adam + exponential decay + clipping + EMA,
    atomic checkpoints every ``cfg.checkpoint_every`` steps, exact resume from ``resumed`` =
    ``(model_state, ema_state, training_state)``; returns the :class:`GraphField` with the EMA weights."""
    from ..train import NonFiniteLossError
    from ..train.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, list_checkpoints, save_checkpoint

    path = path_from_config(info["path"])
    opt = torch.optim.Adam(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = _EMA(network, cfg.ema)
    sampler = _time_sampler(getattr(cfg, "time_sampler", "uniform"), path)
    step, cpu_used = 0, 0.0
    if resumed is not None:
        model_state, ema_state, state = resumed
        network.load_state_dict(model_state)
        ema.shadow = {k: v.to(device) for k, v in ema_state.items()}
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        step, cpu_used = int(state["step"]), float(state.get("cpu_seconds", 0.0))
    run_config = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": GRAPH_RUN_KIND,
                  "train": asdict(cfg), "graphs": info}

    def save() -> Path:
        training_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
                          "step": step, "cpu_seconds": cpu_used + time.process_time() - cpu0}
        return save_checkpoint(out, step, {k: v.detach().cpu() for k, v in network.state_dict().items()},
                               {k: v.detach().cpu() for k, v in ema.shadow.items()},
                               {**run_config, "step": step}, training_state, cfg.keep_last)

    cpu0 = time.process_time()
    last_ckpt = None
    running: dict[str, float] = {}
    network.train()
    # Denormal floats appear in the weights after ~1000 steps and make each CPU step ~1.5-2x slower (measured on
    # community_small, batch 64: 0.21 CPU s/step before step 1000, 0.32 after; qm9-like, batch 128: 0.062 vs
    # 0.128 CPU s); flushing them to zero changes nothing else.
    flush = torch.set_flush_denormal(True)
    try:
        while step < cfg.steps:
            idx = torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=gen).to(data.adj.device)
            batch = data.index(idx)
            if cfg.augment:
                batch = permute(batch, generator=gen)
            loss, parts = gdss_loss(network, path, batch, generator=gen, time_sampler=sampler)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(step + 1, "loss", float(loss), last_ckpt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.grad_clip)
            if not torch.isfinite(norm):
                raise NonFiniteLossError(step + 1, "grad_norm", float(norm), last_ckpt)
            opt.step()
            sched.step()
            ema.update(network)
            step += 1
            for k, v in parts.items():
                running[k] = running.get(k, 0.0) + v
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                line = {"step": step, **{f"loss_{k}": v / n for k, v in running.items()},
                        "lr": sched.get_last_lr()[0], "cpu_s": round(cpu_used + time.process_time() - cpu0, 1)}
                running = {}
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(line) + "\n")
                say(json.dumps(line))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                last_ckpt = save()
        if last_ckpt is None and not list_checkpoints(out):
            last_ckpt = save()
    finally:
        if flush:
            torch.set_flush_denormal(False)
    network.load_state_dict(ema.shadow)
    network.eval()
    return GraphField(network, path, info["node_distribution"], info)


def load_graph_field(run: str | Path, which: str = "ema", device: Any = "cpu") -> GraphField:
    """The :class:`GraphField` of a GDSS run folder or checkpoint folder (``which``: ``"ema"`` or ``"model"``)."""
    from ..train.checkpoint import CheckpointError, load_checkpoint

    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    model_state, ema_state, config = load_checkpoint(run, device=device)
    if config.get("kind") != GRAPH_RUN_KIND:
        raise CheckpointError(f"{config['checkpoint_dir']} is not a GDSS graph checkpoint (kind {config.get('kind')!r})")
    info = config["graphs"]
    network = GDSSNetwork(info["max_nodes"], info["num_features"], info["network"],
                          info.get("prediction", "noise")).to(device)
    try:
        network.load_state_dict(ema_state if which == "ema" else model_state)
    except RuntimeError as error:
        raise CheckpointError(f"weights in {config['checkpoint_dir']} do not fit the network: {error}") from error
    network.eval()
    return GraphField(network, path_from_config(info["path"]), info["node_distribution"], info)


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------


def _g2_integral(path: GaussianPath, t0: float, t1: float) -> float:
    """∫ g² dt over [t0, t1] with g² = 2σ²λ̇ (the reverse SDE's squared diffusion), Simpson's rule."""
    ts = torch.tensor([t0, 0.5 * (t0 + t1), t1], dtype=torch.float64)
    g2 = 2 * path.sigma(ts) ** 2 * path.d_log_snr(ts)
    return float((t1 - t0) / 6 * (g2[0] + 4 * g2[1] + g2[2]))


def _linear_transition(path: GaussianPath, t0: float, t1: float) -> tuple[float, float]:
    """Mean factor and std of the exact transition of the linear part ``dz = (α̇/α) z dt + g dW`` from t0 to t1 > t0:
    ``α₁/α₀`` and ``sqrt((α₁/α₀)² σ₀² − σ₁²)``."""
    ts = torch.tensor([t0, t1], dtype=torch.float64)
    a, s = path.alpha(ts), path.sigma(ts)
    ratio = float(a[1] / a[0])
    var = ratio**2 * float(s[0]) ** 2 - float(s[1]) ** 2
    return ratio, math.sqrt(max(var, 0.0))


def s4_sample(field: Field, x_init: Tensor, steps: int = 1000, snr: float = 0.15, scale_eps: float = 0.7,
              cond: dict | None = None, generator: torch.Generator | None = None,
              components: dict[str, slice] | None = None, t_start: float | None = None, t_end: float | None = None,
              grid: str = "uniform", check_finite: bool = True) -> Tensor:
    r"""S4: Symmetric Splitting for a System of SDEs (Jo, Lee & Hwang 2022, §3.3 and Alg. 2), on any Gaussian-path field.

    Each step ``t → t + h`` (towards the data) makes **one** model call, the score :math:`s = ∇\log p_t(z)`:

    1. Langevin correction with it, per component: :math:`\epsilon = 2(\mathrm{snr}\,\|w\|/\|s\|)^2` (batch-mean
       norms), :math:`z ← z + \epsilon s + \sqrt{2\epsilon}\,\mathrm{scale\_eps}\,w`;
    2. half a step of the *exact* Gaussian transition of the linear part of the reverse SDE
       :math:`dz = [(\dot\alpha/\alpha) z + g^2 s]dt + g\,dW`, :math:`g^2 = 2\sigma^2\dot\lambda`;
    3. the score drift :math:`z ← z + (\int g^2)\, s` over the full step, re-using the score of 1;
    4. the second exact half step of the linear part (its mean only on the last step: GDSS's noise removal).

    ``grid``: ``"uniform"`` in t (GDSS) or ``"log_snr"`` (uniform in λ = log(α/σ)). The score step is explicit,
    so it is stable only while each step's λ increment stays below ~1: on a uniform t grid near the data end
    that needs hundreds of steps (VP: use ≥ 500, or ``"log_snr"`` for short runs).

    ``snr = 0`` turns the corrector off (a pure splitting scheme, consistent with the exact reverse SDE).
    ``components`` maps names to slices of the flattened state that get their own Langevin step size (the
    X and A blocks of a :class:`GraphField`; default: the field's layout, or the whole state).

    Returns:
        the state at ``t_end`` (default the path's ``t_max``), shape of ``x_init``.
    """
    if not isinstance(x_init, Tensor) or not x_init.is_floating_point():
        raise TypeError("x_init must be a floating-point torch.Tensor")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for name, v in (("snr", snr), ("scale_eps", scale_eps)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    path = field.path
    t0 = path.t_min if t_start is None else float(t_start)
    t1 = path.t_max if t_end is None else float(t_end)
    if not (path.t_min - 1e-12 <= t0 < t1 <= path.t_max + 1e-12):
        raise ValueError(f"need t_min <= t_start < t_end <= t_max of the path ({path.t_min}, {path.t_max}), "
                         f"got t_start={t0}, t_end={t1}")
    cond = dict(cond or {})
    if components is None:
        layout = getattr(field, "layout", None)
        components = layout.components if layout is not None else {"all": slice(None)}
    shape = x_init.shape
    z = x_init.reshape(shape[0], -1).clone()
    if grid == "uniform":
        times = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
    elif grid == "log_snr":
        ends = path.log_snr(torch.tensor([t0, t1], dtype=torch.float64))
        times = path.t_of_log_snr(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64))
        times = times.clamp(t0, t1).tolist()
        times[0], times[-1] = t0, t1
    else:
        raise ValueError(f"unknown grid {grid!r}; valid: uniform, log_snr")

    def randn() -> Tensor:
        return torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)

    with torch.no_grad():
        for i in range(steps):
            ta, tb = times[i], times[i + 1]
            s = field.score(z.reshape(shape), ta, **cond).reshape(z.shape)
            if snr > 0:
                w = randn()
                for sl in components.values():
                    noise_norm = w[:, sl].norm(dim=1).mean()
                    score_norm = s[:, sl].norm(dim=1).mean().clamp_min(1e-30)
                    eps = 2 * (snr * noise_norm / score_norm) ** 2
                    z[:, sl] = z[:, sl] + eps * s[:, sl] + torch.sqrt(2 * eps) * scale_eps * w[:, sl]
            tm = 0.5 * (ta + tb)
            ratio, std = _linear_transition(path, ta, tm)
            z = ratio * z + std * randn()
            z = z + _g2_integral(path, ta, tb) * s
            ratio, std = _linear_transition(path, tm, tb)
            z = ratio * z if i == steps - 1 else ratio * z + std * randn()
            if check_finite and not torch.isfinite(z).all():
                from ..solvers import NonFiniteStateError

                raise NonFiniteStateError(f"S4: the state stopped being finite at step {i + 1} (t={tb:.4g})")
    return z.reshape(shape)


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)



def sample_batch(fld: GraphField, b: int, gen: torch.Generator, solver: str, steps: int, final_denoise: bool,
                 options: dict, what: str, restart: dict | None = None) -> tuple[Tensor, Tensor]:
    """``b`` states of the joint X/A field from noise: node masks from the field's size law, the solver
    (``"s4"``: :func:`s4_sample` with ``options``; else :func:`flowdiff.sample` with ``options``, or
    :func:`flowdiff.solvers.restart_sample` with the ``restart`` options), the optional final data prediction
    at ``t_max``, and a :class:`~flowdiff.solvers.NonFiniteStateError` naming ``what``."""
    from .. import solvers as _solvers

    param = next(fld.network.parameters())
    dev, dtype = param.device, param.dtype
    mask = fld.sample_masks(b, generator=gen, dtype=dtype, device=dev)
    z = torch.randn(b, fld.layout.size, generator=gen, dtype=dtype).to(dev)
    if solver == "s4":
        z = s4_sample(fld, z, steps=steps, cond={"mask": mask}, generator=gen, **options)
    elif restart:
        z = _solvers.restart_sample(fld, z, solver=solver, nfe=steps, cond={"mask": mask}, generator=gen,
                                    **restart, **options).x
    else:
        z = _solvers.sample(fld, z, solver=solver, nfe=steps, cond={"mask": mask}, generator=gen, **options).x
    if final_denoise:
        with torch.no_grad():
            z = fld.denoise(z, torch.full((b,), fld.path.t_max, dtype=dtype, device=dev), mask=mask)
    if not torch.isfinite(z).all():
        raise _solvers.NonFiniteStateError(f"{what} are not finite ({solver}, {steps} steps)")
    return z, mask


def _restart_options(restart: Any, solver: str) -> dict | None:
    """The restart options :func:`generate` uses: ``None`` for S4 and stochastic solvers or when switched off
    (a malformed value is refused whatever the solver)."""
    from .. import solvers as _solvers

    if restart == "default":
        restart = DEFAULT_RESTART
    if restart is not None and (not isinstance(restart, dict) or set(restart) - {"log_snr", "repeats", "restart_nfe"}):
        raise ValueError(f"restart must be None, 'default' or a dict with keys log_snr, repeats, restart_nfe; got {restart!r}")
    if restart is None or solver == "s4" or _solvers.get_solver(solver).stochastic:
        return None
    return dict(restart)


def generate(model: str | Path | GraphField, num_graphs: int, generator: torch.Generator | int | None = None,
             solver: str = DEFAULT_SOLVER, steps: int = DEFAULT_STEPS, snr: float = 0.15, scale_eps: float = 0.7,
             batch_size: int = 512, remove_isolated: bool = True, return_adjacency: bool = False,
             device: Any = None, grid: str = "uniform", final_denoise: bool = True, threshold: float = 0.5,
             weights: str = DEFAULT_WEIGHTS, restart: dict | None | str = "default", **solver_options: Any) -> list:
    """Generate graphs with a GDSS model.

    Arguments:
        model: a run folder / checkpoint folder, or a :class:`GraphField`.
        num_graphs: how many graphs.
        generator: a ``torch.Generator`` or an int seed (node counts, initial noise and solver noise).
        solver: any name of :func:`flowdiff.solvers.available` (``steps`` is its ``nfe`` budget,
            ``solver_options`` go to :func:`flowdiff.sample`) or ``"s4"`` (GDSS's sampler, ``steps`` model calls).
            Default: the probability-flow ODE with DPM-Solver++(2M) (Lu et al. 2022) at 100 NFE plus restarts
            (``restart``; 0.040 -> 0.031 average MMD² on the default community_small run), measured best
            on trained community_small models (docs/graphs.md: average MMD² 0.065 vs 0.149 for SDE-DPM-Solver++(2M)
            at 200 NFE and 0.17 for S4 at 200 steps on the same model; S4 with GDSS's corrector was worse still).
        snr, scale_eps: S4's Langevin corrector (GDSS's ENZYMES values 0.15 / 0.7 by default; S4 only).
        grid: S4's time grid (:func:`s4_sample`).
        final_denoise: quantise the data prediction ``x̂(z, t_max)`` of the final state (one more model call)
            rather than the state itself (σ(t_max) ≈ 0.01 for the default VP path, so the two rarely differ).
        threshold: an edge is kept where the (denoised) adjacency entry exceeds it (A is packed in {0, 1}).
        weights: which weights of a run folder to load, ``"ema"`` or ``"model"`` (the raw last weights;
            ignored for a :class:`GraphField`). See :data:`DEFAULT_WEIGHTS`.
        restart: Restart sampling (:func:`flowdiff.solvers.restart_sample`, Xu et al. 2023) for the ODE
            solvers: a dict of its options (``log_snr``, ``repeats``, ``restart_nfe``), ``None`` for the plain
            solve, ``"default"`` for :data:`DEFAULT_RESTART`. Ignored for ``"s4"`` and stochastic solvers.
        remove_isolated: drop isolated nodes, as GDSS's evaluation does.
        return_adjacency: also return the quantised adjacency matrices and masks.

    Returns:
        a list of ``networkx.Graph`` (and ``(adj, mask)`` with ``return_adjacency``).
    """
    from .. import solvers as _solvers

    if isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < 1:
        raise ValueError(f"num_graphs must be an integer >= 1, got {num_graphs!r}")
    fld = model if isinstance(model, GraphField) else load_graph_field(model, which=weights, device=device or "cpu")
    if not isinstance(fld, GraphField):
        raise TypeError(f"model must be a run folder or a GraphField, got {type(model).__name__}")
    if solver != "s4" and solver not in _solvers.available():
        raise ValueError(f"unknown solver {solver!r}; valid: s4, {', '.join(_solvers.available())}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
    gen = _as_generator(generator)
    dtype = next(fld.network.parameters()).dtype
    options = {"snr": snr, "scale_eps": scale_eps, "grid": grid} if solver == "s4" else solver_options
    restart = _restart_options(restart, solver)
    graphs, adjs, masks = [], [], []
    flush = torch.set_flush_denormal(True)  # denormal weights slow CPU inference too (see train_gdss)
    try:
        for start in range(0, num_graphs, batch_size):
            b = min(batch_size, num_graphs - start)
            try:
                z, mask = sample_batch(fld, b, gen, solver, steps, final_denoise, options,
                                       "generate: the sampled graphs", restart)
            except _solvers.NonFiniteStateError as error:
                if not restart:
                    raise
                # Restart sampling re-noises and re-integrates a band several times; a barely trained network
                # whose plain ODE solve is merely wild (|A| ~ 200 after 40 steps) overflows there.
                raise _solvers.NonFiniteStateError(
                    f"{error} — during Restart sampling; an under-trained model can blow up there: sample with "
                    "restart=None (CLI: --solver-option restart=none) or train longer") from error
            _, adj = fld.layout.unpack(z)
            adj = (mask_adjacency(adj, mask) > threshold).to(dtype)
            graphs.extend(to_networkx(adj, mask, remove_isolated=remove_isolated))
            adjs.append(adj)
            masks.append(mask)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    if return_adjacency:
        return graphs, (torch.cat(adjs), torch.cat(masks))
    return graphs
