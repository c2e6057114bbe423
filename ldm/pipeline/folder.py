"""What ``ldm generate`` does: run a pipeline over prompts and write PNGs and a manifest.

Each image is written as ``OUT/NNNNN-SEED.png`` with its settings in a ``parameters`` PNG chunk
(`ldm.images`), and one JSON line per image is appended to ``OUT/manifest.jsonl``. Files are
created exclusively, so nothing is ever overwritten. The run's settings and their checks are
`ldm.pipeline.request`; its names are importable from here too, as ``ldm generate`` uses them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ldm import images as imaging
from ldm.config import DEFAULT_MODEL, GENERATION
from ldm.formats.lora import a1111_lora_name, lora_hash
from ldm.pipeline.checks import draw_seed
from ldm.pipeline.request import (
    GenerateRequest,
    ModelFacts,
    available_memory,
    check_device,
    output_size,
    parse_lora_flag,
    parse_memory,
    plan_batches,
    read_prompts,
    sha256,
)

if TYPE_CHECKING:  # the pipeline (diffusers, transformers) loads only when a model does
    from ldm.pipeline.latent_diffusion import LatentDiffusionPipeline

__all__ = [  # what ``ldm generate`` (ldm.cli) reads from here
    "GenerateRequest",
    "ModelFacts",
    "available_memory",
    "check_device",
    "find_model_folder",
    "generate_to_folder",
    "parse_lora_flag",
    "parse_memory",
    "plan_batches",
    "read_prompts",
    "save_image",
]
MANIFEST_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "sampler",
    "sigmas",
    "steps",
    "guidance_scale",
    "eta",
)
MANIFEST_KEYS += ("width", "height", "strength", "init_image", "init_sha256", "loras", "model")

logger = logging.getLogger(__name__)


def find_model_folder(model: str | Path | None) -> Path:
    """The model folder to use: ``model``, or the shipped default model."""
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--model {path}: no such folder; pass a diffusers-format pipeline folder"
            )
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"--model {path} is not a pipeline folder (no model_index.json); pass a "
                "diffusers-format pipeline folder, or convert a single file with ldm convert"
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
    pipe: LatentDiffusionPipeline,
    request: GenerateRequest,
    out: str | Path,
    *,
    grid: bool = False,
    batch_size: int = 1,
    size: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate ``request.n`` images per prompt into ``out``, ``batch_size`` at a time; returns
    the PNG paths. Each image is written, with its manifest line, as soon as its batch is done,
    so an interrupted run keeps every finished image. ``size`` is (height, width).

    With a seed S, image k of the whole run gets seed S + k, so any image can be made again
    alone with its recorded seed; with none, S is drawn once and recorded.
    """
    loras = [lora_entry(path, scale) for path, scale in request.loras]
    loaded = []
    try:  # the LoRAs are loaded for this run only: the pipeline is left as it was
        for i, lora in enumerate(loras):  # two files of one name (a/x, b/x) load apart
            name = lora["name"] if i == 0 else f"{lora['name']}-{i}"
            loaded.append(pipe.load_lora(lora["path"], lora["scale"], name=name))
        extra = {"loras": loras} if loras else {}
        return _generate(pipe, request, Path(out), extra, grid, batch_size, size, progress)
    finally:
        for name in loaded:
            pipe.unload_lora(name)


def lora_entry(path: str, scale: float) -> dict:
    """How a LoRA of a run is recorded (PNG parameters, manifest): A1111's name and hash, the
    file and the scale."""
    return {
        "name": a1111_lora_name(path),
        "hash": lora_hash(path),
        "path": str(path),
        "scale": scale,
    }


def _generate(pipe, request, out, lora_record, grid, batch_size, size, progress) -> list[Path]:
    """`generate_to_folder`'s work once its LoRAs are loaded; ``lora_record`` goes into every
    image's record."""
    if request.init_image is not None and request.strength is None:
        request = dataclasses.replace(request, strength=GENERATION.strength)
    height, width = size if size is not None else output_size(request, pipe.downscale_factor)
    init, init_record = None, None
    if request.init_image is not None:
        init = imaging.from_pil(request.init_image, (width, height))  # (1, 3, H, W), resized
        init_record = {
            "init_image": str(request.init_image),
            "init_sha256": sha256(request.init_image),
        }
    seed = request.seed if request.seed is not None else draw_seed()
    jobs = [
        (prompt, seed + k)
        for k, prompt in enumerate(p for p in request.prompts for _ in range(request.n))
    ]
    common = dict(
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        sampler=request.sampler,
        sigmas=request.sigmas,
        eta=request.eta,
    )
    out.mkdir(parents=True, exist_ok=True)
    paths, pil_images = [], []
    bar = tqdm(total=len(jobs), desc="images", unit="image", disable=not progress or len(jobs) == 1)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts, seeds = [p for p, _ in chunk], [s for _, s in chunk]
        steps_bar = progress and len(jobs) == 1
        if init is None:
            result = pipe(
                prompts, height=height, width=width, seed=seeds, progress=steps_bar, **common
            )
        else:
            result = pipe.img2img(
                prompts, init, strength=request.strength, seed=seeds, progress=steps_bar, **common
            )
        for image, record in zip(result.images, result.parameters, strict=True):
            path = save_image(out, image, record | (init_record or {}) | lora_record)
            paths.append(path)
            if grid:
                pil_images.append(image)
            logger.debug("wrote %s", path)
        bar.update(len(chunk))
    bar.close()
    if grid and pil_images:
        grid_path = imaging.next_free_path(out, "grid")
        imaging.save_png(
            imaging.make_grid(pil_images, cols=request.n if len(request.prompts) > 1 else None),
            grid_path,
        )
        paths.append(grid_path)
    return paths


def save_image(out: Path, image, record: dict) -> Path:
    """Write one PNG with its settings (atomically: a kill never leaves half a PNG), then
    append its line to ``out/manifest.jsonl``."""
    for _ in range(100):  # another process may take the same index: try the next one
        path = imaging.next_free_path(out, str(record["seed"]))
        try:
            imaging.save_png(image, path, imaging.format_parameters(record))
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not find a free file name in {out}")
    line = {key: record.get(key) for key in MANIFEST_KEYS} | {"file": path.name}
    with open(out / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path
