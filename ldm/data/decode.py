"""Images as training tensors: open any image file or ``datasets`` row as upright 8-bit RGB
(`load_image`, listing each conversion made), then resize, crop and flip (`transform_image`)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ldm.config import DataConfig
from ldm.images import from_pil

EXIF_ORIENTATION = 0x0112
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# PIL raises any of these on a corrupt file, depending on the format plugin.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)


class SampleError(ValueError):
    """A sample that cannot be used; the message is the reason shown in the report."""


def _open(source: Any) -> Image.Image:
    """A PIL image, not yet decoded, from a path, a ``datasets`` cell or a PIL image."""
    if isinstance(source, Path):
        if not source.is_file():
            raise SampleError("file not found")
        if source.stat().st_size == 0:
            raise SampleError("empty file (0 bytes)")
        return Image.open(source)
    if isinstance(source, dict):  # a datasets Image(decode=False) cell: {"bytes", "path"}
        if source.get("bytes"):
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path"):
            return _open(Path(source["path"]))
        raise SampleError("image cell holds neither bytes nor a path")
    if isinstance(source, Image.Image):
        return source
    raise SampleError(f"missing image (got {type(source).__name__})")


def load_image(source: Path | dict | Image.Image) -> tuple[Image.Image, list[str]]:
    """Decode an image fully and convert it to upright 8-bit RGB.

    Returns the RGB image (original size, after EXIF rotation) and the list of conversions
    applied. Raises `SampleError` with the reason when the image cannot be used.
    """
    try:
        with _open(source) as image:
            image.load()  # decodes everything: truncated and corrupt files fail here
            rgb, done = _to_rgb(image)
            return (rgb.copy() if rgb is image else rgb), done  # `with` closes `image`
    except UnidentifiedImageError as error:
        raise SampleError("not an image (PIL cannot identify the format)") from error
    except SampleError:
        raise
    except FileNotFoundError as error:
        raise SampleError("file not found") from error
    except (*DECODE_ERRORS, Image.DecompressionBombError) as error:
        if "truncated" in str(error).lower():
            raise SampleError("truncated image") from error
        raise SampleError(f"corrupt image ({type(error).__name__}: {error})") from error


def _to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Upright 8-bit RGB and the conversions made (see the module docstring)."""
    done = []
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        done.append(f"EXIF orientation {orientation} applied")
    mode = image.mode
    if mode in HIGH_BIT_MODES:  # I;16*: 16-bit; I and F: 16-bit if a value exceeds 255
        array = np.asarray(image, dtype=np.float64)  # (H, W)
        if mode.startswith("I;16") or array.max() > 255:
            array = np.clip(array, 0, 65535) / 257  # 65535 -> 255, 32768 -> 127.5
        done.append(f"{mode} -> 8-bit")
        image = Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8))  # mode L
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
        done.append(f"transparency ({mode}) composited on white")
    elif image.mode != "RGB":
        kind = {"L": "grayscale", "1": "1-bit", "P": "palette"}.get(image.mode, image.mode)
        image = image.convert("RGB")
        done.append(f"{kind} -> RGB")
    return image, done


def transform_image(
    image: Image.Image, config: DataConfig, generator: torch.Generator | None = None
) -> Tensor:
    """RGB image (W, H) -> (3, R, R) float32 in [-1, 1], R = ``config.resolution``.

    The shorter side is resized to R (Lanczos), then an R x R square is cropped at the centre, or
    at a random offset drawn from ``generator`` when ``center_crop`` is False; with
    ``random_flip`` it is flipped left-right with probability 1/2, also drawn from ``generator``.
    """
    r = config.resolution
    w, h = image.size
    scale = r / min(w, h)
    size = (max(r, round(w * scale)), max(r, round(h * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    w, h = size
    if config.center_crop:
        left, top = (w - r) // 2, (h - r) // 2
    else:
        left = int(torch.randint(0, w - r + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - r + 1, (1,), generator=generator))
    image = image.crop((left, top, left + r, top + r))
    if config.random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return from_pil(image)[0]  # (3, R, R)


# Sources: each yields candidates that scan() checks.
