r"""GDSS score networks: a GCN for the node features X and graph multi-head attention (GMH) for the adjacency A.

Jo, Lee & Hwang (ICML 2022), "Score-based Generative Modeling of Graphs via the System of Stochastic
Differential Equations", §3.2 and appendix; GMH after Baek, Kang & Hwang (ICLR 2021), "Accurate
Learning of Graph Representations with Graph Multiset Pooling".

Both networks take the **whole** noisy graph ``(X, A)`` with node flags ``mask`` and return a tensor of
the shape of ``X`` (resp. ``A``). Every layer is a dense, masked graph operation, so the networks are
exactly permutation equivariant: for a permutation matrix ``P``,
``net(P X, P A Pᵀ, P m) = P net(X, A, m)`` (resp. ``P net(...) Pᵀ``).

Differences from the paper's code (documented choices):

* ``time_features`` (default 8): GDSS's networks have no time input (the time enters only through the
  ``1/σ_t`` rescaling of a noise prediction). Here a small MLP of ``t`` gives ``time_features`` numbers
  that are appended to every node's input features and to the final edge MLP's input (the same for every
  node, so equivariance is kept). ``time_features=0`` gives GDSS's time-free networks.
* The A-network's output is symmetrised and its diagonal zeroed as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["DenseGCN", "AttentionLayer", "ScoreNetworkX", "ScoreNetworkA", "TimeFeatures", "GraphTransformer", "PPGN",
           "spectral_features", "mask_nodes", "mask_adjacency"]


def mask_nodes(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` (B, N, F) with the rows of absent nodes (``mask`` (B, N) == 0) set to zero."""
    return x * mask[..., None].to(x.dtype)


def mask_adjacency(a: Tensor, mask: Tensor) -> Tensor:
    """``a`` (B, N, N) or (B, C, N, N) with rows and columns of absent nodes set to zero."""
    m = mask.to(a.dtype)
    pair = m[:, :, None] * m[:, None, :]
    if a.ndim == 4:
        pair = pair[:, None]
    return a * pair


