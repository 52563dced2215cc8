"""Randomized smoothing (Cohen et al., 2019), denoised smoothing and the smoothing baselines against closed forms."""

import math

import pytest
import torch
from scipy.stats import beta, norm

import flowdiff as fd
from flowdiff.certify import (
    DenoisedClassifier,
    certified_accuracy,
    certify,
    clopper_pearson_lower,
    predict,
    radius_cap,
    smoothing_time,
    train_gaussian_augmentation,
    train_rrcm,
)
from flowdiff.testing import Gaussian

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_problem(dim: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=generator, dtype=torch.float64)
    b = 0.3

    def classify(x):
        return (x @ w + b > 0).long()

    return w, b, classify


def test_linear_classifier_radius_is_the_distance_within_clopper_pearson_slack():
    # f(x) = [w.x + b > 0]: p_A = Phi(|w.x + b| / (sigma |w|)), so the certified radius tends to the distance
    # to the hyperplane; with n draws it falls short by about sigma * (z_{1-alpha} + sampling) * sd(p_A) / phi.
    w, b, classify = linear_problem()
    sigma, n, alpha = 1.0, 100_000, 0.001
    distance = 1.2816 * sigma  # p_A = 0.9, well below the radius cap
    direction = w / w.norm()
    base = -b * w / w.norm() ** 2  # on the hyperplane
    x = base + distance * direction
    p_a = norm.cdf(distance / sigma)
    result = certify(classify, x, sigma=sigma, n0=100, n=n, alpha=alpha, generator=torch.Generator().manual_seed(1))
    assert isinstance(result.prediction, int) and isinstance(result.radius, float)
    assert result.prediction == 1
    sd = math.sqrt(p_a * (1 - p_a) / n)
    lowest = sigma * norm.ppf(p_a - (norm.ppf(1 - alpha) + 4.5) * sd)
    assert lowest <= result.radius <= distance
    assert distance - result.radius < 0.04  # the slack is small at n = 1e5 (expected 3.09 sd / phi = 0.017)

    # A batch on both sides: every certified class is the true side and every radius is below the distance.
    points = torch.randn(40, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    prediction, radius = certify(classify, points, sigma=0.5, n0=50, n=4000, alpha=alpha,
                                 generator=torch.Generator().manual_seed(3))
    truth = classify(points)
    distances = (points @ w + b).abs() / w.norm()
    certified = prediction >= 0
    assert prediction.shape == (40,) and radius.dtype == torch.float64
    assert torch.equal(prediction[certified], truth[certified])
    assert bool((radius[certified] <= distances[certified]).all())
    assert bool((radius[~certified] == 0).all())
    assert int(certified.sum()) >= 30  # the far points are certified
    # Points farther than the radius cap certify at the cap.
    far = distances > radius_cap(0.5, 4000, alpha) + 0.5 * 3
    assert torch.allclose(radius[far], torch.full_like(radius[far], radius_cap(0.5, 4000, alpha)))


def test_clopper_pearson_against_beta_quantile_and_statsmodels():
    proportion_confint = pytest.importorskip("statsmodels.stats.proportion").proportion_confint

    alpha = 0.001
    for k, n in ((0, 100), (1, 100), (57, 100), (990, 1000), (1000, 1000), (99_000, 100_000)):
        lower = float(clopper_pearson_lower(k, n, alpha))
        expected = 0.0 if k == 0 else beta.ppf(alpha, k, n - k + 1)
        assert lower == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert lower == pytest.approx(proportion_confint(k, n, alpha=2 * alpha, method="beta")[0], rel=1e-9, abs=1e-12)
    assert float(clopper_pearson_lower(100, 100, alpha)) == pytest.approx(alpha ** (1 / 100), rel=1e-12)
    # The notes' radius caps at alpha = 0.001.
    for n, cap in ((100, 1.50), (1000, 2.46), (10_000, 3.20), (100_000, 3.81)):
        assert radius_cap(1.0, n, alpha) == pytest.approx(cap, abs=0.006)


def test_predict_abstains_on_the_boundary_and_answers_far_from_it():
    w, b, classify = linear_problem()
    on_plane = -b * w / w.norm() ** 2
    far = on_plane + 3.0 * w / w.norm()
    points = torch.stack([on_plane, far, on_plane - 3.0 * w / w.norm()])
    prediction = predict(classify, points, sigma=0.5, n=2000, alpha=0.001, generator=torch.Generator().manual_seed(0))
    assert prediction.tolist() == [-1, 1, 0]
    assert predict(classify, far, sigma=0.5, n=500, generator=torch.Generator().manual_seed(0)) == 1


def test_logits_indices_num_classes_and_data_shape():
    w, b, classify = linear_problem()

    def logits(x):
        score = x @ w + b
        return torch.stack([-score, score, torch.full_like(score, -1e9)], dim=1)

    x = 3.0 * w / w.norm()
    by_index = certify(classify, x, sigma=0.5, n0=20, n=400, generator=torch.Generator().manual_seed(0))
    by_logits = certify(logits, x, sigma=0.5, n0=20, n=400, num_classes=3, generator=torch.Generator().manual_seed(0))
    assert by_index == by_logits and by_index.prediction == 1
    # An image classifier: one (1, 2, 2) input told apart from a batch by data_shape.
    image = x[:4].reshape(1, 2, 2)
    flat = lambda batch: classify(torch.cat([batch.reshape(len(batch), -1), batch.new_zeros(len(batch), 1)], dim=1))  # noqa: E731
    single = certify(flat, image, sigma=0.5, n0=20, n=400, data_shape=(1, 2, 2), generator=torch.Generator().manual_seed(0))
    batch = certify(flat, image[None], sigma=0.5, n0=20, n=400, generator=torch.Generator().manual_seed(0))
    assert isinstance(single.prediction, int) and single.prediction == int(batch.prediction[0])
    assert single.radius == pytest.approx(float(batch.radius[0]))
    accuracy = certified_accuracy(torch.tensor([1, -1, 0]), torch.tensor([0.6, 0.0, 0.3]), torch.tensor([1, 1, 1]))
    assert accuracy.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0])


