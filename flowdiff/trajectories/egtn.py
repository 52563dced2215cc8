r"""EGTN: the equivariant geometric trajectory network of GeoTDM (Han et al., NeurIPS 2024,
*Geometric Trajectory Diffusion Models*), and its learnable geometric prior.

A trajectory is a tensor ``x`` of shape ``(B, T, N, 3)`` (T frames, N particles) with invariant node
features ``h`` of shape ``(B, T, N, H)``. The network alternates two kinds of layers, all frames / all
particles in parallel:

* **spatial** (EGNN, Satorras et al. 2021, *E(n) Equivariant Graph Neural Networks*), per frame over the
  fully connected particle graph:
  :math:`m_{ij} = \phi_e(h_i, h_j, \lVert x_i - x_j\rVert^2)`,
  :math:`x_i \leftarrow x_i + \frac1{N-1}\sum_{j\ne i} (x_i - x_j)\,\phi_x(m_{ij}) / (\lVert x_i - x_j\rVert + 1)`,
  :math:`h_i \leftarrow h_i + \phi_h(h_i, \sum_j m_{ij})`;
* **temporal** (GeoTDM's equivariant temporal attention), per particle over frames with relative-time
  embeddings :math:`r_{ts} = \mathrm{Lin}(\mathrm{sinusoid}(t - s))`:
  :math:`\alpha_{ts} = \mathrm{softmax}_s\, q_t^\top (k_s + r_{ts}) / \sqrt d`,
  :math:`h_t \leftarrow h_t + W_o \sum_s \alpha_{ts}(v_s + r_{ts})`,
  :math:`x_t \leftarrow x_t + \sum_s \alpha_{ts}(x_t - x_s)\,\phi(v_s + r_{ts})` (per head, averaged).

Only differences of positions and invariant scalars enter, so the position output is E(3)-equivariant
(rotations, reflections, translations) and the features are invariant; particles are exchangeable
(permutation equivariance). :class:`GeometricPrior` turns the features of a 2-layer EGTN on the context
frames into per-particle invariant weights of an affine combination of the context frames (GeoTDM §3.3):

.. math:: x_r^{(s)} = \sum_{t'} W_{t's}\, x_c^{(t')}, \qquad \sum_{t'} W_{t's} = 1,

which is translation- and rotation-equivariant. Here :math:`W = W_{\mathrm{cv}} + \Delta W`: the
constant-velocity extrapolation plus a learned per-particle correction of rank ``rank``,
:math:`\Delta W^{(i)}_{t's} = \sum_r w^{(i)}_{t'r} u_{rs}` for :math:`t' <` the last frame, whose last row makes
each column sum to zero (the paper's rank-one :math:`w_{t'} w_s`, generalised; per particle instead of
one weight per frame — still invariant weights, so still equivariant). ``u`` starts at zero, so training
starts from the constant-velocity forecast. Two additions of ours, both E(3)-equivariant: an optional
refinement EGTN (``refine_layers``) that moves the affine forecast appended to the context, and invariant
*pair features* of the context (:func:`pair_features`) as edge attributes of the spatial layers — GeoTDM
gives the N-body networks the known interactions :math:`q_i q_j` as edge attributes; here they are not
given and must be inferred from the context's radial relative accelerations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.embeddings import sinusoidal_features

__all__ = ["EGTN", "SpatialLayer", "TemporalLayer", "GeometricPrior", "canonical_frame", "pair_features"]


def _norm(v: Tensor) -> Tensor:
    """Euclidean norm over the last axis, kept, with a finite gradient at zero."""
    return ((v * v).sum(-1, keepdim=True) + 1e-12).sqrt()


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.SiLU(), nn.Linear(hidden, out))


class SpatialLayer(nn.Module):
    """One EGNN layer per frame over the fully connected particle graph (module docstring)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.edge_i, self.edge_j = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden, bias=False)
        self.edge_d = nn.Linear(1, hidden, bias=False)
        self.edge_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.coord = nn.Linear(hidden, 1)  # phi_x on the edge message (one layer: edges dominate the cost)
        nn.init.zeros_(self.coord.weight)
        nn.init.zeros_(self.coord.bias)
        self.node = _mlp(2 * hidden, hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

        self.edge_e = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor, h: Tensor, edges: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n = x.shape[-2]
        diff = x.unsqueeze(-2) - x.unsqueeze(-3)  # (..., N, N, 3): x_i - x_j
        d2 = (diff * diff).sum(-1, keepdim=True)
        hn = self.norm(h)
        # the first edge layer on [h_i, h_j, d2, e_ij] split into parts (N instead of N^2 products for h)
        pre = self.edge_i(hn).unsqueeze(-2) + self.edge_j(hn).unsqueeze(-3) + self.edge_d(d2)
        if edges is not None:  # (B, N, N, H), the same for every frame
            pre = pre + self.edge_e(edges).unsqueeze(1)
        m = self.edge_out(pre)
        # the self-pair i = j: its coordinate term vanishes (x_i - x_i = 0); its message is subtracted
        x = x + (diff * (self.coord(m) / ((d2 + 1e-12).sqrt() + 1.0))).sum(-2) / max(n - 1, 1)
        messages = m.sum(-2) - torch.diagonal(m, dim1=-3, dim2=-2).transpose(-1, -2)
        h = h + self.node(torch.cat([hn, messages], dim=-1))
        return x, h


class TemporalLayer(nn.Module):
    """Equivariant multi-head attention over the frames of each particle (module docstring)."""

    def __init__(self, hidden: int, heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be a multiple of heads={heads}")
        self.heads, self.dh = heads, hidden // heads
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.rel = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.out = nn.Linear(hidden, hidden)
        self.coord_v = nn.Linear(hidden, heads)
        self.coord_r = nn.Linear(hidden, heads, bias=False)
        for layer in (self.coord_v, self.coord_r):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.coord_v.bias)
        self.ff = _mlp(hidden, 2 * hidden, hidden)
        self.ff_norm = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        b, t, n, hid = h.shape
        frames = torch.arange(t, dtype=h.dtype, device=h.device)
        lag = (frames[:, None] - frames[None, :]).reshape(-1)  # t - s
        r = self.rel(sinusoidal_features(lag, 32, scale=1.0, max_period=100.0)).reshape(t, t, self.heads, self.dh)
        q, k, v = self.qkv(self.norm(h)).reshape(b, t, n, 3, self.heads, self.dh).unbind(3)
        logits = (torch.einsum("btnhd,bsnhd->bnhts", q, k)
                  + torch.einsum("btnhd,tshd->bnhts", q, r)) / math.sqrt(self.dh)
        att = logits.softmax(-1)  # (b, n, heads, t, s)
        mixed = torch.einsum("bnhts,bsnhd->btnhd", att, v) + torch.einsum("bnhts,tshd->btnhd", att, r)
        h = h + self.out(mixed.reshape(b, t, n, hid))
        h = h + self.ff(self.ff_norm(h))
        # x_t <- x_t + sum_s a_ts (x_t - x_s) phi_ts, phi_ts = w.(v_s + r_ts), averaged over heads
        phi = self.coord_v(v.reshape(b, t, n, hid)).permute(0, 2, 3, 1).unsqueeze(-2)  # (b, n, heads, 1, s)
        phi = phi + self.coord_r(r.reshape(t, t, hid)).permute(2, 0, 1)  # + (heads, t, s)
        weight = (att * phi).mean(2)  # (b, n, t, s)
        xs = x.permute(0, 2, 1, 3)  # (b, n, t, 3)
        update = weight.sum(-1, keepdim=True) * xs - weight @ xs
        return x + update.permute(0, 2, 1, 3), h


class EGTN(nn.Module):
    """The EGTN stack: an input embedding, then ``layers`` pairs (spatial, temporal).

    Arguments:
        in_features: invariant input features per node (per frame and particle).
        hidden: width ``H`` (GeoTDM: 128).
        layers: spatial+temporal pairs (GeoTDM: 6).
        heads: heads of the temporal attention.

    ``forward(x, features)`` with ``x`` ``(B, T, N, 3)`` and ``features`` ``(B, T, N, in_features)``
    returns the updated positions (equivariant) and features ``(B, T, N, H)`` (invariant).
    """

    def __init__(self, in_features: int, hidden: int = 64, layers: int = 4, heads: int = 4, edge_features: int = 0):
        super().__init__()
        self.embed = _mlp(in_features + 1, hidden, hidden)
        self.edge_embed = _mlp(edge_features, hidden, hidden) if edge_features else None
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(SpatialLayer(hidden))
            self.blocks.append(TemporalLayer(hidden, heads))
        self.final_norm = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, features: Tensor, edges: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # an invariant geometric input: each particle's distance to its frame's centroid
        radius = _norm(x - x.mean(-2, keepdim=True))
        h = self.embed(torch.cat([features, radius], dim=-1))
        e = self.edge_embed(edges) if (self.edge_embed is not None and edges is not None) else None
        for block in self.blocks:
            x, h = block(x, h, e) if isinstance(block, SpatialLayer) else block(x, h)
        return x, self.final_norm(h)


def _context_features(context: Tensor) -> Tensor:
    """Invariant per-node features of context frames: speed and acceleration magnitudes (zero-padded)."""
    vel = torch.zeros_like(context[..., :1])
    acc = torch.zeros_like(context[..., :1])
    if context.shape[1] > 1:
        vel[:, 1:] = _norm(context[:, 1:] - context[:, :-1])
    if context.shape[1] > 2:
        acc[:, 2:] = _norm(context[:, 2:] - 2 * context[:, 1:-1] + context[:, :-2])
    return torch.cat([vel, acc], dim=-1)


def pair_features(context: Tensor) -> Tensor:
    r"""Invariant pair (edge) features ``(B, N, N, 3 C)`` of the context frames ``(B, C, N, 3)``: per frame
    the distance :math:`d_{ij}`, the radial relative velocity :math:`\hat r_{ij}\cdot(v_i - v_j)` and the radial
    relative acceleration :math:`\hat r_{ij}\cdot(a_i - a_j)` (finite differences, zero where undefined).

    GeoTDM feeds known interactions as edge attributes (the charges' products :math:`q_i q_j` on N-body);
    here they are unknown, and these features let the network infer them from the context (an inverse-square
    attraction or repulsion shows in the radial acceleration). Invariant, so equivariance is kept."""
    b, c, n, _ = context.shape
    diff = context.unsqueeze(-2) - context.unsqueeze(-3)  # (B, C, N, N, 3)
    dist = _norm(diff)
    unit = diff / (dist + 1e-9)
    vel = torch.zeros_like(context)
    acc = torch.zeros_like(context)
    if c > 1:
        vel[:, 1:] = context[:, 1:] - context[:, :-1]
    if c > 2:
        acc[:, 1:-1] = context[:, 2:] - 2 * context[:, 1:-1] + context[:, :-2]
    rel_v = ((vel.unsqueeze(-2) - vel.unsqueeze(-3)) * unit).sum(-1, keepdim=True)
    rel_a = ((acc.unsqueeze(-2) - acc.unsqueeze(-3)) * unit).sum(-1, keepdim=True)
    # scales: frame differences are ~0.05 (velocity) and ~0.01 (acceleration) on the charged task
    feats = torch.asinh(torch.cat([dist, 10.0 * rel_v, 100.0 * rel_a], dim=-1))  # (B, C, N, N, 3)
    return feats.permute(0, 2, 3, 1, 4).reshape(b, n, n, 3 * c)


class GeometricPrior(nn.Module):
    """GeoTDM's learnable equivariant prior mean :math:`x_r` from the context frames (module docstring).

    ``forward(context)`` with ``context`` ``(B, C, N, 3)`` returns ``(B, F, N, 3)``.
    """

    def __init__(self, context_frames: int, future_frames: int, hidden: int = 64, layers: int = 2, rank: int = 4,
                 refine_layers: int = 0):
        super().__init__()
        self.context_frames, self.future_frames = context_frames, future_frames
        base = torch.zeros(context_frames, future_frames)
        steps = torch.arange(1, future_frames + 1, dtype=torch.float32)
        if context_frames >= 2:  # constant velocity: x_last + s (x_last - x_prev)
            base[-1], base[-2] = 1 + steps, -steps
        else:
            base[-1] = 1.0
        self.register_buffer("base", base)
        self.learned = context_frames >= 2 and rank > 0 and layers > 0
        if self.learned:
            self.net = EGTN(2, hidden, layers, edge_features=3 * context_frames)
            self.weights = nn.Linear(hidden, rank)
            self.future = nn.Parameter(torch.zeros(rank, future_frames))
        self.refine = EGTN(17, hidden, refine_layers, edge_features=3 * context_frames) if refine_layers > 0 else None

    def forward(self, context: Tensor) -> Tensor:
        base = self.base.to(context.dtype)
        prior = torch.einsum("cs,bcnd->bsnd", base, context)
        if self.learned:
            _, h = self.net(context, _context_features(context), pair_features(context))
            w = self.weights(h[:, :-1])  # (B, C-1, N, rank): per-particle invariant weights
            delta = torch.einsum("bcnr,rs->bcsn", w, self.future.to(context.dtype))
            rel = context[:, :-1] - context[:, -1:]  # x_c^(t') - x_c^(last): the affine constraint built in
            prior = prior + torch.einsum("bcsn,bcnd->bsnd", delta, rel)
        if self.refine is not None:
            # an EGTN moves the affine forecast, appended to the context, by equivariant updates
            b, c, n, _ = context.shape
            frames = c + prior.shape[1]
            index = torch.arange(frames, dtype=context.dtype, device=context.device) - c
            feats = torch.cat([sinusoidal_features(index, 16, scale=1.0, max_period=200.0),
                               (index >= 0).to(context.dtype)[:, None]], dim=-1)
            out, _ = self.refine(torch.cat([context, prior], dim=1), feats[None, :, None, :].expand(b, frames, n, 17),
                                 pair_features(context))
            prior = out[:, c:]
        return prior


_FRAME_WEIGHTS: dict[tuple, Tensor] = {}


def canonical_frame(context: Tensor) -> Tensor:
    r"""An orthogonal frame ``(B, 3, 3)`` that co-rotates with the context ``(B, C, N, 3)``:
    ``canonical_frame(context @ Q.T + b) = Q @ canonical_frame(context)`` for every orthogonal ``Q``
    (reflections included) and translation ``b``. The QR factor (positive diagonal of R) of three fixed
    generic linear combinations of the centred context positions; noise drawn in this frame and turned
    into world coordinates makes each forecast sample, not only the distribution, equivariant.
    Degenerate (collinear or coplanar contexts) only on a measure-zero set."""
    b, c, n, _ = context.shape
    key = (c, n, context.dtype, context.device)
    if key not in _FRAME_WEIGHTS:
        gen = torch.Generator().manual_seed(20241)
        _FRAME_WEIGHTS[key] = torch.randn(3, c * n, generator=gen, dtype=torch.float64).to(context.dtype).to(context.device)
    centred = (context - context.mean(dim=(1, 2), keepdim=True)).reshape(b, c * n, 3)
    a = torch.einsum("km,bmd->bdk", _FRAME_WEIGHTS[key], centred)  # columns a_1, a_2, a_3
    q, r = torch.linalg.qr(a)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)
