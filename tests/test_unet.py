"""U-Net shapes, parameter counts, conditioning and configuration errors."""
import hashlib

import pytest
import torch

from shared import UNet, UserError
from shared.model.unet import UNetConfig
from shared.model.blocks import (Downsample, EmbeddingBlock, EmbeddingSequential, GroupNormAct, ResBlock, SelfAttention,
                                  Upsample)
from shared.records.diagram import draw_unet, unet_blocks, unet_levels
from shared.model.summary import block_table

# Ho et al. 2020 report 35.7 M parameters for their CIFAR-10 model. Ours is that network with FiLM
# (scale and shift) instead of an additive time bias, so each of its 22 ResBlocks' embedding
# projections (512 → C) doubles (512 → 2C): Σ C over the blocks = 4992, adding 4992 · 513 parameters.
DDPM_CIFAR10_PARAMS = 35_746_307
FILM_EXTRA_PARAMS = 4992 * 513


def count(model):
    return sum(p.numel() for p in model.parameters())


def randomized(model, std=0.05):
    """The zero-initialised layers (DDPM style) hide every path at init; give all weights noise."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def test_tiny_forward_backward_shapes_and_grads():
    model = randomized(UNet.from_preset("tiny"))
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape
    (out - torch.randn_like(out)).square().mean().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_output_conv_starts_at_zero():
    """DDPM's zero-initialised last layer: an untrained model predicts ε̂ = 0 exactly."""
    model = UNet.from_preset("tiny")
    assert torch.equal(model(torch.randn(2, 1, 28, 28), 10), torch.zeros(2, 1, 28, 28))


@pytest.mark.parametrize("preset, shape, params", [
    ("mnist", (1, 28, 28), 6_946_881),
    ("cifar10", (3, 32, 32), DDPM_CIFAR10_PARAMS + FILM_EXTRA_PARAMS),
])
def test_large_presets_shape_and_parameter_count(preset, shape, params):
    model = UNet.from_preset(preset)
    assert count(model) == params
    assert (model.in_channels, model.image_size, model.image_size) == shape
    with torch.no_grad():
        assert model(torch.randn(1, *shape), 3).shape == (1, *shape)


def test_attention_only_at_lowest_resolution():
    model = UNet.from_preset("mnist")
    sizes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: sizes.append(out.shape[-1]))
             for m in model.modules() if isinstance(m, SelfAttention)]
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28), 0)
    for h in hooks:
        h.remove()
    assert sizes and set(sizes) == {7}


def test_class_conditioning_and_null_class():
    model = randomized(UNet.from_preset("tiny", num_classes=10))
    assert model.null_class == 10 and model.class_embed.num_embeddings == 11
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 5])
    with torch.no_grad():
        a = model(x, t, torch.tensor([3, 3]))
        b = model(x, t, torch.tensor([4, 4]))
        null_default = model(x, t)
        null_explicit = model(x, t, torch.tensor([10, 10]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(null_default, null_explicit)
    with pytest.raises(ValueError, match="unconditional"):
        UNet.from_preset("tiny")(x, t, torch.tensor([1, 2]))


def test_resampling_without_convs_is_the_2x2_mean_and_pixel_repeat():
    """conv_resample=False: Downsample averages each 2×2 window, Upsample repeats each pixel 2×2, and the
    network has exactly the resampling convs' parameters fewer (float64 references by reshape/repeat)."""
    x = torch.randn(2, 8, 14, 14, dtype=torch.float64)
    down, up = Downsample(8, conv=False), Upsample(8, conv=False)
    assert list(down.parameters()) == [] and list(up.parameters()) == []
    torch.testing.assert_close(down(x), x.reshape(2, 8, 7, 2, 7, 2).mean(dim=(3, 5)), rtol=0, atol=1e-15)
    assert torch.equal(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))

    with_convs, without = UNet.from_preset("cpu", conv_resample=True), UNet.from_preset("cpu")  # the preset's own
    convs = [m.conv for m in with_convs.modules() if isinstance(m, (Downsample, Upsample))]
    assert len(convs) == 4 and all(isinstance(c, torch.nn.Conv2d) for c in convs)
    assert count(with_convs) - count(without) == sum(count(c) for c in convs)
    with torch.no_grad():
        assert randomized(without)(torch.randn(3, 1, 28, 28), 5).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="conv_resample must be true or false"):
        UNet.from_preset("tiny", conv_resample="no")


