r"""Block reconstruction for low-bit weights: BRECQ with AdaRound rounding and QDrop.

Li, Gong, Tan, Yang, Hu, Zhang, Yu, Wang & Gu (ICLR 2021), "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction"; Nagel et al. (ICML 2020), "Up or Down?
Adaptive Rounding for Post-Training Quantization"; Wei, Gong, Li, Liu & Yu (ICLR 2022), "QDrop:
Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization". Q-Diffusion
(Li et al., ICCV 2023) applies this recipe to diffusion UNets on its time-step-spread calibration set.

Units, in execution order: every module whose class name ends in ``Block`` (a UNet's residual
and attention blocks) that holds quantised layers, and every quantised layer outside such blocks
on its own. For each unit, the rounding variables :math:`V` of its layers minimise

.. math::
    \mathbb{E}\,\|u_q(\tilde x) - u(x)\|^2 + \lambda\sum_i \big(1 - |2h(V_i) - 1|^\beta\big),

where :math:`x` is the unit's input in the floating network, :math:`u(x)` its floating output,
:math:`\tilde x` the input in the quantised network (earlier units already reconstructed), mixed
element-wise with :math:`x` with probability 1/2 (QDrop), and inside the unit each input element
skips its activation quantiser with probability 1/2. :math:`\beta` anneals from 20 to 2 after a
fifth of the steps, :math:`\lambda = 0.01`; then :math:`h(V)` is hardened to 0/1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .fake import QuantLayer

__all__ = ["reconstruct"]


def _units(quantized: nn.Module, order: list[str]) -> list[str]:
    layers = {name for name, m in quantized.named_modules() if isinstance(m, QuantLayer)}
    blocks = []
    for name, module in quantized.named_modules():
        if type(module).__name__.endswith("Block") and any(n.startswith(name + ".") for n in layers):
            if not any(name.startswith(b + ".") for b in blocks):
                blocks.append(name)
    position = {name: i for i, name in enumerate(order)}
    units = []
    for name in blocks:
        first = min(position.get(n, len(order)) for n in layers if n.startswith(name + "."))
        units.append((first, name))
    for name in layers:
        if not any(name.startswith(b + ".") for b in blocks):
            units.append((position.get(name, len(order)), name))
    return [name for _, name in sorted(units)]


@torch.no_grad()
def _capture(model: nn.Module, unit: str, data: Any, batch_size: int) -> tuple[list[tuple], list[dict], list[Tensor]]:
    """The unit's inputs (args, kwargs) and outputs over the calibration set, one entry per chunk."""
    module = model.get_submodule(unit)
    args_list, kwargs_list, outputs = [], [], []

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        args_list.append(tuple(a.detach() if isinstance(a, Tensor) else a for a in args))
        kwargs_list.append({k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()})
        outputs.append(output.detach())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        for x, t, cond in data.chunks(batch_size):
            model(x, t, **cond)
    finally:
        handle.remove()
    return args_list, kwargs_list, outputs


def _cat(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, Tensor) and first.ndim > 0:
        return torch.cat(items)
    return first


def reconstruct(reference: nn.Module, quantized: nn.Module, data: Any, order: list[str], *, iters: int = 300,
                batch_size: int = 32, lr: float = 1e-3, weight: float = 0.01, drop_probability: float = 0.5,
                seed: int = 0) -> None:
    """BRECQ/AdaRound/QDrop reconstruction of ``quantized`` (in place) towards ``reference``, unit by unit."""
    generator = torch.Generator().manual_seed(seed)
    chunk = 256
    for unit in _units(quantized, order):
        fp_args, fp_kwargs, fp_out = _capture(reference, unit, data, chunk)
        q_args, _, _ = _capture(quantized, unit, data, chunk)
        if not fp_out:
            continue
        fp_args = [_cat([a[i] for a in fp_args]) for i in range(len(fp_args[0]))]
        q_args = [_cat([a[i] for a in q_args]) for i in range(len(q_args[0]))]
        kwargs = {k: _cat([kw[k] for kw in fp_kwargs]) for k in fp_kwargs[0]}
        target = torch.cat(fp_out)
        module = quantized.get_submodule(unit)
        layers = [module] if isinstance(module, QuantLayer) else [m for m in module.modules() if isinstance(m, QuantLayer)]
        for layer in layers:
            layer.init_rounding()
            layer.drop_probability = drop_probability
        parameters = [layer.rounding for layer in layers]
        optimizer = torch.optim.Adam(parameters, lr=lr)
        rows = target.shape[0]
        module.train()
        for step in range(iters):
            index = torch.randint(0, rows, (min(batch_size, rows),), generator=generator).to(target.device)
            inputs = []
            for fp_value, q_value in zip(fp_args, q_args):
                if isinstance(fp_value, Tensor) and fp_value.ndim > 0 and fp_value.shape[0] == rows:
                    a, b = fp_value[index], q_value[index]
                    keep = torch.rand(a.shape, generator=generator).to(a.device) < drop_probability
                    inputs.append(torch.where(keep, a, b) if a.is_floating_point() else a)
                else:
                    inputs.append(fp_value)
                kw = {k: (v[index] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == rows else v)
                      for k, v in kwargs.items()}
            with torch.enable_grad():
                output = module(*inputs, **kw)
                loss = (output - target[index]).pow(2).flatten(1).sum(dim=1).mean()
                warmup = 0.2 * iters
                if step >= warmup:
                    progress = (step - warmup) / max(iters - warmup, 1)
                    beta = 20.0 + (2.0 - 20.0) * progress
                    regulariser = sum((1 - (2 * layer.soft_rounding() - 1).abs().pow(beta)).sum() for layer in layers)
                    loss = loss + weight * regulariser
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        module.eval()
        for layer in layers:
            layer.harden_rounding()
            layer.drop_probability = 0.0