class DenseGCN(nn.Module):
    r"""Dense graph convolution (Kipf & Welling 2017): :math:`\hat D^{-1/2}(A + I)\hat D^{-1/2} X W + b`.

    ``A`` may be weighted (noisy); degrees are clamped at 1 before the inverse square root, as in the
    GDSS code, so a negative or tiny row sum cannot divide by zero.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.xavier_uniform_(self.linear.weight)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        n = adj.shape[-1]
        eye = torch.eye(n, dtype=adj.dtype, device=adj.device)
        a = adj + eye
        d = a.sum(-1).clamp(min=1).pow(-0.5)
        a = d[..., :, None] * a * d[..., None, :]
        return a @ self.linear(x) + self.bias


def _mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(nn.ELU())
    return nn.Sequential(*layers)


class TimeFeatures(nn.Module):
    """``t`` (B,) -> (B, dim): sinusoids of ``t`` followed by a two-layer MLP (zero-width: nothing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        if dim > 0:
            self.register_buffer("freqs", math.pi * torch.arange(1, 9, dtype=torch.float32), persistent=False)
            self.net = nn.Sequential(nn.Linear(17, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        if self.dim == 0:
            return t.new_zeros(t.shape[0], 0)
        arg = t[:, None] * self.freqs.to(t.dtype)
        return self.net(torch.cat([t[:, None], torch.sin(arg), torch.cos(arg)], dim=-1))


def _normalized_adjacency(adj: Tensor) -> Tensor:
    """:math:`\\hat D^{-1/2}(A + I)\\hat D^{-1/2}` over the last two dimensions (degrees clamped at 1)."""
    n = adj.shape[-1]
    a = adj + torch.eye(n, dtype=adj.dtype, device=adj.device)
    d = a.sum(-1).clamp(min=1).pow(-0.5)
    return d[..., :, None] * a * d[..., None, :]


class AttentionLayer(nn.Module):
    r"""A GMH layer over ``c_in`` adjacency channels -> new node features and ``c_out`` adjacency channels.

    Per channel ``c``: :math:`Q, K, V` are dense GCNs of ``(X, A_c)`` (own weights per channel), the
    attention :math:`\tanh(Q_h K_h^\top/\sqrt{d_{out}})` is averaged over heads and symmetrised; the
    channels' ``V`` are concatenated into an MLP (tanh) for the next node features, and the attention maps
    stacked with the input channels go through an edge-wise MLP (symmetrised) for the next channels. All
    channels are computed in one batched product (the same mathematics as one GCN per channel)."""

    def __init__(self, num_linears: int, in_dim: int, attn_dim: int, out_dim: int, c_in: int, c_out: int,
                 num_heads: int):
        super().__init__()
        if attn_dim % num_heads:
            raise ValueError(f"attn_dim={attn_dim} must be divisible by num_heads={num_heads}")
        self.attn_dim, self.out_dim, self.num_heads = attn_dim, out_dim, num_heads
        width = 2 * attn_dim + out_dim
        weight = torch.empty(c_in, in_dim, width)
        for c in range(c_in):  # xavier per projection, as separate GCNs would be initialised
            for lo, hi in ((0, attn_dim), (attn_dim, 2 * attn_dim), (2 * attn_dim, width)):
                nn.init.xavier_uniform_(weight[c, :, lo:hi])
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(c_in, width))
        hidden = 2 * max(c_in, c_out)
        self.edge_mlp = _mlp(num_linears, 2 * c_in, hidden, c_out)
        self.node_mlp = _mlp(2, c_in * out_dim, hidden, out_dim)

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        b, c, n, _ = adj.shape
        h = _normalized_adjacency(adj) @ torch.einsum("bnf,cfd->bcnd", x, self.weight) + self.bias[None, :, None, :]
        q, k, v = h.split([self.attn_dim, self.attn_dim, self.out_dim], dim=-1)
        heads, dh = self.num_heads, self.attn_dim // self.num_heads
        qh = q.reshape(b, c, n, heads, dh).transpose(2, 3)
        kh = k.reshape(b, c, n, heads, dh).transpose(2, 3)
        att = torch.tanh(qh @ kh.transpose(-1, -2) / math.sqrt(self.out_dim)).mean(2)
        att = 0.5 * (att + att.transpose(-1, -2))
        x_out = torch.tanh(mask_nodes(self.node_mlp(v.permute(0, 2, 1, 3).reshape(b, n, c * self.out_dim)), mask))
        edge_in = torch.cat([att, adj], dim=1).permute(0, 2, 3, 1)
        a = self.edge_mlp(edge_in).permute(0, 3, 1, 2)
        a = a + a.transpose(-1, -2)
        return x_out, mask_adjacency(a, mask)


class ScoreNetworkX(nn.Module):
    """GDSS's X-network: ``depth`` GCN layers (tanh), all layers' features concatenated, a 3-layer ELU MLP."""

    def __init__(self, num_features: int, depth: int = 3, hidden: int = 32, time_features: int = 8, spectral: int = 0):
        super().__init__()
        if spectral < 0:
            raise ValueError(f"spectral must be >= 0, got {spectral}")
        self.spectral = int(spectral)
        self.time = TimeFeatures(time_features)
        in_dim = num_features + time_features + 2 * self.spectral
        self.layers = nn.ModuleList([DenseGCN(in_dim if i == 0 else hidden, hidden) for i in range(depth)])
        cat = in_dim + depth * hidden
        self.final = _mlp(3, cat, 2 * cat, num_features)

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor, t: Tensor, spectral: tuple | None = None) -> Tensor:
        """``spectral``: :func:`spectral_features` of ``(adj, mask)`` if already computed (else computed here)."""
        tf = self.time(t)[:, None, :].expand(-1, x.shape[1], -1)
        parts = [x, tf]
        if self.spectral:
            parts.append((spectral or spectral_features(adj, mask, self.spectral))[1])
        h = mask_nodes(torch.cat(parts, dim=-1), mask)
        feats = [h]
        for layer in self.layers:
            h = mask_nodes(torch.tanh(layer(h, adj)), mask)
            feats.append(h)
        return mask_nodes(self.final(torch.cat(feats, dim=-1)), mask)


class ScoreNetworkA(nn.Module):
    """GDSS's A-network: adjacency powers ``[A, A², …]`` (``c_init``), ``num_layers`` GMH layers, and an
    edge-wise 3-layer MLP over every layer's adjacency channels; symmetric, zero diagonal, masked."""

    def __init__(self, num_features: int, num_layers: int = 5, attn_dim: int = 32, hidden: int = 32, c_init: int = 2,
                 c_hidden: int = 8, c_final: int = 4, num_heads: int = 4, num_linears: int = 2, time_features: int = 8,
                 spectral: int = 0):
        super().__init__()
        if num_layers < 2 or spectral < 0:
            raise ValueError(f"need num_layers >= 2 and spectral >= 0, got {num_layers}, {spectral}")
        self.c_init, self.spectral = c_init, int(spectral)
        self.time = TimeFeatures(time_features)
        in_dim = num_features + time_features + 2 * self.spectral
        c_init = c_init + self.spectral
        layers = []
        for i in range(num_layers):
            if i == 0:
                layers.append(AttentionLayer(num_linears, in_dim, attn_dim, hidden, c_init, c_hidden, num_heads))
            elif i == num_layers - 1:
                layers.append(AttentionLayer(num_linears, hidden, attn_dim, hidden, c_hidden, c_final, num_heads))
            else:
                layers.append(AttentionLayer(num_linears, hidden, attn_dim, hidden, c_hidden, c_hidden, num_heads))
        self.layers = nn.ModuleList(layers)
        cat = c_hidden * (num_layers - 1) + c_final + c_init + time_features
        self.final = _mlp(3, cat, 2 * cat, 1)

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor, t: Tensor, spectral: tuple | None = None) -> Tensor:
        """``spectral``: :func:`spectral_features` of ``(adj, mask)`` if already computed (else computed here)."""
        b, n = adj.shape[:2]
        tfeat = self.time(t)
        parts = [x, tfeat[:, None, :].expand(-1, n, -1)]
        powers = [adj]
        for _ in range(self.c_init - 1):
            powers.append(powers[-1] @ adj)
        a = torch.stack(powers, dim=1)
        if self.spectral:
            proj, node = spectral or spectral_features(adj, mask, self.spectral)
            parts.append(node)
            a = torch.cat([a, proj], dim=1)
        h = mask_nodes(torch.cat(parts, dim=-1), mask)
        a = mask_adjacency(a, mask)
        chans = [a]
        for layer in self.layers:
            h, a = layer(h, a, mask)
            chans.append(a)
        # Every channel is symmetric, so the edge-wise MLP runs on the strict upper triangle only and
        # is mirrored (half the cost; the diagonal is zero by construction).
        iu = torch.triu_indices(n, n, 1, device=adj.device)
        feats = torch.cat(chans, dim=1)[:, :, iu[0], iu[1]].transpose(1, 2)
        feats = torch.cat([feats, tfeat[:, None, :].expand(-1, feats.shape[1], -1)], dim=-1)
        upper = self.final(feats).squeeze(-1)
        out = adj.new_zeros(b, n, n)
        out[:, iu[0], iu[1]] = upper
        return mask_adjacency(out + out.transpose(-1, -2), mask)


