"""Classifier-free guidance as a field, checked against exact Gaussian-mixture fields."""

from __future__ import annotations

import pytest
import torch

import flowdiff as fd
from flowdiff.guidance import GuidedModel, check_class_label, classifier_free_guidance
from flowdiff.nn import MLP
from flowdiff.paths import VP, Linear
from flowdiff.testing import GaussianMixture, random_mixture

pytestmark = pytest.mark.usefixtures("one_thread")

PREDICTION_TYPES = ["noise", "data", "velocity", "score", "v"]


class ClassMixtureModel(torch.nn.Module):
    """Exact class-conditional model: class k is component k of a mixture, the null label the mixture."""

    def __init__(self, mixture: GaussianMixture, prediction: str):
        super().__init__()
        self.mixture, self.prediction = mixture, prediction
        self.num_classes = mixture.num_components
        self.components = [
            GaussianMixture(mixture.means[k : k + 1], scales=mixture.eigvals[k : k + 1].sqrt(), path=mixture.path)
            for k in range(self.num_classes)
        ]

    def forward(self, x, t, y=None):
        out = self.mixture.predict(x, t, self.prediction)
        if y is None:
            return out
        for k, component in enumerate(self.components):
            rows = y == k
            if rows.any():
                out[rows] = component.predict(x[rows], t[rows], self.prediction)
        return out


