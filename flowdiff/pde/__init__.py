"""PDE solution fields: Random Grid Neural Processes (Vadeboncoeur et al., ICML 2023) for forward and inverse problems, with reference solvers (issue 21)."""