def test_config_round_trip():
    model = UNet.from_preset("tiny", num_classes=3)
    clone = UNet(UNetConfig(**model.config))
    assert clone.config == model.config and count(clone) == count(model)


def test_groups_not_dividing_channels_is_a_clear_value_error():
    with pytest.raises(ValueError, match="not divisible into 12 groups"):
        UNet.from_preset("tiny", num_groups=12)
    with pytest.raises(ValueError, match="not divisible into 5 groups"):
        GroupNormAct(5, 16)


def test_other_bad_configs_and_inputs():
    with pytest.raises(UserError, match="unknown preset"):
        UNet.from_preset("imagenet")
    with pytest.raises(TypeError, match="unknown U-Net option"):
        UNet.from_preset("tiny", widht=3)
    with pytest.raises(ValueError, match="not divisible by 2"):
        UNet.from_preset("tiny", image_size=27)
    model = UNet.from_preset("tiny")
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        model(torch.randn(2, 3, 28, 28), 0)
    with pytest.raises(ValueError, match=r"t of shape \(2,\)"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2, 3]))


def test_fused_switch_reaches_every_fusable_spot():
    kernels = pytest.importorskip("kernels")
    model = UNet.from_preset("tiny")
    try:
        model.set_fused_kernels(True)
    except kernels.FusedKernelsUnavailable as err:
        pytest.skip(f"fused kernels not loadable here: {err}")
    spots = [m for m in model.modules() if isinstance(m, (GroupNormAct, SelfAttention))]
    assert spots and all(m.fused for m in spots) and model.fused_kernels
    model.set_fused_kernels(False)
    assert not any(m.fused for m in spots)


def test_fused_switch_refuses_unsupported_head_dims_up_front():
    kernels = pytest.importorskip("kernels")
    model = UNet.from_preset("tiny", num_heads=2)  # 32 channels / 2 heads = head dim 16
    try:
        kernels.load("attention")
    except kernels.FusedKernelsUnavailable as err:
        pytest.skip(f"fused kernels not loadable here: {err}")
    with pytest.raises(kernels.FusedKernelsUnavailable, match=r"head dims \(32, 64, 128\).*\[16\]"):
        model.set_fused_kernels(True)
    assert not model.fused_kernels


# sha256 of the newline-joined state_dict keys of models built by the U-Net as first released (blocks held
# in lists of layers). Checkpoints store these keys, so a change here would orphan every saved model.
RELEASED_KEY_DIGESTS = {
    ("tiny", 0): "3d4f26f00135d0917fe63854c0113020c0b84cf30926552935620c5a48a8dc88",
    ("tiny", 10): "0b97feb85b32dc5e4d7b35b4826fb37ab0f9c0a1429b822a9b1d2a466f6ca9c6",
    ("mnist", 0): "6e17a270a9f44fd16b28c9668a5ffa61bdd276063e7b141c3c42aeb639fcdd8e",
}


@pytest.mark.parametrize("preset, num_classes", sorted(RELEASED_KEY_DIGESTS))
def test_state_dict_keys_are_those_of_released_checkpoints(preset, num_classes):
    keys = list(UNet.from_preset(preset, num_classes=num_classes).state_dict())
    assert "middle.1.qkv.weight" in keys and "down.0.0.emb_proj.1.weight" in keys
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    assert digest == RELEASED_KEY_DIGESTS[preset, num_classes]


def test_embedding_sequential_passes_the_embedding_only_to_embedding_blocks():
    seen = []

    class Plain(torch.nn.Module):
        def forward(self, x):
            seen.append("plain")
            return x + 1

    class Conditioned(EmbeddingBlock):
        def forward(self, x, emb):
            seen.append("conditioned")
            return x * emb

    block = EmbeddingSequential(Plain(), Conditioned(), Plain())
    x, emb = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    torch.testing.assert_close(block(x, emb), (x + 1) * emb + 1)
    assert seen == ["plain", "conditioned", "plain"] and isinstance(block, EmbeddingBlock)
    assert issubclass(ResBlock, EmbeddingBlock) and not issubclass(SelfAttention, EmbeddingBlock)