def _setup(path, prediction):
    mixture = random_mixture(dim=2, num_components=3, seed=4, path=path)
    model = ClassMixtureModel(mixture, prediction)
    field = fd.Field(model, path, prediction)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, dtype=torch.float64, generator=g) * 1.5
    t = torch.empty(30, dtype=torch.float64).uniform_(0.2, 0.9, generator=g)
    y = torch.arange(30) % 3
    return mixture, model, field, x, t, y


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
@pytest.mark.parametrize("path", [VP(), Linear()], ids=["VP", "Linear"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 4.0])
def test_guided_score_is_the_tilted_score(path, prediction, scale):
    # ∇log p_w(x|y) = (1 − w) ∇log p_t(x) + w ∇log p_t(x|y), with both scores exact.
    mixture, model, field, x, t, y = _setup(path, prediction)
    guided = classifier_free_guidance(field, scale)
    unconditional = mixture.score(x, t)
    conditional = torch.stack([model.components[int(k)].score(x[i : i + 1], t[i : i + 1])[0] for i, k in enumerate(y)])
    expected = (1 - scale) * unconditional + scale * conditional
    torch.testing.assert_close(guided.score(x, t, y=y), expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_scale_one_is_the_conditional_field(prediction):
    _, _, field, x, t, y = _setup(VP(), prediction)
    guided = classifier_free_guidance(field, 1.0)
    for to in ("noise", "data", "velocity"):
        torch.testing.assert_close(guided.evaluate(x, t, to, y=y), field.evaluate(x, t, to, y=y))
    # Without labels the guided field is the unconditional one.
    torch.testing.assert_close(classifier_free_guidance(field, 3.0).velocity(x, t), field.velocity(x, t))


def test_guidance_samples_with_a_solver_and_counts_one_call_per_step():
    _, _, field, _, _, _ = _setup(Linear(), "velocity")
    guided = classifier_free_guidance(field, 2.0)
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = fd.sample(guided, x0, nfe=8, cond={"y": torch.zeros(16, dtype=torch.long)})
    assert res.nfe == 8 and torch.isfinite(res.x).all()


def test_guidance_errors():
    path = Linear()
    unconditional = fd.Field(MLP(2, hidden=8, depth=1), path, "velocity")
    with pytest.raises(ValueError, match="unconditional"):
        classifier_free_guidance(unconditional, 2.0)
    conditional = fd.Field(MLP(2, hidden=8, depth=1, num_classes=3), path, "velocity")
    with pytest.raises(ValueError, match="scale"):
        classifier_free_guidance(conditional, -1.0)
    guided = classifier_free_guidance(conditional, 2.0)
    with pytest.raises(ValueError, match="0..2"):
        guided.velocity(torch.randn(2, 2), 0.5, y=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="outside the trained classes"):
        check_class_label(3, 3)
    with pytest.raises(ValueError, match="unconditional"):
        check_class_label(0, None)
    assert check_class_label(2, 3) == 2
    assert isinstance(guided.model, GuidedModel)


def test_cli_class_and_guidance_errors(tmp_path):
    # One line and exit status 2 for each bad input of issue 13; a good request samples.
    from typer.testing import CliRunner

    from flowdiff.cli import app

    runner = CliRunner()
    common = ["--data", "digits", "--network", "mlp", "--steps", "3", "--batch", "16", "--checkpoint-every", "3"]
    cond, uncond = tmp_path / "cond", tmp_path / "uncond"
    assert runner.invoke(app, ["train", *common, "--label-dropout", "0.1", "--precondition", "--prediction", "data",
                               "-o", str(cond)]).exit_code == 0
    assert runner.invoke(app, ["train", *common, "-o", str(uncond)]).exit_code == 0
    good = runner.invoke(app, ["sample", "-c", str(cond), "-n", "4", "--nfe", "4", "--class", "3",
                               "--guidance-scale", "2", "-o", str(tmp_path / "s")])
    assert good.exit_code == 0, good.output
    cases = [
        (["sample", "-c", str(cond), "-n", "4", "--nfe", "4", "--class", "10"], "outside the trained classes"),
        (["sample", "-c", str(uncond), "-n", "4", "--nfe", "4", "--class", "1", "--guidance-scale", "2"], "unconditional"),
    ]
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("data: digits\nlearning_rate: 0.1\n")
    cases.append((["train", "--config", str(bad_config), "-o", str(tmp_path / "x")], "unknown keys"))
    for args, message in cases:
        result = runner.invoke(app, args if args[0] == "train" else [*args, "-o", str(tmp_path / "s2")])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert len([line for line in result.output.splitlines() if line.startswith("error")]) == 1


def test_stratified_labels_have_the_exact_class_counts():
    from flowdiff.guidance import stratified_labels

    labels = stratified_labels(500, 10, generator=torch.Generator().manual_seed(0))
    assert labels.dtype == torch.long and labels.shape == (500,)
    assert torch.bincount(labels, minlength=10).tolist() == [50] * 10
    # n p_k = (1.75, 3.5, 1.75): floors (1, 3, 1) plus the two largest remainders (0.75, 0.75).
    assert torch.bincount(stratified_labels(7, 3, [1, 2, 1]), minlength=3).tolist() == [2, 3, 2]
    assert torch.bincount(stratified_labels(10, 3, [0, 1, 1]), minlength=3).tolist() == [0, 5, 5]
    # The order is random: not sorted by class.
    assert not torch.equal(labels, torch.sort(labels).values)
    for bad in [dict(count=-1, num_classes=3), dict(count=4, num_classes=0),
                dict(count=4, num_classes=2, weights=[1, -1]), dict(count=4, num_classes=2, weights=[1, 1, 1])]:
        with pytest.raises(ValueError):
            stratified_labels(**bad)


class _ClassConstant(torch.nn.Module):
    """A conditional 'network' whose data prediction is its label: the sample tells the class it was drawn from."""

    num_classes = 3

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), self.num_classes) if y is None else y
        return y.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)


def test_generate_without_class_draws_the_class_mixture_in_exact_proportions():
    # No class asked of a conditional model: every class 0..K-1 equally often, never the null label K.
    from flowdiff.pipeline import generate

    field = fd.Field(_ClassConstant(), Linear(), "data")
    x, _ = generate(field, 30, (2,), nfe=4, seed=0)
    classes = x[:, 0].round().long()
    torch.testing.assert_close(x[:, 0], classes.to(x.dtype), atol=1e-4, rtol=0)
    assert torch.bincount(classes, minlength=4).tolist() == [10, 10, 10, 0]
    one, _ = generate(field, 8, (2,), nfe=4, seed=0, label=2)
    assert torch.allclose(one, torch.full_like(one, 2.0), atol=1e-4)


# ----- guidance as fields (issue 14): scale schedules, classifier and energy guidance -----------------
from flowdiff.guidance import (  # noqa: E402
    GuidanceScale,
    GuidedField,
    classifier_guidance,
    energy_guidance,
    score_coefficient,
)
from flowdiff.testing import Gaussian  # noqa: E402

GROUPS = [[0, 1], [2], [3, 4]]  # classes: sub-mixtures of a five-component mixture


