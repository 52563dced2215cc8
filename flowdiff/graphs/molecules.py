r"""Molecules as graphs for GDSS (Jo, Lee & Hwang, ICML 2022, §4.2): data, decoding with valency correction, metrics.

A molecule with at most ``max_atoms`` heavy atoms is a graph ``(X, A, mask)`` (as in GDSS's QM9/ZINC250k
loaders): ``X`` (N, F) one-hot atom types over the data set's atom list (no hydrogens), ``A`` (N, N) the
**kekulized** bond orders 1 / 2 / 3 as values (0 = no bond; GDSS's ``adj`` after its ``argmax``/relabel step),
``mask`` the present atoms. It is trained with the generic GDSS model of :mod:`flowdiff.graphs.model`
(:class:`~flowdiff.graphs.model.GDSSNetwork`, :func:`~flowdiff.graphs.model.gdss_loss`,
:class:`~flowdiff.graphs.model.GraphField`) by :func:`train_molecules`, which writes an ordinary GDSS graph run
(``fd.graphs.load_graph_field(RUN)`` loads it) with a ``"molecules"`` section in its data description.

Decoding (:func:`decode_molecules`, GDSS's ``quantize_mol`` / ``construct_mol`` / ``correct_mol`` /
``valid_mol_can_with_seg``, the last two after MoFlow, Zang & Wang, KDD 2020):

* bond orders by thresholds 0.5 / 1.5 / 2.5 on A; an atom is present where it is flagged and its largest X
  entry exceeds 0.5 (else it is GDSS's "virtual" atom), its type the argmax;
* ``charges=True`` (GDSS): an N, O or S exceeding its neutral valence by exactly one gets a formal charge +1;
* **validity without correction**: every atom within its allowed valence (RDKit's valence lists; GDSS's
  ``check_valency``), fragments allowed (GDSS's definition);
* **valency correction** (``correct=True``, switchable): while some atom is over-valent, the first such atom's
  highest-order bond is lowered by one (removed if single); then the largest connected fragment is kept and
  the molecule must survive an RDKit SMILES round trip.

Data sets (built from molecule files that installed packages ship; nothing is downloaded):

* ``qm9-like``: every molecule of RDKit's ``Data/NCI/first_5K.smi`` and the SD files under ``rdkit/Data`` and
  ``rdkit/Contrib`` whose largest fragment has 2–9 heavy atoms, all in {C, N, O, F}, no formal charge
  (≈ 420 distinct molecules; QM9 itself has 134 k — **a different, much smaller data set**);
* ``zinc-like``: the same files plus ``Data/Pains/test_data/wehi_mols.csv``, ≤ 38 heavy atoms over ZINC250k's
  atoms {C, N, O, F, P, S, Cl, Br, I}, neutral (≈ 15 k molecules; not ZINC250k).

Metrics (:func:`molecule_metrics`): validity w/o correction, validity, uniqueness and novelty (MOSES's
definitions: unique / valid, novel unique / unique, on RDKit canonical SMILES), FCD (Preuer et al. 2018, with
``fcd_torch``'s bundled ChemNet weights) and NSPDK MMD² (:func:`nspdk_mmd`, our own implementation of the
neighbourhood subgraph pairwise distance kernel of Costa & De Grave 2010 as GDSS uses it through EDeN).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .data import GraphBatch, GraphDataError, node_count_distribution

__all__ = ["MOLECULE_DATASETS", "MoleculeDataError", "MoleculeTrainConfig", "MoleculeSamples", "molecule_dataset",
           "read_smiles", "clean_smiles", "smiles_to_dense", "dense_to_smiles", "decode_molecules", "correct_valency",
           "check_valency", "train_molecules", "generate_molecules", "molecule_metrics", "nspdk_mmd",
           "nspdk_features", "fcd_score", "validity_uniqueness_novelty", "draw_molecules", "is_molecule_run",
           "is_smiles_file"]

#: the built-in molecule sets: atom types (the X one-hot order) and the largest heavy-atom count
MOLECULE_DATASETS: dict[str, dict[str, Any]] = {
    "qm9-like": {"atoms": ("C", "N", "O", "F"), "max_atoms": 9, "min_atoms": 2},
    "zinc-like": {"atoms": ("C", "N", "O", "F", "P", "S", "Cl", "Br", "I"), "max_atoms": 38, "min_atoms": 2},
}
_BOND_ORDERS = {1: "SINGLE", 2: "DOUBLE", 3: "TRIPLE"}


class MoleculeDataError(GraphDataError):
    """Molecules that cannot be used (one-line message naming the file and the problem)."""


def _chem():
    try:
        from rdkit import Chem, RDLogger
    except ImportError as error:  # pragma: no cover - rdkit is in the graphs extra
        raise ImportError("molecules need RDKit: pip install 'flowdiff[graphs]'") from error
    RDLogger.DisableLog("rdApp.*")
    return Chem


def _dataset_key(name: str) -> str | None:
    key = str(name).lower().replace("_", "-")
    return key if key in MOLECULE_DATASETS else None


# ------------------------------------------------------------------------------------------------
# reading and cleaning
# ------------------------------------------------------------------------------------------------


def is_smiles_file(path: str | Path) -> bool:
    """A ``.smi`` file, or a ``.csv`` whose header has a ``smiles`` column."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".smi":
        return True
    if p.suffix.lower() == ".csv":
        with open(p, encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
        return any(c.strip().strip('"').lower() == "smiles" for c in header.split(","))
    return False


def read_smiles(path: str | Path) -> list[str]:
    """SMILES strings of a ``.smi`` (first whitespace-separated field per line; ``#`` comments and a ``smiles``
    header skipped), a ``.csv`` (its ``smiles`` column, else the first column) or an ``.sdf`` file (written as
    SMILES; unreadable records become ``""``, counted invalid later)."""
    p = Path(path)
    if not p.is_file():
        raise MoleculeDataError(f"{p}: no such molecule file")
    suffix = p.suffix.lower()
    if suffix == ".sdf":
        Chem = _chem()
        return [Chem.MolToSmiles(m) if m is not None else "" for m in Chem.SDMolSupplier(str(p))]
    out: list[str] = []
    with open(p, encoding="utf-8", errors="replace", newline="") as fh:
        if suffix == ".csv":
            rows = csv.reader(fh)
            header = next(rows, [])
            names = [h.strip().lower() for h in header]
            col = names.index("smiles") if "smiles" in names else 0
            if "smiles" not in names:  # no header: the first row is data
                out.append(header[0] if header else "")
            out.extend(row[col] if len(row) > col else "" for row in rows)
        else:
            for line in fh:
                parts = line.split()
                if not parts or parts[0].startswith("#") or parts[0].lower() == "smiles":
                    continue
                out.append(parts[0])
    return out


def _shipped_files(name: str) -> list[Path]:
    from rdkit import RDConfig

    data, contrib = Path(RDConfig.RDDataDir), Path(RDConfig.RDContribDir)
    files = [data / "NCI" / "first_5K.smi"]
    if name == "zinc-like":
        files.append(data / "Pains" / "test_data" / "wehi_mols.csv")
    files += sorted(data.rglob("*.sdf")) + sorted(contrib.rglob("*.sdf"))
    return [f for f in files if f.is_file()]


def clean_smiles(smiles: Iterable[str], atoms: Sequence[str] | None = None, max_atoms: int | None = None,
                 min_atoms: int = 1, largest_fragment: bool = False, where: str = "SMILES list",
                 warn: bool = True) -> tuple[list[str], dict[str, int]]:
    """Canonical, kekulizable SMILES of the usable molecules, and the counts of what was skipped.

    Skipped (and counted): unparsable SMILES (``invalid``), molecules of several fragments unless
    ``largest_fragment`` (``fragments``; with it the largest fragment is kept), formal charges or radicals
    (``charged``), atoms outside ``atoms`` (``atoms``), more than ``max_atoms`` or fewer than ``min_atoms`` heavy
    atoms (``size``). One warning lists the counts; :class:`MoleculeDataError` if nothing is left.
    """
    Chem = _chem()
    allowed = None if atoms is None else set(atoms)
    counts = Counter()
    out: list[str] = []
    total = 0
    for s in smiles:
        total += 1
        mol = Chem.MolFromSmiles(str(s).strip()) if str(s).strip() else None
        if mol is None:
            counts["invalid"] += 1
            continue
        frags = Chem.GetMolFrags(mol, asMols=True)
        if len(frags) > 1:
            if not largest_fragment:
                counts["fragments"] += 1
                continue
            mol = max(frags, key=lambda m: (m.GetNumHeavyAtoms(), Chem.MolToSmiles(m)))
        if any(a.GetFormalCharge() != 0 or a.GetNumRadicalElectrons() != 0 for a in mol.GetAtoms()):
            counts["charged"] += 1
            continue
        if allowed is not None and any(a.GetSymbol() not in allowed for a in mol.GetAtoms()):
            counts["atoms"] += 1
            continue
        n = mol.GetNumHeavyAtoms()
        if n < min_atoms or (max_atoms is not None and n > max_atoms):
            counts["size"] += 1
            continue
        try:
            Chem.Kekulize(Chem.Mol(mol), clearAromaticFlags=True)
        except Exception:  # noqa: BLE001 - rdkit raises its own types
            counts["invalid"] += 1
            continue
        Chem.RemoveStereochemistry(mol)  # the dense graph has no stereo: canonical SMILES without it
        out.append(Chem.MolToSmiles(mol))
    counts = {k: int(v) for k, v in counts.items()}
    counts["kept"], counts["total"] = len(out), total
    if not out:
        detail = ", ".join(f"{v} {k}" for k, v in counts.items() if k not in ("kept", "total")) or "the file is empty"
        raise MoleculeDataError(f"{where}: no usable molecule among {total} ({detail})")
    skipped = total - len(out)
    if skipped and warn:
        parts = ", ".join(f"{v} {k}" for k, v in counts.items() if k not in ("kept", "total") and v)
        warnings.warn(f"{where}: skipped {skipped} of {total} molecules ({parts}); {len(out)} kept", stacklevel=2)
    return out, counts


@functools.lru_cache(maxsize=4)
def _dataset_cached(key: str) -> tuple[str, ...]:
    spec = MOLECULE_DATASETS[key]
    raw: list[str] = []
    for f in _shipped_files(key):
        raw.extend(read_smiles(f))
    smiles, _ = clean_smiles(raw, spec["atoms"], spec["max_atoms"], spec["min_atoms"], largest_fragment=True,
                             where=key, warn=False)
    return tuple(sorted(set(smiles)))


def molecule_dataset(name: str) -> list[str]:
    """The distinct canonical SMILES of a built-in set (``"qm9-like"`` or ``"zinc-like"``; module docstring)."""
    key = _dataset_key(name)
    if key is None:
        raise ValueError(f"unknown molecule data set {name!r}; valid: {', '.join(MOLECULE_DATASETS)}")
    return list(_dataset_cached(key))


# ------------------------------------------------------------------------------------------------
# SMILES <-> dense tensors
# ------------------------------------------------------------------------------------------------


def _atom_order(atoms: Sequence[str]) -> tuple[str, ...]:
    Chem = _chem()
    table = Chem.GetPeriodicTable()
    return tuple(sorted(set(atoms), key=lambda s: table.GetAtomicNumber(s)))


def smiles_to_dense(smiles: Sequence[str], atoms: Sequence[str], max_atoms: int, dtype: torch.dtype = torch.float32,
                    device: Any = None) -> GraphBatch:
    """Molecules -> a dense batch: ``x`` (B, N, F) one-hot atom types (order of ``atoms``), ``adj`` (B, N, N) the
    kekulized bond orders 1/2/3, ``mask`` (B, N); atoms in the order of the SMILES. Unparsable SMILES, unknown
    atoms or too many atoms raise :class:`MoleculeDataError` naming the molecule (clean with :func:`clean_smiles`)."""
    Chem = _chem()
    index = {a: i for i, a in enumerate(atoms)}
    b, n, f = len(smiles), int(max_atoms), len(atoms)
    x = torch.zeros(b, n, f, dtype=dtype)
    adj = torch.zeros(b, n, n, dtype=dtype)
    mask = torch.zeros(b, n, dtype=dtype)
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            raise MoleculeDataError(f"molecule {i} ({s!r}) is not a valid SMILES")
        Chem.Kekulize(mol, clearAromaticFlags=True)
        if mol.GetNumAtoms() > n:
            raise MoleculeDataError(f"molecule {i} ({s!r}) has {mol.GetNumAtoms()} heavy atoms, more than max_atoms={n}")
        for a in mol.GetAtoms():
            if a.GetSymbol() not in index:
                raise MoleculeDataError(f"molecule {i} ({s!r}) has atom {a.GetSymbol()}; allowed: {', '.join(atoms)}")
            x[i, a.GetIdx(), index[a.GetSymbol()]] = 1
            mask[i, a.GetIdx()] = 1
        for bond in mol.GetBonds():
            order = int(round(bond.GetBondTypeAsDouble()))
            if order not in _BOND_ORDERS:
                raise MoleculeDataError(f"molecule {i} ({s!r}) has a bond of order {bond.GetBondTypeAsDouble()}")
            u, v = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            adj[i, u, v] = adj[i, v, u] = order
    batch = GraphBatch(x, adj, mask)
    return batch.to(device) if device is not None else batch


def _max_valence(Chem: Any, atomic_num: int, charge: int) -> int:
    """RDKit's largest allowed valence of an element with a formal charge (isoelectronic element for ±1)."""
    table = Chem.GetPeriodicTable()
    valences = [v for v in table.GetValenceList(max(1, atomic_num - charge)) if v >= 0]
    return max(valences) if valences else 0


def _explicit_valences(mol: Any) -> list[float]:
    """Sum of bond orders per atom (aromatic bonds count 1.5; the molecules built here are kekulized)."""
    val = [0.0] * mol.GetNumAtoms()
    for b in mol.GetBonds():
        o = b.GetBondTypeAsDouble()
        val[b.GetBeginAtomIdx()] += o
        val[b.GetEndAtomIdx()] += o
    return val


def check_valency(mol: Any) -> list[int]:
    """Indices of the over-valent atoms (explicit valence, i.e. the sum of kekulized bond orders, above RDKit's
    largest allowed valence for the element and formal charge); empty for a valid molecule (GDSS's
    ``check_valency``)."""
    Chem = _chem()
    val = _explicit_valences(mol)
    return [a.GetIdx() for a in mol.GetAtoms()
            if val[a.GetIdx()] > _max_valence(Chem, a.GetAtomicNum(), a.GetFormalCharge()) + 1e-6]


def _construct(Chem: Any, symbols: Sequence[str], bonds: dict[tuple[int, int], int], charges: bool) -> Any:
    mol = Chem.RWMol()
    for s in symbols:
        mol.AddAtom(Chem.Atom(s))
    for (u, v), o in sorted(bonds.items()):
        mol.AddBond(int(u), int(v), getattr(Chem.BondType, _BOND_ORDERS[o]))
    if charges:  # GDSS's construct_mol: [N+], [O+], [S+] for a valence one above the neutral one
        val = _explicit_valences(mol)
        for a in mol.GetAtoms():
            if a.GetSymbol() in ("N", "O", "S"):
                table = Chem.GetPeriodicTable()
                neutral = min(v for v in table.GetValenceList(a.GetAtomicNum()) if v >= 0)
                if val[a.GetIdx()] - neutral == 1 and val[a.GetIdx()] > _max_valence(Chem, a.GetAtomicNum(), 0):
                    a.SetFormalCharge(1)
    return mol


def correct_valency(mol: Any) -> tuple[Any, bool]:
    """MoFlow/GDSS valency correction: while an atom is over-valent, lower the highest-order bond of the first such
    atom by one (remove a single bond). Returns ``(corrected RWMol, was_valid_without_correction)``."""
    Chem = _chem()
    mol = Chem.RWMol(mol)
    bad = check_valency(mol)
    no_correction = not bad
    guard = 4 * mol.GetNumBonds() + 1
    while bad and guard > 0:
        guard -= 1
        atom = mol.GetAtomWithIdx(bad[0])
        bonds = sorted(atom.GetBonds(), key=lambda b: -b.GetBondTypeAsDouble())  # stable: first highest order
        if not bonds:
            break
        b = bonds[0]
        u, v, o = b.GetBeginAtomIdx(), b.GetEndAtomIdx(), int(round(b.GetBondTypeAsDouble()))
        mol.RemoveBond(u, v)
        if o > 1:
            mol.AddBond(u, v, getattr(Chem.BondType, _BOND_ORDERS[o - 1]))
        bad = check_valency(mol)
    return mol, no_correction


def _canonical_largest(Chem: Any, mol: Any) -> str | None:
    """GDSS's valid_mol_can_with_seg: the largest fragment's canonical SMILES, if RDKit accepts the molecule."""
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    try:
        m = mol.GetMol() if hasattr(mol, "GetMol") else mol
        Chem.SanitizeMol(m)
        s = Chem.MolToSmiles(m)
    except Exception:  # noqa: BLE001 - rdkit sanitisation errors
        return None
    frags = [f for f in s.split(".") if f]
    if not frags:
        return None
    best = max(frags, key=lambda f: (Chem.MolFromSmiles(f).GetNumAtoms() if Chem.MolFromSmiles(f) else -1, f))
    m2 = Chem.MolFromSmiles(best)
    return None if m2 is None else Chem.MolToSmiles(m2)


@dataclass
class MoleculeSamples:
    """Decoded molecules: ``smiles`` (canonical SMILES of the largest fragment after correction, or ``None`` for an
    invalid one), ``valid_wo_correction`` (bool per molecule), ``raw_smiles`` (before correction, all fragments;
    ``None`` where RDKit rejects it)."""

    smiles: list
    valid_wo_correction: list
    raw_smiles: list
    correct: bool = True
    #: validity without correction and without GDSS's cation rule (every atom neutral), per molecule
    valid_wo_correction_neutral: list = dc_field(default_factory=list)

    def __len__(self) -> int:
        return len(self.smiles)


def decode_molecules(x: Tensor, adj: Tensor, mask: Tensor, atoms: Sequence[str], correct: bool = True,
                     charges: bool = True) -> MoleculeSamples:
    """Continuous ``(X, A, mask)`` -> molecules (module docstring: GDSS's quantisation, construction and valency
    correction). ``correct=False`` keeps the uncorrected molecule (invalid ones become ``None``)."""
    Chem = _chem()
    x, adj = x.detach().cpu().double(), adj.detach().cpu().double()
    m = mask.detach().cpu() > 0.5
    q = torch.zeros_like(adj, dtype=torch.long)
    q[adj >= 0.5] = 1
    q[adj >= 1.5] = 2
    q[adj >= 2.5] = 3
    out = MoleculeSamples([], [], [], correct)
    for i in range(x.shape[0]):
        present = m[i] & (x[i].max(-1).values > 0.5)
        idx = torch.nonzero(present).flatten().tolist()
        symbols = [atoms[int(x[i, j].argmax())] for j in idx]
        pos = {j: k for k, j in enumerate(idx)}
        bonds = {}
        for a_ in idx:
            for b_ in idx:
                if a_ < b_ and int(q[i, a_, b_]) > 0:
                    bonds[(pos[a_], pos[b_])] = int(q[i, a_, b_])
        mol = _construct(Chem, symbols, bonds, charges)
        ok = bool(symbols) and not check_valency(mol)
        out.valid_wo_correction.append(ok)
        neutral = mol if not charges else _construct(Chem, symbols, bonds, False)
        out.valid_wo_correction_neutral.append(bool(symbols) and not check_valency(neutral))
        out.raw_smiles.append(_raw_smiles(Chem, mol) if ok else None)
        if correct:
            fixed, _ = correct_valency(mol)
            out.smiles.append(_canonical_largest(Chem, fixed))
        else:
            out.smiles.append(_canonical_largest(Chem, mol) if ok else None)
    return out


def _raw_smiles(Chem: Any, mol: Any) -> str | None:
    try:
        m = Chem.Mol(mol)
        Chem.SanitizeMol(m)
        return Chem.MolToSmiles(m)
    except Exception:  # noqa: BLE001
        return None


def dense_to_smiles(batch: GraphBatch, atoms: Sequence[str]) -> list:
    """Exact inverse of :func:`smiles_to_dense` on clean data: canonical SMILES (no correction needed)."""
    return decode_molecules(batch.x, batch.adj, batch.mask, atoms, correct=False, charges=False).smiles


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------


def _canonical(Chem: Any, smiles: str | None) -> str | None:
    """RDKit canonical SMILES without stereochemistry (``None`` for an invalid or empty one)."""
    m = Chem.MolFromSmiles(smiles) if smiles else None
    if m is None or m.GetNumAtoms() == 0:
        return None
    Chem.RemoveStereochemistry(m)
    return Chem.MolToSmiles(m)


def validity_uniqueness_novelty(samples: MoleculeSamples | Sequence[str | None], train_smiles: Iterable[str] = (),
                                valid_wo_correction: Sequence[bool] | None = None) -> dict[str, float]:
    """Fractions over all generated molecules (GDSS / MOSES): ``validity`` = valid / generated,
    ``validity_wo_correction`` = valid before correction / generated, ``uniqueness`` = distinct valid / valid,
    ``novelty`` = distinct valid not in the training set / distinct valid (canonical SMILES)."""
    Chem = _chem()
    if isinstance(samples, MoleculeSamples):
        smiles, valid_wo_correction = samples.smiles, samples.valid_wo_correction
    else:
        smiles = list(samples)
    total = len(smiles)
    if total == 0:
        raise ValueError("no generated molecules to evaluate")
    canon = [_canonical(Chem, s) for s in smiles]
    valid = [s for s in canon if s is not None]
    unique = set(valid)
    train = {c for c in (_canonical(Chem, s) for s in train_smiles) if c is not None}
    out = {"num_generated": total, "validity": len(valid) / total,
           "uniqueness": len(unique) / len(valid) if valid else 0.0,
           "novelty": len(unique - train) / len(unique) if unique else 0.0}
    if valid_wo_correction is not None:
        out["validity_wo_correction"] = float(sum(bool(v) for v in valid_wo_correction)) / total
    return out


def _incidence_graph(Chem: Any, smiles: str) -> tuple[list[str], list[list[int]], int]:
    """A molecule as EDeN sees it: atoms and bonds are nodes (bond nodes labelled by ``int(bond order)``, GDSS's
    ``mols_to_nx`` edge label), each bond node joined to its two atoms. Returns labels, adjacency, #atoms."""
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"not a valid SMILES: {smiles!r}")
    n = mol.GetNumAtoms()
    labels = [a.GetSymbol() for a in mol.GetAtoms()]
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for b in mol.GetBonds():
        k = len(labels)
        labels.append(str(int(b.GetBondTypeAsDouble())))
        nbrs.append([b.GetBeginAtomIdx(), b.GetEndAtomIdx()])
        nbrs[b.GetBeginAtomIdx()].append(k)
        nbrs[b.GetEndAtomIdx()].append(k)
    return labels, nbrs, n


