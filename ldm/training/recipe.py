"""A complete small text-to-image model from scratch on any dataset: ``ldm train-recipe DATA``.

Stages, each skipped when its result exists and resumed from its latest checkpoint otherwise:

1. ``data/``: the dataset checked (`ldm.data.scan`) and written as image folders at the
   training resolution, ``data/train`` and ``data/heldout`` (``heldout`` given, or a seeded
   share split off); ``DATA = "shapes"`` generates the procedural shapes world instead;
2. ``vae/``: the VAE (`ldm.training.pretrain.train_vae`, ``vae.yaml``);
3. ``clip/``: the tokenizer (CLIP's BPE cut to the captions' words, plus a reserve) and the text
   encoder (`ldm.training.pretrain.train_clip`, ``clip.yaml``);
4. ``unet/``: the U-Net with ``ldm train`` (``unet.yaml``, ``unet.json``), which exports the
   whole pipeline to ``unet/model``;
5. ``eval/``: `ldm.data.metrics.evaluate_on_data` on training captions (and, for shapes, the
   rule-based held-out accuracy of `ldm.shapes.detector`).

The configs are the package's ``ldm/configs/recipe`` (or ``configs``); ``overrides`` are
``stage.key=value`` strings (``vae.max_steps=500``, ``unet.train.batch_size=32``).
``times.json`` records how long each stage took.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.config import CONFIG_FILES, CLIPTrainConfig, DataConfig, TrainConfig, VAETrainConfig
from ldm.data import ImageCaptionDataset, scan
from ldm.data.metrics import evaluate_on_data, format_results
from ldm.errors import TrainingInterrupted
from ldm.images import to_pil
from ldm.pipeline import LatentDiffusionPipeline
from ldm.shapes.detector import REFERENCE_SETTING, evaluate
from ldm.shapes.world import make_shapes
from ldm.training.denoiser import train
from ldm.training.pretrain import load_retrieval, train_clip, train_vae

logger = logging.getLogger(__name__)

CONFIG_DIR = CONFIG_FILES / "recipe"
SHAPES = "shapes"
STAGES = ("vae", "clip", "unet")


def _configs(configs: str | Path) -> Path:
    folder = Path(configs)
    names = ("vae.yaml", "clip.yaml", "unet.yaml", "unet.json")
    if missing := [n for n in names if not (folder / n).is_file()]:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}; pass --configs, a folder like the package's "
            f"{CONFIG_DIR}"
        )
    return folder


def _split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """``["vae.max_steps=5", "unet.train.seed=1"]`` -> ``{"vae": ["max_steps=5"], ...}``."""
    by_stage: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for item in overrides:
        stage, dot, rest = item.partition(".")
        if stage not in by_stage or not dot:
            raise ValueError(
                f"override {item!r} does not start with a stage: use one of "
                f"{', '.join(s + '.' for s in STAGES)} (e.g. vae.max_steps=500)"
            )
        by_stage[stage].append(rest)
    return by_stage


def write_image_folder(
    data: DataConfig, folder: Path, indices: list[int] | None = None, samples=None
) -> Path:
    """The samples of ``data`` (those at ``indices``), prepared as training reads them (centre
    crop at ``data.resolution``, transparency on white), as PNGs with ``metadata.jsonl``.
    Written to a temporary sibling folder and renamed, so a stopped stage leaves no half folder."""
    samples = samples if samples is not None else scan(data).samples
    chosen = [samples[i] for i in indices] if indices is not None else samples
    dataset = ImageCaptionDataset(data, chosen)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = []
    for i in tqdm(range(len(dataset)), desc=f"writing {folder.name}", unit="image"):
        item = dataset[i]
        name = f"{i:06d}.png"
        to_pil(item["pixels"][None])[0].save(tmp / name)
        rows.append(json.dumps({"file_name": name, "text": item["caption"]}))
    (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    tmp.rename(folder)
    return folder


def prepare_data(
    data: str,
    out: Path,
    *,
    resolution: int = 64,
    caption_column: str = "text",
    heldout: str | None = None,
    heldout_share: float = 0.1,
    seed: int = 0,
    n_shapes: tuple[int, int] = (30_000, 1000),
) -> None:
    """Write ``out/train`` and ``out/heldout`` (image folders at ``resolution``) from ``data``,
    any dataset that ``ldm train`` reads. Without ``heldout``, a seeded ``heldout_share`` of the
    samples (at least 1, at most 1000) is held out. ``heldout`` is written last: it marks the
    stage done."""
    if data == SHAPES:
        if not (out / "train" / "metadata.jsonl").exists():
            make_shapes(n_shapes[0], out / "train", seed=seed)
        make_shapes(n_shapes[1], out / "heldout", seed=seed + 1, split="heldout")
        return
    config = DataConfig(path=data, caption_column=caption_column, resolution=resolution)
    report = scan(config)
    out.mkdir(parents=True, exist_ok=True)
    report.save(out / "data_report.json")
    logger.info("data: %s", report.to_text())
    if report.used < 2:
        raise ValueError(f"{data} has {report.used} usable samples; the recipe needs at least 2")
    if heldout is not None:  # a dataset of its own
        if not (out / "train" / "metadata.jsonl").exists():
            write_image_folder(config, out / "train", None, report.samples)
        held = DataConfig(path=heldout, caption_column=caption_column, resolution=resolution)
        write_image_folder(held, out / "heldout")
        return
    order = torch.randperm(report.used, generator=torch.Generator().manual_seed(seed))
    k = min(1000, max(1, round(heldout_share * report.used)))
    if not (out / "train" / "metadata.jsonl").exists():
        write_image_folder(config, out / "train", sorted(order[k:].tolist()), report.samples)
    write_image_folder(config, out / "heldout", sorted(order[:k].tolist()), report.samples)


def _captions(folder: Path) -> list[str]:
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


class _Stages:
    """Runs each stage unless its result exists, adding the time it took to ``times.json``
    (also when a signal stops it, `ldm.errors.TrainingInterrupted`)."""

    def __init__(self, times_file: Path) -> None:
        self.times_file = times_file
        self.times = json.loads(times_file.read_text()) if times_file.is_file() else {}

    def run(self, name: str, done: Path, run: Callable[[], object]) -> None:
        if done.exists():
            logger.info("%s: done already (%s)", name, done)
            return
        start = time.perf_counter()
        try:
            run()
        except TrainingInterrupted:  # stopped by a signal: the time so far still counts
            self._record(name, time.perf_counter() - start)
            raise
        self._record(name, time.perf_counter() - start)

    def _record(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds
        self.times_file.parent.mkdir(parents=True, exist_ok=True)
        self.times_file.write_text(json.dumps(self.times, indent=2) + "\n")


def train_recipe(
    data: str,
    out: str | Path,
    *,
    resolution: int = 64,
    caption_column: str = "text",
    heldout: str | None = None,
    seed: int = 0,
    configs: str | Path | None = None,
    overrides: list[str] | None = None,
    n_eval: int = 100,
    eval_steps: int = 30,
    n_shapes: tuple[int, int] = (30_000, 1000),
) -> Path:
    """Run (or resume) every stage into ``out``; returns the exported pipeline folder."""
    out, configs = Path(out), _configs(configs or CONFIG_DIR)
    by_stage = _split_overrides(overrides or [])
    stages = _Stages(out / "times.json")
    folders = out / "data"
    train_dir, heldout_dir = folders / "train", folders / "heldout"
    options = dict(resolution=resolution, caption_column=caption_column, heldout=heldout)
    stages.run(
        "data",
        heldout_dir / "metadata.jsonl",
        lambda: prepare_data(data, folders, seed=seed, n_shapes=n_shapes, **options),
    )
    common = [f"data={train_dir}", f"seed={seed}"]
    vae = VAETrainConfig.from_yaml(
        configs / "vae.yaml",
        [*common, f"heldout={heldout_dir}", f"output_dir={out / 'vae'}", *by_stage["vae"]],
    )
    stages.run("vae", out / "vae" / "vae", lambda: train_vae(vae, resume="auto", overwrite=True))
    clip = CLIPTrainConfig.from_yaml(
        configs / "clip.yaml", [*common, f"output_dir={out / 'clip'}", *by_stage["clip"]]
    )
    stages.run(
        "clip", out / "clip" / "open_clip", lambda: train_clip(clip, resume="auto", overwrite=True)
    )
    unet = _unet_config(configs, out, vae, clip, train_dir, resolution, seed, by_stage["unet"])
    model = out / "unet" / "model"
    stages.run(
        "unet", model / "model_index.json", lambda: train(unet, resume="auto", overwrite=True)
    )
    stages.run(
        "eval",
        out / "eval" / "results.json",
        lambda: _evaluate(data, model, out / "clip", folders, out / "eval", n_eval, eval_steps),
    )
    logger.info("stage times (s): %s", stages.times)
    return model


def _unet_config(
    configs: Path,
    out: Path,
    vae: VAETrainConfig,
    clip: CLIPTrainConfig,
    train_dir: Path,
    resolution: int,
    seed: int,
    overrides: list[str],
) -> TrainConfig:
    """The U-Net stage's config: ``out/unet.json`` (``configs/unet.json`` sized to the VAE's
    latents and the text encoder's width) and ``configs/unet.yaml``, validating on 4 seeded
    training captions."""
    unet_json = json.loads((configs / "unet.json").read_text())
    unet_json["sample_size"] = resolution // 2 ** (len(vae.block_out_channels) - 1)
    unet_json["cross_attention_dim"] = clip.text_width
    out.mkdir(parents=True, exist_ok=True)
    (out / "unet.json").write_text(json.dumps(unet_json, indent=2) + "\n")
    captions = _captions(train_dir)
    pick = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))[:4]
    prompts = [captions[i] for i in sorted(pick.tolist())]
    return TrainConfig.from_yaml(
        configs / "unet.yaml",
        [
            f"unet={out / 'unet.json'}",
            f"vae={out / 'vae'}",
            f"text_encoder={out / 'clip'}",
            f"output_dir={out / 'unet'}",
            f"data.path={train_dir}",
            f"data.resolution={resolution}",
            f"train.seed={seed}",
            f"validation.prompts={json.dumps(prompts)}",
            *overrides,
        ],
    )


def _evaluate(
    data: str,
    model: Path,
    clip_dir: Path,
    folders: Path,
    out: Path,
    n: int,
    steps: int,
) -> None:
    """``out/results.json`` of `evaluate_on_data` with CLIP retrieval, on training captions; for
    shapes also the detector's held-out accuracy in ``out/shapes``."""
    train_dir, heldout_dir = folders / "train", folders / "heldout"

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    train_data = DataConfig(path=str(train_dir), resolution=_resolution(train_dir))
    heldout_data = DataConfig(path=str(heldout_dir), resolution=train_data.resolution)
    if data == SHAPES:  # the rule-based detector's held-out accuracy as well
        evaluate(pipe, n=n, settings=[REFERENCE_SETTING], out_dir=out / "shapes")
    results = evaluate_on_data(
        pipe,
        train_data,
        n=n,
        heldout=heldout_data,
        num_inference_steps=steps,
        out_dir=out,
        clip=load_retrieval(clip_dir),
    )
    print(format_results(results))


def _resolution(folder: Path) -> int:
    first = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    return Image.open(folder / first).size[0]