def _sub_mixture(mixture, components):
    return GaussianMixture(mixture.means[components], scales=mixture.eigvals[components].sqrt(),
                           weights=mixture.weights[components], path=mixture.path)


class GroupedClassModel(torch.nn.Module):
    """Exact class-conditional model: class y is the sub-mixture of the components GROUPS[y]
    (weights renormalised), the null label the whole mixture."""

    def __init__(self, mixture, groups, prediction):
        super().__init__()
        self.mixture, self.prediction, self.num_classes = mixture, prediction, len(groups)
        self.classes = [_sub_mixture(mixture, g) for g in groups]
        self.log_priors = torch.log(torch.stack([mixture.weights[g].sum() for g in groups]))

    def forward(self, x, t, y=None):
        out = self.mixture.predict(x, t, self.prediction)
        if y is None:
            return out
        for k, sub in enumerate(self.classes):
            rows = y == k
            if rows.any():
                out[rows] = sub.predict(x[rows], t[rows], self.prediction)
        return out

    def conditional(self, x, t, y, prediction):
        """The exact conditional ``prediction`` of p_t(x | y) row by row."""
        return torch.stack([self.classes[int(k)].predict(x[i:i + 1], t[i:i + 1], prediction)[0] for i, k in enumerate(y)])

    def log_posterior(self, x, t, y):
        """Exact log p_t(y | x) = log π_y + log p_t(x | y) − log Σ_k π_k p_t(x | k), differentiable in x."""
        joint = torch.stack([sub.log_prob_t(x, t) for sub in self.classes], dim=-1) + self.log_priors.to(x.dtype)
        return joint.gather(1, y[:, None])[:, 0] - torch.logsumexp(joint, dim=-1)


def _grouped(path, prediction, n=24):
    mixture = random_mixture(dim=2, num_components=5, seed=7, path=path)
    model = GroupedClassModel(mixture, GROUPS, prediction)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, dtype=torch.float64, generator=g) * 1.5
    t = torch.empty(n, dtype=torch.float64).uniform_(0.1, 0.95, generator=g)
    y = torch.arange(n) % len(GROUPS)
    return mixture, model, x, t, y


PATHS = [VP(), Linear()]


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
@pytest.mark.parametrize("path", PATHS, ids=["VP", "Linear"])
def test_cfg_scale_schedule_with_interval_is_the_tilted_score(path, prediction):
    # w(t) = 0.5 + 4t inside [0.35, 0.75], 1 (the conditional model) outside (Kynkäänniemi et al. 2024).
    mixture, model, x, t, y = _grouped(path, prediction)
    field = fd.Field(model, path, prediction)
    guided = classifier_free_guidance(field, lambda tt: 0.5 + 4 * tt, interval=(0.35, 0.75))
    inside = (t >= 0.35) & (t <= 0.75)
    assert 5 < int(inside.sum()) < len(t) - 5
    w = torch.where(inside, 0.5 + 4 * t, torch.ones_like(t))[:, None]
    expected = (1 - w) * mixture.score(x, t) + w * model.conditional(x, t, y, "score")
    torch.testing.assert_close(guided.score(x, t, y=y), expected, rtol=1e-8, atol=1e-8)
    # A constant scale confined to the interval; a scale schedule returning a 0-d value.
    w2 = torch.where(inside, torch.full_like(t, 3.0), torch.ones_like(t))[:, None]
    expected2 = (1 - w2) * mixture.score(x, t) + w2 * model.conditional(x, t, y, "score")
    torch.testing.assert_close(classifier_free_guidance(field, 3.0, interval=(0.35, 0.75)).score(x, t, y=y), expected2,
                               rtol=1e-8, atol=1e-8)
    constant = classifier_free_guidance(field, lambda tt: torch.tensor(3.0, dtype=tt.dtype))
    torch.testing.assert_close(constant.score(x, t, y=y), classifier_free_guidance(field, 3.0).score(x, t, y=y))


class _RowCounting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.rows = model, model.num_classes, []

    def forward(self, x, t, y=None):
        self.rows.append(x.shape[0])
        return self.model(x, t, y=y)


