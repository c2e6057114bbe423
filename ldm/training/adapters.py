"""LoRA and textual-inversion training: what `ldm.training.denoiser.train` adds to a run with
a ``lora`` or a ``textual_inversion`` section.

`add_lora` wraps the targeted Linears of the U-Net (and of the text encoder with
``lora.text_encoder``) in peft LoRA layers, W x + (alpha / r) B A x, and freezes everything
else, so only A and B reach the optimizer, the EMA and the checkpoints (`TrainedWeights`).
`export_lora` writes the result as the files people share: diffusers' layout (what
`StableDiffusionPipeline.save_lora_weights` writes, which `load_lora_weights` and
`LatentDiffusionPipeline.load_lora` read) and kohya's (what A1111 and ComfyUI read).

`add_placeholder` adds a textual-inversion token (Gal et al. 2022) to the frozen text encoder
and trains its N vectors only (`NewTokenRows`); `export_embedding` writes them as diffusers'
``learned_embeds.safetensors`` and as an A1111 embedding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.config import LoraSettings, TextualInversionSettings
from ldm.formats.lora import with_file_names
from ldm.seeds import derive_seed
from ldm.training.objective import Part

ADAPTER = "default"  # the peft adapter name while training
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' file name in OUTPUT_DIR/lora


class TrainedWeights:
    """The trained parameters of a module, as Accelerate checkpoints a registered object:
    ``state_dict`` holds only the parameters that require gradients (a LoRA's A and B, not the
    frozen model), ``load_state_dict`` needs exactly those names back."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]

    def named_parameters(self):
        return self.module.named_parameters()

    def parameters(self) -> list[nn.Parameter]:
        params = dict(self.module.named_parameters())
        return [params[n] for n in self.names]

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.parameters(), strict=True)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            missing = sorted(set(self.names) - set(state))
            extra = sorted(set(state) - set(self.names))
            raise ValueError(
                f"the checkpoint's trained weights do not fit this run (missing {missing[:3]}, "
                f"unexpected {extra[:3]}): was it written with another lora section?"
            )
        for n, p in zip(self.names, self.parameters(), strict=True):
            p.copy_(state[n])


def lora_config(lora: LoraSettings, targets: list[str]):
    """The `peft.LoraConfig` of ``lora`` on ``targets``; B starts at zero, A Gaussian, as
    diffusers' ``train_text_to_image_lora.py`` (so step 0 is the base model)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.scale_alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        init_lora_weights="gaussian",
    )


def add_lora(pipe, lora: LoraSettings, seed: int) -> list[Part]:
    """Inject ``lora``'s adapters into ``pipe.unet`` (and the text encoder with
    ``lora.text_encoder``), freeze every other weight, and return the trained `Part`s: the
    U-Net's adapters first (the module Accelerate prepares), then the text encoder's (a
    `TrainedWeights` part named ``text_encoder``). A's initial draw is seeded from ``seed``."""
    parts = []
    modules = [("unet", pipe.unet, lora.targets, lora.learning_rate)]
    if lora.text_encoder:
        if pipe.text_encoder.kind != "transformers":
            raise ValueError(
                "lora.text_encoder: true needs a transformers CLIP text encoder; this model's "
                "is open_clip (set lora.text_encoder: false)"
            )
        lr = lora.text_encoder_learning_rate or lora.learning_rate
        modules.append(("text_encoder", pipe.text_encoder.model, lora.text_encoder_targets, lr))
    for name, module, targets, lr in modules:
        _inject(module, lora, targets, name, derive_seed(seed, f"lora.{name}"))
        weights = TrainedWeights(module)
        if name == "unet":
            parts.append(Part(weights.parameters(), lr))
        else:
            parts.append(Part(weights.parameters(), lr, weights, name))
    return parts