def _bfs(nbrs: list[list[int]], root: int, limit: int) -> dict[int, int]:
    dist = {root: 0}
    frontier = [root]
    for d in range(1, limit + 1):
        nxt = []
        for u in frontier:
            for v in nbrs[u]:
                if v not in dist:
                    dist[v] = d
                    nxt.append(v)
        frontier = nxt
    return dist


def nspdk_features(smiles: Sequence[str], radius: int = 4, distance: int = 4,
                   _ids: dict | None = None) -> list[dict]:
    r"""NSPDK feature vectors (Costa & De Grave, ICML 2010, "Fast neighborhood subgraph pairwise distance kernel"),
    as EDeN computes them for GDSS (``complexity=4``, ``discrete=True``) on the bond-as-node graph.

    For every atom pair (u, v) at bond distance d ≤ ``distance`` and every radius r ≤ ``radius`` (both in bond
    hops, i.e. 2r and 2d in the bond-as-node graph), the feature ``(r, d, {h_r(u), h_r(v)})`` counts once per
    ordered pair, where ``h_r(u)`` identifies the rooted neighbourhood subgraph of radius r around u (node labels
    with their distance from the root, and its edges) exactly (interned, so no hash collisions; EDeN hashes into
    2^16 buckets). Each (r, d) block is normalised to unit L2 norm, then the whole vector (EDeN's
    ``inner_normalization`` and ``normalization``). Returns one sparse dict per molecule.
    """
    Chem = _chem()
    ids = {} if _ids is None else _ids
    out = []
    for s in smiles:
        labels, nbrs, n = _incidence_graph(Chem, s)
        dists = [_bfs(nbrs, u, 2 * max(radius, distance)) for u in range(n)]
        hashes = []
        for u in range(n):
            hu = []
            for r in range(radius + 1):
                inside = {v: d for v, d in dists[u].items() if d <= 2 * r}
                nodes = tuple(sorted((d, labels[v]) for v, d in inside.items()))
                edges = tuple(sorted(tuple(sorted(((inside[a], labels[a]), (inside[b], labels[b]))))
                                     for a in inside for b in nbrs[a] if b in inside and a < b))
                hu.append(ids.setdefault((nodes, edges), len(ids)))
            hashes.append(hu)
        blocks: dict[tuple[int, int], Counter] = defaultdict(Counter)
        for u in range(n):
            for v, d2 in dists[u].items():
                if v >= n or d2 > 2 * distance:
                    continue
                d = d2 // 2
                for r in range(radius + 1):
                    a, b = hashes[u][r], hashes[v][r]
                    blocks[(r, d)][(r, d, min(a, b), max(a, b))] += 1
        vec: dict = {}
        for block in blocks.values():
            norm = math.sqrt(sum(c * c for c in block.values()))
            for k, c in block.items():
                vec[k] = c / norm
        total = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        out.append({k: v / total for k, v in vec.items()})
    return out


