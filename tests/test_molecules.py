"""Molecules for GDSS (flowdiff.graphs.molecules): SMILES <-> dense tensors, valency correction, metrics, bad input."""

import math
import warnings

import pytest
import torch

pytest.importorskip("rdkit")

from flowdiff.graphs import molecules as fm  # noqa: E402

QM9_ATOMS = ("C", "N", "O", "F")


def canon(s):
    from rdkit import Chem

    return Chem.MolToSmiles(Chem.MolFromSmiles(s))


def dense(atoms, bonds, n=None):
    """Hand-built (X, A, mask): atoms as symbols, bonds {(i, j): order}."""
    n = n or len(atoms)
    x = torch.zeros(1, n, len(QM9_ATOMS))
    adj = torch.zeros(1, n, n)
    mask = torch.zeros(1, n)
    for i, a in enumerate(atoms):
        x[0, i, QM9_ATOMS.index(a)] = 1
        mask[0, i] = 1
    for (i, j), o in bonds.items():
        adj[0, i, j] = adj[0, j, i] = o
    return x, adj, mask


def test_smiles_round_trip_through_dense_tensors():
    smiles = ["CCO", "C=O", "C#N", "c1ccccc1", "O=C1CCC(=O)N1", "FC(F)(F)C#CO", "c1ccncc1", "CC(C)(C)N", "C"]
    batch = fm.smiles_to_dense(smiles, QM9_ATOMS, 9)
    assert batch.x.shape == (9, 9, 4) and batch.adj.shape == (9, 9, 9)
    # exact encodings: C=O has bond order 2, C#N order 3, benzene is kekulized (3 single + 3 double bonds)
    assert batch.adj[1, 0, 1] == 2 and batch.x[1, 1].tolist() == [0, 0, 1, 0]
    assert batch.adj[2, 0, 1] == 3
    benzene = batch.adj[3][:6, :6]
    assert torch.equal(benzene, benzene.T) and sorted(benzene[benzene > 0].tolist()) == [1] * 6 + [2] * 6
    assert batch.mask.sum(1).tolist() == [3, 2, 2, 6, 7, 7, 6, 5, 1]
    assert fm.dense_to_smiles(batch, QM9_ATOMS) == [canon(s) for s in smiles]
    # any node order decodes to the same molecule
    from flowdiff.graphs import permute

    shuffled = permute(batch, generator=torch.Generator().manual_seed(0))
    assert fm.dense_to_smiles(shuffled, QM9_ATOMS) == [canon(s) for s in smiles]
    # the built-in set round-trips exactly
    data = fm.molecule_dataset("qm9-like")
    assert 300 < len(data) and all(fm.check_valency(__import__("rdkit.Chem").Chem.MolFromSmiles(s)) == [] for s in data[:50])
    assert fm.dense_to_smiles(fm.smiles_to_dense(data, QM9_ATOMS, 9), QM9_ATOMS) == data


@pytest.mark.parametrize("atoms, bonds, charges, expected", [
    (["C"] * 6, {(0, k): 1 for k in range(1, 6)}, True, "CC(C)(C)C"),  # pentavalent C: one bond removed
    (["C", "O", "C"], {(0, 1): 2, (1, 2): 2}, True, "COC"),  # O with two double bonds: both lowered
    (["C", "F"], {(0, 1): 2}, True, "CF"),  # C=F -> C-F
    (["N", "C", "C", "C", "C"], {(0, k): 1 for k in range(1, 5)}, False, "CN(C)C"),  # N with 4 bonds, no charges
    # C with valence 6: the highest-order bond is lowered each round: C#C#C -> C=C#C -> C=C=C
    (["C", "C", "C"], {(0, 1): 3, (1, 2): 3}, True, "C=C=C"),
])
def test_valency_correction_makes_overvalent_molecules_valid(atoms, bonds, charges, expected):
    x, adj, mask = dense(atoms, bonds)
    out = fm.decode_molecules(x, adj, mask, QM9_ATOMS, correct=True, charges=charges)
    assert out.valid_wo_correction == [False]
    assert out.smiles == [canon(expected)]
    uncorrected = fm.decode_molecules(x, adj, mask, QM9_ATOMS, correct=False, charges=charges)
    assert uncorrected.smiles == [None] and uncorrected.valid_wo_correction == [False]