def _inject(module: nn.Module, lora: LoraSettings, targets: list[str], part: str, seed: int):
    from peft import inject_adapter_in_model

    module.requires_grad_(False)
    key = "targets" if part == "unet" else "text_encoder_targets"
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if missing := [t for t in targets if not any(_matches(n, t) for n in linears)]:
        endings = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"lora.{key}: {', '.join(missing)} name no Linear layer of the {part}; "
            f"its Linear layers end in: {', '.join(endings)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(lora, targets), module, adapter_name=ADAPTER)
    for n, p in module.named_parameters():  # peft leaves the adapters trainable; only them
        p.requires_grad_(".lora_" in n)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a target given as a name: the module's name is it, or ends in ".it"."""
    return name == target or name.endswith("." + target)


def lora_state(module: nn.Module) -> dict[str, Tensor]:
    """The adapter's weights in peft's saved layout (``<module>.lora_A.weight``...), as
    diffusers' training scripts take them (`get_peft_model_state_dict`)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def export_lora(pipe, lora: LoraSettings, folder: Path, name: str) -> list[Path]:
    """Write the trained adapters into ``folder``: ``pytorch_lora_weights.safetensors`` as
    `StableDiffusionPipeline.save_lora_weights` writes it (with peft's config per part in the
    metadata, as diffusers >= 0.35), and ``{name}.safetensors`` in kohya's layout for A1111 and
    ComfyUI. Returns both paths. Text-encoder keys start ``text_model.`` as in every shared
    file, whichever transformers the encoder comes from (`with_file_names`)."""
    from diffusers import StableDiffusionPipeline

    config = lora_config(lora, lora.targets).to_dict()
    layers = {"unet_lora_layers": lora_state(pipe.unet), "unet_lora_adapter_metadata": config}
    if lora.text_encoder:
        text_config = lora_config(lora, lora.text_encoder_targets).to_dict()
        model = pipe.text_encoder.model
        layers["text_encoder_lora_layers"] = with_file_names(lora_state(model), model)
        layers["text_encoder_lora_adapter_metadata"] = text_config
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=DIFFUSERS_FILE, **layers)
    kohya = folder / f"{name}.safetensors"
    _save_kohya(folder / DIFFUSERS_FILE, kohya, lora)
    return [folder / DIFFUSERS_FILE, kohya]


def _save_kohya(diffusers_file: Path, path: Path, lora: LoraSettings) -> None:
    """diffusers' `convert_state_dict_to_kohya`, with two fixes: ``.alpha`` is the trained
    alpha (diffusers writes the rank, which changes the scale when alpha != rank), and the text
    encoder's prefix is SD 1.x's ``lora_te_`` (diffusers writes SDXL's ``lora_te1_``)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    kohya = convert_state_dict_to_kohya(load_file(diffusers_file))
    state = {}
    for key, value in kohya.items():
        key = key.replace("lora_te1_", "lora_te_", 1)
        if key.endswith(".alpha"):
            value = torch.tensor(lora.scale_alpha)
        state[key] = value.contiguous()
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(lora.scale_alpha),
        "ss_base_model_version": "sd_v1",
        "ldm_lora": json.dumps({"targets": lora.targets, "text_encoder": lora.text_encoder}),
    }
    save_file(state, str(path), metadata=metadata)


class NewTokenRows(nn.Module):
    """A token embedding whose rows ``ids`` are the trained parameter ``vectors`` (N, D) and
    whose other rows stay the frozen ``base`` weight (V, D): only the new token's vectors reach
    the optimizer, the EMA and the checkpoints (``state_dict`` is ``{"vectors": ...}``)."""

    def __init__(self, base: nn.Embedding, ids: list[int]) -> None:
        super().__init__()
        self.register_buffer("base", base.weight.detach(), persistent=False)  # (V, D)
        slot = torch.full((len(self.base),), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(ids))
        self.register_buffer("slot", slot, persistent=False)  # (V,): row -> vector or -1
        self.vectors = nn.Parameter(self.base[ids].clone())  # (N, D)
        self.ids = list(ids)

    def forward(self, input_ids: Tensor) -> Tensor:
        slot = self.slot[input_ids]  # (B, L)
        frozen = nn.functional.embedding(input_ids, self.base)  # (B, L, D)
        return torch.where((slot >= 0)[..., None], self.vectors[slot.clamp(min=0)], frozen)

    def merged(self) -> nn.Embedding:
        """A plain frozen `nn.Embedding` with the trained vectors in their rows."""
        weight = self.base.clone()
        weight[self.ids] = self.vectors.detach()
        return nn.Embedding.from_pretrained(weight, freeze=True)


