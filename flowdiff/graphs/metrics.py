r"""Graph-generation metrics with the GDSS/GraphRNN kernels: degree, clustering, orbit and spectral MMD².

You, Ying, Ren, Hamilton & Leskovec (2018), "GraphRNN" (the protocol and kernels), as used by Jo, Lee &
Hwang (2022), "GDSS". For two sets of graphs the **biased** (V-statistic) estimator

.. math:: \mathrm{MMD}^2 = \overline{K(S_1, S_1)} + \overline{K(S_2, S_2)} - 2\,\overline{K(S_1, S_2)}

(diagonals included) is computed with

* degree: the normalised degree histogram, ``k(p, q) = exp(−W₁(p, q)²/(2σ²))``, σ = 1, W₁ the earth mover's
  distance on the integer support with cost ``|i − j|`` (for 1-D histograms ``W₁ = Σ_k |CDF_p(k) − CDF_q(k)|``);
* clustering: 100-bin histogram of the local clustering coefficients on [0, 1], the same kernel with σ = 0.1
  and cost ``|i − j|/100``;
* orbit: the 15 node-orbit counts of 2–4-node graphlets (ORCA's orbits 0–14, Hočevar & Demšar 2014) summed over
  nodes and divided by the node count, Gaussian kernel on the L2 distance, σ = 30 (not normalised);
* spectral: 200-bin histogram of the normalised-Laplacian eigenvalues on [−1e−5, 2], normalised, EMD kernel
  with σ = 1 and cost ``|i − j|`` (bins), GDSS's setting.

Orbit counts are computed here, without the ORCA binary: graph totals from closed-form counts of
non-induced subgraphs (degrees, triangles, ``tr A⁴``, per-edge triangles, 4-cliques) converted to induced
graphlet counts through the exact containment matrix of the six connected 4-node graphlets; per-node counts
by brute-force enumeration for small graphs (``orbit_counts(g, per_node=True)``). Inside a graphlet the orbits
are told apart by the node's degree in it (paw: 9 = pendant, 10 = the two degree-2 nodes, 11 = the
degree-3 node; the MMD does not depend on the order of the 15 coordinates).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["gaussian_emd_kernel", "gaussian_kernel", "mmd_squared", "degree_histogram", "clustering_histogram",
           "spectral_histogram", "orbit_counts", "degree_mmd", "clustering_mmd", "orbit_mmd", "spectral_mmd",
           "graph_mmd", "erdos_renyi_like", "evaluate_graphs", "METRICS"]


# ------------------------------------------------------------------------------------------------
# kernels and the estimator
# ------------------------------------------------------------------------------------------------


def _pad(hists: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(hists), length))
    for i, h in enumerate(hists):
        out[i, : len(h)] = h
    return out


def gaussian_emd_kernel(h1: Sequence[np.ndarray], h2: Sequence[np.ndarray], sigma: float = 1.0,
                        distance_scaling: float = 1.0) -> np.ndarray:
    """Kernel matrix ``exp(−W₁²/(2σ²))`` between two lists of 1-D histograms (each normalised to sum 1 first;
    padded with zeros to a common length), ``W₁`` with ground cost ``|i − j|/distance_scaling``."""
    length = max(max(len(h) for h in h1), max(len(h) for h in h2))
    a, b = _pad(h1, length), _pad(h2, length)
    a = a / a.sum(1, keepdims=True)
    b = b / b.sum(1, keepdims=True)
    ca, cb = np.cumsum(a, 1), np.cumsum(b, 1)
    w1 = np.abs(ca[:, None, :] - cb[None, :, :]).sum(-1) / distance_scaling
    return np.exp(-(w1**2) / (2 * sigma**2))


def gaussian_kernel(v1: np.ndarray, v2: np.ndarray, sigma: float = 30.0) -> np.ndarray:
    """Kernel matrix ``exp(−‖x − y‖²/(2σ²))`` between the rows of ``v1`` and ``v2``."""
    d2 = ((v1[:, None, :] - v2[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


def mmd_squared(kernel: Callable[[Any, Any], np.ndarray], s1: Any, s2: Any) -> float:
    """The biased MMD² of two samples under ``kernel(a, b) -> matrix``."""
    return float(kernel(s1, s1).mean() + kernel(s2, s2).mean() - 2 * kernel(s1, s2).mean())


# ------------------------------------------------------------------------------------------------
# per-graph statistics
# ------------------------------------------------------------------------------------------------


def degree_histogram(g: Any) -> np.ndarray:
    """``nx.degree_histogram`` (counts of degrees 0, 1, …) as floats."""
    import networkx as nx

    return np.asarray(nx.degree_histogram(g), dtype=np.float64)


def clustering_histogram(g: Any, bins: int = 100) -> np.ndarray:
    """Histogram of the local clustering coefficients on [0, 1] with ``bins`` bins."""
    import networkx as nx

    values = list(nx.clustering(g).values())
    return np.histogram(values, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)


def spectral_histogram(g: Any, bins: int = 200) -> np.ndarray:
    """Histogram of the normalised-Laplacian eigenvalues on [−1e−5, 2] (``bins`` bins)."""
    import networkx as nx

    lap = nx.normalized_laplacian_matrix(g).toarray()
    eig = np.linalg.eigvalsh(lap)
    return np.histogram(eig, bins=bins, range=(-1e-5, 2.0))[0].astype(np.float64)


# Connected graphlets on 4 nodes, as edge lists on {0, 1, 2, 3}.
_GRAPHLETS4 = {
    "path": [(0, 1), (1, 2), (2, 3)],
    "star": [(0, 1), (0, 2), (0, 3)],
    "cycle": [(0, 1), (1, 2), (2, 3), (3, 0)],
    "paw": [(0, 1), (1, 2), (2, 0), (0, 3)],
    "diamond": [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)],
    "clique": [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)],
}
_ORDER = list(_GRAPHLETS4)


@functools.lru_cache(maxsize=1)
def _containment() -> np.ndarray:
    """``M[h, g]`` = number of spanning subgraphs of graphlet g isomorphic to graphlet h (exact, by enumeration)."""
    import networkx as nx

    m = np.zeros((6, 6), dtype=np.int64)
    for j, gname in enumerate(_ORDER):
        edges = _GRAPHLETS4[gname]
        for r in range(3, len(edges) + 1):
            for subset in itertools.combinations(edges, r):
                sub = nx.Graph(list(subset))
                if sub.number_of_nodes() < 4 or not nx.is_connected(sub):
                    continue
                for i, hname in enumerate(_ORDER):
                    if nx.is_isomorphic(sub, nx.Graph(_GRAPHLETS4[hname])):
                        m[i, j] += 1
    return m


def _graphlet_totals(g: Any) -> dict[str, float]:
    """Induced counts of edges, wedges, triangles and the six connected 4-node graphlets."""
    import networkx as nx

    a = nx.to_numpy_array(g, weight=None).astype(np.int64)
    np.fill_diagonal(a, 0)
    a = (a > 0).astype(np.int64)
    d = a.sum(1)
    edges = int(d.sum()) // 2
    a2 = a @ a
    t_node = (a2 * a).sum(1) // 2  # triangles at each node
    triangles = int(t_node.sum()) // 3
    wedges = int((d * (d - 1) // 2).sum()) - 3 * triangles
    iu = np.triu_indices_from(a, 1)
    on = a[iu] > 0
    eu, ev = iu[0][on], iu[1][on]
    t_edge = a2[eu, ev]
    noninduced = np.zeros(6, dtype=np.int64)
    noninduced[0] = int(((d[eu] - 1) * (d[ev] - 1)).sum()) - 3 * triangles  # paths on 4 nodes
    noninduced[1] = int((d * (d - 1) * (d - 2) // 6).sum())  # stars
    trace4 = int((a2 * a2).sum())
    noninduced[2] = (trace4 - 2 * int((d * d).sum()) + int(d.sum())) // 8  # 4-cycles
    noninduced[3] = int((t_node * (d - 2)).sum())  # paws
    noninduced[4] = int((t_edge * (t_edge - 1) // 2).sum())  # diamonds
    common = a[eu] * a[ev]  # (E, n) common neighbours of each edge
    noninduced[5] = int(np.einsum("ei,ij,ej->", common, a, common)) // 12  # 4-cliques (each seen by 6 edges, twice)
    induced = np.linalg.solve(_containment().astype(np.float64), noninduced.astype(np.float64))
    out = {"edge": edges, "wedge": wedges, "triangle": triangles}
    out.update({name: float(round(v)) for name, v in zip(_ORDER, induced)})
    return out


def _orbit_totals(g: Any) -> np.ndarray:
    c = _graphlet_totals(g)
    return np.array([2 * c["edge"], 2 * c["wedge"], c["wedge"], 3 * c["triangle"], 2 * c["path"], 2 * c["path"],
                     3 * c["star"], c["star"], 4 * c["cycle"], c["paw"], 2 * c["paw"], c["paw"], 2 * c["diamond"],
                     2 * c["diamond"], 4 * c["clique"]], dtype=np.float64)


# orbit of a node from (number of edges of the induced graphlet, the node's degree in it)
_ORBIT_OF = {
    (2, 1): 1, (2, 2): 2, (3, 2): 3,  # 3-node graphlets: wedge end/centre, triangle
}


def _orbit4(num_edges: int, degs: tuple[int, ...], deg: int) -> int:
    if num_edges == 3:
        if max(degs) == 3:
            return 7 if deg == 3 else 6
        return 4 if deg == 1 else 5
    if num_edges == 4:
        if max(degs) == 2:
            return 8
        return {1: 9, 2: 10, 3: 11}[deg]
    if num_edges == 5:
        return 12 if deg == 2 else 13
    return 14


def _orbit_per_node(g: Any) -> np.ndarray:
    import networkx as nx

    nodes = list(g.nodes())
    index = {v: i for i, v in enumerate(nodes)}
    out = np.zeros((len(nodes), 15))
    for v in nodes:
        out[index[v], 0] = g.degree(v)
    for size in (3, 4):
        for subset in itertools.combinations(nodes, size):
            sub = g.subgraph(subset)
            if not nx.is_connected(sub):
                continue
            m = sub.number_of_edges()
            degs = tuple(sub.degree(v) for v in subset)
            for v, dv in zip(subset, degs):
                orbit = _ORBIT_OF[(m, dv)] if size == 3 else _orbit4(m, degs, dv)
                out[index[v], orbit] += 1
    return out


def orbit_counts(g: Any, per_node: bool = False) -> np.ndarray:
    """ORCA's 15 node-orbit counts (graphlets of 2–4 nodes, induced).

    ``per_node=False``: the totals over nodes (15,), closed-form and fast for any graph size.
    ``per_node=True``: the (n, 15) counts of every node by enumerating all 3- and 4-node subsets
    (O(n⁴): graphs up to ~40 nodes).
    """
    if per_node:
        if g.number_of_nodes() > 60:
            raise ValueError(f"per_node orbit counts enumerate 4-node subsets; the graph has {g.number_of_nodes()} "
                             "nodes (at most 60)")
        return _orbit_per_node(g)
    return _orbit_totals(g)


# ------------------------------------------------------------------------------------------------
# MMDs
# ------------------------------------------------------------------------------------------------


def _check_sets(s1: Sequence[Any], s2: Sequence[Any]) -> tuple[list, list]:
    import networkx as nx

    out = []
    for name, s in (("first", s1), ("second", s2)):
        s = list(s)
        if not s:
            raise ValueError(f"the {name} set of graphs is empty")
        for i, g in enumerate(s):
            if not isinstance(g, nx.Graph):
                raise TypeError(f"{name} set: entry {i} is a {type(g).__name__}, not a networkx.Graph")
            if g.number_of_nodes() == 0:
                raise ValueError(f"{name} set: graph {i} has no node (drop empty graphs before evaluating)")
        out.append(s)
    return out[0], out[1]


def degree_mmd(s1: Sequence[Any], s2: Sequence[Any]) -> float:
    """Degree MMD² (EMD kernel, σ = 1)."""
    s1, s2 = _check_sets(s1, s2)
    h1, h2 = [degree_histogram(g) for g in s1], [degree_histogram(g) for g in s2]
    return mmd_squared(lambda a, b: gaussian_emd_kernel(a, b, 1.0, 1.0), h1, h2)


def clustering_mmd(s1: Sequence[Any], s2: Sequence[Any], bins: int = 100) -> float:
    """Clustering MMD² (100-bin histogram, EMD kernel, σ = 0.1, cost |i − j|/100)."""
    s1, s2 = _check_sets(s1, s2)
    h1, h2 = [clustering_histogram(g, bins) for g in s1], [clustering_histogram(g, bins) for g in s2]
    h1 = [h if h.sum() > 0 else _unit(bins) for h in h1]
    h2 = [h if h.sum() > 0 else _unit(bins) for h in h2]
    return mmd_squared(lambda a, b: gaussian_emd_kernel(a, b, 0.1, float(bins)), h1, h2)


def _unit(bins: int) -> np.ndarray:
    h = np.zeros(bins)
    h[0] = 1.0
    return h


def orbit_mmd(s1: Sequence[Any], s2: Sequence[Any]) -> float:
    """Orbit MMD² (orbit totals / node count, Gaussian kernel σ = 30)."""
    s1, s2 = _check_sets(s1, s2)
    v1 = np.stack([orbit_counts(g) / g.number_of_nodes() for g in s1])
    v2 = np.stack([orbit_counts(g) / g.number_of_nodes() for g in s2])
    return mmd_squared(lambda a, b: gaussian_kernel(a, b, 30.0), v1, v2)


def spectral_mmd(s1: Sequence[Any], s2: Sequence[Any]) -> float:
    """Spectral MMD² (200-bin normalised-Laplacian spectrum histogram, EMD kernel σ = 1, bin cost)."""
    s1, s2 = _check_sets(s1, s2)
    h1, h2 = [spectral_histogram(g) for g in s1], [spectral_histogram(g) for g in s2]
    return mmd_squared(lambda a, b: gaussian_emd_kernel(a, b, 1.0, 1.0), h1, h2)


METRICS = {"degree": degree_mmd, "clustering": clustering_mmd, "orbit": orbit_mmd, "spectral": spectral_mmd}


def graph_mmd(reference: Sequence[Any], generated: Sequence[Any],
              metrics: Sequence[str] = ("degree", "clustering", "orbit")) -> dict[str, float]:
    """The named MMD²s between two sets of graphs and their ``average`` (over the degree/clustering/orbit ones given)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown graph metric(s) {unknown}; valid: {', '.join(METRICS)}")
    out = {m: METRICS[m](reference, generated) for m in metrics}
    main = [out[m] for m in ("degree", "clustering", "orbit") if m in out]
    if main:
        out["average"] = float(np.mean(main))
    return out


