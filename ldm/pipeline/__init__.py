"""The Python API: text-to-image, image-to-image and DDIM inversion with a latent diffusion model.

    pipe = LatentDiffusionPipeline.from_pretrained("path/to/model")   # a diffusers folder
    result = pipe("a large red circle in the center on a blue background", seed=42)
    result.images[0].save("circle.png")

The modules: `latent_diffusion` (the pipeline), `result` (what a call returns), `checks` (its
argument checks and per-image seeds), `loading` (model folders and single files), `request`
and `folder` (what ``ldm generate`` does), `convert` (what ``ldm convert`` does).
"""

from ldm.pipeline.latent_diffusion import LatentDiffusionPipeline
from ldm.pipeline.result import GenerationResult

__all__ = ["GenerationResult", "LatentDiffusionPipeline"]