def test_bad_input_is_refused_with_the_value():
    w, b, classify = linear_problem()
    x = torch.randn(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma"):
        certify(classify, x, sigma=0.0, n0=10, n=100)
    with pytest.raises(ValueError, match="sigma"):
        certify(classify, x, sigma=-1.0, n0=10, n=100)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            certify(classify, x, sigma=0.5, n0=10, n=100, alpha=alpha)
    with pytest.raises(ValueError, match="n0"):
        certify(classify, x, sigma=0.5, n0=100, n=100)
    with pytest.raises(ValueError, match="num_classes=10"):
        certify(lambda z: torch.zeros(len(z), 3), x, sigma=0.5, n0=10, n=100, num_classes=10)
    with pytest.raises(ValueError, match="class index 7"):
        certify(lambda z: torch.full((len(z),), 7), x, sigma=0.5, n0=10, n=100, num_classes=3)
    with pytest.raises(ValueError, match="batch of"):
        certify(lambda z: torch.zeros(3, dtype=torch.long), x, sigma=0.5, n0=10, n=100)
    with pytest.raises(ValueError, match="non-finite"):
        certify(classify, torch.full((5,), math.nan, dtype=torch.float64), sigma=0.5, n0=10, n=100)
    with pytest.raises(ValueError, match="non-finite logits"):
        certify(lambda z: torch.full((len(z), 2), math.nan), x, sigma=0.5, n0=10, n=100)
    with pytest.raises(TypeError, match="classifier"):
        certify("not callable", x, sigma=0.5, n0=10, n=100)


@pytest.mark.parametrize("path", [fd.paths.Linear(), fd.paths.VP()], ids=["linear", "vp"])
def test_one_shot_denoiser_is_the_gaussian_posterior_mean_in_input_units(path):
    # Data x = 2u - 1 ~ N(0, s^2 I). Smoothing noise sigma on u is 2 sigma on x; at t* the exact denoiser
    # returns E[x | x + 2 sigma eps] = s^2 / (s^2 + 4 sigma^2) (x + 2 sigma eps); back in u: (that + 1) / 2.
    s, sigma = 0.6, 0.3
    oracle = Gaussian(torch.zeros(3), s ** 2 * torch.eye(3), path=path)
    field = fd.Field(oracle.model("noise"), path, "noise")
    classify = lambda u: (u.sum(dim=1) > 1.5).long()  # noqa: E731
    dds = DenoisedClassifier(field, classify, sigma, data_scale=2.0, data_shift=-1.0)
    assert float(path.sigma(dds.t_star) / path.alpha(dds.t_star)) == pytest.approx(2 * sigma, rel=1e-6)
    assert dds.t_star == pytest.approx(smoothing_time(path, sigma, 2.0))
    noisy_u = torch.rand(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (s ** 2 / (s ** 2 + 4 * sigma ** 2) * (2 * noisy_u - 1) + 1) / 2
    torch.testing.assert_close(dds.denoise(noisy_u), expected, rtol=1e-6, atol=1e-8)
    assert torch.equal(dds(noisy_u), classify(expected))
    # A few DDIM steps towards a (nearly) point-mass distribution still land on its mean.
    point = Gaussian(torch.full((3,), 0.2), 1e-6 * torch.eye(3), path=path)
    steps = DenoisedClassifier(fd.Field(point.model("data"), path, "data"), classify, sigma, data_scale=2.0,
                               data_shift=-1.0, steps=3)
    torch.testing.assert_close(steps.denoise(noisy_u), torch.full_like(noisy_u, 0.6), atol=1e-4, rtol=0)


def test_denoiser_adds_missing_noise_below_the_paths_smallest_and_drops_the_label_mixture():
    path = fd.paths.Linear(t_max=0.9)  # sigma/alpha >= 1/9 on the safe interval
    oracle = Gaussian(torch.zeros(2), torch.eye(2), path=path)
    calls = []

    class Mixture(torch.nn.Module):  # what pipeline.load_field builds for a class-conditional network
        unlabeled_default = "mixture"

        def __init__(self):
            super().__init__()
            self.model = Null()

        def forward(self, x, t, y=None):
            raise AssertionError("a denoiser must not draw random class labels")

    class Null(torch.nn.Module):
        def forward(self, x, t, y=None):
            calls.append(y)
            return oracle.model("data")(x, t)

    dds = DenoisedClassifier(fd.Field(Mixture(), path, "data"), lambda u: u.argmax(dim=1), 0.05)
    assert dds.t_star == pytest.approx(0.9)
    assert dds.extra_noise == pytest.approx(math.sqrt((1 / 9) ** 2 - 0.05 ** 2))
    out = dds(torch.zeros(4, 2, dtype=torch.float64))
    assert out.shape == (4,) and calls == [None]
    with pytest.raises(ValueError, match="noisier"):
        DenoisedClassifier(fd.Field(Mixture(), fd.paths.Linear(t_min=0.5), "data"), lambda u: u, 2.0)


def test_gaussian_augmentation_and_rrcm_learn_a_separable_problem():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (256,), generator=generator)
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.0]])
    images = means[labels] + 0.3 * torch.randn(256, 2, generator=generator)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
    net = train_gaussian_augmentation(net, images, labels, 0.5, epochs=5, batch_size=32, seed=0)
    with torch.no_grad():
        assert (net(images).argmax(1) == labels).double().mean() > 0.95
    encoder = train_rrcm(images, labels, 0.5, pretrain_epochs=2, finetune_epochs=6, batch_size=64, levels=6, width=16)
    classify = encoder.classifier(0.5)
    assert (classify(images).argmax(1) == labels).double().mean() > 0.95
    prediction, radius = certify(classify, images[:8], sigma=0.5, n0=20, n=200, generator=torch.Generator().manual_seed(1))
    assert bool(((prediction == labels[:8]) | (prediction == -1)).all())
    with pytest.raises(ValueError, match="labels"):
        train_rrcm(images, labels[:10], 0.5)


