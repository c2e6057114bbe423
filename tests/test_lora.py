"""LoRA loading against diffusers' `load_lora_weights` on tiny components: diffusers/peft
and kohya files, scales, several adapters, fuse/unfuse, and bad files."""

import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm import images as imaging
from ldm.cli import main
from ldm.pipeline import LatentDiffusionPipeline
from ldm.pipeline.request import GenerateRequest, parse_lora_flag

PROMPT = "a large red circle in the center on a blue background"
ONE_LEVEL = 1 / 255 + 1e-6
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(sd_dir, folder, seed, *, text_encoder=False, rank=4):
    """A LoRA made as diffusers' training scripts make it (peft on diffusers' parts, random A
    and B so that it is not a no-op), written with `save_lora_weights`; returns the file."""
    reference = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False)
    reference.unet.add_adapter(LoraConfig(**config.to_dict() | {"target_modules": UNET_TARGETS}))
    layers = {"unet_lora_layers": get_peft_model_state_dict(reference.unet)}
    if text_encoder:
        targets = {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}
        inject_adapter_in_model(LoraConfig(**config.to_dict() | targets), reference.text_encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(reference.text_encoder)
    StableDiffusionPipeline.save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors", reference


def diffusers_pipe(sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def theirs(pipe):
    return pipe(PROMPT, latents=latents(), num_inference_steps=4, output_type="np").images


def ours(pipe):
    kwargs = dict(num_inference_steps=4, sampler="ddim", output_type="np", progress=False)
    return pipe(PROMPT, latents=latents(), **kwargs).images


@pytest.fixture(scope="module")
def lora_file(tiny_sd_dir, tmp_path_factory):
    return make_lora(tiny_sd_dir, tmp_path_factory.mktemp("lora"), seed=1)[0]


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_shared_lora_gives_diffusers_images(tiny_sd_dir, lora_file, tmp_path, layout, scale):
    path = lora_file
    if layout == "kohya":
        kohya = convert_state_dict_to_kohya(load_file(lora_file))
        assert any(k.endswith(".alpha") for k in kohya) and all(
            k.startswith("lora_unet_") for k in kohya
        )
        save_file(kohya, tmp_path / "kohya.safetensors")
        path = tmp_path / "kohya.safetensors"
    reference = diffusers_pipe(tiny_sd_dir)
    reference.load_lora_weights(path, adapter_name="style")
    reference.set_adapters(["style"], [scale])
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = ours(pipe)
    assert pipe.load_lora(path, scale=scale) == path.stem.replace(".", "_")
    after = ours(pipe)
    assert np.abs(after - before).max() > 20 / 255  # the LoRA changes the image
    np.testing.assert_allclose(after, theirs(reference), rtol=0, atol=ONE_LEVEL)


def test_two_adapters_add_up_with_their_own_scales(tiny_sd_dir, lora_file, tmp_path):
    second, _ = make_lora(tiny_sd_dir, tmp_path, seed=2, rank=2)
    reference = diffusers_pipe(tiny_sd_dir)
    reference.load_lora_weights(lora_file, adapter_name="a")
    reference.load_lora_weights(second, adapter_name="b")
    reference.set_adapters(["a", "b"], [0.7, -0.4])
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora(lora_file, name="a")
    pipe.load_lora(second, scale=-0.4, name="b")
    pipe.set_lora_scale("a", 0.7)
    assert pipe.lora_scales == {"a": 0.7, "b": -0.4}
    np.testing.assert_allclose(ours(pipe), theirs(reference), rtol=0, atol=ONE_LEVEL)
    pipe.unload_lora("b")
    only_a = diffusers_pipe(tiny_sd_dir)
    only_a.load_lora_weights(lora_file, adapter_name="a")
    only_a.set_adapters(["a"], [0.7])
    np.testing.assert_allclose(ours(pipe), theirs(only_a), rtol=0, atol=ONE_LEVEL)


def test_a_text_encoder_lora_acts_as_the_peft_model_that_made_it(tiny_sd_dir, tmp_path):
    # diffusers 0.42 loads text-encoder LoRAs through transformers' peft integration, which
    # transformers 5.24 refuses with peft 0.21 (the newest on the index): the reference here
    # is the pipeline the LoRA was made in, its U-Net and text encoder wrapped by peft
    path, maker = make_lora(tiny_sd_dir, tmp_path, seed=3, text_encoder=True)
    assert any(k.startswith("text_encoder.") for k in load_file(path))
    maker.set_progress_bar_config(disable=True)
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora(path)
    tokens = pipe.text_encoder.tokenizer([PROMPT], padding="max_length", return_tensors="pt")
    expected = maker.text_encoder(tokens.input_ids).last_hidden_state
    torch.testing.assert_close(pipe.text_encoder([PROMPT]), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours(pipe), theirs(maker), rtol=0, atol=ONE_LEVEL)


def test_text_encoder_keys_of_either_transformers_load_alike(tiny_sd_dir, tmp_path):
    """Shared SD 1.x files name the text encoder's modules ``text_model.encoder...`` (as
    transformers 4 did); transformers 5's CLIPTextModel has no ``text_model`` level. Both
    spellings of one LoRA, in diffusers' and kohya's layouts, give the same images."""
    path, _ = make_lora(tiny_sd_dir, tmp_path, seed=3, text_encoder=True)
    state = load_file(path)
    shared = {
        k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in state.items()
    }
    save_file(shared, tmp_path / "shared.safetensors")
    save_file(convert_state_dict_to_kohya(shared), tmp_path / "kohya.safetensors")
    assert any(
        k.startswith("lora_te1_text_model_") for k in load_file(tmp_path / "kohya.safetensors")
    )
    images = []
    for file in (path, tmp_path / "shared.safetensors", tmp_path / "kohya.safetensors"):
        pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
        pipe.load_lora(file)
        images.append(ours(pipe))
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(images[2], images[0], rtol=0, atol=ONE_LEVEL)


def test_fuse_then_unfuse_returns_the_original_weights(tiny_sd_dir, lora_file):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    name = pipe.load_lora(lora_file, scale=0.8)
    unfused = ours(pipe)
    pipe.fuse_lora()
    np.testing.assert_allclose(ours(pipe), unfused, rtol=0, atol=ONE_LEVEL)
    with pytest.raises(ValueError, match="fused into the weights; unfuse_lora"):
        pipe.set_lora_scale(name, 0.3)  # unfusing would then subtract another delta
    pipe.unfuse_lora()
    pipe.unload_lora()
    restored = pipe.unet.state_dict()
    assert restored.keys() == original.keys() and pipe.lora_scales == {}
    assert max((restored[k] - v).abs().max().item() for k, v in original.items()) <= 1e-6
    # fused, then unloaded: the LoRA stays in the weights, and the folder saves
    pipe.load_lora(lora_file, scale=0.8)
    with pytest.raises(ValueError, match="LoRA adapters are loaded"):
        pipe.save_pretrained("unused")
    pipe.fuse_lora()
    pipe.unload_lora()
    np.testing.assert_allclose(ours(pipe), unfused, rtol=0, atol=ONE_LEVEL)


def test_bad_lora_files_are_refused_with_the_file_and_the_reason(tiny_sd_dir, lora_file, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = ours(pipe)
    data = lora_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    state = load_file(lora_file)
    renamed = {k.replace("attn1.to_q", "attn1.to_query"): v for k, v in state.items()}
    save_file(renamed, tmp_path / "keys.safetensors")
    # a LoRA for a wider model: lora_A takes more input features than to_q has
    wider = {
        k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in state.items()
    }
    save_file(wider, tmp_path / "shape.safetensors")
    save_file({"text_encoder_2.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "sdxl.safetensors")
    save_file({k: v for k, v in state.items() if "lora_A" in k}, tmp_path / "noup.safetensors")
    cases = {
        "cut": "is truncated",
        "keys": "LoRA modules match nothing in the unet .first: down_blocks.*to_query",
        "shape": "do not fit its weight",
        "sdxl": "keys belong to no part",
        "noup": "the unet keys hold no lora_B .up. weights: not a LoRA",
    }
    for stem, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            pipe.load_lora(tmp_path / f"{stem}.safetensors")
        assert f"{stem}.safetensors" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="no LoRA file at"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no LoRA named 'x' is loaded; loaded: none"):
        pipe.set_lora_scale("x", 1.0)
    assert pipe.lora_scales == {}
    np.testing.assert_array_equal(ours(pipe), before)  # nothing was changed on the way


def addnet_hash(path):
    """A1111's LoRA hash, written out again: SHA-256 of the bytes after the header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]


def test_generate_records_the_lora_as_a1111_does_and_from_png_restores_it(
    tiny_sd_dir, lora_file, tmp_path
):
    lora = tmp_path / "my, style.safetensors"  # a name A1111 strips of ',' and ':'
    lora.write_bytes(lora_file.read_bytes())
    args = ["generate", PROMPT, "--model", str(tiny_sd_dir), "--steps", "4", "--seed", "5"]
    args += ["--sampler", "ddim", "--out", str(tmp_path / "a")]
    assert main([*args, "--lora", f"{lora}:0.5"]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    text = imaging.read_parameters(png)
    assert f'Lora hashes: "my style: {addnet_hash(lora)}"' in text
    manifest = json.loads((tmp_path / "a" / "manifest.jsonl").read_text())
    assert manifest["loras"][0] | {"hash": None} == {
        "name": "my style", "path": str(lora), "scale": 0.5, "hash": None
    }  # fmt: skip
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    kwargs = dict(num_inference_steps=4, sampler="ddim", seed=5, output_type="np", progress=False)
    plain = pipe(PROMPT, **kwargs).images[0]
    pipe.load_lora(lora, scale=0.5)
    expected = (pipe(PROMPT, **kwargs).images[0] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), expected)
    assert np.abs(expected / 255 - plain).max() > 20 / 255
    again = ["generate", "--from-png", str(png), "--model", str(tiny_sd_dir)]
    assert main([*again, "--out", str(tmp_path / "b")]) == 0
    (png_again,) = (tmp_path / "b").glob("*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(png_again)), expected)
    state = load_file(lora)
    save_file({k: v * 1.01 for k, v in state.items()}, lora)
    with pytest.raises(ValueError, match=r"made with the LoRA my style .* has changed; pass it"):
        GenerateRequest.from_png(png)
    lora.unlink()
    with pytest.raises(ValueError, match="is missing; pass it with --lora"):
        GenerateRequest.from_png(png)
    restored = GenerateRequest.from_png(png, loras=[(str(lora_file), 0.5)])
    assert restored.loras == [(str(lora_file), 0.5)]
    # two files of one name from two folders: both apply, as one file at the scales' sum
    (tmp_path / "x").mkdir()
    twin = tmp_path / "x" / lora_file.name
    twin.write_bytes(lora_file.read_bytes())
    flags = ["--lora", f"{lora_file}:0.25", "--lora", f"{twin}:0.25", "--out", str(tmp_path / "c")]
    assert main([*args[:-2], *flags]) == 0
    (png_twins,) = (tmp_path / "c").glob("*.png")
    np.testing.assert_allclose(np.asarray(Image.open(png_twins)), expected, rtol=0, atol=1)


def test_lora_flags_and_a1111_infotext():
    assert parse_lora_flag("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_flag("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_flag("a:b/style.safetensors") == ("a:b/style.safetensors", 1.0)
    assert parse_lora_flag("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    with pytest.raises(ValueError, match="the scale after the last ':' must be a number"):
        parse_lora_flag("style.safetensors:strong")
    a1111 = (
        "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
        'Size: 512x512, Model: sd15, Lora hashes: "add_detail: 7c6bad76eb54, more: 3b8aa1d351ef"'
    )
    record = imaging.parse_parameters(a1111)
    assert record["loras"] == [
        {"name": "add_detail", "hash": "7c6bad76eb54", "path": None, "scale": 1.0},
        {"name": "more", "hash": "3b8aa1d351ef", "path": None, "scale": 1.0},
    ]
