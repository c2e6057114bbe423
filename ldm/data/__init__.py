"""Image-caption data for fine-tuning: find the samples and check each once (`scan`, whose
docstring lists the sources and the checks), decode and transform them (`decode`), and serve
them as training items (`ImageCaptionDataset`); also a dataset from an icon theme
(`icon_theme`), how a model fits a dataset (`model_fit`) and `ldm eval` (`metrics`)."""

from ldm.config import DataConfig
from ldm.data.dataset import ImageCaptionDataset
from ldm.data.decode import load_image, transform_image
from ldm.data.scan import HUB_NAME, DataReport, Sample, SampleError, scan

__all__ = [
    "HUB_NAME",
    "DataConfig",
    "DataReport",
    "ImageCaptionDataset",
    "Sample",
    "SampleError",
    "load_image",
    "scan",
    "transform_image",
]