def test_cfg_outside_the_interval_makes_one_conditional_call():
    mixture, model, x, _, y = _grouped(Linear(), "velocity", n=6)
    counting = _RowCounting(model)
    guided = classifier_free_guidance(fd.Field(counting, Linear(), "velocity"), 4.0, interval=(0.4, 0.6))
    out = guided.velocity(x, 0.9, y=y)
    t = torch.full((6,), 0.9, dtype=torch.float64)
    torch.testing.assert_close(out, model.conditional(x, t, y, "velocity"))
    guided.velocity(x, 0.5, y=y)  # inside: conditional and null halves in one call
    assert counting.rows == [6, 12] and guided.nfe == 2 and guided.vjp == 0
    assert isinstance(guided, GuidedField) and isinstance(guided, fd.Field)


@pytest.mark.parametrize("path", PATHS, ids=["VP", "Linear"])
def test_score_coefficient_is_how_a_score_change_moves_each_prediction(path):
    field = fd.Field(lambda x, t: x, path, "score")
    g = torch.Generator().manual_seed(3)
    x, s, delta = (torch.randn(8, 3, dtype=torch.float64, generator=g) for _ in range(3))
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    for prediction in PREDICTION_TYPES:
        moved = field.convert(s + delta, x, t, "score", prediction) - field.convert(s, x, t, "score", prediction)
        torch.testing.assert_close(moved, score_coefficient(path, prediction, t)[:, None] * delta, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
@pytest.mark.parametrize("path", PATHS, ids=["VP", "Linear"])
def test_classifier_guidance_with_the_exact_posterior_is_the_conditional_field(path, prediction):
    # s + ∇log p_t(y|x) = ∇log p_t(x|y): at w = 1 the exact conditional field, in every prediction type.
    mixture, model, x, t, y = _grouped(path, prediction)
    field = fd.Field(mixture.model(prediction), path, prediction)
    guided = classifier_guidance(field, lambda xx, tt: model.log_posterior(xx, tt, y), scale=1.0)
    for to in PREDICTION_TYPES:
        torch.testing.assert_close(guided.evaluate(x, t, to), model.conditional(x, t, y, to), rtol=1e-7, atol=1e-7)
    # At w = 2.5 it is the classifier-free guided field of the exact conditional model (same tilt).
    cfg = classifier_free_guidance(fd.Field(model, path, prediction), 2.5)
    guided = classifier_guidance(field, lambda xx, tt: model.log_posterior(xx, tt, y), scale=2.5)
    torch.testing.assert_close(guided.score(x, t), cfg.score(x, t, y=y), rtol=1e-7, atol=1e-7)
    assert guided.nfe == 1 and guided.vjp == 0 and guided.model.gradient_calls == 1


def test_classifier_guidance_under_no_grad_and_differentiable_when_asked():
    mixture, model, x, t, y = _grouped(VP(), "noise", n=4)
    guided = classifier_guidance(fd.Field(mixture.model("noise"), VP(), "noise"),
                                 lambda xx, tt: model.log_posterior(xx, tt, y), scale=1.0)
    with torch.no_grad():
        out = guided.score(x, t)
    assert not out.requires_grad
    torch.testing.assert_close(out, model.conditional(x, t, y, "score"))
    # In grad mode the guided score is differentiable in x: its Jacobian is the conditional score's.
    jac = torch.autograd.functional.jacobian(lambda xx: guided.score(xx, t).sum(0), x)
    want = torch.autograd.functional.jacobian(lambda xx: model.conditional(xx, t, y, "score").sum(0), x)
    torch.testing.assert_close(jac, want, rtol=1e-6, atol=1e-6)


def _gaussian_problem(path):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 3, dtype=torch.float64, generator=g)
    cov = a @ a.T / 3 + 0.2 * torch.eye(3, dtype=torch.float64)
    mean = torch.randn(3, dtype=torch.float64, generator=g)
    prior = Gaussian(mean, cov, path=path)
    H = torch.randn(2, 3, dtype=torch.float64, generator=g)
    y_obs = torch.randn(2, dtype=torch.float64, generator=g)
    x = torch.randn(10, 3, dtype=torch.float64, generator=g)
    t = torch.linspace(0.1, 0.9, 10, dtype=torch.float64)
    return prior, mean, cov, H, y_obs, x, t


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
@pytest.mark.parametrize("path", PATHS, ids=["VP", "Linear"])
def test_energy_guidance_matches_the_closed_form_for_a_gaussian_prior(path, prediction):
    # E(x̂) = |H x̂ − y|²/(2σ_y²) with x̂ = μ + αCΣ⁻¹(x − αμ), Σ = α²C + σ²I: the Jacobian of the
    # exact denoiser is αCΣ⁻¹, so ∇ₓE = αΣ⁻¹C Hᵀ(H x̂ − y)/σ_y² and the guided score is s − w∇ₓE.
    prior, mean, cov, H, y_obs, x, t = _gaussian_problem(path)
    sigma_y, w = 0.3, 0.7
    guided = energy_guidance(fd.Field(prior.model(prediction), path, prediction),
                             lambda xh: ((xh @ H.T - y_obs) ** 2).sum(-1) / (2 * sigma_y**2), scale=w)
    c = path.coefficients(t)
    eye = torch.eye(3, dtype=torch.float64)
    expected = []
    for i in range(len(t)):
        al, si = c.alpha[i], c.sigma[i]
        big = al**2 * cov + si**2 * eye
        resid = x[i] - al * mean
        x_hat = mean + al * cov @ torch.linalg.solve(big, resid)
        grad_e = al * torch.linalg.solve(big, cov @ H.T @ (H @ x_hat - y_obs)) / sigma_y**2
        expected.append(-torch.linalg.solve(big, resid) - w * grad_e)
    with torch.no_grad():
        got = guided.score(x, t)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-7, atol=1e-7)
    assert guided.nfe == 1 and guided.vjp == 1


