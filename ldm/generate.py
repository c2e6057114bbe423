"""What ``ldm generate`` does: run a pipeline over prompts and write PNGs and a manifest.

Each image is written as ``OUT/NNNNN-SEED.png`` with its settings in a ``parameters`` PNG chunk
(`ldm.images`), and one JSON line per image is appended to ``OUT/manifest.jsonl``. Files are
created exclusively, so nothing is ever overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ldm import images as imaging
from ldm.config import DEFAULT_MODEL
from ldm.pipeline import LatentDiffusionPipeline

logger = logging.getLogger(__name__)


@dataclass
class GenerateRequest:
    """The settings of one ``ldm generate`` run."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int | None = None
    n: int = 1
    height: int | None = None
    width: int | None = None
    init_image: str | None = None
    strength: float | None = None

    @classmethod
    def from_png(cls, path: str | Path, **overrides) -> GenerateRequest:
        """The settings stored in a PNG's ``parameters`` chunk; ``overrides`` that are not
        None replace them."""
        p = imaging.parse_parameters(imaging.read_parameters(path))
        request = cls(
            prompts=[p["prompt"]],
            negative_prompt=p["negative_prompt"],
            steps=p["steps"],
            guidance_scale=p["guidance_scale"],
            sampler=p["sampler"],
            eta=p["eta"],
            seed=p["seed"],
            height=p["height"],
            width=p["width"],
            strength=p["strength"],
        )
        return dataclasses.replace(request, **{k: v for k, v in overrides.items() if v is not None})


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    prompts = [
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return prompts


def resolve_model(model: str | Path | None) -> Path:
    """The model folder to use: ``model``, or the shipped default model."""
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no model folder at {path}; pass a diffusers-format pipeline folder"
            )
        return path
    if not DEFAULT_MODEL.is_dir():
        raise FileNotFoundError(
            f"the default model is missing from this installation (expected at {DEFAULT_MODEL}; "
            "reinstall ldm), or pass --model PATH, a diffusers-format pipeline folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    return DEFAULT_MODEL


def generate_to_folder(
    pipe: LatentDiffusionPipeline, request: GenerateRequest, out: str | Path, *, grid: bool = False
) -> list[Path]:
    """Generate ``request.n`` images per prompt and write them to ``out``; returns the PNG paths.

    With a seed S, image k of the whole run gets seed S + k, so any image can be made again
    alone with its recorded seed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if request.init_image is not None and request.strength is None:
        request = dataclasses.replace(request, strength=0.8)
    init = None
    if request.init_image is not None:
        init = imaging.from_pil(request.init_image)  # (1, 3, H, W)
        f = pipe.vae_scale
        height = request.height or init.shape[-2] // f * f
        width = request.width or init.shape[-1] // f * f
        if (height, width) != tuple(init.shape[-2:]):
            init = imaging.from_pil(request.init_image, (width, height))
    paths, pil_images = [], []
    for i, prompt in enumerate(request.prompts):
        seed = (
            None
            if request.seed is None
            else [request.seed + i * request.n + k for k in range(request.n)]
        )
        common = dict(
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            sampler=request.sampler,
            eta=request.eta,
            seed=seed,
        )
        if init is None:
            result = pipe(
                prompt,
                height=request.height,
                width=request.width,
                num_images_per_prompt=request.n,
                **common,
            )
        else:
            result = pipe.img2img([prompt] * request.n, init, strength=request.strength, **common)
        for image, record in zip(result.images, result.parameters, strict=True):
            path = save_image(out, image, record, init_image=request.init_image)
            paths.append(path)
            pil_images.append(image)
            logger.info("wrote %s", path)
    if grid and pil_images:
        grid_path = imaging.next_free_path(out, "grid")
        imaging.save_png(
            imaging.make_grid(pil_images, cols=request.n if len(request.prompts) > 1 else None),
            grid_path,
        )
        paths.append(grid_path)
    return paths


def save_image(out: Path, image, record: dict, *, init_image: str | None = None) -> Path:
    """Write one PNG with its settings and append its line to ``out/manifest.jsonl``."""
    for _ in range(100):  # another process may take the same index: try the next one
        path = imaging.next_free_path(out, str(record["seed"]))
        try:
            imaging.save_png(image, path, imaging.format_parameters(record))
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not find a free file name in {out}")
    line = {
        "prompt": record["prompt"],
        "negative_prompt": record["negative_prompt"],
        "seed": record["seed"],
        "sampler": record["sampler"],
        "steps": record["steps"],
        "guidance_scale": record["guidance_scale"],
        "eta": record["eta"],
        "width": record["width"],
        "height": record["height"],
        "strength": record["strength"],
        "init_image": init_image,
        "model": record["model"],
        "file": path.name,
    }
    with open(out / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path
