"""Mean-reverting SDEs (IR-SDE, Luo et al., ICML 2023) and their semi-analytic MRS sampler (Li et al., ICLR 2025) (issue 18)."""
