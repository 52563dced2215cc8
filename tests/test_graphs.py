"""GDSS graphs (issue 16): data, exact permutation equivariance, S4 against an exact Gaussian score, metrics
against brute force and hand-computed values, training/resume, generation, bad input, CLI."""

from __future__ import annotations

import itertools
import math
import warnings

import networkx as nx
import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.graphs import (GDSSNetwork, GraphDataError, GraphField, GraphLayout, GraphTrainConfig, check_graphs,
                             community_small, ego_like, erdos_renyi_like, generate, graph_mmd, grid, load_graph_field,
                             orbit_counts, permute, read_graphs, s4_sample, to_dense, train_gdss, write_graphs)
from flowdiff.graphs import metrics as gm
from flowdiff.testing import Gaussian

SMALL_NET = {"x": {"depth": 2, "hidden": 8, "time_features": 4},
             "a": {"num_layers": 2, "attn_dim": 8, "hidden": 8, "c_hidden": 4, "c_final": 2, "num_heads": 2,
                   "time_features": 4}}


# ----------------------------------------------------------------------------------------- data


def test_community_small_matches_the_gdss_construction():
    gs = community_small(60, seed=3)
    sizes = {g.number_of_nodes() for g in gs}
    assert sizes <= {12, 14, 16, 18, 20} and len(sizes) >= 4
    for g in gs:
        assert nx.is_connected(g)
        half = g.number_of_nodes() // 2
        # the communities are G(n/2, 0.7) drawn with networkx seeds 0 and 1
        for k in range(2):
            part = g.subgraph(range(k * half, (k + 1) * half))
            ref = nx.gnp_random_graph(half, 0.7, seed=k)
            assert sorted((u - k * half, v - k * half) for u, v in part.edges()) == sorted(ref.edges())
    assert [sorted(g.edges()) for g in community_small(5, seed=7)] == [sorted(g.edges()) for g in community_small(5, seed=7)]


def test_grid_and_ego_like():
    g = grid(3, seed=0, low=2, high=4)
    assert all(4 <= h.number_of_nodes() <= 16 for h in g)
    e = ego_like(10, seed=0, base_nodes=500)
    assert all(4 <= h.number_of_nodes() <= 18 and nx.is_connected(h) for h in e)


def test_dense_batch_pack_and_permutation():
    gs = community_small(4, seed=0)
    batch = to_dense(gs, 20, 12, dtype=torch.float64)
    assert batch.mask.sum(1).tolist() == [g.number_of_nodes() for g in gs]
    assert torch.equal(batch.adj, batch.adj.transpose(1, 2)) and batch.adj.diagonal(dim1=1, dim2=2).abs().sum() == 0
    layout = GraphLayout(20, 12)
    x, adj = layout.unpack(layout.pack(batch.x, batch.adj))
    assert torch.equal(x, batch.x) and torch.equal(adj, batch.adj)
    p = permute(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p.adj.sum((1, 2)), batch.adj.sum((1, 2))) and torch.equal(p.mask.sum(1), batch.mask.sum(1))
    # the permuted graphs are isomorphic to the originals
    from flowdiff.graphs import to_networkx

    for a, b in zip(to_networkx(batch.adj, batch.mask), to_networkx(p.adj, p.mask)):
        assert nx.is_isomorphic(a, b)


# ------------------------------------------------------------------------------ equivariance


TINY_TRANSFORMER = {"kind": "transformer", "transformer": {"num_layers": 2, "node_dim": 16, "edge_dim": 8, "num_heads": 2,
                                                            "time_features": 4}}

TINY_PPGN = {"kind": "ppgn", "ppgn": {"channels": 8, "num_layers": 2, "time_features": 4, "spectral": 3}}


SPECTRAL_NET = {"x": {**SMALL_NET["x"], "spectral": 3}, "a": {**SMALL_NET["a"], "spectral": 3}}


@pytest.mark.parametrize("network", [SMALL_NET, SPECTRAL_NET, TINY_TRANSFORMER, TINY_PPGN],
                         ids=["gdss", "gdss-spectral", "transformer", "ppgn"])
