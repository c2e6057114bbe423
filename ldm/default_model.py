"""The recipe of the shipped default model, as one resumable command: ``ldm train-default``.

Stages, each skipped when its result exists and resumed from its latest checkpoint otherwise:

1. ``shapes/train`` and ``shapes/heldout``: the procedural data (`ldm.shapes`);
2. ``vae/``: the VAE (`ldm.pretrain.train_vae`, ``configs/default_model/vae.yaml``);
3. ``clip/``: the text encoder (`ldm.pretrain.train_clip`, ``configs/default_model/clip.yaml``);
4. ``unet/``: the U-Net with ``ldm train`` (``configs/default_model/unet.yaml``), which exports
   the whole pipeline to ``unet/model``;
5. ``eval/``: `ldm.evaluation.evaluate` on held-out combinations.

``times.json`` records how long each stage took. `ship` writes a trained pipeline folder into the
package (U-Net weights in float16) as `ldm.config.DEFAULT_MODEL`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ldm.config import (
    DEFAULT_MODEL,
    CLIPTrainConfig,
    TrainConfig,
    VAETrainConfig,
)
from ldm.evaluation import evaluate
from ldm.pipeline import LatentDiffusionPipeline
from ldm.pretrain import train_clip, train_vae
from ldm.shapes import make_shapes
from ldm.training import train

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "default_model"


def _configs(configs: str | Path) -> Path:
    folder = Path(configs)
    names = ("vae.yaml", "clip.yaml", "unet.yaml", "unet.json")
    if missing := [n for n in names if not (folder / n).is_file()]:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}; pass --configs, the folder of the default "
            f"model's recipe (configs/default_model in the repository)"
        )
    return folder


def train_default(
    out: str | Path = "runs/default",
    *,
    configs: str | Path | None = None,
    seed: int = 0,
    n_train: int = 30_000,
    n_heldout: int = 1000,
    n_eval: int = 200,
) -> Path:
    """Run (or resume) the whole recipe into ``out``; returns the exported pipeline folder."""
    out, configs = Path(out), _configs(configs or CONFIG_DIR)
    times_file = out / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}

    def stage(name: str, done: Path, run) -> None:
        if done.exists():
            logger.info("%s: done already (%s)", name, done)
            return
        start = time.perf_counter()
        run()
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        times_file.parent.mkdir(parents=True, exist_ok=True)
        times_file.write_text(json.dumps(times, indent=2) + "\n")

    shapes = out / "shapes"

    def make_data() -> None:
        if not (shapes / "train" / "metadata.jsonl").exists():
            make_shapes(n_train, shapes / "train", seed=seed)
        make_shapes(n_heldout, shapes / "heldout", seed=seed + 1, split="heldout")

    stage("shapes", shapes / "heldout" / "metadata.jsonl", make_data)
    data = [f"data={shapes / 'train'}", f"seed={seed}"]
    vae = VAETrainConfig.from_yaml(
        configs / "vae.yaml",
        [*data, f"heldout={shapes / 'heldout'}", f"output_dir={out / 'vae'}"],
    )
    stage("vae", out / "vae" / "vae", lambda: train_vae(vae, resume="latest"))
    clip = CLIPTrainConfig.from_yaml(configs / "clip.yaml", [*data, f"output_dir={out / 'clip'}"])
    stage("clip", out / "clip" / "tokenizer", lambda: train_clip(clip, resume="latest"))
    unet = TrainConfig.from_yaml(
        configs / "unet.yaml",
        [
            f"unet={configs / 'unet.json'}",
            f"vae={out / 'vae'}",
            f"text_encoder={out / 'clip'}",
            f"output_dir={out / 'unet'}",
            f"data.path={shapes / 'train'}",
            f"train.seed={seed}",
        ],
    )
    model = out / "unet" / "model"
    stage("unet", model / "model_index.json", lambda: train(unet, resume="latest"))
    stage(
        "eval",
        out / "eval" / "results.json",
        lambda: evaluate(
            LatentDiffusionPipeline.from_pretrained(model), n=n_eval, out_dir=out / "eval"
        ),
    )
    logger.info("stage times (s): %s", times)
    return model


def ship(model: str | Path, target: str | Path = DEFAULT_MODEL) -> Path:
    """Copy a trained pipeline folder to ``target`` (by default into the package, where
    ``ldm generate`` finds it), with the U-Net's weights stored in float16 to halve its size.
    Loading upcasts them to the float32 model."""
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    pipe.unet.to(torch.float16).save_pretrained(tmp / "unet")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    sizes = {
        part: sum(f.stat().st_size for f in (target / part).rglob("*") if f.is_file())
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    }
    logger.info("shipped %s: %s bytes", target, sizes)
    return target


def load_checkpoint_ema(pipe: LatentDiffusionPipeline, checkpoint: str | Path) -> None:
    """Put the EMA weights saved in an ``ldm train`` checkpoint into ``pipe.unet``."""
    path = Path(checkpoint) / "custom_checkpoint_1.pkl"  # 0: the LR schedule, 1: the EMA
    if not path.is_file():
        raise FileNotFoundError(f"no EMA state at {path}; was the run trained with ema_decay?")
    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        for i, p in enumerate(pipe.unet.parameters()):
            p.copy_(state[f"shadow.{i}"])


def evaluate_checkpoints(
    run: str | Path = "runs/default", *, n: int = 100, every: int = 1
) -> dict[int, dict[str, float]]:
    """Accuracy against training steps: each kept U-Net checkpoint of a recipe run (its EMA
    weights, as exported) scored on held-out prompts with DDIM 50 steps at guidance 7.5.
    ``every``: take every k-th checkpoint. Returns ``{step: accuracy}``."""
    from ldm.checkpoint import checkpoints

    run = Path(run)
    pipe = LatentDiffusionPipeline.from_pretrained(run / "unet" / "model")
    found = checkpoints(run / "unet" / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no checkpoint-N folders in {run / 'unet' / 'checkpoints'}")
    results = {}
    for folder in found[::-1][::every][::-1]:  # the last one always, then every k-th back
        load_checkpoint_ema(pipe, folder)
        step = int(folder.name.removeprefix("checkpoint-"))
        results[step] = next(iter(evaluate(pipe, n=n).values()))
        logger.info("checkpoint %d: %s", step, results[step])
    return results
