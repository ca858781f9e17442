"""Tests for the DDPM/ADM UNet (Ho et al. 2020, App. B; Nichol & Dhariwal 2021)."""

from __future__ import annotations

import pytest
import torch

from diffusion_pl.nets import UNet
from diffusion_pl.nets.unet import SinusoidalEmbedding, group_norm

TINY = dict(
    image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(4,), num_heads=2, dropout=0.0,
)


def tiny(**overrides: object) -> UNet:
    """A small UNet that runs in milliseconds on CPU."""
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides})


def randomize_(net: UNet) -> UNet:
    """Replace every parameter (including the zero-initialised ones) by small Gaussian noise."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_cifar10_parameter_count_matches_ho_et_al() -> None:
    """Ho et al. 2020, App. B: the CIFAR-10 model has 35.7M parameters."""
    n = count(UNet())
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n


def test_sinusoid_frequencies_are_not_in_state_dict() -> None:
    assert not any("freqs" in k for k in UNet(**TINY).state_dict())


def test_sinusoidal_embedding_closed_form() -> None:
    emb = SinusoidalEmbedding(9)
    out = emb(torch.tensor([0.0, 3.0]))
    assert out.shape == (2, 9)
    torch.testing.assert_close(out[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0]))
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(4)])
    torch.testing.assert_close(out[1, :4], torch.sin(3.0 * freqs))
    torch.testing.assert_close(out[1, 4:8], torch.cos(3.0 * freqs))
    assert out[1, 8] == 0.0


def test_output_is_zero_at_init() -> None:
    """The output conv is zero-initialised (Ho et al. 2020, App. B)."""
    out = tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    ("overrides", "out_channels"),
    [
        ({}, 1),
        ({"learn_sigma": True}, 2),
        ({"in_channels": 3, "learn_sigma": True}, 6),
        ({"out_channels": 2}, 2),
        ({"resblock_updown": True, "channel_mult": (1, 2, 2)}, 1),
        ({"num_heads": 1, "attention_resolutions": (8, 4)}, 1),
        ({"channel_mult": (2, 3), "num_res_blocks": 2}, 1),
    ],
)
def test_output_shapes(overrides: dict, out_channels: int) -> None:
    net = tiny(**overrides)
    x = torch.randn(3, net.in_channels, 8, 8)
    assert net(x, torch.tensor([1, 10, 999])).shape == (3, out_channels, 8, 8)


def test_scalar_and_float_time_are_accepted() -> None:
    net = randomize_(tiny()).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(net(x, torch.tensor(5)), net(x, torch.tensor([5.0, 5.0])))


def test_cond_channels_are_concatenated() -> None:
    net = randomize_(tiny(cond_channels=3)).eval()
    x = torch.randn(2, 1, 8, 8)
    cond = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 4])
    out = net(x, t, cond=cond)
    assert out.shape == (2, 1, 8, 8)
    assert not torch.allclose(out, net(x, t, cond=torch.zeros_like(cond)))


def test_class_labels_and_null_label() -> None:
    net = randomize_(tiny(num_classes=10)).eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 4])
    assert net.null_label == 10
    out_y = net(x, t, y=torch.tensor([0, 7]))
    out_null = net(x, t)
    assert out_y.shape == out_null.shape == (2, 1, 8, 8)
    torch.testing.assert_close(out_null, net(x, t, y=torch.tensor([10, 10])))
    assert not torch.allclose(out_y, out_null)


def test_28x28_single_channel() -> None:
    net = tiny(image_size=28, channel_mult=(1, 2, 2), attention_resolutions=(14,))
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([1, 2])).shape == (2, 1, 28, 28)
    message = r"image_size=28 .*channel_mult=\(1, 2, 2, 2\).*image_size=32.*at most 3 levels"
    with pytest.raises(ValueError, match=message):
        tiny(image_size=28, channel_mult=(1, 2, 2, 2), attention_resolutions=())


def test_attention_resolution_that_never_occurs() -> None:
    with pytest.raises(ValueError, match=r"attention_resolutions=\(16,\).*\[16\].*feature maps are \[8, 4\]"):
        tiny(attention_resolutions=(16,))


def test_bad_num_heads_and_levels() -> None:
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide"):
        tiny(num_heads=3)
    with pytest.raises(ValueError, match=r"num_res_blocks=0.*at least one residual block"):
        tiny(num_res_blocks=0)
    with pytest.raises(ValueError, match=r"channel_mult=\(\).*one multiplier per resolution level"):
        tiny(channel_mult=())


def test_wrong_spatial_size_at_forward() -> None:
    with pytest.raises(ValueError, match=r"expected 8x8 inputs \(image_size=8\), got 16x16"):
        tiny()(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))


def test_wrong_channel_count_at_forward() -> None:
    with pytest.raises(ValueError, match=r"in_channels=1.*got \(2, 3, 8, 8\)"):
        tiny()(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))


def test_cond_mismatch_at_forward() -> None:
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"cond_channels=2 but cond is missing"):
        tiny(cond_channels=2)(x, t)
    with pytest.raises(ValueError, match=r"cond_channels=0 but cond is given"):
        tiny()(x, t, cond=torch.randn(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"expected cond of shape \(2, 2, 8, 8\).*got \(2, 1, 8, 8\)"):
        tiny(cond_channels=2)(x, t, cond=torch.randn(2, 1, 8, 8))


def test_labels_for_unconditional_net_and_bad_t() -> None:
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"num_classes=None"):
        tiny()(x, torch.tensor([1, 2]), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"t of shape \(2,\)"):
        tiny()(x, torch.tensor([1, 2, 3]))


def test_gradients_reach_every_parameter_and_loss_falls() -> None:
    """After a few steps the zero-initialised layers open up and every parameter gets a non-zero gradient."""
    net = tiny(num_classes=3, cond_channels=1, learn_sigma=True, resblock_updown=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x, cond, target = (torch.randn(4, c, 8, 8, generator=gen) for c in (1, 1, 2))
    t, y = torch.tensor([1, 250, 500, 999]), torch.tensor([0, 1, 2, 3])  # 3 = null label
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (net(x, t, y=y, cond=cond) - target).square().mean()
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 3:
            dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not dead, dead
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_time_embedding_changes_the_output() -> None:
    net = randomize_(tiny()).eval()
    x = torch.randn(1, 1, 8, 8).expand(2, 1, 8, 8)  # the same image twice
    same_t = net(x, torch.tensor([7, 7]))
    torch.testing.assert_close(same_t[0], same_t[1])
    different_t = net(x, torch.tensor([1, 500]))
    assert not torch.allclose(different_t[0], different_t[1], atol=1e-3)


@pytest.mark.parametrize(("channels", "groups"), [(256, 32), (48, 24), (32, 16), (8, 4), (3, 1), (1, 1)])
def test_group_norm_keeps_two_channels_per_group(channels: int, groups: int) -> None:
    """32 groups as in Ho et al., but never one channel per group (which would erase the time bias)."""
    assert group_norm(channels).num_groups == groups
