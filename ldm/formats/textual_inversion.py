"""Textual-inversion embedding files as people share them: one token's vectors (N, D).

Read (`read_embedding`), as diffusers' `load_textual_inversion` and A1111 read them:

- diffusers, as its ``textual_inversion.py`` training script writes them
  (``learned_embeds.safetensors``, or a pickled ``learned_embeds.bin``): ``{token: (N, D)}``
  or ``{token: (D,)}``, the token named by the file;
- A1111's ``.pt``: ``{"string_to_param": {"*": (N, D)}, "name": ..., "step": ..., ...}``;
- A1111's and kohya's ``.safetensors``: ``{"emb_params": (N, D)}``;
- a pickled bare tensor (N, D).

The last three name no token: it is the ``token`` argument, or else the file's stem, as A1111
names an embedding after its file. Pickled files are read with ``torch.load(weights_only=True)``
(with `torch.nn.ParameterDict` allowed, which A1111 files from torch 1.11 hold). Written
(`save_embedding`, `save_a1111_embedding`) as safetensors only.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldm.formats.single_file import check_safetensors

A1111_SAFETENSORS_KEY = "emb_params"  # A1111 and kohya's sd-scripts
SDXL_KEYS = {"clip_l", "clip_g"}  # an SDXL embedding: one tensor per text encoder
PICKLE_SUFFIXES = (".pt", ".bin", ".pth")


def read_embedding(path: str | Path, token: str | None = None) -> tuple[str, Tensor]:
    """An embedding file (any layout above) -> (token, vectors (N, D) float32).

    ``token`` replaces the token a diffusers file names. Errors name the file: missing, not
    whole, not an embedding (its keys are listed), or several tokens in one file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embedding file at {path}")
    if path.suffix == ".safetensors":
        check_safetensors(path)
        data = load_file(str(path))
    elif path.suffix in PICKLE_SUFFIXES:
        data = _load_pickle(path)
    else:
        raise ValueError(
            f"{path}: unknown embedding file type {path.suffix!r}; allowed: .safetensors, "
            + ", ".join(PICKLE_SUFFIXES)
        )
    file_token, vectors = _token_and_vectors(data, path)
    if not isinstance(vectors, Tensor) or not vectors.is_floating_point():
        kind = vectors.dtype if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(f"{path}: the embedding is a {kind}, not a float tensor")
    vectors = vectors.detach().float()
    vectors = vectors.unsqueeze(0) if vectors.ndim == 1 else vectors  # (N, D)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"{path}: the embedding has shape {tuple(vectors.shape)}, not (N, D)")
    return token or file_token or path.stem, vectors


def _load_pickle(path: Path):
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found is None:  # a truncated legacy pickle, or no pickle at all
            raise ValueError(
                f"{path} is not a whole PyTorch file; copy or download it again"
            ) from None
        raise ValueError(
            f"{path} holds pickled Python objects other than tensors ({found[1]}), and "
            "unpickling them could run code from the file; it is not read"
        ) from None
    except (RuntimeError, EOFError) as error:
        reason = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{path} is not a whole PyTorch file ({reason}); copy or download it again"
        ) from None


def _token_and_vectors(data, path: Path) -> tuple[str | None, object]:
    """(the token the file names, or None; its vectors), as diffusers'
    `_retrieve_tokens_and_embeddings` tells the layouts apart."""
    if isinstance(data, Tensor):
        return None, data
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} holds {type(data).__name__} {data!r:.40}, not an embedding")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # a ParameterDict (torch 1.11 files)
        if not isinstance(params, dict) or len(params) != 1:
            size = len(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(
                f"{path}: string_to_param holds {size} entries; an A1111 embedding holds one"
            )
        return None, next(iter(params.values()))
    if set(data) == {A1111_SAFETENSORS_KEY}:
        return None, data[A1111_SAFETENSORS_KEY]
    if SDXL_KEYS <= set(data):
        raise ValueError(
            f"{path} is an SDXL embedding ({', '.join(sorted(data))}), for two text encoders; "
            "this pipeline has one"
        )
    tensors = [k for k, v in data.items() if isinstance(v, Tensor)]
    if len(data) == 1 and tensors:  # diffusers: {token: vectors}
        return tensors[0], data[tensors[0]]
    keys = ", ".join(sorted(map(str, data))[:5])
    raise ValueError(
        f"{path} is not an embedding file: its {len(data)} keys are {keys}; an "
        f"embedding holds one tensor {{token: (N, D)}}, {A1111_SAFETENSORS_KEY}, or "
        "string_to_param"
    )


def save_embedding(path: str | Path, token: str, vectors: Tensor) -> None:
    """Write ``token``'s ``vectors`` (N, D) as diffusers does (``save_progress`` of its
    textual-inversion script): a ``.safetensors`` file holding ``{token: vectors}``, which
    `read_embedding`, diffusers' `load_textual_inversion` and A1111 all read."""
    _save(path, {token: vectors}, {"format": "pt"})


def save_a1111_embedding(
    path: str | Path, token: str, vectors: Tensor, step: int | None = None
) -> None:
    """Write ``vectors`` (N, D) in A1111's safetensors layout, ``{"emb_params": vectors}``,
    with ``token`` and ``step`` (training steps done) in the metadata. A1111 names it after
    the file, so ``path`` is best ``<token>.safetensors``; diffusers needs ``token=``."""
    metadata = {"format": "pt", "name": token} | ({"step": str(step)} if step is not None else {})
    _save(path, {A1111_SAFETENSORS_KEY: vectors}, metadata)


def _save(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"embeddings are written as .safetensors only; got {path}")
    (vectors,) = tensors.values()
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (N, D); got shape {tuple(vectors.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata)
