"""ldm: conditional text-to-image latent diffusion.

    from ldm import LatentDiffusionPipeline

The pipeline (and the libraries behind it: diffusers, transformers, open_clip) is imported on
first use, so that ``import ldm`` and ``ldm --help`` stay fast.
"""

from ldm.config import DEFAULT_MODEL

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "LatentDiffusionPipeline", "__version__"]


def __getattr__(name: str):
    if name == "LatentDiffusionPipeline":
        from ldm.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
