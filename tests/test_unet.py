"""Our U-Net against diffusers' UNet2DConditionModel, and its own contracts."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ldm.config import UNetConfig
from ldm.nn.layers import Conv2d
from ldm.nn.unet import UNet, timestep_embedding


def diffusers_kwargs(config: UNetConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


def twins(preset: str, seed: int = 0):
    """A diffusers U-Net with every weight perturbed (so no zero-initialised layer hides a bug),
    and ours with the same weights."""
    config = UNetConfig.preset(preset)
    torch.manual_seed(seed)
    reference = UNet2DConditionModel(**diffusers_kwargs(config)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = UNet(config).eval()
    ours.load_weights(reference.state_dict())
    return config, ours, reference


def inputs(config: UNetConfig, batch: int = 2, h: int = 16, w: int = 16):
    g = torch.Generator().manual_seed(42)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    t = torch.tensor([3, 999, 500, 0][:batch])
    context = torch.randn(batch, 7, config.cross_attention_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2"])
@pytest.mark.parametrize(("h", "w"), [(16, 16), (13, 9), (8, 24)])
def test_output_equals_diffusers(preset, h, w):
    config, ours, reference = twins(preset)
    x, t, context = inputs(config, h=h, w=w)
    with torch.no_grad():
        expected = reference(x, t, context).sample
        out = ours(x, t, context)
    assert out.shape == (2, config.out_channels, h, w)
    assert expected.abs().max() > 1.0  # a real signal, not a zero-initialised output
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_scalar_timestep_and_center_input_sample():
    config = UNetConfig.preset("tiny-sd1")
    config.center_input_sample = True
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**diffusers_kwargs(config)).eval()
    ours = UNet(config).eval()
    ours.load_weights(reference.state_dict())
    x, _, context = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, torch.tensor(250), context),
            reference(x, 250, context).sample,
            rtol=0,
            atol=1e-5,
        )
        torch.testing.assert_close(
            ours(x, torch.tensor(250), context), ours(x, torch.tensor([250, 250]), context)
        )


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8, flip_sin_to_cos=True)
    freqs = 10000 ** (-torch.arange(4) / 4)
    angles = t[:, None] * freqs[None]
    torch.testing.assert_close(emb, torch.cat([angles.cos(), angles.sin()], -1))
    torch.testing.assert_close(
        timestep_embedding(t, 8, flip_sin_to_cos=False), torch.cat([angles.sin(), angles.cos()], -1)
    )
    assert timestep_embedding(t, 9).shape == (3, 9)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_stable_diffusion_parameter_counts(preset):
    config = UNetConfig.preset(preset)
    with torch.device("meta"):  # no memory, no time
        ours = UNet(config)
        reference = UNet2DConditionModel(**diffusers_kwargs(config))
    assert count_parameters(ours) == count_parameters(reference)
    if preset == "sd15":
        assert count_parameters(ours) == 859_520_964
    assert ours.state_dict().keys() == reference.state_dict().keys()


def test_sd2_attention_head_dim_is_a_head_count():
    config = UNetConfig.preset("sd21")
    assert config.heads() == (5, 10, 20, 20)
    with torch.device("meta"):
        unet = UNet(config)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert (
        attn.heads == 5 and attn.to_q.out_features // attn.heads == 64
    )  # 320 channels, 64 per head
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn2.heads == 20


def test_config_round_trip_and_errors():
    config = UNetConfig.preset("sd21")
    assert UNetConfig.from_dict(config.to_dict()) == config
    data = config.to_dict() | {
        "_diffusers_version": "0.30.0",
        "dual_cross_attention": False,
        "num_class_embeds": None,
    }
    assert UNetConfig.from_dict(data) == config  # metadata and switched-off features are fine
    with pytest.raises(ValueError, match=r"class_embed_type='timestep' \(only None is supported\)"):
        UNetConfig.from_dict(config.to_dict() | {"class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unknown key 'block_channels'"):
        UNetConfig.from_dict(config.to_dict() | {"block_channels": [1, 2]})
    with pytest.raises(
        ValueError,
        match=r"'SimpleCrossAttnDownBlock2D' is not supported; allowed: CrossAttnDownBlock2D, DownBlock2D",
    ):
        UNetConfig.from_dict(
            config.to_dict()
            | {"down_block_types": ["SimpleCrossAttnDownBlock2D"] + ["DownBlock2D"] * 3}
        )
    with pytest.raises(
        ValueError, match="attention_head_dim has 3 entries; it needs one, or one per level"
    ):
        UNetConfig.from_dict(config.to_dict() | {"attention_head_dim": [5, 10, 20]})
    with pytest.raises(ValueError, match="320 channels cannot be split into 7 attention heads"):
        UNetConfig.from_dict(config.to_dict() | {"attention_head_dim": 7})
    with pytest.raises(ValueError, match=r"unknown U-Net preset 'sd3'; allowed: sd15, sd21"):
        UNetConfig.preset("sd3")


def test_missing_unexpected_and_misshaped_weights_are_listed():
    config = UNetConfig.preset("tiny-sd1")
    unet = UNet(config)
    state = unet.state_dict()
    state.pop("conv_in.weight")
    state["extra.weight"] = torch.zeros(1)
    state["conv_out.bias"] = torch.zeros(5)
    with pytest.raises(ValueError) as error:
        unet.load_weights(state, source="test")
    message = str(error.value)
    assert "1 missing: conv_in.weight" in message
    assert "1 unexpected: extra.weight" in message
    assert "conv_out.bias (5,) != (4,)" in message


def test_gradient_checkpointing_gives_the_same_gradients():
    config, ours, _ = twins("tiny-sd2")
    ours.train()
    x, t, context = inputs(config)
    grads = []
    for checkpointing in (False, True):
        ours.zero_grad()
        ours.enable_gradient_checkpointing(checkpointing)
        ours(x, t, context).square().mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel", "stride", "padding", "size", "batch"),
    [
        (1280, 1280, 3, 1, 1, 4, 2),
        (1280, 1280, 3, 2, 1, 8, 2),
        (2560, 1280, 1, 1, 0, 8, 2),
        (1280, 1280, 3, 1, 1, 7, 1),
        (64, 64, 3, 1, 1, 4, 2),
    ],
)
def test_conv2d_equals_torch_convolution(c_in, c_out, kernel, stride, padding, size, batch):
    torch.manual_seed(0)
    conv = Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    x = torch.randn(batch, c_in, size, size)
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight, conv.bias, stride, padding)
        out = conv(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_conv2d_gemm_path_is_differentiable():
    torch.manual_seed(0)
    conv = Conv2d(1280, 1280, 3, padding=1)
    x = torch.randn(1, 1280, 4, 4, requires_grad=True)
    conv(x).sum().backward()
    w, b = conv.weight.detach().requires_grad_(), conv.bias.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    F.conv2d(x2, w, b, padding=1).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-3)


def test_bfloat16_forward_stays_close_to_float32():
    config, ours, _ = twins("tiny-sd2")  # upcast_attention=True
    x, t, context = inputs(config)
    with torch.no_grad():
        full = ours(x, t, context)
        half = ours.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()


def test_every_diffusers_config_key_is_implemented_or_refused_when_switched_on():
    import dataclasses
    import inspect

    from ldm.config import UNSUPPORTED_UNET_KEYS

    ours = {f.name for f in dataclasses.fields(UNetConfig)}
    for name, parameter in inspect.signature(UNet2DConditionModel.__init__).parameters.items():
        if name == "self":
            continue
        assert name in ours or name in UNSUPPORTED_UNET_KEYS, (
            f"diffusers key {name!r} is unknown to UNetConfig"
        )
        if name in UNSUPPORTED_UNET_KEYS:
            assert UNSUPPORTED_UNET_KEYS[name] == parameter.default, name
        else:
            default = getattr(UNetConfig(), name)
            expected = (
                tuple(parameter.default)
                if isinstance(parameter.default, (list, tuple))
                else parameter.default
            )
            assert default == expected, (
                f"default of {name}: ours {default!r}, diffusers {expected!r}"
            )