def add_placeholder(pipe, settings: TextualInversionSettings) -> tuple[Part, NewTokenRows]:
    """Add ``settings.placeholder_token`` to ``pipe.text_encoder`` with ``num_vectors`` vectors,
    each the mean embedding of ``initializer_token``'s tokens, and put a `NewTokenRows` in the
    encoder's place of the token embedding; returns its `Part` (named ``textual_inversion``)
    and the module. Everything else stays frozen."""
    from ldm.encoders.placeholders import add_token, token_embedding

    encoder = pipe.text_encoder
    init_ids = encoder.tokenize(settings.initializer_token)[0].tolist()  # (L,)
    special = {encoder.tokenizer.bos_token_id, encoder.tokenizer.eos_token_id}
    special.add(encoder.tokenizer.pad_token_id)
    init_ids = [i for i in init_ids if i not in special]
    if not init_ids:
        raise ValueError(
            f"textual_inversion.initializer_token={settings.initializer_token!r} has no tokens; "
            "use a word, e.g. the kind of thing the new token names"
        )
    start = token_embedding(encoder).weight[init_ids].detach().float().mean(0)  # (D,)
    try:
        ids = add_token(encoder, settings.placeholder_token, start.repeat(settings.num_vectors, 1))
    except ValueError as error:
        raise ValueError(f"textual_inversion.placeholder_token: {error}") from None
    rows = NewTokenRows(token_embedding(encoder), ids)
    _set_token_embedding(encoder, rows)
    return Part([rows.vectors], settings.learning_rate, rows, "textual_inversion"), rows


def _set_token_embedding(encoder, module: nn.Module) -> None:
    if encoder.kind == "transformers":
        encoder.model.set_input_embeddings(module)
    else:
        encoder.model.token_embedding = module


def finish_placeholder(pipe, rows: NewTokenRows) -> None:
    """Put a plain embedding with the trained vectors back in the text encoder."""
    _set_token_embedding(pipe.text_encoder, rows.merged())


def templated(samples: list, settings: TextualInversionSettings, source: str) -> list:
    """The samples with ``settings.template`` as every caption (``{}`` the token, ``{caption}``
    the sample's own caption), or, without a template, as they are once every caption names
    the placeholder token (a ValueError otherwise)."""
    import dataclasses

    token = settings.placeholder_token
    if settings.template is not None:
        template = settings.template.replace("{}", token)
        return [
            dataclasses.replace(s, caption=template.replace("{caption}", s.caption))
            for s in samples
        ]
    lacking = [s.caption for s in samples if token.lower() not in s.caption.lower()]
    if lacking:
        raise ValueError(
            f"{len(lacking)} of {len(samples)} captions in {source} do not name "
            f"textual_inversion.placeholder_token {token!r} (first: {lacking[0]!r}); write it "
            "into the captions, or set textual_inversion.template, e.g. 'an icon of {}'"
        )
    return samples


def export_embedding(
    pipe, settings: TextualInversionSettings, folder: Path, step: int
) -> list[Path]:
    """Write the trained vectors into ``folder``: ``learned_embeds.safetensors`` as diffusers'
    textual-inversion script does (``{token: (N, D)}``, for `load_textual_inversion`), and an
    A1111 embedding named after the token without ``<>`` (A1111's prompt word is the file
    name). Returns both paths."""
    from ldm.encoders.placeholders import token_vectors
    from ldm.formats.textual_inversion import save_a1111_embedding, save_embedding

    token = settings.placeholder_token
    vectors = token_vectors(pipe.text_encoder, token).float()  # (N, D)
    diffusers_file = folder / "learned_embeds.safetensors"
    save_embedding(diffusers_file, token, vectors)
    stem = re.sub(r"[^A-Za-z0-9_-]", "", token) or "embedding"
    a1111_file = folder / f"{stem}.safetensors"
    save_a1111_embedding(a1111_file, token, vectors, step=step)
    return [diffusers_file, a1111_file]