def test_score_networks_are_exactly_permutation_equivariant(network):
    torch.manual_seed(0)
    net = GDSSNetwork(9, 5, network).double()
    b, n, f = 3, 9, 5
    mask = torch.zeros(b, n, dtype=torch.float64)
    mask[0, :9], mask[1, :6], mask[2, :4] = 1, 1, 1
    z = torch.randn(b, net.layout.size, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x, adj = net.layout.unpack(z)
    out_x, out_a = net.layout.unpack(net(z, t, mask))
    perm = torch.randperm(n)
    xp, ap, mp = x[:, perm], adj[:, perm][:, :, perm], mask[:, perm]
    zp = net.layout.pack(xp, ap)
    px, pa = net.layout.unpack(net(zp, t, mp))
    torch.testing.assert_close(px, out_x[:, perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(pa, out_a[:, perm][:, :, perm], rtol=0, atol=1e-12)
    # padded entries are exactly zero and the A-output is symmetric with a zero diagonal
    assert out_x[1, 6:].abs().max() == 0 and out_a[2, 4:].abs().max() == 0
    torch.testing.assert_close(out_a, out_a.transpose(1, 2), rtol=0, atol=0)


def test_graph_field_is_exact_on_padding():
    path = fd.paths.VP()
    net = GDSSNetwork(6, 3, SMALL_NET).double()
    fld = GraphField(net, path, [0, 0, 0, 1, 0, 0, 0])
    mask = fld.sample_masks(2, dtype=torch.float64)
    assert mask.sum(1).tolist() == [3, 3]
    z = torch.randn(2, fld.layout.size, dtype=torch.float64)
    eps = fld.noise(z, 0.3, mask=mask)
    invalid = fld.layout.valid(mask) == 0
    torch.testing.assert_close(eps[invalid], (z / path.sigma(torch.tensor(0.3, dtype=torch.float64)))[invalid])
    with pytest.raises(ValueError, match="node flags"):
        fld.noise(z, 0.3)


# ------------------------------------------------------------------------------------- S4


@pytest.mark.parametrize("snr", [0.0, 0.1])
def test_s4_reaches_the_exact_gaussian_system(snr):
    """A 2-block Gaussian 'system' with the exact score: S4 (scale_eps = 1) ends at the target's mean and variance."""
    path = fd.paths.VP()
    mean = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
    var = torch.tensor([0.5, 0.1, 1.0, 0.02], dtype=torch.float64)
    field = fd.Field(Gaussian(mean, torch.diag(var), path=path).model("noise"), path, "noise")
    x = torch.randn(8000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = s4_sample(field, x, steps=500, snr=snr, scale_eps=1.0, generator=torch.Generator().manual_seed(1),
                    components={"x": slice(0, 2), "adj": slice(2, 4)})
    torch.testing.assert_close(out.mean(0), mean, rtol=0, atol=0.04)
    torch.testing.assert_close(out.var(0) / var, torch.ones(4, dtype=torch.float64), rtol=0, atol=0.1)
    # a wrong score (variance halved) is detected by the same check
    wrong = fd.Field(Gaussian(mean, torch.diag(var / 2), path=path).model("noise"), path, "noise")
    bad = s4_sample(wrong, x[:2000], steps=100, snr=snr, scale_eps=1.0, generator=torch.Generator().manual_seed(1))
    assert (bad.var(0) / var).max() < 0.7


def test_s4_bad_arguments():
    path = fd.paths.VP()
    field = fd.Field(Gaussian(torch.zeros(2), torch.eye(2), path=path).model("noise"), path, "noise")
    x = torch.randn(4, 2)
    for kwargs, match in (({"steps": 0}, "steps"), ({"snr": -1.0}, "snr"), ({"grid": "cosine"}, "grid"),
                          ({"t_start": 0.9, "t_end": 0.5}, "t_start")):
        with pytest.raises(ValueError, match=match):
            s4_sample(field, x, **kwargs)


# ---------------------------------------------------------------------------------- metrics


def _hand_orbits() -> list[tuple[nx.Graph, list[float]]]:
    # totals over nodes of ORCA's 15 orbits, counted by hand
    k4 = [12, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]
    c4 = [8, 8, 4, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0]
    p4 = [6, 4, 2, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    star = [6, 6, 3, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 0, 0]
    paw = [8, 4, 2, 3, 0, 0, 0, 0, 0, 1, 2, 1, 0, 0, 0]
    diamond = [10, 4, 2, 6, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0]
    return [(nx.complete_graph(4), k4), (nx.cycle_graph(4), c4), (nx.path_graph(4), p4), (nx.star_graph(3), star),
            (nx.Graph([(0, 1), (1, 2), (2, 0), (0, 3)]), paw),
            (nx.Graph([(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)]), diamond)]


def test_orbit_counts_hand_and_brute_force():
    for g, expected in _hand_orbits():
        np.testing.assert_array_equal(orbit_counts(g), expected)
        np.testing.assert_array_equal(orbit_counts(g, per_node=True).sum(0), expected)
    # K4 per node: degree 3, 3 wedge-free triangles, 1 clique
    np.testing.assert_array_equal(orbit_counts(nx.complete_graph(4), per_node=True)[0],
                                  [3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    rng = np.random.default_rng(0)
    for i in range(6):
        g = nx.gnp_random_graph(int(rng.integers(5, 14)), float(rng.uniform(0.2, 0.8)), seed=i)
        np.testing.assert_array_equal(orbit_counts(g), orbit_counts(g, per_node=True).sum(0))


def _emd1d(p, q):
    from scipy.stats import wasserstein_distance

    n = max(len(p), len(q))
    p = np.pad(p, (0, n - len(p)))
    q = np.pad(q, (0, n - len(q)))
    return wasserstein_distance(np.arange(n), np.arange(n), p, q)


def test_mmds_against_brute_force():
    s1, s2 = community_small(4, seed=1), erdos_renyi_like(community_small(3, seed=2), seed=0)

    def brute(hist, sigma, scale):
        h1, h2 = [hist(g) for g in s1], [hist(g) for g in s2]
        k = lambda a, b: math.exp(-(_emd1d(a, b) / scale) ** 2 / (2 * sigma**2))  # noqa: E731
        m = lambda a, b: np.mean([k(x, y) for x in a for y in b])  # noqa: E731
        return m(h1, h1) + m(h2, h2) - 2 * m(h1, h2)

    assert gm.degree_mmd(s1, s2) == pytest.approx(brute(gm.degree_histogram, 1.0, 1.0), rel=1e-9, abs=1e-12)
    assert gm.clustering_mmd(s1, s2) == pytest.approx(brute(gm.clustering_histogram, 0.1, 100.0), rel=1e-9, abs=1e-12)
    assert gm.spectral_mmd(s1, s2) == pytest.approx(brute(gm.spectral_histogram, 1.0, 1.0), rel=1e-9, abs=1e-12)
    v1 = [orbit_counts(g) / g.number_of_nodes() for g in s1]
    v2 = [orbit_counts(g) / g.number_of_nodes() for g in s2]
    k = lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * 30.0**2))  # noqa: E731
    m = lambda a, b: np.mean([k(x, y) for x in a for y in b])  # noqa: E731
    assert gm.orbit_mmd(s1, s2) == pytest.approx(m(v1, v1) + m(v2, v2) - 2 * m(v1, v2), rel=1e-9, abs=1e-12)


def test_mmd_hand_values():
    # two single graphs: MMD² = 2 − 2k; path P3 (degrees 1,1,2 -> pmf [0, 2/3, 1/3]) vs K3 ([0, 0, 1]): W1 = 2/3
    a, b = [nx.path_graph(3)], [nx.complete_graph(3)]
    assert gm.degree_mmd(a, b) == pytest.approx(2 - 2 * math.exp(-(2 / 3) ** 2 / 2))
    # clustering: P3 all zero (bin 0), K3 all one (bin 99): W1 = 99/100
    assert gm.clustering_mmd(a, b) == pytest.approx(2 - 2 * math.exp(-(0.99**2) / (2 * 0.01)))
    assert gm.degree_mmd(a * 3, a * 3) == pytest.approx(0.0, abs=1e-15)
    res = graph_mmd(a, b)
    assert set(res) == {"degree", "clustering", "orbit", "average"}
    with pytest.raises(ValueError, match="unknown graph metric"):
        graph_mmd(a, b, metrics=("nspdk",))
    with pytest.raises(ValueError, match="empty"):
        gm.degree_mmd([], b)


# ------------------------------------------------------------------------- training and generation


def _tiny_config(**kw):
    base = dict(num_graphs=24, steps=4, batch_size=6, checkpoint_every=2, log_every=2, network=SMALL_NET)
    base.update(kw)
    return GraphTrainConfig(**base)


def test_train_resume_is_exact_and_generate(tmp_path):
    full = train_gdss(tmp_path / "full", _tiny_config())
    train_gdss(tmp_path / "part", _tiny_config(steps=2))
    # continue the interrupted run to step 4 (the stored config is used; steps raised by editing it)
    import json

    cfg_file = sorted((tmp_path / "part" / "checkpoints").glob("step_*"))[-1] / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["train"]["steps"] = 4
    cfg_file.write_text(json.dumps(cfg))
    resumed = train_gdss(tmp_path / "part", resume=True)
    for p, q in zip(full.network.state_dict().values(), resumed.network.state_dict().values()):
        assert torch.equal(p, q)
    field = load_graph_field(tmp_path / "full")
    assert isinstance(field, GraphField) and field.layout.max_nodes == full.layout.max_nodes
    graphs = generate(tmp_path / "full", 5, generator=0, solver="s4", steps=6, grid="log_snr", snr=0.0, weights="ema",
                      final_denoise=False)
    assert len(graphs) == 5 and all(isinstance(g, nx.Graph) for g in graphs)
    again = generate(field, 5, generator=0, solver="s4", steps=6, grid="log_snr", snr=0.0,
                      final_denoise=False)
    assert [sorted(g.edges()) for g in graphs] == [sorted(g.edges()) for g in again]
    # a library solver on the joint field, per component
    # (restart=None: this 4-step model's data prediction at t_min is ~1e5, which restarts amplify to inf;
    # restart sampling itself is checked against exact oracles in test_solvers_restart.py)
    lib = generate(field, 3, generator=1, solver="dpm-solver++2m", steps=5, final_denoise=False, restart=None)
    assert len(lib) == 3
    # ... and with restarts the error says so and names the way out
    from flowdiff.solvers import NonFiniteStateError

    with pytest.raises(NonFiniteStateError, match=r"during Restart sampling.*restart=None"):
        generate(field, 3, generator=1, steps=5)
    # the default sampler without restarts (DPM-Solver++(2M) ODE, data prediction quantised at the end)
    default = generate(field, 3, generator=1, steps=5, restart=None)
    assert len(default) == 3 and all(isinstance(g, nx.Graph) for g in default)
    with pytest.raises(ValueError, match="threshold"):
        generate(field, 1, threshold=1.5)
    with pytest.raises(ValueError, match="restart must be"):
        generate(field, 1, restart={"repeat": 3})
    with pytest.raises(ValueError, match="already holds a run"):
        train_gdss(tmp_path / "full", _tiny_config(), resume=False)


def test_time_sampler_option(tmp_path):
    field = train_gdss(tmp_path / "edm", _tiny_config(steps=2, time_sampler={"name": "edm", "p_mean": -0.5, "p_std": 1.5}))
    assert isinstance(field, GraphField)
    import json

    saved = json.loads((tmp_path / "edm" / "checkpoints" / "step_00000002" / "config.json").read_text())
    assert saved["train"]["time_sampler"] == {"name": "edm", "p_mean": -0.5, "p_std": 1.5}
    with pytest.raises(ValueError, match="time_sampler"):
        _tiny_config(time_sampler="cosine").check()
    with pytest.raises(ValueError, match="time_sampler"):
        _tiny_config(time_sampler=3).check()


def test_bad_graph_input(tmp_path):
    gs = community_small(3, seed=0)
    with pytest.raises(GraphDataError, match="more than max_nodes=10"):
        to_dense(gs, 10, 12)
    with pytest.raises(GraphDataError, match="graph 0 has .* nodes, more than max_nodes=10"):
        check_graphs(gs, max_nodes=10)
    disconnected = nx.disjoint_union(nx.path_graph(3), nx.path_graph(3))
    with pytest.warns(UserWarning, match="1 empty, 1 disconnected"):
        kept, counts = check_graphs([gs[0], nx.empty_graph(4), disconnected])
    assert len(kept) == 2 and counts == {"empty": 1, "disconnected": 1, "self_loops": 0}
    with pytest.warns(UserWarning):
        kept, _ = check_graphs([gs[0], disconnected], connected_only=True)
    assert len(kept) == 1
    with pytest.raises(GraphDataError, match="no usable graph"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_graphs([nx.empty_graph(3)])
    bad = tmp_path / "bad.txt"
    bad.write_text("# graph 0\n0 1\n1 x\n")
    with pytest.raises(GraphDataError, match="bad.txt:3"):
        read_graphs(bad)
    good = tmp_path / "g.txt"
    write_graphs(gs, good)
    assert [sorted(g.edges()) for g in read_graphs(good)] == [sorted(g.edges()) for g in gs]
    # a user file with an empty and a too-large graph: training skips the first, refuses the second
    user = tmp_path / "user.txt"
    write_graphs([gs[0], nx.empty_graph(2), nx.path_graph(30)], user)
    with pytest.raises(GraphDataError, match="more than max_nodes=20"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_gdss(tmp_path / "run", _tiny_config(data=str(user), max_nodes=20))


# ---------------------------------------------------------------------------------------- CLI


def _cli(args):
    from flowdiff.cli import main

    try:
        return main(args)
    except SystemExit as exit_:  # pragma: no cover - main returns the code
        return exit_.code


def test_cli_train_sample_eval(tmp_path, capsys):
    user = tmp_path / "train.txt"
    write_graphs(community_small(12, seed=0) + [nx.empty_graph(3)], user)
    run = tmp_path / "run"
    assert _cli(["train", "--data", str(user), "--steps", "2", "--batch", "4", "-o", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "1 empty" in err
    assert _cli(["train", "--data", str(user), "--steps", "2", "-o", str(run), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _cli(["train", "--data", "community_small", "--prediction", "v", "-o", str(tmp_path / "r2")]) == 2
    assert _cli(["train", "--data", "community_small", "--network", "unet", "-o", str(tmp_path / "r2")]) == 2
    assert "ppgn" in capsys.readouterr().err
    ppgn_run = tmp_path / "ppgn"
    assert _cli(["train", "--data", str(user), "--network", "ppgn", "--steps", "2", "--batch", "4", "-o",
                 str(ppgn_run), "--quiet"]) == 0
    assert type(fd.graphs.load_graph_field(ppgn_run).network.net).__name__ == "PPGN"
    capsys.readouterr()
    assert _cli(["train", "--data", "qm9-like", "--network", "ppgn", "-o", str(tmp_path / "r3")]) == 2
    assert "gdss" in capsys.readouterr().err
    out = tmp_path / "samples"
    # (a 2-step model: its samples blow up under restarts, so the plain ODE; the option is checked too)
    assert _cli(["sample", "-c", str(run), "--nfe", "4", "--grid", "logsnr", "-n", "6", "-o", str(out), "--quiet",
                 "--solver-option", "restart=bogus"]) == 2
    assert _cli(["sample", "-c", str(run), "--nfe", "4", "--grid", "logsnr", "-n", "6", "-o", str(out), "--quiet",
                 "--solver-option", "restart=none"]) == 0
    assert (out / "graphs.txt").is_file() and (out / "graphs.png").is_file()
    assert len(read_graphs(out / "graphs.txt")) == 6
    capsys.readouterr()
    assert _cli(["eval", "-s", str(out), "--data", "community_small", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "orbit" in text and "floor" in text and (out / "metrics.json").is_file()


def test_spectral_features_match_a_hand_computed_spectrum():
    """Two disjoint cliques K4 + K3 and a K4 with padding: the top eigenvalues are 3 and 2 (resp. 3); the top
    eigenvectors are the clique indicators, so n·v vᵀ is n/|clique| on the clique's pairs; padding is zero."""
    from flowdiff.graphs.nets import spectral_features

    n = 9
    adj = torch.zeros(2, n, n, dtype=torch.float64)
    adj[0, :4, :4] = 1
    adj[0, 4:7, 4:7] = 1
    adj[1, :4, :4] = 1
    adj = adj * (1 - torch.eye(n, dtype=torch.float64))
    mask = torch.zeros(2, n, dtype=torch.float64)
    mask[0, :7], mask[1, :4] = 1, 1
    proj, node = spectral_features(adj, mask, 2)
    # graph 0 (7 nodes): top eigenvalue 3 (the K4), second 2 (the K3)
    torch.testing.assert_close(node[0, 0, 2:], torch.tensor([2 / 7, 3 / 7], dtype=torch.float64))
    k4 = torch.zeros(n, n, dtype=torch.float64)
    k4[:4, :4] = 7 / 4
    k3 = torch.zeros(n, n, dtype=torch.float64)
    k3[4:7, 4:7] = 7 / 3
    torch.testing.assert_close(proj[0, 1], k4)
    torch.testing.assert_close(proj[0, 0], k3)
    torch.testing.assert_close(node[0, :, 1], torch.diagonal(k4))
    # graph 1 (4 nodes): top eigenvalue 3; the second is -1 (three-fold), its projection is some unit vector's
    assert abs(node[1, 0, 3].item() - 3 / 4) < 1e-12 and abs(node[1, 0, 2].item() + 1 / 4) < 1e-12
    torch.testing.assert_close(proj[1, 1, :4, :4], torch.ones(4, 4, dtype=torch.float64))
    assert proj[:, :, 7:].abs().max() == 0 and proj[1, :, 4:].abs().max() == 0 and node[1, 4:].abs().max() == 0
    torch.testing.assert_close(torch.diagonal(proj[1, 0], dim1=-2, dim2=-1)[:4].sum(), torch.tensor(4.0, dtype=torch.float64))
