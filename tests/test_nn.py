"""Denoiser networks: shapes, parameter counts, gradients, conditioning, EDMPrecond, compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ambient_fast.core.precond import EDMPrecond, edm_precond_coefficients
from ambient_fast.nn import (
    NETWORK_PRESETS,
    MLPDenoiser,
    UNet,
    UNetConfig,
    build_network,
    count_parameters,
)


def _randomize(net: nn.Module, std: float = 0.2) -> nn.Module:
    """Replace the near-identity init (branch outputs at 1e-5 scale) by O(1) random weights,
    so that every path visibly contributes to the output."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, std)
    return net


def _tiny_unet(**overrides) -> UNet:
    return UNet.from_preset("unet-tiny", **overrides)


# ---------------------------------------------------------------------------------------
# Shapes.


@pytest.mark.parametrize("channels,height,width", [(1, 1, 1), (1, 7, 7), (3, 5, 9), (2, 8, 8), (3, 16, 13)])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"conditioning": "scale_shift", "embedding": "fourier"},
        {"channel_mult": (1, 2, 2), "attention_levels": (0, 2), "num_heads": 2},
    ],
)
def test_unet_shapes(channels, height, width, variant):
    net = _randomize(_tiny_unet(channels=channels, **variant)).eval()
    x = torch.randn(3, channels, height, width)
    out = net(x, torch.randn(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(64,), (1, 8, 8), (3, 7, 5), (37,), (2, 3, 4, 5)])
