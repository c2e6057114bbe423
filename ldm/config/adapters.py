"""The adapter sections of a training config: ``lora`` (`LoraSettings`) and
``textual_inversion`` (`TextualInversionSettings`); `ldm.training.adapters` trains them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LORA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's attention, as diffusers


@dataclass
class LoraSettings:
    """``lora.*``: train LoRA adapters (peft) on the U-Net's attention instead of its weights.

    Each targeted Linear W becomes W x + (alpha / rank) B A x with A (rank, in) and B (out,
    rank); only A and B train (B starts at zero, so step 0 is the base model). ``alpha`` null
    means ``rank`` (a scale of 1, as diffusers' and kohya's scripts default). ``targets`` are
    module names (or name suffixes) as peft matches them. ``text_encoder: true`` adapts the
    text encoder's ``text_encoder_targets`` too, at ``text_encoder_learning_rate`` (null:
    ``learning_rate``)."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_UNET_TARGETS))
    learning_rate: float = 1e-4
    text_encoder: bool = False
    text_encoder_targets: list[str] = dataclasses.field(
        default_factory=lambda: list(LORA_TEXT_TARGETS)
    )
    text_encoder_learning_rate: float | None = None

    def __post_init__(self) -> None:
        _check_section(
            "lora",
            self,
            [
                ("rank", type(self.rank) is int and self.rank >= 1, "an integer >= 1"),
                ("alpha", self.alpha is None or self.alpha > 0, "null (= rank) or a number > 0"),
                ("dropout", 0 <= self.dropout < 1, "a number in [0, 1)"),
                ("targets", bool(self.targets), "a non-empty list of module names"),
                ("learning_rate", self.learning_rate > 0, "a number > 0"),
                (
                    "text_encoder_learning_rate",
                    self.text_encoder_learning_rate is None or self.text_encoder_learning_rate > 0,
                    "null (lora.learning_rate) or a number > 0",
                ),
            ],
        )

    @property
    def scale_alpha(self) -> float:
        """peft's ``lora_alpha``: ``alpha``, or ``rank`` when it is null."""
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class TextualInversionSettings:
    """``textual_inversion.*``: learn ``num_vectors`` new token embeddings for
    ``placeholder_token`` (Gal et al. 2022); everything else stays frozen. The vectors start as
    the embedding of ``initializer_token`` (a word whose tokens the vocabulary has). Captions
    must name ``placeholder_token``, or ``template`` replaces every caption, with the token in
    place of ``{}`` and the caption in place of ``{caption}``: ``"an icon of {}"`` learns an
    object, ``"{caption}, {} style"`` a style that the captions do not describe."""

    placeholder_token: str
    initializer_token: str
    num_vectors: int = 1
    learning_rate: float = 5e-3
    template: str | None = None

    def __post_init__(self) -> None:
        _check_section(
            "textual_inversion",
            self,
            [
                (
                    "placeholder_token",
                    bool(self.placeholder_token.strip()) and " " not in self.placeholder_token,
                    "one word without spaces, e.g. '<my-icon>'",
                ),
                ("initializer_token", bool(self.initializer_token.strip()), "a word"),
                ("num_vectors", self.num_vectors >= 1, "an integer >= 1"),
                ("learning_rate", self.learning_rate > 0, "a number > 0"),
                (
                    "template",
                    self.template is None or self.template.count("{}") == 1,
                    "null or a caption with one {} where the token goes",
                ),
            ],
        )


def _check_section(section: str, settings, checks: list[tuple[str, bool, str]]) -> None:
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(
                f"{section}.{name}={getattr(settings, name)!r} is not allowed; use {allowed}"
            )
