"""What a pipeline call returns: the images, their seeds and each image's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image
from torch import Tensor

from ldm import images as imaging
from ldm.config.names import OutputType


@dataclass
class GenerationResult:
    """What a pipeline call returns: ``images`` in the requested output type, the seed of each
    image (image k reproduces alone with ``seed=seeds[k]``) and each image's settings."""

    images: list[Image.Image] | Tensor | object
    seeds: list[int | None]
    parameters: list[dict] = field(default_factory=list)


def as_output_type(images: Tensor, output_type: OutputType) -> list[Image.Image] | Tensor | object:
    """Decoded images (B, 3, H, W) in [-1, 1] as ``output_type``: ``pil``, ``np`` ((B, H, W, 3)
    in [0, 1]) or ``pt`` ((B, 3, H, W) in [0, 1]); ``latent`` never reaches here."""
    if output_type == "pt":
        return imaging.to_unit_range(images)
    if output_type == "np":
        return imaging.to_numpy(images)
    return imaging.to_pil(images)
