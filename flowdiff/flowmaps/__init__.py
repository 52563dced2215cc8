"""Few-step generation: consistency models (Song et al., ICML 2023), consistency distillation and training, two-time flow maps (issue 18)."""
