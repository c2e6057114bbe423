"""Does the model draw what the prompt says? A detector for the shapes world, and its scores.

The detector reads the five attributes of a shapes image with no learned model:

1. background: the median colour of the 2-pixel border, snapped to the nearest palette colour;
2. shape mask: pixels far from the background colour (> `MASK_DISTANCE` in RGB), cut to the
   largest 4-connected blob (stray pixels from a sampler do not move the box);
3. shape colour: the median colour of the mask's inner pixels, snapped to the palette;
4. shape: the share of its bounding box the mask fills (square 1, circle pi/4, triangle 1/2);
5. size: the bounding box's longer side (small 16 px, large 28 px); position: the box centre,
   snapped to the 3x3 grid at 16, 32 and 48 px.

On ground-truth renders it reads every attribute right (a test checks >= 99%), so on generated
images its accuracy measures the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ldm.config import GENERATION
from ldm.config.names import SIGMA_SAMPLERS
from ldm.diffusion.registry import resolve_sampler
from ldm.images import make_grid
from ldm.seeds import derive_seed
from ldm.shapes.world import ATTRIBUTES, COLORS, POSITIONS, SIZES, ShapeSpec, sample_specs

logger = logging.getLogger(__name__)

MASK_DISTANCE = 80.0  # RGB distance from the background that counts as shape (0-441)
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (8, 3)
_NAMES = list(COLORS)
_FILL_SQUARE, _FILL_CIRCLE = 0.89, 0.64  # fill >= 0.89: square; >= 0.64: circle; else triangle
_SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
SEED_STREAM = "eval-shapes"  # `ldm.seeds.derive_seed`'s stream of the evaluation's images


@dataclass(frozen=True)
class Detection:
    """What the detector read; ``None`` attributes when no shape was found."""

    background: str
    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None
    fill: float = 0.0
    box: tuple[int, int, int, int] | None = None  # left, top, right, bottom (exclusive)


def _nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(1)))]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = None, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if (
                    0 <= ny < mask.shape[0]
                    and 0 <= nx < mask.shape[1]
                    and mask[ny, nx]
                    and not labels[ny, nx]
                ):
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best is not None else mask


def _snap_position(x: float, y: float) -> str:
    def snap(v: float) -> int:
        return min((16, 32, 48), key=lambda c: abs(c - v))

    grid = (snap(x), snap(y))
    return next(name for name, center in POSITIONS.items() if center == grid)


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Read background, shape, colour, size and position from a 64x64 RGB shapes image."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    rgb = rgb.astype(np.float32)  # (H, W, 3) in 0-255
    border = np.concatenate(
        [
            rgb[:2].reshape(-1, 3),
            rgb[-2:].reshape(-1, 3),
            rgb[:, :2].reshape(-1, 3),
            rgb[:, -2:].reshape(-1, 3),
        ]
    )
    background = _nearest_color(np.median(border, axis=0))
    bg = np.array(COLORS[background], dtype=np.float32)
    far = np.sqrt(((rgb - bg) ** 2).sum(-1)) > MASK_DISTANCE  # (H, W)
    if far.sum() < 4:
        return Detection(background)
    blob = _largest_blob(far)
    color = _nearest_color(np.median(rgb[blob], axis=0))
    if color == background:
        return Detection(background)
    # the shape is where a pixel is nearer the shape colour than the background: the 50% level
    # of the anti-aliased edge, so the area is right to a fraction of a pixel per edge pixel
    fg = np.array(COLORS[color], dtype=np.float32)
    nearer = ((rgb - fg) ** 2).sum(-1) < ((rgb - bg) ** 2).sum(-1)
    shape_mask = _largest_blob(nearer & _dilate(blob))
    ys, xs = np.nonzero(shape_mask)
    left, top, right, bottom = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    width, height = right - left, bottom - top
    fill = float(shape_mask.sum()) / (width * height)
    shape = "square" if fill >= _FILL_SQUARE else "circle" if fill >= _FILL_CIRCLE else "triangle"
    return Detection(
        background=background,
        shape=shape,
        color=color,
        size="small" if max(width, height) < _SIZE_SPLIT else "large",
        position=_snap_position((left + right) / 2, (top + bottom) / 2),
        fill=fill,
        box=(int(left), int(top), int(right), int(bottom)),
    )


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a boolean mask by one pixel (4-neighbourhood)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


@dataclass
class Scores:
    """Per-attribute and all-attribute accuracy over ``n`` images."""

    n: int = 0
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))
    all_correct: int = 0

    def add(self, spec: ShapeSpec, found: Detection) -> None:
        hits = {a: getattr(found, a) == getattr(spec, a) for a in ATTRIBUTES}
        self.n += 1
        for a, hit in hits.items():
            self.correct[a] += hit
        self.all_correct += all(hits.values())

    @property
    def accuracy(self) -> dict[str, float]:
        per = {a: c / max(1, self.n) for a, c in self.correct.items()}
        return {**per, "all": self.all_correct / max(1, self.n)}


def score_images(specs: Sequence[ShapeSpec], images: Sequence[Image.Image]) -> Scores:
    scores = Scores()
    for spec, image in zip(specs, images, strict=True):
        scores.add(spec, detect(image))
    return scores


@dataclass(frozen=True)
class EvalSetting:
    """One row of the evaluation table: a sampler, its steps and the guidance scale; by
    default `ldm.config.GENERATION`'s."""

    sampler: str = GENERATION.sampler
    num_steps: int = GENERATION.num_inference_steps
    guidance_scale: float = GENERATION.guidance_scale
    sigmas: str | None = GENERATION.sigmas

    def __post_init__(self) -> None:
        sampler, sigmas = resolve_sampler(self.sampler, self.sigmas)
        object.__setattr__(self, "sampler", sampler)
        object.__setattr__(self, "sigmas", sigmas)

    @property
    def name(self) -> str:
        schedule = f" {self.sigmas}" if self.sampler in SIGMA_SAMPLERS else ""
        return f"{self.sampler}{schedule} {self.num_steps} steps, guidance {self.guidance_scale:g}"


