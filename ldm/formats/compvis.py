"""Weight names: diffusers' and the original Stable Diffusion (CompVis) names of the same tensors.

Our U-Net's parameter names are diffusers' `UNet2DConditionModel` names, so a diffusers
folder loads as it is. An original SD checkpoint names the same tensors after CompVis's
modules (``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``...). `unet_key_map`
derives the correspondence from the config, and it is applied in either direction; the VAE's
names map the same way (`vae_diffusers_to_compvis`).
"""

from __future__ import annotations

from torch import Tensor

from ldm.config import UNetConfig

COMPVIS_UNET_PREFIX = "model.diffusion_model."
COMPVIS_VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # transformers CLIPTextModel names
SD2_TEXT_PREFIX = "cond_stage_model.model."  # open_clip names
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
    state: dict[str, Tensor], modules: dict[str, str], inner: dict[str, dict[str, str]]
) -> dict[str, Tensor]:
    """Rename tensors by module path (``modules``); inside a module whose path is a key of
    ``inner``, also rename the sub-module that holds the tensor."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for k in range(len(parts) - 1, 0, -1):  # the longest known module path
            prefix = ".".join(parts[:k])
            if prefix in modules:
                layer, _, param = ".".join(parts[k:]).rpartition(".")
                layer = inner.get(prefix, {}).get(layer, layer)
                out[
                    f"{modules[prefix]}.{layer}.{param}" if layer else f"{modules[prefix]}.{param}"
                ] = value
                break
        else:
            raise ValueError(f"tensor {key!r} belongs to no module of this model's config")
    return out


def _inverse(modules: dict[str, str], inner: dict[str, dict[str, str]]):
    return (
        {v: k for k, v in modules.items()},
        {modules[m]: {v: k for k, v in names.items()} for m, names in inner.items()},
    )


def _unet_names(config: UNetConfig):
    modules = unet_key_map(config)
    return modules, {m: RESNET_NAMES for m in modules if ".resnets." in m}


def unet_diffusers_to_compvis(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """diffusers names -> CompVis names (without the ``model.diffusion_model.`` prefix)."""
    return _rename(state, *_unet_names(config))


def unet_compvis_to_diffusers(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """CompVis names (without the prefix) -> diffusers names."""
    return _rename(state, *_inverse(*_unet_names(config)))


# VAE: diffusers AutoencoderKL <-> CompVis first_stage_model
VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_names(levels: int, layers_per_block: int):
    modules = {name: name for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            modules[f"{part}.{name}"] = f"{part}.{name}"
        modules[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        modules[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        modules[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        modules[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(levels):
        for j in range(layers_per_block):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        for j in range(layers_per_block + 1):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
        if i < levels - 1:
            modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
                f"encoder.down.{i}.downsample.conv"
            )
            modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
                f"decoder.up.{levels - 1 - i}.upsample.conv"
            )
    inner = {m: {"conv_shortcut": "nin_shortcut"} for m in modules if ".resnets." in m}
    inner |= {m: VAE_ATTENTION_NAMES for m in modules if m.endswith("attentions.0")}
    return modules, inner


def vae_diffusers_to_compvis(state: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """An AutoencoderKL state dict -> CompVis ``first_stage_model`` names (without the prefix);
    attention projections become 1x1 convolutions, as CompVis stores them."""
    names = _vae_names(len(config["block_out_channels"]), config["layers_per_block"])
    out = _rename(state, *names)
    for key, value in out.items():
        if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
    return out