def nspdk_mmd(smiles1: Sequence[str], smiles2: Sequence[str], radius: int = 4, distance: int = 4) -> float:
    """NSPDK MMD² between two molecule sets (GDSS: linear kernel on :func:`nspdk_features`, biased estimator
    ``mean K11 + mean K22 − 2 mean K12``). Invalid/``None`` entries are dropped."""
    from scipy import sparse

    s1 = [s for s in smiles1 if s]
    s2 = [s for s in smiles2 if s]
    if not s1 or not s2:
        raise ValueError(f"nspdk_mmd needs two non-empty molecule sets, got {len(s1)} and {len(s2)}")
    ids: dict = {}
    f1 = nspdk_features(s1, radius, distance, ids)
    f2 = nspdk_features(s2, radius, distance, ids)
    cols: dict = {}

    def matrix(feats: list[dict]) -> Any:
        rows, cs, vals = [], [], []
        for i, f in enumerate(feats):
            for k, v in f.items():
                rows.append(i)
                cs.append(cols.setdefault(k, len(cols)))
                vals.append(v)
        return rows, cs, vals

    m1, m2 = matrix(f1), matrix(f2)
    x = sparse.csr_matrix((m1[2], (m1[0], m1[1])), shape=(len(f1), len(cols)))
    y = sparse.csr_matrix((m2[2], (m2[0], m2[1])), shape=(len(f2), len(cols)))
    kxx, kyy, kxy = (x @ x.T).toarray(), (y @ y.T).toarray(), (x @ y.T).toarray()
    return float(kxx.mean() + kyy.mean() - 2 * kxy.mean())


