"""The settings of an ``ldm generate`` run and their checks, before any weights load:
`GenerateRequest` (from the flags, or from a PNG that ldm wrote), the model facts read from a
folder's config files (`ModelFacts`), the memory estimate and the batch plan (`plan_batches`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ldm import images as imaging
from ldm.config import GENERATION, SchedulerConfig
from ldm.config.generation import MAX_BATCH
from ldm.config.names import SigmaScheduleName
from ldm.diffusion.registry import resolve_sampler
from ldm.formats.lora import lora_hash
from ldm.pipeline.checks import DEFAULT_SAMPLE_SIZE, MAX_SEED

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class GenerateRequest:
    """The settings of one ``ldm generate`` run."""

    prompts: list[str]
    negative_prompt: str = GENERATION.negative_prompt
    steps: int = GENERATION.num_inference_steps
    guidance_scale: float = GENERATION.guidance_scale
    sampler: str = GENERATION.sampler
    sigmas: SigmaScheduleName | None = GENERATION.sigmas
    eta: float = GENERATION.eta
    seed: int | None = None
    n: int = 1
    height: int | None = None
    width: int | None = None
    init_image: str | None = None
    strength: float | None = None  # None: text-to-image, or GENERATION.strength with init_image
    loras: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # (path, scale)

    def check(self) -> None:
        """The values as ``ldm generate``'s flags gave them, before any model is loaded: each
        error names its flag and what is allowed."""
        for flag, value in (("--steps", self.steps), ("--n", self.n)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} {value} is not allowed; use an integer >= 1")
        for flag, value in (("--guidance-scale", self.guidance_scale), ("--eta", self.eta)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{flag} {value} is not allowed; use a finite number >= 0")
        try:
            resolve_sampler(self.sampler, self.sigmas)
        except ValueError as error:
            raise ValueError(
                f"--sampler {self.sampler} / --sigmas {self.sigmas}: {error}"
            ) from None
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"--seed {self.seed} is not allowed; use 0 <= seed < 2**63")
        for flag, value in (("--height", self.height), ("--width", self.width)):
            if value is not None and value <= 0:
                raise ValueError(
                    f"{flag} {value} is not allowed; use a positive multiple of the VAE's "
                    "factor (e.g. 64), or leave it out for the model's size"
                )
        if self.strength is not None:
            if self.init_image is None:
                raise ValueError("--strength needs --init-image (image-to-image)")
            if not 0 <= self.strength <= 1:
                raise ValueError(f"--strength {self.strength} is not allowed; use 0 to 1")
        if self.init_image is not None:
            check_image(self.init_image, "--init-image")
        for path, scale in self.loras:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--lora {path}: no such file")
            if not math.isfinite(scale):
                raise ValueError(f"--lora {path}:{scale}: the scale must be a finite number")

    @classmethod
    def from_png(cls, path: str | Path, **overrides) -> GenerateRequest:
        """The settings stored in a PNG's ``parameters`` chunk; ``overrides`` that are not
        None replace them. An image-to-image PNG restores its init image and strength, and
        refuses when the init image is gone or changed (its SHA-256 differs) unless
        ``init_image`` is given."""
        p = _png_parameters(path)
        request = cls(
            prompts=[p["prompt"]],
            negative_prompt=p["negative_prompt"],
            steps=p["steps"],
            guidance_scale=p["guidance_scale"],
            sampler=p["sampler"],
            sigmas=p["sigmas"],
            eta=p["eta"],
            seed=p["seed"],
            height=p["height"],
            width=p["width"],
            strength=p["strength"],
            init_image=p.get("init_image"),
            loras=[(lora["path"], lora["scale"]) for lora in p.get("loras", [])],
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "loras" not in given:
            _check_recorded_loras(path, p.get("loras", []))
        if p["strength"] is not None and "init_image" not in given:
            init = p.get("init_image")
            if init is None:
                raise ValueError(
                    f"--from-png {path} is an image-to-image result that does not record its "
                    "init image; pass the image it was made from with --init-image"
                )
            if not Path(init).is_file() or sha256(init) != p.get("init_sha256"):
                state = "is missing" if not Path(init).is_file() else "has changed"
                raise ValueError(
                    f"--from-png {path} was made from the init image {init} (SHA-256 "
                    f"{str(p.get('init_sha256'))[:12]}...), which {state}; pass it with --init-image"
                )
        return dataclasses.replace(request, **given)


def _check_recorded_loras(png: str | Path, loras: list[dict]) -> None:
    """A clear error unless every LoRA a PNG records is where it was, with the same hash."""
    for lora in loras:
        path = lora["path"]
        if path is None:
            state = "its file is not recorded (an A1111 image)"
        elif not Path(path).is_file():
            state = f"{path} is missing"
        elif lora_hash(path)[:12] != lora["hash"][:12]:
            state = f"{path} has changed"
        else:
            continue
        raise ValueError(
            f"--from-png {png} was made with the LoRA {lora['name']} (hash {lora['hash'][:12]}), "
            f"and {state}; pass it with --lora PATH[:SCALE]"
        )


def parse_lora_flag(text: str) -> tuple[str, float]:
    """``--lora PATH[:SCALE]`` -> (path, scale); the scale defaults to 1."""
    path, _, scale = text.rpartition(":")
    if not path or "/" in scale or "\\" in scale:  # no scale, or a drive letter's colon
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise ValueError(
            f"--lora {text}: the scale after the last ':' must be a number, e.g. --lora {path}:0.8"
        ) from None


def _png_parameters(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from-png {path}: no such file")
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise ValueError(f"--from-png {path} is not a PNG; pass a PNG that ldm generate wrote")
    try:
        return imaging.parse_parameters(imaging.read_parameters(path))
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"--from-png {path} holds no ldm generation settings ('parameters' text): {error}"
        ) from None


def check_image(path: str | Path, flag: str) -> None:
    """A clear error unless ``path`` is an image file that PIL reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{flag} {path} is not an image that can be read ({error})") from None


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from-file {path}: no such file")
    prompts = [
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not prompts:
        raise ValueError(f"--from-file {path} holds no prompts (one per line)")
    return prompts


@dataclass
class ModelFacts:
    """What the size and memory checks need, read from a pipeline folder's config files
    without loading any weights."""

    vae_factor: int  # pixels per latent pixel
    default_size: int  # the U-Net's sample_size in pixels
    num_train_timesteps: int
    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]

    @classmethod
    def read(cls, folder: str | Path) -> ModelFacts:
        folder = Path(folder)

        def config(name: str) -> dict:
            path = folder / name
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"--model {folder}: cannot read {path} ({error})") from None

        unet, vae = config("unet/config.json"), config("vae/config.json")
        scheduler = folder / "scheduler" / "scheduler_config.json"
        steps = SchedulerConfig.num_train_timesteps  # the default, without a scheduler/
        if scheduler.is_file():
            steps = json.loads(scheduler.read_text()).get("num_train_timesteps", steps)
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return cls(
            vae_factor=factor,
            default_size=(unet.get("sample_size") or DEFAULT_SAMPLE_SIZE) * factor,
            num_train_timesteps=steps,
            unet_channels=tuple(unet["block_out_channels"]),
            vae_channels=tuple(vae["block_out_channels"]),
        )

    def activation_bytes(
        self, batch: int, height: int, width: int, guided: bool, itemsize: int = 4
    ) -> int:
        """An estimate of one batch's working memory, beyond the loaded weights: the U-Net's
        activations over its levels (twice the batch with guidance), or the VAE decoder's at
        each resolution up to the image's, whichever is larger. The constants (8 and 6
        tensors alive per level) fit the shipped model's peak RSS over the loaded model: 0.27
        GiB for one 512x512 image, 0.95 for four, 0.84 for one 1024x1024; estimated 0.26,
        1.03, 1.03."""
        pixels = height * width
        latent = pixels / self.vae_factor**2
        unet = (
            8
            * (2 if guided else 1)
            * sum(c * latent / 4**i for i, c in enumerate(self.unet_channels))
        )
        vae = 6 * sum(c * pixels / 4**i for i, c in enumerate(self.vae_channels))
        return int(batch * itemsize * max(unet, vae))


