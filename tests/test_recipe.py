"""`ldm train-recipe` on a dataset that is not the shapes world: every stage at a tiny size,
the held-out split, the tokenizer built from the captions, resuming, and the CLIP retrieval
figure of `ldm eval`. (The shapes use of the recipe is tested in test_default_model.py.)"""

import json

import pytest
import torch
from PIL import Image

from ldm.config import CLIPTrainConfig
from ldm.data.metrics import caption_retrieval
from ldm.encoders.tokenizer import build_clip_tokenizer, count_tokens, load_tokenizer
from ldm.pipeline import LatentDiffusionPipeline
from ldm.testing import write_recipe_configs
from ldm.training.pretrain import build_clip, load_clip, save_clip
from ldm.training.recipe import _captions, _split_overrides, train_recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
THINGS = ["folder", "printer", "camera", "battery", "keyboard", "speaker", "monitor", "bell"]


def icon_folder(root, n=24, size=48):
    """RGBA 'icons' (a coloured square on transparency) of three colours, with captions such as
    'folder red', written as an image folder with metadata.jsonl at a size the recipe resizes."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        inner = 8 + (i % 5) * 3
        image.paste((*COLOURS[colour], 255), (inner, inner, size - inner, size - inner))
        image.save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"{THINGS[i % 8]} {colour} {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def icon_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("icon-recipe")
    data = icon_folder(root / "icons")
    configs = write_recipe_configs(root / "configs")
    model = train_recipe(
        str(data),
        root / "run",
        resolution=32,
        configs=configs,
        overrides=["clip.vocab_reserve=50", "unet.train.max_steps=2"],
        n_eval=4,
        eval_steps=2,
    )
    return root, data, configs, model


def test_the_data_stage_writes_a_seeded_split_at_the_resolution(icon_run):
    root, data, _, _ = icon_run
    train, heldout = (
        _captions(root / "run" / "data" / "train"),
        _captions(root / "run" / "data" / "heldout"),
    )
    assert len(heldout) == 2 and len(train) == 22  # 10% of 24, rounded
    assert sorted(train + heldout) == sorted(_captions(data))
    png = Image.open(next((root / "run" / "data" / "train").glob("*.png")))
    assert png.size == (32, 32) and png.mode == "RGB"
    assert png.getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white


def test_the_tokenizer_knows_every_caption_word_and_keeps_a_reserve(icon_run):
    root, data, _, _ = icon_run
    tokenizer = load_tokenizer(root / "run" / "clip" / "tokenizer")
    words = {w for caption in _captions(data) for w in caption.split() if w.isalpha()}
    for word in words:  # one token each, plus start and end (CLIP splits numbers into digits)
        assert count_tokens(tokenizer, word) == [3], word

    def merges(folder):
        return [
            " ".join(m)
            for m in json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
        ]

    full = build_clip_tokenizer(root / "full")
    kept = merges(root / "run" / "clip" / "tokenizer")
    assert set(merges(root / "full")[:50]) <= set(kept)  # the reserve: CLIP's first 50
    assert len(tokenizer) == 512 + len(kept) + 2 and len(full) == 49408


def test_the_recipe_exports_a_pipeline_that_generates(icon_run):
    root, _, _, model = icon_run
    assert model == root / "run" / "unet" / "model"
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    image = pipe("folder red", num_inference_steps=2, seed=0, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    unet_json = json.loads((root / "run" / "unet.json").read_text())
    assert unet_json["sample_size"] == 8 and unet_json["cross_attention_dim"] == 32
    times = json.loads((root / "run" / "times.json").read_text())
    assert list(times) == ["data", "vae", "clip", "unet", "eval"]


def test_the_eval_stage_reports_retrieval_and_distances(icon_run):
    root, *_ = icon_run
    results = json.loads((root / "run" / "eval" / "results.json").read_text())
    assert results["n"] == 4 and results["caption_candidates"] == 20
    for key in ("caption_top1", "caption_top1_dataset", "nearer_than_distractors"):
        assert 0 <= results[key] <= 1
    assert results["vae_psnr_on"] == "heldout"
    assert (root / "run" / "eval" / "grid.png").is_file()


def test_running_the_recipe_again_resumes_nothing_finished(icon_run):
    root, data, configs, model = icon_run
    before = (root / "run" / "times.json").read_text()
    again = train_recipe(str(data), root / "run", resolution=32, configs=configs, n_eval=4)
    assert again == model and (root / "run" / "times.json").read_text() == before


def test_a_given_heldout_dataset_is_used_instead_of_a_split(tmp_path):
    from ldm.training.recipe import prepare_data

    train = icon_folder(tmp_path / "train", n=6)
    heldout = icon_folder(tmp_path / "heldout", n=3)
    prepare_data(str(train), tmp_path / "out", resolution=16, heldout=str(heldout))
    assert len(_captions(tmp_path / "out" / "train")) == 6
    assert _captions(tmp_path / "out" / "heldout") == _captions(heldout)


def test_overrides_name_their_stage():
    assert _split_overrides(["vae.max_steps=5", "unet.train.seed=1"]) == {
        "vae": ["max_steps=5"],
        "clip": [],
        "unet": ["train.seed=1"],
    }
    with pytest.raises(
        ValueError,
        match=r"'max_steps=5' does not start with a stage: use one of vae\., clip\., unet\.",
    ):
        _split_overrides(["max_steps=5"])


def test_the_saved_clip_loads_back_with_the_same_outputs(tmp_path):
    config = CLIPTrainConfig(
        data="unused",
        embed_dim=16,
        text_width=32,
        text_layers=1,
        text_heads=2,
        vision_width=32,
        vision_layers=1,
    )
    torch.manual_seed(0)
    model = build_clip(config, 600, 599, image_size=32).eval()
    save_clip(model, config, tmp_path / "clip", vocab_size=600, eos_id=599, image_size=32)
    loaded = load_clip(tmp_path / "clip")
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 599, (2, 32))
    with torch.no_grad():
        for a, b in zip(model(images, tokens), loaded(images, tokens), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class _OneHotClip:
    """A stand-in CLIP: a caption's features are the one-hot of its first word's index; an
    image's are the one-hot of its pixel value (images are constant)."""

    def __init__(self, tokenizer, words):
        self.tokenizer, self.words = tokenizer, words

    def encode_text(self, ids, normalize=True):
        texts = self.tokenizer.batch_decode(ids[:, 1:2])
        return torch.nn.functional.one_hot(
            torch.tensor([self.words.index(t.strip()) for t in texts]), len(self.words)
        ).float()

    def encode_image(self, images, normalize=True):
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), len(self.words)).float()


def test_caption_retrieval_counts_the_images_whose_own_caption_wins():
    words = ["zero", "one", "two", "three", "four", "five"]
    tokenizer = build_clip_tokenizer(words=words)
    clip = _OneHotClip(tokenizer, words)
    captions = ["zero", "one", "two", "three"]
    right = torch.arange(4.0)[:, None, None, None].expand(4, 3, 2, 2)  # image i shows word i
    wrong = (right + 4) % 6  # image i shows word i + 4: never its own
    assert caption_retrieval(clip, tokenizer, right, captions, words, candidates=6) == 1.0
    assert caption_retrieval(clip, tokenizer, wrong, captions, words, candidates=6) == 0.0
    half = torch.cat([right[:2], wrong[2:]])
    assert caption_retrieval(clip, tokenizer, half, captions, words, candidates=6) == 0.5
