"""LoRA training with `ldm train` (`ldm.training.adapters`) on tiny components: only the
adapters train and are checkpointed, the exported files load in diffusers as in ldm, and a
run resumed from a checkpoint ends with the same adapters."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora import ONE_LEVEL, diffusers_pipe, latents, ours, theirs
from test_training import colour_dataset, config

from ldm.config import TrainConfig
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training.denoiser import train


def lora_config(model, data, out, lora=None, **train_settings):
    settings = config(model, data, out, **{"max_steps": 6, **train_settings}).to_dict()
    settings["lora"] = {"rank": 4, "learning_rate": 3e-2, **(lora or {})}
    return TrainConfig.from_dict(settings)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return colour_dataset(tmp_path_factory.mktemp("colours") / "data")


@pytest.fixture(scope="module")
def trained(tiny_sd_dir, data, tmp_path_factory):
    """A LoRA run of 6 steps on the U-Net and the text encoder; its OUTPUT_DIR."""
    out = tmp_path_factory.mktemp("lora-run") / "colours"
    folder = train(lora_config(tiny_sd_dir, data, out, {"text_encoder": True}))
    assert folder == out / "lora"
    return out


def test_only_the_adapters_train_and_are_checkpointed(tiny_sd_dir, trained):
    checkpoint = trained / "checkpoints" / "checkpoint-6"
    model = load_file(checkpoint / "model.safetensors")
    ema = load_file(checkpoint / "ema.safetensors")
    unet = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir).unet
    targets = [
        n for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    assert len(model) == 2 * len(targets) and all(".lora_" in k for k in model)
    assert sorted(ema) == sorted(
        [*model, *(f"text_encoder.{k}" for k in _text_lora_names(checkpoint))]
    )
    assert all(".lora_" in k for k in ema)
    # the U-Net's own weights and the text encoder's stay as they were: no model folder either
    assert not (trained / "model").exists()
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    assert len(state) == len(ema)  # AdamW holds moments of the adapters only
    lora_b = [v for k, v in ema.items() if "lora_B" in k]
    assert max(v.abs().max().item() for v in lora_b) > 1e-3  # B started at 0 and moved
    assert (checkpoint / "model.safetensors").stat().st_size < 0.2 * sum(
        p.numel() * 4 for p in unet.parameters()
    )


def _text_lora_names(checkpoint):
    return [k for k in torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)]


def test_a_lora_trained_by_ldm_gives_diffusers_the_images_it_gives_ldm(tiny_sd_dir, data, tmp_path):
    """The U-Net LoRA of `ldm train`, both files loaded by diffusers' `load_lora_weights` and
    by `load_lora`: the same images within 1/255. (diffusers here cannot load text-encoder
    LoRAs: transformers 5 asks for peft >= 0.22.)"""
    folder = train(lora_config(tiny_sd_dir, data, tmp_path / "unet-only", {"alpha": 8}))
    diffusers_file = folder / "pytorch_lora_weights.safetensors"
    kohya_file = folder / "unet-only.safetensors"
    keys = list(load_file(diffusers_file))
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    with safe_open(str(kohya_file), "pt") as f:
        kohya = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["ss_network_dim"] == "4"
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert all(v.item() == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))  # alpha 8
    base = theirs(diffusers_pipe(tiny_sd_dir))
    for path in (diffusers_file, kohya_file):
        reference = diffusers_pipe(tiny_sd_dir)
        reference.load_lora_weights(path)
        expected = theirs(reference)
        assert np.abs(expected - base).max() > 5 / 255, path  # the LoRA changes the images
        pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
        pipe.load_lora(path)
        assert np.abs(ours(pipe) - expected).max() <= ONE_LEVEL, path


def test_a_text_encoder_lora_is_written_as_shared_files_are(tiny_sd_dir, trained):
    """The text encoder's keys start ``text_model.`` (``lora_te_text_model_`` in kohya's
    layout) as in every shared SD 1.x file; both files give ldm the same images."""
    folder = trained / "lora"
    diffusers_file, kohya_file = (
        folder / "pytorch_lora_weights.safetensors",
        folder / "colours.safetensors",
    )
    keys = list(load_file(diffusers_file))
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) for k in keys)
    kohya = load_file(kohya_file)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in kohya)
    images = []
    for path in (diffusers_file, kohya_file, None):
        pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
        if path is not None:
            pipe.load_lora(path)
        images.append(ours(pipe))
    assert np.abs(images[0] - images[1]).max() <= ONE_LEVEL
    assert np.abs(images[0] - images[2]).max() > 5 / 255


def test_a_resumed_lora_run_ends_with_the_same_adapters(tiny_sd_dir, data, trained, tmp_path):
    """Resumed from step 4 of the 6-step run: the same adapters (U-Net and text encoder),
    their EMA and exported files, to 1e-6."""
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        trained / "checkpoints" / "checkpoint-4",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-4",
    )
    again = lora_config(tiny_sd_dir, data, tmp_path / "resumed", {"text_encoder": True})
    train(again, resume="latest")
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(trained / "checkpoints" / "checkpoint-6" / name)
        b = load_file(tmp_path / "resumed" / "checkpoints" / "checkpoint-6" / name)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
    a = load_file(trained / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "lora" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").open()]
    assert [r["step"] for r in log] == [5, 6]


@pytest.mark.slow
def test_a_lora_run_killed_with_sigkill_and_resumed_ends_with_the_same_adapters(
    tiny_sd_dir, data, tmp_path
):
    steps = {"max_steps": 24, "checkpoint_every": 4, "lr_scheduler": "cosine", "warmup_steps": 3}
    lora = {"text_encoder": True}
    train(lora_config(tiny_sd_dir, data, tmp_path / "straight", lora, **steps))
    killed = lora_config(tiny_sd_dir, data, tmp_path / "killed", lora, **steps)
    (tmp_path / "run.yaml").write_text(json.dumps(killed.to_dict()))  # JSON is YAML
    process = subprocess.Popen(
        [sys.executable, "-m", "ldm.cli", "train", str(tmp_path / "run.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "checkpoint-8").exists():
        assert process.poll() is None and time.time() < deadline, "it ended before the kill"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "lora").exists()
    train(killed, resume="latest")
    a = load_file(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "killed" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_the_adapters_start_from_the_run_seed(tiny_sd_dir):
    """A's initial draw follows train.seed (not torch's global generator); B starts at 0."""
    from ldm.config import LoraSettings
    from ldm.training.adapters import add_lora

    def first_draw(seed, global_seed):
        torch.manual_seed(global_seed)
        pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
        return [p.detach().clone() for p in add_lora(pipe, LoraSettings(), seed)[0].parameters]

    a, b, c = first_draw(0, 1), first_draw(0, 2), first_draw(1, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert all(x.abs().max() == 0 for x in a[1::2])  # lora_B
    assert all(x.abs().max() > 0 for x in a[0::2])  # lora_A


def test_lora_settings_that_cannot_work_are_errors_that_name_them(tiny_sd_dir, data, tmp_path):
    with pytest.raises(ValueError, match=r"lora\.targets: to_x name no Linear layer.*to_q"):
        train(lora_config(tiny_sd_dir, data, tmp_path / "a", {"targets": ["to_q", "to_x"]}))
    with pytest.raises(ValueError, match=r"lora\.rank=0 is not allowed"):
        lora_config(tiny_sd_dir, data, tmp_path / "b", {"rank": 0})
    with pytest.raises(ValueError, match=r"lora run: set train\.train_text_encoder: false"):
        lora_config(tiny_sd_dir, data, tmp_path / "c", train_text_encoder=True)
    with pytest.raises(ValueError, match=r"embeddings change every step"):
        lora_config(tiny_sd_dir, data, tmp_path / "d", {"text_encoder": True}, cache_latents=True)
    # resuming with another lora section: the config check refuses before any weight is read
    train(lora_config(tiny_sd_dir, data, tmp_path / "e", max_steps=2))
    with pytest.raises(ValueError, match=r"lora\.rank"):
        train(lora_config(tiny_sd_dir, data, tmp_path / "e", {"rank": 8}), resume="latest")


TOKEN = "<colour>"


def inversion_config(model, data, out, **settings):
    run = config(model, data, out, **{"max_steps": 6, "caption_dropout": 0.0}).to_dict()
    run["textual_inversion"] = {
        "placeholder_token": TOKEN,
        "initializer_token": "red",
        "num_vectors": 2,
        "learning_rate": 5e-2,
        "template": "a {} image",
    } | settings
    return TrainConfig.from_dict(run)


@pytest.fixture(scope="module")
def inverted(tiny_sd_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("inversion") / "run"
    assert train(inversion_config(tiny_sd_dir, data, out)) == out / "textual_inversion"
    return out


def test_textual_inversion_trains_only_the_new_vectors(tiny_sd_dir, inverted):
    checkpoint = inverted / "checkpoints" / "checkpoint-6"
    ema = load_file(checkpoint / "ema.safetensors")
    assert list(ema) == ["textual_inversion.vectors"] and ema[
        "textual_inversion.vectors"
    ].shape == (2, 32)
    assert not (checkpoint / "model.safetensors").exists()  # no U-Net in the checkpoint
    saved = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)
    assert list(saved) == ["vectors"]
    learned = load_file(inverted / "textual_inversion" / "learned_embeds.safetensors")
    assert list(learned) == [TOKEN] and learned[TOKEN].shape == (2, 32)
    # the vectors started as the embedding of "red" and moved
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    red = pipe.text_encoder.tokenize("red")[0][1]
    start = pipe.text_encoder.model.get_input_embeddings().weight[red]
    assert (learned[TOKEN] - start).abs().max() > 1e-3
    assert not (inverted / "model").exists()


def test_a_trained_embedding_gives_diffusers_the_images_it_gives_ldm(tiny_sd_dir, inverted):
    folder = inverted / "textual_inversion"
    prompt = f"a {TOKEN} image"
    reference = diffusers_pipe(tiny_sd_dir)
    reference.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
    expected = reference(prompt, latents=latents(), num_inference_steps=4, output_type="np")
    base = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    for path, token in (
        (folder / "learned_embeds.safetensors", None),
        (folder / "colour.safetensors", TOKEN),
    ):
        pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
        assert pipe.load_textual_inversion(path, token=token) == TOKEN
        kwargs = dict(num_inference_steps=4, sampler="ddim", output_type="np", progress=False)
        image = pipe(prompt, latents=latents(), **kwargs).images
        assert np.abs(image - expected.images).max() <= ONE_LEVEL, path
    without = base("a  image", latents=latents(), **kwargs).images
    assert np.abs(without - expected.images).max() > 5 / 255  # the token does something


def test_a_resumed_textual_inversion_ends_with_the_same_vectors(
    tiny_sd_dir, data, inverted, tmp_path
):
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        inverted / "checkpoints" / "checkpoint-4",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-4",
    )
    train(inversion_config(tiny_sd_dir, data, tmp_path / "resumed"), resume="latest")
    a = load_file(inverted / "textual_inversion" / "learned_embeds.safetensors")[TOKEN]
    b = load_file(tmp_path / "resumed" / "textual_inversion" / "learned_embeds.safetensors")[TOKEN]
    assert (a - b).abs().max() <= 1e-6


def test_textual_inversion_settings_that_cannot_work_are_errors(tiny_sd_dir, data, tmp_path):
    with pytest.raises(ValueError, match=r"4 of 4 captions .* do not name .*'<colour>'.*template"):
        train(inversion_config(tiny_sd_dir, data, tmp_path / "a", template=None))
    with pytest.raises(ValueError, match=r"placeholder_token: token 'red' is already in"):
        train(inversion_config(tiny_sd_dir, data, tmp_path / "b", placeholder_token="red"))
    with pytest.raises(ValueError, match=r"template='a image' is not allowed"):
        inversion_config(tiny_sd_dir, data, tmp_path / "c", template="a image")
    with pytest.raises(ValueError, match=r"use one of them"):
        TrainConfig.from_dict(
            inversion_config(tiny_sd_dir, data, tmp_path / "d").to_dict() | {"lora": {}}
        )