_FCD_MODEL: dict[str, Any] = {}


def fcd_score(smiles1: Sequence[str], smiles2: Sequence[str]) -> float:
    """Fréchet ChemNet Distance (Preuer et al. 2018) with ``fcd_torch`` (its ChemNet weights ship in the wheel and
    load offline). ``ImportError`` with an install hint if ``fcd_torch`` is missing."""
    try:
        from fcd_torch import FCD
    except ImportError as error:
        raise ImportError("FCD needs fcd_torch: pip install 'flowdiff[graphs]'") from error
    s1 = [s for s in smiles1 if s]
    s2 = [s for s in smiles2 if s]
    if len(s1) < 2 or len(s2) < 2:
        raise ValueError(f"FCD needs at least 2 valid molecules per set, got {len(s1)} and {len(s2)}")
    if "fcd" not in _FCD_MODEL:
        _FCD_MODEL["fcd"] = FCD(device="cpu", n_jobs=1)
    return float(_FCD_MODEL["fcd"](s1, s2))


def molecule_metrics(samples: MoleculeSamples | Sequence[str | None], train_smiles: Sequence[str],
                     test_smiles: Sequence[str], fcd: bool = True, nspdk: bool = True,
                     floor: bool = True, seed: int = 0) -> dict[str, Any]:
    """All GDSS molecule metrics: :func:`validity_uniqueness_novelty` (vs ``train_smiles``), FCD and NSPDK MMD² of
    the valid molecules vs ``test_smiles`` (GDSS compares with the test set), and with ``floor`` the same two for
    a random subset of the training set of the test set's size (real vs real). FCD that cannot run is reported as
    ``None`` with the reason in ``fcd_error``."""
    result = validity_uniqueness_novelty(samples, train_smiles)
    smiles = samples.smiles if isinstance(samples, MoleculeSamples) else list(samples)
    if isinstance(samples, MoleculeSamples):
        result["validity_wo_correction"] = float(np.mean(samples.valid_wo_correction))
        if samples.valid_wo_correction_neutral:
            result["validity_wo_correction_neutral"] = float(np.mean(samples.valid_wo_correction_neutral))
        if samples.raw_smiles:
            result["valid_connected_wo_correction"] = float(np.mean([bool(r) and "." not in r
                                                                     for r in samples.raw_smiles]))
    valid = [s for s in smiles if s]
    result["num_valid"] = len(valid)
    result["num_test"] = len(test_smiles)
    rng = np.random.default_rng(seed)
    ref = [train_smiles[i] for i in rng.permutation(len(train_smiles))[: len(test_smiles)]] if floor else []
    if nspdk:
        result["nspdk"] = nspdk_mmd(valid, test_smiles) if valid else None
        if floor:
            result["nspdk_floor"] = nspdk_mmd(ref, test_smiles)
    if fcd:
        try:
            result["fcd"] = fcd_score(valid, test_smiles)
            if floor:
                result["fcd_floor"] = fcd_score(ref, test_smiles)
        except (ImportError, OSError, RuntimeError, ValueError) as error:
            result["fcd"] = None
            result["fcd_error"] = f"FCD skipped: {error}"
    return result


