"""The shapes detector reads ground truth right, and `evaluate` scores what a model draws."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ldm.shapes.detector import Detection, EvalSetting, Scores, detect, evaluate, format_table
from ldm.shapes.world import COLORS, ShapeSpec, render, sample_specs


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_detector_reads_every_attribute_of_ground_truth(split):
    specs = sample_specs(400, seed=11, split=split)
    scores = Scores()
    for spec in specs:
        scores.add(spec, detect(render(spec)))
    assert scores.n == 400
    assert scores.accuracy["all"] >= 0.99, scores.accuracy


def test_detector_survives_pixel_noise():
    rng = np.random.default_rng(0)
    specs = sample_specs(200, seed=12)
    scores = Scores()
    for spec in specs:
        noisy = np.asarray(render(spec)).astype(float) + rng.normal(0, 8, (64, 64, 3))
        scores.add(spec, detect(np.clip(noisy, 0, 255).astype(np.uint8)))
    assert scores.accuracy["all"] >= 0.99, scores.accuracy


def test_detector_on_a_plain_image_finds_no_shape():
    found = detect(Image.new("RGB", (64, 64), COLORS["green"]))
    assert found == Detection("green")
    spec = ShapeSpec("circle", "red", "small", "in the center", "blue")
    scores = Scores()
    scores.add(spec, found)
    assert scores.accuracy == {
        "shape": 0.0,
        "color": 0.0,
        "size": 0.0,
        "position": 0.0,
        "background": 0.0,
        "all": 0.0,
    }


def test_detector_ignores_a_stray_blob():
    spec = ShapeSpec("triangle", "orange", "large", "on the right", "white")
    rgb = np.array(render(spec))
    rgb[5:8, 5:8] = COLORS["orange"]  # a 3x3 speck far from the shape
    found = detect(rgb)
    assert (found.shape, found.position, found.size) == ("triangle", "on the right", "large")


class _FakePipeline:
    """Draws the prompt's spec (right) or the same spec in another colour (wrong colour)."""

    def __init__(self, specs, wrong_color=False):
        self.by_caption = {s.caption(): s for s in specs}
        self.wrong_color = wrong_color
        self.calls = []

    def __call__(self, prompts, **kwargs):
        self.calls.append(kwargs)
        specs = [self.by_caption[p] for p in prompts]
        if self.wrong_color:
            specs = [
                ShapeSpec(
                    s.shape,
                    next(c for c in COLORS if c not in (s.color, s.background)),
                    s.size,
                    s.position,
                    s.background,
                )
                for s in specs
            ]
        return SimpleNamespace(images=[render(s) for s in specs])


def test_evaluate_scores_a_perfect_and_a_colour_blind_model(tmp_path):
    specs = sample_specs(30, seed=0, split="heldout")
    settings = [EvalSetting("ddim", 10, 1.0), EvalSetting("ddpm", 1000, 7.5)]
    perfect = _FakePipeline(specs)
    results = evaluate(perfect, n=30, settings=settings, batch_size=8, out_dir=tmp_path)
    assert results["ddim 10 steps, guidance 1"]["all"] == 1.0
    assert results["ddpm 1000 steps, guidance 7.5"]["all"] == 1.0
    assert perfect.calls[0]["sampler"] == "ddim" and perfect.calls[0]["num_inference_steps"] == 10
    assert perfect.calls[-1]["guidance_scale"] == 7.5 and len(perfect.calls) == 8
    assert (tmp_path / "results.json").is_file()
    assert Image.open(tmp_path / "ddim_10_steps_guidance_1.png").size == (8 * 64, 4 * 64)

    blind = evaluate(_FakePipeline(specs, wrong_color=True), n=30, settings=settings[:1])
    accuracy = blind["ddim 10 steps, guidance 1"]
    assert accuracy["color"] == 0.0 and accuracy["all"] == 0.0
    assert accuracy["shape"] == accuracy["position"] == accuracy["background"] == 1.0
    table = format_table(blind)
    assert "| ddim 10 steps, guidance 1 | 100.0 | 0.0 | 100.0 | 100.0 | 100.0 | 0.0 |" in table