class _TransformerLayer(nn.Module):
    r"""One graph-transformer layer with edge features (Dwivedi & Bresson 2021; DiGress, Vignac et al. ICLR 2023).

    Per node pair the scaled products :math:`Q_i \odot K_j/\sqrt{d}` (one number per channel) are modulated by the
    edge features (FiLM: ``S·(1 + E_mul) + E_add``); ``S`` is both the new edge state (a linear map of it) and,
    soft-maxed over the present neighbours ``j`` per channel, the attention that averages ``V_j``. Time enters
    by FiLM on the node and edge updates. Residual + LayerNorm + feed-forward on nodes and edges."""

    def __init__(self, node_dim: int, edge_dim: int, num_heads: int, ffn_mult: int, time_dim: int):
        super().__init__()
        if node_dim % num_heads:
            raise ValueError(f"node_dim={node_dim} must be divisible by num_heads={num_heads}")
        self.node_dim, self.heads = node_dim, num_heads
        self.qkv = nn.Linear(node_dim, 3 * node_dim)
        self.e_film = nn.Linear(edge_dim, 2 * node_dim)
        self.e_out = nn.Linear(node_dim, edge_dim)
        self.x_out = nn.Linear(node_dim, node_dim)
        self.t_film = nn.Linear(time_dim, 4 * node_dim) if time_dim else None
        self.t_film_e = nn.Linear(time_dim, 2 * edge_dim) if time_dim else None
        self.norm_x1, self.norm_x2 = nn.LayerNorm(node_dim), nn.LayerNorm(node_dim)
        self.norm_e1, self.norm_e2 = nn.LayerNorm(edge_dim), nn.LayerNorm(edge_dim)
        self.ffn_x = nn.Sequential(nn.Linear(node_dim, ffn_mult * node_dim), nn.SiLU(),
                                   nn.Linear(ffn_mult * node_dim, node_dim))
        self.ffn_e = nn.Sequential(nn.Linear(edge_dim, ffn_mult * edge_dim), nn.SiLU(),
                                   nn.Linear(ffn_mult * edge_dim, edge_dim))

    def forward(self, h: Tensor, e: Tensor, mask: Tensor, tfeat: Tensor) -> tuple[Tensor, Tensor]:
        b, n, d = h.shape
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        s = q[:, :, None, :] * k[:, None, :, :] / math.sqrt(d // self.heads)  # (B, N, N, D)
        e_mul, e_add = self.e_film(e).chunk(2, dim=-1)
        s = s * (1 + e_mul) + e_add
        pair = (mask[:, :, None] * mask[:, None, :])[..., None]
        if self.t_film is not None:
            tx = self.t_film(tfeat)[:, None, :]
            tm, ta, tm2, ta2 = tx.chunk(4, dim=-1)
            te_m, te_a = self.t_film_e(tfeat)[:, None, None, :].chunk(2, dim=-1)
        new_e = self.e_out(s)
        if self.t_film is not None:
            new_e = new_e * (1 + te_m) + te_a
        logits = s.masked_fill(mask[:, None, :, None] == 0, float("-inf"))
        attn = torch.softmax(logits, dim=2)
        attn = torch.nan_to_num(attn, nan=0.0)  # rows of absent nodes (all -inf)
        msg = (attn * v[:, None, :, :]).sum(2)  # (B, N, D)
        if self.t_film is not None:
            msg = msg * (1 + tm) + ta
        h = self.norm_x1(h + self.x_out(msg))
        ff = self.ffn_x(h)
        if self.t_film is not None:
            ff = ff * (1 + tm2) + ta2
        h = mask_nodes(self.norm_x2(h + ff), mask)
        e = self.norm_e1(e + new_e)
        e = self.norm_e2(e + self.ffn_e(e)) * pair
        return h, e


class GraphTransformer(nn.Module):
    r"""A joint X/A denoiser: a graph transformer with edge features over the noisy graph (an alternative to
    GDSS's two networks; DiGress's architecture, Vignac et al., "DiGress: Discrete Denoising diffusion for
    graph generation", ICLR 2023, §4 and appendix, used here on the continuous GDSS system).

    Inputs: the noisy node features, structural node features of the noisy (weighted) adjacency (row sums of
    ``A``, ``A²`` and the diagonals of ``A²``, ``A³``, scaled by the node count), the time features; edge
    features ``A``, ``A²/n``, ``A³/n²``. Each layer keeps a state per node pair, so the denoiser can compare
    every pair with every other (what matching a noisy graph to a learnt template needs; GDSS's attention maps
    are rebuilt from node features at every layer). Outputs ``(x_out (B, N, F), a_out (B, N, N))``: the
    edge output is symmetrised, with a zero diagonal; absent nodes are masked. Exactly permutation equivariant
    (every operation is per node, per pair, or a masked sum/soft-max over nodes)."""

    def __init__(self, num_features: int, num_layers: int = 4, node_dim: int = 64, edge_dim: int = 32,
                 num_heads: int = 4, ffn_mult: int = 2, time_features: int = 16, powers: int = 3):
        super().__init__()
        if num_layers < 1 or powers < 1:
            raise ValueError(f"num_layers and powers must be >= 1, got {num_layers}, {powers}")
        self.powers = powers
        self.time = TimeFeatures(time_features)
        struct = 2 * powers
        self.node_in = nn.Sequential(nn.Linear(num_features + struct + time_features, node_dim), nn.SiLU(),
                                     nn.Linear(node_dim, node_dim))
        self.edge_in = nn.Sequential(nn.Linear(powers, edge_dim), nn.SiLU(), nn.Linear(edge_dim, edge_dim))
        self.layers = nn.ModuleList([_TransformerLayer(node_dim, edge_dim, num_heads, ffn_mult, time_features)
                                     for _ in range(num_layers)])
        self.node_out = nn.Sequential(nn.Linear(node_dim, node_dim), nn.SiLU(), nn.Linear(node_dim, num_features))
        self.edge_out = nn.Sequential(nn.Linear(edge_dim + 2 * node_dim, 2 * edge_dim), nn.SiLU(),
                                      nn.Linear(2 * edge_dim, 1))

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        b, n = adj.shape[:2]
        m = mask.to(adj.dtype)
        count = m.sum(1).clamp(min=1)[:, None, None]
        adj = mask_adjacency(adj, m)
        mats, node_feats, cur = [], [], adj
        for p in range(self.powers):
            if p:
                cur = cur @ adj / count
            mats.append(cur)
            node_feats += [cur.sum(-1) / count[..., 0], torch.diagonal(cur, dim1=-2, dim2=-1)]
        tfeat = self.time(t)
        h = torch.cat([x, torch.stack(node_feats, -1), tfeat[:, None, :].expand(-1, n, -1)], dim=-1)
        h = mask_nodes(self.node_in(h), m)
        pair = (m[:, :, None] * m[:, None, :])[..., None]
        e = self.edge_in(torch.stack(mats, -1)) * pair
        for layer in self.layers:
            h, e = layer(h, e, m, tfeat)
        x_out = mask_nodes(self.node_out(h), m)
        hi = h[:, :, None, :].expand(-1, -1, n, -1)
        hj = h[:, None, :, :].expand(-1, n, -1, -1)
        a = self.edge_out(torch.cat([e, hi + hj, hi * hj], dim=-1)).squeeze(-1)
        a = 0.5 * (a + a.transpose(-1, -2))
        a = a * (1 - torch.eye(n, dtype=a.dtype, device=a.device))
        return x_out, mask_adjacency(a, m)


class _PPGNBlock(nn.Module):
    r"""One PPGN block on pair states ``e`` (B, N, N, C): two channel MLPs ``m₁, m₂`` whose outputs are multiplied
    as matrices per channel (``(m₁(e) m₂(e))_{ij} = Σ_k m₁(e)_{ik} m₂(e)_{kj}``, divided by the node count), and
    an MLP of ``[e, product]`` added to ``e`` (residual). Pre-LayerNorm; the time enters by FiLM."""

    def __init__(self, channels: int, time_dim: int):
        super().__init__()
        c = channels
        self.m1 = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.m2 = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.m3 = nn.Sequential(nn.Linear(2 * c, c), nn.SiLU(), nn.Linear(c, c))
        self.norm = nn.LayerNorm(c)
        self.t_film = nn.Linear(time_dim, 2 * c) if time_dim else None

    def forward(self, e: Tensor, pair: Tensor, count: Tensor, tfeat: Tensor) -> Tensor:
        h = self.norm(e)
        if self.t_film is not None:
            scale, shift = self.t_film(tfeat)[:, None, None, :].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        left = (self.m1(h) * pair).permute(0, 3, 1, 2)
        right = (self.m2(h) * pair).permute(0, 3, 1, 2)
        prod = (left @ right / count[:, None, None, None]).permute(0, 2, 3, 1)
        return (e + self.m3(torch.cat([h, prod], dim=-1))) * pair


class PPGN(nn.Module):
    r"""A joint X/A denoiser on pair states with matrix-multiplication blocks: Maron, Ben-Hamu, Serviansky & Lipman,
    "Provably Powerful Graph Networks", NeurIPS 2019 (PPGN: as powerful as the 3-WL test), here as the denoiser of
    the continuous GDSS system.

    Why here: on community_small the denoiser must identify a noisy copy of a template graph up to node order
    (docs/graphs.md); the per-channel products ``Σ_k e_ik e_kj`` compare every pair through every third node
    (walk and triangle counts of the noisy graph at every layer), which message passing over node states
    (GDSS's GCN/GMH) cannot. Cost per layer O(N³·C) for the products and O(N²·C²) for the channel MLPs.

    Input pair state: ``[A_ij, δ_ij, δ_ij·X_i, (X_i + X_j)/2]`` (the node features on the diagonal and averaged on
    the pairs); outputs ``(x_out (B, N, F), a_out (B, N, N))``: the edge head reads the final pair state
    (symmetrised, zero diagonal), the node head the diagonal and the row mean. Exactly permutation equivariant:
    every operation is per pair, a channel MLP, or a masked product/sum over nodes.
    """

    def __init__(self, num_features: int, channels: int = 64, num_layers: int = 4, time_features: int = 16,
                 spectral: int = 0):
        super().__init__()
        if num_layers < 1 or channels < 1 or spectral < 0:
            raise ValueError(f"num_layers and channels must be >= 1 and spectral >= 0, got {num_layers}, {channels}, "
                             f"{spectral}")
        self.spectral = int(spectral)
        self.time = TimeFeatures(time_features)
        self.inp = nn.Linear(2 + 2 * num_features + 2 * self.spectral, channels)
        self.blocks = nn.ModuleList([_PPGNBlock(channels, time_features) for _ in range(num_layers)])
        self.a_out = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.SiLU(),
                                   nn.Linear(channels, 1))
        self.x_out = nn.Sequential(nn.LayerNorm(2 * channels), nn.Linear(2 * channels, channels), nn.SiLU(),
                                   nn.Linear(channels, num_features))

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        b, n = adj.shape[:2]
        m = mask.to(adj.dtype)
        pair = (m[:, :, None] * m[:, None, :])[..., None]
        count = m.sum(1).clamp(min=1)
        eye = torch.eye(n, dtype=adj.dtype, device=adj.device).expand(b, n, n)[..., None]
        xi = x[:, :, None, :].expand(-1, -1, n, -1)
        xj = x[:, None, :, :].expand(-1, n, -1, -1)
        feats = [adj[..., None], eye, xi * eye, 0.5 * (xi + xj)]
        if self.spectral:
            proj, node = spectral_features(adj, m, self.spectral)
            feats += [proj.permute(0, 2, 3, 1), node[:, :, None, self.spectral:] * eye]
        e = self.inp(torch.cat(feats, dim=-1)) * pair
        tfeat = self.time(t)
        for block in self.blocks:
            e = block(e, pair, count, tfeat)
        a = self.a_out(e).squeeze(-1)
        a = 0.5 * (a + a.transpose(-1, -2))
        a = a * (1 - torch.eye(n, dtype=a.dtype, device=a.device))
        diag = torch.diagonal(e, dim1=1, dim2=2).transpose(1, 2)
        rows = e.sum(2) / count[:, None, None]
        x_out = mask_nodes(self.x_out(torch.cat([diag, rows], dim=-1)), m)
        return x_out, a * pair[..., 0]


