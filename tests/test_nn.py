"""Tests of flowdiff.nn: shapes, zero start, gradient flow, time broadcasting, conditioning, errors."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.nn import (
    MLP,
    LabelEmbedding,
    TimeEmbedding,
    UNet,
    available_networks,
    build_network,
    drop_labels,
    sinusoidal_features,
)

SMALL_UNET = dict(channels=(8, 16), groups=4, num_heads=2)


def randomise(network: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Replace the zero initialisation by random weights so that outputs depend on every input."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(std * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return network


def small_networks(num_classes: int | None = None) -> list[tuple[torch.nn.Module, tuple[int, ...]]]:
    return [
        (MLP(3, hidden=32, depth=2, num_classes=num_classes), (3,)),
        (UNet(1, num_classes=num_classes, **SMALL_UNET), (1, 8, 8)),
    ]


# --- time embedding -----------------------------------------------------------------------------


def test_sinusoidal_features_lie_on_unit_circles() -> None:
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    features = sinusoidal_features(t, 16)
    assert features.shape == (7, 16)
    # Each frequency contributes (cos, sin), a point on the unit circle.
    radii = features[:, :8] ** 2 + features[:, 8:] ** 2
    torch.testing.assert_close(radii, torch.ones_like(radii))
    # At t = 0 every phase is 0: cos = 1, sin = 0.
    torch.testing.assert_close(features[0], torch.cat([torch.ones(8), torch.zeros(8)]).double())
    # The first frequency is 1 with scale 1000: cos(1000 t).
    torch.testing.assert_close(features[:, 0], torch.cos(1000 * t))


def test_time_embedding_separates_nearby_times() -> None:
    embedding = TimeEmbedding(32)
    t = torch.tensor([0.5, 0.501])
    out = embedding(t)
    assert out.shape == (2, 32)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="even"):
        sinusoidal_features(t, 7)


# --- shapes, zero start, float64 ------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [None, 4])
def test_output_shape_and_zero_at_init(num_classes: int | None) -> None:
    for network, shape in small_networks(num_classes):
        x = torch.randn(5, *shape)
        out = network(x, torch.rand(5))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(out, torch.zeros_like(out)), "a fresh network must output exactly 0"


def test_unet_32x32_three_levels_and_attention_options() -> None:
    x = torch.randn(2, 3, 32, 32)
    network = randomise(UNet(3, channels=(8, 16, 16), groups=4, num_heads=2))
    out = network(x, torch.rand(2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    x = torch.randn(2, 3, 16, 8)  # non-square works too
    for attention in [(False, False, False), True, (True, False, True)]:
        network = randomise(UNet(3, channels=(8, 16, 16), attention=attention, groups=4, num_heads=2))
        out = network(x, torch.rand(2))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_float64_matches_float32() -> None:
    for network, shape in small_networks(num_classes=3):
        randomise(network)
        x = torch.randn(4, *shape, dtype=torch.float64)
        t = torch.rand(4, dtype=torch.float64)
        y = torch.tensor([0, 1, 2, 3])
        out64 = network.double()(x, t, y)
        assert out64.dtype == torch.float64
        out32 = network.float()(x.float(), t.float(), y)
        torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


def test_no_mixing_across_the_batch() -> None:
    """Row i of the output depends only on (x_i, t_i, y_i): GroupNorm/LayerNorm are per sample."""
    for network, shape in small_networks(num_classes=3):
        randomise(network).eval()
        x, t, y = torch.randn(6, *shape), torch.rand(6), torch.tensor([0, 1, 2, 3, 0, 1])
        full = network(x, t, y)
        single = network(x[2:3], t[2:3], y[2:3])
        torch.testing.assert_close(full[2:3], single, rtol=1e-5, atol=1e-5)


# --- time broadcasting ------------------------------------------------------------------------------


def test_scalar_time_is_broadcast() -> None:
    for network, shape in small_networks():
        randomise(network)
        x = torch.randn(4, *shape)
        expected = network(x, torch.full((4,), 0.3))
        for t in (0.3, torch.tensor(0.3), torch.tensor([0.3])):
            torch.testing.assert_close(network(x, t), expected)
        # and time matters: a different t gives a different output
        assert not torch.allclose(network(x, torch.full((4,), 0.7)), expected)
        with pytest.raises(ValueError, match=r"shape \(4,\)"):
            network(x, torch.rand(5))


# --- gradients and learning --------------------------------------------------------------------------


def test_gradients_reach_every_parameter_within_three_steps() -> None:
    """Zero-initialised output layers block gradients only until they have been updated once or twice."""
    for network, shape in small_networks(num_classes=3):
        optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
        x, t, y = torch.randn(8, *shape), torch.rand(8), torch.randint(0, 4, (8,))
        target = torch.randn(8, *shape)
        for _ in range(3):
            optimizer.zero_grad()
            loss = (network(x, t, y) - target).pow(2).mean()
            loss.backward()
            optimizer.step()
        dead = [name for name, p in network.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
        assert dead == [], f"parameters without gradient after 3 steps: {dead}"


def test_mlp_fits_a_time_and_class_dependent_target() -> None:
    """150 Adam steps on f(x, t, y) = sin(2πt)·x + y must cut the error far below its start."""
    torch.manual_seed(0)
    network = MLP(2, hidden=64, depth=2, num_classes=3)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    x, t, y = torch.randn(256, 2), torch.rand(256), torch.randint(0, 3, (256,))
    target = torch.sin(2 * math.pi * t)[:, None] * x + y[:, None].float()
    initial = (target**2).mean().item()  # the loss of the zero network
    for _ in range(150):
        optimizer.zero_grad()
        loss = (network(x, t, y) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * initial
    # the label now changes the output, and the null label differs from the real ones
    out = [network(x[:4], t[:4], torch.full((4,), k)) for k in range(3)]
    assert (out[1] - out[0]).abs().mean() > 0.5 and (out[2] - out[1]).abs().mean() > 0.5


# --- class conditioning -----------------------------------------------------------------------------


def test_none_label_is_the_null_label() -> None:
    for network, shape in small_networks(num_classes=5):
        randomise(network)
        x, t = torch.randn(3, *shape), torch.rand(3)
        torch.testing.assert_close(network(x, t), network(x, t, torch.full((3,), 5)))
        assert not torch.allclose(network(x, t), network(x, t, torch.zeros(3, dtype=torch.long)))


def test_label_embedding_null_row() -> None:
    embedding = LabelEmbedding(3, 4)
    assert embedding.null_label == 3 and embedding.embedding.num_embeddings == 4


def test_drop_labels_probability_and_values() -> None:
    y = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert torch.equal(drop_labels(y, 1.0, 10), torch.full_like(y, 10))
    dropped = drop_labels(y, 0.3, 10, torch.Generator().manual_seed(1))
    changed = dropped != y
    # dropped labels are exactly the null label, kept ones are unchanged
    assert torch.equal(dropped[changed], torch.full_like(dropped[changed], 10))
    # Binomial(20000, 0.3): standard deviation sqrt(n p (1-p)) ≈ 64.8; allow 5 of them.
    assert abs(int(changed.sum()) - 6000) < 5 * math.sqrt(20_000 * 0.3 * 0.7)
    # reproducible with the same generator
    assert torch.equal(dropped, drop_labels(y, 0.3, 10, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="p must lie"):
        drop_labels(y, 1.5, 10)
    with pytest.raises(ValueError, match="label 9 out of range"):
        drop_labels(y, 0.1, 8)


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_named_errors() -> None:
    mlp = MLP(3, hidden=16, depth=1, num_classes=4)
    x, t = torch.randn(2, 3), torch.rand(2)
    with pytest.raises(ValueError, match=r"\(B, 3\).*\(2, 4\)"):
        mlp(torch.randn(2, 4), t)
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        mlp(torch.randn(3), t)
    with pytest.raises(ValueError, match="label 5 out of range"):
        mlp(x, t, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="label -1 out of range"):
        mlp(x, t, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer"):
        mlp(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        mlp(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="float64.*float32"):
        mlp(x.double(), t)
    with pytest.raises(ValueError, match="unconditional"):
        MLP(3, hidden=16, depth=1)(x, t, torch.tensor([0, 1]))

    unet = UNet(1, **SMALL_UNET)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(2, 3, 8, 8\)"):
        unet(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match="divisible by 2.*H=7"):
        unet(torch.randn(2, 1, 7, 8), t)
    with pytest.raises(ValueError, match="groups=3"):
        UNet(1, channels=(8, 16), groups=3)
    with pytest.raises(ValueError, match="one entry per level"):
        UNet(1, channels=(8, 16), groups=4, attention=(True,))
    with pytest.raises(ValueError, match="num_heads=3"):
        UNet(1, channels=(8, 16), groups=4, num_heads=3)
    with pytest.raises(ValueError, match="num_classes"):
        MLP(3, num_classes=0)


# --- factory -----------------------------------------------------------------------------------------


def test_build_network_by_name() -> None:
    assert set(available_networks()) >= {"mlp", "unet"}
    mlp = build_network("mlp", (2,), hidden=16, depth=1)
    assert isinstance(mlp, MLP) and mlp(torch.randn(3, 2), torch.rand(3)).shape == (3, 2)
    # An MLP on images flattens and reshapes.
    flat = build_network("MLP", (1, 4, 4), hidden=16, depth=1)
    assert flat(torch.randn(3, 1, 4, 4), torch.rand(3)).shape == (3, 1, 4, 4)
    unet = build_network("unet", (1, 8, 8), num_classes=10, **SMALL_UNET)
    assert isinstance(unet, UNet) and unet.num_classes == 10 and unet.in_channels == 1
    with pytest.raises(ValueError, match=r"unknown network 'transformer'.*'mlp'.*'unet'"):
        build_network("transformer", (2,))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_network("unet", (2,))
    with pytest.raises(ValueError, match="divisible by 4"):
        build_network("unet", (1, 6, 6), channels=(8, 16, 16), groups=4, num_heads=2)


# --- EDM preconditioning (flowdiff.nn.precond) ----------------------------------------------------

from flowdiff.nn import Preconditioned  # noqa: E402
from flowdiff.paths import EDM, VP, Cosine, Linear  # noqa: E402
from flowdiff.testing import Gaussian, random_mixture  # noqa: E402

PRECOND_PATHS = [VP(), Linear(), EDM(), Cosine()]
PREDICTION_TYPES = ["data", "noise", "velocity", "v", "score"]


def _edm_coefficients(path, t: torch.Tensor, sigma_data: float):
    """Karras et al. 2022, Table 1, in σ-space: σ̃ = σ/α, c_skip, c_out, c_in (float64)."""
    alpha, sigma = path.alpha(t), path.sigma(t)
    s = sigma / alpha
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
    c_in = 1 / torch.sqrt(s**2 + sigma_data**2)
    return alpha, s, c_skip, c_out, c_in


class _ExactInner(torch.nn.Module):
    """The inner network F that makes D(x̃, σ̃) = c_skip x̃ + c_out F the exact denoiser of an oracle."""

    def __init__(self, oracle, path, sigma_data: float):
        super().__init__()
        self.oracle, self.path, self.sigma_data = oracle, path, sigma_data

    def forward(self, scaled: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, s, c_skip, c_out, c_in = (c[:, None] for c in _edm_coefficients(self.path, t, self.sigma_data))
        x_tilde = scaled / c_in          # the network sees c_in · x̃
        x = x_tilde * alpha              # x̃ = x / α
        exact = self.oracle.denoise(x, t)
        return (exact - c_skip * x_tilde) / c_out


@pytest.mark.parametrize("path", PRECOND_PATHS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_preconditioned_reproduces_exact_mixture_fields(path, prediction):
    # With the exact F of Karras et al.'s σ-space formulas inside, the wrapper's path-space
    # algebra must give the mixture's exact field in every prediction type.
    oracle = random_mixture(dim=3, num_components=3, seed=1, path=path)
    sigma_data = 0.7
    model = Preconditioned(_ExactInner(oracle, path, sigma_data), path, prediction, sigma_data=sigma_data)
    generator = torch.Generator().manual_seed(0)
    t = torch.empty(64, dtype=torch.float64).uniform_(0.15, 0.85, generator=generator)
    x1 = oracle.sample(64, generator=generator)
    x, _ = path.sample(x1, t, generator=generator)
    torch.testing.assert_close(model(x, t), oracle.predict(x, t, prediction), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("path", PRECOND_PATHS, ids=lambda p: type(p).__name__)
def test_preconditioned_zero_network_is_the_exact_gaussian_denoiser(path):
    # c_skip x̃ is E[x₁ | x] for x₁ ~ N(0, σ_d² I): a fresh (zero-output) network starts exact there.
    sigma_data = 0.5
    oracle = Gaussian(torch.zeros(4), sigma_data**2 * torch.eye(4), path=path)
    inner = MLP(4, hidden=16, depth=1).double()
    model = Preconditioned(inner, path, "noise", sigma_data=sigma_data)
    t = torch.linspace(path.t_min, path.t_max, 9, dtype=torch.float64)
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x, t), oracle.noise(x, t), rtol=1e-9, atol=1e-9)


def test_preconditioned_edm_weighting_is_unit_weight_on_the_inner_network():
    # EDM's loss λ(σ)‖D − x₁‖² with λ = 1/c_out² is the plain MSE of F against (x₁ − c_skip x̃)/c_out.
    from flowdiff.losses import GaussianPathLoss

    path, sigma_data = Linear(), 0.6
    inner = randomise(MLP(5, hidden=16, depth=1)).double()
    model = Preconditioned(inner, path, "data", sigma_data=sigma_data)
    generator = torch.Generator().manual_seed(3)
    x1 = torch.randn(32, 5, dtype=torch.float64, generator=generator)
    noise = torch.randn(32, 5, dtype=torch.float64, generator=generator)
    t = torch.empty(32, dtype=torch.float64).uniform_(0.05, 0.95, generator=generator)
    loss = GaussianPathLoss(path, "data", weighting="edm", sigma_data=sigma_data)
    got = loss(model, x1, x0=noise, t=t).per_sample
    alpha, s, c_skip, c_out, c_in = (c[:, None] for c in _edm_coefficients(path, t, sigma_data))
    x = alpha * x1 + path.sigma(t)[:, None] * noise
    x_tilde = x / alpha
    target = (x1 - c_skip * x_tilde) / c_out
    expected = ((inner(c_in * x_tilde, t) - target) ** 2).mean(dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_preconditioned_passes_labels_and_validates():
    inner = MLP(3, hidden=8, depth=1, num_classes=4)
    model = Preconditioned(inner, Linear(), "velocity")
    assert model.num_classes == 4
    out = model(torch.randn(5, 3), torch.rand(5), y=torch.tensor([0, 1, 2, 3, 4]))
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="prediction"):
        Preconditioned(inner, Linear(), "epsilon")
    with pytest.raises(ValueError, match="sigma_data"):
        Preconditioned(inner, Linear(), "data", sigma_data=-1.0)
    with pytest.raises(TypeError, match="path"):
        Preconditioned(inner, "linear", "data")
