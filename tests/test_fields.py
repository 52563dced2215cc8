"""Field conversions against the oracle's independently computed predictions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowdiff as fd
from flowdiff.paths import VE, VP, Cosine, Discrete, Linear, Shifted, SubVP, Trig
from flowdiff.testing import GaussianMixture, random_mixture

PREDICTIONS = ["noise", "data", "velocity", "score", "v"]
PATHS = [VP(), SubVP(), VE(), Linear(), Trig(), Cosine(), Discrete.linear(), Shifted(Linear(), 3.0)]
PATH_IDS = [type(p).__name__ for p in PATHS]


def _full_cov_mixture():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) / 4 + 0.05 * torch.eye(4, dtype=torch.float64)
    return GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64) * 2, cov, weights=[0.2, 0.5, 0.3])


MIXTURES = {"diagonal": random_mixture(5, 3, seed=1), "full": _full_cov_mixture()}


def _rel_err(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)).max())


@pytest.mark.parametrize("mixture", list(MIXTURES))
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_every_conversion_is_exact(path, mixture):
    oracle = MIXTURES[mixture].with_path(path)
    g = torch.Generator().manual_seed(0)
    x1 = oracle.sample(128, generator=g)
    t = path.t_min + (path.t_max - path.t_min) * torch.rand(128, generator=g, dtype=torch.float64)
    xt, _ = path.sample(x1, t, generator=g)
    truth = {p: oracle.predict(xt, t, p) for p in PREDICTIONS}
    for source in PREDICTIONS:
        field = fd.Field(oracle.model(source), path, source)
        for target in PREDICTIONS:
            got = field.evaluate(xt, t, target)
            assert _rel_err(got, truth[target]) < 1e-8, (source, target)


def test_oracle_score_is_gradient_of_log_density():
    oracle = MIXTURES["full"].with_path(Trig())
    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    t = torch.rand(16, dtype=torch.float64) * 0.9 + 0.05
    (grad,) = torch.autograd.grad(oracle.log_prob_t(x, t).sum(), x)
    torch.testing.assert_close(oracle.score(x.detach(), t), grad)


@settings(max_examples=40, deadline=None)
@given(
    path_index=st.integers(0, len(PATHS) - 1),
    source=st.sampled_from(PREDICTIONS),
    target=st.sampled_from(PREDICTIONS),
    u=st.floats(0.0, 1.0),
    batch=st.integers(1, 7),
    image=st.booleans(),
)
def test_conversion_property(path_index, source, target, u, batch, image):
    """Any path, t, batch size and data shape (vectors or images) in float64."""
    path = PATHS[path_index]
    dim = 4
    oracle = MIXTURES["diagonal"] if not image else random_mixture(dim, 2, seed=5)
    oracle = oracle.with_path(path)
    t = path.t_min + u * (path.t_max - path.t_min)
    x = oracle.sample(batch, generator=torch.Generator().manual_seed(batch))
    xt, _ = path.sample(x, t)
    if image:
        xt = xt.reshape(batch, 1, 2, 2)
    field = fd.Field(oracle.model(source), path, source)
    got = field.evaluate(xt, t, target).reshape(batch, -1)
    truth = oracle.predict(xt.reshape(batch, -1), t, target)
    assert _rel_err(got, truth) < 1e-8


@pytest.mark.parametrize("source", PREDICTIONS)
def test_float32_follows_input_and_stays_accurate(source):
    path = VP()
    oracle = MIXTURES["diagonal"].with_path(path)
    x1 = oracle.sample(64, generator=torch.Generator().manual_seed(2))
    t = torch.full((64,), 0.5, dtype=torch.float64)
    xt, _ = path.sample(x1, t)
    exact = oracle.predict(xt, t, "velocity")

    def model32(x, t):
        return oracle.predict(x.double(), t.double(), source).float()

    field = fd.Field(model32, path, source)
    got = field.velocity(xt.float(), 0.5)
    assert got.dtype == torch.float32
    assert _rel_err(got.double(), exact) < 1e-4


def test_model_always_gets_batched_t():
    seen = []

    def model(x, t, **cond):
        seen.append((tuple(t.shape), cond))
        return torch.zeros_like(x)

    field = fd.Field(model, VP(), "noise")
    x = torch.randn(5, 3)
    field.noise(x, 0.5)
    field.noise(x, torch.tensor(0.5))
    field.noise(x, torch.full((5,), 0.5), y=torch.arange(5))
    assert [s for s, _ in seen] == [(5,), (5,), (5,)]
    assert "y" in seen[-1][1]
    assert field.nfe == 3


def test_drift_is_velocity_plus_eps_score():
    path = Linear()
    oracle = MIXTURES["diagonal"].with_path(path)
    field = fd.Field(oracle.model("velocity"), path, "velocity")
    x = torch.randn(10, 5, dtype=torch.float64)
    t = torch.full((10,), 0.4, dtype=torch.float64)
    torch.testing.assert_close(field.drift(x, t, eps=0.7), oracle.velocity(x, t) + 0.7 * oracle.score(x, t))
    torch.testing.assert_close(field.drift(x, t, eps=lambda tt: tt**2), oracle.velocity(x, t) + 0.16 * oracle.score(x, t))
    torch.testing.assert_close(field.drift(x, t), oracle.velocity(x, t))
    with pytest.raises(ValueError, match="eps"):
        field.drift(x, t, eps=-1.0)


def test_interpolant_field_drift_from_velocity_and_denoiser():
    from flowdiff.testing import InterpolantOracle

    it = fd.StochasticInterpolant("linear", "brownian")
    base = random_mixture(3, 2, seed=7)
    target = random_mixture(3, 3, seed=8)
    oracle = InterpolantOracle(it, base, target)
    x = torch.randn(20, 3, dtype=torch.float64)
    t = torch.rand(20, dtype=torch.float64) * 0.9 + 0.05
    for pred, spred in [("velocity", "denoiser"), ("velocity", "score"), ("drift", "denoiser")]:
        field = fd.InterpolantField(oracle.model(pred), it, pred, oracle.model(spred), spred)
        torch.testing.assert_close(field.velocity(x, t), oracle.drift(x, t))
        torch.testing.assert_close(field.score(x, t), oracle.score(x, t))
        torch.testing.assert_close(field.noise(x, t), oracle.noise(x, t))
        torch.testing.assert_close(field.predict(x, t), getattr(oracle, pred)(x, t))
        torch.testing.assert_close(field.drift(x, t, 0.3), oracle.drift(x, t) + 0.3 * oracle.score(x, t))


def test_interpolant_field_follows_field_and_keeps_the_old_spellings():
    """InterpolantField(model, path, prediction, ...) like Field; the old order, the keyword
    interpolant= and the method denoiser() still work, with a DeprecationWarning."""
    from flowdiff.testing import InterpolantOracle

    it = fd.StochasticInterpolant("linear", "brownian")
    oracle = InterpolantOracle(it, random_mixture(2, 2, seed=3), random_mixture(2, 2, seed=4))
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    new = fd.InterpolantField(oracle.model("velocity"), it, "velocity", oracle.model("score"), "score")
    assert new.path is it and new.interpolant is it and new.prediction == "velocity"
    with pytest.warns(DeprecationWarning, match=r"InterpolantField\(model, path"):
        old = fd.InterpolantField(it, oracle.model("velocity"), "velocity", oracle.model("score"), "score")
    with pytest.warns(DeprecationWarning, match="use path="):
        keyword = fd.InterpolantField(model=oracle.model("drift"), interpolant=it, score_model=oracle.model("denoiser"))
    for field in (old, keyword):
        assert field.path is it
        torch.testing.assert_close(field.velocity(x, t), oracle.drift(x, t))
    with pytest.warns(DeprecationWarning, match="use noise"):
        eta = keyword.denoiser(x, t)
    torch.testing.assert_close(eta, oracle.noise(x, t))
    torch.testing.assert_close(eta, -it.gamma(t)[:, None] * oracle.score(x, t))
    with pytest.raises(TypeError, match="once"):
        fd.InterpolantField(oracle.model("drift"), it, interpolant=it)
    assert repr(new).startswith("InterpolantField(path=StochasticInterpolant(")


# ----- bad input --------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    field = fd.Field(lambda x, t: x, VP(), "noise")
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="prediction"):
        fd.Field(lambda x, t: x, VP(), "eps")
    with pytest.raises(TypeError, match="GaussianPath"):
        fd.Field(lambda x, t: x, "vp", "noise")
    with pytest.raises(TypeError, match="callable"):
        fd.Field(None, VP(), "noise")
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        field.noise(x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        field.noise(x, 1.2)
    bad_shape = fd.Field(lambda x, t: x[:, :1], VP(), "noise")
    with pytest.raises(ValueError, match="shape"):
        bad_shape.denoise(x, 0.5)
    with pytest.raises(ValueError, match="prediction"):
        field.evaluate(x, 0.5, "flow")
