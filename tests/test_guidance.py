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