def test_charge_rule_and_valid_molecules_untouched():
    # GDSS's construct_mol: N with valence 4 becomes [N+] and counts as valid without correction
    x, adj, mask = dense(["N", "C", "C", "C", "C"], {(0, k): 1 for k in range(1, 5)})
    out = fm.decode_molecules(x, adj, mask, QM9_ATOMS, charges=True)
    assert out.valid_wo_correction == [True] and out.smiles == [canon("C[N+](C)(C)C")]
    assert out.valid_wo_correction_neutral == [False]  # the same molecule without the cation rule
    # a valid molecule passes unchanged; thresholds 0.5 / 1.5 / 2.5 quantise noisy bond orders
    x, adj, mask = dense(["C", "C", "O"], {(0, 1): 1.4, (1, 2): 1.6})
    assert fm.decode_molecules(x + 0.2, adj, mask, QM9_ATOMS).smiles == [canon("CC=O")]
    # disconnected fragments: valid without correction (GDSS), the largest fragment is kept
    x, adj, mask = dense(["C", "C", "C", "O"], {(0, 1): 1, (1, 2): 1})
    out = fm.decode_molecules(x, adj, mask, QM9_ATOMS)
    assert out.valid_wo_correction == [True] and out.smiles == ["CCC"]
    m = fm.molecule_metrics(out, ["CC"], ["CCO", "CCN"], fcd=False, floor=False)
    assert m["validity_wo_correction"] == 1.0 and m["validity_wo_correction_neutral"] == 1.0
    assert m["valid_connected_wo_correction"] == 0.0  # CCC.O is two fragments


def test_correction_always_gives_rdkit_valid_molecules_on_random_graphs():
    from rdkit import Chem

    g = torch.Generator().manual_seed(0)
    b, n = 200, 9
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (b, n), generator=g), 4).float()
    a = torch.rand(b, n, n, generator=g) * 3.5
    adj = torch.triu(a, 1) + torch.triu(a, 1).transpose(1, 2)
    mask = (torch.arange(n)[None] < torch.randint(2, n + 1, (b, 1), generator=g)).float()
    out = fm.decode_molecules(x, adj, mask, QM9_ATOMS)
    assert all(s is not None and Chem.MolFromSmiles(s) is not None for s in out.smiles)
    assert sum(out.valid_wo_correction) < b  # dense random bond orders are mostly over-valent
    stats = fm.validity_uniqueness_novelty(out)
    assert stats["validity"] == 1.0 and stats["validity_wo_correction"] == sum(out.valid_wo_correction) / b


def test_validity_uniqueness_novelty_by_hand():
    generated = ["CCO", "OCC", "C1CC1", None, "CC", "C1CC", "not a smiles"]
    out = fm.validity_uniqueness_novelty(generated, train_smiles=["CC", "CCC"])
    # valid: CCO, CCO, C1CC1, CC (4 of 7); distinct: CCO, C1CC1, CC (3 of 4); novel: CCO, C1CC1 (2 of 3)
    assert out["validity"] == pytest.approx(4 / 7)
    assert out["uniqueness"] == pytest.approx(3 / 4)
    assert out["novelty"] == pytest.approx(2 / 3)
    samples = fm.MoleculeSamples(["CC", None], [True, False], ["CC", None])
    assert fm.validity_uniqueness_novelty(samples)["validity_wo_correction"] == 0.5