# What a model is judged by (the held-out accuracy of docs/default_model.md, the recipe's
# evaluation and its checkpoints'): DDIM 50 steps at the default guidance, kept whatever the
# generation default is, so that accuracies stay comparable from one model to the next
REFERENCE_SETTING = EvalSetting("ddim", 50, GENERATION.guidance_scale)
DEFAULT_SETTINGS = tuple(  # the first row is the default setting: `ldm.config.GENERATION`'s
    dict.fromkeys(  # without repeats, should the default be the reference
        (
            EvalSetting(),
            REFERENCE_SETTING,
            EvalSetting("ddim", 50, 1.0),
            EvalSetting("ddim", 50, 3.0),
            EvalSetting("ddim", 10),
            EvalSetting("ddim", 20),
            EvalSetting("ddim", 100),
            EvalSetting("ddpm", 1000),
        )
    )
)


def evaluate(
    pipe,
    *,
    n: int = 200,
    settings: Sequence[EvalSetting] = DEFAULT_SETTINGS[:1],
    seed: int = 0,
    batch_size: int = 50,
    out_dir: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """Generate ``n`` images of held-out combinations (canonical captions) per setting, read
    them with `detect`, and return ``{setting name: accuracy}``. Image k has the seed
    ``derive_seed(seed, SEED_STREAM, k)`` in every setting and at any ``batch_size``. With
    ``out_dir``, the first 64 images of each setting are saved there as a grid, and the results
    as ``results.json``."""
    specs = sample_specs(n, seed=seed, split="heldout")
    prompts = [s.caption() for s in specs]
    seeds = [derive_seed(seed, SEED_STREAM, k) for k in range(n)]
    results = {}
    for setting in settings:
        images = []
        for i in tqdm(range(0, n, batch_size), desc=setting.name, unit="batch"):
            result = pipe(
                prompts[i : i + batch_size],
                num_inference_steps=setting.num_steps,
                guidance_scale=setting.guidance_scale,
                sampler=setting.sampler,
                sigmas=setting.sigmas,
                seed=seeds[i : i + batch_size],
                progress=False,
            )
            images += result.images
        scores = score_images(specs, images)
        results[setting.name] = scores.accuracy
        logger.info("%s: %s", setting.name, scores.accuracy)
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            name = setting.name.replace(" ", "_").replace(",", "")
            make_grid(images[:64], cols=8).save(out / f"{name}.png")
    if out_dir is not None:
        (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per setting, accuracy (%) per attribute and for all five."""
    columns = [*ATTRIBUTES, "all"]
    lines = [
        "| setting | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, accuracy in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * accuracy[c]:.1f}" for c in columns) + " |"
        )
    return "\n".join(lines)
