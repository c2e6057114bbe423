"""The shipped default model: `ldm.training.recipe` on the procedural shapes world
(``ldm train-default``).

`train_default` runs the recipe with ``DATA = "shapes"`` (30,000 training images, 1,000 of
held-out attribute combinations) and the configs of ``ldm/configs/default_model``: larger stages
than the recipe's defaults, for 30,000 images, and a tokenizer of the shapes words alone. `ship`
writes a trained pipeline folder into the package (U-Net weights in float16) as
`ldm.config.DEFAULT_MODEL`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ldm.config import CONFIG_FILES, DEFAULT_MODEL
from ldm.pipeline import LatentDiffusionPipeline
from ldm.shapes.detector import REFERENCE_SETTING, evaluate
from ldm.training.recipe import SHAPES, train_recipe

CONFIG_DIR = CONFIG_FILES / "default_model"

logger = logging.getLogger(__name__)


def train_default(
    out: str | Path = "runs/default",
    *,
    configs: str | Path | None = None,
    seed: int = 0,
    n_train: int = 30_000,
    n_heldout: int = 1000,
    n_eval: int = 200,
    overrides: list[str] | None = None,
) -> Path:
    """Run (or resume) the default model's recipe into ``out``; returns the exported pipeline
    folder. Its ``eval/shapes`` holds the held-out accuracy that the docs quote."""
    return train_recipe(
        SHAPES,
        out,
        seed=seed,
        configs=configs or CONFIG_DIR,
        overrides=overrides,
        n_eval=n_eval,
        n_shapes=(n_train, n_heldout),
    )


def ship(model: str | Path, target: str | Path = DEFAULT_MODEL) -> Path:
    """Copy a trained pipeline folder to ``target`` (by default into the package, where
    ``ldm generate`` finds it), with the U-Net's weights stored in float16 to halve its size.
    Loading upcasts them to the float32 model."""
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    target = Path(target)
    pipe.name = target.name  # PNGs made with it say "Model: shapes"
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
    """Put the EMA weights saved in an ``ldm train`` checkpoint (``ema.safetensors``, keyed by
    the U-Net's parameter names) into ``pipe.unet``."""
    from safetensors.torch import load_file

    from ldm.training.checkpoint import EMA_FILE

    path = Path(checkpoint) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no EMA state at {path}; was the run trained with ema_decay?")
    state = load_file(path)
    names = [name for name, _ in pipe.unet.named_parameters()]
    if missing := [name for name in names if name not in state]:
        raise ValueError(f"{path} is not this U-Net's EMA: it lacks {missing[:5]}")
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            p.copy_(state[name])


def evaluate_checkpoints(
    run: str | Path = "runs/default", *, n: int = 100, every: int = 1
) -> dict[int, dict[str, float]]:
    """Accuracy against training steps: each kept U-Net checkpoint of a recipe run (its EMA
    weights, as exported) scored on held-out prompts by `ldm.shapes.detector.evaluate` at the
    reference setting (`ldm.shapes.detector.REFERENCE_SETTING`: DDIM 50 steps, guidance 7.5).
    ``every``: take every k-th checkpoint. Returns ``{step: accuracy}``."""
    from ldm.training.checkpoint import checkpoints

    run = Path(run)
    pipe = LatentDiffusionPipeline.from_pretrained(run / "unet" / "model")
    found = checkpoints(run / "unet" / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no checkpoint-N folders in {run / 'unet' / 'checkpoints'}")
    results = {}
    for folder in found[::-1][::every][::-1]:  # the last one always, then every k-th back
        load_checkpoint_ema(pipe, folder)
        step = int(folder.name.removeprefix("checkpoint-"))
        results[step] = next(iter(evaluate(pipe, n=n, settings=[REFERENCE_SETTING]).values()))
        logger.info("checkpoint %d: %s", step, results[step])
    return results
