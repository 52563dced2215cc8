r"""A task-specific conditional diffusion forecaster: the baseline TSDiff's self-guidance is compared with.

The same representation (in-window differencing, standardisation by the context), network
(:class:`~flowdiff.timeseries.network.TSDiffNet`) and DDPM schedule as :class:`~flowdiff.timeseries.TSDiff`,
but the network also sees the observed context (values and mask as extra input channels) and is
trained on the forecasting task only: the ε-loss is taken on the horizon positions. Sampling is plain
ancestral DDPM without guidance. This is the CSDI-style conditional model (Tashiro et al. 2021, "CSDI:
Conditional Score-based Diffusion Models for Probabilistic Time Series Imputation") that Kollovieh et al.
(2023, TSDiff) compare their unconditional, self-guided model against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import TSDiff

__all__ = ["ConditionalTSDiff"]


class ConditionalTSDiff(TSDiff):
    """Conditional DDPM forecaster with :class:`TSDiff`'s interface; ``guidance`` is ignored (no guidance)."""

    def _network_features(self) -> int:
        return self.num_features + 2 * self.channels

    def _condition(self, values: Tensor, mask: Tensor) -> Tensor:
        features = self._features()
        cond = torch.cat([values * mask, mask], dim=1)
        if features is None:
            return cond
        return torch.cat([features.expand(values.shape[0], -1, -1), cond], dim=1)

    def _context_mask(self, like: Tensor) -> Tensor:
        mask = torch.zeros_like(like)
        mask[:, :, : self.inner_context] = 1
        return mask

    def _loss(self, x0: Tensor, xt: Tensor, t: Tensor, noise: Tensor, features: Tensor | None) -> Tensor:
        assert self.net is not None
        mask = self._context_mask(x0)
        # the context positions of the noisy input are zeroed: the network reads the context from its clean
        # condition channels only (CSDI's split into conditional observations and noisy targets), so sampling,
        # which has no noisy context to give, sees the same input (it fed its own untrained context outputs back
        # in before, and drifted: 2.5x the probabilistic seasonal naive's CRPS on an AR(1) + season series)
        out = self.net(xt * (1 - mask), t, self._condition(x0, mask))
        return (((out - noise) ** 2) * (1 - mask)).sum() / (1 - mask).sum()

    def _sample(self, target: Tensor, mask: Tensor, levels: Tensor, guidance: str, scale: float,
                generator: torch.Generator) -> Tensor:
        ema = self.ema
        assert ema is not None
        cond = self._condition(target, mask)
        free = 1 - self._context_mask(target)  # the horizon: the positions sampled
        betas = self._betas.to(self.device, self.dtype)
        abar = self._alpha_bar.to(self.device, self.dtype)
        x = torch.randn(target.shape, generator=generator, dtype=self.dtype).to(self.device) * free
        with torch.no_grad():
            for k in range(self.diffusion_steps - 1, -1, -1):
                t = torch.full((x.shape[0],), 1 - (k + 1) / self.diffusion_steps, dtype=self.dtype, device=self.device)
                ab, beta = abar[k], betas[k]
                ab_prev = abar[k - 1] if k > 0 else torch.ones((), dtype=self.dtype, device=self.device)
                eps = ema(x, t, cond)
                x_next = (x - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
                if k > 0:
                    var = beta * (1 - ab_prev) / (1 - ab)
                    x_next = x_next + var.sqrt() * torch.randn(x.shape, generator=generator, dtype=self.dtype).to(self.device)
                x = x_next * free
        return x + target * (1 - free)  # the observed context (normalised) in the context positions
