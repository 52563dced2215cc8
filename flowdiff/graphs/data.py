r"""Graph data for GDSS: seeded generators, dense node-masked batches, permutation augmentation, user files.

Generators (networkx, seeded with a ``numpy.random.Generator`` or an int):

* :func:`community_small` — the GraphRNN/GDSS ``community`` generator with two communities and
  ``max_nodes`` ~ U{12..20}: each community has ``max_nodes // 2`` nodes and is ``G(n/2, 0.7)`` drawn
  with **networkx seed = the community's index** (so for a given size both communities are the same
  graphs in every sample; only the size and the bridges vary), bridges with probability
  ``0.05·2/((C−1)·n/2)`` per inter-community pair, at least one bridge (You et al. 2018, "GraphRNN";
  Jo et al. 2022, "GDSS"). Node counts are even: 12, 14, 16, 18, 20.
* :func:`grid` — ``nx.grid_2d_graph(m, n)`` with m, n ~ U{low..high} (GDSS: 10..19).
* :func:`ego_like` — radius-1 ego graphs (4–18 nodes) of a synthetic power-law cluster graph, a stand-in
  for GDSS's Citeseer ego_small (labelled "ego-like (synthetic)"; not comparable to the paper).

A batch is dense and padded to ``max_nodes``: node features ``X`` (B, N, F) (one-hot degrees, GDSS's
``init: deg``), adjacency ``A`` (B, N, N) in {0, 1}, node flags ``mask`` (B, N).
"""

from __future__ import annotations

import itertools
import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["community_small", "grid", "ego_like", "make_graphs", "DATASETS", "GraphBatch", "to_dense", "to_networkx",
           "degree_features", "permute", "node_count_distribution", "read_graphs", "write_graphs", "check_graphs",
           "GraphDataError"]


class GraphDataError(ValueError):
    """A graph file or list that cannot be used (one-line message naming the file/graph and the problem)."""


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed must be an int or a numpy Generator, got {type(seed).__name__}")
    return np.random.default_rng(seed)


