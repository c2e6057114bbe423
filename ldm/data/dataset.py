"""The samples of a `scan` as a torch ``Dataset`` of training items."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset

from ldm.config import DataConfig
from ldm.data.decode import SampleError, load_image, transform_image
from ldm.data.scan import Sample, load_table

logger = logging.getLogger(__name__)


class ImageCaptionDataset(Dataset):
    """The samples of a `scan` as training items.

    ``dataset[i]`` is ``{"pixels": (3, R, R) float32 in [-1, 1], "caption": str, "index": int}``.
    A sample that has broken since the scan (deleted, say) is logged and replaced by the next
    loadable one; ``index`` is the index of the sample actually returned. Random crops and flips
    draw from ``generator`` (torch's global generator when None); DataLoader workers each get a
    copy of it, so seed them apart with a ``worker_init_fn`` when using several workers.
    """

    def __init__(
        self, config: DataConfig, samples: list[Sample], generator: torch.Generator | None = None
    ) -> None:
        if not samples:
            raise ValueError(f"no usable samples from {config.path}: see scan()'s report")
        self.config = config
        self.samples = list(samples)
        self.generator = generator
        self._table: Any = None
        self._broken: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _source(self, sample: Sample) -> Any:
        if sample.path is not None:
            return sample.path
        if self._table is None:
            self._table = load_table(self.config)
        return self._table[sample.row][self.config.image_column]

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for offset in range(n):
            i = (index + offset) % n
            if i in self._broken:
                continue
            sample = self.samples[i]
            try:
                image, _ = load_image(self._source(sample))
            except SampleError as error:
                self._broken.add(i)
                logger.warning("sample %s broke (%s); using the next one", sample.id, error)
                continue
            pixels = transform_image(image, self.config, self.generator)  # (3, R, R)
            return {"pixels": pixels, "caption": sample.caption, "index": i}
        raise RuntimeError(f"none of the {n} samples of {self.config.path} can be loaded now")
