"""The sigma-space samplers against diffusers' schedulers: step for step on a toy model, and as
whole pipelines on tiny components (images within 1/255)."""

import itertools

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
    return cls.from_config(
        config, **kwargs, **({"use_karras_sigmas": True} if sigmas == "karras" else {})
    )


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
    expected = diffusers_loop(
        diffusers_scheduler(name, sigmas, cfg.to_dict()), x_T, num_steps, generators(2)
    )
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
    result = ours(
        PROMPTS, generator=generators(2), sampler=name, sigmas=sigmas, progress=False, **common
    )
    assert expected.std() > 0.05  # a real image, not a constant
    np.testing.assert_allclose(result.images, expected, rtol=0, atol=ONE_LEVEL)
    assert [(p["sampler"], p["sigmas"]) for p in result.parameters] == [(name, sigmas)] * 2


# ----------------------------------------------------------------------------- closed forms

MU, SD = 0.5, 0.8  # the data: N(MU, SD^2) per element
SIGMA_MAX, SIGMA_MIN = 10.0, 0.05


def exact_output(x_T):
    """What an exact solver returns on Gaussian data: the probability-flow ODE's solution in
    sigma space, x(s) - MU = (x(s_max) - MU) sqrt(SD^2 + s^2) / sqrt(SD^2 + s_max^2), taken to
    SIGMA_MIN, then the last step's D(x; SIGMA_MIN) (every sampler's step to sigma = 0)."""
    x = x_T * (SIGMA_MAX**2 + 1) ** 0.5
    x = MU + (x - MU) * ((SD**2 + SIGMA_MIN**2) / (SD**2 + SIGMA_MAX**2)) ** 0.5
    return MU + SD**2 / (SD**2 + SIGMA_MIN**2) * (x - MU)


def solver_error(name, num_steps):
    from ldm import gaussian_model_fn
    from ldm.diffusion.schedule import karras_sigmas

    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    x_T = torch.randn(2000, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.cat([karras_sigmas(SIGMA_MAX, SIGMA_MIN, num_steps), torch.zeros(1).double()])
    x = SAMPLERS[name](gaussian_model_fn(schedule, MU, SD), schedule, x_T, num_steps, sigmas=sigmas)
    return ((x - exact_output(x_T)).pow(2).mean().sqrt() / SD).item()


@pytest.mark.parametrize(
    "name,low,high",
    # measured ratios err(N) / err(2N) at N = 16 -> 32 -> 64 (2026-12-02):
    # euler 2.02, 2.01 (first order); heun 4.42, 4.20; dpmpp_2m 4.42, 4.24 (second order);
    # unipc 9.17, 8.55: its corrector raises the order by one (Zhao et al. 2023, Theorem 3.3)
    [("euler", 1.8, 2.3), ("heun", 3.6, 5.0), ("dpmpp_2m", 3.6, 5.0), ("unipc", 7.0, 10.0)],
)
def test_error_against_the_exact_ode_solution_falls_at_the_solvers_order(name, low, high):
    errors = [solver_error(name, n) for n in (16, 32, 64)]
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(low <= r <= high for r in ratios), (errors, ratios)
    assert errors[-1] < 0.03


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "unipc"])
def test_deterministic_samplers_moments_converge_to_the_datas(name):
    from ldm import gaussian_model_fn
    from ldm.diffusion.analytic import MomentErrors

    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    fn = gaussian_model_fn(schedule, MU, SD)
    x_T = torch.randn(20000, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = [
        MomentErrors.of(
            SAMPLERS[name](fn, schedule, x_T, n, sigmas="karras", timestep_spacing="trailing"),
            MU,
            SD,
        )
        for n in (5, 20, 80)
    ]
    spread = [abs(e.std) for e in errors]
    assert spread[0] > spread[1] > spread[2] and spread[2] < 0.04, errors  # euler: 0.035
    assert max(e.mean for e in errors[1:]) < 0.01, errors


# ----------------------------------------------------------------------------- names, img2img


def test_names_people_type_resolve_to_a_sampler_and_its_schedule():
    from ldm.config.names import a1111_name
    from ldm.diffusion.registry import resolve_sampler

    assert resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert resolve_sampler("dpm++ 2m  sde exponential") == ("dpmpp_2m_sde", "exponential")
    assert resolve_sampler("Euler a") == ("euler_a", "default")
    assert resolve_sampler("UniPC", "karras") == ("unipc", "karras")
    assert resolve_sampler("DDIM") == ("ddim", "default")
    assert a1111_name("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")
    assert a1111_name("ddim", "default") == ("DDIM", None)
    with pytest.raises(ValueError, match=r"unknown sampler 'Euler b'; allowed: ddim, ddpm, euler"):
        resolve_sampler("Euler b")
    with pytest.raises(ValueError, match="names the karras schedule, but sigmas='exponential'"):
        resolve_sampler("DPM++ 2M Karras", "exponential")
    with pytest.raises(ValueError, match="unknown sigmas 'polyexponential'"):
        resolve_sampler("euler", "polyexponential")


def test_timestep_samplers_refuse_sigma_schedules():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="the ddim sampler visits the timesteps of its spacing"):
        SAMPLERS["ddim"](toy_model, schedule, torch.zeros(1, 4), 5, sigmas="karras")


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "unipc"])
def test_img2img_starts_at_the_samplers_own_level(name):
    from ldm.diffusion.registry import img2img_start
    from ldm.diffusion.schedule import sigma_steps

    schedule = NoiseSchedule()
    x0, noise = (
        torch.full((2, 4), 0.3),
        torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),
    )
    kwargs = dict(sampler=name, sigmas="karras")
    x, start = img2img_start(schedule, x0, noise, 10, 0.0, **kwargs)
    assert start == 10 and torch.equal(x, x0)
    assert torch.equal(
        SAMPLERS[name](toy_model, schedule, x, 10, sigmas="karras", start_step=start), x0
    )
    x, start = img2img_start(schedule, x0, noise, 10, 1.0, **kwargs)
    assert start == 0 and torch.equal(x, noise)
    x, start = img2img_start(schedule, x0, noise, 10, 0.3, **kwargs)
    sigma = sigma_steps(schedule, 10, "karras", multistep=name == "unipc" or name == "dpmpp_2m")[0][
        7
    ]
    a = 1 / (1 + sigma**2)
    assert start == 7
    torch.testing.assert_close(x, (a.sqrt() * x0 + (1 - a).sqrt() * noise).float())
    out = SAMPLERS[name](toy_model, schedule, x, 10, sigmas="karras", start_step=start)
    assert torch.isfinite(out).all() and not torch.equal(out, x)
