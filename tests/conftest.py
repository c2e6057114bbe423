"""Shared fixtures for the test suite: everything is tiny, offline, seeded and on CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