def test_certify_command_writes_the_table_and_the_curve(tmp_path):
    import json

    from typer.testing import CliRunner

    from flowdiff.cli import app
    from test_quant import tiny_checkpoint

    run = tiny_checkpoint(tmp_path / "run")
    torch.manual_seed(0)
    classifier = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))
    classifier.save(str(tmp_path / "classifier.pt"))
    invoke = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    res = invoke("certify", "-c", run, "--classifier", tmp_path / "classifier.pt", "--sigma", 0.25, "--n", 40, "--n0", 5,
                 "--count", 3, "-o", tmp_path / "out", "--threads", 1)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "certify.json").read_text())
    assert len(result["radius"]) == 3 and result["units"] == "unit" and set(result["certified_accuracy"]) == {
        "0.0", "0.25", "0.5", "0.75", "1.0"}
    assert result["t_star"] == pytest.approx(1 / 1.5)  # sigma/alpha = 2 * 0.25 on the linear path: t = 1/(1 + 0.5)
    assert (tmp_path / "out" / "certify.png").read_bytes()[:4] == b"\x89PNG"
    for args, word in ((("--n0", 40), "--n0"), (("--sigma", 0), "--sigma"), (("--alpha", 1), "--alpha"),
                       (("--units", "pixels"), "--units"), (("--classifier", tmp_path / "none.pt"), "TorchScript")):
        res = invoke("certify", "-c", run, "--n", 40, "--n0", 5, *args, "-o", tmp_path / "bad")
        assert res.exit_code == 2 and word in res.output, res.output