def draw_molecules(smiles: Sequence[str | None], path: str | Path, columns: int = 6, limit: int = 36) -> None:
    """A PNG grid of drawn molecules (``rdkit.Chem.Draw``; invalid ones are left out)."""
    Chem = _chem()
    from rdkit.Chem import Draw

    mols = [Chem.MolFromSmiles(s) for s in smiles if s][:limit]
    mols = [m for m in mols if m is not None]
    if not mols:
        mols = [Chem.MolFromSmiles("C")]
    img = Draw.MolsToGridImage(mols, molsPerRow=columns, subImgSize=(200, 200),
                               legends=[Chem.MolToSmiles(m) for m in mols])
    img.save(str(path))


# ------------------------------------------------------------------------------------------------
# training and sampling (the generic GDSS model of flowdiff.graphs.model)
# ------------------------------------------------------------------------------------------------

#: GDSS's QM9 network sizes (X: GCN depth 2, nhid 16; A: 3 GMH layers, adim 16, nhid 16, 3 linears,
#: c 2/8/4, 4 heads), with our ``time_features``.
MOLECULE_NETWORK: dict[str, Any] = {
    "x": {"depth": 2, "hidden": 16, "time_features": 8},
    "a": {"num_layers": 3, "attn_dim": 16, "hidden": 16, "c_init": 2, "c_hidden": 8, "c_final": 4, "num_heads": 4,
          "num_linears": 3, "time_features": 8},
}