def test_nspdk_mmd_against_hand_computed_values():
    assert fm.nspdk_mmd(["CCO", "c1ccccc1", "CC#N"], ["OCC", "C1=CC=CC=C1", "N#CC"]) == pytest.approx(0.0, abs=1e-12)
    # single atoms share no feature: k = 0, MMD² = 1 + 1 - 0
    assert fm.nspdk_mmd(["C"], ["O"]) == pytest.approx(2.0)
    # CC vs CO: of the 10 non-empty (r, d) blocks (r = 0..4, d = 0, 1), only (r=0, d=0) overlaps:
    # (C,C) ×2 vs (C,C), (O,O) -> cosine 1/√2 in that block; each block weighs 1/10 after normalisation
    assert fm.nspdk_mmd(["CC"], ["CO"]) == pytest.approx(2 - 2 * (1 / math.sqrt(2)) / 10)
    feats = fm.nspdk_features(["CCO", "C1CC1"])
    assert all(sum(v * v for v in f.values()) == pytest.approx(1.0) for f in feats)
    a, b = ["CCO", "CCN", "C1CC1"], ["CC=O", "CCC", "OCCO"]
    assert fm.nspdk_mmd(a, b) == pytest.approx(fm.nspdk_mmd(b, a)) and fm.nspdk_mmd(a, b) > 0


def test_invalid_smiles_are_skipped_and_counted_or_one_error(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept, counts = fm.clean_smiles(["CCO", "not_a_smiles", "C1CC", "CC[Na]", "[NH4+]"], QM9_ATOMS, 9,
                                       where="x.smi")
    assert kept == ["CCO"] and counts["invalid"] == 2 and counts["atoms"] == 1 and counts["charged"] == 1
    assert len(caught) == 1 and "skipped 4 of 5" in str(caught[0].message) and "2 invalid" in str(caught[0].message)
    with pytest.raises(fm.MoleculeDataError, match=r"bad\.smi: no usable molecule among 2 \(2 invalid\)"):
        fm.clean_smiles(["xx", "C1C"], where="bad.smi")
    # a user file with invalid lines trains (skip + count in the run's info) and samples without a crash
    f = tmp_path / "mols.smi"
    f.write_text("smiles\nCCO\nc1ccccc1 benzene\nnot_a_smiles\nCC(=O)N\nCCN\nOCC=O\nC#N\n")
    cfg = fm.MoleculeTrainConfig(data=str(f), steps=3, batch_size=4, log_every=1, checkpoint_every=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        field = fm.train_molecules(tmp_path / "run", cfg)
    assert any("1 invalid" in str(w.message) for w in caught)
    assert field.info["molecules"]["atoms"] == ["C", "N", "O"] and field.info["max_nodes"] == 6
    assert field.info["skipped"]["invalid"] == 1
    out = fm.generate_molecules(tmp_path / "run", 5, generator=0, steps=4)
    assert len(out.smiles) == len(out.valid_wo_correction) == 5
    # another network kind is refused (the molecule trainer builds GDSS's networks only)
    with pytest.raises(ValueError, match="GDSS networks"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm.train_molecules(tmp_path / "run_ppgn", fm.MoleculeTrainConfig(data=str(f), steps=1, network={"kind": "ppgn"}))


def test_cli_rejects_an_all_invalid_smiles_file_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from flowdiff.cli import app

    bad = tmp_path / "bad.smi"
    bad.write_text("xx\nC1C\n")
    res = CliRunner().invoke(app, ["train", "--data", str(bad), "-o", str(tmp_path / "run"), "--steps", "2"])
    assert res.exit_code == 1
    assert "no usable molecule among 2 (2 invalid)" in res.output and "Traceback" not in res.output


def test_fcd_is_zero_for_identical_sets():
    pytest.importorskip("fcd_torch")
    a = ["CCO", "CCN", "c1ccccc1", "CC(=O)O", "CCCC", "CNC", "OCCO", "CC#N"]
    assert abs(fm.fcd_score(a, list(reversed(a)))) < 1e-3
    assert fm.fcd_score(a, ["CCCCCCCC", "CCOCC", "c1ccncc1", "NCCN", "FC(F)F"]) > 1.0
