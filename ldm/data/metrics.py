"""Evaluation on any image-caption dataset, with nothing downloaded: ``ldm eval MODEL DATA``.

For ``n`` captions of the dataset, one image each is generated (DDIM, seed ``seed`` for every
caption) and compared with the dataset's own images, all at the training resolution, on the
[0, 1] scale, transparency composited on white as training reads it:

- ``own_rms``: the RMS distance from each generated image to the image of its caption; its
  floor is ``vae_rms``, the distance of the VAE's round trip of those images;
- ``nearer_than_distractors``: the share of generated images nearer their own image than any of
  ``distractors`` other dataset images drawn at random (chance: 1 / (distractors + 1));
- ``nearest_rms`` and ``nearest_is_own``: the distance to the nearest dataset image, and how
  often that is the caption's own image: a memorisation check (0 distance is a copy);
- ``vae_psnr_db``: the VAE's reconstruction PSNR on held-out images (``heldout``), else on the
  evaluated ones;
- with ``clip`` (the open_clip model that `ldm.training.pretrain.train_clip` trains alongside the text
  encoder, and its tokenizer), prompt adherence as retrieval: ``caption_top1``, the share of
  generated images whose own caption the CLIP ranks first among ``distractors + 1`` distinct
  captions; ``caption_top1_dataset`` is the same for the dataset's own images, the CLIP's ceiling.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.config import GENERATION, DataConfig
from ldm.data import scan
from ldm.data.model_fit import sample_pixels, vae_psnr, vae_round_trip
from ldm.encoders.text import clip_encode
from ldm.images import make_grid, psnr, to_pil, to_unit_range

logger = logging.getLogger(__name__)


def load_pixels(
    data: DataConfig, n: int | None = None, *, seed: int = 0
) -> tuple[Tensor, list[str]]:
    """Up to ``n`` samples of a dataset (a seeded choice; all when None), prepared as training
    reads them (centre crop, no flip): pixels (N, 3, R, R) in [-1, 1] and their captions."""
    data = replace(data, center_crop=True, random_flip=False)
    samples = scan(data).samples
    pixels, indices = sample_pixels(data, samples, n or len(samples), seed=seed)
    return pixels, [samples[i].caption for i in indices]


def rms_distances(a: Tensor, b: Tensor) -> Tensor:
    """RMS distance on the [0, 1] scale between every image of ``a`` (N, ...) and of ``b``
    (M, ...), both in [-1, 1]: (N, M)."""
    x, y = to_unit_range(a).flatten(1).double(), to_unit_range(b).flatten(1).double()
    return (torch.cdist(x, y) / math.sqrt(x.shape[1])).float()


@torch.no_grad()
def evaluate_on_data(
    pipe,
    data: DataConfig,
    *,
    n: int = 100,
    heldout: DataConfig | None = None,
    sampler: str = "ddim",
    num_inference_steps: int = 30,
    guidance_scale: float = GENERATION.guidance_scale,
    seed: int = 0,
    distractors: int = 19,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    clip: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """The figures of the module docstring for ``pipe`` (a `LatentDiffusionPipeline`) on
    ``data``; with ``out_dir``, also ``results.json`` and ``grid.png`` (rows of eight: each
    dataset image above the image generated from its caption). DDIM by default, whatever the
    generation default is, so that figures stay comparable from one model to the next."""
    reference, reference_captions = load_pixels(data, n=None)  # (M, 3, R, R)
    if len(reference) < distractors + 1:
        raise ValueError(
            f"{data.path} has {len(reference)} images; the distractor test needs more than "
            f"distractors={distractors}"
        )
    chosen = _choose(len(reference), n, seed)  # (N,)
    own = reference[chosen]
    captions = [reference_captions[i] for i in chosen.tolist()]
    settings = dict(
        sampler=sampler, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
    )
    generated = _generate(pipe, captions, data.resolution, seed, batch_size, **settings)
    distance = _distance_figures(generated, reference, chosen, distractors, seed)
    vae = _vae_figures(pipe.vae, own, heldout)
    results = {
        "model": pipe.name,
        "data": str(data.path),
        "n": len(chosen),
        "resolution": data.resolution,
        **settings,
        "seed": seed,
        "own_rms": distance.pop("own_rms"),
        "vae_rms": vae.pop("vae_rms"),
        **distance,
        **vae,
    }
    if clip is not None:
        pool = sorted(set(reference_captions))
        results |= _retrieval_figures(clip, generated, own, captions, pool, distractors, seed)
    if out_dir is not None:
        _save(out_dir, results, own, generated)
    return results


def _choose(m: int, n: int, seed: int) -> Tensor:
    """The sorted indices (N,) of the ``min(n, m)`` dataset images evaluated, a seeded draw."""
    chosen = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    return chosen[: min(n, m)].sort().values


def _generate(
    pipe, captions: list[str], resolution: int, seed: int, batch_size: int, **settings
) -> Tensor:
    """One image per caption, every one with seed ``seed``: (N, 3, R, R) in [-1, 1]."""
    generated = []
    for i in tqdm(range(0, len(captions), batch_size), desc="generating", unit="batch"):
        prompts = captions[i : i + batch_size]
        result = pipe(
            prompts,
            height=resolution,
            width=resolution,
            seed=[seed] * len(prompts),
            output_type="pt",
            progress=False,
            **settings,
        )
        generated.append(result.images.float().cpu() * 2 - 1)  # [0, 1] -> [-1, 1]
    return torch.cat(generated)


def _distance_figures(
    generated: Tensor, reference: Tensor, chosen: Tensor, distractors: int, seed: int
) -> dict[str, Any]:
    """``own_rms``, ``nearer_than_distractors`` (its ``chance``), ``nearest_rms`` and
    ``nearest_is_own`` of ``generated`` (N, ...) against the dataset ``reference`` (M, ...),
    whose images at ``chosen`` (N,) are the captions' own."""
    distances = rms_distances(generated, reference)  # (N, M)
    own_d = distances[torch.arange(len(chosen)), chosen]  # (N,)
    # distractors: other dataset images, a seeded draw per generated image
    draw = torch.Generator().manual_seed(seed + 1)
    wins = []
    for row, i in enumerate(chosen.tolist()):
        others = torch.randperm(len(reference) - 1, generator=draw)[:distractors]
        others = others + (others >= i).long()  # skip the own image
        wins.append(bool(own_d[row] < distances[row, others].min()))
    nearest_d, nearest_i = distances.min(dim=1)
    return {
        "own_rms": own_d.mean().item(),
        "distractors": distractors,
        "nearer_than_distractors": sum(wins) / len(wins),
        "chance": 1 / (distractors + 1),
        "nearest_rms": nearest_d.mean().item(),
        "nearest_is_own": (nearest_i == chosen).float().mean().item(),
    }