@dataclass
class MoleculeTrainConfig:
    """Options of :func:`train_molecules` (defaults: ``flowdiff train --data qm9-like``).

    ``data``: ``"qm9-like"``, ``"zinc-like"`` or a SMILES file (``.smi``, ``.csv`` with a ``smiles`` column,
    ``.sdf``); a user file's atom types are the ones it contains and ``max_atoms`` its largest molecule unless
    given. ``test_fraction`` of the distinct molecules (seeded by ``data_seed``) is held out for FCD/NSPDK.
    Optimiser as GDSS (Adam, exponential decay, clipping, EMA); ``path`` a dict for
    :func:`flowdiff.paths.get_path`.
    """

    data: str = "qm9-like"
    data_seed: int = 0
    test_fraction: float = 0.2
    seed: int = 0
    steps: int = 6000
    batch_size: int = 128
    lr: float = 5e-3
    lr_decay: float = 0.9995
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema: float = 0.999
    augment: bool = True
    max_atoms: int | None = None
    atoms: list | None = None
    path: dict = dc_field(default_factory=lambda: {"name": "vp", "beta_min": 0.1, "beta_max": 20.0})
    network: dict = dc_field(default_factory=dict)
    prediction: str = "noise"
    checkpoint_every: int = 1000
    keep_last: int = 2
    log_every: int = 100

    def check(self) -> "MoleculeTrainConfig":
        for name in ("steps", "batch_size", "checkpoint_every", "keep_last", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("lr_decay", 0.0, 1.0), ("ema", 0.0, 1.0),
                             ("test_fraction", 0.0, 0.9), ("grad_clip", 0.0, math.inf)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v <= hi) or (name == "lr" and v == 0):
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if self.prediction not in ("noise", "data"):
            raise ValueError(f"unknown prediction {self.prediction!r}; valid: noise (GDSS), data")
        if _dataset_key(self.data) is None and not Path(self.data).is_file():
            raise ValueError(f"unknown molecule data {self.data!r}; valid: {', '.join(MOLECULE_DATASETS)} or a SMILES "
                             "file (.smi, .csv with a smiles column, .sdf)")
        return self


