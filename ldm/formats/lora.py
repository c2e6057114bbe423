"""LoRA files as people share them, read into peft's layout for our parts.

Two layouts are read, U-Net and text-encoder parts alike:

- diffusers/peft, as ``StableDiffusionPipeline.save_lora_weights`` writes it:
  ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` and
  ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`` (older files:
  ``.lora.down.weight`` / ``.lora_linear_layer.down.weight``);
- kohya/A1111: ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down
  .weight``, ``.lora_up.weight`` and ``.alpha``, ``lora_te_text_model_encoder_layers_0_...``.

Both are normalised by diffusers' own conversions (`StableDiffusionPipeline.lora_state_dict`,
`convert_unet_state_dict_to_peft`, `convert_state_dict_to_peft`), and the LoRA config (rank,
alpha, targets) is derived as diffusers derives it (`get_peft_kwargs`), so a file means here
what it means in diffusers. `check_lora_fits` then refuses files whose modules our parts lack
or whose shapes differ, before any weight is touched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ldm.formats.single_file import check_safetensors

PARTS = ("unet", "text_encoder")  # diffusers' prefixes, and the pipeline's attributes
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata: LoraConfig per part
# CLIPTextModel's module names begin with "text_model." in every shared file (transformers 4);
# transformers 5 dropped that level. Files keep it; `names_for` fits it to the model at hand.
TEXT_MODEL = "text_model."


@dataclass
class LoraPart:
    """One part's adapter: peft-layout weights (``<module>.lora_A.weight`` (r, in),
    ``<module>.lora_B.weight`` (out, r)) and the `peft.LoraConfig` keyword arguments."""

    state_dict: dict[str, Tensor]
    config: dict


def lora_hash(path: str | Path) -> str:
    """A1111's hash of a LoRA file (kohya's ``addnet`` hash): the SHA-256 of the bytes after
    the safetensors header, so editing the metadata keeps it; A1111 records its first 12 hex
    digits in ``Lora hashes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def a1111_lora_name(path: str | Path) -> str:
    """The name A1111 writes for a LoRA file in ``Lora hashes``: its stem without ':' or ','."""
    return Path(path).stem.replace(":", "").replace(",", "")


def read_lora(path: str | Path) -> dict[str, LoraPart]:
    """A LoRA ``.safetensors`` file (either layout) -> {part name: `LoraPart`}, parts in `PARTS`.

    Errors name the file: missing, not whole, not safetensors, or keys for no part we have
    (an SDXL LoRA's ``text_encoder_2``, a file that is not a LoRA)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: LoRA files are read as .safetensors only (got {path.suffix!r}); a pickled "
            "file can run code when loaded"
        )
    check_safetensors(path)
    state = load_file(str(path))
    if not state:
        raise ValueError(f"{path} holds no tensors: not a LoRA file")
    with safe_open(str(path), "pt") as f:
        metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "null"))
    kohya = _kohya_part_names(state)
    if kohya is not None:
        if unknown := sorted(k for k, part in kohya.items() if part is None):
            raise ValueError(
                f"{path}: {len(unknown)} kohya keys for no part this pipeline has "
                f"(first: {unknown[0]}); known prefixes: {', '.join(KOHYA_PREFIXES)}"
            )
        state, alphas = StableDiffusionPipeline.lora_state_dict(state)
    else:
        state, alphas = _with_unet_prefix(state), None
    if unknown := sorted(k for k in state if k.split(".")[0] not in PARTS):
        raise ValueError(
            f"{path}: {len(unknown)} keys belong to no part ({', '.join(PARTS)}); first: "
            f"{unknown[0]}. Is it a LoRA for Stable Diffusion 1.x/2.x or ldm?"
        )
    parts = {}
    for part in PARTS:
        own = {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
        if own:
            own_alphas = _part_entries(alphas, part)
            own_metadata = _part_entries(metadata, part)  # flat keys "unet.r", as diffusers'
            if not any("lora_B" in k or "lora.up" in k or "lora_linear_layer.up" in k for k in own):
                raise ValueError(f"{path}: the {part} keys hold no lora_B (up) weights: not a LoRA")
            parts[part] = _peft_part(own, own_alphas, own_metadata, is_unet=part == "unet")
    return parts


def _kohya_part_names(state: dict[str, Tensor]) -> dict[str, str | None] | None:
    """{key: part or None} when every key is kohya-style (``lora_...``), else None."""
    if not all(k.startswith("lora_") for k in state):
        return None
    return {
        k: next((part for p, part in KOHYA_PREFIXES.items() if k.startswith(p)), None)
        for k in state
    }


def _with_unet_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old diffusers files hold the U-Net's keys without ``unet.``; add it, as diffusers does."""
    blocks = (
        "down_blocks.",
        "mid_block.",
        "up_blocks.",
        "conv_in.",
        "conv_out.",
        "time_embedding.",
    )
    return {f"unet.{k}" if k.startswith(blocks) else k: v for k, v in state.items()}


