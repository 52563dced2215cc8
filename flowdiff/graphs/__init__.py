"""Graph generation with GDSS (Jo, Lee & Hwang, ICML 2022): graph data, score networks, the X/A system of SDEs, S4 sampling, graph and molecule metrics (issue 16)."""
