"""Single files: original Stable Diffusion (CompVis) checkpoints, ``.safetensors`` or ``.ckpt``,
read into our parts and written from them (the names are mapped by `ldm.formats.compvis`).

Pickle: ``.bin`` and ``.ckpt`` files are Python pickles that can run code when loaded. A
``.bin`` is read only with ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
A ``.ckpt`` is read with ``weights_only=True``; one that needs other objects unpickled is
refused unless ``unsafe_pickle=True``.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldm.config import CONFIG_FILES, UNetConfig
from ldm.formats.compvis import (
    COMPVIS_UNET_PREFIX,
    COMPVIS_VAE_PREFIX,
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    unet_compvis_to_diffusers,
    unet_diffusers_to_compvis,
    vae_diffusers_to_compvis,
)
from ldm.nn.unet import UNet

logger = logging.getLogger(__name__)

CONFIGS_KEY = "ldm.configs"  # safetensors metadata: the configs of a single file's parts


# ----------------------------------------------------------------------------- files


def check_safetensors(path: str | Path) -> None:
    """A ValueError naming ``path`` unless it is a whole safetensors file: an 8-byte header
    length, a JSON header, and every tensor's bytes within the file (checked without reading
    the tensors, so a truncated download is caught before anything is loaded)."""
    path = Path(path)
    size = path.stat().st_size
    again = "copy, download or convert it again"
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 0 < length <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (no valid header); {again}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(
                f"{path} is not a safetensors file (its header is not JSON); {again}"
            ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a table); {again}")
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise ValueError(
            f"{path} is truncated: its header describes {needed} bytes, the file has {size}; {again}"
        )


def check_weight_files(folder: str | Path) -> None:
    """`check_safetensors` on every ``.safetensors`` file in a model folder."""
    for file in sorted(Path(folder).rglob("*.safetensors")):
        check_safetensors(file)


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
        check_safetensors(path)
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
    return unet_from_checkpoint(
        load_checkpoint(path, unsafe_pickle=unsafe_pickle), config, str(path)
    )


def unet_from_checkpoint(
    state: dict[str, Tensor], config: UNetConfig | str | None, source: str
) -> UNet:
    """Our U-Net from a loaded original SD checkpoint's ``model.diffusion_model.*`` tensors;
    ``config`` as in `load_unet_single_file`."""
    unet_state = _strip(state, COMPVIS_UNET_PREFIX)
    if not unet_state:
        raise ValueError(
            f"{source} has no {COMPVIS_UNET_PREFIX}* tensors: it is not an original SD checkpoint"
        )
    config = config or detect_unet_preset(unet_state)
    config = UNetConfig.preset(config) if isinstance(config, str) else config
    model = UNet(config)
    model.load_weights(unet_compvis_to_diffusers(unet_state, config), source=source)
    return model


def save_unet_single_file(unet: UNet, path: str | Path) -> None:
    """Write the U-Net as an original SD checkpoint's ``model.diffusion_model.*`` tensors."""
    state = unet_diffusers_to_compvis(unet.state_dict(), unet.config)
    save_file(
        {COMPVIS_UNET_PREFIX + k: v.detach().contiguous() for k, v in state.items()}, str(path)
    )


# ----------------------------------------------------------------------------- whole pipelines


def shipped_config(kind: str, name: str) -> dict:
    """A config shipped with the package: ``configs/{kind}/{name}.json``."""
    return json.loads((CONFIG_FILES / kind / f"{name}.json").read_text())


def sd_version(state: dict[str, Tensor]) -> str:
    """``sd1`` (CLIP ViT-L text encoder) or ``sd2`` (OpenCLIP ViT-H), from the key names."""
    if any(k.startswith(SD1_TEXT_PREFIX) for k in state):
        return "sd1"
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state):
        return "sd2"
    raise ValueError(
        f"no text encoder in this checkpoint ({SD1_TEXT_PREFIX}* or {SD2_TEXT_PREFIX}* tensors): "
        "it is not a whole Stable Diffusion 1.x/2.x checkpoint"
    )


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load_exactly(model: torch.nn.Module, state: dict[str, Tensor], what: str) -> None:
    expected = model.state_dict()
    if not any(k in expected for k in state) and all(k.startswith("text_model.") for k in state):
        state = _strip(state, "text_model.")  # transformers 5 names CLIPTextModel without it
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    ignorable = {k for k in unexpected if k.endswith("position_ids")}
    if missing or set(unexpected) - ignorable:
        raise ValueError(
            f"the {what} weights do not fit its config: {len(missing)} missing ({', '.join(missing[:5])}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])})"
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in ignorable})


