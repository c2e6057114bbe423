"""LoRA against full fine-tuning of the shipped model, on the same data: ``ldm train`` with
configs/lora.yaml and with configs/icons_finetune.yaml, each in its own process (steps/s from
its log, peak RSS of the process, trainable parameters, the size of what it exports), then
``ldm eval`` of the base model and of both results on the training captions: how far each
moves the generated images toward the captions' own images (docs/training.md, "LoRA")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

RUNS = {"full fine-tune": "configs/icons_finetune.yaml", "LoRA rank 4": "configs/lora.yaml"}


def _train(config: str, out: Path) -> dict:
    """One ``ldm train`` in a child process: its peak RSS (MiB), steps/s (steps 2 to the last,
    from the log), trainable parameters (from the last checkpoint's EMA) and exported size."""
    code = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [sys.executable, "-m", "ldm.cli", "train", config, "--overwrite"]
    command += ["--set", f"output_dir={out}"]
    done = subprocess.run(
        [sys.executable, "-c", code, *command], check=True, capture_output=True, text=True
    )
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps_per_s = (log[-1]["step"] - log[1]["step"]) / (log[-1]["elapsed_s"] - log[1]["elapsed_s"])
    last = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    with safe_open(str(last / "ema.safetensors"), "pt") as f:
        trainable = sum(_numel(f, k) for k in f.keys())
    lora = (out / "lora").is_dir()
    exported = (
        out / "lora" / "pytorch_lora_weights.safetensors"
        if lora
        else out / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    return {
        "peak_rss_mib": int(done.stdout.split()[-1]) / 1024,
        "steps_per_s": steps_per_s,
        "steps": log[-1]["step"],
        "minutes": log[-1]["elapsed_s"] / 60,
        "trainable_parameters": trainable,
        "model": "default" if lora else str(out / "model"),
        "lora": str(exported) if lora else None,
        "exported_mib": exported.stat().st_size / 2**20,
    }


def _numel(f, key: str) -> int:
    n = 1
    for size in f.get_slice(key).get_shape():
        n *= size
    return n


def benchmark_lora(data: str, heldout: str, out: Path, n: int = 100) -> dict:
    """Both runs and the three evaluations; writes ``out/results.json``."""
    from ldm.config import DEFAULT_MODEL, DataConfig
    from ldm.data.metrics import evaluate_on_data
    from ldm.pipeline import LatentDiffusionPipeline

    results = {"base": {"model": "default", "lora": None}}
    for name, config in RUNS.items():
        results[name] = _train(config, out / name.split()[0].lower())
    for name, run in results.items():
        pipe = LatentDiffusionPipeline.from_pretrained(
            DEFAULT_MODEL if run["model"] == "default" else run["model"]
        )
        if run["lora"] is not None:
            pipe.load_lora(run["lora"])
        scores = evaluate_on_data(
            pipe, DataConfig(data), n=n, heldout=DataConfig(heldout), out_dir=out / f"eval-{name}"
        )
        run["own_rms"] = scores["own_rms"]
    base = results["base"]["own_rms"]
    moved = {k: base - v["own_rms"] for k, v in results.items() if k != "base"}
    results["LoRA rank 4"]["share_of_full_effect"] = moved["LoRA rank 4"] / moved["full fine-tune"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
