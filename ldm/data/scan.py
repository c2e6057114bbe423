"""Find a dataset's samples and check each once: `scan(config)` returns a `DataReport`.


``scan(config)`` decodes every image once (keeping none) and returns a `DataReport`: the usable
samples, the skipped ones with a reason, the conversions made. ``ImageCaptionDataset(config,
report.samples)`` then yields ``{"pixels", "caption", "index"}``. Sources (``DataConfig.path``):

1. a folder with ``metadata.jsonl`` or ``metadata.csv``: column ``file_name`` (relative to the
   folder, subfolders allowed) and the caption column, as in Hugging Face ``imagefolder``;
2. a folder of images with same-name caption files: ``cat.png`` + ``cat.txt``;
3. a ``.jsonl`` or ``.csv`` manifest file; ``file_name`` relative to its folder, or absolute;
4. a folder written by ``datasets``' ``save_to_disk``; 5. a Hub dataset name (``train`` split).

Bad samples are skipped with a reason: missing, empty, unidentifiable, corrupt or truncated files;
missing or blank captions; captions that are not UTF-8 (skipped, not guessed: mojibake would be
learnt as text); a ``file_name`` leading outside the dataset folder (``../x.png``, or an absolute
path except in a manifest file). That check is lexical, so symlinks inside the folder (as in the
Hugging Face cache) still work. Other images are converted, each conversion listed: EXIF
orientation applied; 16-bit values rescaled (65535 -> 255); transparency composited on white;
grayscale, palette and other modes -> RGB; images smaller than the resolution upscaled.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.config import DataConfig
from ldm.data.decode import SampleError, load_image

logger = logging.getLogger(__name__)

FILE_COLUMN = "file_name"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A Hub dataset id, OWNER/NAME: a single word that is no local path is a typo, not a download.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
LAYOUTS = (
    "a folder with metadata.jsonl or metadata.csv (columns 'file_name' and the caption column), "
    "a folder of images with same-name .txt captions (cat.png + cat.txt), a .jsonl or .csv "
    "manifest file, a folder written by datasets' save_to_disk, or a Hugging Face Hub dataset name"
)


@dataclass(frozen=True)
class Sample:
    """One usable sample: an image file (``path``) or a ``datasets`` row (``row``), its caption
    (stripped), and its original ``size`` (W, H) in pixels after EXIF rotation."""

    id: str
    caption: str
    path: Path | None = None
    row: int | None = None
    size: tuple[int, int] = (0, 0)


@dataclass
class DataReport:
    """What ``scan`` found. ``skipped`` and ``converted`` hold (sample id, reason or conversion)
    pairs; a sample may have several conversions. ``size_histogram`` counts the used samples by
    the shorter side of the original image in power-of-two buckets: "32-63" means 32 to 63 pixels.
    """

    source: str
    resolution: int
    total: int = 0
    samples: list[Sample] = field(default_factory=list, repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)
    upscaled: int = 0
    size_histogram: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts and lists (not the samples themselves)."""
        data = {k: v for k, v in vars(self).items() if k != "samples"} | {"used": self.used}
        data["skipped"] = [{"sample": s, "reason": r} for s, r in self.skipped]
        data["converted"] = [{"sample": s, "conversion": c} for s, c in self.converted]
        return data

    def to_text(self) -> str:
        """A human-readable report: counts, skipped samples with reasons, conversions, sizes."""
        lines = [
            f"Data report for {self.source} (resolution {self.resolution})",
            f"  total {self.total}, used {self.used}, skipped {len(self.skipped)}, "
            f"conversions {len(self.converted)}, upscaled {self.upscaled}",
            "",
            f"Skipped ({len(self.skipped)}):",
            *(f"  {sample}: {reason}" for sample, reason in self.skipped),
            "",
            f"Converted ({len(self.converted)}):",
            *(f"  {sample}: {what}" for sample, what in self.converted),
            "",
            "Original sizes (shorter side, pixels: samples):",
            *(f"  {bucket}: {count}" for bucket, count in self.size_histogram.items()),
        ]
        return "\n".join(lines) + "\n"

    def save(
        self, path: str | Path, *, extra: dict[str, Any] | None = None, extra_text: str = ""
    ) -> tuple[Path, Path]:
        """Write ``path`` (JSON, must end in .json) and the text report next to it (.txt).
        ``extra`` adds keys to the JSON and ``extra_text`` lines to the text (``ldm check-data``
        adds its model-fit figures)."""
        path = Path(path)
        if path.suffix != ".json":
            raise ValueError(f"a report path must end in .json (text goes next to it): {path}")
        text_path = path.with_suffix(".txt")
        text = json.dumps(self.to_dict() | (extra or {}), indent=2, ensure_ascii=False) + "\n"
        path.write_text(text, encoding="utf-8")
        text_path.write_text(self.to_text() + extra_text, encoding="utf-8")
        return path, text_path


