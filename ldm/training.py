"""Training and fine-tuning with Accelerate: the only module that imports accelerate.

    ldm train CONFIG.yaml [--set key=value ...] [--resume latest|PATH]

The loop, in numbered sections: (1) models, (2) data, (3) optimizer and schedule, (4) resume,
(5) steps, (6) export. Every random draw (data order, caption dropout, VAE posterior samples,
noise and timesteps) comes from generators whose states are checkpointed, so a run that is
killed and resumed ends with the same weights as one that was not.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ldm.cache import encode_dataset, fingerprint
from ldm.checkpoint import EMA, begin_checkpoint, commit_checkpoint, resolve_resume
from ldm.config import SchedulerConfig, TrainConfig, TrainSettings, UNetConfig
from ldm.data import ImageCaptionDataset, scan
from ldm.images import make_grid
from ldm.losses import decoder_loss, diffusion_loss, loss_by_timestep_bucket
from ldm.pipeline import LatentDiffusionPipeline
from ldm.unet import UNet

logger = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 10


@dataclass
class TrainingState:
    """What besides weights and optimizer a resumed run needs: where it is, and its generators."""

    step: int
    epoch: int
    position: int  # batches of this process already taken from the current epoch
    generator: torch.Generator  # caption dropout, VAE posterior samples, noise, timesteps
    data_generator: torch.Generator  # random crops and flips
    nonfinite_skipped: int = 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "generator": self.generator.get_state(),
            "data_generator": self.data_generator.get_state(),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.generator.set_state(state["generator"])
        self.data_generator.set_state(state["data_generator"])
        self.nonfinite_skipped = state["nonfinite_skipped"]


def _load_models(config: TrainConfig) -> LatentDiffusionPipeline:
    if config.model is not None:
        pipe = LatentDiffusionPipeline.from_pretrained(config.model)
    else:
        from ldm.autoencoder import FrozenVAE
        from ldm.text_encoder import FrozenTextEncoder

        unet_config = (
            UNetConfig.from_json(config.unet)
            if config.unet.endswith(".json")
            else UNetConfig.preset(config.unet)
        )
        pipe = LatentDiffusionPipeline(
            UNet(unet_config),
            FrozenVAE.from_pretrained(config.vae),
            FrozenTextEncoder.from_pretrained(config.text_encoder),
        )
    if (
        config.train.prediction_type is not None
        and config.train.prediction_type != pipe.scheduler.prediction_type
    ):
        scheduler = SchedulerConfig(
            **{**pipe.scheduler.__dict__, "prediction_type": config.train.prediction_type}
        )
        pipe = LatentDiffusionPipeline(
            pipe.unet, pipe.vae, pipe.text_encoder, scheduler, name=pipe.name
        )
    return pipe


def _unfreeze(
    pipe: LatentDiffusionPipeline, t: TrainSettings
) -> list[tuple[torch.nn.Module, list[torch.nn.Parameter], float]]:
    """The frozen parts that ``train.train_vae_decoder`` and ``train.train_text_encoder`` fine-tune:
    (module to checkpoint, its trained parameters, their learning rate). The VAE's encoder always
    stays frozen, so the latents the U-Net learns from keep their meaning."""
    extra = []
    if t.train_vae_decoder:
        vae = pipe.vae.vae
        params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        extra.append((pipe.vae, params, t.vae_learning_rate or t.learning_rate))
    if t.train_text_encoder:
        params = list(pipe.text_encoder.model.parameters())
        extra.append((pipe.text_encoder, params, t.text_encoder_learning_rate or t.learning_rate))
    for _, params, _ in extra:
        for p in params:
            p.requires_grad_(True)
    return extra


def _average_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """The mean gradient over processes, for modules that Accelerate did not wrap."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")


