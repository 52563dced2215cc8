"""fd.steer against exact tilted targets (flowdiff.testing.tilted_mixture), budgets and input errors.

The tilted law p(x) e^{r(x)/β}/Z of a Gaussian mixture and a reward Gaussian in a linear feature is
again a mixture in closed form, so the SMC sampler is checked on its mode weights (TV) and the
searches on the reward they reach at equal model-evaluation budgets.
"""

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.testing import GaussianMixture, mode_weight_tv, tilted_mixture, tilted_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def _field(mixture, prediction="noise"):
    return fd.Field(mixture.model(prediction), mixture.path, prediction)


@pytest.fixture(scope="module")
def rare2():
    # d = 2, the reward favours a mode of prior weight 0.05 (tilted weight ~0.5)
    return tilted_problem(2, num_modes=4, seed=0)


def test_available_lists_every_method():
    assert {"smc", "fk", "bon", "beam", "rbf", "dps"} <= set(fd.steer.available())
    assert fd.steer.describe("smc").kind == "sampler"
    with pytest.raises(ValueError, match="unknown steering method"):
        fd.steer.describe("nope")


@pytest.mark.parametrize("dim,seed,beta", [(2, 0, 1.0), (8, 3, 2.0), (16, 3, 4.0)])
def test_smc_reaches_the_exact_tilted_mode_weights_where_best_of_n_does_not(dim, seed, beta):
    tilt = tilted_problem(dim, num_modes=4, seed=seed, temperature=beta)
    field = _field(tilt.prior)
    g = torch.Generator().manual_seed(seed)
    res = fd.steer.sample(field, tilt.reward, method="smc", num_samples=500, nfe=400, temperature=beta, generator=g)
    assert res.nfe <= 400 and res.x.shape == (500, dim) and res.reward.shape == (500,)
    tv = mode_weight_tv(res.x, tilt)
    assert tv <= 0.05, (tv, tilt.weights)
    bon = fd.steer.sample(field, tilt.reward, method="bon", num_samples=500, nfe=400, temperature=beta, generator=g)
    assert mode_weight_tv(bon.x, tilt) > 0.1
    prior_tv = 0.5 * float((tilt.prior.weights - tilt.weights).abs().sum())
    assert prior_tv > 0.3  # the test is not trivial: the prior is far from the target


@pytest.mark.parametrize("potential", ["diff", "max", "add", "rt"])
def test_every_potential_targets_the_tilted_law_through_the_final_correction(potential):
    prior = GaussianMixture([[-2.0], [2.0]], scales=[[0.4], [0.4]], weights=[0.8, 0.2])
    tilt = tilted_mixture(prior, [[1.0]], [0.8], scale=1.0, temperature=1.0)  # weights ~ (0.27, 0.73)
    res = fd.steer.sample(_field(prior), tilt.reward, method="smc", num_samples=1000, nfe=600, potential=potential,
                          interval=12, generator=torch.Generator().manual_seed(1))
    assert mode_weight_tv(res.x, tilt) < 0.05, (potential, res.info["final_ess"])


def test_gradient_guided_smc_stays_exact(rare2):
    res = fd.steer.sample(_field(rare2.prior), rare2.reward, method="smc", num_samples=400, nfe=400, guidance=1.0,
                          generator=torch.Generator().manual_seed(4))
    assert res.vjp > 0
    assert mode_weight_tv(res.x, rare2) <= 0.05


def test_rbf_finds_at_least_the_reward_of_best_of_n(rare2):
    field = _field(rare2.prior)
    kw = dict(num_samples=100, nfe=500, generator=torch.Generator().manual_seed(0))
    rbf = fd.steer.sample(field, rare2.reward, method="rbf", **kw)
    bon = fd.steer.sample(field, rare2.reward, method="bon", **kw)
    assert rbf.nfe <= 500 and bon.nfe <= 500
    assert float(rbf.reward.mean()) >= float(bon.reward.mean())
    assert float(rbf.reward.max()) >= float(bon.reward.max()) - 1e-6
    torch.testing.assert_close(rbf.reward, rare2.reward(rbf.x.double()), rtol=1e-5, atol=1e-5)
    beam = fd.steer.sample(field, rare2.reward, method="beam", **kw)
    assert float(beam.reward.mean()) > float(rare2.prior_expected_reward())


def test_dps_moves_toward_high_reward(rare2):
    field = _field(rare2.prior)
    plain = fd.steer.sample(field, rare2.reward, method="bon", num_samples=200, nfe=20, candidates=1,
                            generator=torch.Generator().manual_seed(0))
    guided = fd.steer.sample(field, rare2.reward, method="dps", num_samples=200, nfe=50, scale=1.0,
                             generator=torch.Generator().manual_seed(0))
    assert guided.vjp > 0 and guided.nfe == 50
    assert float(guided.reward.mean()) > float(plain.reward.mean()) + 0.5


