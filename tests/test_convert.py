"""Weight formats: diffusers folders, original SD single files, .ckpt and .bin pickles."""

import argparse

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file
from test_unet import inputs, twins

from ldm.cli import main
from ldm.formats.single_file import (
    COMPVIS_UNET_PREFIX,
    load_checkpoint,
    load_unet_single_file,
    save_unet_single_file,
    unet_compvis_to_diffusers,
    unet_diffusers_to_compvis,
)
from ldm.nn.unet import UNet
from ldm.pipeline.convert import convert


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2"])
def test_diffusers_folder_round_trip_is_identical(preset, tmp_path):
    config, _, reference = twins(preset)
    reference.save_pretrained(tmp_path / "diffusers")
    loaded = UNet.from_pretrained(tmp_path / "diffusers")
    loaded.save_pretrained(tmp_path / "ours")
    a = load_file(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "ours" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and diffusers reads our folder back, config included
    again = UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    x, t, context = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(
            again(x, t, context).sample, reference(x, t, context).sample, rtol=0, atol=0
        )
        torch.testing.assert_close(
            loaded.eval()(x, t, context), reference(x, t, context).sample, rtol=0, atol=1e-5
        )


def test_from_pretrained_finds_the_unet_subfolder_of_a_pipeline(tmp_path):
    _, ours, _ = twins("tiny-sd1")
    ours.save_pretrained(tmp_path / "pipeline" / "unet")
    loaded = UNet.from_pretrained(tmp_path / "pipeline")
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), ours.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2"])
def test_compvis_names_agree_with_diffusers_converter(preset, tmp_path):
    config, _, reference = twins(preset)
    diffusers_state = reference.state_dict()
    compvis = {
        COMPVIS_UNET_PREFIX + k: v
        for k, v in unet_diffusers_to_compvis(diffusers_state, config).items()
    }
    assert any(".in_layers.0." in k for k in compvis) and any(".0.op.weight" in k for k in compvis)
    # diffusers' own offline converter maps our CompVis names back to exactly its names
    back = convert_ldm_unet_checkpoint(compvis, {"layers_per_block": config.layers_per_block})
    assert back.keys() == diffusers_state.keys()
    assert all(torch.equal(back[k], diffusers_state[k]) for k in back)
    # and our converter agrees with diffusers' on the way in
    ours_back = unet_compvis_to_diffusers(
        {k.removeprefix(COMPVIS_UNET_PREFIX): v for k, v in compvis.items()}, config
    )
    assert ours_back.keys() == back.keys()
    # a single file of those tensors loads into our U-Net and gives diffusers' output
    save_file(
        compvis | {"first_stage_model.decoder.conv_in.weight": torch.zeros(1)},
        tmp_path / "sd.safetensors",
    )
    loaded = load_unet_single_file(tmp_path / "sd.safetensors", preset).eval()
    x, t, context = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, context), reference(x, t, context).sample, rtol=0, atol=1e-5
        )
    # and writing it back gives the same file contents
    save_unet_single_file(loaded, tmp_path / "again.safetensors")
    again = load_file(tmp_path / "again.safetensors")
    assert again.keys() == compvis.keys() and all(torch.equal(again[k], compvis[k]) for k in again)


def test_single_file_config_is_read_from_the_weights(tmp_path):
    # SD 1 and SD 2 are told apart by the cross-attention width (768 vs 1024)
    from ldm.formats.single_file import detect_unet_preset

    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_unet_preset({key: torch.empty(320, 768)}) == "sd15"
    assert detect_unet_preset({key: torch.empty(320, 1024)}) == "sd21"
    with pytest.raises(ValueError, match="cross-attention width 512 matches no shipped config"):
        detect_unet_preset({key: torch.empty(320, 512)})
    save_file({"cond_stage_model.x": torch.zeros(1)}, tmp_path / "vae_only.safetensors")
    with pytest.raises(ValueError, match=r"has no model\.diffusion_model\.\* tensors"):
        load_unet_single_file(tmp_path / "vae_only.safetensors")


def test_pickled_bin_is_refused_unless_allowed(tmp_path):
    _, ours, _ = twins("tiny-sd1")
    folder = tmp_path / "unet"
    ours.save_pretrained(folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(
        ValueError, match=r"holds only a pickled diffusion_pytorch_model\.bin.*allow_pickle=True"
    ):
        UNet.from_pretrained(folder)
    loaded = UNet.from_pretrained(folder, allow_pickle=True)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)


def test_ckpt_with_pickled_objects_needs_an_explicit_opt_in(tmp_path):
    tensors = {"model.diffusion_model.conv_in.weight": torch.randn(2, 2)}
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": tensors, "global_step": 10}, plain)
    assert (
        load_checkpoint(plain).keys() == tensors.keys()
    )  # plain data loads with weights_only=True
    lightning = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tensors, "hyper_parameters": argparse.Namespace(lr=1e-4)}, lightning)
    with pytest.raises(
        ValueError, match=r"pickled Python objects besides tensors.*--unsafe-pickle"
    ):
        load_checkpoint(lightning)
    loaded = load_checkpoint(lightning, unsafe_pickle=True)
    assert torch.equal(
        loaded["model.diffusion_model.conv_in.weight"],
        tensors["model.diffusion_model.conv_in.weight"],
    )
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"unknown checkpoint format '\.onnx'"):
        (tmp_path / "model.onnx").write_bytes(b"")
        load_checkpoint(tmp_path / "model.onnx")


def test_ldm_convert_command(tmp_path, capsys):
    config, ours, reference = twins("tiny-sd2")
    compvis = {
        COMPVIS_UNET_PREFIX + k: v
        for k, v in unet_diffusers_to_compvis(ours.state_dict(), config).items()
    }
    torch.save({"state_dict": compvis}, tmp_path / "model.ckpt")
    # .ckpt -> .safetensors: the same tensors
    assert main(["convert", str(tmp_path / "model.ckpt"), str(tmp_path / "model.safetensors")]) == 0
    converted = load_file(tmp_path / "model.safetensors")
    assert converted.keys() == compvis.keys() and all(
        torch.equal(converted[k], compvis[k]) for k in compvis
    )
    # single file -> diffusers folder, which diffusers loads
    assert (
        main(
            [
                "convert",
                str(tmp_path / "model.safetensors"),
                str(tmp_path / "unet"),
                "--config",
                "tiny-sd2",
            ]
        )
        == 0
    )
    x, t, context = inputs(config)
    with torch.no_grad():
        out = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()(x, t, context).sample
        torch.testing.assert_close(out, reference(x, t, context).sample, rtol=0, atol=1e-5)
    # folder -> single file: the original tensors again
    assert main(["convert", str(tmp_path / "unet"), str(tmp_path / "back.safetensors")]) == 0
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == compvis.keys() and all(torch.equal(back[k], compvis[k]) for k in compvis)
    # nothing is ever overwritten
    assert main(["convert", str(tmp_path / "unet"), str(tmp_path / "back.safetensors")]) == 2
    assert "exists; choose a new file name" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a folder that is not empty"):
        convert(tmp_path / "model.safetensors", tmp_path / "unet", config="tiny-sd2")
