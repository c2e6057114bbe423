"""What ``ldm convert`` does: convert weights between formats, chosen from the paths.

Files are never overwritten. The format maps themselves live in `ldm.formats.single_file`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ldm.files import follow_umask
from ldm.formats.single_file import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    load_checkpoint,
    save_unet_single_file,
    unet_from_checkpoint,
)
from ldm.nn.unet import UNet
from ldm.pipeline.latent_diffusion import LatentDiffusionPipeline


def convert(
    source: str | Path,
    target: str | Path,
    *,
    config: str | None = None,
    unsafe_pickle: bool = False,
) -> str:
    """What ``ldm convert`` does, chosen from the paths; returns a one-line summary.

    - ``.ckpt``/``.pt``/``.pth`` -> ``.safetensors``: the same tensors, without pickle.
    - SD single file -> folder: a whole diffusers pipeline folder when the file holds a text
      encoder (SD 1.x/2.x checkpoints), else the U-Net as a diffusers ``unet`` folder.
    - diffusers pipeline or ``unet`` folder -> ``.safetensors``: an SD single file.
    """
    source, target = Path(source), Path(target)
    summary = _convert(source, target, config, unsafe_pickle)
    follow_umask(target)  # safetensors writes 0600
    return summary


def _convert(source: Path, target: Path, config: str | None, unsafe_pickle: bool) -> str:
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists; choose a new file name (nothing is overwritten)")
    if source.is_dir() and (source / "model_index.json").is_file():
        if target.suffix != ".safetensors":
            raise ValueError(
                f"a pipeline folder converts to an SD single file ending in .safetensors, got {target}"
            )
        pipe = LatentDiffusionPipeline.from_pretrained(source)
        _make_parent(target)
        pipe.save_single_file(target)
        return f"wrote the pipeline {source} as an SD single file {target}"
    if source.is_dir():
        if target.suffix != ".safetensors":
            raise ValueError(
                f"a folder converts to an SD single file ending in .safetensors, got {target}"
            )
        unet = UNet.from_pretrained(source)
        _make_parent(target)
        save_unet_single_file(unet, target)
        return f"wrote the U-Net of {source} as an SD single file {target}"
    if target.suffix == ".safetensors":
        if source.suffix == ".safetensors":
            raise ValueError(f"{source} is already a .safetensors file")
        state = load_checkpoint(source, unsafe_pickle=unsafe_pickle)
        _make_parent(target)
        save_file({k: v.contiguous() for k, v in state.items()}, str(target))
        return f"wrote {len(state)} tensors from {source} to {target}"
    if target.exists() and any(target.iterdir()):
        raise ValueError(
            f"{target} is a folder that is not empty; choose a new one (nothing is overwritten)"
        )
    state = load_checkpoint(source, unsafe_pickle=unsafe_pickle)
    if any(k.startswith((SD1_TEXT_PREFIX, SD2_TEXT_PREFIX)) for k in state):
        pipe = LatentDiffusionPipeline.from_single_file(
            source, unet_config=config, unsafe_pickle=unsafe_pickle
        )
        _make_parent(target)
        pipe.save_pretrained(target)
        return f"wrote {source} as a diffusers pipeline folder {target}"
    unet = unet_from_checkpoint(state, config, str(source))  # the state read above
    _make_parent(target)
    unet.save_pretrained(target)
    return f"wrote the U-Net of {source} as a diffusers folder {target}"


def _make_parent(target: Path) -> None:
    """The target's missing parent folders, created once the source has been read."""
    target.parent.mkdir(parents=True, exist_ok=True)
