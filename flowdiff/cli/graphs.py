"""Graph commands (GDSS, issue 16): ``flowdiff train --data community_small``, ``flowdiff sample -c RUN`` on a
graph run, ``flowdiff eval -s SAMPLES`` on generated graphs (docs/graphs.md).

Registered in the handler lists of :mod:`flowdiff.cli`: ``train`` claims ``--data`` naming a graph generator
(community_small, grid, ego_like) or a graph file/folder (``.edgelist``, ``.txt`` with ``# graph`` headers,
``.pkl``/``.gpickle``, ``.graphs.json``); ``sample`` claims GDSS checkpoints; ``eval`` claims a folder
holding ``graphs.txt`` or an edge-list file.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import typer

from . import EVAL_HANDLERS, SAMPLE_HANDLERS, TRAIN_HANDLERS, _fail, _first_line, _output_dir, _set_threads

GRAPH_FILE_SUFFIXES = (".edgelist", ".pkl", ".pickle", ".gpickle")
GENERATORS = ("community_small", "grid", "ego_like")


def _is_graph_file(p: Path) -> bool:
    name = p.name.lower()
    if p.is_dir():
        return any(p.glob("*.edgelist")) or (p / "graphs.txt").is_file()
    if name.endswith(".graphs.json") or p.suffix.lower() in GRAPH_FILE_SUFFIXES:
        return True
    if p.suffix.lower() == ".txt" and p.is_file():
        with open(p, encoding="utf-8", errors="replace") as fh:
            return fh.readline().lstrip().startswith("# graph")
    return False


def _claims_train(data: str, task: Any = None) -> bool:
    key = str(data).lower().replace("-", "_")
    return key in GENERATORS or _is_graph_file(Path(data))


def _really_explicit(command: str, options: dict, explicit: set) -> set:
    """``explicit`` minus the options whose value is the command's declared default.

    (Works around ``flowdiff.cli._explicit`` reporting every option as explicit when click's
    ParameterSource classes differ; a value given equal to the default then counts as not given.)"""
    from . import app

    cmd = typer.main.get_command(app).commands[command]
    defaults = {p.name: p.default for p in cmd.params}
    return {k for k in explicit if k not in defaults or options.get(k) != defaults[k]}


#: ``--network`` values for graph and molecule data (``flowdiff.graphs.GDSSNetwork`` kinds; docs/graphs.md).
GRAPH_NETWORKS = ("auto", "gdss", "transformer", "ppgn")


def _run_train(options: dict, explicit: set) -> None:
    from ..graphs import GraphDataError, GraphTrainConfig, train_gdss

    _train_gdss_run(options, explicit, GraphTrainConfig(data=str(options["data"])), what="graph",
                    run_files=("metrics.jsonl", "train_graphs.txt"), train=train_gdss, data_error=GraphDataError)


def _train_gdss_run(options: dict, explicit: set, cfg: Any, *, what: str, run_files: tuple[str, ...],
                    train: Any, data_error: type[Exception]) -> None:
    """``flowdiff train`` for a GDSS run (graphs or molecules): the shared options onto ``cfg``, options of the
    image/vector trainer refused, the run folder checked (--resume / --overwrite), then ``train``."""
    from ..train import CheckpointError, list_checkpoints

    explicit = _really_explicit("train", options, explicit)
    if "prediction" in explicit:
        if options["prediction"] not in ("noise", "data"):
            _fail(f"--prediction {options['prediction']}: {what} models predict noise (GDSS) or data", 2)
        cfg.prediction = options["prediction"]
    if "network" in explicit:
        allowed = GRAPH_NETWORKS if what == "graph" else ("auto", "gdss")
        if options["network"] not in allowed:
            _fail(f"--network {options['network']}: {what} data take {', '.join(allowed)} (auto = gdss, "
                  "GDSS's GCN + GMH)", 2)
        if options["network"] not in ("auto", "gdss"):
            cfg.network = {"kind": options["network"]}
    mapping = {"steps": "steps", "batch": "batch_size", "lr": "lr", "seed": "seed", "ema_decay": "ema",
               "checkpoint_every": "checkpoint_every", "grad_clip": "grad_clip", "weight_decay": "weight_decay"}
    for option, name in mapping.items():
        if option in explicit:
            setattr(cfg, name, options[option])
    if "path" in explicit:
        cfg.path = {"name": options["path"]}
    unsupported = sorted(explicit & {"weighting", "time_sampler", "precondition", "sigma_data", "label_dropout",
                                     "coupling", "ema_sigma_rel", "lr_schedule", "warmup_steps", "task", "dtype"})
    if unsupported:
        _fail(f"--{unsupported[0].replace('_', '-')} does not apply to {what} data (GDSS); see docs/graphs.md", 2)
    try:
        cfg.check()
    except ValueError as error:
        _fail(_first_line(error), 2)
    out = Path(options["output"])
    if out.exists() and not out.is_dir():
        _fail(f"--output {out} is a file; give a folder", 2)
    has_run = out.is_dir() and bool(list_checkpoints(out))
    if has_run and not options.get("resume"):
        if options.get("overwrite"):
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            for name in run_files:
                (out / name).unlink(missing_ok=True)
            has_run = False
        else:
            _fail(f"--output {out} already holds a run; pass --resume to continue it or --overwrite to start over", 2)
    _output_dir(out)
    _set_threads(options.get("threads") or 1)
    from . import _STATE

    quiet = _STATE["quiet"]
    started = time.process_time()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(out, cfg, resume=bool(options.get("resume")) and has_run, device=options.get("device", "cpu"),
                  log=None if quiet else (lambda line: typer.echo(line, err=True)))
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
    except (data_error, CheckpointError) as error:
        _fail(_first_line(error), 1)
    except ValueError as error:
        _fail(_first_line(error), 2)
    typer.echo(f"trained GDSS {what} model -> {out} ({time.process_time() - started:.0f} CPU s)")


def _is_graph_checkpoint(checkpoint: Path) -> bool:
    from ..train.checkpoint import CheckpointError, resolve_checkpoint

    try:
        folder = resolve_checkpoint(checkpoint)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (CheckpointError, OSError, ValueError):
        return False
    from ..graphs.model import GRAPH_RUN_KIND

    return isinstance(config, dict) and config.get("kind") == GRAPH_RUN_KIND


def draw_grid(graphs: list, path: Path, columns: int = 5, limit: int = 25) -> None:
    """A PNG grid of drawn graphs (spring layout, seeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    shown = graphs[:limit]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows))
    for ax in getattr(axes, "flat", [axes]):
        ax.axis("off")
    for ax, g in zip(getattr(axes, "flat", [axes]), shown):
        nx.draw(g, pos=nx.spring_layout(g, seed=0), ax=ax, node_size=20, width=0.6, node_color="tab:blue")
        ax.set_title(f"n={g.number_of_nodes()} m={g.number_of_edges()}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _restart_option(items: list) -> str | None:
    """``--solver-option restart=none|default`` (Restart sampling of :func:`flowdiff.graphs.generate`)."""
    restart = "default"
    for item in items:
        key, _, value = str(item).partition("=")
        if key != "restart" or value.lower() not in ("none", "off", "default"):
            _fail(f"--solver-option {item!r} is not valid for graph runs; valid: restart=none, restart=default", 2)
        restart = "default" if value.lower() == "default" else None
    return restart


def _run_sample(options: dict, explicit: set) -> None:
    from ..graphs import generate, load_graph_field, write_graphs
    from ..pipeline import write_json

    explicit = _really_explicit("sample", options, explicit)
    count = options["count"] if "count" in explicit else 100
    if count < 1:
        _fail(f"--count must be >= 1, got {count}", 2)
    from ..graphs.model import DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_WEIGHTS

    solver = options.get("solver") or DEFAULT_SOLVER
    nfe = options.get("nfe") or DEFAULT_STEPS
    if nfe < 1:
        _fail(f"--nfe must be >= 1, got {nfe}", 2)
    out = _output_dir(Path(options["output"]))
    _set_threads(options.get("threads") or 1)
    field = load_graph_field(options["checkpoint"], which=DEFAULT_WEIGHTS, device=options.get("device", "cpu"))
    started = time.process_time()
    grid = options.get("grid") or "uniform"
    if grid == "logsnr":
        grid = "log_snr"
    kwargs = {"grid": grid} if solver == "s4" else ({"grid": options["grid"]} if options.get("grid") else {})
    kwargs["restart"] = _restart_option(options.get("solver_option") or [])
    graphs = generate(field, count, generator=int(options.get("seed", 0)), solver=solver, steps=nfe, **kwargs)
    cpu = time.process_time() - started
    write_graphs(graphs, out / "graphs.txt")
    draw_grid(graphs, out / "graphs.png")
    write_json({"checkpoint": str(Path(options["checkpoint"]).resolve()), "data": field.info.get("data"),
                "count": count, "solver": solver, "nfe": nfe, "seed": options.get("seed", 0),
                "cpu_seconds": cpu}, out / "graphs.json")
    typer.echo(f"{count} graphs ({solver}, {nfe} steps, {cpu:.1f} CPU s) -> {out / 'graphs.txt'}, {out / 'graphs.png'}")


def _claims_eval(samples: Path) -> bool:
    p = Path(samples)
    return (p.is_dir() and (p / "graphs.txt").is_file()) or (p.is_file() and _is_graph_file(p))


def _run_eval(options: dict, explicit: set) -> None:
    from ..graphs import GraphDataError, check_graphs, evaluate_graphs, make_graphs, read_graphs
    from ..pipeline import write_json

    samples = Path(options["samples"])
    file = samples / "graphs.txt" if samples.is_dir() else samples
    meta_file = file.parent / "graphs.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    _set_threads(options.get("threads") or 1)
    try:
        generated = read_graphs(file)
    except GraphDataError as error:
        _fail(_first_line(error), 1)
    data = options.get("data") or meta.get("data")
    if data is None:
        _fail("--data is required (the samples do not say which graphs they model): a generator "
              f"({', '.join(GENERATORS)}) or a graph file", 2)
    seed = int(options.get("seed", 0))
    n_ref = max(100, len(generated))
    key = str(data).lower().replace("-", "_")
    if key in GENERATORS:
        reference = make_graphs(key, n_ref, seed=1000 + seed)
        floor_ref = make_graphs(key, n_ref, seed=2000 + seed)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graphs, _ = check_graphs(read_graphs(data), where=str(data))
        except GraphDataError as error:
            _fail(_first_line(error), 1)
        if len(graphs) < 4:
            _fail(f"{data}: need at least 4 reference graphs, got {len(graphs)}", 1)
        half = len(graphs) // 2
        reference, floor_ref = graphs[:half], graphs[half:2 * half]
    result = evaluate_graphs(generated, reference, floor_ref, metrics=("degree", "clustering", "orbit", "spectral"),
                             seed=seed)
    result["data"] = str(data)
    target = options.get("output") or file.parent / "metrics.json"
    target = Path(target)
    if target.suffix != ".json":
        target = _output_dir(target) / "metrics.json"
    write_json(result, target)
    for name in ("degree", "clustering", "orbit", "spectral", "average"):
        typer.echo(f"{name:>11}: {result['model'][name]:.4g}   (real-vs-real floor {result['floor'][name]:.4g}, "
                   f"Erdős–Rényi {result['erdos_renyi'][name]:.4g})")
    typer.echo(f"{result['num_generated']} generated vs {len(reference)} reference graphs "
               f"({result['num_dropped_empty']} empty dropped); metrics -> {target}")


TRAIN_HANDLERS.append((_claims_train, _run_train))
SAMPLE_HANDLERS.append((_is_graph_checkpoint, _run_sample))
EVAL_HANDLERS.append((_claims_eval, _run_eval))


# ------------------------------------------------------------------------------------------------
# molecules (GDSS on QM9-like / ZINC-like sets or a SMILES file; flowdiff.graphs.molecules)
# ------------------------------------------------------------------------------------------------


def _claims_molecule_train(data: str, task: Any = None) -> bool:
    from ..graphs.molecules import MOLECULE_DATASETS, is_smiles_file

    if str(data).lower().replace("_", "-") in MOLECULE_DATASETS:
        return True
    p = Path(data)
    return task is None and (is_smiles_file(p) or (p.is_file() and p.suffix.lower() == ".sdf"))


def _run_molecule_train(options: dict, explicit: set) -> None:
    from ..graphs.molecules import MoleculeDataError, MoleculeTrainConfig, train_molecules

    _train_gdss_run(options, explicit, MoleculeTrainConfig(data=str(options["data"])), what="molecule",
                    run_files=("metrics.jsonl", "train_smiles.txt", "test_smiles.txt"), train=train_molecules,
                    data_error=MoleculeDataError)


def _claims_molecule_sample(checkpoint: Path) -> bool:
    from ..graphs.molecules import is_molecule_run

    return is_molecule_run(checkpoint)


def _run_molecule_sample(options: dict, explicit: set) -> None:
    from ..graphs.model import DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_WEIGHTS, load_graph_field
    from ..graphs.molecules import draw_molecules, generate_molecules
    from ..pipeline import write_json
    from ..train.checkpoint import atomic_write_text

    explicit = _really_explicit("sample", options, explicit)
    count = options["count"] if "count" in explicit else 500
    if count < 1:
        _fail(f"--count must be >= 1, got {count}", 2)
    solver = options.get("solver") or DEFAULT_SOLVER
    nfe = options.get("nfe") or DEFAULT_STEPS
    if nfe < 1:
        _fail(f"--nfe must be >= 1, got {nfe}", 2)
    out = _output_dir(Path(options["output"]))
    _set_threads(options.get("threads") or 1)
    field = load_graph_field(options["checkpoint"], which=DEFAULT_WEIGHTS, device=options.get("device", "cpu"))
    started = time.process_time()
    kwargs = {}
    if solver == "s4":
        kwargs["grid"] = "log_snr" if options.get("grid") in ("logsnr", "log_snr") else "uniform"
    elif options.get("grid"):
        kwargs["grid"] = options["grid"]
    samples = generate_molecules(field, count, generator=int(options.get("seed", 0)), solver=solver, steps=nfe,
                                 **kwargs)
    cpu = time.process_time() - started
    valid = [s for s in samples.smiles if s]
    atomic_write_text(out / "molecules.smi", "\n".join(valid) + ("\n" if valid else ""))
    draw_molecules(valid, out / "molecules.png")
    write_json({"checkpoint": str(Path(options["checkpoint"]).resolve()), "data": field.info.get("data"),
                "count": count, "solver": solver, "nfe": nfe, "seed": options.get("seed", 0), "cpu_seconds": cpu,
                "smiles": samples.smiles, "valid_wo_correction": samples.valid_wo_correction,
                "raw_smiles": samples.raw_smiles}, out / "molecules.json")
    rate = sum(samples.valid_wo_correction) / count
    typer.echo(f"{count} molecules ({solver}, {nfe} steps, {cpu:.1f} CPU s; {len(valid)} valid after correction, "
               f"{rate:.1%} valid without) -> {out / 'molecules.smi'}, {out / 'molecules.png'}")


def _claims_molecule_eval(samples: Path) -> bool:
    p = Path(samples)
    return (p.is_dir() and (p / "molecules.json").is_file()) or (p.is_file() and p.name.endswith("molecules.json"))


def _run_molecule_eval(options: dict, explicit: set) -> None:
    from ..graphs.molecules import MOLECULE_DATASETS, MoleculeDataError, _run_smiles, _split, clean_smiles, \
        molecule_dataset, molecule_metrics, read_smiles
    from ..pipeline import write_json

    samples = Path(options["samples"])
    file = samples / "molecules.json" if samples.is_dir() else samples
    meta = json.loads(file.read_text(encoding="utf-8"))
    _set_threads(options.get("threads") or 1)
    data = options.get("data")
    train, test = [], []
    if data is None and meta.get("checkpoint"):
        try:
            train, test = _run_smiles(meta["checkpoint"], "train_smiles.txt"), _run_smiles(meta["checkpoint"],
                                                                                         "test_smiles.txt")
        except Exception:  # noqa: BLE001 - the run folder moved: fall back to --data
            train, test = [], []
        data = meta.get("data")
    if not train:
        if data is None:
            _fail("--data is required (the samples do not name their run): "
                  f"{', '.join(MOLECULE_DATASETS)} or a SMILES file", 2)
        key = str(data).lower().replace("_", "-")
        try:
            smiles = molecule_dataset(key) if key in MOLECULE_DATASETS else \
                list(dict.fromkeys(clean_smiles(read_smiles(data), where=str(data))[0]))
        except MoleculeDataError as error:
            _fail(_first_line(error), 1)
        train, test = _split(smiles, 0.2, int(options.get("seed", 0)))
    if len(test) < 2:
        _fail(f"need at least 2 held-out reference molecules for FCD/NSPDK, got {len(test)}", 1)
    from ..graphs.molecules import MoleculeSamples

    gen = MoleculeSamples(meta["smiles"], meta["valid_wo_correction"], meta.get("raw_smiles", []))
    result = molecule_metrics(gen, train, test, seed=int(options.get("seed", 0)))
    result["data"] = str(data)
    target = Path(options.get("output") or file.parent / "metrics.json")
    if target.suffix != ".json":
        target = _output_dir(target) / "metrics.json"
    write_json(result, target)
    for name in ("validity_wo_correction", "validity", "uniqueness", "novelty"):
        typer.echo(f"{name:>22}: {result[name]:.3f}")
    if result.get("fcd") is not None:
        typer.echo(f"{'FCD':>22}: {result['fcd']:.3f}   (real-vs-real floor {result['fcd_floor']:.3f})")
    else:
        typer.echo(f"{'FCD':>22}: {result.get('fcd_error', 'skipped')}")
    if result.get("nspdk") is not None:
        typer.echo(f"{'NSPDK MMD²':>22}: {result['nspdk']:.4f}   (real-vs-real floor {result['nspdk_floor']:.4f})")
    else:
        typer.echo(f"{'NSPDK MMD²':>22}: not computed (no valid molecule)")
    typer.echo(f"{result['num_generated']} generated vs {len(test)} held-out molecules; metrics -> {target}")


TRAIN_HANDLERS.insert(0, (_claims_molecule_train, _run_molecule_train))
SAMPLE_HANDLERS.insert(0, (_claims_molecule_sample, _run_molecule_sample))
EVAL_HANDLERS.insert(0, (_claims_molecule_eval, _run_molecule_eval))