def _count(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _community_graph(num_communities: int, max_nodes: int, rng: np.random.Generator, p_inter: float = 0.05) -> Any:
    import networkx as nx

    size = max_nodes // num_communities
    parts = [nx.gnp_random_graph(size, 0.7, seed=i) for i in range(num_communities)]
    g = nx.disjoint_union_all(parts)
    p_bridge = p_inter * 2 / ((num_communities - 1) * size)
    comps = [sorted(c) for c in nx.connected_components(g)]
    for c1, c2 in itertools.combinations(comps, 2):
        draws = rng.random((len(c1), len(c2))) < p_bridge
        if draws.any():
            for i, j in zip(*np.nonzero(draws)):
                g.add_edge(c1[i], c2[j])
        else:
            g.add_edge(c1[0], c2[0])
    return nx.Graph(g)


def community_small(num_graphs: int, seed: int | np.random.Generator | None = 0,
                    sizes: Sequence[int] = tuple(range(12, 21))) -> list:
    """``num_graphs`` community_small graphs (module docstring); ``sizes`` are the ``max_nodes`` values drawn uniformly."""
    num_graphs = _count("num_graphs", num_graphs)
    rng = _rng(seed)
    sizes = [_count("sizes entry", s, 4) for s in sizes]
    return [_community_graph(2, int(rng.choice(sizes)), rng) for _ in range(num_graphs)]


def grid(num_graphs: int, seed: int | np.random.Generator | None = 0, low: int = 10, high: int = 19) -> list:
    """``num_graphs`` 2-D grid graphs ``m × n`` with m, n ~ U{low..high} (GDSS: 10..19, 100–361 nodes)."""
    import networkx as nx

    num_graphs, low, high = _count("num_graphs", num_graphs), _count("low", low), _count("high", high)
    if high < low:
        raise ValueError(f"need low <= high, got low={low}, high={high}")
    rng = _rng(seed)
    out = []
    for _ in range(num_graphs):
        m, n = (int(v) for v in rng.integers(low, high + 1, size=2))
        out.append(nx.convert_node_labels_to_integers(nx.grid_2d_graph(m, n)))
    return out


def ego_like(num_graphs: int, seed: int | np.random.Generator | None = 0, min_nodes: int = 4, max_nodes: int = 18,
             base_nodes: int = 3000) -> list:
    """Radius-1 ego graphs with ``min_nodes``–``max_nodes`` nodes of one seeded ``powerlaw_cluster_graph``
    (``base_nodes`` nodes, m = 2, p = 0.3): a synthetic stand-in for GDSS's Citeseer ego_small."""
    import networkx as nx

    num_graphs = _count("num_graphs", num_graphs)
    rng = _rng(seed)
    base = nx.powerlaw_cluster_graph(base_nodes, 2, 0.3, seed=int(rng.integers(2**31)))
    centres = [v for v in base if min_nodes <= base.degree(v) + 1 <= max_nodes]
    if not centres:
        raise ValueError(f"no ego graph with {min_nodes}..{max_nodes} nodes in the base graph")
    picks = rng.choice(len(centres), size=num_graphs, replace=True)
    return [nx.convert_node_labels_to_integers(nx.ego_graph(base, centres[i], radius=1)) for i in picks]


DATASETS = {"community_small": community_small, "grid": grid, "ego_like": ego_like}


def make_graphs(name: str, num_graphs: int, seed: int | np.random.Generator | None = 0) -> list:
    """Graphs of a named generator (:data:`DATASETS`)."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown graph data set {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[key](num_graphs, seed=seed)


def check_graphs(graphs: Iterable[Any], max_nodes: int | None = None, where: str = "graph list",
                 connected_only: bool = False) -> tuple[list, dict[str, int]]:
    """Clean a list of graphs for training or evaluation.

    Empty graphs (no node or no edge) are skipped, self-loops removed, nodes relabelled 0..n−1;
    disconnected graphs are kept unless ``connected_only`` (then skipped). A graph with more than
    ``max_nodes`` nodes raises :class:`GraphDataError` naming its index and size.

    Returns:
        ``(graphs, counts)`` with counts ``{"empty": …, "disconnected": …, "self_loops": …}`` of what was
        skipped or changed (a warning names them when non-zero).
    """
    import networkx as nx

    out, counts = [], {"empty": 0, "disconnected": 0, "self_loops": 0}
    for i, g in enumerate(graphs):
        if not isinstance(g, nx.Graph):
            raise TypeError(f"{where}: entry {i} is a {type(g).__name__}, not a networkx.Graph")
        g = nx.Graph(g)
        loops = list(nx.selfloop_edges(g))
        if loops:
            counts["self_loops"] += 1
            g.remove_edges_from(loops)
        if g.number_of_nodes() == 0 or g.number_of_edges() == 0:
            counts["empty"] += 1
            continue
        if not nx.is_connected(g):
            counts["disconnected"] += 1
            if connected_only:
                continue
        if max_nodes is not None and g.number_of_nodes() > max_nodes:
            raise GraphDataError(f"{where}: graph {i} has {g.number_of_nodes()} nodes, more than max_nodes={max_nodes}")
        out.append(nx.convert_node_labels_to_integers(g))
    notes = [f"{v} {k.replace('_', '-')}" for k, v in counts.items() if v]
    if notes:
        action = "skipped" if connected_only else "kept"
        warnings.warn(f"{where}: {', '.join(notes)} graph(s) (empty ones skipped, self-loops removed, "
                      f"disconnected ones {action})", stacklevel=2)
    if not out:
        raise GraphDataError(f"{where}: no usable graph (every graph is empty)")
    return out, counts


def degree_features(adj: Tensor, num_features: int) -> Tensor:
    """One-hot degrees (GDSS ``init: deg``): ``adj`` (B, N, N) -> (B, N, num_features); degrees ≥
    ``num_features − 1`` share the last class."""
    deg = adj.sum(-1).round().long().clamp(max=num_features - 1)
    return torch.nn.functional.one_hot(deg, num_features).to(adj.dtype)


@dataclass
class GraphBatch:
    """A dense, padded batch: ``x`` (B, N, F), ``adj`` (B, N, N), ``mask`` (B, N) (1 for present nodes)."""

    x: Tensor
    adj: Tensor
    mask: Tensor

    def to(self, *args: Any, **kwargs: Any) -> "GraphBatch":
        return GraphBatch(self.x.to(*args, **kwargs), self.adj.to(*args, **kwargs), self.mask.to(*args, **kwargs))

    def __len__(self) -> int:
        return self.adj.shape[0]

    def index(self, idx: Tensor) -> "GraphBatch":
        return GraphBatch(self.x[idx], self.adj[idx], self.mask[idx])


def to_dense(graphs: Sequence[Any], max_nodes: int, num_features: int, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> GraphBatch:
    """Pad networkx graphs to ``max_nodes`` (a larger graph raises :class:`GraphDataError`)."""
    import networkx as nx

    max_nodes, num_features = _count("max_nodes", max_nodes), _count("num_features", num_features)
    b = len(graphs)
    adj = torch.zeros(b, max_nodes, max_nodes, dtype=dtype)
    mask = torch.zeros(b, max_nodes, dtype=dtype)
    for i, g in enumerate(graphs):
        n = g.number_of_nodes()
        if n > max_nodes:
            raise GraphDataError(f"graph {i} has {n} nodes, more than max_nodes={max_nodes}")
        a = nx.to_numpy_array(g, nodelist=list(g.nodes()), weight=None)
        adj[i, :n, :n] = torch.as_tensor((a > 0).astype(np.float64), dtype=dtype)
        adj[i].fill_diagonal_(0)
        mask[i, :n] = 1
    x = degree_features(adj, num_features) * mask[..., None]
    return GraphBatch(x, adj, mask).to(device) if device is not None else GraphBatch(x, adj, mask)


def to_networkx(adj: Tensor, mask: Tensor | None = None, remove_isolated: bool = True) -> list:
    """Adjacency matrices (B, N, N) in {0, 1} -> networkx graphs (only the flagged nodes; isolated nodes removed
    when ``remove_isolated``, as GDSS's evaluation does; a graph left empty keeps one node)."""
    import networkx as nx

    out = []
    a = (adj.detach().cpu() > 0.5).numpy()
    m = None if mask is None else (mask.detach().cpu() > 0.5).numpy()
    for i in range(a.shape[0]):
        keep = np.arange(a.shape[1]) if m is None else np.nonzero(m[i])[0]
        g = nx.from_numpy_array(a[i][np.ix_(keep, keep)].astype(np.int64))
        g.remove_edges_from(list(nx.selfloop_edges(g)))
        if remove_isolated:
            g.remove_nodes_from(list(nx.isolates(g)))
            g = nx.convert_node_labels_to_integers(g)
        if g.number_of_nodes() == 0:
            g.add_node(0)
        out.append(g)
    return out


def permute(batch: GraphBatch, generator: torch.Generator | None = None) -> GraphBatch:
    """Permutation augmentation: each graph's node order (padding included) shuffled independently."""
    b, n = batch.mask.shape
    perm = torch.argsort(torch.rand(b, n, generator=generator), dim=1).to(batch.mask.device)
    rows = torch.arange(b, device=perm.device)[:, None]
    x = batch.x[rows, perm]
    adj = batch.adj[rows[:, :, None], perm[:, :, None], perm[:, None, :]]
    return GraphBatch(x, adj, batch.mask[rows, perm])


def node_count_distribution(graphs: Sequence[Any], max_nodes: int) -> list[float]:
    """Empirical probabilities of node counts 0..max_nodes (GDSS samples node flags from it)."""
    counts = np.zeros(max_nodes + 1)
    for g in graphs:
        counts[g.number_of_nodes()] += 1
    return (counts / counts.sum()).tolist()


def write_graphs(graphs: Sequence[Any], path: str | Path) -> None:
    """Write graphs as one text file of edge lists: ``# graph i nodes n`` then one ``u v`` line per edge."""
    from ..train.checkpoint import atomic_write_text

    lines = []
    for i, g in enumerate(graphs):
        lines.append(f"# graph {i} nodes {g.number_of_nodes()}")
        lines.extend(f"{u} {v}" for u, v in g.edges())
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_graphs(path: str | Path) -> list:
    """Read graphs from a user file or folder.

    Accepted: a text file of edge lists as written by :func:`write_graphs` (``# graph`` headers; ``nodes n``
    optional; blank lines also separate graphs), a folder of such files (``*.txt``, ``*.edgelist``, read in
    name order), ``.json`` (a list of edge lists ``[[u, v], …]``) or ``.pkl``/``.pickle`` (a pickled list of
    networkx graphs — only for files you trust). Raises :class:`GraphDataError` with the file and line.
    """
    import networkx as nx

    p = Path(path)
    if p.is_dir():
        files = sorted([*p.glob("*.txt"), *p.glob("*.edgelist")])
        if not files:
            raise GraphDataError(f"{p}: no *.txt or *.edgelist file in the folder")
        return [g for f in files for g in read_graphs(f)]
    if not p.is_file():
        raise GraphDataError(f"graph file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        try:
            with open(p, "rb") as fh:
                data = pickle.load(fh)
        except Exception as error:
            raise GraphDataError(f"{p}: cannot unpickle: {error}") from error
        if not isinstance(data, (list, tuple)) or not all(isinstance(g, nx.Graph) for g in data):
            raise GraphDataError(f"{p}: expected a pickled list of networkx graphs")
        return list(data)
    if suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            return [nx.Graph([(int(u), int(v)) for u, v in edges]) for edges in data]
        except Exception as error:
            raise GraphDataError(f"{p}: expected a JSON list of edge lists [[u, v], ...]: {error}") from error
    graphs: list = []
    current: Any = None

    def flush() -> None:
        nonlocal current
        if current is not None:
            graphs.append(current)
        current = None

    for lineno, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            flush()
            continue
        if line.startswith("#"):
            flush()
            current = nx.Graph()
            words = line.lstrip("#").split()
            if "nodes" in words:
                k = words.index("nodes")
                try:
                    current.add_nodes_from(range(int(words[k + 1])))
                except (IndexError, ValueError):
                    raise GraphDataError(f"{p}:{lineno}: bad header {line!r} (expected '# graph i nodes n')") from None
            continue
        parts = line.split()
        try:
            u, v = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            raise GraphDataError(f"{p}:{lineno}: expected an edge 'u v' of two integers, got {line!r}") from None
        if current is None:
            current = nx.Graph()
        current.add_edge(u, v)
    flush()
    if not graphs:
        raise GraphDataError(f"{p}: no graph in the file")
    return graphs
