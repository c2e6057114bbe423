"""The generation defaults, in one dataclass: the pipeline's keyword defaults, the CLI's
defaults and help texts, validation during training and evaluation all read `GENERATION`."""

from __future__ import annotations

from dataclasses import dataclass

from ldm.config.names import SamplerName


@dataclass(frozen=True)
class GenerationDefaults:
    """What an image is made with when nothing else is said (diffusers' and A1111's defaults).

    ``num_inference_steps``: sampler steps. ``guidance_scale``: classifier-free guidance, 1
    means none. ``sampler``: one of `ldm.SAMPLERS`. ``eta``: DDIM's noise, 0 deterministic.
    ``strength``: image-to-image, the share of the schedule that is re-run (0 keeps the image,
    1 ignores it). ``negative_prompt``: the prompt guidance steers away from; "" is the one
    that caption dropout trains on.
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    sampler: SamplerName = "ddim"
    eta: float = 0.0
    strength: float = 0.8
    negative_prompt: str = ""


GENERATION = GenerationDefaults()
# `ldm generate`'s default --batch-size is the most that fits the memory, at most this
MAX_BATCH = 8
