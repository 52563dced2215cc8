"""SDEs driven by fractional Brownian motion through its Markov approximation (MA-fBM; Daems et al., ICLR 2024) (issue 18)."""
