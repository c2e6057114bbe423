"""How well a model's frozen parts fit a dataset: the VAE's reconstructions and the tokenizer's words.

Fine-tuning trains the U-Net only; the VAE and the tokenizer stay as they are. If the VAE cannot
reconstruct the images, the U-Net can at best learn its blurred version of them; if the tokenizer
splits the captions' words into pieces it never saw together, the text encoder gives them
embeddings that mean little. ``ldm check-data`` measures both before any time is spent:

- ``vae_psnr``: the mean PSNR (dB) of images passed through encode (posterior mean) and decode;
- ``unknown_words``: the caption words the tokenizer does not hold as one whole token.

Each figure is compared with a threshold (`VAE_PSNR_THRESHOLD`, `UNKNOWN_WORDS_THRESHOLD`), and
`ModelFit.warnings` says what to do when it is crossed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ldm.config import DataConfig
from ldm.data import ImageCaptionDataset, Sample
from ldm.encoders.tokenizer import clean_prompt
from ldm.images import psnr

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

    from ldm.encoders.vae import FrozenVAE

# 20 dB is an RMS error of 0.2 on [-1, 1] (25/255 per channel): visibly blurred. The shipped
# VAE gives ~35 dB on its shapes and ~17 dB on real icons; SD's VAE gives ~23-27 dB on photos.
VAE_PSNR_THRESHOLD = 20.0  # dB
# Full CLIP holds all but a few percent of English caption words whole; the shipped model's
# 607-token tokenizer splits nearly every word outside its shapes world.
UNKNOWN_WORDS_THRESHOLD = 0.10  # share of word occurrences
END_OF_WORD = "</w>"  # CLIP's BPE marks the last piece of a word with it

FIX_VAE = (
    "fine-tune the VAE decoder too (train.train_vae_decoder: true), or train your own model "
    "from scratch (ldm train-recipe)"
)
FIX_TOKENIZER = (
    "fine-tune the text encoder too (train.train_text_encoder: true), or train your own model "
    "from scratch with a tokenizer built from your captions (ldm train-recipe)"
)


@dataclass
class WordFit:
    """Caption words against a tokenizer. ``words`` and ``unknown`` count occurrences (a word in
    five captions counts five times); ``top_unknown`` holds the most frequent unknown words with
    their counts, most frequent first."""

    words: int
    unknown: int
    top_unknown: list[tuple[str, int]] = field(default_factory=list)

    @property
    def share(self) -> float:
        """The share of word occurrences unknown, in [0, 1] (0 when there are no words)."""
        return self.unknown / self.words if self.words else 0.0


def caption_words(tokenizer: CLIPTokenizer, caption: str) -> list[tuple[str, bool]]:
    """The words of ``caption`` as the tokenizer sees them, each with whether it is one token.

    The caption is cleaned as in training (`clean_prompt`, then the tokenizer's normalizer) and
    split by the tokenizer's own pre-tokenizer (CLIP's regex: runs of letters, single digits,
    runs of punctuation, ``'s``-style endings). Pieces without a letter are left out: CLIP
    splits numbers into digits and every digit and punctuation byte is a token in every CLIP
    vocabulary. A word is known when ``piece + "</w>"`` is in the vocabulary, so BPE keeps it
    whole. ``tokenizer`` must be a fast (tokenizers-backed) `CLIPTokenizer`.
    """
    backend = tokenizer.backend_tokenizer
    text = clean_prompt(caption)
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    vocab = tokenizer.get_vocab()
    return [
        (text[start:end], piece + END_OF_WORD in vocab)  # piece: byte-level, as in the vocab
        for piece, (start, end) in backend.pre_tokenizer.pre_tokenize_str(text)
        if any(c.isalpha() for c in text[start:end])
    ]


def unknown_words(tokenizer: CLIPTokenizer, captions: list[str], *, top: int = 10) -> WordFit:
    """Count the caption words that ``tokenizer`` splits into several tokens (see
    `caption_words`), with the ``top`` most frequent of them (ties in first-seen order)."""
    words = unknown = 0
    counts: Counter[str] = Counter()
    for caption in captions:
        for word, known in caption_words(tokenizer, caption):
            words += 1
            if not known:
                unknown += 1
                counts[word] += 1
    return WordFit(words, unknown, counts.most_common(top))


@torch.no_grad()
def vae_round_trip(vae: FrozenVAE, pixels: Tensor, *, batch_size: int = 16) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] through ``vae``: encode to the posterior mean (no noise),
    decode, clamp to [-1, 1] as a saved image is; float32 on the CPU. H and W must be multiples
    of ``vae.downscale_factor``. ``batch_size`` bounds the memory used at a time."""
    decoded = [
        vae.decode(vae.encode(chunk.to(vae.device))).clamp(-1, 1).float().cpu()  # (b, 3, H, W)
        for chunk in pixels.split(batch_size)
    ]
    return torch.cat(decoded)


def vae_psnr(vae: FrozenVAE, pixels: Tensor, *, batch_size: int = 16) -> float:
    """The mean PSNR in dB of `vae_round_trip` against ``pixels`` (B, 3, H, W) in [-1, 1]."""
    return psnr(vae_round_trip(vae, pixels, batch_size=batch_size), pixels.float()).mean().item()


def sample_pixels(
    config: DataConfig, samples: list[Sample], n: int, *, seed: int = 0
) -> tuple[Tensor, list[int]]:
    """Up to ``n`` samples drawn without replacement (seeded), prepared as training reads them
    (`ImageCaptionDataset`: resized, cropped, flipped as ``config`` says). Returns the pixels
    (n, 3, R, R) in [-1, 1] and the sample indices, in increasing order."""
    generator = torch.Generator().manual_seed(seed)
    dataset = ImageCaptionDataset(config, samples, generator=generator)
    chosen = torch.randperm(len(dataset), generator=generator)[:n].sort().values.tolist()
    items = [dataset[i] for i in chosen]
    return torch.stack([item["pixels"] for item in items]), [item["index"] for item in items]


@dataclass
class ModelFit:
    """The fit of a model's VAE and tokenizer to a dataset (see the module docstring)."""

    model: str
    psnr: float  # dB, mean over vae_images
    vae_images: int  # images passed through the VAE, of ``images``
    images: int
    resolution: int
    words: WordFit
    psnr_threshold: float = VAE_PSNR_THRESHOLD
    unknown_threshold: float = UNKNOWN_WORDS_THRESHOLD

    def warnings(self) -> list[str]:
        """One sentence per threshold crossed: the figure, the threshold, what to do."""
        out = []
        if self.psnr < self.psnr_threshold:
            out.append(
                f"the VAE reconstructs these images poorly: {self.psnr:.1f} dB mean PSNR, below "
                f"{self.psnr_threshold:.0f} dB, so the model cannot draw them sharper than that; "
                + FIX_VAE
            )
        if self.words.share > self.unknown_threshold:
            out.append(
                f"the tokenizer does not know {self.words.share:.1%} of the caption words, above "
                f"{self.unknown_threshold:.0%}: it splits them into pieces the text encoder "
                "never learnt as words; " + FIX_TOKENIZER
            )
        return out

    def to_text(self) -> str:
        words = self.words
        top = ", ".join(f"{word} ({n})" for word, n in words.top_unknown) or "none"
        lines = [
            f"Model fit ({self.model}):",
            f"  VAE: {self.psnr:.1f} dB mean PSNR on {self.vae_images} of {self.images} images at "
            f"{self.resolution}x{self.resolution} (encode to the posterior mean, decode; "
            f"warning below {self.psnr_threshold:.0f} dB)",
            f"  tokenizer: {words.unknown} of {words.words} caption words ({words.share:.1%}) are "
            f"not one token (warning above {self.unknown_threshold:.0%}); most frequent: {top}",
            *(f"WARNING: {warning}" for warning in self.warnings()),
        ]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures, thresholds and warnings."""
        return {
            "model": self.model,
            "vae_psnr_db": self.psnr,
            "vae_images": self.vae_images,
            "images": self.images,
            "vae_psnr_threshold_db": self.psnr_threshold,
            "caption_words": self.words.words,
            "unknown_words": self.words.unknown,
            "unknown_share": self.words.share,
            "unknown_share_threshold": self.unknown_threshold,
            "top_unknown_words": [{"word": w, "count": n} for w, n in self.words.top_unknown],
            "warnings": self.warnings(),
        }


def measure_fit(
    vae: FrozenVAE,
    tokenizer: CLIPTokenizer,
    config: DataConfig,
    samples: list[Sample],
    *,
    model: str = "",
    vae_sample: int = 64,
    seed: int = 0,
) -> ModelFit:
    """`vae_psnr` on a seeded sample of up to ``vae_sample`` images at ``config.resolution``, and
    `unknown_words` over every caption of ``samples``. ``model`` names the model in the report."""
    if vae_sample < 1:
        raise ValueError(f"vae_sample must be a positive number of images, got {vae_sample}")
    pixels, _ = sample_pixels(config, samples, vae_sample, seed=seed)  # (n, 3, R, R)
    return ModelFit(
        model=model,
        psnr=vae_psnr(vae, pixels),
        vae_images=len(pixels),
        images=len(samples),
        resolution=config.resolution,
        words=unknown_words(tokenizer, [sample.caption for sample in samples]),
    )
