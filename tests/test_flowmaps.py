"""Flow maps and consistency models (issue 18) against the exact flow map of a Gaussian mixture.

The exact flow map X_{s->t} of the mixture's probability-flow ODE is a fine reference solve
(fd.flowmaps.ode_flow_map, 300 evaluations of DPM-Solver++(3M)); the exact teacher is the mixture's
closed-form denoiser (flowdiff.testing).
"""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.flowmaps import FlowMap, TwoTimeNetwork
from flowdiff.testing import random_mixture

PATH = fd.paths.Linear()


def mixture(dim: int = 2, seed: int = 0):
    gm = random_mixture(dim, 3, seed=seed, anisotropic=False, path=PATH)
    return gm, fd.Field(gm.model("data"), PATH, "data")


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).flatten(1).sum(1).mean().sqrt())


def exact_network(teacher: fd.Field):
    """g*(x, s, t) = (X_{s->t}(x) - c_skip x) / c_out: the network whose FlowMap is the exact flow map."""
    helper = FlowMap(lambda x, s, t: x, PATH, "data")

    def network(x, s, t):
        s0, t0 = float(s[0]), float(t[0])
        assert torch.all(s == s[0]) and torch.all(t == t[0])  # the sampler uses one time per step
        mapped = fd.flowmaps.ode_flow_map(teacher, x, s0, t0, nfe=100)
        c_skip, c_out = helper.coefficients(s, t, x)
        return (mapped - c_skip * x) / c_out

    return network


def precond_student(dim: int, sigma_data: float, two_time: bool = True, hidden: int = 64, seed: int = 0) -> FlowMap:
    torch.manual_seed(seed)
    net = fd.nn.Preconditioned(fd.nn.MLP(dim, hidden=hidden, depth=2), PATH, "data", sigma_data=sigma_data)
    return FlowMap(TwoTimeNetwork(net) if two_time else net, PATH, "data", two_time=two_time)


