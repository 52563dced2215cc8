"""Graph generation with GDSS (Jo, Lee & Hwang, ICML 2022, "Score-based Generative Modeling of Graphs via the
System of Stochastic Differential Equations"): graph data, permutation-equivariant score networks, the X/A
system of SDEs on flowdiff paths, the S4 sampler, and graph metrics (issue 16; docs/graphs.md).

Entry points: :func:`train_gdss` (``flowdiff train --data community_small -o RUN``), :func:`generate`
(``fd.graphs.generate(RUN_or_field, num_graphs, generator=...)`` -> list of ``networkx.Graph``),
:func:`load_graph_field`, :func:`s4_sample`, and the metrics :func:`graph_mmd` / :func:`evaluate_graphs`.
"""

from .data import (DATASETS, GraphBatch, GraphDataError, check_graphs, community_small, degree_features, ego_like,
                   grid, make_graphs, node_count_distribution, permute, read_graphs, to_dense, to_networkx,
                   write_graphs)
from .metrics import (clustering_mmd, degree_mmd, erdos_renyi_like, evaluate_graphs, gaussian_emd_kernel, graph_mmd,
                      mmd_squared, orbit_counts, orbit_mmd, spectral_mmd)
from .model import (DEFAULT_NETWORK, GDSSNetwork, GraphField, GraphLayout, GraphTrainConfig, gdss_loss, generate,
                    load_graph_field, s4_sample, train_gdss)
from .nets import ScoreNetworkA, ScoreNetworkX
from . import molecules
from .molecules import (MOLECULE_DATASETS, MoleculeDataError, MoleculeSamples, MoleculeTrainConfig, decode_molecules,
                        generate_molecules, molecule_dataset, molecule_metrics, nspdk_mmd, smiles_to_dense,
                        train_molecules)

__all__ = [
    "DATASETS", "GraphBatch", "GraphDataError", "check_graphs", "community_small", "degree_features", "ego_like",
    "grid", "make_graphs", "node_count_distribution", "permute", "read_graphs", "to_dense", "to_networkx",
    "write_graphs", "clustering_mmd", "degree_mmd", "erdos_renyi_like", "evaluate_graphs", "gaussian_emd_kernel",
    "graph_mmd", "mmd_squared", "orbit_counts", "orbit_mmd", "spectral_mmd", "DEFAULT_NETWORK", "GDSSNetwork",
    "GraphField", "GraphLayout", "GraphTrainConfig", "gdss_loss", "generate", "load_graph_field", "s4_sample",
    "train_gdss", "ScoreNetworkA", "ScoreNetworkX", "molecules", "MOLECULE_DATASETS", "MoleculeDataError",
    "MoleculeSamples", "MoleculeTrainConfig", "decode_molecules", "generate_molecules", "molecule_dataset",
    "molecule_metrics", "nspdk_mmd", "smiles_to_dense", "train_molecules",
]
