"""Weight formats: diffusers folders, original Stable Diffusion (CompVis) single files, .ckpt.

Our U-Net's parameter names are diffusers' `UNet2DConditionModel` names, so a diffusers
folder loads as it is. An original SD checkpoint names the same tensors after CompVis's
modules (``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``...). `unet_key_map`
derives the correspondence from the config, and it is applied in either direction.

Pickle: ``.bin`` and ``.ckpt`` files are Python pickles that can run code when loaded. A
``.bin`` is read only with ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
A ``.ckpt`` is read with ``weights_only=True``; one that needs other objects unpickled is
refused unless ``unsafe_pickle=True``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldm.config import UNetConfig
from ldm.unet import UNet

logger = logging.getLogger(__name__)

COMPVIS_UNET_PREFIX = "model.diffusion_model."
# inside a ResNet block: diffusers name -> CompVis name (Sequential indices)
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_key_map(config: UNetConfig) -> dict[str, str]:
    """Module paths: diffusers name -> CompVis name, for every module that holds weights
    outside the transformer blocks (whose inner names agree in both formats)."""
    levels = len(config.block_out_channels)
    layers = config.per_level("layers_per_block")
    names = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(config.down_block_types):
        for j in range(layers[level]):
            names[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if block_type == "CrossAttnDownBlock2D":
                names[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for i, block_type in enumerate(config.up_block_types):
        has_attn = block_type == "CrossAttnUpBlock2D"
        n = layers[levels - 1 - i] + 1
        for j in range(n):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if has_attn:
                names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == n - 1 and i < levels - 1:
                names[f"up_blocks.{i}.upsamplers.0.conv"] = (
                    f"output_blocks.{index}.{2 if has_attn else 1}.conv"
                )
            index += 1
    return names


def _rename(
    state: dict[str, Tensor], modules: dict[str, str], resnet_names: dict[str, str]
) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for k in range(len(parts) - 1, 0, -1):  # the longest known module path
            prefix = ".".join(parts[:k])
            if prefix in modules:
                rest = ".".join(parts[k:])
                if prefix in resnet_names["modules"]:
                    layer, _, param = rest.rpartition(".")
                    rest = f"{resnet_names['names'].get(layer, layer)}.{param}"
                out[f"{modules[prefix]}.{rest}"] = value
                break
        else:
            raise ValueError(f"tensor {key!r} belongs to no module of this U-Net config")
    return out


def unet_diffusers_to_compvis(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """diffusers names -> CompVis names (without the ``model.diffusion_model.`` prefix)."""
    modules = unet_key_map(config)
    resnets = {"modules": {m for m in modules if ".resnets." in m}, "names": RESNET_NAMES}
    return _rename(state, modules, resnets)


def unet_compvis_to_diffusers(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """CompVis names (without the prefix) -> diffusers names."""
    modules = {v: k for k, v in unet_key_map(config).items()}
    resnets = {
        "modules": {c for c, d in modules.items() if ".resnets." in d},
        "names": {v: k for k, v in RESNET_NAMES.items()},
    }
    return _rename(state, modules, resnets)


# ----------------------------------------------------------------------------- files


def load_checkpoint(path: str | Path, *, unsafe_pickle: bool = False) -> dict[str, Tensor]:
    """Read a ``.safetensors`` or ``.ckpt``/``.pt``/``.pth``/``.bin`` file into a flat state dict.

    Pickled files are read with ``torch.load(weights_only=True)``. If that fails because the
    file holds other objects (a PyTorch Lightning checkpoint, say), the error explains how to
    go on; ``unsafe_pickle=True`` then loads it fully, running whatever code the file contains.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(
            f"unknown checkpoint format {path.suffix!r} ({path}); allowed: .safetensors, .ckpt, .pt, .pth, .bin"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} contains pickled Python objects besides tensors, and unpickling them could run "
            f"code from the file ({str(error).splitlines()[0]}). If you trust where it came from, "
            f"convert it once with `ldm convert {path} {path.with_suffix('.safetensors')} --unsafe-pickle` "
            "and use the .safetensors file from then on, or pass unsafe_pickle=True."
        ) from None
    state = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if skipped := sorted(set(state) - set(tensors)):
        logger.info(
            "%s: ignored %d entries that are not tensors: %s",
            path,
            len(skipped),
            ", ".join(skipped[:5]),
        )
    return tensors


