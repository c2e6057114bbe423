"""Image-caption data for fine-tuning: find the samples, check each once, load and transform.

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