@dataclass
class _Candidate:
    """A sample before checking: ``image`` is a Path, or a ``datasets`` cell for ``row``."""

    id: str
    caption: Any
    image: Any = None
    row: int | None = None
    problem: str | None = None


# Images: open, check, convert to RGB, transform.


def _read_text(path: Path) -> str:
    """UTF-8 text (BOM dropped); undecodable bytes become surrogates that the caption check
    catches, so one bad line skips one sample, not the whole file."""
    return path.read_text(encoding="utf-8-sig", errors="surrogateescape")


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict | str]]:
    """(where, row) per non-blank line; row is a problem string when the line is not an object."""
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield where, f"not valid JSON ({error.msg})"
            continue
        yield where, row if isinstance(row, dict) else "not a JSON object"


def _read_csv(path: Path, caption_column: str) -> Iterator[tuple[str, dict | str]]:
    """(where, row) per CSV row; the header must hold ``file_name`` and ``caption_column``."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    missing = [c for c in (FILE_COLUMN, caption_column) if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"{path} has no column {missing}; its header is {reader.fieldnames}. Set "
            f"caption_column to the column that holds the captions"
        )
    for row in reader:
        yield f"{path.name} line {reader.line_num}", row  # quoted captions may span lines


def _resolve(root: Path, file_name: str, allow_absolute: bool) -> Path:
    """``root / file_name``, refusing names that lead outside ``root`` (lexically: symlinks
    inside the folder may point anywhere)."""
    if allow_absolute and Path(file_name).is_absolute():
        return Path(file_name)
    base = os.path.normpath(root.absolute())
    full = os.path.normpath(os.path.join(base, file_name))  # an absolute file_name replaces base
    if os.path.commonpath([base, full]) != base:
        raise SampleError(f"outside the dataset folder {root}")
    return Path(full)


def _metadata_candidates(
    rows: Iterator[tuple[str, dict | str]], root: Path, column: str, allow_absolute: bool
) -> Iterator[_Candidate]:
    for where, row in rows:
        if isinstance(row, str):
            yield _Candidate(where, None, problem=row)
            continue
        file_name = row.get(FILE_COLUMN)
        if not isinstance(file_name, str) or not file_name.strip():
            yield _Candidate(where, None, problem=f"no '{FILE_COLUMN}' value")
            continue
        try:
            yield _Candidate(file_name, row.get(column), _resolve(root, file_name, allow_absolute))
        except SampleError as error:
            yield _Candidate(file_name, row.get(column), problem=str(error))


def _caption_file_candidates(root: Path, images: list[Path]) -> Iterator[_Candidate]:
    for image in images:
        caption_path = image.with_suffix(".txt")
        sample_id = image.relative_to(root).as_posix()
        if not caption_path.is_file():
            yield _Candidate(sample_id, None, problem=f"missing caption (no {caption_path.name})")
            continue
        try:
            yield _Candidate(sample_id, _read_text(caption_path), image)
        except OSError as error:
            yield _Candidate(sample_id, None, problem=f"caption file unreadable ({error})")


def load_table(config: DataConfig) -> Any:
    """A ``datasets.Dataset`` (train split) from a save_to_disk folder or a Hub name, with the
    image column left undecoded ({"bytes", "path"} cells) so that this module decodes it."""
    import datasets  # lazily: heavy, and needed only for these sources

    if Path(config.path).is_dir():
        table = datasets.load_from_disk(config.path)
    else:
        table = datasets.load_dataset(config.path, split="train")
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise ValueError(f"{config.path} has splits {list(table)}, but no 'train' split")
        table = table["train"]
    columns = (config.image_column, config.caption_column)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{config.path} has no column {missing}; its columns are {table.column_names}. Set "
            "image_column and caption_column in the data config"
        )
    table = table.select_columns(list(columns))
    if isinstance(table.features[config.image_column], datasets.Image):
        table = table.cast_column(config.image_column, datasets.Image(decode=False))
    return table


def _table_candidates(table: Any, config: DataConfig) -> Iterator[_Candidate]:
    for row, cells in enumerate(table):
        caption = cells[config.caption_column]
        yield _Candidate(f"row {row}", caption, cells[config.image_column], row=row)


def _discover(config: DataConfig) -> tuple[str, Iterator[_Candidate]]:
    """A description of the source and its candidates, for every layout in the module docstring."""
    path, column = Path(config.path), config.caption_column
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            rows = _read_jsonl(path)
        elif path.suffix.lower() == ".csv":
            rows = _read_csv(path, column)
        else:
            raise ValueError(f"{path} is not a .jsonl or .csv manifest; accepted: {LAYOUTS}")
        return f"manifest {path}", _metadata_candidates(rows, path.parent, column, True)
    if path.is_dir():
        if any((path / name).is_file() for name in DATASETS_MARKERS):
            return f"datasets folder {path}", _table_candidates(load_table(config), config)
        found = [path / name for name in METADATA_FILES if (path / name).is_file()]
        if len(found) > 1:
            raise ValueError(f"{path} has both {METADATA_FILES}: keep one of them")
        if found:
            jsonl = found[0].suffix == ".jsonl"
            rows = _read_jsonl(found[0]) if jsonl else _read_csv(found[0], column)
            return str(found[0]), _metadata_candidates(rows, path, column, False)
        images = sorted(
            p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if images:
            return f"image folder {path} (.txt captions)", _caption_file_candidates(path, images)
        raise ValueError(f"{path} holds no images and no metadata; accepted: {LAYOUTS}")
    if HUB_NAME.match(config.path) and path.suffix.lower() not in (".jsonl", ".csv"):
        try:
            table = load_table(config)
        except OSError as error:  # no network, no such dataset (FileNotFoundError), ...
            raise FileNotFoundError(
                f"{config.path} is neither a local path nor a loadable Hub dataset ({error})"
            ) from error
        return f"Hub dataset {config.path}", _table_candidates(table, config)
    raise FileNotFoundError(f"no file or folder at {path}; accepted: {LAYOUTS}")


def _printable(text: str) -> str:
    """``text`` with lone surrogates (from non-UTF-8 file names) written as ``\\udcNN``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _caption_problem(caption: Any, column: str) -> str | None:
    if caption is None:
        return f"missing caption (no '{column}' value)"
    if not isinstance(caption, str):
        return f"caption is a {type(caption).__name__}, not text"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return "caption is not UTF-8"
    return None if caption.strip() else "empty caption"