def load_single_file_components(
    path: str | Path,
    *,
    unet_config: UNetConfig | str | None = None,
    vae_config: dict | None = None,
    text_encoder_config: dict | None = None,
    unsafe_pickle: bool = False,
):
    """The U-Net, VAE and text encoder of an original SD 1.x/2.x checkpoint, and its version.

    Configs default to the shipped SD ones (``ldm/configs``); the tokenizer is CLIP's, built
    offline, padding with ``<|endoftext|>`` (SD 1) or ``!`` (SD 2, OpenCLIP).
    Returns (unet, vae, text_encoder, version).
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.encoders.text import FrozenTextEncoder
    from ldm.encoders.tokenizer import build_clip_tokenizer
    from ldm.encoders.vae import FrozenVAE

    state = load_checkpoint(path, unsafe_pickle=unsafe_pickle)
    version = sd_version(state)
    carried = carried_configs(path)  # written by save_single_file: they win over SD's
    if unet_config is None and "unet" in carried:
        unet_config = UNetConfig.from_dict(carried["unet"])
    unet = unet_from_checkpoint(state, unet_config, str(path))

    vae_config = vae_config or carried.get("vae") or shipped_config("vae", "sd")
    vae = AutoencoderKL(**{k: v for k, v in vae_config.items() if not k.startswith("_")})
    _load_exactly(vae, convert_ldm_vae_checkpoint(state, vae.config), "VAE")

    text_encoder_config = text_encoder_config or carried.get("text_encoder")
    text_config = CLIPTextConfig(**(text_encoder_config or shipped_config("text_encoder", version)))
    text_model = CLIPTextModel(text_config)
    if version == "sd1":
        text_state = _strip(state, SD1_TEXT_PREFIX)
    else:  # SD 2 uses the penultimate block: drop the last one, as diffusers' SD 2 folders do
        last = max(
            int(k.split(".")[4])
            for k in state
            if k.startswith(SD2_TEXT_PREFIX + "transformer.resblocks.")
        )
        kept = {
            k: v
            for k, v in state.items()
            if not k.startswith(f"{SD2_TEXT_PREFIX}transformer.resblocks.{last}.")
        }
        text_state = convert_open_clip_checkpoint(text_model, kept, prefix=SD2_TEXT_PREFIX)
        text_state = {k: v for k, v in text_state.items() if "text_projection" not in k}
    _load_exactly(text_model, text_state, "text encoder")
    tokenizer = (
        _tokenizer_from_files(carried["tokenizer"])
        if "tokenizer" in carried
        else build_clip_tokenizer(pad_token="<|endoftext|>" if version == "sd1" else "!")
    )
    text_encoder = FrozenTextEncoder(text_model, tokenizer, kind="transformers")
    return unet, FrozenVAE(vae), text_encoder, version


def carried_configs(path: str | Path) -> dict:
    """The configs that `save_single_file` put in a ``.safetensors`` file's metadata
    (``unet``, ``vae``, ``text_encoder``, ``tokenizer`` files, ``scheduler``), or {} for a file
    without them (an original SD checkpoint, which the shipped SD configs describe)."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get(CONFIGS_KEY)
    return json.loads(text) if text else {}


def _tokenizer_files(tokenizer) -> dict[str, str]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(folder).iterdir())}


def _tokenizer_from_files(files: dict[str, str]):
    import tempfile

    from ldm.encoders.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return load_tokenizer(folder)  # a tokenizer folder itself


def save_single_file(unet: UNet, vae, text_encoder, path: str | Path, scheduler=None) -> None:
    """Write a pipeline's weights as an original SD 1.x-style single file (safetensors). The
    configs of every part, the tokenizer's files and the scheduler travel in its metadata, so
    a model that is not SD (the shipped default, say) converts back to the same folder."""
    if text_encoder.kind != "transformers":
        raise ValueError(
            "only a transformers CLIP text encoder can be written to an SD 1.x-style single file"
        )
    state = {
        COMPVIS_UNET_PREFIX + k: v
        for k, v in unet_diffusers_to_compvis(unet.state_dict(), unet.config).items()
    }
    vae_state = vae_diffusers_to_compvis(vae.vae.state_dict(), dict(vae.vae.config))
    state |= {COMPVIS_VAE_PREFIX + k: v for k, v in vae_state.items()}
    state |= {
        SD1_TEXT_PREFIX + "text_model." + k.removeprefix("text_model."): v
        for k, v in text_encoder.model.state_dict().items()
    }
    configs = {
        "unet": unet.config.to_dict(),
        "vae": {k: v for k, v in dict(vae.vae.config).items() if not k.startswith("_")},
        "text_encoder": text_encoder.model.config.to_dict(),
        "tokenizer": _tokenizer_files(text_encoder.tokenizer),
    }
    if scheduler is not None:
        configs["scheduler"] = scheduler.to_dict()
    metadata = {"format": "pt", CONFIGS_KEY: json.dumps(configs)}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata)