def check_device(name: str | None) -> str:
    """``--device`` checked against what this machine has (default: cuda if any, else cpu)."""
    import torch

    have = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        have.append("mps")
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"--device {name} is not a device ldm runs on; this machine has: {', '.join(have)}"
        )
    if (
        device.type != "cpu"
        and f"{device.type}:{device.index or 0}".replace("mps:0", "mps") not in have
    ):
        raise ValueError(f"--device {name} is not on this machine; it has: {', '.join(have)}")
    return name


def available_memory(device: str) -> int:
    """Bytes the device can still give: free GPU memory, or the OS's MemAvailable."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_memory(text: str) -> int:
    """``8GB``, ``512MB``, ``1.5GiB`` -> bytes (--max-memory)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--max-memory {text!r} is not allowed; use a size such as 8GB or 512MB")
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * unit)


def output_size(
    request: GenerateRequest, factor: int, default: int | None = None
) -> tuple[int | None, int | None]:
    """(height, width): the flags', else the init image's rounded down to a multiple of the
    VAE's ``factor``, else ``default`` (None: the pipeline's own)."""
    height, width = request.height, request.width
    if request.init_image is not None and (height is None or width is None):
        with Image.open(request.init_image) as image:
            height = height or image.height // factor * factor
            width = width or image.width // factor * factor
    return height or default, width or default


def plan_batches(
    request: GenerateRequest,
    facts: ModelFacts,
    *,
    budget: int,
    batch_size: int | None = None,
    itemsize: int = 4,
) -> tuple[int, int, int]:
    """(height, width, batch size) for ``request`` on a model, checked before any weights
    load: sizes are positive multiples of the VAE's factor, steps within the schedule, and one
    batch's estimated memory within ``budget`` bytes (else an error with the estimate)."""
    f = facts.vae_factor
    height, width = output_size(request, f, facts.default_size)
    for flag, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % f:
            raise ValueError(
                f"{flag} {value} is not allowed; use a positive multiple of {f} (the VAE's factor)"
            )
    if request.steps > facts.num_train_timesteps:
        raise ValueError(
            f"--steps {request.steps} is not allowed; use 1 to {facts.num_train_timesteps} "
            "(the model's training timesteps)"
        )
    guided = request.guidance_scale != 1

    def need(b: int) -> int:
        return facts.activation_bytes(b, height, width, guided, itemsize)

    if need(1) > budget:
        raise ValueError(
            f"--width {width} --height {height}: one image needs about {need(1) / 2**30:.1f} GB "
            f"(estimate), and {budget / 2**30:.1f} GB is available; ask for a smaller image, or "
            "set --max-memory if the estimate is too cautious"
        )
    total = len(request.prompts) * request.n
    if batch_size is None:
        batch_size = 1
        while batch_size < min(total, MAX_BATCH) and need(batch_size + 1) <= budget // 2:
            batch_size += 1
    elif batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} is not allowed; use an integer >= 1")
    elif need(batch_size) > budget:
        raise ValueError(
            f"--batch-size {batch_size}: a batch needs about {need(batch_size) / 2**30:.1f} GB "
            f"(estimate), and {budget / 2**30:.1f} GB is available; use a smaller --batch-size"
        )
    return height, width, min(batch_size, total)
