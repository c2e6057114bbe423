"""The Python API: text-to-image, image-to-image and DDIM inversion with a latent diffusion model.

    pipe = LatentDiffusionPipeline.from_pretrained("path/to/model")   # a diffusers folder
    result = pipe("a large red circle in the center on a blue background", seed=42)
    result.images[0].save("circle.png")

A pipeline is four parts: our U-Net, a frozen VAE, a frozen CLIP text encoder and a scheduler
config. The sampling loops live in `ldm.diffusion.samplers`; this module prepares their inputs, runs
them under classifier-free guidance and decodes the result.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from ldm import images as imaging
from ldm.config import DEFAULT_MODEL, SchedulerConfig, UNetConfig
from ldm.diffusion.samplers import (
    guided_eps_fn,
    img2img_start,
    invert_ddim,
    randn_like,
    sample_ddim,
    sample_ddpm,
)
from ldm.diffusion.schedule import NoiseSchedule
from ldm.encoders.text import FrozenTextEncoder
from ldm.encoders.vae import FrozenVAE
from ldm.files import follow_umask
from ldm.formats.single_file import (
    carried_configs,
    check_weight_files,
    load_single_file_components,
    save_single_file,
)
from ldm.nn.unet import UNet

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
OutputType = Literal["pil", "np", "pt", "latent"]
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclass
class GenerationResult:
    """What a pipeline call returns: ``images`` in the requested output type, the seed of each
    image (image k reproduces alone with ``seed=seeds[k]``) and each image's settings."""

    images: list[Image.Image] | Tensor | object
    seeds: list[int | None]
    parameters: list[dict] = field(default_factory=list)


