"""The pipeline against diffusers' StableDiffusionPipeline on tiny components, and `ldm generate`."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ldm import images as imaging
from ldm.cli import main
from ldm.pipeline import LatentDiffusionPipeline

PROMPT, NEGATIVE = "a large red circle in the center on a blue background", "a green square"
ONE_LEVEL = 1 / 255 + 1e-6


def latents_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_images_equal_diffusers_pipeline(tiny_sd_dir, tiny_pipe):
    # the folder names DDIMScheduler; the other samplers: tests/test_sigma_samplers.py
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    latents = latents_for(2)
    common = dict(
        negative_prompt=[NEGATIVE] * 2, num_inference_steps=10, guidance_scale=7.5, output_type="np"
    )
    expected = reference([PROMPT, "a small black triangle"], latents=latents, **common).images
    ours = tiny_pipe(
        [PROMPT, "a small black triangle"],
        latents=latents,
        sampler="ddim",
        progress=False,
        **common,
    )
    assert ours.images.shape == expected.shape == (2, 32, 32, 3)
    assert expected.std() > 0.05  # a real image, not a constant
    np.testing.assert_allclose(ours.images, expected, rtol=0, atol=ONE_LEVEL)


def test_saved_folder_loads_in_diffusers_and_reproduces_our_image(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "ours")
    reference = StableDiffusionPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    latents = latents_for(1, seed=3)
    common = dict(num_inference_steps=10, guidance_scale=7.5, output_type="np")
    ours = tiny_pipe(PROMPT, latents=latents, sampler="ddim", progress=False, **common).images
    np.testing.assert_allclose(  # the saved folder names DDIMScheduler
        reference(PROMPT, latents=latents, **common).images, ours, rtol=0, atol=ONE_LEVEL
    )
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "ours")
    np.testing.assert_array_equal(
        again(PROMPT, latents=latents, sampler="ddim", progress=False, **common).images, ours
    )


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_image_and_each_image_reproduces_alone(tiny_pipe, sampler):
    common = dict(
        num_inference_steps=8,
        sampler=sampler,
        eta=1.0 if sampler == "ddim" else 0.0,
        output_type="np",
        progress=False,
    )
    batch = tiny_pipe(PROMPT, num_images_per_prompt=4, seed=100, **common)
    assert batch.seeds == [100, 101, 102, 103]
    assert [p["seed"] for p in batch.parameters] == batch.seeds
    np.testing.assert_array_equal(
        tiny_pipe(PROMPT, num_images_per_prompt=4, seed=100, **common).images, batch.images
    )
    for k in (0, 2):
        alone = tiny_pipe(PROMPT, seed=batch.seeds[k], **common)
        np.testing.assert_allclose(alone.images[0], batch.images[k], rtol=0, atol=ONE_LEVEL)
    assert np.abs(batch.images[0] - batch.images[1]).max() > 0.05  # different seeds differ
    drawn = tiny_pipe(PROMPT, **common)
    assert isinstance(drawn.seeds[0], int)  # no seed given: one is drawn and recorded
    np.testing.assert_array_equal(
        tiny_pipe(PROMPT, seed=drawn.seeds[0], **common).images, drawn.images
    )


def test_output_types(tiny_pipe):
    common = dict(num_inference_steps=2, seed=0, progress=False)
    pil = tiny_pipe(PROMPT, **common).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    pt = tiny_pipe(PROMPT, output_type="pt", **common).images
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    latent = tiny_pipe(PROMPT, output_type="latent", **common).images
    assert latent.shape == (1, 4, 16, 16)
    np.testing.assert_allclose(
        np.asarray(pil[0]) / 255, pt[0].permute(1, 2, 0).numpy(), atol=ONE_LEVEL
    )
    wide = tiny_pipe(PROMPT, height=16, width=48, output_type="np", **common).images
    assert wide.shape == (1, 16, 48, 3)


def test_img2img_at_strength_zero_returns_the_input_through_the_vae(tiny_pipe):
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    result = tiny_pipe.img2img(
        PROMPT,
        image,
        strength=0.0,
        num_inference_steps=10,
        seed=1,
        output_type="np",
        progress=False,
    )
    round_trip = imaging.to_numpy(tiny_pipe.vae.decode(tiny_pipe.encode_images(image)))
    np.testing.assert_allclose(result.images, round_trip, rtol=0, atol=1e-6)
    assert result.parameters[0]["strength"] == 0.0
    changed = tiny_pipe.img2img(
        PROMPT,
        image,
        strength=0.6,
        num_inference_steps=10,
        seed=1,
        output_type="np",
        progress=False,
    )
    assert np.abs(changed.images - round_trip).mean() > 1e-3


@pytest.mark.slow
def test_ddim_inversion_reconstructs_the_latents(tiny_pipe):
    # Plain inversion evaluates eps at the lower-noise sample it has, a first-order
    # approximation that is fine for a trained denoiser (tests/test_sampling.py: 2% error at
    # 50 steps with the exact Gaussian model) but not for this random U-Net, whose eps jumps
    # with x: measured relative RMS error 2.5 at 200 steps. Fixed-point iterations solve each
    # implicit step; with 3 of them the error was 0.0013 (0.058 at 50 steps). So: the solved
    # inversion must reconstruct the latents to 1%, and iterating must help by 100x.
    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    x0 = tiny_pipe.encode_images(image)
    errors = []
    for iters in (0, 3):
        x_T = tiny_pipe.invert(
            PROMPT, image, num_inference_steps=200, fixed_point_iters=iters, progress=False
        )
        back = tiny_pipe(
            PROMPT,
            latents=x_T,
            sampler="ddim",
            guidance_scale=1.0,
            num_inference_steps=200,
            output_type="latent",
            progress=False,
        ).images
        errors.append(((back - x0).pow(2).mean().sqrt() / x0.pow(2).mean().sqrt()).item())
    assert errors[1] < 0.01 and errors[1] < errors[0] / 100, errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(height=31), "height=31 must be a positive multiple of 2"),
        (dict(width=17), "width=17 must be a positive multiple of 2"),
        (dict(height=0), "height=0 must be a positive multiple of 2"),  # not the default size
        (dict(seed=-1), r"seed -1 is not allowed; use 0 <= seed < 2\*\*63"),
        (dict(seed=2**63), "is not allowed; use 0 <= seed"),
        (
            dict(num_inference_steps=0),
            "num_inference_steps must be an integer from 1 to 1000, got 0",
        ),
        (dict(num_inference_steps=1001), "got 1001"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
        (dict(guidance_scale=float("nan")), "got nan"),
        (
            dict(prompt=[PROMPT, PROMPT], negative_prompt=["a", "b", "c"]),
            "negative_prompt has 3 entries but prompt has 2",
        ),
        (dict(prompt=[]), "prompt is an empty list"),
        (dict(seed=[1, 2]), "got 2 seeds for 1 images"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "got 2 generators for 1 images"),
        (dict(sampler="euler b"), "unknown sampler 'euler b'; allowed: ddim, ddpm, euler, "),
        (dict(output_type="jpg"), "unknown output_type 'jpg'"),
        (
            dict(latents=torch.zeros(1, 4, 8, 8)),
            r"latents have shape \(1, 4, 8, 8\); expected \(1, 4, 16, 16\)",
        ),
    ],
)
def test_bad_inputs_raise_errors_that_name_the_value(tiny_pipe, kwargs, message):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "progress": False} | kwargs
    with pytest.raises(ValueError, match=message):
        tiny_pipe(kwargs.pop("prompt"), **kwargs)


def test_img2img_bad_strength_and_non_finite_output(tiny_pipe):
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"strength must be in \\[0, 1\\], got {strength}"):
            tiny_pipe.img2img(PROMPT, image, strength=strength, num_inference_steps=2)
    nan_latents = torch.full((1, 4, 16, 16), float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        tiny_pipe(PROMPT, latents=nan_latents, num_inference_steps=2, progress=False)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks vae/, text_encoder/, tokenizer/"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "half")


# ----------------------------------------------------------------------------- ldm generate


def test_parameters_text_round_trip_and_png_chunks(tmp_path):
    record = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 7, "sampler": "ddim", "sigmas": None, "steps": 20,
              "guidance_scale": 7.5, "eta": 0.0, "width": 64, "height": 32, "strength": 0.6, "model": "tiny"}  # fmt: skip
    text = imaging.format_parameters(record)
    assert text == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 64x32, Model: tiny, Denoising strength: 0.6"
    )
    assert imaging.parse_parameters(text) == record
    karras = record | {"sampler": "dpmpp_2m", "sigmas": "karras"}
    karras_text = imaging.format_parameters(karras)
    assert "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5" in karras_text
    assert imaging.parse_parameters(karras_text) == karras
    old_a1111 = karras_text.replace(
        "Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: DPM++ 2M Karras"
    )
    assert imaging.parse_parameters(old_a1111)["sampler"] == "DPM++ 2M Karras"  # resolved later
    image = Image.new("RGB", (4, 4))
    imaging.save_png(image, tmp_path / "latin.png", text)
    unicode_text = imaging.format_parameters(
        record | {"prompt": "un cercle rouge \u2014 \u7ea2\u8272\u7684\u5706"}
    )
    imaging.save_png(image, tmp_path / "unicode.png", unicode_text)
    assert imaging.read_parameters(tmp_path / "latin.png") == text
    assert imaging.read_parameters(tmp_path / "unicode.png") == unicode_text
    assert b"tEXtparameters" in (tmp_path / "latin.png").read_bytes()
    assert b"iTXtparameters" in (tmp_path / "unicode.png").read_bytes()
    with pytest.raises(FileExistsError):
        imaging.save_png(image, tmp_path / "latin.png", text)


def test_generate_command_writes_pngs_manifest_and_never_overwrites(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "generate",
        PROMPT,
        "--model",
        str(tiny_sd_dir),
        "--steps",
        "4",
        "--seed",
        "5",
        "--n",
        "2",
        "--out",
        str(out),
    ]
    args += ["--negative-prompt", NEGATIVE]
    assert main([*args, "--grid"]) == 0
    assert main(args) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00000-5.png", "00001-6.png", "00002-grid.png", "00003-5.png", "00004-6.png"]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["file"] for m in manifest] == [
        "00000-5.png",
        "00001-6.png",
        "00003-5.png",
        "00004-6.png",
    ]
    assert manifest[0] | {"file": None} == {
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 5, "sampler": "euler", "sigmas": "karras", "steps": 4, "guidance_scale": 7.5,
        "eta": 0.0, "width": 32, "height": 32, "strength": None, "init_image": None, "init_sha256": None, "loras": None, "model": tiny_sd_dir.name, "file": None,
    }  # fmt: skip
    settings = imaging.parse_parameters(imaging.read_parameters(out / "00001-6.png"))
    assert (
        settings["seed"] == 6 and settings["negative_prompt"] == NEGATIVE and settings["steps"] == 4
    )
    # the same seed gives the same pixels, and --from-png reproduces an image from its settings alone
    assert np.array_equal(
        np.asarray(Image.open(out / "00000-5.png")), np.asarray(Image.open(out / "00003-5.png"))
    )
    assert (
        main(
            [
                "generate",
                "--from-png",
                str(out / "00001-6.png"),
                "--model",
                str(tiny_sd_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    newest = max(out.glob("*-6.png"))
    assert np.array_equal(
        np.asarray(Image.open(newest)), np.asarray(Image.open(out / "00001-6.png"))
    )
    assert Image.open(out / "00002-grid.png").size == (64, 32)


def test_generate_from_file_and_init_image(tiny_sd_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    Image.new("RGB", (40, 36), (20, 200, 30)).save(tmp_path / "init.png")
    out = tmp_path / "out"
    common = ["--model", str(tiny_sd_dir), "--steps", "4", "--seed", "0", "--out", str(out)]
    assert main(["generate", "--from-file", str(prompts), *common]) == 0
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--init-image",
                str(tmp_path / "init.png"),
                "--strength",
                "0.5",
                *common,
            ]
        )
        == 0
    )
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == ["a red circle", "a blue square", "a red circle"]
    assert [m["seed"] for m in manifest] == [0, 1, 0]
    assert manifest[2]["strength"] == 0.5 and manifest[2]["init_image"].endswith("init.png")
    assert (manifest[2]["width"], manifest[2]["height"]) == (40, 36)  # the init image's size
    assert "Denoising strength: 0.5" in imaging.read_parameters(out / manifest[2]["file"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps 0 is not allowed; use an integer >= 1"),
        (["--steps", "1001"], "--steps 1001 is not allowed; use 1 to 1000"),
        (["--height", "31"], "--height 31 is not allowed; use a positive multiple of 2"),
        (["--guidance-scale", "-2"], "--guidance-scale -2.0 is not allowed"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--from-file", "missing.txt"], "--from-file missing.txt: no such file"),
    ],
)
def test_generate_bad_arguments_exit_nonzero_with_a_message(
    tiny_sd_dir, tmp_path, capsys, args, message
):
    assert (
        main(["generate", PROMPT, "--model", str(tiny_sd_dir), "--out", str(tmp_path), *args]) == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # not even the --out folder's files


def test_generate_without_a_model_uses_the_shipped_one(tmp_path, monkeypatch, capsys):
    import ldm.pipeline.folder

    monkeypatch.setattr(ldm.pipeline.folder, "DEFAULT_MODEL", tmp_path / "not-installed")
    assert main(["generate", PROMPT, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not-installed" in err and "pass --model PATH" in err
