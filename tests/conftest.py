"""Shared fixtures for the test suite: everything is tiny, offline, seeded and on CPU."""

import pytest
import torch

from ldm.pipeline import LatentDiffusionPipeline
from ldm.testing import save_tiny_stable_diffusion


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion folder (`ldm.testing`), weights perturbed off their init."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny") / "tiny-sd", perturb=0.05)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    return LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