def spectral_features(adj: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    r"""Spectral features of the (noisy, weighted) adjacency for a denoiser: the eigenvectors ``v_1..v_k`` of the
    ``k`` largest eigenvalues ``μ_1..μ_k`` of ``A`` restricted to the present nodes.

    Returns ``proj`` (B, k, N, N): the projections ``n·v_j v_jᵀ`` (sign-free, so exactly permutation equivariant
    whenever the eigenvalues are distinct; ``n`` the node count), and ``node`` (B, N, 2k): ``n·v_j(i)²`` and
    ``μ_j/n`` per node. Why: at half log-SNR around 0 the split into communities is visible in the top
    eigenvectors of the noisy graph (spectral clustering) long before a few message-passing layers can find it;
    docs/graphs.md. Padded nodes get the eigenvalue −10³ so they sort below the rest; graphs with fewer than
    ``k`` nodes get zero features for the missing ones. Computed without gradient: input features, not a path
    for derivatives with respect to the state (a divergence-based likelihood of such a network ignores them).
    """
    b, n = adj.shape[:2]
    with torch.no_grad():
        m = mask.to(adj.dtype)
        count = m.sum(1).clamp(min=1)
        sym = mask_adjacency(0.5 * (adj + adj.transpose(-1, -2)), m) - 1e3 * torch.diag_embed(1 - m)
        val, vec = torch.linalg.eigh(sym)
        if k > n:
            val = torch.cat([val.new_full((b, k - n), -1e3), val], -1)
            vec = torch.cat([vec.new_zeros(b, n, k - n), vec], -1)
        val, vec = val[:, -k:], vec[:, :, -k:]
        present = (val > -500).to(adj.dtype)  # eigenpairs of present nodes only
        vec = vec * present[:, None, :] * m[:, :, None]
        proj = (vec.transpose(1, 2)[:, :, :, None] * vec.transpose(1, 2)[:, :, None, :]) * count[:, None, None, None]
        node = torch.cat([vec ** 2 * count[:, None, None],
                          (val * present / count[:, None])[:, None, :].expand(-1, n, -1) * m[:, :, None]], -1)
    return proj, node