# ----- parametrisation -------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["data", "noise", "velocity"])
def test_boundary_condition_is_exact(prediction):
    torch.manual_seed(0)
    net = fd.nn.MLP(3, hidden=16, depth=1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()  # a network far from zero output
    fm = FlowMap(TwoTimeNetwork(net), PATH, prediction).double()
    cm = FlowMap(fd.nn.MLP(3, hidden=16, depth=1).double(), PATH, prediction, two_time=False)
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        for s in (fm.t_start, 0.3, 0.9, fm.t_end):
            assert torch.equal(fm(x, s, s), x)
        assert torch.equal(cm(x, cm.t_end), x)
        assert not torch.allclose(fm(x, 0.3, 0.6), x)


def test_flow_map_with_the_denoiser_is_the_ddim_step():
    gm, teacher = mixture()
    fm = FlowMap(lambda x, s, t: gm.model("data")(x, s), PATH, "data")
    x = PATH.prior_sample((64, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ddim = fd.sample(teacher, x, solver="ddim", grid=[0.2, 0.7], t_start=0.2, t_end=0.7, denoise_final=False).state
    assert rms(fm(x, 0.2, 0.7), ddim) < 1e-12


@pytest.mark.parametrize("steps", [1, 4])
def test_exact_flow_map_samples_the_reference_ode_solution(steps):
    gm, teacher = mixture()
    fm = FlowMap(exact_network(teacher), PATH, "data")
    x = PATH.prior_sample((64, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = fd.sample(teacher, x, solver="dpm-solver++3m", nfe=200, grid="logsnr", denoise_final=False).state
    res = fd.flowmaps.sample(fm, x, steps=steps)
    assert res.nfe == steps and len(res.grid) == steps + 1 and res.solver == "flow-map"
    assert rms(res.x, ref) < 2e-3
    ddim = fd.flowmaps.sample(FlowMap(lambda x, s, t: gm.model("data")(x, s), PATH, "data"), x, steps=steps)
    assert rms(ddim.x, ref) > 30 * rms(res.x, ref)  # the check can fail: DDIM at `steps` steps is far off


def test_two_time_network_and_student_start_as_the_teacher():
    torch.manual_seed(0)
    teacher_net = fd.nn.MLP(2, hidden=16, depth=1)
    with torch.no_grad():
        teacher_net.output_layer.weight.normal_()
    teacher = fd.Field(teacher_net, PATH, "noise")
    student = fd.flowmaps.student_from_teacher(teacher)
    x = torch.randn(6, 2)
    s, t = torch.full((6,), 0.3), torch.linspace(0.3, 0.9, 6)
    with torch.no_grad():
        ddim = student.jump(x, s, t, teacher.denoise(x, s))
        assert torch.allclose(student(x, s, t), ddim, atol=1e-6)
    assert any(p.requires_grad for p in student.parameters())
    assert isinstance(teacher_net.time_embedding, fd.nn.TimeEmbedding)  # the teacher is untouched
    assert all(p is not q for p in teacher_net.parameters() for q in student.parameters())
    cm = fd.flowmaps.student_from_teacher(teacher, two_time=False)
    with torch.no_grad():
        assert torch.allclose(cm(x, s), student.jump(x, s, torch.full((6,), cm.t_end), teacher.denoise(x, s)), atol=1e-6)


def test_consistency_sampler_renoise():
    gm, teacher = mixture()
    cm = FlowMap(lambda x, s: gm.model("data")(x, s), PATH, "data", two_time=False)
    x = PATH.prior_sample((32, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    det = fd.flowmaps.sample(cm, x, steps=3, times=[cm.t_start, 0.4, 0.7, cm.t_end])
    # deterministic re-noising with the exact denoiser is DDIM on the same grid up to the sigma(t_end) = 1e-3
    # the consistency function keeps (it returns the state at t_end, not the denoised one)
    ddim = fd.sample(teacher, x, solver="ddim", grid=[cm.t_start, 0.4, 0.7, cm.t_end], denoise_final=False)
    assert det.solver == "consistency" and det.nfe == 3
    assert rms(det.x, ddim.x) < 1e-2
    g = torch.Generator().manual_seed(0)
    fresh = fd.flowmaps.sample(cm, x, steps=3, renoise="fresh", generator=g)
    assert rms(fresh.x, det.x) > 0.1


# ----- training ---------------------------------------------------------------------------------

def test_flow_map_distillation_beats_its_initialisation_and_teacher_ddim():
    gm, teacher = mixture(dim=1)
    data = gm.sample(4096, generator=torch.Generator().manual_seed(4)).float()
    student = precond_student(1, float(data.std()))
    x = PATH.prior_sample((256, 1), generator=torch.Generator().manual_seed(5))
    ref = fd.sample(teacher, x.double(), solver="dpm-solver++3m", nfe=300, grid="logsnr", denoise_final=False).state
    grid = fd.solvers.make_grid(PATH, "logsnr", 4)
    before = rms(fd.flowmaps.sample(student, x, steps=2, times=grid[::2]).x, ref)
    out = fd.flowmaps.flow_map_distillation(teacher, student, data, steps=200, batch_size=128, bins=4, lr=3e-3,
                                            solver="heun", target_ema=0.9, objective="self-consistency")
    assert out.method == "flow-map-distillation" and len(out.losses) == 200 and out.teacher_nfe > 0
    assert torch.equal(out.grid, grid) and len(out.grid) == 5
    after = rms(fd.flowmaps.sample(student, x, steps=2).x, ref)
    ddim = rms(fd.sample(teacher, x.double(), solver="ddim", nfe=3).x, ref)  # the teacher's 2 steps + denoise
    assert after < 0.5 * before and after < 0.5 * ddim, (before, after, ddim)
    assert out.cpu_seconds > 0


def test_direct_is_the_default_with_a_teacher_and_its_targets_converge():
    """With a teacher, the default objective is ``direct``; its substeps come from a convergence check
    whose chosen solve is, against the exact (fine dopri5) solution, within a few times the tolerance."""
    gm, teacher = mixture(dim=2, seed=3)
    data = gm.sample(2048, generator=torch.Generator().manual_seed(1)).float()
    student = precond_student(2, float(data.std()))
    out = fd.flowmaps.flow_map_distillation(teacher, student, data, steps=2, batch_size=64, bins=8)
    assert out.method == "flow-map-direct-distillation" and out.options["solver"] == "unipc"
    k, check = out.options["substeps"], out.options["target_check"]
    assert k in fd.flowmaps.TARGET_SUBSTEPS and check["relative_difference"][k] <= check["tol"]
    # the same check by hand, and the chosen solve against the exact solution of the ODE
    x1 = data[:64].double()
    grid = out.grid
    tol = 1e-3
    k2, info = fd.flowmaps.direct_target_substeps(teacher, student, x1, {}, grid, "unipc", {}, tol)
    assert k2 == k or info["relative_difference"][k2] <= tol
    eps = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0), dtype=x1.dtype)
    c = PATH.table(grid[:1])
    x_s = c.alpha * x1 + c.sigma * eps
    times = fd.solvers.make_grid(PATH, "logsnr", k2 * 8, float(grid[0]), float(grid[-1]))
    chosen = fd.sample(teacher, x_s, solver="unipc", grid=times, denoise_final=False).state
    exact = fd.sample(teacher, x_s, solver="dopri5", grid=times[[0, -1]], denoise_final=False, rtol=1e-10,
                      atol=1e-10).state
    err = float((chosen - exact).pow(2).mean().sqrt()) / float(x1.pow(2).mean().sqrt())
    assert err <= 5 * tol, (err, info)
    coarse = fd.sample(teacher, x_s, solver="heun", grid=fd.solvers.make_grid(PATH, "logsnr", 8, float(grid[0]),
                                                                                float(grid[-1])), denoise_final=False).state
    assert float((coarse - exact).pow(2).mean().sqrt()) / float(x1.pow(2).mean().sqrt()) > 5 * tol  # the old default


def test_consistency_distillation_and_training_learn():
    gm, teacher = mixture(dim=1, seed=1)
    data = gm.sample(4096, generator=torch.Generator().manual_seed(6)).float()
    x = PATH.prior_sample((256, 1), generator=torch.Generator().manual_seed(7))
    ref = fd.sample(teacher, x.double(), solver="dpm-solver++3m", nfe=300, grid="logsnr", denoise_final=False).state
    errors = {}
    for name in ("init", "cd", "ct"):
        cm = precond_student(1, float(data.std()), two_time=False, hidden=32)
        if name == "cd":
            res = fd.flowmaps.consistency_distillation(teacher, cm, data, steps=200, batch_size=128, bins=10,
                                                       lr=2e-3, solver="dpm-solver++2m", target_ema=0.9)
            assert res.method == "consistency-distillation"
        elif name == "ct":
            res = fd.flowmaps.consistency_training(cm, data, steps=200, batch_size=128, bins=(4, 16), lr=2e-3,
                                                   target_ema=0.9)
            assert res.method == "consistency-training" and res.teacher_nfe == 0 and len(res.grid) == 17
        errors[name] = rms(fd.flowmaps.sample(cm, x, steps=1).x, ref)
    assert errors["cd"] < 0.5 * errors["init"], errors
    assert errors["ct"] < errors["init"], errors


def test_teacher_free_flow_map_training_learns_the_flow_map():
    gm, teacher = mixture(dim=1)
    data = gm.sample(4096, generator=torch.Generator().manual_seed(8)).float()
    student = precond_student(1, float(data.std()))
    x = PATH.prior_sample((256, 1), generator=torch.Generator().manual_seed(9))
    ref = fd.sample(teacher, x.double(), solver="dpm-solver++3m", nfe=300, grid="logsnr", denoise_final=False).state
    grid = fd.solvers.make_grid(PATH, "logsnr", 4)
    before = rms(fd.flowmaps.sample(student, x, steps=2, times=grid[::2]).x, ref)
    out = fd.flowmaps.flow_map_distillation(None, student, data, steps=200, batch_size=128, bins=4, lr=3e-3,
                                            target_ema=0.9)
    assert out.method == "flow-map-training" and out.teacher_nfe == 0
    after = rms(fd.flowmaps.sample(student, x, steps=2).x, ref)
    assert after < 0.6 * before, (before, after)  # order-1 self-steps gave 0.94 of before


def test_labels_reach_teacher_and_student():
    seen = []

    def teacher_model(x, t, y=None):
        seen.append(None if y is None else y.shape[0])
        return torch.zeros_like(x) + (0.0 if y is None else y[:, None].to(x.dtype))

    teacher = fd.Field(teacher_model, PATH, "data")
    torch.manual_seed(0)
    student = FlowMap(TwoTimeNetwork(fd.nn.MLP(2, hidden=8, depth=1, num_classes=3)), PATH, "data")
    data, labels = torch.randn(64, 2), torch.randint(0, 3, (64,))
    fd.flowmaps.flow_map_distillation(teacher, student, data, labels=labels, steps=3, batch_size=16, bins=4)
    assert seen and all(n is not None for n in seen)  # every teacher call got its rows' labels


# ----- bad input ---------------------------------------------------------------------------------

def test_student_of_another_shape_than_the_teacher_is_refused():
    gm, teacher = mixture(dim=2)
    data = gm.sample(64).float()
    wrong = FlowMap(TwoTimeNetwork(fd.nn.MLP(3, hidden=8, depth=1)), PATH, "data")
    with pytest.raises(ValueError, match="different shape than the teacher"):
        fd.flowmaps.flow_map_distillation(teacher, wrong, data, steps=1)
    cm = FlowMap(fd.nn.MLP(3, hidden=8, depth=1), PATH, "data", two_time=False)
    with pytest.raises(ValueError, match="shape"):
        fd.flowmaps.consistency_distillation(teacher, cm, data, steps=1)
    with pytest.raises(ValueError, match="two-time"):
        fd.flowmaps.flow_map_distillation(teacher, FlowMap(fd.nn.MLP(2, hidden=8), PATH, two_time=False), data, steps=1)
    other_path = FlowMap(TwoTimeNetwork(fd.nn.MLP(2, hidden=8, depth=1)), fd.paths.VP(), "data")
    with pytest.raises(ValueError, match="path"):
        fd.flowmaps.flow_map_distillation(teacher, other_path, data, steps=1)


def test_bad_arguments():
    net = TwoTimeNetwork(fd.nn.MLP(2, hidden=8, depth=1))
    with pytest.raises(ValueError, match="prediction"):
        FlowMap(net, PATH, "epsilon")
    with pytest.raises(TypeError, match="GaussianPath"):
        FlowMap(net, "linear")
    fm = FlowMap(net, PATH)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="s <= t"):
        fm(x, 0.8, 0.2)
    with pytest.raises(ValueError, match="target time"):
        fm(x, 0.2)
    cm = FlowMap(fd.nn.MLP(2, hidden=8, depth=1), PATH, two_time=False)
    with pytest.raises(ValueError, match="t_end"):
        cm(x, 0.2, 0.5)
    with pytest.raises(ValueError, match="steps"):
        fd.flowmaps.sample(fm, x, steps=0)
    with pytest.raises(ValueError, match="steps \\+ 1"):
        fd.flowmaps.sample(fm, x, steps=2, times=[fm.t_start, fm.t_end])
    with pytest.raises(ValueError, match="renoise"):
        fd.flowmaps.sample(cm, x, steps=2, renoise="random")
    with pytest.raises(ValueError, match="solver"):
        fd.flowmaps.consistency_distillation(fd.Field(lambda x, t: x, PATH, "data"), cm, x, steps=1, solver="rk9")
    with pytest.raises(ValueError, match="loss"):
        fd.flowmaps.consistency_training(cm, x, steps=1, loss="l1")
    with pytest.raises(ValueError, match="labels"):
        fd.flowmaps.consistency_training(cm, x, labels=torch.zeros(3, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="TimeEmbedding"):
        TwoTimeNetwork(torch.nn.Linear(2, 2))


def test_non_finite_values_are_reported():
    bad = FlowMap(lambda x, s, t: torch.full_like(x, math.nan), PATH, "data")
    with pytest.raises(fd.solvers.NonFiniteStateError, match="step 0"):
        fd.flowmaps.sample(bad, (4, 2), steps=2, dtype=torch.float64)
    cm = FlowMap(fd.nn.MLP(2, hidden=8, depth=1), PATH, two_time=False)
    data = torch.randn(32, 2)

    def nan_data(batch, generator):
        return torch.full((batch, 2), math.nan)

    with pytest.raises(fd.train.NonFiniteLossError):
        fd.flowmaps.consistency_training(cm, nan_data, steps=2, batch_size=8)
    data[0, 0] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        fd.flowmaps.consistency_training(cm, data, steps=1)


def test_dtype_follows_the_model():
    gm, teacher = mixture()
    student = precond_student(2, 1.0).double()
    res = fd.flowmaps.sample(student, (8, 2), steps=4, generator=torch.Generator().manual_seed(0))
    assert res.x.dtype == torch.float64 and res.x.shape == (8, 2)
    out = fd.flowmaps.flow_map_distillation(teacher, student, gm.sample(64), steps=2, batch_size=8, bins=4)
    assert all(math.isfinite(v) for v in out.losses)


TEACHER_SOLVERS = ("ddim", "dpm-solver++2m", "dpm-solver++3m", "unipc", "deis", "heun", "dpm-solver-2s", "dpm-solver-3s")


def test_issue18_two_step_flow_map_beats_the_teachers_best_4_nfe_solver():
    """Issue 18's check: a two-step flow map distilled from an exact-GMM teacher (``objective="direct"``:
    the two jumps of the 2-step sampler regressed on the teacher's fine Heun solve) is closer to the
    reference ODE solution than every deterministic solver of the library at 4 NFE (best of with and
    without the final denoise). The benchmark's 16-interval model (3000 updates) measures 0.058 at 2
    steps against 0.191 for the best 4-NFE solver (fitted tuned-multistep) — docs/flowmaps.md. Here (2
    intervals, 200 updates, ~9 CPU s): about 0.19 against UniPC's 0.337 at 4 NFE."""
    gm = random_mixture(2, 4, seed=0, path=PATH)
    teacher = fd.Field(gm.model("data"), PATH, "data")
    data = gm.sample(8192, generator=torch.Generator().manual_seed(1)).float()
    x = PATH.prior_sample((500, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = fd.sample(teacher, x, solver="dpm-solver++3m", nfe=300, grid="logsnr", denoise_final=False).state
    best4 = min(rms(fd.sample(teacher, x, solver=name, nfe=4, denoise_final=final).x, ref)
                for name in TEACHER_SOLVERS for final in (True, False))
    student = precond_student(2, float(data.std()), hidden=64)
    before = rms(fd.flowmaps.sample(student, x.float(), steps=2, times=fd.solvers.make_grid(PATH, "logsnr", 2)).x, ref)
    out = fd.flowmaps.flow_map_distillation(teacher, student, data, bins=2, jumps=(1,), objective="direct",
                                            solver="heun", substeps=8, steps=200, batch_size=256, lr=3e-3)
    assert out.method == "flow-map-direct-distillation" and out.teacher_nfe > 0
    two = rms(fd.flowmaps.sample(student, x.float(), steps=2).x, ref)
    assert two < 0.75 * best4 < 0.75 * before, (two, best4, before)


def test_direct_objective_arguments():
    gm, teacher = mixture()
    student = precond_student(2, 1.0)
    data = gm.sample(64, generator=torch.Generator().manual_seed(0)).float()
    with pytest.raises(ValueError, match="needs a teacher"):
        fd.flowmaps.flow_map_distillation(None, student, data, objective="direct", steps=1)
    with pytest.raises(ValueError, match="unknown objective"):
        fd.flowmaps.flow_map_distillation(teacher, student, data, objective="shortcut", steps=1)
    with pytest.raises(ValueError, match="powers of two"):
        fd.flowmaps.flow_map_distillation(teacher, student, data, objective="direct", bins=4, jumps=(3,), steps=1)
    with pytest.raises(ValueError, match="self-consistency needs every halving"):
        fd.flowmaps.flow_map_distillation(teacher, student, data, bins=4, jumps=(4,), steps=1,
                                          objective="self-consistency")
    with pytest.raises(ValueError, match="target_tol"):
        fd.flowmaps.flow_map_distillation(teacher, student, data, target_tol=0.0, steps=1)
