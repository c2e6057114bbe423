"""Placeholder tokens: new words for a frozen text encoder, each with its own rows in the token
embedding. Textual inversion (Gal et al. 2022, "An Image is Worth One Word") learns those rows.

An embedding of N vectors becomes N added tokens, ``tok``, ``tok_1``, ..., ``tok_{N-1}``, as in
diffusers; wherever prompts are tokenized (`ldm.encoders.tokenizer.clip_encode`), ``tok`` is
written out as all N. The tokens live in the tokenizer and the vectors in the embedding, so
saving the text encoder (`FrozenTextEncoder.save_pretrained`) keeps them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ldm.encoders.text import FrozenTextEncoder
from ldm.encoders.tokenizer import clean_prompt, placeholder_tokens


def token_embedding(text_encoder: FrozenTextEncoder) -> nn.Embedding:
    """The encoder's token embedding, weight (V, D) with one row per token id, of either kind
    (a `CLIPTextModel`'s input embeddings, an open_clip tower's ``token_embedding``)."""
    if text_encoder.kind == "transformers":
        return text_encoder.model.get_input_embeddings()
    return text_encoder.model.token_embedding


def token_names(token: str, num_vectors: int) -> list[str]:
    """The tokens of an ``num_vectors``-vector embedding: ``token``, ``token_1``, ..."""
    return [token, *(f"{token}_{i}" for i in range(1, num_vectors))]


def add_token(text_encoder: FrozenTextEncoder, token: str, vectors: Tensor) -> list[int]:
    """Add placeholder ``token`` with ``vectors`` (N, D), or (D,) for one vector, to
    ``text_encoder``; returns the N token ids of ``token_names(token, N)``, in that order.

    The contract, which textual-inversion training relies on:

    - every check comes before any change: a one-line ValueError, nothing changed, when the
      token has spaces, when it or one of its ``token_i`` is already a single token of the
      vocabulary (a word CLIP knows, or an embedding loaded before), or when D is not the
      encoder's width;
    - the tokenizer gains the N tokens, so a prompt holding ``token`` (in any case: prompts
      are lower-cased) encodes to the N ids in its place, in `FrozenTextEncoder.tokenize`,
      ``count_tokens`` and `ldm.encoders.tokenizer.clip_encode` alike;
    - ``token_embedding(text_encoder).weight[ids]`` equals ``vectors`` (in the encoder's dtype,
      on its device) and no other row changes. The embedding is a new `nn.Embedding`, grown to
      hold the ids where needed: fetch it again after this call;
    - the encoder stays frozen, no parameter requiring grad. To train the rows, set
      ``requires_grad`` on that embedding's weight and keep every row but ``ids`` as it was
      (zero their gradient, or copy them back after each step); `token_vectors` reads the
      rows back for `ldm.formats.textual_inversion.save_embedding`.
    """
    embedding = token_embedding(text_encoder)
    vectors = _checked_vectors(vectors, embedding.embedding_dim)  # (N, D)
    names = token_names(token, len(vectors))
    _check_new(text_encoder.tokenizer, token, names)
    tokenizer = text_encoder.tokenizer
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    rows = max(embedding.num_embeddings, max(ids) + 1)
    weight = embedding.weight.detach()  # (V, D)
    extra = weight.new_zeros(rows - len(weight), weight.shape[1])
    weight = torch.cat([weight, extra])  # (rows, D), a copy
    weight[ids] = vectors.to(weight)
    grown = nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=embedding.padding_idx)
    if text_encoder.kind == "transformers":
        text_encoder.model.set_input_embeddings(grown)
        text_encoder.model.config.vocab_size = rows
    else:
        text_encoder.model.token_embedding = grown
        if hasattr(text_encoder.model, "vocab_size"):
            text_encoder.model.vocab_size = rows
    return ids


def token_ids(text_encoder: FrozenTextEncoder, token: str) -> list[int]:
    """The ids of placeholder ``token``'s N tokens (``token``, ``token_1``, ...)."""
    groups = placeholder_tokens(text_encoder.tokenizer)
    if token not in groups:
        known = ", ".join(groups) or "none"
        raise ValueError(f"{token!r} is no placeholder token of this text encoder; it has: {known}")
    return text_encoder.tokenizer.convert_tokens_to_ids(groups[token])


def token_vectors(text_encoder: FrozenTextEncoder, token: str) -> Tensor:
    """Placeholder ``token``'s vectors (N, D), a detached copy of its embedding rows."""
    ids = token_ids(text_encoder, token)
    return token_embedding(text_encoder).weight[ids].detach().clone()  # (N, D)


def _checked_vectors(vectors: Tensor, width: int) -> Tensor:
    """``vectors`` as (N, D), or a ValueError saying what is wrong with them."""
    if not isinstance(vectors, Tensor) or not vectors.is_floating_point():
        kind = vectors.dtype if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(f"the embedding's vectors must be a float tensor, got {kind}")
    vectors = vectors.unsqueeze(0) if vectors.ndim == 1 else vectors  # (N, D)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(
            f"the embedding's vectors have shape {tuple(vectors.shape)}; expected (N, D) or (D,)"
        )
    if vectors.shape[1] != width:
        raise ValueError(
            f"the embedding's vectors are {vectors.shape[1]} wide but this text encoder's tokens "
            f"are {width} wide: the embedding was made for another model (SD 1.x: 768, SD 2.x: 1024)"
        )
    if not torch.isfinite(vectors).all():
        raise ValueError("the embedding's vectors hold NaN or infinite values")
    return vectors


def _check_new(tokenizer, token: str, names: list[str]) -> None:
    """A ValueError unless ``names`` (``token``'s tokens) are all new, single words."""
    if not token or len(token.split()) != 1 or token != token.strip():
        raise ValueError(f"a placeholder token is one word without spaces; got {token!r}")
    groups = placeholder_tokens(tokenizer)
    base = re.fullmatch(r"(.+)_\d+", token)
    if base and base[1] in groups:
        raise ValueError(
            f"token {token!r} would read as a vector of the embedding {base[1]!r}; pick another"
        )
    vocab = tokenizer.get_vocab()
    for name in names:
        pieces = tokenizer.tokenize(clean_prompt(name))
        if name in vocab or len(pieces) == 1:
            known = name if name in vocab else pieces[0]
            raise ValueError(
                f"token {name!r} is already in the tokenizer's vocabulary (as {known!r}); "
                "pass another token="
            )
