"""High-level recipes used by the CLI and available to users: build a run from names, load a
trained field from a checkpoint, draw samples, evaluate them against held-out data.

``data → coupling → path → model → loss → Trainer → checkpoint`` and back
``checkpoint → Field → solver → SampleResult → metrics / plots``, each step one function.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import metrics as fdm
from .data import Dataset, load_dataset
from .fields import Field
from .losses import GaussianPathLoss
from .nn import build_network
from .paths import get_path, path_from_config

__all__ = ["train_run", "load_field", "ClassMixtureModel", "generate", "evaluate_samples", "save_samples_png", "default_network_kwargs",
           "likelihood_of_data", "resolve_device", "resolve_dtype"]

#: ``--dtype`` values: weights in that precision, or float32 weights under autocast to a 16-bit type.
DTYPES = ("float32", "float64", "bfloat16", "float16")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``None``: cpu) as a device that exists here.

    A ``ValueError`` naming the device and the ones this machine has otherwise.
    """
    if name is None:
        return torch.device("cpu")
    text = str(name)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    have = ["cpu"]
    if torch.cuda.is_available():
        have += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        have.append("mps")
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N, mps (this machine has: {', '.join(have)})")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {text!r} is not available: this machine has {', '.join(have)} "
                         f"(torch {torch.__version__}{'' if torch.cuda.is_available() else ', built without CUDA or no GPU visible'})")
    if device.type == "mps" and "mps" not in have:
        raise ValueError(f"device 'mps' is not available (Apple-silicon GPUs only); this machine has {', '.join(have)}")
    return device


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """``(weights dtype, autocast dtype or None)`` for a ``--dtype`` name on ``device``.

    ``float32``/``float64``: weights and computation in that precision. ``bfloat16``/``float16``:
    float32 weights, model calls under ``torch.autocast`` to the 16-bit type (the solver's own
    arithmetic stays in float32); bfloat16 where the device supports it (CPU, recent CUDA GPUs),
    float16 on CUDA and MPS. A ``ValueError`` naming the value and what is allowed otherwise.
    """
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name in ("float32", "float64"):
        if name == "float64" and device.type == "mps":
            raise ValueError("dtype 'float64' is not supported on 'mps'; valid there: float32, float16, bfloat16")
        return getattr(torch, name), None
    low = getattr(torch, name)
    if name == "float16" and device.type == "cpu":
        raise ValueError("dtype 'float16' (autocast) needs a GPU (cuda or mps); on the CPU use bfloat16, float32 or float64")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype 'bfloat16' is not supported by {torch.cuda.get_device_name(device)}; use float16 or float32")
    return torch.float32, low


