"""ldm.data.model_fit and `ldm check-data`'s model-fit warnings: the shipped VAE and tokenizer, full
CLIP's tokenizer, tiny generated image folders."""

import json
import math
import re

import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.config import DEFAULT_MODEL, DataConfig
from ldm.data import ImageCaptionDataset, scan
from ldm.data.model_fit import (
    UNKNOWN_WORDS_THRESHOLD,
    VAE_PSNR_THRESHOLD,
    ModelFit,
    WordFit,
    caption_words,
    sample_pixels,
    unknown_words,
    vae_psnr,
)
from ldm.encoders.tokenizer import build_clip_tokenizer, load_tokenizer
from ldm.encoders.vae import FrozenVAE
from ldm.images import psnr

# 27 words once "3", "!" and "," are left out and "dog's" is "dog" + "'s". Full CLIP splits
# "okapi" only; the shipped tokenizer knows a, red, circle, on, blue, background, the only.
CAPTIONS = [
    "A red circle on a blue background",
    "a kitten, sleeping on the sofa!",
    "3 kittens and a dog's toy",
    "zebra giraffe okapi",
    "a kitten and a kitten",
]


@pytest.fixture(scope="module")
def shapes_tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def shapes_vae():
    return FrozenVAE.from_pretrained(DEFAULT_MODEL)


def test_caption_words_are_cleaned_and_split_as_clip_does(shapes_tokenizer):
    assert caption_words(shapes_tokenizer, "A  Kitten, on the SOFA! 3 dog's") == [
        ("a", True),
        ("kitten", False),
        ("on", True),
        ("the", True),
        ("sofa", False),
        ("dog", False),
        ("'s", False),
    ]
    clip = build_clip_tokenizer()
    assert caption_words(clip, "caf&eacute; naïve") == [("café", True), ("naïve", False)]
    for word, known in caption_words(clip, " ".join(CAPTIONS)):  # known: BPE keeps it whole
        assert known == (len(clip.tokenize(word)) == 1), word


def test_unknown_words_against_the_shipped_and_the_full_clip_tokenizer(shapes_tokenizer):
    shapes = unknown_words(shapes_tokenizer, CAPTIONS, top=3)
    assert (shapes.words, shapes.unknown, shapes.share) == (27, 14, 14 / 27)
    assert shapes.top_unknown == [("kitten", 3), ("and", 2), ("sleeping", 1)]
    clip = unknown_words(build_clip_tokenizer(), CAPTIONS)
    assert (clip.words, clip.unknown, clip.top_unknown) == (27, 1, [("okapi", 1)])
    assert unknown_words(shapes_tokenizer, ["!!", "42"]) == WordFit(0, 0, [])
    assert WordFit(0, 0).share == 0.0


def test_psnr_of_a_known_error():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5
    assert psnr(x + 0.02, x).tolist() == pytest.approx([40.0, 40.0], abs=1e-3)  # 10 log10(4/4e-4)
    assert psnr(x, x).tolist() == [math.inf, math.inf]


class _OffsetVAE:
    """decode(encode(x)) = x + 0.02: a VAE whose PSNR is known (40 dB)."""

    device = torch.device("cpu")

    def encode(self, x):
        return x

    def decode(self, z):
        return z + 0.02


def test_vae_psnr_of_a_known_reconstruction_and_of_the_shipped_vae(shapes_vae):
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5  # in [-0.5, 0.5]
    assert vae_psnr(_OffsetVAE(), x, batch_size=2) == pytest.approx(40.0, abs=1e-3)
    white = torch.ones(2, 3, 8, 8)  # 1.02 is clamped to 1, as in a saved image: no error left
    assert vae_psnr(_OffsetVAE(), white) == math.inf

    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    decoded = shapes_vae.decode(shapes_vae.encode(pixels)).clamp(-1, 1)  # the posterior mean
    direct = (10 * torch.log10(4 / (decoded - pixels).pow(2).mean((1, 2, 3)))).mean().item()
    assert vae_psnr(shapes_vae, pixels) == pytest.approx(direct, abs=1e-4)
    assert vae_psnr(shapes_vae, pixels, batch_size=1) == pytest.approx(direct, abs=1e-3)
    assert direct < VAE_PSNR_THRESHOLD  # uniform noise: nothing like its shapes


