"""A disk cache of what the frozen encoders make of the training data, so later epochs skip them.

For every sample it keeps the VAE posterior's scaled mean and std (a fresh latent is
mean + std * noise each step, as encoding again would give) and the caption's text embedding,
plus the embedding of the empty prompt for caption dropout (which stays random every step).
The file name is a fingerprint of the VAE's and text encoder's weights, the samples (files,
sizes, modification times, captions) and the transforms, so any change makes a new cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.config import DataConfig

logger = logging.getLogger(__name__)


@dataclass
class EncodedData:
    """Per-sample encoder outputs: means and stds (N, C, h, w), contexts (N, L, D), and the
    empty prompt's context (1, L, D)."""

    means: Tensor
    stds: Tensor
    contexts: Tensor
    empty_context: Tensor


def _hash_module(module: nn.Module, digest) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def fingerprint(vae: nn.Module, text_encoder: nn.Module, samples: list, data: DataConfig) -> str:
    """A key that changes when the VAE, text encoder, data or transforms change."""
    digest = hashlib.sha256()
    _hash_module(vae, digest)
    _hash_module(text_encoder, digest)
    transforms = {
        "resolution": data.resolution,
        "center_crop": data.center_crop,
        "random_flip": data.random_flip,
    }
    digest.update(json.dumps(transforms, sort_keys=True).encode())
    for sample in samples:
        stat = sample.path.stat() if sample.path is not None else None
        entry = [
            sample.id,
            sample.caption,
            sample.row,
            stat.st_size if stat else None,
            stat.st_mtime_ns if stat else None,
        ]
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(
    vae, text_encoder, dataset, folder: Path, key: str, batch_size: int = 16
) -> EncodedData:
    """Load ``folder/encoded-{key}.safetensors``, or encode every sample of ``dataset`` and
    write it (atomically: a temporary file, then a rename)."""
    path = folder / f"encoded-{key}.safetensors"
    if path.is_file():
        logger.info("using the encoder cache %s", path)
        tensors = load_file(str(path))
        return EncodedData(
            tensors["means"], tensors["stds"], tensors["contexts"], tensors["empty_context"]
        )
    means, stds, contexts = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        pixels = torch.stack([item["pixels"] for item in items]).to(vae.device)  # (B, 3, R, R)
        mean, std = vae.encode_distribution(pixels)  # (B, C, h, w) each
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
        contexts.append(
            text_encoder([item["caption"] for item in items]).float().cpu()
        )  # (B, L, D)
    encoded = EncodedData(
        torch.cat(means), torch.cat(stds), torch.cat(contexts), text_encoder([""]).float().cpu()
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in encoded.__dict__.items()}, str(tmp))
    tmp.rename(path)
    logger.info("wrote the encoder cache %s (%d samples)", path, len(dataset))
    return encoded
