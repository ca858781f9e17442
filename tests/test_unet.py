"""Tests for the DDPM/ADM UNet (Ho et al. 2020, App. B; Nichol & Dhariwal 2021)."""

from __future__ import annotations

import pytest
import torch

from diffusion_pl.nets import UNet
from diffusion_pl.nets.unet import SinusoidalEmbedding, SpatialTransformer, group_norm

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


# --- Conditioning routes: cond_level, vector, context (cross-attention) ---

ROUTES = dict(cond_level_embedding=True, vector_dim=6, context_dim=5, cross_attention_resolutions=(8, 4))


def route_inputs(batch: int = 2, tokens: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs for every new route of a net built with ``ROUTES``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "cond_level": torch.rand(batch, generator=gen) * 999,
        "vector": torch.randn(batch, 6, generator=gen),
        "context": torch.randn(batch, tokens, 5, generator=gen),
    }


def new_route_parameters(net: UNet) -> set[int]:
    """ids of the parameters of the optional routes' layers."""
    layers = [m for m in net.modules() if isinstance(m, SpatialTransformer)]
    layers += [m for m in (net.cond_level_embed, net.vector_embed) if m is not None]
    return {id(p) for layer in layers for p in layer.parameters()}


def existing_parameters(net: UNet) -> list[torch.Tensor]:
    new = new_route_parameters(net)
    return [p for p in net.parameters() if id(p) not in new]


def fingerprint(net: UNet, extra: dict) -> tuple[float, ...]:
    """Checksums of the initial state_dict and of the output once the all-zero parameters are opened."""
    flat = torch.cat([v.detach().double().flatten() for v in net.state_dict().values()])
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.fill_(0.05)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, net.in_channels, 8, 8, generator=gen)
    kwargs = {k: v(gen) if callable(v) else v for k, v in extra.items()}
    out = net.eval()(x, torch.tensor([3.0, 700.0]), **kwargs).double().flatten()
    ramp = lambda n: torch.linspace(-1.0, 1.0, n, dtype=torch.float64)  # noqa: E731
    return (
        len(net.state_dict()), flat.numel(), flat.sum().item(), (flat * ramp(flat.numel())).sum().item(),
        out.sum().item(), (out * ramp(out.numel())).sum().item(),
    )


BIG = dict(
    num_classes=3, cond_channels=2, learn_sigma=True, resblock_updown=True, channel_mult=(1, 2, 2),
    attention_resolutions=(8, 2),
)


@pytest.mark.parametrize(
    ("overrides", "extra", "expected"),
    [
        ({}, {}, (128, 44969, 320.21625481314186, 9.671039897209866, 121.62874496355653, -5.259503095726092)),
        (
            BIG, {"y": torch.tensor([0, 3]), "cond": lambda g: torch.randn(2, 2, 8, 8, generator=g)},
            (217, 81906, 600.1192271611562, 5.307295151453388, 222.27441492304206, -8.733488021834807),
        ),
    ],
)
def test_existing_constructors_keep_init_and_outputs(overrides: dict, extra: dict, expected: tuple) -> None:
    """Numbers recorded with the UNet before the cond_level / vector / context routes existed."""
    got = fingerprint(tiny(**overrides), extra)
    assert got[:2] == expected[:2]
    torch.testing.assert_close(got[2:4], expected[2:4], rtol=1e-12, atol=1e-9)  # the weights are bit-identical
    torch.testing.assert_close(got[4:], expected[4:], rtol=1e-5, atol=1e-5)  # float32 forward on any CPU


@pytest.mark.parametrize(
    "routes",
    [{"cond_level_embedding": True}, {"vector_dim": 6}, {"context_dim": 5}, ROUTES],
)
def test_new_routes_leave_the_existing_layers_init_unchanged(routes: dict) -> None:
    """The routes' layers are created last: the other layers draw bit-identical initial weights."""
    base, net = existing_parameters(tiny(**BIG)), tiny(**BIG, **routes)
    assert new_route_parameters(net)
    with_routes = existing_parameters(net)
    assert len(with_routes) == len(base)
    assert all(torch.equal(a, b) for a, b in zip(base, with_routes))


def test_fresh_cross_attention_is_exactly_the_identity() -> None:
    """proj_out is zero-initialised (Rombach et al. 2022): a fresh net's output is exactly independent of context."""
    base = randomize_(tiny()).eval()
    net = tiny(context_dim=5, cross_attention_resolutions=(8, 4)).eval()
    with torch.no_grad():
        for p, q in zip(existing_parameters(net), base.parameters(), strict=True):
            p.copy_(q)
        for block in (m for m in net.modules() if isinstance(m, SpatialTransformer)):
            for name, p in block.named_parameters():
                if not name.startswith("proj_out"):
                    p.normal_(0.0, 0.2)
                else:
                    assert not p.any()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 400])
    out = net(x, t, context=torch.randn(2, 7, 5))
    assert out.abs().sum() > 0
    assert torch.equal(out, net(x, t, context=torch.randn(2, 3, 5)))
    assert torch.equal(out, base(x, t))


def test_cross_attention_placement_and_default_resolutions() -> None:
    """A SpatialTransformer per res block at the cross-attention resolutions, plus one in the middle."""
    count_blocks = lambda net: sum(isinstance(m, SpatialTransformer) for m in net.modules())  # noqa: E731
    net = tiny(context_dim=5)  # defaults to attention_resolutions=(4,): 1 down + middle + 2 up
    assert net.cross_attention_resolutions == (4,)
    assert count_blocks(net) == 4
    assert count_blocks(tiny(context_dim=5, cross_attention_resolutions=(8, 4))) == 7
    assert count_blocks(tiny(context_dim=5, attention_resolutions=())) == 1  # the middle block only
    assert count_blocks(tiny()) == 0 and tiny().cross_attention_resolutions == ()
    assert tiny(context_dim=5, resblock_updown=True, channel_mult=(1, 2, 2))(
        torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 3, 5)
    ).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("route", ["cond_level", "vector", "context"])
