"""An image-caption dataset from a freedesktop icon theme: real images that nobody here drew.

A theme installed from a distribution's packages (``apt-get install oxygen-icon-theme``) holds
PNG icons at several sizes, in folders by context, named by what they show::

    /usr/share/icons/oxygen/base/64x64/places/folder-blue.png  ->  "folder blue"

`make_icon_dataset` copies one size's icons into ``train/`` and ``heldout/`` image folders with
``metadata.jsonl`` (``file_name``, ``text``), which ``ldm train`` and ``ldm check-data`` read.
The icons keep their transparency; training composites it on white.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

# The contexts with one picture per name; "mimetypes" (360 near-identical document sheets named
# like "application vnd oasis opendocument text") and the tiny "emblems" are left out by default.
DEFAULT_CONTEXTS = ("actions", "apps", "categories", "devices", "places", "status")


def caption_from_name(name: str) -> str:
    """An icon's file name as a caption: ``media-playback-start.png`` -> "media playback start"."""
    return " ".join(re.split(r"[-_.\s]+", Path(name).stem)).strip().lower()


def icon_folder(theme: str | Path, size: int) -> Path:
    """The folder of ``size`` x ``size`` icons in ``theme`` (``theme/SIZExSIZE`` or, as the
    Oxygen theme lays them out, ``theme/base/SIZExSIZE``)."""
    theme = Path(theme)
    for folder in (theme / f"{size}x{size}", theme / "base" / f"{size}x{size}"):
        if folder.is_dir():
            return folder
    sizes = sorted({p.name for p in [*theme.glob("*x*"), *theme.glob("base/*x*")] if p.is_dir()})
    raise FileNotFoundError(
        f"no {size}x{size} folder in {theme}; it has {', '.join(sizes) or 'no size folders'}. "
        "Install a theme with PNG icons (apt-get install oxygen-icon-theme) and pass its folder, "
        "e.g. /usr/share/icons/oxygen"
    )


def make_icon_dataset(
    theme: str | Path,
    out: str | Path,
    *,
    size: int = 64,
    contexts: tuple[str, ...] = DEFAULT_CONTEXTS,
    heldout_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, int]:
    """Write ``out/train`` and ``out/heldout`` from the theme's ``size`` px icons in
    ``contexts``; returns the number of images in each. Icons whose caption repeats an earlier
    one (the same name in two contexts) are kept once. The split is a seeded permutation."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    folder = icon_folder(theme, size)
    if missing := [c for c in contexts if not (folder / c).is_dir()]:
        available = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"{folder} has no context folder {', '.join(missing)}; it has {', '.join(available)}"
        )
    icons: dict[str, Path] = {}
    for context in contexts:
        for path in sorted((folder / context).glob("*.png")):
            icons.setdefault(caption_from_name(path.name), path)
    if not icons:
        raise FileNotFoundError(f"no PNG icons in {folder} under {', '.join(contexts)}")
    captions = sorted(icons)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    n_heldout = round(len(captions) * heldout_fraction)
    splits = {"heldout": order[:n_heldout], "train": order[n_heldout:]}
    out = Path(out)
    for split, indices in splits.items():
        target = out / split
        target.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in sorted(indices):
            source = icons[captions[i]]
            file_name = f"{source.parent.name}-{source.name}"
            shutil.copyfile(source, target / file_name)
            rows.append({"file_name": file_name, "text": captions[i]})
        (target / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {split: len(indices) for split, indices in splits.items()}
