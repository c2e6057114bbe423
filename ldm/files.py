"""File modes: what ldm exports is readable as the umask says.

safetensors (and so diffusers' and transformers' ``save_pretrained``) creates its files with
mode 0600, whatever the umask, so a model folder exported for others to read is private.
`follow_umask` gives each file the mode that ``open()`` would have: 0666 without the umask's
bits (0644 under the usual umask 022).
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> Path:
    """Set a file's mode, or that of every file under a folder, to 0666 & ~umask."""
    path = Path(path)
    mode = 0o666 & ~umask()
    for file in [path] if path.is_file() else sorted(path.rglob("*")):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)
    return path
