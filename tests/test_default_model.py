"""The default model: the whole recipe at a tiny size (it runs, resumes, and evaluates), and the
model shipped in the package (it loads with no path and draws what the prompt says)."""

import json

import pytest
import torch

from ldm.config import DEFAULT_MODEL
from ldm.pipeline import LatentDiffusionPipeline
from ldm.shapes.detector import EvalSetting, evaluate
from ldm.testing import write_recipe_configs
from ldm.training.default_model import (
    evaluate_checkpoints,
    load_checkpoint_ema,
    ship,
    train_default,
)


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    configs = write_recipe_configs(root / "configs")
    model = train_default(root / "run", configs=configs, n_train=24, n_heldout=8, n_eval=4)
    return root, configs, model


def test_the_recipe_runs_every_stage_and_records_its_times(tiny_recipe):
    root, _, model = tiny_recipe
    run = root / "run"
    times = json.loads((run / "times.json").read_text())
    assert list(times) == ["data", "vae", "clip", "unet", "eval"]
    assert all(seconds > 0 for seconds in times.values())
    results = json.loads((run / "eval" / "shapes" / "results.json").read_text())
    accuracy = results["ddim 50 steps, guidance 7.5"]
    assert set(accuracy) == {"shape", "color", "size", "position", "background", "all"}
    assert all(0 <= v <= 1 for v in accuracy.values())
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    assert pipe.vae.downscale_factor == 4 and pipe.text_encoder.max_length == 32
    vae_config = json.loads((run / "vae" / "vae" / "config.json").read_text())
    report = json.loads((run / "vae" / "report.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(report["scaling_factor"])
    assert report["heldout_psnr_db"] > 0


def test_running_the_recipe_again_skips_finished_stages(tiny_recipe):
    root, configs, model = tiny_recipe
    before = (root / "run" / "times.json").read_text()
    weights = (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert train_default(root / "run", configs=configs, n_train=24, n_eval=4) == model
    assert (root / "run" / "times.json").read_text() == before
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_checkpoints_are_scored_with_their_ema_weights(tiny_recipe):
    root, _, model = tiny_recipe
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    exported = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    load_checkpoint_ema(pipe, root / "run" / "unet" / "checkpoints" / "checkpoint-2")
    assert any(not torch.equal(v, exported[k]) for k, v in pipe.unet.state_dict().items())
    load_checkpoint_ema(pipe, root / "run" / "unet" / "checkpoints" / "checkpoint-3")
    for k, v in pipe.unet.state_dict().items():  # the export is the last EMA
        torch.testing.assert_close(v, exported[k], rtol=0, atol=0, msg=k)
    results = evaluate_checkpoints(root / "run", n=4)
    assert list(results) == [2, 3]
    final = json.loads((root / "run" / "eval" / "shapes" / "results.json").read_text())
    assert results[3] == final["ddim 50 steps, guidance 7.5"]


def test_missing_recipe_configs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks vae\.yaml, clip\.yaml"):
        train_default(tmp_path / "run", configs=tmp_path)


def test_ship_stores_the_unet_in_float16_and_loads_it_back(tiny_recipe, tmp_path):
    _, _, model = tiny_recipe
    shipped = ship(model, tmp_path / "shipped")
    original = LatentDiffusionPipeline.from_pretrained(model)
    loaded = LatentDiffusionPipeline.from_pretrained(shipped)
    assert loaded.dtype == torch.float32
    for (name, p), q in zip(
        original.unet.state_dict().items(), loaded.unet.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(q, p.half().float(), rtol=0, atol=0, msg=name)
    size = (shipped / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 0.6 * (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size


# ---------------------------------------------------------------------- the shipped model

needs_shipped = pytest.mark.skipif(
    not DEFAULT_MODEL.is_dir(), reason="the default model is not shipped in this checkout"
)


@needs_shipped
def test_shipped_model_fits_the_size_budget():
    total = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, total


@needs_shipped
def test_shipped_model_loads_with_no_path_and_follows_prompts():
    pipe = LatentDiffusionPipeline.from_pretrained()
    assert pipe.name == "shapes"
    settings = [EvalSetting("ddim", 20, 7.5)]
    accuracy = evaluate(pipe, n=16, settings=settings, batch_size=16)["ddim 20 steps, guidance 7.5"]
    # held-out combinations; the full evaluation (docs/default_model.md) uses 200 images
    assert accuracy["all"] >= 0.5, accuracy
    assert min(accuracy[a] for a in ("shape", "color", "background")) >= 0.75, accuracy


@needs_shipped
def test_ldm_generate_uses_the_shipped_model_with_no_model_flag(tmp_path):
    from PIL import Image

    from ldm.cli import main
    from ldm.shapes.detector import detect

    prompt = "a large red circle in the center on a blue background"
    assert main(["generate", prompt, "--out", str(tmp_path), "--seed", "0"]) == 0
    (png,) = tmp_path.glob("*.png")
    found = detect(Image.open(png))
    assert (found.color, found.background) == ("red", "blue"), found
