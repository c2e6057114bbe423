"""Training the default model's VAE and text encoder: tiny runs that learn, resume exactly, and
write folders that the pipeline's frozen modules load."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ldm.config import CLIPTrainConfig, VAETrainConfig
from ldm.encoders.text import (
    FrozenTextEncoder,
    build_clip_tokenizer,
    clip_encode,
    open_clip_to_transformers,
)
from ldm.encoders.vae import FrozenVAE
from ldm.images import psnr
from ldm.shapes.world import make_shapes, vocabulary
from ldm.training.pretrain import (
    build_clip,
    build_vae,
    load_image_folder,
    reconstruction_psnr,
    to_model_range,
    train_clip,
    train_vae,
)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    return make_shapes(24, tmp_path_factory.mktemp("shapes") / "train", seed=0)


def _tiny_vae(shapes_folder, out, **overrides):
    settings = {"max_steps": 4, "warmup_steps": 1, "checkpoint_every": 2, **overrides}
    return VAETrainConfig(
        data=str(shapes_folder),
        heldout=str(shapes_folder),
        output_dir=str(out),
        block_out_channels=(8, 8),
        norm_num_groups=4,
        batch_size=4,
        log_every=1,
        **settings,
    )


def test_psnr_is_the_closed_form():
    x = torch.zeros(2, 3, 4, 4)
    y = x + torch.tensor([0.2, 0.02]).view(2, 1, 1, 1)  # MSE 0.04 and 0.0004, peak-to-peak 2
    torch.testing.assert_close(psnr(y, x), torch.tensor([20.0, 40.0]))


def test_vae_training_resumes_exactly_and_writes_a_loadable_vae(shapes_folder, tmp_path):
    whole = train_vae(_tiny_vae(shapes_folder, tmp_path / "whole"))
    # a run that stopped after step 2: its checkpoint, resumed to the end
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "whole" / "checkpoints" / "checkpoint-2",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-2",
    )
    resumed = train_vae(_tiny_vae(shapes_folder, tmp_path / "resumed"), resume="latest")
    a, b = FrozenVAE.from_pretrained(whole), FrozenVAE.from_pretrained(resumed)
    for (name, p), q in zip(a.vae.state_dict().items(), b.vae.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

    images, _ = load_image_folder(shapes_folder)
    with torch.no_grad():
        latents = a.vae.encode(to_model_range(images)).latent_dist.sample(
            torch.Generator().manual_seed(0)
        )
    assert a.downscale_factor == 2 and a.latent_channels == 4
    assert a.scaling_factor == pytest.approx(1 / latents.std().item(), rel=1e-5)
    log = (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4
    report = (tmp_path / "whole" / "report.json").read_text()
    assert f"{reconstruction_psnr(a.vae, images):.4f}"[:6] in report


def test_vae_training_lowers_the_reconstruction_error(shapes_folder, tmp_path):
    config = _tiny_vae(shapes_folder, tmp_path, learning_rate=3e-3)
    config.max_steps, config.checkpoint_every, config.warmup_steps = 40, 40, 5
    images, _ = load_image_folder(shapes_folder)
    torch.manual_seed(config.seed)  # as train_vae initialises
    before = reconstruction_psnr(build_vae(config), images)
    after = reconstruction_psnr(FrozenVAE.from_pretrained(train_vae(config)).vae, images)
    assert after > before + 2, (before, after)  # dB, after 40 steps


def test_pruned_tokenizer_keeps_clips_tokens_for_the_worlds_words():
    full = build_clip_tokenizer()
    small = build_clip_tokenizer(words=vocabulary(), pad_token="!", model_max_length=32)
    assert len(small) < 700 and len(full) == 49408
    caption = "a large red circle in the center on a blue background, there is a picture"
    assert small.tokenize(caption) == full.tokenize(caption)
    assert small.tokenize("zebra") == [*"zebr", "a</w>"]  # unknown words fall back
    assert small.convert_tokens_to_ids("<|endoftext|>") == len(small) - 1  # where open_clip pools
    assert small.pad_token_id == 0


def test_converted_text_tower_equals_open_clip_last_block(tmp_path):
    config = CLIPTrainConfig(
        data="unused",
        text_width=32,
        text_layers=2,
        text_heads=2,
        vision_width=32,
        vision_layers=1,
        embed_dim=16,
    )
    torch.manual_seed(0)
    model = build_clip(config, vocab_size=600, eos_id=599).eval()
    ids = torch.randint(1, 599, (3, 32))
    ids[:, 10] = 599
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding  # (B, L, D)
        expected = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        converted = open_clip_to_transformers(model, drop_last_block=False, eos_token_id=599)
        got = converted(input_ids=ids).last_hidden_state
    assert converted.config.num_hidden_layers == 2 and converted.config.vocab_size == 600
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_clip_training_learns_to_match_captions_and_writes_a_text_encoder(shapes_folder, tmp_path):
    config = CLIPTrainConfig(
        data=str(shapes_folder),
        output_dir=str(tmp_path),
        embed_dim=32,
        text_width=32,
        text_layers=2,
        text_heads=2,
        vision_width=32,
        vision_layers=1,
        batch_size=24,
        max_steps=30,
        warmup_steps=3,
        learning_rate=3e-3,
        checkpoint_every=30,
        log_every=1,
    )
    out = train_clip(config)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first, last = log[0], log[-1]
    assert last["loss"] < first["loss"] - 0.5, (first, last)
    encoder = FrozenTextEncoder.from_pretrained(out)
    assert (encoder.kind, encoder.max_length, encoder.hidden_size) == ("transformers", 32, 32)
    _, captions = load_image_folder(shapes_folder)
    ids = torch.tensor(
        clip_encode(encoder.tokenizer, captions[:2], padding="max_length")["input_ids"]
    )
    assert encoder.tokenize(captions[:2]).tolist() == ids.tolist()
    assert encoder(captions[:2]).shape == (2, 32, 32)


def _tiny_clip(shapes_folder, out, **overrides):
    return CLIPTrainConfig(
        data=str(shapes_folder),
        output_dir=str(out),
        embed_dim=16,
        text_width=32,
        text_layers=1,
        text_heads=2,
        vision_width=32,
        vision_layers=1,
        batch_size=8,
        warmup_steps=2,
        log_every=1,
        **overrides,
    )


@pytest.mark.parametrize("part", ["vae", "clip"])
def test_killed_and_resumed_pretraining_ends_with_the_same_weights(part, shapes_folder, tmp_path):
    """The loop of `ldm train` for the VAE and CLIP too: SIGKILL once a checkpoint exists, resume,
    and the raw and EMA (warm-up on) weights equal those of a run that was never stopped."""
    make, train_fn, exported = {
        "vae": (_tiny_vae, train_vae, "vae/diffusion_pytorch_model.safetensors"),
        "clip": (_tiny_clip, train_clip, "open_clip/model.safetensors"),
    }[part]
    steps = {"max_steps": 40, "checkpoint_every": 4, "ema_decay": 0.999}
    train_fn(make(shapes_folder, tmp_path / "straight", **steps))
    config = make(shapes_folder, tmp_path / "killed", **steps)
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(json.dumps(config.to_dict()))  # JSON is YAML
    process = subprocess.Popen(
        [sys.executable, "-m", "ldm.cli", f"train-{part}", str(yaml_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    checkpoint = tmp_path / "killed" / "checkpoints" / "checkpoint-8"
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / exported).exists()
    train_fn(config, resume="latest")

    def largest_difference(a: dict, b: dict) -> float:
        assert a.keys() == b.keys()
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    raw = [  # the trained module's own weights, the one object Accelerate checkpoints for us
        torch.load(tmp_path / run / "checkpoints" / "checkpoint-40" / "custom_checkpoint_0.pkl")
        for run in ("straight", "killed")
    ]
    assert largest_difference(*raw) <= 1e-6
    ema = [load_file(tmp_path / run / exported) for run in ("straight", "killed")]
    assert largest_difference(*ema) <= 1e-6
    assert largest_difference(ema[0], raw[0]) > 1e-4  # the export is the EMA, not the raw weights
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").open()]
    assert steps_logged[-1] == 40