def _load_molecules(cfg: MoleculeTrainConfig) -> tuple[list[str], dict]:
    key = _dataset_key(cfg.data)
    if key is not None:
        spec = MOLECULE_DATASETS[key]
        smiles = molecule_dataset(key)
        atoms = tuple(cfg.atoms or spec["atoms"])
        max_atoms = cfg.max_atoms or spec["max_atoms"]
        if cfg.atoms or cfg.max_atoms:
            smiles, counts = clean_smiles(smiles, atoms, max_atoms, where=key)
        else:
            counts = {"kept": len(smiles), "total": len(smiles)}
        return smiles, {"dataset": key, "atoms": list(atoms), "max_atoms": int(max_atoms), "counts": counts}
    raw = read_smiles(cfg.data)
    smiles, counts = clean_smiles(raw, cfg.atoms, cfg.max_atoms, where=str(cfg.data))
    Chem = _chem()
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    atoms = _atom_order(cfg.atoms or {a.GetSymbol() for m in mols for a in m.GetAtoms()})
    max_atoms = cfg.max_atoms or max(m.GetNumAtoms() for m in mols)
    smiles = list(dict.fromkeys(smiles))  # distinct, file order
    return smiles, {"dataset": str(cfg.data), "atoms": list(atoms), "max_atoms": int(max_atoms), "counts": counts}


