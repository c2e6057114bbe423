"""The frozen text encoder: prompts -> embeddings ``context`` (B, L, D) for cross-attention.

Two kinds of model sit behind one interface:

- ``"transformers"``: a `CLIPTextModel`, as in a diffusers pipeline folder (SD 1.x: OpenAI CLIP
  ViT-L/14; SD 2: OpenCLIP ViT-H/14 already cut to its penultimate block). Embeddings are its
  ``last_hidden_state`` (after the final layer norm).
- ``"open_clip"``: an open_clip text tower in open_clip's own format. Embeddings are the output
  of the penultimate transformer block followed by ``ln_final``, as SD 2 was trained.

Both tokenize with a transformers `CLIPTokenizer` holding the real CLIP vocabulary, after the
text cleaning CLIP was trained with (ftfy, HTML unescaping, whitespace, lower case), so the ids
equal open_clip's. Prompts are padded to ``max_length`` (the tokenizer's, 77 for CLIP) with the pad token the model was
trained with: ``<|endoftext|>`` (49407) for OpenAI CLIP, ``!`` (0) for OpenCLIP.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import open_clip
import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.encoders.tokenizer import (
    OPEN_CLIP_PAD_TOKEN,
    build_clip_tokenizer,
    clip_encode,
    count_tokens,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

KINDS = ("transformers", "open_clip")


class FrozenTextEncoder(nn.Module):
    """Prompts -> embeddings (B, L, D) for cross-attention. Frozen: in eval mode, no gradients.

    ``model`` is a `CLIPTextModel` (``kind="transformers"``) or an open_clip text tower or CLIP
    model (``kind="open_clip"``); ``tokenizer`` is a `CLIPTokenizer` whose pad token is the one
    the model was trained with.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: CLIPTokenizer,
        *,
        kind: Literal["transformers", "open_clip"],
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not supported; allowed: {', '.join(KINDS)}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; CLIP pads with '<|endoftext|>' or '!'"
            )
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self._warned: set[str] = set()  # prompts whose truncation was reported
        if kind == "transformers":
            config = model.config
            self.max_length, self.hidden_size = config.max_position_embeddings, config.hidden_size
            vocab_size = config.vocab_size
        else:
            self.max_length, self.hidden_size = model.positional_embedding.shape
            vocab_size = model.token_embedding.num_embeddings
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab_size}"
            )
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stays in eval mode whatever ``mode`` is: the encoder is frozen."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ tokens

    def _encode(self, prompts: list[str], **kwargs) -> dict:
        return clip_encode(self.tokenizer, prompts, **kwargs)

    def count_tokens(self, prompts: list[str] | str) -> list[int]:
        """Tokens per prompt, start and end tokens included, before truncation."""
        return count_tokens(self.tokenizer, prompts)

    def tokenize(self, prompts: list[str] | str) -> Tensor:
        """(B, max_length) int64 token ids: start, prompt, end, then pad tokens.

        A prompt longer than ``max_length`` tokens loses its tail (the end token stays), with a
        warning that names the prompt and the number of tokens dropped.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        L, pad = self.max_length, self.tokenizer.pad_token_id
        rows = []
        for prompt, ids in zip(
            prompts, self._encode(prompts)["input_ids"], strict=True
        ):  # one pass
            if len(ids) > L and prompt not in self._warned:  # once per prompt, not per image
                self._warned.add(prompt)
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                logger.warning(
                    f"prompt {short!r} has {len(ids)} tokens; the text encoder reads {L} "
                    f"(with start and end tokens), so the last {len(ids) - L} were dropped"
                )
            if len(ids) > L:
                ids = [*ids[: L - 1], ids[-1]]  # keep the end token, as the tokenizer truncates
            rows.append([*ids, *[pad] * (L - len(ids))])
        return torch.tensor(rows, dtype=torch.long)  # (B, L)

    # ------------------------------------------------------------------ embeddings

    def forward(self, prompts: list[str] | str) -> Tensor:
        """(B, L=max_length, D) embeddings on the module's device, in its dtype."""
        with torch.no_grad():
            return self.embed(prompts)

    def embed(self, prompts: list[str] | str) -> Tensor:
        """``forward`` with gradients, for fine-tuning the encoder (``train.train_text_encoder``)."""
        tokens = self.tokenize(prompts).to(self.device)  # (B, L)
        if self.kind == "transformers":
            return self.model(input_ids=tokens).last_hidden_state  # (B, L, D)
        return self._open_clip_penultimate(tokens)

    def _open_clip_penultimate(self, tokens: Tensor) -> Tensor:
        """SD 2's FrozenOpenCLIPEmbedder: every block but the last, then ln_final."""
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, L, D)
        batch_first = getattr(m.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)  # (L, B, D) for old open_clip
        for block in m.transformer.resblocks[:-1]:
            x = block(x, attn_mask=m.attn_mask)
        x = x if batch_first else x.transpose(0, 1)  # (B, L, D)
        return m.ln_final(x)  # (B, L, D)

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FrozenTextEncoder:
        """Read a diffusers pipeline folder's ``text_encoder/`` (a `CLIPTextModel`: config.json
        and model.safetensors) and ``tokenizer/`` (`CLIPTokenizer` files)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no folder at {path}; expected a diffusers pipeline folder")
        missing = [
            f"{name}/" for name in ("text_encoder", "tokenizer") if not (path / name).is_dir()
        ]
        if missing:
            raise FileNotFoundError(
                f"{path} has no {' and no '.join(missing)}; a pipeline folder holds text_encoder/ "
                "(config.json, model.safetensors) and tokenizer/ (vocab.json, merges.txt, ...)"
            )
        model = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
        return cls(model, load_tokenizer(path / "tokenizer"), kind="transformers")

    @classmethod
    def from_open_clip(
        cls, model_name: str, weights: str | Path, *, model_config: dict | None = None
    ) -> FrozenTextEncoder:
        """An open_clip text tower read from a local state dict of the whole CLIP model
        (.safetensors, or a .bin/.pt/.pth read with ``weights_only=True``). ``model_name`` is
        one of `open_clip.list_models()` (SD 2: ``"ViT-H-14"``), unless ``model_config`` (an
        open_clip model config dict: ``embed_dim``, ``text_cfg``, ``quick_gelu``, ...) is given.
        Nothing is downloaded."""
        config = model_config or open_clip.get_model_config(model_name)
        if not config:
            raise ValueError(
                f"unknown open_clip model {model_name!r}; pass model_config, or one of "
                f"open_clip.list_models() such as ViT-H-14, ViT-bigG-14, ViT-L-14"
            )
        text_cfg = dict(config["text_cfg"])
        if text_cfg.get("hf_model_name") or text_cfg.get("embed_cls"):
            raise ValueError(
                f"open_clip model {model_name!r} has a text tower with hf_model_name or "
                "embed_cls; only open_clip's own causal TextTransformer is supported"
            )
        # open_clip's builder for the text tower alone (the vision tower is never built)
        tower = open_clip.model._build_text_tower(
            config["embed_dim"], text_cfg, quick_gelu=config.get("quick_gelu", False)
        )
        state = _read_text_weights(Path(weights))
        expected = tower.state_dict()
        problems = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        problems += [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        if problems:
            raise ValueError(
                f"weights in {weights} do not fit open_clip model {model_name!r} "
                f"({len(problems)} problems): {', '.join(problems[:8])}"
            )
        tower.load_state_dict(state)
        tokenizer = build_clip_tokenizer(
            pad_token=OPEN_CLIP_PAD_TOKEN, model_max_length=tower.context_length
        )
        return cls(tower, tokenizer, kind="open_clip")

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``path/text_encoder/`` and ``path/tokenizer/`` in diffusers layout. An open_clip
        tower is first converted to a `CLIPTextModel` without its last block, as SD 2's folders
        hold it, so `from_pretrained` gives the same embeddings."""
        path = Path(path)
        model = self.model if self.kind == "transformers" else open_clip_to_transformers(self.model)
        model.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")


