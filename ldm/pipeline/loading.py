"""A pipeline's parts read from and written to files: diffusers-format model folders
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) and original Stable
Diffusion single files. The format maps themselves live in `ldm.formats.single_file`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ldm.config import SchedulerConfig, UNetConfig
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
REQUIRED_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer")  # scheduler/ has defaults
SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"


class PipelineParts(NamedTuple):
    """A pipeline's parts, named as `LatentDiffusionPipeline`'s constructor names them."""

    unet: UNet
    vae: FrozenVAE
    text_encoder: FrozenTextEncoder
    scheduler_config: SchedulerConfig | None
    name: str


def read_pipeline_folder(path: str | Path) -> PipelineParts:
    """The parts in a diffusers-format folder, such as `StableDiffusionPipeline.save_pretrained`
    writes; every weight file is checked before any loads."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
    missing = [p for p in REQUIRED_FOLDERS if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a pipeline folder: it lacks {', '.join(p + '/' for p in missing)}"
        )
    check_weight_files(path)  # a truncated or foreign file: one error naming it
    scheduler_file = path / SCHEDULER_FILE
    scheduler = (
        SchedulerConfig.from_dict(json.loads(scheduler_file.read_text()))
        if scheduler_file.is_file()
        else None
    )
    return PipelineParts(
        UNet.from_pretrained(path / "unet"),
        FrozenVAE.from_pretrained(path / "vae"),
        FrozenTextEncoder.from_pretrained(path),
        scheduler,
        model_name(path),
    )


def read_single_file(
    path: str | Path,
    prediction_type: str | None = None,
    *,
    unet_config: UNetConfig | str | None = None,
    vae_config: dict | None = None,
    text_encoder_config: dict | None = None,
    unsafe_pickle: bool = False,
) -> PipelineParts:
    """The parts in an original SD 1.x/2.x checkpoint, with the configs shipped in the package
    (`ldm.formats.single_file.load_single_file_components`). A file that ldm wrote carries its
    own scheduler config; an SD 2 file without one needs ``prediction_type``."""
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
    return PipelineParts(unet, vae, text_encoder, scheduler, Path(path).stem)


def write_pipeline_folder(path: str | Path, parts: PipelineParts) -> None:
    """A folder that `read_pipeline_folder` and diffusers' `StableDiffusionPipeline` load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    parts.unet.save_pretrained(path / "unet")
    parts.vae.save_pretrained(path / "vae")
    parts.text_encoder.save_pretrained(path)
    (path / SCHEDULER_FILE).parent.mkdir(exist_ok=True)
    (path / SCHEDULER_FILE).write_text(
        json.dumps((parts.scheduler_config or SchedulerConfig()).to_dict(), indent=2) + "\n"
    )
    index = {**MODEL_INDEX, "_ldm_name": parts.name}  # diffusers ignores "_" keys
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    follow_umask(path)  # safetensors writes 0600


def write_single_file(path: str | Path, parts: PipelineParts) -> None:
    """The weights as an original SD 1.x-style single file (``.safetensors``), never over an
    existing file."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; choose a new file name (nothing is overwritten)")
    save_single_file(parts.unet, parts.vae, parts.text_encoder, path, parts.scheduler_config)


def model_name(folder: Path) -> str:
    """The name a pipeline folder records (``_ldm_name`` in model_index.json: a fine-tuned
    model's run name), else the folder's name."""
    index = folder / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_ldm_name") or folder.name
    except (OSError, json.JSONDecodeError):
        return folder.name
