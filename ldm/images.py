"""Images: tensors <-> PIL, contact sheets, and generation settings stored in PNG files.

Settings go into a PNG text chunk named ``parameters`` in the layout that popular Stable
Diffusion web UIs read and write::

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: shapes

Samplers and schedules go by A1111's names (`ldm.config.names.A1111_SAMPLERS`).

The chunk is tEXt when the text is Latin-1 and iTXt (UTF-8) otherwise. Files are created
exclusively and atomically: an existing file is never overwritten, and a killed write
leaves no half-written PNG.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from ldm.config.names import (
    A1111_SAMPLERS,
    A1111_SCHEDULES,
    SIGMA_SAMPLERS,
    a1111_name,
    split_schedule_suffix,
)

PARAMETERS_KEY = "parameters"
# One "Key: value" of the settings line; a value in double quotes is JSON (as the web UIs quote).
FIELD = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def to_unit_range(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> float32 in [0, 1], clamped."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, 10 log10(data_range^2 / MSE), of (B, ...)
    images; ``data_range`` is 2 for [-1, 1] and 1 for [0, 1]. inf where x equals y."""
    mse = (x - y).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(data_range**2 / mse)


def to_numpy(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1]."""
    return to_unit_range(images).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounding x * 255 as diffusers does."""
    return [Image.fromarray(a) for a in (to_numpy(images) * 255).round().astype(np.uint8)]


def from_pil(image: Image.Image | str | Path, size: tuple[int, int] | None = None) -> Tensor:
    """An image (or its path) -> (1, 3, H, W) float32 in [-1, 1]; resized to ``size`` = (W, H)
    with Lanczos filtering when given. Transparent images are composited on white."""
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        image = Image.open(path)
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """A contact sheet: images left to right, top to bottom, ``cols`` wide (default: square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def format_parameters(p: dict) -> str:
    """The web-UI ``parameters`` text for a generation record (see the module docstring)."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    sampler, schedule = a1111_name(p["sampler"], p.get("sigmas"))
    fields = [
        f"Steps: {p['steps']}",
        f"Sampler: {sampler}",
        *([f"Schedule type: {schedule}"] if schedule else []),
        f"CFG scale: {p['guidance_scale']:g}",
        f"Seed: {p['seed']}",
        f"Size: {p['width']}x{p['height']}",
        f"Model: {p['model']}",
    ]
    if p.get("eta"):
        fields.append(f"Eta: {p['eta']:g}")
    if p.get("strength") is not None:
        fields.append(f"Denoising strength: {p['strength']:g}")
    if p.get("init_image") is not None:  # quoted as JSON: a path may hold ", "
        fields.append(f"Init image: {json.dumps(str(p['init_image']), ensure_ascii=False)}")
        fields.append(f"Init image SHA256: {p['init_sha256']}")
    if p.get("loras"):  # A1111's hashes, then ldm's files and scales (JSON: paths hold ", ")
        hashes = ", ".join(f"{lora['name']}: {lora['hash'][:12]}" for lora in p["loras"])
        files = [[lora["path"], lora["scale"]] for lora in p["loras"]]
        fields.append(f"Lora hashes: {json.dumps(hashes)}")
        fields.append(
            f"Lora: {json.dumps(json.dumps(files, ensure_ascii=False), ensure_ascii=False)}"
        )
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _schedule_before_schedule_type(sampler: str) -> str | None:
    """A1111 before 1.9 wrote no ``Schedule type``: the sampler's name carried it ("DPM++ 2M
    Karras"), and without one it was Uniform, whatever ldm's automatic schedule is now."""
    name, schedule = split_schedule_suffix(sampler)
    is_sigma_sampler = {v: k for k, v in A1111_SAMPLERS.items()}.get(name, name) in SIGMA_SAMPLERS
    return "default" if is_sigma_sampler and schedule is None else None


def parse_parameters(text: str) -> dict:
    """Read a ``parameters`` text back into a generation record (the fields this module writes)."""
    lines = text.strip("\n").split("\n")
    if len(lines) < 2 or not lines[-1].startswith("Steps: "):
        raise ValueError("not a 'parameters' text: its last line must start with 'Steps: '")
    fields = {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in FIELD.findall(lines[-1])
    }
    body = lines[:-1]
    negative = ""
    if body and body[-1].startswith("Negative prompt: "):
        negative = body.pop().removeprefix("Negative prompt: ")
    width, height = (int(v) for v in fields["Size"].split("x"))
    samplers = {v: k for k, v in A1111_SAMPLERS.items()}
    schedules = {v: k for k, v in A1111_SCHEDULES.items()}  # "Automatic": the sampler's own
    record = {
        "prompt": "\n".join(body),
        "negative_prompt": negative,
        "steps": int(fields["Steps"]),
        "sampler": samplers.get(fields["Sampler"], fields["Sampler"]),
        "sigmas": schedules.get(fields["Schedule type"])
        if "Schedule type" in fields
        else _schedule_before_schedule_type(fields["Sampler"]),
        "guidance_scale": float(fields["CFG scale"]),
        "seed": int(fields["Seed"]),
        "width": width,
        "height": height,
        "model": fields.get("Model"),
        "eta": float(fields.get("Eta", 0.0)),
        "strength": float(fields["Denoising strength"]) if "Denoising strength" in fields else None,
    }
    if "Init image" in fields:  # image-to-image: the image it started from
        record["init_image"] = fields["Init image"]
        record["init_sha256"] = fields.get("Init image SHA256")
    if "Lora hashes" in fields:  # A1111 writes no files: their paths are then None
        record["loras"] = _parse_loras(fields["Lora hashes"], json.loads(fields.get("Lora", "[]")))
    return record


def _parse_loras(hashes: str, files: list) -> list[dict]:
    """``Lora hashes`` ("name: 12 hex, ...") and ldm's ``Lora`` ([[path, scale], ...], in the
    same order) -> [{"name", "hash", "path", "scale"}]."""
    pairs = [item.split(": ", 1) for item in hashes.split(", ") if ": " in item]
    loras = [{"name": name, "hash": short, "path": None, "scale": 1.0} for name, short in pairs]
    for lora, (path, scale) in zip(loras, files, strict=False):
        lora |= {"path": path, "scale": float(scale)}
    return loras


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write a PNG with an optional ``parameters`` chunk; fails if ``path`` exists."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        try:
            parameters.encode("latin-1")
            info.add_text(PARAMETERS_KEY, parameters)
        except UnicodeEncodeError:
            info.add_itxt(PARAMETERS_KEY, parameters)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:  # follows the umask
            image.save(f, format="PNG", pnginfo=info)
        os.link(tmp, path)  # atomic and exclusive: never half a PNG, never an overwrite
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_parameters(path: str | Path) -> str:
    """The ``parameters`` text stored in a PNG; ValueError if it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    with Image.open(path) as image:
        text = image.text.get(PARAMETERS_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{path} holds no '{PARAMETERS_KEY}' text chunk with generation settings")
    return text


def next_free_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """``folder/NNNNN-stem.suffix`` with the first index not yet used in the folder."""
    used = [int(p.name[:5]) for p in folder.glob(f"[0-9][0-9][0-9][0-9][0-9]-*{suffix}")]
    index = max(used, default=-1) + 1
    return folder / f"{index:05d}-{stem}{suffix}"