def _read_text_weights(path: Path) -> dict[str, Tensor]:
    """The text tower's weights from a whole-CLIP state dict (``visual.*`` is never read)."""
    if not path.is_file():
        raise FileNotFoundError(f"no open_clip weights file at {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("visual.")}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("text.") for k in state):  # open_clip's CustomTextCLIP layout
        state = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    return {
        k: v
        for k, v in state.items()
        if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")
    }


# open_clip ResidualAttentionBlock names -> CLIPEncoderLayer names (in_proj is split into q, k, v)
_BLOCK_NAMES = {
    "ln_1.": "layer_norm1.",
    "attn.out_proj.": "self_attn.out_proj.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu"}


def open_clip_to_transformers(
    tower: nn.Module,
    *,
    drop_last_block: bool = True,
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
) -> CLIPTextModel:
    """A `CLIPTextModel` whose ``last_hidden_state`` equals the open_clip tower's penultimate
    block followed by ``ln_final`` (the last block is left out), as in SD 2's diffusers folders;
    with ``drop_last_block=False``, its last block followed by ``ln_final``. ``tower`` is an
    open_clip text tower or a whole open_clip ``CLIP`` (which holds its text tower's parts)."""
    blocks = tower.transformer.resblocks
    blocks, first = (blocks[:-1] if drop_last_block else blocks), blocks[0]
    activation = type(first.mlp.gelu).__name__
    if activation not in _ACTIVATIONS or tower.attn_mask is None:
        raise ValueError(
            f"this open_clip tower (activation {activation}, causal mask "
            f"{tower.attn_mask is not None}) has no CLIPTextModel equivalent; "
            "only GELU or QuickGELU towers with a causal mask convert"
        )
    vocab_size, width = tower.token_embedding.weight.shape
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features,
        num_attention_heads=first.attn.num_heads,
        num_hidden_layers=len(blocks),
        max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act=_ACTIVATIONS[activation],
        layer_norm_eps=tower.ln_final.eps,
        pad_token_id=0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    state = {
        "embeddings.token_embedding.weight": tower.token_embedding.weight,
        "embeddings.position_embedding.weight": tower.positional_embedding,
        "final_layer_norm.weight": tower.ln_final.weight,
        "final_layer_norm.bias": tower.ln_final.bias,
    }
    for i, block in enumerate(blocks):
        prefix = f"encoder.layers.{i}."
        for name, value in block.state_dict().items():
            if name.startswith("attn.in_proj_"):  # (3 D, D) or (3 D,) -> q, k, v
                kind = name.removeprefix("attn.in_proj_")
                for proj, part in zip("qkv", value.chunk(3), strict=True):
                    state[f"{prefix}self_attn.{proj}_proj.{kind}"] = part
                continue
            old = next((o for o in _BLOCK_NAMES if name.startswith(o)), None)
            if old is None:
                raise ValueError(f"open_clip block parameter {name!r} has no CLIPTextModel match")
            state[prefix + _BLOCK_NAMES[old] + name.removeprefix(old)] = value
    model = CLIPTextModel(config)
    target = getattr(model, "text_model", model)  # transformers 4 nests the text model
    target.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return model.to(tower.token_embedding.weight.dtype).eval().requires_grad_(False)