def _split(smiles: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if fraction <= 0 or len(smiles) < 5:
        return list(smiles), []
    order = np.random.default_rng(seed).permutation(len(smiles))
    n_test = max(1, int(round(fraction * len(smiles))))
    test = sorted(smiles[i] for i in order[:n_test])
    train = sorted(smiles[i] for i in order[n_test:])
    return train, test


def is_molecule_run(run: str | Path) -> bool:
    """Whether a run/checkpoint folder holds a GDSS molecule model."""
    from ..train.checkpoint import CheckpointError, resolve_checkpoint

    try:
        folder = resolve_checkpoint(run)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (CheckpointError, OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("graphs"), dict) and "molecules" in config["graphs"]


def train_molecules(output_dir: str | Path, config: MoleculeTrainConfig | None = None, resume: bool = True,
                    log: Callable[[str], None] | None = None, device: Any = "cpu") -> Any:
    """Train a GDSS molecule model into ``output_dir`` (the same run format and optimiser as
    :func:`~flowdiff.graphs.model.train_gdss`; training and test SMILES in ``train_smiles.txt`` /
    ``test_smiles.txt``). Resumes exactly from the latest checkpoint when ``resume``. Returns the
    :class:`~flowdiff.graphs.model.GraphField` (EMA weights).

    All data checks (invalid SMILES skipped and counted, or one :class:`MoleculeDataError`) happen before the
    first update; a non-finite loss stops before the update (:class:`flowdiff.train.NonFiniteLossError`).
    """
    from ..paths import get_path
    from ..train.checkpoint import (atomic_write_text, list_checkpoints, load_checkpoint, load_training_state,
                                    remove_temporary_files)
    from .model import GRAPH_RUN_KIND, GDSSNetwork, _fit

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(out)
    say = log or (lambda s: None)
    existing = list_checkpoints(out)
    state = None
    if existing and resume:
        model_state, ema_state, saved = load_checkpoint(out)
        if saved.get("kind") != GRAPH_RUN_KIND or "molecules" not in saved.get("graphs", {}):
            raise ValueError(f"{out} holds a run that is not a GDSS molecule run")
        cfg = MoleculeTrainConfig(**saved["train"])
        info = saved["graphs"]
        state = load_training_state(Path(saved["checkpoint_dir"]))
        train = (out / "train_smiles.txt").read_text(encoding="utf-8").split()
        say(f"resuming {out} at step {state['step']}")
    else:
        if existing:
            raise ValueError(f"{out} already holds a run (pass resume=True or another folder)")
        cfg = (config or MoleculeTrainConfig()).check()
        smiles, mol_info = _load_molecules(cfg)
        train, test = _split(smiles, cfg.test_fraction, cfg.data_seed)
        counts = _heavy_atom_counts(train)
        info = {"data": mol_info["dataset"], "num_train_graphs": len(train), "num_test_graphs": len(test),
                "max_nodes": mol_info["max_atoms"], "num_features": len(mol_info["atoms"]),
                "node_distribution": _count_distribution(counts, mol_info["max_atoms"]),
                "skipped": mol_info["counts"], "path": get_path(**cfg.path).config(), "network": None,
                "molecules": {"atoms": mol_info["atoms"], "bond_orders": [1, 2, 3], "kekulized": True}}
        atomic_write_text(out / "train_smiles.txt", "\n".join(train) + "\n")
        atomic_write_text(out / "test_smiles.txt", "\n".join(test) + ("\n" if test else ""))
    torch.manual_seed(cfg.seed)
    if set(cfg.network) - {"x", "a"}:
        raise ValueError(f"molecule models use the GDSS networks: network takes the sections x and a only, got "
                         f"{sorted(cfg.network)}")
    network_cfg = {"x": {**MOLECULE_NETWORK["x"], **cfg.network.get("x", {})},
                   "a": {**MOLECULE_NETWORK["a"], **cfg.network.get("a", {})}}
    network = GDSSNetwork(info["max_nodes"], info["num_features"], network_cfg, cfg.prediction).to(device)
    info["network"] = network.network_config
    info["prediction"] = cfg.prediction
    data = smiles_to_dense(train, info["molecules"]["atoms"], info["max_nodes"], device=device)
    resumed = (model_state, ema_state, state) if state is not None else None
    return _fit(out, cfg, info, network, data, resumed, say, device)


def _heavy_atom_counts(smiles: Sequence[str]) -> list[int]:
    Chem = _chem()
    return [Chem.MolFromSmiles(s).GetNumAtoms() for s in smiles]


def _count_distribution(counts: Sequence[int], max_nodes: int) -> list[float]:
    hist = np.zeros(max_nodes + 1)
    for c in counts:
        hist[c] += 1
    return (hist / hist.sum()).tolist()


def _run_smiles(run: str | Path, name: str) -> list[str]:
    from ..train.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(run)
    for cand in (folder / name, folder.parent / name, folder.parent.parent / name, Path(run) / name):
        if cand.is_file():
            return cand.read_text(encoding="utf-8").split()
    return []


def generate_molecules(model: Any, num_molecules: int, generator: torch.Generator | int | None = None,
                       solver: str | None = None, steps: int | None = None, correct: bool = True,
                       charges: bool = True, batch_size: int = 512, final_denoise: bool = True,
                       weights: str | None = None, restart: dict | None = None,
                       **solver_options: Any) -> MoleculeSamples:
    """Sample molecules from a GDSS molecule model (a run folder or a :class:`~flowdiff.graphs.model.GraphField`
    whose ``info`` has a ``"molecules"`` section): node counts from the training distribution, any library solver
    (default: :func:`flowdiff.graphs.model.generate`'s, the probability-flow ODE with DPM-Solver++(2M), 100 NFE)
    or ``solver="s4"``, the data prediction at the end, then :func:`decode_molecules` (valency correction
    switchable with ``correct``; ``valid_wo_correction`` is recorded either way). ``restart``: Restart sampling
    options as in :func:`flowdiff.graphs.generate` (off by default here; ``"default"`` for its settings)."""
    from .. import solvers as _solvers
    from .model import DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_WEIGHTS, GraphField, _as_generator, _restart_options, \
        load_graph_field, sample_batch

    solver = solver or DEFAULT_SOLVER
    steps = steps or DEFAULT_STEPS
    if isinstance(num_molecules, bool) or not isinstance(num_molecules, int) or num_molecules < 1:
        raise ValueError(f"num_molecules must be an integer >= 1, got {num_molecules!r}")
    fld = model if isinstance(model, GraphField) else load_graph_field(model, which=weights or DEFAULT_WEIGHTS)
    mol_info = fld.info.get("molecules")
    if mol_info is None:
        raise ValueError("this GDSS model was not trained on molecules (no 'molecules' section in its info)")
    if solver != "s4" and solver not in _solvers.available():
        raise ValueError(f"unknown solver {solver!r}; valid: s4, {', '.join(_solvers.available())}")
    gen = _as_generator(generator)
    restart = _restart_options(restart, solver)
    result = MoleculeSamples([], [], [], correct)
    for start in range(0, num_molecules, batch_size):
        b = min(batch_size, num_molecules - start)
        z, mask = sample_batch(fld, b, gen, solver, steps, final_denoise, solver_options,
                               "generate_molecules: the samples", restart)
        x, adj = fld.layout.unpack(z)
        part = decode_molecules(x, adj, mask, mol_info["atoms"], correct=correct, charges=charges)
        result.smiles += part.smiles
        result.valid_wo_correction += part.valid_wo_correction
        result.raw_smiles += part.raw_smiles
        result.valid_wo_correction_neutral += part.valid_wo_correction_neutral
    return result