def detect_unet_preset(compvis_state: dict[str, Tensor]) -> str:
    """Which shipped config fits an SD checkpoint: its cross-attention width tells SD 1 (768)
    from SD 2 (1024). SD 2.1 768-v and base share weights' shapes; ``sd21`` upcasts attention,
    which only matters in fp16."""
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key not in compvis_state:
        raise ValueError(
            f"not a Stable Diffusion 1.x/2.x U-Net: {COMPVIS_UNET_PREFIX}{key} is missing"
        )
    width = compvis_state[key].shape[1]
    presets = {768: "sd15", 1024: "sd21"}
    if width not in presets:
        raise ValueError(
            f"cross-attention width {width} matches no shipped config (768: SD 1.x, 1024: SD 2.x); pass config="
        )
    return presets[width]


def load_unet_single_file(
    path: str | Path, config: UNetConfig | str | None = None, *, unsafe_pickle: bool = False
) -> UNet:
    """Load the U-Net from an original SD checkpoint (the ``model.diffusion_model.*`` tensors).

    ``config``: a `UNetConfig`, a preset name, or None to pick SD 1.x or 2.x from the weights.
    """
    state = load_checkpoint(path, unsafe_pickle=unsafe_pickle)
    unet_state = {
        k[len(COMPVIS_UNET_PREFIX) :]: v
        for k, v in state.items()
        if k.startswith(COMPVIS_UNET_PREFIX)
    }
    if not unet_state:
        raise ValueError(
            f"{path} has no {COMPVIS_UNET_PREFIX}* tensors: it is not an original SD checkpoint"
        )
    if config is None:
        config = detect_unet_preset(unet_state)
    if isinstance(config, str):
        config = UNetConfig.preset(config)
    model = UNet(config)
    model.load_weights(unet_compvis_to_diffusers(unet_state, config), source=str(path))
    return model


def save_unet_single_file(unet: UNet, path: str | Path) -> None:
    """Write the U-Net as an original SD checkpoint's ``model.diffusion_model.*`` tensors."""
    state = unet_diffusers_to_compvis(unet.state_dict(), unet.config)
    save_file(
        {COMPVIS_UNET_PREFIX + k: v.detach().contiguous() for k, v in state.items()}, str(path)
    )


def convert(
    source: str | Path,
    target: str | Path,
    *,
    config: str | None = None,
    unsafe_pickle: bool = False,
) -> str:
    """What ``ldm convert`` does, chosen from the paths; returns a one-line summary.

    - ``.ckpt``/``.pt``/``.pth`` -> ``.safetensors``: the same tensors, without pickle.
    - SD single file -> folder: the U-Net as a diffusers ``unet`` folder.
    - diffusers ``unet`` folder -> ``.safetensors``: an SD single file with the U-Net.
    """
    source, target = Path(source), Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists; choose a new file name (nothing is overwritten)")
    if source.is_dir():
        if target.suffix != ".safetensors":
            raise ValueError(
                f"a folder converts to an SD single file ending in .safetensors, got {target}"
            )
        save_unet_single_file(UNet.from_pretrained(source), target)
        return f"wrote the U-Net of {source} as an SD single file {target}"
    if target.suffix == ".safetensors":
        if source.suffix == ".safetensors":
            raise ValueError(f"{source} is already a .safetensors file")
        state = load_checkpoint(source, unsafe_pickle=unsafe_pickle)
        save_file({k: v.contiguous() for k, v in state.items()}, str(target))
        return f"wrote {len(state)} tensors from {source} to {target}"
    if target.exists() and any(target.iterdir()):
        raise ValueError(
            f"{target} is a folder that is not empty; choose a new one (nothing is overwritten)"
        )
    unet = load_unet_single_file(source, config, unsafe_pickle=unsafe_pickle)
    unet.save_pretrained(target)
    return f"wrote the U-Net of {source} as a diffusers folder {target}"