def test_nfe_is_counted_in_rows_per_returned_sample(rare2):
    rows = []

    def model(x, t):
        rows.append(x.shape[0])
        return rare2.prior.model("noise")(x, t)

    field = fd.Field(model, rare2.prior.path, "noise")
    for method in ("smc", "bon", "beam", "rbf", "dps"):
        rows.clear()
        field.reset_nfe()
        res = fd.steer.sample(field, rare2.reward, method=method, num_samples=8, nfe=100, shape=(2,),
                              generator=torch.Generator().manual_seed(0))
        assert res.nfe == sum(rows) / 8 <= 100, method
        assert field.nfe == len(rows)
        assert res.method == method


def test_dtype_shape_inference_and_reproducibility(rare2):
    field = _field(rare2.prior)
    a = fd.steer.sample(field, rare2.reward, "smc", 16, 100, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
    b = fd.steer.sample(field, lambda x: rare2.reward(x), "smc", 16, 100, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)  # shape from the exact model's mixture
    assert a.x.dtype == torch.float64 and torch.equal(a.x, b.x)
    c = fd.steer.sample(field, rare2.reward, "bon", 4, 40, dtype=torch.float32)
    assert c.x.dtype == torch.float32
    class Opaque:  # a network that does not say its input shape
        def __init__(self, f):
            self._f = f

        def __call__(self, x, t):
            return self._f(x, t)

    opaque = fd.Field(Opaque(rare2.prior.model("noise")), rare2.prior.path, "noise")
    with pytest.raises(ValueError, match="shape="):
        fd.steer.sample(opaque, lambda x: -x.pow(2).sum(-1), "bon", 4, 40)
    res = fd.steer.sample(opaque, lambda x: -x.pow(2).sum(-1), "bon", 4, 40, shape=2)
    assert res.x.shape == (4, 2)


@pytest.mark.parametrize("method", ["smc", "bon", "beam", "rbf", "dps"])
def test_bad_rewards_raise_one_clear_error(rare2, method):
    field = _field(rare2.prior)
    kw = dict(method=method, num_samples=4, nfe=60)
    with pytest.raises(ValueError, match="one value per sample"):
        fd.steer.sample(field, lambda x: rare2.reward(x)[:, None].expand(-1, 3), **kw)
    with pytest.raises(ValueError, match="one value per sample"):
        fd.steer.sample(field, lambda x: rare2.reward(x)[:-1], **kw)
    for bad in (math.nan, math.inf, -math.inf):
        def reward(x, bad=bad):
            r = rare2.reward(x).clone()
            r[0] = bad
            return r
        with pytest.raises(ValueError, match="non-finite"):
            fd.steer.sample(field, reward, **kw)
    with pytest.raises(ValueError, match="torch.Tensor"):
        fd.steer.sample(field, lambda x: 1.0, **kw)


def test_bad_arguments_raise_one_clear_error(rare2):
    field = _field(rare2.prior)
    for temp in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            fd.steer.sample(field, rare2.reward, "smc", 4, 100, temperature=temp)
    for method in ("smc", "bon", "beam", "rbf", "dps"):
        with pytest.raises(ValueError, match="too small for one trajectory"):
            fd.steer.sample(field, rare2.reward, method, 4, 3)
    with pytest.raises(ValueError, match="too small for one trajectory"):
        fd.steer.sample(field, rare2.reward, "bon", 4, 10, steps=20)
    with pytest.raises(ValueError, match="exceeds the budget"):
        fd.steer.sample(field, rare2.reward, "smc", 4, 100, steps=20, particles=10)
    with pytest.raises(ValueError, match="nfe"):
        fd.steer.sample(field, rare2.reward, "smc", 4, 0)
    with pytest.raises(ValueError, match="num_samples"):
        fd.steer.sample(field, rare2.reward, "smc", 0, 100)
    with pytest.raises(TypeError, match="unknown option"):
        fd.steer.sample(field, rare2.reward, "smc", 4, 100, particels=3)
    with pytest.raises(ValueError, match="potential"):
        fd.steer.sample(field, rare2.reward, "smc", 4, 100, potential="sum")
    with pytest.raises(TypeError, match="differentiable"):
        fd.steer.sample(field, lambda x: rare2.reward(x).detach(), "dps", 4, 100)
    with pytest.raises(TypeError, match="field"):
        fd.steer.sample("field", rare2.reward, "smc", 4, 100)
    with pytest.raises(TypeError, match="callable"):
        fd.steer.sample(field, 3.0, "smc", 4, 100)


def test_a_reward_built_in_the_other_float_dtype_is_fed_that_dtype(rare2):
    A64 = rare2.A  # float64, while the samples are float32
    field = _field(rare2.prior)

    def reward(x):
        return -((x @ A64.T - rare2.b) ** 2).sum(-1)

    res = fd.steer.sample(field, reward, "smc", 8, 100, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    assert res.x.dtype == torch.float32 and torch.isfinite(res.reward).all()
    res = fd.steer.sample(field, reward, "dps", 8, 20, dtype=torch.float32)
    assert res.x.dtype == torch.float32
