"""`ldm eval` figures on generated data: closed forms, a perfect model, determinism."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ldm.config import DataConfig
from ldm.data.icon_theme import caption_from_name, make_icon_dataset
from ldm.data.metrics import evaluate_on_data, format_results, load_pixels, rms_distances


def colour_folder(folder, n=24, size=32):
    """n solid-colour images with distinct captions."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        rgb = tuple(torch.randint(0, 256, (3,), generator=generator).tolist())
        Image.new("RGB", (size, size), rgb).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"colour number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(str(folder), resolution=size)


def test_rms_distance_closed_forms():
    black, white = -torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    half = torch.cat([black[..., :2], white[..., 2:]], dim=-1)  # half the pixels differ by 1
    d = rms_distances(torch.cat([black, half]), torch.cat([black, white]))
    torch.testing.assert_close(d, torch.tensor([[0.0, 1.0], [0.5**0.5, 0.5**0.5]]))


class PerfectPipe:
    """Returns each caption's own image: every figure is at its best."""

    name = "perfect"

    def __init__(self, vae, images):
        self.vae, self.images = vae, images

    def __call__(self, prompts, **kwargs):
        return SimpleNamespace(images=torch.stack([self.images[p] for p in prompts]))


def test_a_model_that_draws_each_caption_s_own_image_scores_perfectly(tiny_pipe, tmp_path):
    data = colour_folder(tmp_path / "data")
    pixels, captions = load_pixels(data)
    own = {c: (x + 1) / 2 for c, x in zip(captions, pixels, strict=True)}  # [0, 1], as "pt"
    results = evaluate_on_data(PerfectPipe(tiny_pipe.vae, own), data, n=10, out_dir=tmp_path / "e")
    assert results["n"] == 10 and results["own_rms"] < 1e-6 and results["nearest_rms"] < 1e-6
    assert results["nearer_than_distractors"] == 1.0 and results["nearest_is_own"] == 1.0
    assert results["chance"] == 1 / 20
    assert json.loads((tmp_path / "e" / "results.json").read_text()) == results
    # 10 images: one whole row of 8 pairs, each own image above its generated one
    assert Image.open(tmp_path / "e" / "grid.png").size == (8 * 32, 2 * 32)
    assert "nearer its own image than 19 random others: 100.0%" in format_results(results)


def test_evaluation_of_a_real_pipeline_is_deterministic_and_consistent(tiny_pipe, tmp_path):
    data = colour_folder(tmp_path / "data")
    kwargs = {"n": 6, "num_inference_steps": 3, "guidance_scale": 2.0}
    first = evaluate_on_data(tiny_pipe, data, **kwargs)
    assert evaluate_on_data(tiny_pipe, data, **kwargs) == first and first["sampler"] == "ddim"
    # own_rms is the distance to the captions' own images, recomputed directly
    pixels, captions = load_pixels(data)
    chosen = torch.randperm(24, generator=torch.Generator().manual_seed(0))[:6].sort().values
    generated = tiny_pipe(
        [captions[i] for i in chosen],
        sampler="ddim",  # evaluate_on_data's, whatever the generation default
        num_inference_steps=3,
        guidance_scale=2.0,
        seed=[0] * 6,
        output_type="pt",
        progress=False,
    ).images
    direct = rms_distances(generated * 2 - 1, pixels[chosen]).diagonal().mean().item()
    assert first["own_rms"] == pytest.approx(direct, abs=1e-5)
    assert first["nearest_rms"] <= first["own_rms"] and 0 <= first["nearer_than_distractors"] <= 1
    with pytest.raises(ValueError, match="distractors=30"):
        evaluate_on_data(tiny_pipe, data, distractors=30)


def test_icon_theme_dataset_has_captions_from_names_and_a_seeded_split(tmp_path):
    theme = tmp_path / "theme"
    names = {"apps": ["media-playback-start", "accessories-calculator"], "places": []}
    names["places"] = [f"folder-{c}" for c in ("blue", "red", "green", "documents")]
    names["places"].append("media-playback-start")  # the same name again: kept once
    for context, files in names.items():
        (theme / "base" / "64x64" / context).mkdir(parents=True)
        for name in files:
            Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(
                theme / "base" / "64x64" / context / f"{name}.png"
            )
    assert caption_from_name("media-playback-start.png") == "media playback start"
    counts = make_icon_dataset(
        theme, tmp_path / "a", contexts=("apps", "places"), heldout_fraction=0.2
    )
    assert counts == {"train": 5, "heldout": 1}  # 6 distinct captions
    rows = [
        json.loads(line)
        for split in ("train", "heldout")
        for line in (tmp_path / "a" / split / "metadata.jsonl").open()
    ]
    assert sorted(r["text"] for r in rows) == sorted(
        ["media playback start", "accessories calculator"]
        + [f"folder {c}" for c in ("blue", "red", "green", "documents")]
    )
    assert next(r for r in rows if r["text"] == "media playback start")["file_name"].startswith(
        "apps-"
    )
    make_icon_dataset(theme, tmp_path / "b", contexts=("apps", "places"), heldout_fraction=0.2)
    for split in ("train", "heldout"):
        a, b = (tmp_path / d / split / "metadata.jsonl" for d in "ab")
        assert a.read_text() == b.read_text()
    with pytest.raises(FileNotFoundError, match=r"no 48x48 folder .* it has 64x64"):
        make_icon_dataset(theme, tmp_path / "c", size=48)
    with pytest.raises(FileNotFoundError, match="no context folder status"):
        make_icon_dataset(theme, tmp_path / "c", contexts=("status",))
