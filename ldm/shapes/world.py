"""The procedural shapes world behind the shipped default model.

Every image is 64x64 RGB: one shape (circle, square, triangle) of one of eight colours, small
(16 px across) or large (28 px), centred near one of the 3x3 grid points at 16, 32 and 48 px
(at most 2 px of jitter, always fully inside the image), on a plain background of another of the
eight colours. Edges are anti-aliased (drawn at 4x and box-filtered down), so an image is a
smooth function of the shape's position, which a VAE can reconstruct.

The colours are fixed sRGB values (`COLORS`). The canonical caption is
``"a {size} {color} {shape} {position} on a {background} background"``; training captions also
use the paraphrases in `TEMPLATES`, so the text encoder has to read words, not one template.
`HELDOUT` is a fixed set of attribute combinations that training data never contains; the
evaluation prompts come from it.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 16, "large": 28}  # side of the bounding box, in pixels
# position phrase -> centre (x, y) in pixels, before jitter
POSITIONS: dict[str, tuple[int, int]] = {
    "at the top left": (16, 16),
    "at the top": (32, 16),
    "at the top right": (48, 16),
    "on the left": (16, 32),
    "in the center": (32, 32),
    "on the right": (48, 32),
    "at the bottom left": (16, 48),
    "at the bottom": (32, 48),
    "at the bottom right": (48, 48),
}
MAX_JITTER = 2
ATTRIBUTES = ("shape", "color", "size", "position", "background")

CANONICAL = "a {size} {color} {shape} {position} on a {background} background"
TEMPLATES = (
    CANONICAL,
    "a {background} background with a {size} {color} {shape} {position}",
    "{position} there is a {size} {color} {shape}, on a {background} background",
    "a {color} {shape}, {size}, {position}, on {background}",
    "a picture of a {size} {color} {shape} {position} with a {background} background",
)
CANONICAL_SHARE = 0.5  # the rest of the captions use the paraphrases, equally often

HELDOUT_SEED, HELDOUT_COUNT = 1234, 150
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One image of the world: its five attributes and the jitter of the centre (pixels)."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    dx: int = 0
    dy: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("shape", SHAPES),
            ("color", COLORS),
            ("size", SIZES),
            ("position", POSITIONS),
            ("background", COLORS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} {getattr(self, name)!r} is not allowed; use one of: "
                    + ", ".join(allowed)
                )
        if self.background == self.color:
            raise ValueError(f"the background must differ from the shape's colour {self.color!r}")
        if max(abs(self.dx), abs(self.dy)) > MAX_JITTER:
            raise ValueError(f"jitter ({self.dx}, {self.dy}) exceeds {MAX_JITTER} px")

    @property
    def combination(self) -> tuple[str, str, str, str, str]:
        """(shape, color, size, position, background): what `HELDOUT` holds out."""
        return (self.shape, self.color, self.size, self.position, self.background)

    @property
    def center(self) -> tuple[int, int]:
        x, y = POSITIONS[self.position]
        return x + self.dx, y + self.dy

    def caption(self, template: str = CANONICAL) -> str:
        return template.format(**asdict(self))


def vocabulary() -> list[str]:
    """Every word that a caption of this world can hold (for the text encoder's tokenizer)."""
    fixed = " ".join(t.format_map(_Blank()) for t in TEMPLATES)
    return sorted(
        {
            *fixed.replace(",", " , ").split(),
            *" ".join([*COLORS, *SHAPES, *SIZES, *POSITIONS]).split(),
        }
    )


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


def all_combinations() -> list[tuple[str, str, str, str, str]]:
    """Every (shape, color, size, position, background) with background != color: 3024."""
    return [
        combo
        for combo in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, COLORS)
        if combo[1] != combo[4]
    ]


HELDOUT: frozenset[tuple[str, str, str, str, str]] = frozenset(
    random.Random(HELDOUT_SEED).sample(all_combinations(), HELDOUT_COUNT)
)


def render(spec: ShapeSpec) -> Image.Image:
    """The 64x64 RGB image of ``spec``, drawn at 4x and box-filtered (anti-aliased edges)."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * s,) * 2, COLORS[spec.background])
    draw = ImageDraw.Draw(image)
    (cx, cy), half = spec.center, SIZES[spec.size] / 2
    left, top, right, bottom = ((cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s)
    fill = COLORS[spec.color]
    # PIL's boxes include their last pixel, hence the -1 on the right and bottom edges
    if spec.shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:  # an isosceles triangle pointing up, filling half of its bounding box
        draw.polygon([(cx * s, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def sample_specs(n: int, *, seed: int = 0, split: str = "train") -> list[ShapeSpec]:
    """``n`` random specs: combinations outside `HELDOUT` (``split="train"``) or inside it
    (``"heldout"``), each with a random jitter of up to 2 px."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r} is not allowed; use train or heldout")
    if n < 1:
        raise ValueError(f"--n {n} is not allowed; use an integer >= 1")
    combos = (
        sorted(HELDOUT)
        if split == "heldout"
        else [c for c in all_combinations() if c not in HELDOUT]
    )
    rng = random.Random(seed)
    jitter = range(-MAX_JITTER, MAX_JITTER + 1)
    return [
        ShapeSpec(*rng.choice(combos), dx=rng.choice(jitter), dy=rng.choice(jitter))
        for _ in range(n)
    ]


def make_shapes(n: int, out: str | Path, *, seed: int = 0, split: str = "train") -> Path:
    """Write ``n`` images and ``metadata.jsonl`` (``file_name``, ``text`` and the attributes) to
    ``out``, an image folder that ``ldm train`` reads. Deterministic in ``seed``. Refuses a
    folder that holds anything, so no data is overwritten or mixed in."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} is not empty; choose a new or empty folder")
    specs = sample_specs(n, seed=seed, split=split)  # checks n and split
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    lines = []
    for i, spec in enumerate(tqdm(specs, desc=f"rendering {split} shapes", unit="image")):
        template = CANONICAL if rng.random() < CANONICAL_SHARE else rng.choice(TEMPLATES[1:])
        name = f"{i:06d}.png"
        render(spec).save(out / name)
        lines.append(
            json.dumps({"file_name": name, "text": spec.caption(template), **asdict(spec)})
        )
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(out / "metadata.jsonl")
    logger.info("wrote %d %s images to %s", n, split, out)
    return out


def read_specs(folder: str | Path) -> list[tuple[Path, ShapeSpec]]:
    """The (image path, spec) pairs of a folder written by `make_shapes`."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"no {metadata}; write the folder with `ldm make-shapes`")
    pairs = []
    for line in metadata.read_text().splitlines():
        row = json.loads(line)
        fields = {k: row[k] for k in (*ATTRIBUTES, "dx", "dy")}
        pairs.append((folder / row["file_name"], ShapeSpec(**fields)))
    return pairs
