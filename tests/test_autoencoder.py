"""FrozenVAE against the diffusers AutoencoderKL it wraps: scaling, sampling, slicing, tiling,
saving and loading, upcasting, errors. A tiny seeded VAE on CPU."""

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from ldm.encoders.vae import FrozenVAE

SCALE, SHIFT = 0.5, 0.1  # not SD's defaults, to prove both are read from the config


def tiny_vae(**overrides) -> AutoencoderKL:
    """A 2-level VAE (downscale factor 2, 4 latent channels) whose tiles are 8 latents wide."""
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
    )
    torch.manual_seed(0)
    return AutoencoderKL(**(kwargs | overrides)).eval()


def images(batch: int = 2, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def latents(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(2))


def test_properties_come_from_the_config():
    vae = FrozenVAE(tiny_vae())
    assert (vae.scaling_factor, vae.shift_factor) == (SCALE, SHIFT)
    assert (vae.downscale_factor, vae.latent_channels, vae.force_upcast) == (2, 4, True)
    assert (vae.device, vae.dtype) == (torch.device("cpu"), torch.float32)
    assert FrozenVAE(tiny_vae(shift_factor=None)).shift_factor == 0.0
    four_levels = tiny_vae(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    assert FrozenVAE(four_levels).downscale_factor == 8


def test_frozen_and_stays_in_eval_mode():
    vae = FrozenVAE(tiny_vae().train())
    assert not any(p.requires_grad for p in vae.parameters())
    assert not vae.vae.training
    parent = torch.nn.Sequential(vae).train()
    assert not parent[0].vae.training and not any(m.training for m in vae.modules())
    assert not vae.encode(images().requires_grad_()).requires_grad


def test_encode_is_the_shifted_scaled_posterior_mean():
    reference = tiny_vae()
    vae = FrozenVAE(reference)
    x = images()
    z = vae.encode(x)
    with torch.no_grad():
        posterior = reference.encode(x).latent_dist
    assert z.shape == (2, 4, 8, 8)
    assert posterior.std.mean() > 0.1  # a real posterior: sampling differs from the mean
    torch.testing.assert_close(z, (posterior.mean - SHIFT) * SCALE, rtol=0, atol=0)
    mean, std = vae.encode_distribution(x)
    torch.testing.assert_close(mean, z, rtol=0, atol=0)
    torch.testing.assert_close(std, posterior.std * SCALE, rtol=0, atol=0)


def test_sampled_encode_is_reproducible_and_uses_the_generator():
    reference = tiny_vae()
    vae = FrozenVAE(reference)
    x = images()
    z1 = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    z2 = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    z3 = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    assert (z1 - z3).abs().max() > 0.01
    with torch.no_grad():
        posterior = reference.encode(x).latent_dist
        expected = posterior.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, (expected - SHIFT) * SCALE, rtol=0, atol=0)
    mean, std = vae.encode_distribution(x)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, mean + std * noise, rtol=1e-5, atol=1e-6)
    assert (z1 - mean).abs().max() > 0.01


def test_decode_unscales_then_decodes():
    reference = tiny_vae()
    vae = FrozenVAE(reference)
    z = latents()
    out = vae.decode(z)
    with torch.no_grad():
        expected = reference.decode(z / SCALE + SHIFT).sample
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert vae.decode(vae.encode(images(3, 12))).shape == (3, 3, 12, 12)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 10])
def test_sliced_decode_equals_unsliced(batch_size):
    vae = FrozenVAE(tiny_vae())
    z = latents(batch=3)
    sliced = vae.decode(z, batch_size=batch_size)
    torch.testing.assert_close(sliced, vae.decode(z), rtol=0, atol=1e-5)


def test_tiled_decode():
    reference = tiny_vae()
    vae = FrozenVAE(reference)
    calls = []
    reference.decoder.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    small = latents(size=8)  # one tile: decoded as a whole
    torch.testing.assert_close(vae.decode(small, tiled=True), vae.decode(small), rtol=0, atol=0)
    large = latents(size=16)  # tiles of 8 latents every 6 -> 3 x 3 tiles
    untiled = vae.decode(large)
    calls.clear()
    out = vae.decode(large, tiled=True, batch_size=1)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert len(calls) == 2 * 9 and calls[0] == (1, 3, 16, 16)
    reference.enable_tiling()
    with torch.no_grad():
        expected = reference.decode(large / SCALE + SHIFT).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert (out - untiled).abs().max() > 1e-3  # blended tiles, not one pass
    assert not FrozenVAE(reference).vae.use_tiling  # decode's argument decides, not the flag


@pytest.mark.parametrize("folder", ["vae", "pipeline"])
def test_save_and_load_round_trip(tmp_path, folder):
    vae = FrozenVAE(tiny_vae())
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    assert (tmp_path / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    path = tmp_path / "pipeline" / "vae" if folder == "vae" else tmp_path / "pipeline"
    loaded = FrozenVAE.from_pretrained(str(path))
    assert (loaded.scaling_factor, loaded.shift_factor) == (SCALE, SHIFT)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.vae.training
    x, z = images(), latents()
    torch.testing.assert_close(loaded.encode(x), vae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(z), vae.decode(z), rtol=0, atol=0)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FrozenVAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        FrozenVAE.from_pretrained(tmp_path / "empty")


def test_bad_shapes_are_errors():
    vae = FrozenVAE(tiny_vae())
    with pytest.raises(ValueError, match=r"17x16 .* factor 2"):
        vae.encode(torch.zeros(1, 3, 17, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode_distribution(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), got \(1, 3, 8, 8\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        vae.decode(latents(), batch_size=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vae_is_upcast(dtype):
    full = tiny_vae()
    rounded = copy.deepcopy(full).to(dtype).to(torch.float32)  # the same weights, in float32
    vae = FrozenVAE(copy.deepcopy(full).to(dtype))
    z, x = latents(), images()
    out = vae.decode(z)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert vae.dtype == dtype  # cast back after decoding
    torch.testing.assert_close(out, FrozenVAE(rounded).decode(z), rtol=0, atol=0)
    torch.testing.assert_close(out, FrozenVAE(full).decode(z), rtol=0, atol=0.1)
    encoded = vae.encode(x)
    assert encoded.dtype == torch.float32 and vae.dtype == dtype
    torch.testing.assert_close(encoded, FrozenVAE(rounded).encode(x), rtol=0, atol=0)


def test_no_upcast_when_the_config_says_so():
    vae = FrozenVAE(tiny_vae(force_upcast=False).to(torch.bfloat16))
    assert not vae.force_upcast
    out = vae.decode(latents())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