def model_context(device: torch.device, autocast: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``autocast`` on ``device``, or a no-op context when it is ``None``."""
    import contextlib

    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast)


def default_network_kwargs(network: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """Sizes that train well on this machine: a residual MLP for vectors, a small UNet for images."""
    if network == "mlp":
        return {"hidden": 256, "depth": 4}
    if network == "unet":
        return {"channels": (64, 128), "num_res_blocks": 2}
    return {}


def train_run(
    data: str = "checkerboard",
    path: str = "linear",
    prediction: str = "velocity",
    network: str = "auto",
    steps: int = 4000,
    batch_size: int = 512,
    lr: float = 2e-3,
    output_dir: str | Path = "runs/demo",
    seed: int = 0,
    weighting: str = "none",
    time_sampler: str = "uniform",
    ema_decay: float = 0.999,
    warmup_steps: int = 100,
    checkpoint_every: int | None = 1000,
    network_kwargs: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    lr_schedule: str = "cosine",
    precondition: bool = False,
    sigma_data: float | None = None,
    label_dropout: float = 0.0,
    grad_clip: float | None = 1.0,
    weight_decay: float = 0.0,
    ema_sigma_rel: float | None = None,
    coupling: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
) -> Any:
    """Train a model on ``data`` along ``path`` predicting ``prediction``; returns the Trainer's summary.

    Recipe options (docs/training.md): ``precondition`` wraps the network in
    :class:`~flowdiff.nn.Preconditioned` (EDM's c_skip/c_out/c_in, Karras et al. 2022) with
    ``sigma_data`` (default: the standard deviation of the training data); ``label_dropout > 0``
    trains a class-conditional network (labelled data) for classifier-free guidance;
    ``ema_sigma_rel`` replaces the fixed EMA decay by EDM2's power-function EMA of that width;
    ``coupling="ot"`` pairs noise and data by exact minibatch optimal transport (Tong et al. 2023).

    Reproducible: the same arguments give bitwise the same weights on the same machine, in any
    process — the initial weights are drawn from the seed's own stream
    (:data:`flowdiff.train.rng.INIT_STREAM`) without touching torch's global generator.
    An ``output_dir`` that already holds a run is refused unless ``resume`` (continue it; a
    corrupt newest checkpoint falls back to the newest that verifies) or ``overwrite`` (delete
    its checkpoints and metrics). ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``dtype``:
    ``float32`` or ``float64`` weights, or ``bfloat16``/``float16`` autocast (mixed precision)
    over float32 weights. ``threads``: CPU threads during training (``None``: the
    :func:`flowdiff._utils.default_threads` of the network; ``0``: torch's setting).
    """
    from .train import Trainer, TrainConfig
    from .train.rng import INIT_STREAM, stream_seed

    dtypes = {"float32": torch.float32, "float64": torch.float64}
    mixed = {"bfloat16": "bf16", "float16": "fp16"}
    if dtype not in dtypes and dtype not in mixed:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join([*dtypes, *mixed])}")
    dataset = load_dataset(data, split="train", seed=seed)
    gpath = get_path(path)
    shape = tuple(dataset.shape)
    if network == "auto":
        network = "mlp" if len(shape) == 1 else "unet"
    kwargs = {**default_network_kwargs(network, shape), **(network_kwargs or {})}
    if label_dropout > 0:
        if dataset.num_classes is None:
            raise ValueError(f"label_dropout={label_dropout} needs labelled data; {data!r} has no labels")
        kwargs["num_classes"] = int(dataset.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, INIT_STREAM))
        try:
            model = build_network(network, shape, **kwargs)
        except TypeError as error:  # a misspelt network argument (a YAML network_kwargs key)
            import inspect

            from . import nn as fdnn

            cls = getattr(fdnn, {"mlp": "MLP", "unet": "UNet"}.get(network, ""), None)
            valid = [n for n in inspect.signature(cls).parameters if n not in ("dim", "in_channels", "image_size")] if cls else []
            raise ValueError(f"network_kwargs {network_kwargs!r} do not fit the {network!r} network: {error}"
                             + (f"; valid: {', '.join(valid)}" if valid else "")) from error
    if dtype in dtypes:
        model = model.to(dtypes[dtype])
    precondition_config = None
    if precondition:
        from .nn import Preconditioned

        if sigma_data is None:
            sigma_data = float(dataset.x.double().std())
        model = Preconditioned(model, gpath, prediction, sigma_data=float(sigma_data))
        precondition_config = {"sigma_data": float(sigma_data)}
    pairing = None
    if coupling not in (None, "independent"):
        if coupling != "ot":
            raise ValueError(f"unknown coupling {coupling!r}; valid: independent, ot")
        from .couplings import MinibatchOT

        pairing = MinibatchOT("exact")
    loss = GaussianPathLoss(gpath, prediction=prediction, weighting=weighting, time_sampler=time_sampler,
                            sigma_data=sigma_data, coupling=pairing)
    # An EMA horizon longer than a tenth of the run would mostly average the untrained start.
    ema_decay = min(ema_decay, max(0.0, 1.0 - 10.0 / steps))
    config = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, output_dir=str(output_dir), ema_decay=ema_decay,
        warmup_steps=min(warmup_steps, steps), checkpoint_every=checkpoint_every, lr_schedule=lr_schedule,
        label_dropout=label_dropout, grad_clip=grad_clip, weight_decay=weight_decay, device=device,
        mixed_precision=mixed.get(dtype, "no"),
        **({"ema_sigma_rel": ema_sigma_rel} if ema_sigma_rel is not None else {}),
    )
    model_config = {"name": network, "data_shape": list(shape), "kwargs": kwargs}
    extra = {"dataset": dataset.name if data == dataset.name else str(data), "seed": seed, "prediction": prediction,
             "path": gpath.config(), "precondition": precondition_config}
    trainer = Trainer(model, loss, dataset, config, resume=resume, overwrite=overwrite and not resume,
                      progress=progress, model_config=model_config, extra_config=extra, threads=threads)
    return trainer.fit()


class ClassMixtureModel(torch.nn.Module):
    r"""A class-conditional network that, called without labels, draws its class mixture.

    ``model(x, t, y=None)``: with ``y`` it is the wrapped network unchanged. Without ``y``, row
    ``i`` of a batch of ``B`` gets class ``labels_B[i]``, where ``labels_B`` is a stratified draw
    of the uniform class distribution (:func:`flowdiff.guidance.stratified_labels`: exact class
    counts, random order) from a generator seeded by ``B``: every call on a batch of the same
    size gives a row the same class, so a solver integrates each row's trajectory under one
    class and ``fd.sample(field, noise)`` returns samples of :math:`\sum_k p(k)\,p(x \mid k)`,
    the data distribution the network was trained on. The null label (label dropout) gives the
    unconditional network, which at 10 % dropout is trained on a tenth of the steps and samples
    worse (docs/training.md); ask for it with ``load_field(..., unlabeled="null")``.

    A density needs one model: :func:`flowdiff.log_likelihood` refuses this wrapper without
    labels (``unlabeled_default`` marks it) and says what to do instead.
    """

    unlabeled_default = "mixture"

    def __init__(self, model: torch.nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model, self.num_classes = model, int(num_classes)
        self._labels: dict[tuple[int, str], Tensor] = {}

    def labels(self, batch: int, device: torch.device) -> Tensor:
        """The classes rows ``0..batch-1`` get when no label is given (fixed for each batch size)."""
        from .guidance import stratified_labels

        key = (batch, str(device))
        if key not in self._labels:
            drawn = stratified_labels(batch, self.num_classes, generator=torch.Generator().manual_seed(batch))
            self._labels[key] = drawn.to(device)
        return self._labels[key]

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **cond: Any) -> Tensor:
        if y is None:
            y = self.labels(x.shape[0], x.device)
        return self.model(x, t, y=y, **cond)


def load_field(checkpoint: str | Path, which: str = "ema", device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32, unlabeled: str = "mixture") -> tuple[Field, dict[str, Any]]:
    """Rebuild the trained network of a checkpoint as a :class:`~flowdiff.Field`.

    The network's weights are put on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) in
    ``dtype`` (``torch.float32``/``torch.float64`` or their names); sample it with noise of the
    same device and dtype (:func:`generate` does). Returns ``(field, config)`` where ``config``
    is the checkpoint's parsed ``config.json``. Raises :class:`flowdiff.train.CheckpointError`
    (one line) for a missing or corrupt checkpoint, ``ValueError`` for a device this machine
    does not have or a dtype other than float32/float64.

    ``unlabeled`` decides what a class-conditional network does when called without labels:
    ``"mixture"`` (default) samples the class mixture (:class:`ClassMixtureModel`), so
    ``fd.sample(field, noise)`` draws digits of every class as the data has them; ``"null"``
    uses the null label of label dropout (the unconditional network, e.g. for its likelihood).
    With labels (``cond={"y": ...}``) both are the conditional network. Unconditional networks
    ignore the option.
    """
    from .guidance import model_num_classes
    from .train import CheckpointError, load_checkpoint, load_model

    if unlabeled not in ("mixture", "null"):
        raise ValueError(f"unlabeled must be 'mixture' or 'null', got {unlabeled!r}")

    device = resolve_device(device)
    if isinstance(dtype, str):
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64 for the weights, got {dtype!r} "
                             f"(16-bit: load float32 and sample under torch.autocast)")
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    _, _, config = load_checkpoint(checkpoint, device="cpu")
    extra = config.get("extra") or {}
    path_cfg = extra.get("path") or config.get("path")
    prediction = extra.get("prediction") or (config.get("loss") or {}).get("prediction")
    if not path_cfg or not prediction:
        raise CheckpointError(f"{config['checkpoint_dir']}: config.json does not say which path/prediction the model uses")
    gpath = path_from_config(path_cfg)
    precondition = extra.get("precondition")
    if precondition:
        # The checkpoint holds the wrapper's weights ("network.*"): rebuild the wrapper around the network.
        from .nn import Preconditioned
        from .train import load_weights

        description = config.get("model") or {}
        try:
            inner = build_network(description["name"], description["data_shape"], **description.get("kwargs", {}))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{config['checkpoint_dir']}: cannot rebuild the network: {error}") from error
        model = Preconditioned(inner, gpath, prediction, sigma_data=float(precondition["sigma_data"])).to(device)
        model = load_weights(model, config["checkpoint_dir"], which=which)
        model.eval()
    else:
        model = load_model(checkpoint, which=which, device=device)
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    num_classes = model_num_classes(model)
    if num_classes is not None and unlabeled == "mixture":
        model = ClassMixtureModel(model, num_classes)
    return Field(model, gpath, prediction), config


def field_device_dtype(field: Field) -> tuple[torch.device | None, torch.dtype | None]:
    """Where the field's network lives and its floating dtype; ``(None, None)`` for a model without
    floating tensors (a plain function, an analytic oracle): then the input's device and dtype rule."""
    model = field.model
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else []
    for tensor in tensors:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def generate(
    field: Field,
    count: int,
    shape: tuple[int, ...],
    solver: str | None = None,
    nfe: int = 50,
    seed: int = 0,
    batch_size: int = 4096,
    label: int | None = None,
    guidance_scale: float | None = None,
    autocast: torch.dtype | None = None,
    progress: Any = None,
    **options: Any,
) -> tuple[Tensor, int]:
    """Draw ``count`` samples (in batches of ``batch_size``); returns ``(samples, model evaluations per batch)``.

    The noise is drawn on the field's device in its dtype from a generator on that device seeded
    with ``seed`` (so a CPU run is reproducible bitwise; another device gives other, equally
    distributed draws). ``autocast``: run under ``torch.autocast`` to this 16-bit dtype.
    ``progress``: a :class:`flowdiff.train.logs.Progress` (or anything with ``update(n)``) advanced
    by the samples of each finished batch.

    ``solver``: a name from :func:`flowdiff.solvers.available`; default the library's
    (:func:`flowdiff.solvers.default_solver`, as :func:`flowdiff.sample`).

    ``label`` asks a class-conditional model for that class, ``guidance_scale`` applies
    classifier-free guidance (:func:`flowdiff.guidance.classifier_free_guidance`; default 1, the
    conditional model). Both raise ``ValueError`` on an unconditional model or a class outside
    the trained ones. Without ``label``, a class-conditional model draws its class mixture: uniform
    classes in exact proportions (:func:`flowdiff.guidance.stratified_labels`), guidance scale 1.
    """
    from .guidance import check_class_label, classifier_free_guidance, model_num_classes
    from .solvers import sample

    if label is not None or guidance_scale is not None:
        num_classes = model_num_classes(field.model)
        if guidance_scale is not None and num_classes is None:
            raise ValueError(f"guidance scale {guidance_scale} needs a class-conditional model; this model is unconditional")
        if label is None:
            raise ValueError("a guidance scale needs a class to guide towards (label=k; on the command line --class k)")
        label = check_class_label(label, num_classes)
        field = classifier_free_guidance(field, 1.0 if guidance_scale is None else guidance_scale)
    mixture = None
    if label is None and model_num_classes(field.model) is not None:
        # No class asked of a class-conditional model: its class mixture sum_y p(y) p(x|y), uniform p(y),
        # with exact class counts (fd.guidance.stratified_labels; docs/training.md), not the null label.
        from .guidance import stratified_labels

        mixture = stratified_labels(count, model_num_classes(field.model), generator=torch.Generator().manual_seed(seed))
        field = classifier_free_guidance(field, 1.0)
    device, dtype = field_device_dtype(field)
    device, dtype = device or torch.device("cpu"), dtype or torch.get_default_dtype()
    g = torch.Generator(device=device).manual_seed(seed)
    out, nfe_used = [], 0
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        # Noise drawn in float32 whatever the model's dtype: float64 sampling then solves from the
        # same starting points as float32 (the same samples up to round-off).
        x0 = field.path.prior_sample((n, *shape), generator=g, dtype=torch.float32, device=device).to(dtype)
        if label is not None:
            options["cond"] = {"y": torch.full((n,), label, dtype=torch.long, device=device)}
        elif mixture is not None:
            options["cond"] = {"y": mixture[start:start + n].to(device)}
        with torch.no_grad(), model_context(device, autocast):
            res = sample(field, x0, solver=solver, nfe=nfe, generator=g, **options)
        out.append(res.x.float().cpu() if autocast is not None else res.x.cpu())
        nfe_used = res.nfe
        if progress is not None:
            progress.update(n)
    return torch.cat(out), nfe_used


def evaluate_samples(samples: Tensor, data: str, seed: int = 0, num_projections: int = 512,
                     floor_draws: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Distances of ``samples`` to the held-out split of ``data``, next to the data-vs-data floor.

    The floor is the same metric, with the same projections, between ``n`` real points and the
    same ``n`` held-out points the samples are compared with: what a perfect generator would
    score. One draw of it is noisy (sliced-W2 between two real sets of 2000 checkerboard points
    has a relative spread of about 27 %: the 8 cells' counts), so the floor is the mean over
    ``floor_draws`` draws (``<metric>_floor_std`` is their standard deviation). The real points
    are fresh i.i.d. draws of the distribution when the data set has a sampler (the 2-D toys;
    default 16 draws): subsets of the one training pool share that pool's own deviation from
    the distribution, which does not average out (on the checkerboard with seed 0 the pool's
    floor was 0.87x what i.i.d. sets score, over seeds 0-5 0.87-1.15x;
    ``benchmarks/demo_recipes.py --robustness``).
    Finite data sets use random training subsets (default 8 draws). ``progress``: anything with
    ``update(n)``, advanced after each metric evaluation.
    """
    held = load_dataset(data, split="heldout", seed=seed)
    if tuple(samples.shape[1:]) != tuple(held.shape):
        raise ValueError(f"samples of shape {tuple(samples.shape[1:])} do not match the shape {tuple(held.shape)} "
                         f"of the data set {str(data)!r}; pass the data set the model was trained on")
    train = load_dataset(data, split="train", seed=seed)
    samples = samples.detach().cpu()
    n = min(len(samples), len(held), len(train))
    g = torch.Generator().manual_seed(seed + 1)
    xs = samples[torch.randperm(len(samples), generator=g)[:n]].double()
    xh = held.x[torch.randperm(len(held), generator=g)[:n]].double()
    if floor_draws is None:
        floor_draws = 16 if train.has_sampler else 8
    if train.has_sampler:
        draws = [train.sample(n, generator=g).double() for _ in range(max(1, int(floor_draws)))]
    else:
        draws = [train.x[torch.randperm(len(train), generator=g)[:n]].double() for _ in range(max(1, int(floor_draws)))]
    res: dict[str, Any] = {"dataset": str(data), "num_samples": n, "floor_draws": len(draws)}
    if xs.shape[1:] != xh.shape[1:]:
        raise ValueError(f"samples of shape {tuple(xs.shape[1:])} do not match the data's {tuple(xh.shape[1:])}")
    if not torch.isfinite(xs).all():
        from .data import DataError

        raise DataError(f"{int((~torch.isfinite(xs)).any(1).sum())} of the {n} samples compared contain NaN or Inf; "
                        f"the sampler diverged (try another solver or more --nfe)")
    sw = lambda a, b: float(fdm.sliced_wasserstein(a, b, num_projections=num_projections,  # noqa: E731
                                                   generator=torch.Generator().manual_seed(seed)))
    metrics = {"sliced_w2": sw, "energy_distance": lambda a, b: float(fdm.energy_distance(a, b)),
               "mmd2": lambda a, b: float(fdm.mmd(a, b))}
    if held.name == "digits":
        metrics["digits_frechet"] = lambda a, b: float(fdm.digits_frechet_distance(a.float(), b.float()))
    tick = progress.update if progress is not None else (lambda n=1: None)
    for name, metric in metrics.items():
        res[name] = metric(xs, xh)
        tick(1)
        floors = []
        for xt in draws:
            floors.append(metric(xt, xh))
            tick(1)
        floors = torch.tensor(floors, dtype=torch.float64)
        res[name + "_floor"] = float(floors.mean())
        res[name + "_floor_std"] = float(floors.std()) if len(floors) > 1 else 0.0
    res["sliced_w2_ratio_to_floor"] = res["sliced_w2"] / res["sliced_w2_floor"]
    return res


def _show_image(ax: Any, image: Tensor) -> None:
    """Draw one ``(C, H, W)`` image in ``[-1, 1]`` on a matplotlib axis (grey for one channel)."""
    img = image.clamp(-1, 1)
    ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0) * 0.5 + 0.5, cmap="gray", vmin=-1, vmax=1)


def save_samples_png(samples: Tensor, file: str | Path, reference: Tensor | None = None, title: str = "") -> Path:
    """A scatter plot (2-D data, next to ``reference``) or an image grid (``(N, C, H, W)``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    x = samples.detach().cpu().float()
    if x.ndim == 2 and x.shape[1] == 2:
        cols = 2 if reference is not None else 1
        fig, axes = plt.subplots(1, cols, figsize=(4.5 * cols, 4.5), squeeze=False)
        panels = [(x, f"samples {title}".strip())] + ([(reference.detach().cpu().float(), "held-out data")] if reference is not None else [])
        lim = float(torch.quantile(torch.cat([p[0].abs().flatten() for p in panels]), 0.995)) * 1.1
        for ax, (pts, name) in zip(axes[0], panels):
            ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5)
            ax.set_title(name)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
    elif x.ndim == 4:
        n = min(len(x), 64)
        cols = int(math.ceil(math.sqrt(n)))
        rows = int(math.ceil(n / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                _show_image(ax, x[i])
        if title:
            fig.suptitle(title)
    else:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.hist(x.reshape(len(x), -1)[:, 0].numpy(), bins=60)
        ax.set_title(f"first coordinate {title}".strip())
    fig.tight_layout()
    tmp = file.with_suffix(file.suffix + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(file)
    return file


def write_json(obj: Any, file: str | Path) -> Path:
    """Write JSON atomically (temp file, then rename)."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(file.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(file)
    return file


def dataset_shape(data: str, seed: int = 0) -> tuple[tuple[int, ...], Dataset]:
    ds = load_dataset(data, split="heldout", seed=seed)
    return tuple(ds.shape), ds


# ---------------------------------------------------------------------------------------
# Checkpoint recipes of the solvers (EMS, tuned grids): they load a field, so they live here
# ---------------------------------------------------------------------------------------


def check_output_file(file: str | Path) -> Path:
    """Make sure ``file`` can be written before any expensive work: its folder is created (or is
    a folder), it is not itself a folder, and the folder is writable. ``ValueError`` for a path
    that names a folder or lies under a file, ``PermissionError``/``OSError`` (naming the path)
    when it cannot be written."""
    import tempfile

    file = Path(file)
    if file.is_dir():
        raise ValueError(f"output {str(file)!r} is a folder; give a file name")
    check_output_dir(file.parent)
    return file


def check_output_dir(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) if needed and check it is writable, before any work.

    ``ValueError`` when it or a parent is a file; ``PermissionError`` (naming it) when it cannot
    be written."""
    import tempfile

    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"output folder {str(folder)!r}: {str(parent)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write to the output folder {str(folder)!r}: {error.strerror or error}") from error
    return folder


def ems_from_checkpoint(checkpoint: str | Path, output: str | Path | None = None, *, data: str | None = None,
                        seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                        autocast: torch.dtype | None = None, **options: Any) -> Any:
    """Estimate the DPM-Solver-v3 EMS of a trained checkpoint from its training data and save them.

    The recipe behind ``flowdiff ems CHECKPOINT``: the field comes from :func:`load_field`, the
    data from the training split the checkpoint's config names (or ``data``), and the statistics
    are written to ``output`` (default ``<checkpoint>/ems.safetensors``; ``ems.settings["file"]``
    says where), whose folder is checked for writing before the estimate. ``options`` go to
    :func:`flowdiff.solvers.estimate_ems`.
    """
    from .solvers import estimate_ems

    field, config = load_field(checkpoint, device=device, dtype=dtype)
    file = check_output_file(Path(output) if output is not None else Path(config["checkpoint_dir"]) / "ems.safetensors")
    name = data or (config.get("extra") or {}).get("dataset")
    if not name:
        raise ValueError(f"the checkpoint {str(checkpoint)!r} does not name its data set; pass data=")
    dataset = load_dataset(name, split="train", seed=int((config.get("extra") or {}).get("seed", seed)))
    dev, dt = field_device_dtype(field)
    dev, dt = dev or torch.device("cpu"), dt or torch.get_default_dtype()
    with model_context(dev, autocast):
        ems = estimate_ems(field, dataset.to(device=dev, dtype=dt), generator=torch.Generator(device=dev).manual_seed(seed),
                           **options)
    ems.settings["checkpoint"] = str(config.get("checkpoint_dir", checkpoint))
    ems.settings["data"] = str(name)
    ems.save(file)
    ems.settings["file"] = str(file)
    return ems


def tune_grid_from_checkpoint(checkpoint: str | Path, solver: str, nfe: int, output: str | Path | None = None, *,
                              count: int = 128, seed: int = 0, ems: str | Path | None = None,
                              options: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                              dtype: torch.dtype | str = torch.float32, autocast: torch.dtype | None = None,
                              **kwargs: Any) -> Any:
    """Tune a grid for a trained checkpoint and save it (the recipe behind ``flowdiff tune-grid``).

    ``count`` starting points are drawn from the path's prior with ``seed``; ``ems`` (a file
    written by ``flowdiff ems``) is passed to ``dpm-solver-v3``. The grid is written to
    ``output`` (default ``<checkpoint>/grid_<solver>_nfe<nfe>.safetensors``; ``settings["file"]``
    says where), whose folder is checked for writing before the search. ``kwargs`` go to
    :func:`flowdiff.solvers.tune_grid`.
    """
    from .solvers import EMS, tune_grid

    field, config = load_field(checkpoint, device=device, dtype=dtype)
    folder = Path(config.get("checkpoint_dir", checkpoint))
    file = check_output_file(Path(output) if output is not None else folder / f"grid_{solver}_nfe{nfe}.safetensors")
    shape = tuple((config.get("model") or {}).get("data_shape") or ())
    if not shape:
        raise ValueError(f"the checkpoint {str(checkpoint)!r} does not record its data shape")
    opts = dict(options or {})
    if ems is not None:
        opts["ems"] = EMS.load(ems)
    dev, dt = field_device_dtype(field)
    dev, dt = dev or torch.device("cpu"), dt or torch.get_default_dtype()
    noise = field.path.prior_sample((count, *shape), generator=torch.Generator(device=dev).manual_seed(seed),
                                    dtype=dt, device=dev)
    with torch.no_grad(), model_context(dev, autocast):
        tuned = tune_grid(field, solver, nfe, noise, options=opts, **kwargs)
    tuned.settings["checkpoint"] = str(config.get("checkpoint_dir", checkpoint))
    tuned.save(file)
    tuned.settings["file"] = str(file)
    return tuned


def likelihood_of_data(field: Field, x: Tensor, *, solver: str | None = None, nfe: int | None = None,
                       divergence: str = "auto", probes: int = 8, batch_size: int = 256, seed: int = 0,
                       confidence: float = 0.95, progress: Any = None, **options: Any) -> dict[str, Any]:
    r"""Mean negative log-likelihood of ``x`` under ``field`` in nats and bits per dimension, with a
    normal-approximation confidence interval over the data (the recipe behind ``flowdiff likelihood``).

    Per datum, :math:`\log p(x)` comes from :func:`flowdiff.log_likelihood` (the probability-flow
    ODE with the instantaneous change of variables, Chen et al. 2018; Song et al. 2021, app. D.2),
    solved in chunks of ``batch_size``. With :math:`\ell_i = -\log p(x_i)` over :math:`n` data,
    :math:`ar\ell \pm z\,s_\ell/\sqrt n` in nats and :math:`ar\ell/(D\ln 2)` in bits/dim (``D``
    numbers per datum; a continuous density: no dequantisation, so it can be negative).
    ``divergence="auto"``: exact for ``D <= 32``, Hutchinson with ``probes`` otherwise.
    ``progress``: anything with ``update(n)``, advanced by each chunk.
    """
    from ._utils import check_float, check_int
    from .likelihood import log_likelihood

    if x.ndim < 2 or len(x) < 2:
        raise ValueError(f"the likelihood needs at least 2 data of shape (N, ...), got shape {tuple(x.shape)}")
    check_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    batch_size = check_int("batch_size", batch_size, 1)
    device, dtype = field_device_dtype(field)
    x = x.to(device=device or x.device, dtype=dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype()))
    device = x.device
    dims = x[0].numel()
    if divergence == "auto":
        divergence = "exact" if dims <= 32 else "hutchinson"
    generator = torch.Generator(device=device).manual_seed(seed)
    nll, nfe_used = [], 0
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        res = log_likelihood(field, chunk, solver=solver, nfe=nfe, divergence=divergence, probes=probes,
                             generator=generator, **options)
        nll.append(-res.log_prob.detach().double().cpu())
        nfe_used += res.nfe
        if progress is not None:
            progress.update(len(chunk))
    values = torch.cat(nll)
    if not torch.isfinite(values).all():
        raise RuntimeError(f"{int((~torch.isfinite(values)).sum())} log-likelihoods are not finite")
    n = len(values)
    mean, std = float(values.mean()), float(values.std())
    z = math.sqrt(2.0) * float(torch.erfinv(torch.tensor(confidence, dtype=torch.float64)))
    half = z * std / math.sqrt(n)
    to_bits = 1.0 / (dims * math.log(2.0))
    return {"nll_nats": mean, "nll_nats_ci": [mean - half, mean + half], "bits_per_dim": mean * to_bits,
            "bits_per_dim_ci": [(mean - half) * to_bits, (mean + half) * to_bits], "confidence": confidence,
            "num_data": n, "dims": dims, "solver": solver or ("adams" if nfe else "adaptive"), "divergence": divergence, "nfe": nfe_used}


# ---------------------------------------------------------------------------------------------
# image restoration with a trained prior (`flowdiff restore`, benchmarks/inverse_digits.py)
# ---------------------------------------------------------------------------------------------

RESTORE_TASKS = ("inpaint", "inpaint-random", "superres", "blur", "mri")


def restore_operator(task: str, shape: tuple[int, ...], seed: int = 0) -> Any:
    """The forward operator of a restoration ``task`` for images of ``shape`` ``(C, H, W)``.

    * ``inpaint``: a centred box of half the height and width is hidden (an 8×8 digit loses its
      4×4 centre, which often leaves several digits possible);
    * ``inpaint-random``: half of the pixels hidden at random (the same pixels for every channel);
    * ``superres``: 2×2 average pooling (``H/2 × W/2`` observed);
    * ``blur``: circular convolution with a 3×3 Gaussian kernel of standard deviation 1;
    * ``mri``: half of the 2-D Fourier coefficients, the lowest frequencies always among them
      (complex measurements, :class:`~flowdiff.inverse.operators.SubsampledFourier`).

    ``seed`` fixes the random masks.
    """
    from .inverse.operators import Blur, Inpaint, SubsampledFourier, SuperResolution

    if task not in RESTORE_TASKS:
        raise ValueError(f"unknown restoration task {task!r}; valid: {', '.join(RESTORE_TASKS)}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"restoration tasks need images of shape (C, H, W), got data of shape {shape}")
    _, height, width = shape
    g = torch.Generator().manual_seed(seed)
    if task == "inpaint":
        mask = torch.ones(height, width, dtype=torch.bool)
        mask[height // 4:height // 4 + height // 2, width // 4:width // 4 + width // 2] = False
        return Inpaint(mask, shape)
    if task == "inpaint-random":
        order = torch.randperm(height * width, generator=g)
        mask = torch.zeros(height * width, dtype=torch.bool)
        mask[order[: (height * width) // 2]] = True
        return Inpaint(mask.reshape(height, width), shape)
    if task == "superres":
        if height % 2 or width % 2:
            raise ValueError(f"superres needs an even image size, got {height}x{width}")
        return SuperResolution(2, shape)
    if task == "blur":
        grid = torch.arange(3, dtype=torch.float64) - 1.0
        kernel = torch.exp(-0.5 * (grid[:, None] ** 2 + grid[None, :] ** 2))
        return Blur(kernel / kernel.sum(), shape)
    # mri: low frequencies (|k| <= 1 on both axes) plus random others, half of the coefficients in all
    fy, fx = torch.fft.fftfreq(height) * height, torch.fft.fftfreq(width) * width
    low = (fy.abs()[:, None] <= 1) & (fx.abs()[None, :] <= 1)
    mask = low.clone().flatten()
    rest = torch.nonzero(~mask).flatten()
    extra = max(0, (height * width) // 2 - int(mask.sum()))
    mask[rest[torch.randperm(len(rest), generator=g)[:extra]]] = True
    return SubsampledFourier(mask.reshape(height, width), shape)


def measure(operator: Any, x: Tensor, sigma_y: float, generator: torch.Generator | None = None) -> Tensor:
    """``y = A(x) + sigma_y n`` for a batch ``x``; complex measurements get real and imaginary noise."""
    with torch.no_grad():
        y = operator.forward(x)
        if sigma_y > 0:
            if y.is_complex():
                noise = torch.complex(torch.randn(y.shape, generator=generator, dtype=x.dtype),
                                      torch.randn(y.shape, generator=generator, dtype=x.dtype))
            else:
                noise = torch.randn(y.shape, generator=generator, dtype=y.dtype)
            y = y + sigma_y * noise.to(y.device)
    return y


def psnr(x: Tensor, truth: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, ``10 log10(range² / MSE)`` (digits: range 2, [-1, 1])."""
    mse = (x - truth).reshape(len(x), -1).pow(2).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


def restore(field: Field, truth: Tensor, task: str, method: str = "pgdm", sigma_y: float = 0.05,
            num_samples: int = 4, nfe: int = 200, seed: int = 0, **options: Any) -> dict[str, Any]:
    """Measure each image of ``truth`` with ``task``'s operator and draw posterior samples of it.

    For each image: ``y = A(x) + sigma_y n`` (:func:`measure`), then ``num_samples`` draws of
    :math:`p(x \\mid y)` with :func:`flowdiff.inverse.sample_posterior` (``method``, ``nfe`` per
    sample). Returns a dict with ``samples`` ``(N, S, C, H, W)``, ``y``, ``truth``, ``pinv`` (the
    pseudo-inverse :math:`A^+ y`, what the measurement shows), ``psnr_mean`` (PSNR of the sample
    mean per image), ``psnr_sample`` (mean PSNR of single samples), ``spread`` (per-pixel standard
    deviation across samples, averaged), ``nfe`` (evaluations per sample) and ``operator``.
    """
    from .inverse import sample_posterior

    operator = restore_operator(task, tuple(truth.shape[1:]), seed)
    device, dtype = field_device_dtype(field)
    truth = truth.to(device=device or truth.device, dtype=dtype or truth.dtype)
    g = torch.Generator().manual_seed(seed)
    y = measure(operator, truth, sigma_y, g)
    samples, spent = [], []
    for i in range(len(truth)):
        res = sample_posterior(field, operator, y[i], sigma_y=sigma_y, method=method, num_samples=num_samples,
                               nfe=nfe, generator=torch.Generator(device=truth.device).manual_seed(seed * 100003 + i),
                               **options)
        samples.append(res.x)
        spent.append(res.nfe)
    samples = torch.stack(samples)
    mean = samples.mean(1)
    per_sample = torch.stack([psnr(samples[:, j], truth) for j in range(num_samples)], 1)
    return {
        "samples": samples, "y": y, "truth": truth, "pinv": operator.pinv(y) if operator.linear else None,
        "psnr_mean": psnr(mean, truth), "psnr_sample": per_sample.mean(1),
        "spread": samples.std(1).reshape(len(truth), -1).mean(1) if num_samples > 1 else torch.zeros(len(truth)),
        "nfe": float(sum(spent) / len(spent)), "operator": operator, "task": task, "method": method,
    }


def save_restore_png(result: dict[str, Any], file: str | Path, rows: int = 8) -> Path:
    """A grid: one row per image — measurement (``A^+ y``), the samples, their mean, the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    samples, truth = result["samples"].detach().cpu().float(), result["truth"].detach().cpu().float()
    shown = result["pinv"].detach().cpu().float() if result["pinv"] is not None else torch.zeros_like(truth)
    n, s = min(rows, len(truth)), samples.shape[1]
    columns = [("measurement (A⁺y)", shown)] + [(f"sample {j + 1}", samples[:, j]) for j in range(s)]
    columns += [("mean", samples.mean(1)), ("truth", truth)]
    fig, axes = plt.subplots(n, len(columns), figsize=(len(columns) * 0.9, n * 0.9 + 0.4), squeeze=False)
    for j, (name, images) in enumerate(columns):
        axes[0, j].set_title(name, fontsize=6)
        for i in range(n):
            axes[i, j].axis("off")
            _show_image(axes[i, j], images[i])
    fig.suptitle(f"{result['task']} with {result['method']}", fontsize=8)
    fig.tight_layout()
    tmp = file.with_suffix(file.suffix + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(file)
    return file