def test_mlp_any_trailing_shape(shape):
    numel = int(torch.tensor(shape).prod())
    net = _randomize(MLPDenoiser.from_preset("mlp-small", data_dim=numel)).eval()
    x = torch.randn(4, *shape)
    out = net(x, torch.randn(4))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="x must be"):
        _tiny_unet()(torch.randn(2, 3, 8, 8), torch.randn(2))
    with pytest.raises(ValueError, match="unconditional"):
        _tiny_unet()(torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_labels must be"):
        _tiny_unet(num_classes=3)(torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="class_labels must be"):
        _tiny_unet(num_classes=3)(torch.randn(2, 1, 8, 8), torch.randn(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="elements per sample"):
        MLPDenoiser(data_dim=64)(torch.randn(2, 65), torch.randn(2))
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(model_channels=6, channel_mult=(1,), attention_levels=(0,), num_heads=4)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(KeyError, match="unknown network"):
        build_network("resnet")
    with pytest.raises(TypeError):
        build_network("unet-tiny", no_such_field=1)


# ---------------------------------------------------------------------------------------
# Parameter counts.


@pytest.mark.parametrize(
    "name,expected",
    [
        ("unet-tiny", 11_673),
        ("unet-digits", 549_145),
        ("mlp-small", 169_984),
        ("mlp-base", 425_664),
    ],
)
def test_preset_parameter_counts(name, expected):
    assert count_parameters(build_network(name)) == expected


def test_cifar10_preset_parameter_count():
    """EDM DDPM++ CIFAR-10: ANCHORS section 4 cites ~56M from memory. The exact count of
    EDM's SongUNet with these arguments (no augmentation labels) is 55,732,739; ours is
    the same, and each class adds one 128-wide embedding row."""
    net = UNet.cifar10()
    assert net.config == UNetConfig()
    assert count_parameters(net) == 55_732_739
    assert abs(count_parameters(net) - 56e6) / 56e6 < 0.01
    assert count_parameters(UNet.cifar10(num_classes=10)) == 55_732_739 + 10 * 128
    # JSON round trips turn tuples into lists; the config normalises them back.
    assert UNetConfig(channel_mult=[2, 2, 2], attention_levels=[1]) == UNetConfig()
    assert set(NETWORK_PRESETS) == {"unet-tiny", "unet-digits", "unet-cifar10", "mlp-small", "mlp-base"}


# ---------------------------------------------------------------------------------------
# Gradients, determinism, batch independence.


@pytest.mark.parametrize("name", ["unet-tiny", "mlp-small"])
def test_gradients_reach_every_parameter(name):
    net = _randomize(build_network(name, num_classes=5))
    x = torch.randn(4, 1, 8, 8)
    loss = net(x, torch.randn(4), torch.tensor([0, 1, 2, 4])).square().mean()
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_default_init_gradients_flow():
    """With the near-identity init the output layer gets O(1) gradients and the rest small
    but nonzero ones (training moves every parameter from the first step)."""
    net = _tiny_unet()
    net(torch.randn(4, 1, 8, 8), torch.randn(4)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("name", ["unet-tiny", "mlp-small"])
def test_determinism(name):
    torch.manual_seed(123)
    a = build_network(name, dropout=0.2)
    torch.manual_seed(123)
    b = build_network(name, dropout=0.2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    _randomize(a)
    b.load_state_dict(a.state_dict())
    x, noise = torch.randn(5, 1, 8, 8), torch.randn(5)
    a.eval()
    b.eval()
    assert torch.equal(a(x, noise), a(x, noise))
    assert torch.equal(a(x, noise), b(x, noise))
    # Training mode: dropout masks follow the global seed.
    a.train()
    torch.manual_seed(7)
    first = a(x, noise)
    torch.manual_seed(7)
    assert torch.equal(first, a(x, noise))
    assert not torch.equal(first, a(x, noise))


@pytest.mark.parametrize("name", ["unet-tiny", "mlp-small"])
def test_samples_are_independent_of_the_batch(name):
    net = _randomize(build_network(name)).eval()
    x, noise = torch.randn(6, 1, 8, 8), torch.randn(6)
    full = net(x, noise)
    torch.testing.assert_close(full[2:3], net(x[2:3], noise[2:3]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Class conditioning.


@pytest.mark.parametrize("name", ["unet-tiny", "mlp-small"])
def test_class_conditioning(name):
    net = _randomize(build_network(name, num_classes=4)).eval()
    x, noise = torch.randn(4, 1, 8, 8), torch.randn(4)
    labels = torch.tensor([0, 1, 2, 3])
    out_int = net(x, noise, labels)
    out_onehot = net(x, noise, nn.functional.one_hot(labels, 4).float())
    torch.testing.assert_close(out_int, out_onehot)
    out_other = net(x, noise, (labels + 1) % 4)
    per_sample_change = (out_int - out_other).abs().amax(dim=tuple(range(1, x.dim())))
    assert (per_sample_change > 1e-5).all()  # float32 round-off here is ~1e-8
    out_none = net(x, noise, None)
    torch.testing.assert_close(out_none, net(x, noise, torch.zeros(4, 4)))
    assert not torch.allclose(out_none, out_int)


def test_label_dropout_replaces_labels_by_the_null_token():
    net = _randomize(_tiny_unet(num_classes=3, label_dropout=0.5))
    x, noise = torch.randn(64, 1, 4, 4), torch.randn(64)
    labels = torch.full((64,), 2)
    net.eval()
    uncond, cond = net(x, noise), net(x, noise, labels)
    net.train()  # no dropout layers in this preset: only the label dropout is random
    out = net(x, noise, labels)
    dropped = torch.isclose(out, uncond, rtol=1e-5, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, cond, rtol=1e-5, atol=1e-6).flatten(1).all(1)
    assert torch.all(dropped ^ kept)
    assert 16 < int(dropped.sum()) < 48


# ---------------------------------------------------------------------------------------
# Integration with the EDM preconditioner and torch.compile.


@pytest.mark.parametrize("name", ["unet-tiny", "mlp-small"])
def test_under_edm_precond(name):
    net = build_network(name, num_classes=3)
    denoiser = EDMPrecond(net)
    x = torch.randn(5, 1, 8, 8)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0])
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = denoiser(x, sigma, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # At init F is ~0, so D(x, sigma) ~ c_skip x.
    c_skip = edm_precond_coefficients(sigma)[0].view(-1, 1, 1, 1)
    torch.testing.assert_close(out, c_skip * x, rtol=0, atol=1e-3)
    _randomize(net)
    denoiser(x.double(), sigma.double(), labels).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    net = _randomize(_tiny_unet(num_classes=3)).eval()
    compiled = torch.compile(net, fullgraph=True)
    x, noise, labels = torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, noise, labels), net(x, noise, labels), rtol=1e-4, atol=1e-5)
