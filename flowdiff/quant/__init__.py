"""Post-training quantisation of diffusion networks (PTQ4DM, Shang et al., CVPR 2023; Q-Diffusion) (issue 19)."""