def test_guided_fields_count_evaluations_through_a_solver():
    prior, mean, cov, H, y_obs, x, t = _gaussian_problem(VP())
    field = fd.Field(prior.model("noise"), VP(), "noise")
    energy = energy_guidance(field, lambda xh: ((xh @ H.T - y_obs) ** 2).sum(-1), scale=0.1)
    res = fd.sample(energy, x, nfe=10)
    assert res.nfe == 10 and energy.nfe == 10 and energy.vjp == 10 and energy.model.gradient_calls == 10
    energy.reset_nfe()
    assert energy.nfe == 0 and energy.vjp == 0 and energy.model.gradient_calls == 0
    # Where the scale is 0 (outside its interval) an evaluation is a plain model call: no gradient.
    off = energy_guidance(field, lambda xh: ((xh @ H.T - y_obs) ** 2).sum(-1), scale=5.0, interval=(0.2, 0.3))
    torch.testing.assert_close(off.score(x, 0.9), field.score(x, 0.9))
    assert off.nfe == 1 and off.vjp == 0 and off.model.gradient_calls == 0
    # Nested guidance reports the backward passes of every level.
    both = classifier_guidance(energy, lambda xx, tt: -(xx**2).sum(-1), scale=0.5)
    both.score(x, t)
    assert both.nfe == 1 and both.vjp == 1


