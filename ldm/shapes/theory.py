"""The experiments behind docs/theory.md: how much of an image survives noising.

Why does image-to-image at strength 1 (or sampling from a fully noised image) give a new image,
while a low strength gives the input back? And why does DDIM inversion give it back from x_T?

- `img2img_sweep`: image-to-image from ground-truth shapes renders at several strengths; per
  image, the PSNR to the input and the share of its five attributes the detector still reads.
- `inversion_roundtrip`: DDIM inversion then DDIM sampling, against DDIM sampling from the same
  image noised to the first timestep by the forward process with random noise.
- `start_snr`, `information_bound_bits`, `schedule_ends`: what the noise schedule alone says.
- `run_theory`: all of them on N shapes images, with the numbers that the page quotes;
  `format_tables` (`ldm.shapes.theory_tables`) writes the page's tables from them.

Everything is seeded: the same arguments give the same numbers. Images are PIL, 8-bit, and
PSNR is computed on them as a user sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm import images as imaging
from ldm.config import GENERATION
from ldm.diffusion.registry import img2img_start
from ldm.diffusion.schedule import NoiseSchedule, make_timesteps
from ldm.pipeline import LatentDiffusionPipeline
from ldm.shapes.detector import detect
from ldm.shapes.theory_tables import format_tables
from ldm.shapes.world import ATTRIBUTES, ShapeSpec, render, sample_specs

__all__ = [  # format_tables lives in ldm.shapes.theory_tables; it is importable from here too
    "SCHEDULES",
    "STRENGTHS",
    "Img2ImgSweep",
    "InversionResult",
    "TheoryRun",
    "attributes_kept",
    "format_tables",
    "img2img_sweep",
    "information_bound_bits",
    "inversion_roundtrip",
    "psnr",
    "run_theory",
    "schedule_ends",
    "start_snr",
    "to_array",
]

# DDIM steps of every experiment here: docs/theory.md's figures were measured at 50, whatever
# the generation default (`GENERATION`) is
THEORY_STEPS = 50
STRENGTHS = tuple(k / 10 for k in range(11))  # 0.0, 0.1, ..., 1.0
SCHEDULES = {  # name: NoiseSchedule arguments, for the schedule comparison
    "linear": dict(kind="linear", beta_start=1e-4, beta_end=0.02),  # DDPM's
    "scaled_linear": dict(kind="scaled_linear"),  # Stable Diffusion's, and the default model's
    "cosine": dict(kind="cosine"),
    "scaled_linear_zero_snr": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


# ----------------------------------------------------------------------------- measures


def to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """RGB images -> (B, H, W, 3) float64 in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255 for im in images])


def psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB (`ldm.images.psnr`) of (B, H, W, 3) arrays in [0, 1]; (B,), inf
    where an image equals its reference."""
    return imaging.psnr(torch.from_numpy(images), torch.from_numpy(references), 1.0).numpy()


def attributes_kept(specs: Sequence[ShapeSpec], images: Sequence[Image.Image]) -> np.ndarray:
    """(B,) the share of the five attributes (`ldm.shapes.world.ATTRIBUTES`) that `detect`
    reads in image b as ``specs[b]`` has them: 1.0 when all five are kept."""
    kept = [
        np.mean([getattr(detect(image), a) == getattr(spec, a) for a in ATTRIBUTES])
        for spec, image in zip(specs, images, strict=True)
    ]
    return np.asarray(kept, dtype=np.float64)


def start_snr(
    schedule: NoiseSchedule,
    num_steps: int,
    strength: float,
    *,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
) -> tuple[int | None, float]:
    """(t, SNR(t)) where image-to-image at this strength starts
    (`ldm.diffusion.registry.img2img_start`).

    t is None at the ends: strength 1 starts from pure noise (SNR 0), strength 0 runs no step
    and returns the input (SNR inf).
    """
    x0, noise = torch.zeros(1, 1), torch.ones(1, 1)
    spacing = dict(timestep_spacing=timestep_spacing, steps_offset=steps_offset)
    _, start = img2img_start(schedule, x0, noise, num_steps, strength, **spacing)
    if start == 0:
        return None, 0.0
    if start == num_steps:
        return None, math.inf
    t = make_timesteps(num_steps, schedule.num_train_timesteps, **spacing)[start]
    return int(t), float(schedule.snr(t[None]))


def information_bound_bits(snr: float, dims: int, power: float = 1.0) -> float:
    """An upper bound, in bits, on the mutual information I(x_0; x_t) between a latent of
    ``dims`` elements with mean square ``power`` and its noisy version at signal-to-noise ratio
    ``snr``: x_t / sqrt(alpha_bar) = x_0 + noise of variance 1 / SNR is a Gaussian channel, whose
    capacity is dims / 2 * log2(1 + power * SNR) (Shannon 1948)."""
    return dims / 2 * math.log2(1 + power * snr) if math.isfinite(snr) else math.inf


def schedule_ends(schedule: NoiseSchedule) -> dict[str, float]:
    """alpha_bar, sqrt(alpha_bar) and SNR at the first (t = 0) and last (t = T - 1) timestep."""
    ends = torch.tensor([0, schedule.num_train_timesteps - 1])
    alpha_bar = schedule.alphas_cumprod64[ends]
    snr = schedule.snr(ends)
    return {
        "alpha_bar_0": float(alpha_bar[0]),
        "alpha_bar_last": float(alpha_bar[1]),
        "sqrt_alpha_bar_last": float(alpha_bar[1].sqrt()),
        "snr_0": float(snr[0]),
        "snr_last": float(snr[1]),
    }


def _rms(a: Tensor, b: Tensor) -> np.ndarray:
    """Per-sample RMS difference of (B, ...) tensors, (B,)."""
    return ((a - b) ** 2).flatten(1).mean(1).sqrt().numpy().astype(np.float64)


def _finite(values) -> list[float | None]:
    """Floats for JSON, which has no inf or NaN: those become None (null)."""
    return [v if math.isfinite(v) else None for v in map(float, values)]


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


# ----------------------------------------------------------------------------- image-to-image


@dataclass
class Img2ImgSweep:
    """Image-to-image outputs at S strengths for B inputs, with their scores."""

    strengths: list[float]
    start_timesteps: list[int | None]  # (S,) None at strength 0 and 1
    snr: list[float]  # (S,) SNR at the start: inf at strength 0, 0 at strength 1
    psnr: np.ndarray  # (S, B) dB, output against the input render
    kept: np.ndarray  # (S, B) share of the input's five attributes read in the output
    kept_chance: np.ndarray  # (S, B) the same against another input's attributes: chance level
    images: list[list[Image.Image]] = field(repr=False)  # S lists of B outputs

    def summary(self) -> dict[str, list]:
        """Means over the B images per strength, as JSON-ready lists (inf becomes None)."""
        return {
            "strength": self.strengths,
            "start_timestep": self.start_timesteps,
            "snr": _finite(self.snr),
            "psnr_mean": _finite(self.psnr.mean(1)),
            "psnr_std": _finite(self.psnr.std(1)),
            "kept_mean": self.kept.mean(1).tolist(),
            "all_kept": (self.kept == 1).mean(1).tolist(),
            "kept_chance": self.kept_chance.mean(1).tolist(),
        }


@torch.no_grad()
def img2img_sweep(
    pipe: LatentDiffusionPipeline,
    specs: Sequence[ShapeSpec],
    strengths: Sequence[float] = STRENGTHS,
    *,
    prompt: str | Sequence[str] = "",
    guidance_scale: float = 1.0,
    num_steps: int = THEORY_STEPS,
    seed: int = 0,
) -> Img2ImgSweep:
    """Image-to-image (`LatentDiffusionPipeline.img2img`, DDIM, eta 0) from the renders of
    ``specs`` (B images, one batch) at each strength.

    The default empty prompt at guidance 1 samples the unconditional model, so no text pulls
    the output back to the input's attributes; pass one prompt per spec (e.g. the captions) to
    see the text do so. Image b uses seed ``seed + b`` at every strength, so the strengths differ
    only in how far the same noise goes.
    """
    inputs = [render(spec) for spec in specs]
    reference = to_array(inputs)  # (B, H, W, 3)
    prompts = [prompt] * len(specs) if isinstance(prompt, str) else list(prompt)
    others = [*specs[1:], specs[0]]  # each image scored against its neighbour's attributes
    starts, snrs, scores, kept, chance, outputs = [], [], [], [], [], []
    for strength in strengths:
        t, snr = start_snr(pipe.schedule, num_steps, strength, **pipe.scheduler_config.spacing)
        result = pipe.img2img(
            prompts,
            inputs,
            strength=strength,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            sampler="ddim",
            seed=seed,
            progress=False,
        )
        starts.append(t)
        snrs.append(snr)
        scores.append(psnr(to_array(result.images), reference))
        kept.append(attributes_kept(specs, result.images))
        chance.append(attributes_kept(others, result.images))
        outputs.append(result.images)
    return Img2ImgSweep(
        list(map(float, strengths)),
        starts,
        snrs,
        np.stack(scores),
        np.stack(kept),
        np.stack(chance),
        outputs,
    )


# ----------------------------------------------------------------------------- inversion


@dataclass
class InversionResult:
    """DDIM reconstructions of B inputs from inverted and from forward-noised x_T.

    Every dict is keyed by method: ``vae`` (the VAE round trip, no diffusion), ``inverted_k``
    (DDIM inversion with k fixed-point iterations, then DDIM) and ``noised_seed_s`` (x_0 noised
    to the first timestep with noise from seed s, then DDIM).
    """

    first_timestep: int
    latent_power: float  # mean of x_0 ** 2 over all latent elements
    psnr: dict[str, np.ndarray]  # (B,) dB against the input render
    kept: dict[str, np.ndarray]  # (B,) share of the five attributes kept
    latent_rms: dict[str, np.ndarray]  # (B,) RMS of the final latent minus x_0
    x_T_std: dict[str, float]  # std of the x_T that sampling started from
    images: dict[str, list[Image.Image]] = field(repr=False)

    def summary(self) -> dict:
        """JSON-ready: mean and std over the B images of each score, per method."""
        return {
            "first_timestep": self.first_timestep,
            "latent_power": self.latent_power,
            **{
                name: {
                    "psnr": _stats(self.psnr[name]),
                    "kept_mean": float(self.kept[name].mean()),
                    "all_kept": float((self.kept[name] == 1).mean()),
                    "latent_rms": _stats(self.latent_rms[name]),
                    "x_T_std": self.x_T_std.get(name),
                }
                for name in self.psnr
            },
        }


@torch.no_grad()
def inversion_roundtrip(
    pipe: LatentDiffusionPipeline,
    specs: Sequence[ShapeSpec],
    *,
    num_steps: int = THEORY_STEPS,
    fixed_point_iters: Sequence[int] = (0, 2),
    noise_seeds: Sequence[int] = (0, 1),
    prompt: str = "",
) -> InversionResult:
    """Reconstruct the renders of ``specs`` (B images, one batch) by deterministic DDIM (eta 0,
    guidance 1, the empty prompt by default) from two kinds of x_T (B, C, h, w):

    - ``pipe.invert`` (`ldm.diffusion.samplers.invert_ddim`): the x_T that DDIM maps back to x_0;
    - the forward process, DDPM eq. (4), to the sampler's first timestep with noise drawn from
      ``torch.Generator().manual_seed(s)`` for each s in ``noise_seeds``.
    """
    inputs = [render(spec) for spec in specs]
    reference = to_array(inputs)  # (B, H, W, 3)
    prompts = [prompt] * len(specs)
    x0 = pipe.encode_images(inputs)  # (B, C, h, w)
    height, width = (d * pipe.downscale_factor for d in x0.shape[-2:])
    timesteps = make_timesteps(
        num_steps, pipe.schedule.num_train_timesteps, **pipe.scheduler_config.spacing
    )
    first = timesteps[0]
    starts = {}
    for k in fixed_point_iters:
        starts[f"inverted_{k}"] = pipe.invert(
            prompts, inputs, num_inference_steps=num_steps, fixed_point_iters=k, progress=False
        )
    for seed in noise_seeds:
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        t = first.expand(len(specs))  # (B,)
        starts[f"noised_seed_{seed}"] = pipe.schedule.add_noise(x0, eps.to(x0.device), t)
    finals = {"vae": x0}
    for name, x_T in starts.items():
        finals[name] = pipe(
            prompts,
            latents=x_T,
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=1.0,
            sampler="ddim",
            eta=0.0,
            seed=0,  # unused at eta 0: the path from x_T is deterministic
            output_type="latent",
            progress=False,
        ).images
    images = {name: imaging.to_pil(pipe.decode(x)) for name, x in finals.items()}
    return InversionResult(
        int(first),
        float((x0**2).mean()),
        {name: psnr(to_array(ims), reference) for name, ims in images.items()},
        {name: attributes_kept(specs, ims) for name, ims in images.items()},
        {name: _rms(x.float().cpu(), x0.float().cpu()) for name, x in finals.items()},
        {name: float(x.std()) for name, x in starts.items()},
        images,
    )


# ----------------------------------------------------------------------------- all of it


@dataclass
class TheoryRun:
    """What `run_theory` measured: ``results`` holds the JSON-ready numbers."""

    specs: list[ShapeSpec]
    unconditional: Img2ImgSweep
    prompted: Img2ImgSweep
    inversion: InversionResult
    results: dict


def run_theory(
    pipe: LatentDiffusionPipeline,
    *,
    n: int = 64,
    num_steps: int = THEORY_STEPS,
    seed: int = 0,
    guidance_scale: float = GENERATION.guidance_scale,
) -> TheoryRun:
    """The experiments of docs/theory.md on ``n`` training-distribution shapes renders
    (`ldm.shapes.world.sample_specs` with ``seed``): `img2img_sweep` at `STRENGTHS` with the empty
    prompt at guidance 1 and with the captions at ``guidance_scale``, `inversion_roundtrip`,
    the ends of the `SCHEDULES`, and `information_bound_bits` at each strength's start."""
    specs = sample_specs(n, seed=seed)
    common = dict(num_steps=num_steps, seed=seed)
    uncond = img2img_sweep(pipe, specs, **common)
    captions = [spec.caption() for spec in specs]
    prompted = img2img_sweep(pipe, specs, prompt=captions, guidance_scale=guidance_scale, **common)
    inversion = inversion_roundtrip(pipe, specs, num_steps=num_steps)
    image = render(specs[0])
    latent_shape = [  # [C, h, w], as the VAE encodes the image
        pipe.unet.config.in_channels,
        image.height // pipe.downscale_factor,
        image.width // pipe.downscale_factor,
    ]
    dims = math.prod(latent_shape)
    bits = [information_bound_bits(snr, dims, inversion.latent_power) for snr in uncond.snr]
    results = {
        "model": pipe.name,
        "n": n,
        "num_steps": num_steps,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "image_shape": [image.height, image.width, 3],
        "latent_shape": latent_shape,
        "compression": image.height * image.width * 3 / dims,
        "schedules": {name: schedule_ends(NoiseSchedule(**kw)) for name, kw in SCHEDULES.items()},
        "model_schedule": {"kind": pipe.schedule.kind, **schedule_ends(pipe.schedule)},
        "img2img": {
            "unconditional": {**uncond.summary(), "information_bound_bits": _finite(bits)},
            "prompted": prompted.summary(),
        },
        "inversion": inversion.summary(),
    }
    return TheoryRun(specs, uncond, prompted, inversion, results)
