"""ldm: conditional text-to-image latent diffusion.

The public API, importable from the top level::

    from ldm import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained()  # the shipped default model
    image = pipe("a large red circle in the center on a blue background", seed=0).images[0]

Each name but the configs is imported on first use, so that ``import ldm`` and ``ldm --help``
stay fast and never load accelerate, diffusers, transformers or open_clip before they are needed.
The layers behind it are the subpackages (docs/architecture.md): ``config`` at the bottom;
``diffusion``, ``nn``, ``encoders`` and ``formats`` above it; ``data`` and ``pipeline``; then
``shapes`` and ``training``; ``cli`` at the top.
"""

from importlib import import_module

from ldm.config import DEFAULT_MODEL, GENERATION, TrainConfig

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first read
_LAZY = {
    "LatentDiffusionPipeline": "ldm.pipeline",
    "GenerationResult": "ldm.pipeline",
    "UNet": "ldm.nn.unet",
    "NoiseSchedule": "ldm.diffusion.schedule",
    "SAMPLERS": "ldm.diffusion.registry",
    "guided_eps_fn": "ldm.diffusion.samplers",
    "gaussian_model_fn": "ldm.diffusion.analytic",
    "train": "ldm.training.denoiser",
}

__all__ = ["DEFAULT_MODEL", "GENERATION", "TrainConfig", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # read once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