def _two_class_mixture(path):
    # Class 0 (weight 0.8): two blobs at x₁ = −2; class 1 (weight 0.2): two blobs at x₁ = +2.
    means = torch.tensor([[-2.0, 1.0], [-2.0, -1.0], [2.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    return GaussianMixture(means, scales=torch.full((4, 2), 0.5, dtype=torch.float64),
                           weights=[0.4, 0.4, 0.1, 0.1], path=path)


# Every solver but dpm-solver-v3 (which needs empirical model statistics of the guided field).
SOLVERS = [name for name in fd.solvers.available() if name != "dpm-solver-v3"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_classifier_guided_sampling_draws_the_class(solver):
    # Exact classifier p_t(y | x) at w = 1 on an exact unconditional field: the samples are draws of
    # p(x | y). Both classes, the minority one (prior 0.2) included, must be hit ≥ 95 % with 24 NFE
    # (measured: 100 % with every solver; unguided, w = 0: 13-36 % of the minority class).
    path, prediction = (VP(), "noise") if SOLVERS.index(solver) % 2 == 0 else (Linear(), "velocity")
    mixture = _two_class_mixture(path)
    model = GroupedClassModel(mixture, [[0, 1], [2, 3]], prediction)
    n = 200
    target = torch.cat([torch.ones(n // 2, dtype=torch.long), torch.zeros(n // 2, dtype=torch.long)])
    guided = classifier_guidance(fd.Field(mixture.model(prediction), path, prediction),
                                 lambda xx, tt: model.log_posterior(xx, tt, target), scale=1.0)
    g = torch.Generator().manual_seed(0)
    x0 = path.prior_sample((n, 2), generator=g, dtype=torch.float64)
    nfe = 200 if solver == "dopri5" else 24  # the adaptive solver's cap
    res = fd.sample(guided, x0, solver=solver, nfe=nfe, generator=g)
    assert res.nfe <= nfe and guided.nfe == res.nfe
    data_classes = torch.stack([sub.log_prob(res.x) for sub in model.classes], dim=-1) + model.log_priors
    correct = (data_classes.argmax(-1) == target).double()
    assert float(correct[: n // 2].mean()) >= 0.95, float(correct[: n // 2].mean())
    assert float(correct.mean()) >= 0.95, float(correct.mean())


def test_guidance_scale_and_function_errors():
    mixture, model, x, t, y = _grouped(VP(), "noise", n=4)
    field = fd.Field(mixture.model("noise"), VP(), "noise")
    good = lambda xx, tt: model.log_posterior(xx, tt, y)  # noqa: E731
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            classifier_guidance(field, good, scale=bad)
        with pytest.raises(ValueError, match="finite number >= 0"):
            energy_guidance(field, lambda xh: xh.sum(-1), scale=bad)
    for bad in ("2", True, None, [1.0]):
        with pytest.raises(TypeError, match="number >= 0 or a callable"):
            classifier_guidance(field, good, scale=bad)
    for bad in [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.1, float("nan"))]:
        with pytest.raises(ValueError, match="interval"):
            classifier_guidance(field, good, scale=1.0, interval=bad)
    with pytest.raises(TypeError, match="interval"):
        classifier_guidance(field, good, interval=0.5)
    with pytest.raises(ValueError, match="interval once"):
        classifier_guidance(field, good, GuidanceScale(1.0, (0.1, 0.2)), interval=(0.1, 0.2))
    with pytest.raises(TypeError, match="log_prob_fn must be a callable"):
        classifier_guidance(field, "not a function")
    with pytest.raises(TypeError, match="energy_fn must be a callable"):
        energy_guidance(field, 3.0)
    with pytest.raises(TypeError, match="flowdiff.Field"):
        classifier_guidance(mixture.model("noise"), good)
    # Schedules are checked at every call: negative, non-finite, wrongly shaped values.
    for schedule, message in [(lambda tt: -tt, "finite values >= 0"), (lambda tt: tt * float("nan"), "finite values >= 0"),
                              (lambda tt: torch.ones(3), r"shape \(4,\)"), (lambda tt: "big", "number or a tensor")]:
        with pytest.raises((ValueError, TypeError), match=message):
            classifier_guidance(field, good, scale=schedule).score(x, t)
    # log_prob_fn / energy_fn outputs: shape, finiteness, gradient.
    cases = [
        (lambda xx, tt: model.log_posterior(xx, tt, y)[:, None], r"one value per sample, shape \(4,\)"),
        (lambda xx, tt: model.log_posterior(xx, tt, y).sum(), r"shape \(4,\), got shape \(\)"),
        (lambda xx, tt: model.log_posterior(xx, tt, y) * float("nan"), "non-finite value"),
        (lambda xx, tt: model.log_posterior(xx, tt, y).detach(), "without gradient"),
        (lambda xx, tt: xx.sum(-1).detach().numpy(), "must return a tensor"),
        (lambda xx, tt: torch.sqrt(xx[:, 0] * 0.0), "gradient of log_prob_fn is not finite"),
    ]
    for fn, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            classifier_guidance(field, fn).score(x, t)
    with pytest.raises(ValueError, match=r"energy_fn must return one value per sample"):
        energy_guidance(field, lambda xh: xh).score(x, t)
    with pytest.raises(ValueError, match="energy_fn returned a non-finite"):
        energy_guidance(field, lambda xh: xh.sum(-1) / 0.0 * 0.0).score(x, t)
    # CFG keeps its messages.
    conditional = fd.Field(model, VP(), "noise")
    with pytest.raises(ValueError, match="finite number >= 0"):
        classifier_free_guidance(conditional, float("inf"))
    with pytest.raises(ValueError, match="finite values >= 0"):
        classifier_free_guidance(conditional, lambda tt: tt - 1).score(x, t, y=y)