def test_model_fit_warns_past_each_threshold_only():
    fit = ModelFit("m", VAE_PSNR_THRESHOLD, 4, 8, 32, WordFit(10, 1, [("okapi", 1)]))
    assert fit.warnings() == []  # at the thresholds
    assert "0 of 4" not in fit.to_text() and "4 of 8 images at 32x32" in fit.to_text()
    fit = ModelFit("m", 17.04, 4, 8, 32, WordFit(10, 2, [("okapi", 2)]))
    vae, words = fit.warnings()
    assert "17.0 dB" in vae and "train.train_vae_decoder: true" in vae and "train-recipe" in vae
    assert "20.0%" in words and "train.train_text_encoder: true" in words
    assert fit.to_dict()["top_unknown_words"] == [{"word": "okapi", "count": 2}]
    assert UNKNOWN_WORDS_THRESHOLD == 0.10


def _folder(path, n, captions):
    """``n`` random-colour 40x48 images with ``captions`` in turn, in a metadata.jsonl folder."""
    path.mkdir()
    generator = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        pixels = torch.randint(0, 256, (48, 40, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": captions[i % len(captions)]})
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sample_pixels_is_seeded_and_reads_as_training_does(tmp_path):
    config = DataConfig(str(_folder(tmp_path / "data", 6, ["x"])), resolution=32)
    samples = scan(config).samples
    pixels, chosen = sample_pixels(config, samples, 4, seed=0)
    assert pixels.shape == (4, 3, 32, 32) and chosen == sorted(chosen) and len(set(chosen)) == 4
    again, same = sample_pixels(config, samples, 4, seed=0)
    assert same == chosen and torch.equal(again, pixels)
    dataset = ImageCaptionDataset(config, samples)  # centre crops: no randomness
    assert torch.equal(pixels[0], dataset[chosen[0]]["pixels"])
    assert sample_pixels(config, samples, 100)[1] == list(range(6))


def test_check_data_warns_when_the_model_fits_poorly(tmp_path, capsys):
    data = _folder(tmp_path / "data", 6, ["zebra giraffe okapi", "a zebra"])  # 3 * 3 + 3 * 2 words
    report = tmp_path / "report.json"
    args = ["check-data", str(data), "--resolution", "32", "--vae-sample", "4"]
    assert main([*args, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    psnr_db = float(re.search(r"VAE: ([\d.]+) dB mean PSNR on 4 of 6 images at 32x32", out)[1])
    assert psnr_db < VAE_PSNR_THRESHOLD
    assert f"WARNING: the VAE reconstructs these images poorly: {psnr_db:.1f} dB" in out
    assert "below 20 dB" in out and "train.train_vae_decoder: true" in out
    assert "tokenizer: 12 of 15 caption words (80.0%) are not one token" in out
    assert "most frequent: zebra (6), giraffe (3), okapi (3)" in out
    assert "WARNING: the tokenizer does not know 80.0% of the caption words, above 10%" in out
    assert "train.train_text_encoder: true" in out and "ldm train-recipe" in out
    assert "captions over the text encoder's 32 tokens (truncated in training): 0 of 6" in out
    saved = json.loads(report.read_text())
    assert saved["model_fit"]["vae_images"] == 4 and saved["model_fit"]["unknown_words"] == 12
    assert saved["model_fit"]["vae_psnr_db"] == pytest.approx(psnr_db, abs=0.05)
    assert saved["long_captions"] == {"max_tokens": 32, "count": 0}
    assert "WARNING: the tokenizer" in report.with_suffix(".txt").read_text()

    assert main(["check-data", str(data), "--model", "none", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "Model fit" not in out and "WARNING" not in out
    assert "captions over the text encoder's 5 tokens (truncated in training): 3 of 6" in out

    config = tmp_path / "train.yaml"  # a config's own model is the one measured
    config.write_text(f"model: default\ndata:\n  path: {data}\n  resolution: 32\n")
    assert main(["check-data", str(config), "--vae-sample", "1"]) == 0
    assert f"Model fit ({DEFAULT_MODEL}):" in capsys.readouterr().out
    assert main(["check-data", str(data), "--vae-sample", "0"]) == 2
    assert "vae_sample must be a positive number" in capsys.readouterr().err
