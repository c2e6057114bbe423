"""`ldm train` on tiny components: it learns, survives bad data, and resumes exactly."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from test_data import EXPECTED_SKIPPED, messy  # noqa: F401  (messy is a fixture)

from ldm.config import TrainConfig
from ldm.diffusion.losses import diffusion_loss
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training.denoiser import train

COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "yellow": (255, 255, 0)}


@pytest.fixture(scope="module")
def model(tiny_sd_dir):
    return tiny_sd_dir


def colour_dataset(folder, bad=False):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(folder / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "text": f"a {name} image"})
    if bad:
        (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
        (folder / "empty.png").write_bytes(b"")
        Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(folder / "clear.png")
        rows += [
            {"file_name": "corrupt.png", "text": "x"},
            {"file_name": "empty.png", "text": "x"},
            {"file_name": "missing.png", "text": "x"},
            {"file_name": "blue.png", "text": "   "},
            {"file_name": "clear.png", "text": "a white image"},
        ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def config(model, data, out, **train):
    settings = {
        "max_steps": 6,
        "batch_size": 2,
        "checkpoint_every": 2,
        "learning_rate": 1e-3,
        "ema_decay": 0.9,
    }
    return TrainConfig.from_dict(
        {
            "model": str(model),
            "output_dir": str(out),
            "data": {"path": str(data), "resolution": 32},
            "train": settings | train,
        }
    )


def eval_loss(pipe, unet, data):
    """The loss on fixed images, noise and timesteps: comparable before and after training."""
    pixels = torch.stack(
        [
            torch.tensor(np.asarray(Image.open(data / f"{n}.png")), dtype=torch.float32).permute(
                2, 0, 1
            )
            / 127.5
            - 1
            for n in COLOURS
        ]
    )
    x0 = pipe.vae.encode(pixels)
    context = pipe.text_encoder([f"a {n} image" for n in COLOURS])
    with torch.no_grad():
        losses = [
            diffusion_loss(
                unet, pipe.schedule, x0, context, generator=torch.Generator().manual_seed(s)
            ).loss.item()
            for s in range(8)
        ]
    return float(np.mean(losses))


def test_loss_falls_on_data_the_model_can_memorise(model, tmp_path):
    data = colour_dataset(tmp_path / "data")
    before = LatentDiffusionPipeline.from_pretrained(model)
    out = train(
        config(
            model,
            data,
            tmp_path / "run",
            max_steps=40,
            ema_decay=None,
            checkpoint_every=100,
            caption_dropout=0.0,
        )
    )
    after = LatentDiffusionPipeline.from_pretrained(out)
    first, last = eval_loss(before, before.unet, data), eval_loss(after, after.unet, data)
    assert last < 0.7 * first, (first, last)  # measured: about 1.0 -> 0.3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41)) and all(
        np.isfinite(r["loss"]) for r in log
    )


def test_fine_tune_on_bad_data_reports_exactly_the_bad_files_and_exports(model, tmp_path):
    data = colour_dataset(tmp_path / "data", bad=True)
    out = train(config(model, data, tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    skipped = {entry["sample"]: entry["reason"] for entry in report["skipped"]}
    assert set(skipped) == {"corrupt.png", "empty.png", "missing.png", "blue.png"}
    assert "empty file" in skipped["empty.png"] and "file not found" in skipped["missing.png"]
    assert [c["sample"] for c in report["converted"]] == ["clear.png"]
    assert report["used"] == 5 and report["total"] == 9
    assert (
        sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
        == ["checkpoint-2", "checkpoint-4", "checkpoint-6"][-3:]
    )
    saved = TrainConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert saved.train.max_steps == 6  # the resolved config is kept with the run
    ours = LatentDiffusionPipeline.from_pretrained(out)
    image = ours(
        "a red image", num_inference_steps=4, seed=0, output_type="np", progress=False
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    reference = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = reference(
        "a red image", latents=latents, num_inference_steps=4, output_type="np"
    ).images
    got = ours(  # DDIM: the exported folder's scheduler
        "a red image",
        latents=latents,
        num_inference_steps=4,
        sampler="ddim",
        output_type="np",
        progress=False,
    ).images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1 / 255 + 1e-6)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(model, tmp_path):
    data = colour_dataset(tmp_path / "data")
    steps = {
        "max_steps": 24,
        "checkpoint_every": 4,
        "keep_checkpoints": 2,
        "lr_scheduler": "cosine",
        "warmup_steps": 3,
        "caption_dropout": 0.5,
    }
    train(config(model, data, tmp_path / "straight", **steps))
    # the same run in a process that is killed with SIGKILL once a checkpoint exists
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        json.dumps(config(model, data, tmp_path / "killed", **steps).to_dict())
    )  # JSON is YAML
    process = subprocess.Popen(
        [sys.executable, "-m", "ldm.cli", "train", str(yaml_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while (
        not (tmp_path / "killed" / "checkpoints" / "checkpoint-8").exists()
        and time.time() < deadline
        and process.poll() is None
    ):
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "model").exists()
    train(TrainConfig.from_dict(json.loads(yaml_path.read_text())), resume="latest")
    a = load_file(tmp_path / "straight" / "checkpoints" / "checkpoint-24" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / "checkpoint-24" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ema_a = load_file(
        tmp_path / "straight" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    ema_b = load_file(
        tmp_path / "killed" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6
    records = [
        json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == list(range(1, 25))  # the replayed steps appear once
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)  # the resumed run's clock goes on from its checkpoint


def test_checkpoints_hold_the_ema_by_parameter_name_and_resume_restores_it_exactly(model, tmp_path):
    from safetensors import safe_open

    data = colour_dataset(tmp_path / "data")
    train(config(model, data, tmp_path / "run", max_steps=4))
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "ema.safetensors").is_file()
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))  # no pickled EMA or LR schedule
    ema = load_file(checkpoint / "ema.safetensors")
    unet = LatentDiffusionPipeline.from_pretrained(model).unet
    assert sorted(ema) == sorted(name for name, _ in unet.named_parameters())
    with safe_open(str(checkpoint / "ema.safetensors"), framework="pt") as f:
        settings = json.loads(f.metadata()["ldm.ema"])
    assert settings["num_updates"] == 4 and settings["decay"] == 0.9
    raw = load_file(checkpoint / "model.safetensors")
    assert any(not torch.equal(ema[name], raw[name]) for name in ema)  # the EMA, not the weights
    # resumed at its last step, the run trains no further and exports the EMA it read, exactly
    train(config(model, data, tmp_path / "run", max_steps=4), resume="latest")
    exported = LatentDiffusionPipeline.from_pretrained(tmp_path / "run" / "model").unet
    for name, p in exported.named_parameters():
        assert torch.equal(p, ema[name]), name
    # resumed from step 2 in another folder: step 4's EMA as in the run that went straight on
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "run" / "checkpoints" / "checkpoint-2",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-2",
    )
    train(config(model, data, tmp_path / "resumed", max_steps=4), resume="latest")
    again = load_file(tmp_path / "resumed" / "checkpoints" / "checkpoint-4" / "ema.safetensors")
    assert again.keys() == ema.keys()
    assert max((again[k] - ema[k]).abs().max().item() for k in ema) <= 1e-6


def file_digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_second_run_refuses_and_overwrite_moves_the_first_aside_complete(model, tmp_path):
    data = colour_dataset(tmp_path / "data")
    first = config(model, data, tmp_path / "run", max_steps=4)
    train(first)
    before = file_digests(tmp_path / "run")
    with pytest.raises(
        FileExistsError,
        match=r"run holds a run already; continue it with --resume latest.*--overwrite",
    ):
        train(config(model, data, tmp_path / "run", max_steps=2))
    assert file_digests(tmp_path / "run") == before  # byte for byte
    with pytest.raises(FileNotFoundError, match=r"--resume latest: .* holds no checkpoint-N"):
        train(config(model, data, tmp_path / "fresh"), resume="latest")
    assert not (tmp_path / "fresh").exists()  # refused before anything was written
    train(config(model, data, tmp_path / "run", max_steps=2), overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert file_digests(aside) == before  # moved, complete
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "run" / "model").name == "run"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]
    # --resume auto: the latest checkpoint when there is one (here: the run is finished)
    train(config(model, data, tmp_path / "run", max_steps=2), resume="auto")
    train(config(model, data, tmp_path / "auto", max_steps=2), resume="auto")  # else a start
    assert (tmp_path / "auto" / "model" / "model_index.json").is_file()


def test_resume_checks_the_config_and_goes_on_with_a_longer_run(model, tmp_path, caplog):
    data = colour_dataset(tmp_path / "data")
    steps = {"lr_scheduler": "cosine", "warmup_steps": 1, "checkpoint_every": 2}
    steps["keep_checkpoints"] = 10
    train(config(model, data, tmp_path / "run", max_steps=8, **steps))
    checkpoint_4 = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    longer = config(model, data, tmp_path / "run", max_steps=12, **steps)
    with pytest.raises(
        ValueError, match=r"train\.learning_rate \(0\.001 -> 0\.01\).*allow-config-change"
    ):
        train(
            config(model, data, tmp_path / "run", max_steps=12, learning_rate=1e-2, **steps),
            resume=checkpoint_4,
        )
    with caplog.at_level("INFO"):
        train(longer, resume=checkpoint_4)
    assert "train.max_steps changes from 8 to 12" in caplog.text
    names = sorted(p.name for p in checkpoint_4.parent.iterdir())
    assert "superseded-checkpoint-8" in names  # the first run's later checkpoints are kept
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))  # steps 5-8 of the first run cut
    # the cosine goes on from its value at step 4 (progress 3/7 of the 8-step run) to 0 at 12
    progress = {s: 3 / 7 + (4 / 7) * (s - 4) / 8 for s in range(5, 13)}
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * progress[s])) for s in range(5, 13)]
    assert [r["lr"] for r in log[4:]] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    first = [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 7)) for s in range(1, 5)]
    assert [r["lr"] for r in log[:4]] == pytest.approx(first, rel=1e-9)


def test_resume_from_a_missing_checkpoint_is_an_error(model, tmp_path):
    data = colour_dataset(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=r"--resume .*checkpoint-9 does not exist"):
        train(
            config(model, data, tmp_path / "run"),
            resume=str(tmp_path / "run" / "checkpoints" / "checkpoint-9"),
        )


def test_latent_and_text_cache_is_built_once_reused_and_invalidated(model, tmp_path, monkeypatch):
    from ldm.encoders.vae import FrozenVAE

    data = colour_dataset(tmp_path / "data")
    with pytest.raises(
        ValueError,
        match=r"cache_latents=true needs data\.center_crop: true and data\.random_flip: false",
    ):
        train(
            TrainConfig.from_dict(
                config(model, data, tmp_path / "x", cache_latents=True).to_dict()
                | {"data": {"path": str(data), "random_flip": True}}
            )
        )
    calls = {"encode": 0}
    real = FrozenVAE.encode_distribution

    def counting(self, images):
        calls["encode"] += 1
        return real(self, images)

    monkeypatch.setattr(FrozenVAE, "encode_distribution", counting)
    train(config(model, data, tmp_path / "run", cache_latents=True, max_steps=4))
    caches = sorted((tmp_path / "run" / "cache").glob("encoded-*.safetensors"))
    assert len(caches) == 1 and calls["encode"] == 1  # one batch of 4 samples, encoded once
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(np.isfinite(r["loss"]) for r in log)
    cached = load_file(caches[0])
    assert cached["means"].shape == (4, 4, 16, 16) and cached["contexts"].shape == (4, 77, 32)
    assert cached["empty_context"].shape == (1, 77, 32)
    # a second run with the same inputs reads the cache: the VAE is not called again
    # (--overwrite moves the first run aside and links its cache into the new one)
    again = config(
        model, data, tmp_path / "run", cache_latents=True, max_steps=2, checkpoint_every=100
    )
    train(again, overwrite=True)
    assert calls["encode"] == 1
    assert len(list(tmp_path.glob("run.old-*/cache/encoded-*.safetensors"))) == 1
    # a changed image is a different dataset: a new cache
    Image.new("RGB", (32, 32), (10, 20, 30)).save(data / "red.png")
    train(again, overwrite=True)
    assert (
        calls["encode"] == 2
        and len(list((tmp_path / "run" / "cache").glob("encoded-*.safetensors"))) == 2
    )


def test_non_finite_losses_are_skipped_and_too_many_stop_the_run(model, tmp_path, monkeypatch):
    import ldm.training.denoiser as training

    data = colour_dataset(tmp_path / "data")
    real = training.diffusion_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(training, "diffusion_loss", sometimes_nan)
    bad_calls = {2, 3}
    train(config(model, data, tmp_path / "run", max_steps=4, checkpoint_every=2))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["nonfinite_skipped"] == 2
    assert all(np.isfinite(r["loss"]) for r in log)
    # ten in a row: a clear stop, and the last good checkpoint intact
    calls["n"], bad_calls = 0, set(range(5, 100))
    with pytest.raises(
        FloatingPointError, match="10 non-finite losses in a row at step 4; stopped"
    ):
        train(config(model, data, tmp_path / "run2", max_steps=8, checkpoint_every=2))
    assert sorted(p.name for p in (tmp_path / "run2" / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_then_exits_128_plus_it(model, tmp_path, signum):
    data = colour_dataset(tmp_path / "data")
    yaml_path = tmp_path / "run.yaml"
    run = config(model, data, tmp_path / "run", max_steps=10_000, checkpoint_every=10_000)
    yaml_path.write_text(json.dumps(run.to_dict()))
    process = subprocess.Popen(
        [sys.executable, "-m", "ldm.cli", "train", str(yaml_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum  # 143 or 130: stopped, not finished
    last_step = json.loads(log.read_text().splitlines()[-1])["step"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [
        f"checkpoint-{last_step}"
    ]
    assert not (tmp_path / "run" / "model").exists()  # stopped, not finished


def test_fine_tune_on_every_kind_of_bad_sample(model, messy, tmp_path):  # noqa: F811
    out = train(config(model, messy, tmp_path / "run", max_steps=2, batch_size=4))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    skipped = {entry["sample"]: entry["reason"] for entry in report["skipped"]}
    assert set(skipped) == {*EXPECTED_SKIPPED, str(messy.parent / "outside.png")}
    for sample, words in EXPECTED_SKIPPED.items():
        assert words in skipped[sample]
    converted = {entry["sample"] for entry in report["converted"]}
    assert {
        "rgba.png",
        "la.png",
        "palette.png",
        "gray.png",
        "gray16.png",
        "rotated.jpg",
        "small.png",
    } <= converted
    text = (tmp_path / "run" / "data_report.txt").read_text()
    assert text.index("Skipped") < text.index("Converted")  # listed separately
    image = LatentDiffusionPipeline.from_pretrained(out)(
        "a gradient", num_inference_steps=2, seed=0, output_type="np", progress=False
    ).images
    assert np.isfinite(image).all() and image.shape == (1, 32, 32, 3)


def test_tensorboard_holds_the_logged_scalars_and_validation_grids(model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = colour_dataset(tmp_path / "data")
    run = config(model, data, tmp_path / "run", max_steps=4)
    run.validation.prompts, run.validation.every, run.validation.num_inference_steps = (
        ["a red image"],
        2,
        2,
    )
    train(run)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    board.Reload()
    losses = board.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in losses], [r["loss"] for r in log], rtol=1e-6)
    assert any(tag.startswith("loss_by_t/") for tag in board.Tags()["scalars"])
    assert [e.step for e in board.Images("validation")] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == [
        "step-2.png",
        "step-4.png",
    ]


def test_fine_tuning_the_vae_decoder_and_text_encoder_trains_them_and_resumes_exactly(
    model, tmp_path
):
    data = colour_dataset(tmp_path / "data")
    parts = {"train_vae_decoder": True, "vae_learning_rate": 3e-3, "train_text_encoder": True}
    out = train(config(model, data, tmp_path / "straight", max_steps=8, **parts))
    before, after = (LatentDiffusionPipeline.from_pretrained(p) for p in (model, out))

    def changed(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))

    vae_a, vae_b = before.vae.vae, after.vae.vae
    assert changed(vae_a.encoder.parameters(), vae_b.encoder.parameters()) == 0  # latents kept
    assert changed(vae_a.quant_conv.parameters(), vae_b.quant_conv.parameters()) == 0
    assert changed(vae_a.decoder.parameters(), vae_b.decoder.parameters()) > 1e-4
    text_a, text_b = before.text_encoder.model, after.text_encoder.model
    assert changed(text_a.parameters(), text_b.parameters()) > 1e-5
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").open()]
    assert all(np.isfinite(r["decoder_mse"]) for r in log) and len(log) == 8
    # stopped at step 4 and resumed to 8: the same decoder, text encoder and EMA as straight
    train(config(model, data, tmp_path / "resumed", max_steps=4, **parts))
    resumed = train(
        config(model, data, tmp_path / "resumed", max_steps=8, **parts), resume="latest"
    )
    again = LatentDiffusionPipeline.from_pretrained(resumed)
    assert changed(after.vae.vae.parameters(), again.vae.vae.parameters()) <= 1e-6
    assert changed(text_b.parameters(), again.text_encoder.model.parameters()) <= 1e-6
    assert changed(after.unet.parameters(), again.unet.parameters()) <= 1e-6
    with pytest.raises(ValueError, match=r"train\.cache_latents=True is not allowed"):
        config(model, data, tmp_path / "x", cache_latents=True, train_text_encoder=True)