def _lr_lambda(config: TrainConfig):
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_scheduler == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _epoch_batches(
    n: int, epoch: int, seed: int, batch: int, rank: int, world: int
) -> list[list[int]]:
    """This process's batches of an epoch: a seeded permutation, cut to whole global batches."""
    order = torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
    ).tolist()
    per_step = batch * world
    usable = (n // per_step) * per_step or n  # a dataset smaller than one global batch still trains
    order = order[:usable]
    mine = order[rank::world]
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


def train(config: TrainConfig, *, resume: str | None = None) -> Path:
    """Run a training job; returns the folder of the exported pipeline."""
    t = config.train
    if t.cache_latents and (not config.data.center_crop or config.data.random_flip):
        raise ValueError(
            "train.cache_latents=true needs data.center_crop: true and data.random_flip: false: "
            "cached latents are of one fixed crop"
        )
    out = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum, mixed_precision=t.mixed_precision
    )
    main = accelerator.is_main_process

    # 1. Models: the U-Net trains; the VAE's decoder and the text encoder only when asked.
    pipe = _load_models(config)
    unet = pipe.unet.train().requires_grad_(True)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    pipe.vae.to(accelerator.device)
    pipe.text_encoder.to(accelerator.device)
    extra = _unfreeze(pipe, t)  # [(module, parameters, learning rate)]

    # 2. Data: every sample checked up front; the report lists what was skipped or converted.
    report = scan(config.data)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        report.save(out / "data_report.json")
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    data_generator = torch.Generator().manual_seed(t.seed * 7919 + 1 + accelerator.process_index)
    dataset = ImageCaptionDataset(config.data, report.samples, generator=data_generator)

    encoded = None
    if t.cache_latents:  # encode once; later epochs read the frozen encoders' outputs from disk
        key = fingerprint(pipe.vae, pipe.text_encoder, report.samples, config.data)
        if main:
            encode_dataset(pipe.vae, pipe.text_encoder, dataset, out / "cache", key)
        accelerator.wait_for_everyone()
        encoded = encode_dataset(pipe.vae, pipe.text_encoder, dataset, out / "cache", key)

    # 3. Optimizer and learning-rate schedule.
    fused = accelerator.device.type in ("cpu", "cuda")  # one kernel per step: 4x faster on CPU
    groups = [{"params": list(unet.parameters()), "lr": t.learning_rate}]
    groups += [{"params": params, "lr": lr} for _, params, lr in extra]
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=fused)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    # The schedule is stepped once per optimizer update by us, not by Accelerate (which would step
    # it once per process), and checkpointed as a registered object. Accelerate saves registered
    # objects from the main process only, so each process saves its own TrainingState.
    unet, optimizer = accelerator.prepare(unet, optimizer)

    def trained_parameters() -> list[torch.nn.Parameter]:
        return [
            *accelerator.unwrap_model(unet).parameters(),
            *(p for _, ps, _ in extra for p in ps),
        ]

    ema = (
        EMA(
            trained_parameters(),
            t.ema_decay,
            power=t.ema_power,
            inv_gamma=t.ema_inv_gamma,
        )
        if t.ema_decay
        else None
    )
    generator = torch.Generator().manual_seed(t.seed * 7919 + accelerator.process_index)
    state = TrainingState(0, 0, 0, generator, data_generator)
    accelerator.register_for_checkpointing(lr_schedule)
    for module, _, _ in extra:  # not prepared, so checkpointed as registered objects
        accelerator.register_for_checkpointing(module)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # 4. Resume: a checkpoint that cannot be read is an error, never a silent restart.
    checkpoint = resolve_resume(out / "checkpoints", resume)
    if checkpoint is not None:
        own_state = checkpoint / f"training_state_{accelerator.process_index}.pt"
        if not own_state.is_file():
            raise ValueError(
                f"{checkpoint} has no {own_state.name}: it is incomplete, or was written by a run "
                "with fewer processes; resume with the same number of processes"
            )
        accelerator.load_state(str(checkpoint))
        state.load_state_dict(torch.load(own_state, weights_only=True))
        logger.info("resumed from %s at step %d", checkpoint, state.step)

    def write_checkpoint() -> None:
        """Every process writes its part into a temporary folder; the main process then
        renames it, so a crash mid-write never leaves a broken latest checkpoint."""
        folder = out / "checkpoints"
        if main:
            begin_checkpoint(folder, state.step)
        accelerator.wait_for_everyone()
        tmp = folder / f".tmp-checkpoint-{state.step}"
        accelerator.save_state(str(tmp))
        torch.save(state.state_dict(), tmp / f"training_state_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if main:
            commit_checkpoint(folder, state.step, keep=t.keep_checkpoints)

    stop = {"signal": None}

    def on_signal(signum, frame):  # SIGINT/SIGTERM: checkpoint after this step, then exit
        stop["signal"] = signum

    previous = (
        {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    )

    # 5. Steps.
    log_file = open(out / "log.jsonl", "a", encoding="utf-8") if main else None
    board = (
        SummaryWriter(str(out / "tensorboard")) if main else None
    )  # tensorboard --logdir OUTPUT_DIR
    bar = tqdm(total=t.max_steps, initial=state.step, desc="training", disable=not main)
    started, nonfinite_in_a_row = time.perf_counter(), 0
    try:
        batches, batches_epoch = [], None
        while state.step < t.max_steps and stop["signal"] is None:
            if batches_epoch != state.epoch:  # this process's batches, once per epoch
                batches_epoch = state.epoch
                batches = _epoch_batches(
                    len(dataset),
                    state.epoch,
                    t.seed,
                    t.batch_size,
                    accelerator.process_index,
                    accelerator.num_processes,
                )
            if state.position >= len(batches):
                state.epoch, state.position = state.epoch + 1, 0
                continue
            indices = batches[state.position]
            state.position += 1
            drop = torch.rand(len(indices), generator=state.generator) < t.caption_dropout  # (B,)
            pixels = None
            if encoded is not None:
                mean, std = encoded.means[indices], encoded.stds[indices]  # (B, C, h, w)
                noise = torch.randn(mean.shape, generator=state.generator)
                x0 = (mean + std * noise).to(
                    accelerator.device
                )  # a posterior sample, as encode gives
                context = torch.where(
                    drop[:, None, None], encoded.empty_context, encoded.contexts[indices]
                )
                context = context.to(accelerator.device)  # (B, L, D)
                if t.train_vae_decoder:
                    pixels = torch.stack([dataset[i]["pixels"] for i in indices])
                    pixels = pixels.to(accelerator.device)  # (B, 3, H, W)
            else:
                items = [dataset[i] for i in indices]
                pixels = torch.stack([item["pixels"] for item in items]).to(accelerator.device)
                captions = [
                    "" if d else it["caption"] for d, it in zip(drop.tolist(), items, strict=True)
                ]
                x0 = pipe.vae.encode(
                    pixels, generator=state.generator, sample=True
                ).float()  # (B, C, h, w)
                encode_text = pipe.text_encoder.embed if t.train_text_encoder else pipe.text_encoder
                context = encode_text(captions).float()  # (B, L, D)
            with accelerator.accumulate(unet):
                result = diffusion_loss(
                    unet,
                    pipe.schedule,
                    x0,
                    context,
                    generator=state.generator,
                    min_snr_gamma=t.min_snr_gamma,
                    noise_offset=t.noise_offset,
                )
                loss = result.loss
                if t.train_vae_decoder:  # its own objective; the latents stay the encoder's
                    decoder_mse = decoder_loss(pipe.vae, x0, pixels)
                    loss = loss + decoder_mse
                finite = accelerator.gather(torch.isfinite(loss).reshape(1).float()).min() > 0
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(unet.parameters(), t.max_grad_norm)
                        for _, params, _ in extra:  # not prepared: average them ourselves
                            _average_gradients(accelerator, params)
                            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            if not finite:  # skipped on every process together
                state.nonfinite_skipped += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(
                        f"{nonfinite_in_a_row} non-finite losses in a row at step {state.step}; stopped. "
                        "The last good checkpoint is intact: lower train.learning_rate, or use "
                        "mixed_precision 'bf16' or 'no', and resume with --resume latest"
                    )
                continue
            nonfinite_in_a_row = 0
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema.update(trained_parameters())
            loss = accelerator.gather(result.loss.detach().reshape(1)).mean().item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if log_file is not None:
                record = {
                    "step": state.step,
                    "loss": loss,
                    "lr": lr_schedule.get_last_lr()[0],
                    "elapsed_s": round(time.perf_counter() - started, 3),
                    "nonfinite_skipped": state.nonfinite_skipped,
                    **({"decoder_mse": decoder_mse.item()} if t.train_vae_decoder else {}),
                    "loss_by_t": loss_by_timestep_bucket(
                        result.per_sample, result.t, pipe.schedule.num_train_timesteps
                    ),
                }
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                for name in ("loss", "lr", "nonfinite_skipped"):
                    board.add_scalar(name, record[name], state.step)
                for bucket, value in record["loss_by_t"].items():
                    board.add_scalar(f"loss_by_t/{bucket}", value, state.step)
            if (
                state.step % t.checkpoint_every == 0
                or state.step == t.max_steps
                or stop["signal"] is not None
            ):
                write_checkpoint()
            if config.validation.prompts and state.step % config.validation.every == 0 and main:
                grid = _validate(
                    pipe,
                    accelerator.unwrap_model(unet),
                    trained_parameters(),
                    ema,
                    config,
                    out / "validation" / f"step-{state.step}.png",
                )
                board.add_image("validation", np.asarray(grid), state.step, dataformats="HWC")
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
            board.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop["signal"] is not None:
        logger.warning(
            "stopped by signal %d at step %d; resume with --resume latest",
            stop["signal"],
            state.step,
        )
        return out / "checkpoints"

    # 6. Export the EMA weights (or the raw ones) as a pipeline folder.
    accelerator.wait_for_everyone()
    final = out / "model"
    if main:
        trained = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trained_parameters())
        LatentDiffusionPipeline(
            trained.eval(), pipe.vae, pipe.text_encoder, pipe.scheduler, name=out.name
        ).save_pretrained(final)
    return final


@torch.no_grad()
def _validate(
    pipe: LatentDiffusionPipeline,
    unet: UNet,
    parameters: list[torch.nn.Parameter],
    ema: EMA | None,
    config: TrainConfig,
    path: Path,
) -> Image.Image:
    """Images from the fixed validation prompts and seeds, with the EMA weights of the trained
    ``parameters``, as one grid (saved to ``path`` and returned)."""
    v = config.validation
    backup = [p.detach().clone() for p in parameters] if ema is not None else None
    if ema is not None:
        ema.copy_to(parameters)
    unet.eval()
    try:
        viewer = LatentDiffusionPipeline(
            unet, pipe.vae, pipe.text_encoder, pipe.scheduler, name=pipe.name
        )
        images = []
        for prompt in v.prompts:
            result = viewer(
                prompt,
                num_images_per_prompt=len(v.seeds),
                seed=v.seeds,
                num_inference_steps=v.num_inference_steps,
                guidance_scale=v.guidance_scale,
                progress=False,
            )
            images += result.images
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = make_grid(images, cols=len(v.seeds))
        grid.save(path)
        return grid
    finally:
        if backup is not None:
            for p, b in zip(parameters, backup, strict=True):
                p.copy_(b)
        unet.train().requires_grad_(True)  # the pipeline froze it for inference
        for p in parameters:  # and the parts fine-tuned with it
            p.requires_grad_(True)