def scan(config: DataConfig) -> DataReport:
    """Check every sample of ``config.path`` once, decoding each image and keeping none.

    Returns a `DataReport` whose ``samples`` are the usable ones, in source order. Raises
    FileNotFoundError for a path that does not exist and ValueError for a layout it cannot read.
    """
    source, candidates = _discover(config)
    report = DataReport(source=_printable(source), resolution=config.resolution)
    buckets: dict[int, int] = {}  # lower end of the shorter side's power-of-two bucket -> count
    for candidate in candidates:
        report.total += 1
        sample_id = _printable(candidate.id)
        problem = candidate.problem or _caption_problem(candidate.caption, config.caption_column)
        if problem is None:
            try:
                image, conversions = load_image(candidate.image)
                size = image.size
            except SampleError as error:
                problem = str(error)
        if problem is not None:
            report.skipped.append((sample_id, _printable(problem)))
            continue
        if min(size) < config.resolution:
            conversions.append(f"upscaled from {size[0]}x{size[1]}")
            report.upscaled += 1
        report.converted.extend((sample_id, what) for what in conversions)
        path = candidate.image if candidate.row is None else None
        caption = candidate.caption.strip()
        report.samples.append(Sample(sample_id, caption, path, candidate.row, size))
        low = 1 << (min(size).bit_length() - 1)
        buckets[low] = buckets.get(low, 0) + 1
    report.size_histogram = {f"{low}-{2 * low - 1}": n for low, n in sorted(buckets.items())}
    logger.info("%s: %d samples, %d used", source, report.total, report.used)
    if report.skipped:
        logger.warning("%d samples skipped; see the data report", len(report.skipped))
    return report