def test_each_route_changes_the_output(route: str) -> None:
    net = randomize_(tiny(**ROUTES)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 400])
    inputs = route_inputs()
    out = net(x, t, **inputs)
    inputs[route] = route_inputs(seed=1)[route]
    assert not torch.allclose(out, net(x, t, **inputs), atol=1e-4)


def test_scalar_cond_level_is_broadcast() -> None:
    net = randomize_(tiny(cond_level_embedding=True)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 400])
    scalar, batched = torch.tensor(250.0), torch.tensor([250.0, 250.0])
    torch.testing.assert_close(net(x, t, cond_level=scalar), net(x, t, cond_level=batched))


def test_cross_attention_attends_over_the_tokens() -> None:
    """Attention is permutation-invariant over keys: shuffling the tokens keeps the output, changing one changes it."""
    net = randomize_(tiny(context_dim=5, cross_attention_resolutions=(8, 4))).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 400])
    context = torch.randn(2, 6, 5)
    out = net(x, t, context=context)
    torch.testing.assert_close(net(x, t, context=context[:, torch.randperm(6)]), out, rtol=1e-5, atol=1e-5)
    changed = context.clone()
    changed[:, 2] += 1.0
    assert not torch.allclose(net(x, t, context=changed), out, atol=1e-4)


def test_all_routes_together_shape_and_gradient_to_context() -> None:
    net = randomize_(tiny(**ROUTES, num_classes=3, cond_channels=2, learn_sigma=True))
    inputs = route_inputs(batch=3)
    context = inputs.pop("context").requires_grad_()
    out = net(
        torch.randn(3, 1, 8, 8), torch.tensor([1, 10, 999]), torch.tensor([0, 2, 3]), torch.randn(3, 2, 8, 8),
        context=context, **inputs,
    )
    assert out.shape == (3, 2, 8, 8)
    out.square().sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_every_route_parameter_trains() -> None:
    """From the zero-initialised start, every parameter of every route gets a gradient within three steps."""
    net = tiny(**ROUTES, num_classes=3, cond_channels=1, learn_sigma=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x, cond, target = (torch.randn(4, c, 8, 8, generator=gen) for c in (1, 1, 2))
    inputs = route_inputs(batch=4)
    t, y = torch.tensor([1, 250, 500, 999]), torch.tensor([0, 1, 2, 3])
    for step in range(3):
        opt.zero_grad()
        (net(x, t, y=y, cond=cond, **inputs) - target).square().mean().backward()
        if step == 2:
            dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not dead, dead
        opt.step()


@pytest.mark.parametrize(
    ("overrides", "inputs", "message"),
    [
        ({}, {"cond_level": torch.ones(2)}, r"got cond_level .*built without its route; set cond_level_embedding=True"),
        ({"cond_level_embedding": True}, {}, r"built with cond_level_embedding=True but cond_level is missing"),
        ({"cond_level_embedding": True}, {"cond_level": torch.ones(3)}, r"cond_level of shape \(2,\) or a scalar"),
        ({}, {"vector": torch.ones(2, 6)}, r"got vector of shape \(2, 6\) but .* set vector_dim"),
        ({"vector_dim": 6}, {}, r"built with vector_dim=6 but vector is missing; pass vector of shape \(2, 6\)"),
        ({"vector_dim": 6}, {"vector": torch.ones(2, 5)}, r"vector of shape \(2, vector_dim=6\), got \(2, 5\)"),
        ({}, {"context": torch.ones(2, 3, 5)}, r"got context of shape \(2, 3, 5\) but .* set context_dim"),
        ({"context_dim": 5}, {}, r"context_dim=5 \(cross-attention\) but context is missing.*never falls back"),
        ({"context_dim": 5}, {"context": torch.ones(2, 3, 4)}, r"\(2, M, context_dim=5\).*got \(2, 3, 4\)"),
        ({"context_dim": 5}, {"context": torch.ones(2, 5)}, r"context of shape \(2, M, context_dim=5\)"),
        ({"context_dim": 5}, {"context": torch.ones(3, 2, 5)}, r"context of shape \(2, M, context_dim=5\)"),
        ({"context_dim": 5}, {"context": torch.ones(2, 0, 5)}, r"M >= 1 tokens"),
    ],
)
def test_route_mismatch_at_forward(overrides: dict, inputs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), **inputs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cross_attention_resolutions": (4,)}, r"cross_attention_resolutions=\(4,\).*needs context_dim"),
        ({"transformer_heads": 2}, r"transformer_heads=2 configure cross-attention, which needs context_dim"),
        ({"context_dim": 5, "cross_attention_resolutions": (16,)}, r"cross_attention_resolutions=\(16,\) contains"),
        ({"context_dim": 5, "transformer_heads": 3}, r"transformer_heads=3 does not divide the channel counts \[16\]"),
        ({"context_dim": 5, "cross_attention_resolutions": (8,), "transformer_heads": 16}, r"\[8, 16\]"),
        ({"context_dim": 0}, r"context_dim=0: give the positive width"),
        ({"vector_dim": -1}, r"vector_dim=-1: give the positive width"),
    ],
)
def test_bad_route_options(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_spatial_transformer_never_self_attends() -> None:
    with pytest.raises(ValueError, match=r"needs context .* never self-attends"):
        SpatialTransformer(8, 5, 2)(torch.randn(1, 8, 4, 4), None)