def _part_entries(values: dict | None, part: str) -> dict | None:
    """The entries of a dict keyed ``<part>.<name>`` that belong to ``part``, prefix removed."""
    if not values:
        return None
    own = {k.removeprefix(f"{part}."): v for k, v in values.items() if k.startswith(f"{part}.")}
    return own or None


def _peft_part(
    state: dict[str, Tensor], alphas: dict[str, float] | None, metadata: dict | None, is_unet: bool
) -> LoraPart:
    """diffusers' normalisation of one part (`PeftAdapterMixin.load_lora_adapter` for the
    U-Net, `_load_lora_into_text_encoder` for the text encoder) and its LoraConfig kwargs."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.peft_utils import get_peft_kwargs

    if is_unet:
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
    else:
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    rank = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    config = metadata or get_peft_kwargs(rank, alphas, state, is_unet=is_unet)
    return LoraPart(state, dict(config))


def names_for(part: LoraPart, module: nn.Module) -> LoraPart:
    """``part`` with its module names as ``module`` spells them: ``text_model.`` removed for a
    transformers 5 `CLIPTextModel` (which has no ``text_model`` level), added for an older one;
    in the weights' keys and in the config's targets and rank/alpha patterns alike."""
    has_level = any(n.startswith(TEXT_MODEL) for n, _ in module.named_modules())
    keys_level = any(k.startswith(TEXT_MODEL) for k in part.state_dict)
    if has_level == keys_level or not hasattr(module, "encoder" if keys_level else "text_model"):
        return part

    def rename(name: str) -> str:
        caret = "^" if name.startswith("^") else ""
        name = name.removeprefix(caret)
        if keys_level:
            return caret + name.removeprefix(TEXT_MODEL)
        return caret + (TEXT_MODEL + name if name.startswith(("encoder.", "embeddings.")) else name)

    config = dict(part.config)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {rename(k): v for k, v in config[key].items()}
    if isinstance(config.get("target_modules"), list | set | tuple):
        config["target_modules"] = [rename(t) for t in config["target_modules"]]
    return LoraPart({rename(k): v for k, v in part.state_dict.items()}, config)


def with_file_names(state: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """A text encoder's LoRA weights named as shared files name them (``text_model.`` first),
    whichever transformers ``module`` comes from; other parts' weights unchanged."""
    if not hasattr(module, "encoder") or hasattr(module, "text_model"):
        return state
    return {TEXT_MODEL + k: v for k, v in state.items()}


def check_lora_fits(part: LoraPart, module: nn.Module, part_name: str, source: str) -> None:
    """A ValueError naming ``source`` unless every adapted module of ``part`` exists in
    ``module`` as a Linear or Conv2d whose shape the LoRA matrices fit: a LoRA made for
    another architecture is refused here, never applied as garbage."""
    modules = dict(module.named_modules())
    shapes: dict[str, dict[str, torch.Size]] = {}
    for key, value in part.state_dict.items():
        name, _, kind = key.partition(".lora_")
        shapes.setdefault(name, {})[kind.split(".")[0]] = value.shape
    missing = sorted(name for name in shapes if name not in modules)
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} LoRA modules match nothing in the {part_name} "
            f"(first: {missing[0]}); the LoRA was made for another architecture"
        )
    for name, kinds in shapes.items():
        target = getattr(modules[name], "base_layer", modules[name])
        if not isinstance(target, nn.Linear | nn.Conv2d):
            raise ValueError(f"{source}: {part_name} module {name} is a {type(target).__name__}")
        fan_in = target.in_features if isinstance(target, nn.Linear) else target.in_channels
        fan_out = target.out_features if isinstance(target, nn.Linear) else target.out_channels
        a, b = kinds.get("A"), kinds.get("B")
        if a is None or b is None or a[1] != fan_in or b[0] != fan_out or a[0] != b[1]:
            raise ValueError(
                f"{source}: the LoRA for {part_name} {name} has lora_A {tuple(a or ())} and "
                f"lora_B {tuple(b or ())}, which do not fit its weight ({fan_out}, {fan_in}): "
                "the LoRA was made for another architecture"
            )
