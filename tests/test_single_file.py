"""Whole original Stable Diffusion checkpoints (single files), on tiny stand-ins of that format."""

import numpy as np
import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file
from test_text_encoder import TINY_OPEN_CLIP

from ldm.cli import main
from ldm.encoders.text import FrozenTextEncoder
from ldm.formats.single_file import (
    COMPVIS_UNET_PREFIX,
    COMPVIS_VAE_PREFIX,
    SD2_TEXT_PREFIX,
    unet_diffusers_to_compvis,
    vae_diffusers_to_compvis,
)
from ldm.pipeline import LatentDiffusionPipeline

PROMPT = "a large red circle in the center on a blue background"


def tiny_configs(pipe):
    return dict(
        unet_config=pipe.unet.config,
        vae_config=dict(pipe.vae.vae.config),
        text_encoder_config=pipe.text_encoder.model.config.to_dict(),
    )


def generate(pipe, **kwargs):
    """DDIM, the scheduler that saved folders name, so that diffusers draws the same image."""
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe(
        PROMPT,
        latents=latents,
        num_inference_steps=4,
        sampler="ddim",
        output_type="np",
        progress=False,
        **kwargs,
    ).images


def test_vae_names_agree_with_diffusers_converter(tiny_pipe):
    state = tiny_pipe.vae.vae.state_dict()
    compvis = {
        COMPVIS_VAE_PREFIX + k: v
        for k, v in vae_diffusers_to_compvis(state, dict(tiny_pipe.vae.vae.config)).items()
    }
    assert (
        compvis[COMPVIS_VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4
    )  # 1x1 convs, as CompVis stores them
    back = convert_ldm_vae_checkpoint(compvis, tiny_pipe.vae.vae.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k].reshape(state[k].shape), state[k]) for k in state)


def test_sd1_single_file_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_single_file(tmp_path / "model.safetensors")
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    loaded = LatentDiffusionPipeline.from_single_file(
        tmp_path / "model.safetensors", **tiny_configs(tiny_pipe)
    )
    np.testing.assert_array_equal(generate(loaded), generate(tiny_pipe))
    assert (
        loaded.scheduler_config.prediction_type == "epsilon"
        and loaded.text_encoder.tokenizer.pad_token == "<|endoftext|>"
    )
    with pytest.raises(ValueError, match="exists; choose a new file name"):
        tiny_pipe.save_single_file(tmp_path / "model.safetensors")


def test_ldm_convert_whole_pipelines_both_ways(tiny_sd_dir, tiny_pipe, tmp_path):
    assert main(["convert", str(tiny_sd_dir), str(tmp_path / "model.safetensors")]) == 0
    # an SD single file with shipped-size configs cannot hold tiny weights: give the tiny ones
    loaded = LatentDiffusionPipeline.from_single_file(
        tmp_path / "model.safetensors", **tiny_configs(tiny_pipe)
    )
    loaded.save_pretrained(tmp_path / "folder")
    reference = StableDiffusionPipeline.from_pretrained(tmp_path / "folder", safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = reference(PROMPT, latents=latents, num_inference_steps=4, output_type="np").images
    np.testing.assert_allclose(generate(tiny_pipe), expected, rtol=0, atol=1 / 255 + 1e-6)


@pytest.fixture(scope="module")
def sd2_file(tiny_pipe, tmp_path_factory):
    """An SD 2-format single file: tiny U-Net and VAE, and a tiny OpenCLIP text tower under
    ``cond_stage_model.model.``."""
    torch.manual_seed(1)
    clip = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.1 * torch.randn_like(p))
    text = {
        SD2_TEXT_PREFIX + k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")
    }
    state = {
        COMPVIS_UNET_PREFIX + k: v
        for k, v in unet_diffusers_to_compvis(
            tiny_pipe.unet.state_dict(), tiny_pipe.unet.config
        ).items()
    }
    state |= {
        COMPVIS_VAE_PREFIX + k: v
        for k, v in vae_diffusers_to_compvis(
            tiny_pipe.vae.vae.state_dict(), dict(tiny_pipe.vae.vae.config)
        ).items()
    }
    folder = tmp_path_factory.mktemp("sd2")
    save_file({k: v.contiguous() for k, v in (state | text).items()}, folder / "sd2.safetensors")
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "open_clip.safetensors"
    )
    return folder


def test_sd2_single_file_needs_the_prediction_type_and_uses_the_penultimate_block(
    tiny_pipe, sd2_file
):
    width, layers = TINY_OPEN_CLIP["text_cfg"]["width"], TINY_OPEN_CLIP["text_cfg"]["layers"]
    configs = tiny_configs(tiny_pipe) | {
        "text_encoder_config": dict(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_attention_heads=4,
            num_hidden_layers=layers - 1,
            max_position_embeddings=77,
            hidden_act="gelu",
            pad_token_id=0,
        )
    }
    with pytest.raises(ValueError, match="pass prediction_type='v_prediction'"):
        LatentDiffusionPipeline.from_single_file(sd2_file / "sd2.safetensors", **configs)
    loaded = LatentDiffusionPipeline.from_single_file(
        sd2_file / "sd2.safetensors", "v_prediction", **configs
    )
    assert (
        loaded.scheduler_config.prediction_type == "v_prediction"
        and loaded.schedule.prediction_type == "v_prediction"
    )
    reference = FrozenTextEncoder.from_open_clip(
        "tiny", sd2_file / "open_clip.safetensors", model_config=TINY_OPEN_CLIP
    )
    prompts = [PROMPT, "", "a small black triangle at the top left"]
    assert torch.equal(
        loaded.text_encoder.tokenize(prompts), reference.tokenize(prompts)
    )  # pad id 0, as OpenCLIP
    torch.testing.assert_close(loaded.text_encoder(prompts), reference(prompts), rtol=0, atol=1e-5)


def test_not_a_whole_checkpoint(tmp_path):
    save_file({"model.diffusion_model.x": torch.zeros(1)}, tmp_path / "unet_only.safetensors")
    with pytest.raises(ValueError, match="no text encoder in this checkpoint"):
        LatentDiffusionPipeline.from_single_file(tmp_path / "unet_only.safetensors")