def _vae_figures(vae, own: Tensor, heldout: DataConfig | None) -> dict[str, Any]:
    """``vae_rms`` on the evaluated images ``own``, and ``vae_psnr_db`` on ``heldout`` (else on
    ``own``)."""
    own_round_trip = vae_round_trip(vae, own)  # (N, 3, R, R)
    if heldout is not None:
        vae_psnr_db = vae_psnr(vae, load_pixels(heldout)[0])
    else:  # the round trip already made
        vae_psnr_db = psnr(own_round_trip, own.float()).mean().item()
    return {
        "vae_rms": rms_distances(own_round_trip, own).diagonal().mean().item(),
        "vae_psnr_db": vae_psnr_db,
        "vae_psnr_on": "heldout" if heldout is not None else "evaluated images",
    }


def _retrieval_figures(
    clip: tuple[Any, Any],
    generated: Tensor,
    own: Tensor,
    captions: list[str],
    pool: list[str],
    distractors: int,
    seed: int,
) -> dict[str, Any]:
    """``caption_top1`` of the generated images, ``caption_top1_dataset`` of the captions' own
    images, and ``caption_candidates``: `caption_retrieval` among up to ``distractors + 1``."""
    k = min(distractors + 1, len(pool))
    results: dict[str, Any] = {}
    for key, images in (("caption_top1", generated), ("caption_top1_dataset", own)):
        results[key] = caption_retrieval(*clip, images, captions, pool, candidates=k, seed=seed)
    results["caption_candidates"] = k
    return results


@torch.no_grad()
def caption_retrieval(
    clip,
    tokenizer,
    images: Tensor,
    captions: list[str],
    pool: list[str],
    *,
    candidates: int = 20,
    seed: int = 0,
) -> float:
    """The share of ``images`` (N, 3, R, R) in [-1, 1] whose caption an open_clip ``clip`` ranks
    first among ``candidates`` distinct captions: its own and others drawn from ``pool`` per image
    (seeded). Chance is 1 / candidates."""

    def embed_text(texts: list[str]) -> Tensor:
        ids = clip_encode(tokenizer, texts, padding="max_length", truncation=True)["input_ids"]
        return clip.encode_text(torch.tensor(ids), normalize=True)

    image_features = clip.encode_image(images.float(), normalize=True)  # (N, D)
    draw = torch.Generator().manual_seed(seed + 2)
    hits = 0
    for feature, caption in zip(image_features, captions, strict=True):
        others = [c for c in pool if c != caption]
        pick = torch.randperm(len(others), generator=draw)[: candidates - 1].tolist()
        scores = embed_text([caption, *(others[i] for i in pick)]) @ feature  # (K,)
        hits += int(scores.argmax() == 0)
    return hits / len(captions)


def _save(out_dir: str | Path, results: dict[str, Any], own: Tensor, generated: Tensor) -> None:
    """results.json, and grid.png: rows of dataset images, each above the generated ones."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    cols = min(8, len(own))
    rows = []  # whole rows only, so each own image stands above its generated one
    for i in range(0, min(len(own), 32) // cols * cols, cols):
        rows += to_pil(own[i : i + cols]) + to_pil(generated[i : i + cols])
    make_grid(rows, cols=cols).save(out / "grid.png")


def format_results(results: dict[str, Any]) -> str:
    """The figures as a few readable lines."""
    r = results
    return "\n".join(
        [
            f"{r['model']} on {r['data']}: {r['n']} captions, {r['sampler']} {r['num_inference_steps']}, "
            f"guidance {r['guidance_scale']}, seed {r['seed']}, {r['resolution']} px",
            f"  RMS distance to the caption's own image: {r['own_rms']:.3f} "
            f"(the VAE round trip alone: {r['vae_rms']:.3f})",
            f"  nearer its own image than {r['distractors']} random others: "
            f"{r['nearer_than_distractors']:.1%} (chance {r['chance']:.1%})",
            f"  nearest dataset image: RMS {r['nearest_rms']:.3f}, its own in "
            f"{r['nearest_is_own']:.1%} (memorisation check: 0 is a copy)",
            f"  VAE PSNR on {r['vae_psnr_on']}: {r['vae_psnr_db']:.2f} dB",
            *(
                [
                    f"  CLIP ranks the own caption first among {r['caption_candidates']}: "
                    f"{r['caption_top1']:.1%} of generated images, "
                    f"{r['caption_top1_dataset']:.1%} of dataset images "
                    f"(chance {1 / r['caption_candidates']:.1%})"
                ]
                if "caption_top1" in r
                else []
            ),
        ]
    )