class LatentDiffusionPipeline:
    """Text-to-image latent diffusion: our U-Net, a frozen VAE and a frozen text encoder."""

    def __init__(
        self,
        unet: UNet,
        vae: FrozenVAE,
        text_encoder: FrozenTextEncoder,
        scheduler_config: SchedulerConfig | None = None,
        *,
        name: str = "model",
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae, self.text_encoder = vae, text_encoder
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.name = name
        s = self.scheduler_config
        self.schedule = NoiseSchedule(
            s.beta_schedule,
            s.num_train_timesteps,
            s.beta_start,
            s.beta_end,
            rescale_betas_zero_snr=s.rescale_betas_zero_snr,
            prediction_type=s.prediction_type,
        )

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LatentDiffusionPipeline:
        """Load a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/,
        tokenizer/, scheduler/), such as `StableDiffusionPipeline.save_pretrained` writes.
        With no ``path``, the shipped default model (`ldm.DEFAULT_MODEL`)."""
        path = Path(path) if path is not None else DEFAULT_MODEL
        if not path.is_dir():
            raise FileNotFoundError(f"no model folder at {path}")
        missing = [
            p for p in ("unet", "vae", "text_encoder", "tokenizer") if not (path / p).is_dir()
        ]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a pipeline folder: it lacks {', '.join(p + '/' for p in missing)}"
            )
        check_weight_files(path)  # a truncated or foreign file: one error naming it
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        scheduler = (
            SchedulerConfig.from_dict(json.loads(scheduler_file.read_text()))
            if scheduler_file.is_file()
            else None
        )
        pipe = cls(
            UNet.from_pretrained(path / "unet"),
            FrozenVAE.from_pretrained(path / "vae"),
            FrozenTextEncoder.from_pretrained(path),
            scheduler,
            name=_model_name(path),
        )
        return pipe.to(device, dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        prediction_type: str | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        unet_config: UNetConfig | str | None = None,
        vae_config: dict | None = None,
        text_encoder_config: dict | None = None,
        unsafe_pickle: bool = False,
    ) -> LatentDiffusionPipeline:
        """Load an original Stable Diffusion 1.x/2.x checkpoint (``.safetensors`` or ``.ckpt``)
        with the configs shipped in the package (`ldm.formats.single_file.load_single_file_components`).

        An SD 2 checkpoint's prediction type cannot be read from its weights: 768-v models
        predict ``v_prediction``, 512-base models ``epsilon``. Say which with
        ``prediction_type``; SD 1.x defaults to ``epsilon``.
        """
        unet, vae, text_encoder, version = load_single_file_components(
            path,
            unet_config=unet_config,
            vae_config=vae_config,
            text_encoder_config=text_encoder_config,
            unsafe_pickle=unsafe_pickle,
        )
        if prediction_type is None and version == "sd2":
            raise ValueError(
                f"{path} is a Stable Diffusion 2 checkpoint, whose weights do not say whether it "
                "predicts eps or v: pass prediction_type='v_prediction' (768-v models) or "
                "'epsilon' (512-base models)"
            )
        carried = carried_configs(path).get("scheduler")
        if carried is not None:  # written by ldm: its own schedule, prediction type included
            scheduler = SchedulerConfig.from_dict(carried)
            if prediction_type is not None:
                scheduler.prediction_type = prediction_type
        else:
            scheduler = SchedulerConfig(prediction_type=prediction_type or "epsilon")
        return cls(unet, vae, text_encoder, scheduler, name=Path(path).stem).to(device, dtype)

    def save_single_file(self, path: str | Path) -> None:
        """Write the weights as an original SD 1.x-style single file (``.safetensors``)."""
        path = Path(path)
        if path.exists():
            raise ValueError(f"{path} exists; choose a new file name (nothing is overwritten)")
        save_single_file(self.unet, self.vae, self.text_encoder, path, self.scheduler_config)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a folder that `from_pretrained` and diffusers' `StableDiffusionPipeline` load."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.vae.save_pretrained(path / "vae")
        self.text_encoder.save_pretrained(path)
        (path / "scheduler").mkdir(exist_ok=True)
        (path / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(self.scheduler_config.to_dict(), indent=2) + "\n"
        )
        index = {**MODEL_INDEX, "_ldm_name": self.name}  # diffusers ignores "_" keys
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        follow_umask(path)  # safetensors writes 0600

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LatentDiffusionPipeline:
        """Move to a device and the U-Net and text encoder to a dtype. A VAE that asks for it
        (``force_upcast``) decodes in float32."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def downscale_factor(self) -> int:
        return self.vae.downscale_factor

    # ------------------------------------------------------------------ checks

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = (self.unet.config.sample_size or 64) * self.downscale_factor
        height = default if height is None else height  # 0 is an error, not the default
        width = default if width is None else width
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % self.downscale_factor:
                raise ValueError(
                    f"{name}={value} must be a positive multiple of {self.downscale_factor} (the VAE's downscale factor)"
                )
        return height, width

    def _check(
        self,
        num_inference_steps: int,
        guidance_scale: float,
        sampler: str,
        eta: float,
        output_type: str,
    ) -> None:
        T = self.schedule.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be an integer from 1 to {T}, got {num_inference_steps!r}"
            )
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0 (1 means no guidance), got {guidance_scale}"
            )
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"unknown output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}"
            )

    @staticmethod
    def _prompts(
        prompt: str | list[str], negative_prompt: str | list[str] | None
    ) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list; give at least one prompt")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; give one per prompt, or a single string"
                )
        return prompts, negatives

    @staticmethod
    def _generators(
        n: int,
        seed: int | list[int] | None,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> tuple[list[torch.Generator], list[int | None]]:
        """One CPU generator per image: seed S gives image k the seed S + k."""
        if generator is not None:
            generators = generator if isinstance(generator, list) else [generator]
            if len(generators) != n:
                raise ValueError(
                    f"got {len(generators)} generators for {n} images; pass one per image (or use seed=)"
                )
            return generators, [g.initial_seed() for g in generators]
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        seeds = [seed + k for k in range(n)] if isinstance(seed, int) else list(seed)
        if len(seeds) != n:
            raise ValueError(
                f"got {len(seeds)} seeds for {n} images; pass one per image, or one int"
            )
        if bad := [s for s in seeds if not 0 <= s < 2**63]:
            raise ValueError(f"seed {bad[0]} is not allowed; use 0 <= seed < 2**63")
        return [torch.Generator().manual_seed(s) for s in seeds], seeds

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: OutputType = "pil",
        progress: bool = True,
    ) -> GenerationResult:
        """Generate ``num_images_per_prompt`` images for each prompt.

        Image k of a call with ``seed=S`` uses seed S + k with its own generator, so any image
        can be reproduced alone; with no seed, one is drawn and recorded. ``latents``
        (B, C, h, w) replaces the initial noise (for example DDIM-inverted latents at guidance
        1). Returns a `GenerationResult`; ``output_type`` is ``pil``, ``np`` ((B, H, W, 3) in
        [0, 1]), ``pt`` ((B, 3, H, W) in [0, 1]) or ``latent``.
        """
        prompts, negatives = self._prompts(prompt, negative_prompt)
        height, width = self._size(height, width)
        self._check(num_inference_steps, guidance_scale, sampler, eta, output_type)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        generators, seeds = self._generators(len(prompts), seed, generator)
        shape = (
            len(prompts),
            self.unet.config.in_channels,
            height // self.downscale_factor,
            width // self.downscale_factor,
        )
        if latents is None:
            x_T = randn_like(torch.empty(shape), generators).to(self.device)  # drawn on the CPU
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; expected {shape} for {len(prompts)} images of {height}x{width}"
            )
        else:
            x_T = latents.to(self.device, torch.float32)
        settings = (num_inference_steps, guidance_scale, sampler, eta)
        return self._generate(
            prompts, negatives, x_T, settings, generators, seeds, output_type, progress=progress
        )

    def _generate(
        self,
        prompts: list[str],
        negatives: list[str],
        x_start: Tensor,
        settings: tuple[int, float, str, float],
        generators: list[torch.Generator],
        seeds: list[int],
        output_type: str,
        *,
        start_step: int = 0,
        strength: float | None = None,
        progress: bool = True,
    ) -> GenerationResult:
        """What text-to-image and image-to-image share: sample from ``x_start`` (at
        ``start_step``), decode, and record each image's settings."""
        steps, guidance_scale, sampler, eta = settings
        x0 = self._sample(
            prompts,
            negatives,
            x_start,
            steps,
            guidance_scale,
            sampler,
            eta,
            generators,
            start_step=start_step,
            progress=progress,
        )
        height, width = (d * self.downscale_factor for d in x_start.shape[-2:])
        common = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "eta": eta}
        common |= {"width": width, "height": height, "strength": strength, "model": self.name}
        records = [
            {"prompt": p, "negative_prompt": n, "seed": seed} | common
            for p, n, seed in zip(prompts, negatives, seeds, strict=True)
        ]
        return GenerationResult(self._output(x0, output_type), seeds, records)

    def _model_fn(self, prompts: list[str], negatives: list[str], guidance_scale: float):
        context = self.text_encoder(prompts).to(self.dtype)  # (B, L, D)
        uncond = self.text_encoder(negatives).to(self.dtype) if guidance_scale != 1 else None

        def unet_fn(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
            return self.unet(x.to(self.dtype), t, c).float()  # sampler state stays float32

        return guided_eps_fn(unet_fn, context, uncond, guidance_scale)

    def _sample(
        self,
        prompts,
        negatives,
        x_T,
        steps,
        guidance_scale,
        sampler,
        eta,
        generators,
        *,
        start_step=0,
        progress=True,
    ) -> Tensor:
        s = self.scheduler_config
        model_fn = self._model_fn(prompts, negatives, guidance_scale)
        clip = dict(clip_sample=s.clip_sample, clip_sample_range=s.clip_sample_range)
        if sampler == "ddim":
            return sample_ddim(
                model_fn,
                self.schedule,
                x_T,
                steps,
                eta=eta,
                generator=generators,
                progress=progress,
                set_alpha_to_one=s.set_alpha_to_one,
                start_step=start_step,
                **s.spacing,
                **clip,
            )
        return sample_ddpm(
            model_fn,
            self.schedule,
            x_T,
            num_steps=steps,
            generator=generators,
            progress=progress,
            variance_type=s.variance_type,
            start_step=start_step,
            **s.spacing,
            **clip,
        )

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) in [-1, 1]; a non-finite result is an error."""
        images = self.vae.decode(latents.to(self.vae.dtype), batch_size=8)
        if not torch.isfinite(images).all():
            raise FloatingPointError(
                "the decoded images contain NaN or infinite values (an overflow, often from fp16); "
                "nothing was saved. Try dtype=torch.float32 or bfloat16."
            )
        return images

    def _output(self, latents: Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = self.decode(latents)
        if output_type == "pt":
            return imaging.to_unit_range(images)
        if output_type == "np":
            return imaging.to_numpy(images)
        return imaging.to_pil(images)

    def encode_images(
        self,
        image: Image.Image | list[Image.Image] | Tensor,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """PIL images (resized to height x width when given) or a tensor (B, 3, H, W) in [-1, 1]
        -> latents (B, C, h, w), the VAE posterior means."""
        if isinstance(image, Tensor):
            pixels = image
        else:
            batch = image if isinstance(image, list) else [image]
            size = (width, height) if height and width else None
            pixels = torch.cat([imaging.from_pil(im, size) for im in batch])
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).float()

    @torch.no_grad()
    def img2img(
        self,
        prompt: str | list[str],
        image: Image.Image | list[Image.Image] | Tensor,
        *,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: OutputType = "pil",
        progress: bool = True,
    ) -> GenerationResult:
        """Image-to-image: noise the image's latents to the step that ``strength`` picks and
        sample from there (`ldm.diffusion.samplers.img2img_start`). Strength 0 returns the input (up to the
        VAE round trip); 1 ignores it. One image per prompt, or one image for all prompts."""
        if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        prompts, negatives = self._prompts(prompt, negative_prompt)
        self._check(num_inference_steps, guidance_scale, sampler, eta, output_type)
        x0 = self.encode_images(image)
        if x0.shape[0] == 1 and len(prompts) > 1:
            x0 = x0.expand(len(prompts), -1, -1, -1)
        if x0.shape[0] != len(prompts):
            raise ValueError(
                f"got {x0.shape[0]} images for {len(prompts)} prompts; give one image, or one per prompt"
            )
        generators, seeds = self._generators(len(prompts), seed, generator)
        noise = randn_like(x0, generators)
        s = self.scheduler_config
        x_start, start = img2img_start(
            self.schedule,
            x0,
            noise,
            num_inference_steps,
            strength,
            **s.spacing,
        )
        settings = (num_inference_steps, guidance_scale, sampler, eta)
        return self._generate(
            prompts,
            negatives,
            x_start,
            settings,
            generators,
            seeds,
            output_type,
            start_step=start,
            strength=strength,
            progress=progress,
        )

    @torch.no_grad()
    def invert(
        self,
        prompt: str | list[str],
        image: Image.Image | list[Image.Image] | Tensor,
        *,
        num_inference_steps: int = 50,
        fixed_point_iters: int = 0,
        progress: bool = True,
    ) -> Tensor:
        """DDIM inversion at guidance 1: the latents x_T (B, C, h, w) that ``__call__`` with
        ``latents=x_T``, ``guidance_scale=1``, ``sampler="ddim"``, ``eta=0`` and the same prompt
        and steps maps back to (about) the image. See `ldm.diffusion.samplers.invert_ddim`."""
        prompts, negatives = self._prompts(prompt, None)
        self._check(num_inference_steps, 1.0, "ddim", 0.0, "latent")
        x0 = self.encode_images(image)
        if x0.shape[0] != len(prompts):
            raise ValueError(
                f"got {x0.shape[0]} images for {len(prompts)} prompts; give one per prompt"
            )
        s = self.scheduler_config
        return invert_ddim(
            self._model_fn(prompts, negatives, 1.0),
            self.schedule,
            x0,
            num_inference_steps,
            progress=progress,
            **s.spacing,
            set_alpha_to_one=s.set_alpha_to_one,
            fixed_point_iters=fixed_point_iters,
        )


def _model_name(folder: Path) -> str:
    """The name a pipeline folder records (``_ldm_name`` in model_index.json: a fine-tuned
    model's run name), else the folder's name."""
    index = folder / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_ldm_name") or folder.name
    except (OSError, json.JSONDecodeError):
        return folder.name
