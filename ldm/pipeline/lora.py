"""LoRA adapters on a pipeline: load shared files, scale, fuse, unload (`LoraAdapters`).

peft does the work: `inject_adapter_in_model` wraps each adapted Linear of the U-Net (and of
the text encoder, where the file has one) in a `peft` LoRA layer, W x + s (alpha / r) B A x,
with one (A, B) pair and one scale s per adapter name; several adapters add up. Files are
read and checked by `ldm.formats.lora`. peft is imported only when a LoRA is first used.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from torch import nn


def _tuner_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


class LoraAdapters:
    """The LoRA methods of `LatentDiffusionPipeline` (which has ``unet`` and ``text_encoder``).

    ``lora_scales`` maps each loaded adapter's name to its scale."""

    unet: nn.Module
    _lora_scales: dict[str, float]  # set by the pipeline's __init__

    @property
    def lora_scales(self) -> dict[str, float]:
        return dict(self._lora_scales)

    def _lora_modules(self) -> dict[str, nn.Module]:
        """The parts a LoRA file can adapt: the U-Net, and a transformers text encoder."""
        modules = {"unet": self.unet}
        if getattr(self.text_encoder, "kind", None) == "transformers":
            modules["text_encoder"] = self.text_encoder.model
        return modules

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Load a LoRA file (diffusers/peft or kohya/A1111 layout, U-Net and text-encoder
        parts) as adapter ``name`` at ``scale``, and return the name: by default the file's
        stem, with characters other than letters, digits, "_" and "-" made "_". Adapters
        already loaded stay active with their own scales."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        from ldm.formats.lora import check_lora_fits, names_for, read_lora

        path = Path(path)
        name = re.sub(r"[^A-Za-z0-9_-]", "_", name or path.stem)  # peft's names hold no "."
        if name in self.lora_scales:
            raise ValueError(f"a LoRA named {name!r} is loaded already; pass another name=")
        self._check_not_fused(f"load_lora({str(path)!r})")
        modules = self._lora_modules()
        parts = {
            p: names_for(part, modules[p]) if p in modules else part
            for p, part in read_lora(path).items()
        }
        if missing := sorted(set(parts) - set(modules)):
            raise ValueError(
                f"{path} adapts the {missing[0]}, which this pipeline cannot adapt "
                f"(an open_clip text encoder); it can adapt: {', '.join(modules)}"
            )
        for part_name, part in parts.items():  # every check before any change
            check_lora_fits(part, modules[part_name], part_name, str(path))
        self._lora_scales[name] = float(scale)
        for part_name, part in parts.items():
            module = modules[part_name]
            with warnings.catch_warnings():  # several adapters in one model are meant here
                warnings.filterwarnings("ignore", "Already found a `peft_config`")
                inject_adapter_in_model(LoraConfig(**part.config), module, adapter_name=name)
            result = set_peft_model_state_dict(module, part.state_dict, adapter_name=name)
            if unexpected := getattr(result, "unexpected_keys", None):
                self.unload_lora(name)
                raise ValueError(f"{path}: weights that fit no LoRA layer: {unexpected[:3]}")
        self._apply_lora_scales()
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Set adapter ``name``'s scale (0 switches it off; 1 is as trained)."""
        self._check_lora_name(name)
        self._check_not_fused(f"set_lora_scale({name!r}, {scale})")
        self._lora_scales[name] = float(scale)
        self._apply_lora_scales()

    def unload_lora(self, name: str | None = None) -> None:
        """Remove adapter ``name`` (default: all). Fused weights stay fused, as in diffusers:
        unfuse first to get the original weights back."""
        names = [name] if name is not None else list(self.lora_scales)
        for n in names:
            self._check_lora_name(n)
        if len(names) < len(self._lora_scales):  # the others' fused weights would stay
            self._check_not_fused(f"unload_lora({name!r})")
        for n in names:
            del self._lora_scales[n]
        for module in self._lora_modules().values():
            for _, layer in _tuner_layers(module):
                for n in names:
                    if n in layer.scaling:
                        layer.delete_adapter(n)
            if not self._lora_scales:
                _remove_tuner_layers(module)
        self._apply_lora_scales()

    def fuse_lora(self) -> None:
        """Add every active adapter, at its scale, into the weights it adapts (faster sampling;
        `unfuse_lora` subtracts it again)."""
        for module in self._lora_modules().values():
            for _, layer in _tuner_layers(module):
                layer.merge(adapter_names=list(self.lora_scales))

    def unfuse_lora(self) -> None:
        """Subtract what `fuse_lora` added: the weights are the originals again (to 1e-6)."""
        for module in self._lora_modules().values():
            for _, layer in _tuner_layers(module):
                layer.unmerge()

    def _check_lora_name(self, name: str) -> None:
        if name not in self.lora_scales:
            loaded = ", ".join(self.lora_scales) or "none"
            raise ValueError(f"no LoRA named {name!r} is loaded; loaded: {loaded}")

    def _check_not_fused(self, action: str) -> None:
        if any(
            layer.merged
            for module in self._lora_modules().values()
            for _, layer in _tuner_layers(module)
        ):
            raise ValueError(f"{action}: the LoRAs are fused into the weights; unfuse_lora() first")

    def _apply_lora_scales(self) -> None:
        """Activate every loaded adapter in every LoRA layer, each at its scale."""
        scales = self.lora_scales
        for module in self._lora_modules().values():
            for _, layer in _tuner_layers(module):
                present = [n for n in scales if n in layer.scaling]
                if present:
                    layer.set_adapter(present)
                    for n in present:
                        layer.set_scale(n, scales[n])
            module.requires_grad_(False)  # set_adapter marks adapters trainable


def _remove_tuner_layers(module: nn.Module) -> None:
    """Put each LoRA layer's base layer back in its place (diffusers'
    `recurse_remove_peft_layers`): the module is as it was, up to fused weights."""
    for name, layer in _tuner_layers(module):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    module.__dict__.pop("peft_config", None)  # what inject_adapter_in_model left on the module
