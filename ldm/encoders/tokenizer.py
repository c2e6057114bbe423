"""CLIP's tokenizer, offline: the BPE vocabulary that open_clip ships, in a transformers
`CLIPTokenizer`, after the text cleaning CLIP was trained with (`clean_prompt`). Every count of
tokens (`count_tokens`) and every encoding (`clip_encode`) goes through here, so the ids equal
open_clip's and the token length is always the tokenizer's own ``model_max_length``."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from open_clip.tokenizer import basic_clean, bytes_to_unicode, default_bpe, whitespace_clean
from transformers import CLIPTokenizer

CLIP_MAX_LENGTH = 77  # the token length of CLIP and of every Stable Diffusion text encoder
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
OPEN_CLIP_PAD_TOKEN = "!"  # id 0: open_clip pads with zeros


def build_clip_tokenizer(
    save_dir: str | Path | None = None,
    *,
    pad_token: str = END_TOKEN,
    model_max_length: int = CLIP_MAX_LENGTH,
    words: Iterable[str] | None = None,
    reserve: int = 0,
) -> CLIPTokenizer:
    """A `CLIPTokenizer` with the real CLIP vocabulary (49408 tokens), built offline from the BPE
    merges that open_clip ships, as open_clip's `SimpleTokenizer` builds its own.

    ``pad_token`` ``"<|endoftext|>"`` is SD 1.x's (OpenAI CLIP); ``"!"`` is SD 2's (OpenCLIP,
    pad id 0). With ``save_dir`` the files (vocab.json, merges.txt, tokenizer.json,
    tokenizer_config.json) are written there, so `CLIPTokenizer.from_pretrained(save_dir)` loads it.

    With ``words``, only the merges that CLIP's BPE applies to those words are kept (in CLIP's
    order): each of them still becomes the same single tokens as in full CLIP, any other text
    falls back to smaller pieces, and the vocabulary shrinks to a few hundred tokens, so a small
    model's token embedding stays small. ``reserve`` keeps CLIP's first ``reserve`` merges as well
    (its most frequent pieces of English), so that words the captions never used still break into
    common pieces rather than single characters.
    """
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]  # 48894 merges: 49408 tokens
    if words is not None:
        merges = _merges_for(merges, words, reserve)
    alphabet = list(bytes_to_unicode().values())  # the 256 byte-level characters
    vocab = [*alphabet, *(c + "</w>" for c in alphabet)]
    vocab += ["".join(merge.split()) for merge in merges] + [START_TOKEN, END_TOKEN]
    if pad_token not in vocab:
        raise ValueError(
            f"pad_token {pad_token!r} is not in the CLIP vocabulary; use {END_TOKEN!r} or '!'"
        )
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(save_dir) if save_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer.from_pretrained(
            folder, pad_token=pad_token, model_max_length=model_max_length, local_files_only=True
        )
        if save_dir is not None:
            tokenizer.save_pretrained(folder)
    return tokenizer


def _merges_for(merges: list[str], words: Iterable[str], reserve: int = 0) -> list[str]:
    """The merges CLIP's BPE applies to ``words`` (ASCII, cleaned), and the first ``reserve``
    merges, in their original order. Either set is closed (a merge's parts are made by merges of
    lower rank, which BPE applied first), so their union is a valid BPE vocabulary."""
    rank = {tuple(m.split()): i for i, m in enumerate(merges)}
    used: set[int] = set(range(min(reserve, len(merges))))
    for text in words:
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", clean_prompt(text)):
            symbols = [*word[:-1], word[-1] + "</w>"]
            while len(symbols) > 1:
                pairs = [
                    (rank.get(p, len(rank)), i) for i, p in enumerate(itertools.pairwise(symbols))
                ]
                best, i = min(pairs)
                if best == len(rank):
                    break
                used.add(best)
                symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return [merges[i] for i in sorted(used)]


def clean_prompt(prompt: str) -> str:
    """The cleaning CLIP's own tokenizers apply: ftfy, HTML unescaping, whitespace, lower case."""
    return whitespace_clean(basic_clean(prompt)).lower()


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The `CLIPTokenizer` of a diffusers pipeline folder (``folder/tokenizer/``), or of a
    tokenizer folder itself."""
    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer folder at {folder}; pass a pipeline folder")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def placeholder_tokens(tokenizer: CLIPTokenizer) -> dict[str, list[str]]:
    """The tokens added for textual-inversion embeddings (`ldm.encoders.placeholders`), each
    with the tokens its vectors have: ``{"<cat>": ["<cat>", "<cat>_1", "<cat>_2"]}`` for a
    3-vector embedding, as diffusers names them. Special tokens (start, end, pad) are not
    placeholders."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}
    groups = {}
    for token in sorted(added):
        base = re.fullmatch(r"(.+)_\d+", token)
        if base and base[1] in added:
            continue  # a later vector of another token
        names = [token]
        while f"{token}_{len(names)}" in added:
            names.append(f"{token}_{len(names)}")
        groups[token] = names
    return groups


def expand_placeholders(text: str, groups: dict[str, list[str]]) -> str:
    """``text`` (cleaned, lower case) with every multi-vector placeholder written out as its
    tokens, "a <cat>" -> "a <cat> <cat>_1 <cat>_2" (diffusers' `maybe_convert_prompt`); a
    placeholder already followed by ``_1`` is left alone."""
    for token, names in groups.items():
        if len(names) > 1:
            written_out = " ".join(names).lower().replace("\\", r"\\")  # a literal replacement
            text = re.sub(re.escape(token.lower()) + r"(?!_\d)", written_out, text)
    return text


def clip_encode(tokenizer: CLIPTokenizer, prompts: list[str], **kwargs) -> dict:
    """Tokenize cleaned prompts as CLIP was trained, multi-vector placeholder tokens written
    out (`expand_placeholders`). ``split_special_tokens``: "!!!" stays one token when "!" is
    the pad token, as in open_clip; added (placeholder) tokens are not special and stay whole."""
    groups = placeholder_tokens(tokenizer)
    texts = [expand_placeholders(clean_prompt(p), groups) for p in prompts]
    return tokenizer(texts, split_special_tokens=True, verbose=False, **kwargs)


def count_tokens(tokenizer: CLIPTokenizer, prompts: list[str] | str) -> list[int]:
    """Tokens per prompt, start and end tokens included, before truncation."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return [len(ids) for ids in clip_encode(tokenizer, prompts)["input_ids"]]