def erdos_renyi_like(graphs: Sequence[Any], seed: int | np.random.Generator | None = 0) -> list:
    """Erdős–Rényi graphs with each reference graph's node count and edge density (the baseline of the tables)."""
    import networkx as nx

    rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
    out = []
    for g in graphs:
        n = g.number_of_nodes()
        p = nx.density(g) if n > 1 else 0.0
        out.append(nx.gnp_random_graph(n, p, seed=int(rng.integers(2**31))))
    return out


def evaluate_graphs(generated: Sequence[Any], reference: Sequence[Any], floor_reference: Sequence[Any] | None = None,
                    metrics: Sequence[str] = ("degree", "clustering", "orbit"), seed: int = 0) -> dict[str, Any]:
    """MMD²s of ``generated`` vs ``reference``, with the real-vs-real floor (``reference`` vs ``floor_reference``,
    another independent reference set, when given) and the Erdős–Rényi baseline (ER graphs matched to
    ``floor_reference`` or ``reference``). Empty graphs among ``generated`` are dropped and counted."""
    kept = [g for g in generated if g.number_of_nodes() > 0 and g.number_of_edges() > 0]
    result: dict[str, Any] = {"num_generated": len(kept), "num_dropped_empty": len(list(generated)) - len(kept),
                              "num_reference": len(list(reference))}
    if not kept:
        raise ValueError("every generated graph is empty; nothing to evaluate")
    result["model"] = graph_mmd(reference, kept, metrics)
    base = floor_reference if floor_reference is not None else reference
    if floor_reference is not None:
        result["floor"] = graph_mmd(reference, floor_reference, metrics)
    result["erdos_renyi"] = graph_mmd(reference, erdos_renyi_like(base, seed), metrics)
    if "floor" in result and result["floor"].get("average", 0) > 0:
        result["ratio_to_floor"] = result["model"]["average"] / result["floor"]["average"]
    return result
