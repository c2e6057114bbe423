"""One way to derive seeds: every stream of random numbers that ldm draws from a user's seed.

A run's seed S feeds several independent streams (the data order of each epoch, the noise of
each process, caption dropout, the images of an evaluation). `derive_seed` maps (S, name,
index...) to a 63-bit seed through SHA-256, so streams never collide the way S * k + i can
(S = 1, i = k and S = 2, i = 0 meet), and a new stream never shifts an old one.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """The seed of one stream: ``derive_seed(S, "noise", process_index)``. Deterministic,
    in [0, 2**63), independent of Python's hash randomisation."""
    key = ":".join([str(int(seed)), stream, *(str(int(i)) for i in indices)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def generator_for(seed: int, stream: str, *indices: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, *indices))