def test_block_table_hooks_whole_blocks_in_execution_order():
    """tiny: 28 → 14 with widths 16, 32 and attention at 14×14; each row is a whole block's output."""
    model = UNet.from_preset("tiny").eval()
    rows = block_table(model, torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))
    got = [(r["block"], r["layers"], r["output_shape"][1:]) for r in rows[1:]]
    assert got == [
        ("input_conv", "Conv2d", (16, 28, 28)),
        ("down.0", "ResBlock", (16, 28, 28)),
        ("down.1", "Downsample", (16, 14, 14)),
        ("down.2", "ResBlock+SelfAttention", (32, 14, 14)),
        ("middle", "ResBlock+SelfAttention+ResBlock", (32, 14, 14)),
        ("up.0", "ResBlock+SelfAttention", (32, 14, 14)),
        ("up.1", "ResBlock+SelfAttention+Upsample", (32, 28, 28)),
        ("up.2", "ResBlock", (16, 28, 28)),
        ("up.3", "ResBlock", (16, 28, 28)),
        ("out_norm", "GroupNormAct", (16, 28, 28)),
        ("out_conv", "Conv2d", (1, 28, 28)),
    ]
    assert sum(r["params"] for r in rows) == count(model) == 190_369


@pytest.mark.parametrize("preset", ["tiny", "mnist", "cpu", "cifar10"])
def test_diagram_levels_match_the_config(preset):
    """The levels read off the module tree are those the constructor arguments describe."""
    model = UNet.from_preset(preset)
    cfg = model.config
    expected = [dict(resolution=cfg["image_size"] // 2 ** i, channels=cfg["base_channels"] * mult,
                     down_blocks=cfg["num_res_blocks"], up_blocks=cfg["num_res_blocks"] + 1,
                     attention=cfg["image_size"] // 2 ** i in cfg["attention_resolutions"])
                for i, mult in enumerate(cfg["channel_mult"])]
    assert unet_levels(model) == expected
    blocks = unet_blocks(model)
    assert sum(b.film for b in blocks) == sum(isinstance(m, ResBlock) for m in model.modules())
    middle = [b for b in blocks if b.path == "middle"]
    assert len(middle) == 1 and middle[0].attention and middle[0].film == 2
    # Every skip a down block makes is concatenated once on the way up: channels add up.
    skips = [b.channels_out for b in blocks if b.path in ("in", "down")]
    ups = [b for b in blocks if b.path == "up"]
    outs = [middle[0].channels_out] + [b.channels_out for b in ups[:-1]]
    assert [b.channels_in for b in ups] == [o + s for o, s in zip(outs, reversed(skips))]
    labels = " ".join(label for b in blocks for label in b.layers)
    down, up = ("Down conv s2", "Up ×2 + conv") if cfg["conv_resample"] else ("Down avg 2×2", "Up ×2")
    assert labels.count(down) == labels.count(up) == len(cfg["channel_mult"]) - 1
    assert ("+ conv" in labels) == ("conv s2" in labels) == cfg["conv_resample"]


def test_diagram_draws_every_level_and_block(tmp_path):
    model = UNet.from_preset("mnist")
    fig = draw_unet(model, tmp_path / "unet.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    for label in ("28×28\n64 ch", "14×14\n128 ch", "7×7\n128 ch"):
        assert label in texts
    boxes = [t for t in texts if t.startswith(("Conv", "Res", "Down", "GN"))]
    assert len(boxes) == len(unet_blocks(model)) == 1 + 8 + 1 + 9 + 1
    assert sum(t.count("Attn 2×64") for t in texts) == 2 + 1 + 3  # down, middle, up at 7×7
    assert (tmp_path / "unet.png").stat().st_size > 20_000
