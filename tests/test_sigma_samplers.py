"""The sigma-space samplers against diffusers' schedulers: step for step on a toy model, and as
whole pipelines on tiny components (images within 1/255)."""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from ldm import SAMPLERS
from ldm.config import SchedulerConfig
from ldm.diffusion.schedule import NoiseSchedule
from ldm.pipeline import LatentDiffusionPipeline

ONE_LEVEL = 1 / 255 + 1e-6
PROMPTS = ["a large red circle in the center on a blue background", "a small black triangle"]

# ldm's name -> diffusers' scheduler and the arguments that make it that sampler
DIFFUSERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
}
# (sampler, sigmas): diffusers' Euler ancestral has no Karras sigmas
CASES = [(name, "default") for name in DIFFUSERS] + [
    (name, "karras") for name in DIFFUSERS if name != "euler_a"
]
# eps and v prediction with SD's config; v with zero terminal SNR and trailing spacing
CONFIGS = {
    "eps": SchedulerConfig(),
    "v": SchedulerConfig(prediction_type="v_prediction"),
    "v-zsnr": SchedulerConfig(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    ),
}


def diffusers_scheduler(name: str, sigmas: str, config: dict):
    cls, kwargs = DIFFUSERS[name]
    return cls.from_config(config, **kwargs, **({"use_karras_sigmas": True} if sigmas == "karras" else {}))


def toy_model(x, t):
    """A smooth, non-linear stand-in for a network: depends on x and on t."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x + 0.001 * t) + 0.1 * torch.sin(0.01 * t) * x


def generators(n, seed=10):
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def diffusers_loop(scheduler, x_T, num_steps, gens):
    """diffusers' sampling loop, as StableDiffusionPipeline runs it."""
    scheduler.set_timesteps(num_steps)
    x = x_T * scheduler.init_noise_sigma
    stochastic = "generator" in scheduler.step.__code__.co_varnames
    for t in scheduler.timesteps:
        out = toy_model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        x = scheduler.step(out, t, x, **({"generator": gens} if stochastic else {})).prev_sample
    return x


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name,sigmas", CASES)
@pytest.mark.parametrize("num_steps", [7, 20])
def test_each_step_equals_diffusers_scheduler(name, sigmas, config, num_steps):
    cfg = CONFIGS[config]
    if name == "heun" and cfg.rescale_betas_zero_snr:
        pytest.skip("diffusers' HeunDiscreteScheduler ignores rescale_betas_zero_snr")
    schedule = NoiseSchedule(
        cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
    )
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = diffusers_loop(diffusers_scheduler(name, sigmas, cfg.to_dict()), x_T, num_steps, generators(2))
    ours = SAMPLERS[name](
        toy_model, schedule, x_T, num_steps, generator=generators(2), sigmas=sigmas, **cfg.spacing
    )
    scale = expected.abs().max().item()
    assert 0.1 < scale < 100 and torch.isfinite(ours).all()
    # float32 with coefficients in float64 (ours) or float32 (diffusers): a few ulps of the
    # scale; with zero terminal SNR the first state is 4096 x_T, whose ulps are 4096 times larger
    tolerance = 1e-4 if cfg.rescale_betas_zero_snr else 1e-5 * scale
    assert (ours - expected).abs().max().item() <= tolerance


@pytest.fixture(scope="module")
def pipelines(tiny_sd_dir):
    """Ours and diffusers' StableDiffusionPipeline on the same tiny components, per config."""
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    return {
        key: (
            LatentDiffusionPipeline(ours.unet, ours.vae, ours.text_encoder, cfg),
            reference,
            {**reference.scheduler.config, **cfg.to_dict()},
        )
        for key, cfg in CONFIGS.items()
        if key != "v-zsnr"
    }


@pytest.mark.parametrize("config", ["eps", "v"])
@pytest.mark.parametrize("name,sigmas", CASES)
@pytest.mark.parametrize("num_steps", [4, 12])
def test_images_equal_diffusers_pipeline(pipelines, name, sigmas, config, num_steps):
    ours, reference, scheduler_config = pipelines[config]
    reference.scheduler = diffusers_scheduler(name, sigmas, scheduler_config)
    common = dict(num_inference_steps=num_steps, guidance_scale=7.5, output_type="np")
    expected = reference(PROMPTS, generator=generators(2), **common).images
    result = ours(PROMPTS, generator=generators(2), sampler=name, sigmas=sigmas, progress=False, **common)
    assert expected.std() > 0.05  # a real image, not a constant
    np.testing.assert_allclose(result.images, expected, rtol=0, atol=ONE_LEVEL)
    assert [(p["sampler"], p["sigmas"]) for p in result.parameters] == [(name, sigmas)] * 2
