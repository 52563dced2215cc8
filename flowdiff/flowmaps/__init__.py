r"""Few-step generation: flow maps and consistency models (issue 18).

A flow map :math:`X_{s\to t}` is the solution map of a Gaussian path's probability-flow ODE; learning it
directly replaces tens of solver steps by one to four network calls.

* :class:`FlowMap` — the map with the boundary condition :math:`X_{s\to s} = x` exact by construction
  (a DDIM step with a learned data prediction; :mod:`flowdiff.flowmaps.model`); ``two_time=False`` is a
  consistency model (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models").
  :class:`TwoTimeNetwork` makes a network of :mod:`flowdiff.nn` two-time; :func:`student_from_teacher`
  copies a trained field's network into a student that starts as the teacher.
* Training (:mod:`flowdiff.flowmaps.training`): :func:`consistency_distillation` (any solver of the
  teacher as the ODE step), :func:`consistency_training` (no teacher), :func:`flow_map_distillation`
  (a two-time map by self-consistency, with a teacher or teacher-free, or ``objective="direct"``: every
  jump regressed on the teacher's ODE solve).
* :func:`save_flow_map` / :func:`load_flow_map` (:mod:`flowdiff.flowmaps.io`): a distilled student next to
  its teacher run (``flowdiff distill``; ``flowdiff sample -c FOLDER --nfe 2`` samples it).
* Sampling (:mod:`flowdiff.flowmaps.sampling`): :func:`sample` with 1, 2, 4, ... network calls;
  :func:`ode_flow_map`, the reference map of a field by a fine ODE solve.

>>> student = fd.flowmaps.student_from_teacher(field)                        # doctest: +SKIP
>>> fd.flowmaps.flow_map_distillation(field, student, data, steps=2000)      # doctest: +SKIP
>>> fd.flowmaps.sample(student, (64, 2), steps=2).x                          # doctest: +SKIP
"""

from .io import FLOW_MAP_FILE, is_flow_map_folder, load_flow_map, save_flow_map
from .model import FlowMap, TwoTimeNetwork, student_from_teacher
from .sampling import RENOISE, ode_flow_map, sample, sample_times
from .training import (
    LOSSES, OBJECTIVES, TARGET_SUBSTEPS, FlowMapTraining, consistency_distillation, consistency_training,
    direct_target_substeps, flow_map_distillation
)

__all__ = [
    "FlowMap", "TwoTimeNetwork", "student_from_teacher", "sample", "sample_times", "ode_flow_map", "RENOISE",
    "FlowMapTraining", "LOSSES", "consistency_distillation", "consistency_training", "flow_map_distillation",
    "OBJECTIVES", "TARGET_SUBSTEPS", "direct_target_substeps", "FLOW_MAP_FILE", "is_flow_map_folder", "load_flow_map", "save_flow_map",
]
