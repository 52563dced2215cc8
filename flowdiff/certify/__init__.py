"""Certified robustness with randomized smoothing (Cohen et al., ICML 2019), denoised smoothing with diffusion models (Carlini et al., ICLR 2023) and rRCM (issue 19)."""
