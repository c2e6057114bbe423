"""Textual-inversion embeddings on a pipeline (`TextualInversion`): load a shared embedding
file as a new token of the text encoder.

The file is read by `ldm.formats.textual_inversion`; `ldm.encoders.placeholders.add_token`
puts its N vectors in the token embedding as N new tokens. The tokens and rows are part of the
text encoder from then on, so `save_pretrained` writes them with it and a saved pipeline
(ours or diffusers') reads the same prompts the same way.
"""

from __future__ import annotations

from pathlib import Path

from ldm.encoders.placeholders import add_token
from ldm.encoders.text import FrozenTextEncoder
from ldm.encoders.tokenizer import placeholder_tokens
from ldm.formats.textual_inversion import read_embedding


class TextualInversion:
    """The textual-inversion methods of `LatentDiffusionPipeline` (which has ``text_encoder``)."""

    text_encoder: FrozenTextEncoder

    @property
    def textual_inversion_tokens(self) -> dict[str, int]:
        """Each embedding token the text encoder holds, with its number of vectors."""
        return {
            t: len(names) for t, names in placeholder_tokens(self.text_encoder.tokenizer).items()
        }

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Load an embedding file (diffusers' ``learned_embeds.safetensors``/``.bin``, A1111's
        ``.pt`` or ``emb_params`` ``.safetensors``) and return its token: ``token``, else the
        one a diffusers file names, else the file's stem (A1111's name for it). A prompt then
        holding the token, in any case, reads the embedding's vectors in its place.

        Refused, with the file named and nothing changed: a token already in the vocabulary
        (a word the tokenizer knows, or an embedding loaded before), a token with spaces, and
        vectors whose width is not the text encoder's (an embedding for another model)."""
        path = Path(path)
        token, vectors = read_embedding(path, token)
        try:
            add_token(self.text_encoder, token, vectors)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return token
