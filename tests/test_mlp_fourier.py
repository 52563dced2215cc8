"""Random Fourier features of the MLP's input (Tancik et al., 2020): exact features, rebuild from
the configuration alone, old checkpoints unchanged, input checks, and that they do learn a sharp
edge faster than the plain input."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.nn import MLP, build_network


def test_default_is_the_plain_network():
    """Off by default: same parameters and state-dict keys as before the option existed."""
    net = MLP(2, hidden=16, depth=2)
    assert net.input_layer.in_features == 2
    assert net.fourier_frequencies.shape == (0, 2)
    assert not any("fourier" in key for key in net.state_dict())
    x = torch.randn(5, 2)
    assert torch.equal(net._input_features(x), x)


def test_features_match_the_formula():
    """gamma(x) = [x, cos(2 pi B x), sin(2 pi B x)] with B = s * N(0, 1) from the seed's own generator."""
    m, scale, seed = 7, 2.5, 3
    net = MLP(3, hidden=8, depth=1, fourier_features=m, fourier_scale=scale, fourier_seed=seed).double()
    # Drawn in float64, stored in the default dtype (float32), then moved with the network.
    expected_b = (torch.randn(m, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).float().double()
    torch.testing.assert_close(net.fourier_frequencies, expected_b, rtol=0, atol=0)
    x = torch.randn(4, 3, dtype=torch.float64)
    phases = 2 * math.pi * torch.einsum("bd,md->bm", x, expected_b)
    torch.testing.assert_close(net._input_features(x), torch.cat([x, phases.cos(), phases.sin()], 1), rtol=1e-12, atol=1e-12)
    assert net.input_layer.in_features == 3 + 2 * m


def test_frequency_scale_is_the_standard_deviation():
    net = MLP(2, hidden=4, depth=0, fourier_features=4000, fourier_scale=0.7)
    std = float(net.fourier_frequencies.double().std())
    assert abs(std - 0.7) < 0.7 * 4 / math.sqrt(2 * 8000)  # 4 standard errors of a sample std


def test_frequencies_do_not_depend_on_the_global_generator():
    """B comes from its own generator: the configuration alone fixes it, whatever torch's global seed."""
    torch.manual_seed(123)
    a = MLP(2, hidden=4, depth=0, fourier_features=5).fourier_frequencies
    torch.manual_seed(456)
    b = MLP(2, hidden=4, depth=0, fourier_features=5).fourier_frequencies
    assert torch.equal(a, b)
    state = torch.random.get_rng_state()
    MLP(2, hidden=4, depth=0, fourier_features=5, fourier_seed=9)
    torch.manual_seed(0)  # the parameters draw from the global generator; the frequencies must not
    torch.random.set_rng_state(state)
    first = MLP(2, hidden=4, depth=0, fourier_features=5).input_layer.weight
    torch.random.set_rng_state(state)
    second = MLP(2, hidden=4, depth=0, fourier_features=5, fourier_seed=7).input_layer.weight
    assert torch.equal(first, second)


def test_configuration_rebuilds_the_network():
    """The frequencies are not in the state dict; the same configuration rebuilds them exactly."""
    kwargs = dict(hidden=16, depth=2, fourier_features=8, fourier_scale=1.5, fourier_seed=2)
    net = build_network("mlp", (2,), **kwargs)
    for p in net.parameters():  # move away from the zero-output initialisation
        p.data.add_(0.1 * torch.randn_like(p))
    state = net.state_dict()
    assert not any("fourier" in key for key in state)
    rebuilt = build_network("mlp", (2,), **kwargs)
    rebuilt.load_state_dict(state, strict=True)
    x, t = torch.randn(6, 2), torch.rand(6)
    torch.testing.assert_close(rebuilt(x, t), net(x, t), rtol=0, atol=0)
    other_seed = build_network("mlp", (2,), **{**kwargs, "fourier_seed": 3})
    other_seed.load_state_dict(state, strict=True)
    assert not torch.allclose(other_seed(x, t), net(x, t))


def test_train_run_and_load_field_round_trip(tmp_path):
    """A checkpoint trained with Fourier features loads through load_field with the same outputs."""
    from flowdiff.pipeline import load_field, train_run

    kwargs = {"hidden": 16, "depth": 1, "fourier_features": 4, "fourier_scale": 1.0}
    train_run(data="checkerboard", network="mlp", steps=3, batch_size=32, output_dir=tmp_path, progress=False,
              checkpoint_every=3, network_kwargs=kwargs, threads=1)
    field, cfg = load_field(tmp_path)
    assert cfg["model"]["kwargs"]["fourier_features"] == 4
    model = field.model
    assert model.fourier_features == 4 and model.input_layer.in_features == 2 + 8
    expected = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    torch.testing.assert_close(model.fourier_frequencies, expected)


def test_dtype_and_zero_output_at_init():
    net = MLP(2, hidden=8, depth=1, fourier_features=3).double()
    assert net.fourier_frequencies.dtype == torch.float64
    x = torch.randn(5, 2, dtype=torch.float64)
    out = net(x, torch.rand(5, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_bad_feature_count(bad):
    with pytest.raises(ValueError, match="fourier_features"):
        MLP(2, fourier_features=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_scale(bad):
    with pytest.raises(ValueError, match="fourier_scale"):
        MLP(2, fourier_features=4, fourier_scale=bad)


def test_bad_seed():
    with pytest.raises(ValueError, match="fourier_seed"):
        MLP(2, fourier_features=4, fourier_seed=-2)


def _fit_checkerboard_indicator(fourier_features: int) -> float:
    """Mean squared error of a regression of the 4x4 checkerboard's colour after a fixed budget."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2048, 2, generator=g) * 4 - 2
    target = (torch.floor(x).sum(1, keepdim=True) % 2) * 2 - 1  # +-1, discontinuous at the cell edges
    torch.manual_seed(0)
    net = MLP(2, hidden=64, depth=2, fourier_features=fourier_features, fourier_scale=0.5)
    net.output_layer = torch.nn.Linear(64, 1)  # regress one value
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    t = torch.zeros(len(x))
    for _ in range(300):
        optimizer.zero_grad()
        loss = ((net.output_layer(torch.nn.functional.silu(net.output_norm(_trunk(net, x, t)))) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _trunk(net: MLP, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    h = net.input_layer(net._input_features(x))
    embedding = net.time_embedding(t)
    for block in net.blocks:
        h = block(h, embedding)
    return h


def test_fourier_features_learn_sharp_edges_faster():
    """The spectral bias Tancik et al. remove: at equal steps the plain input blurs the checkerboard's edges."""
    plain, fourier = _fit_checkerboard_indicator(0), _fit_checkerboard_indicator(16)
    assert fourier < 0.5 * plain, (plain, fourier)
