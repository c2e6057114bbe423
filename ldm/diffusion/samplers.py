"""Samplers for the reverse process, written as plain loops over a model callable.

A model callable ``model_fn(x_t, t)`` takes noisy samples x_t (B, ...) and integer
timesteps t (B,) int64 in [0, T), and returns the schedule's prediction type (eps or v) in
the shape of x_t. Classifier-free guidance turns a text-conditioned network into such a
callable: ``guided_eps_fn`` is the only place it is written.

Every coefficient is computed in float64 before the loop, from the schedule's float64
alpha_bar, and moved to the sample's device and dtype once. The loops never read a tensor
back to the host, so a GPU runs them without synchronising.

Equations are cited from Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM); the notation
map is in docs/sampling.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.config.names import SIGMA_SAMPLERS, VARIANCE_TYPES, TimestepSpacing, VarianceType
from ldm.diffusion.schedule import NoiseSchedule, make_timesteps, split_prediction

ModelFn = Callable[[Tensor, Tensor], Tensor]
ConditionalModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _alpha_bars(
    schedule: NoiseSchedule, timesteps: Tensor, final_alpha_bar: float
) -> tuple[Tensor, Tensor]:
    """alpha_bar at each visited timestep and at the one each step goes to, float64 (N,).

    Step i goes from timesteps[i] to timesteps[i + 1]; the last step goes to a virtual
    timestep -1 whose alpha_bar is ``final_alpha_bar``.
    """
    alpha_bar = schedule.alphas_cumprod64[timesteps]  # (N,)
    final = torch.tensor([final_alpha_bar], dtype=torch.float64)
    alpha_bar_prev = torch.cat([alpha_bar[1:], final])  # (N,)
    return alpha_bar, alpha_bar_prev


def check_timestep_sampler(name: str, sigmas) -> None:
    """DDIM and DDPM visit training timesteps: only the spacing's (``sigmas="default"``)."""
    if not (isinstance(sigmas, str) and sigmas == "default"):
        raise ValueError(
            f"the {name} sampler visits the timesteps of its spacing, so sigmas must be "
            f"'default', got {sigmas!r}; Karras or exponential sigmas need a sigma-space "
            f"sampler ({', '.join(SIGMA_SAMPLERS)})"
        )


def check_start_step(start_step: int, num_steps: int) -> None:
    if not 0 <= start_step <= num_steps:
        raise ValueError(
            f"start_step must be between 0 and num_steps={num_steps}, got {start_step}"
        )


Generators = torch.Generator | list[torch.Generator] | None


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like x (B, ...), drawn on the generator's device (as
    diffusers' ``randn_tensor`` does, so that a CPU generator gives the same draws for any
    device). With a list of B generators, sample b is drawn from generator b, so that each
    sample of a batch can be reproduced alone."""
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample"
            )
        return torch.cat([randn_like(x[b : b + 1], g) for b, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return noise.to(x.device)


def step_range(start_step: int, num_steps: int, progress: bool, desc: str):
    return tqdm(range(start_step, num_steps), desc=desc, disable=not progress, leave=False)


def on_sample(values: Tensor, x: Tensor) -> Tensor:
    """float64 coefficients, cast once to the sample's dtype and device."""
    return values.to(device=x.device, dtype=x.dtype)


def _denoise(
    model_fn: ModelFn,
    x: Tensor,
    t: Tensor,
    sqrt_a: Tensor,
    sqrt_1m_a: Tensor,
    schedule: NoiseSchedule,
    clip_range: float | None,
) -> tuple[Tensor, Tensor]:
    """One model call: (x0_pred, eps_pred) at x_t, with x0_pred clamped to +-clip_range if given."""
    x0, eps = split_prediction(model_fn(x, t), x, sqrt_a, sqrt_1m_a, schedule.prediction_type)
    return (x0 if clip_range is None else x0.clamp(-clip_range, clip_range)), eps


# ----------------------------------------------------------------------------- samplers


def sample_ddim(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    num_steps: int,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    sigmas: str = "default",
    progress: bool = False,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    start_step: int = 0,
) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12), from x_T (B, ...) to a sample (B, ...).

    Each step goes from t_i to the next listed timestep t_{i+1}; the last goes to alpha_bar
    = 1 if ``set_alpha_to_one`` else alpha_bar_0. ``eta`` = 0 is deterministic DDIM,
    ``eta`` = 1 is ancestral DDPM-like sampling with sigma from DDIM eq. (16).
    ``clip_sample`` clamps x0_pred to [-clip_sample_range, clip_sample_range] (off for
    latents). ``start_step`` skips the first steps (image-to-image, see ``img2img_start``).
    """
    if not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    check_timestep_sampler("ddim", sigmas)
    timesteps = make_timesteps(
        num_steps,
        schedule.num_train_timesteps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
    )
    check_start_step(start_step, num_steps)
    final = 1.0 if set_alpha_to_one else float(schedule.alphas_cumprod64[0])
    a_t, a_prev = _alpha_bars(schedule, timesteps, final)  # (N,) float64
    # DDIM eq. (16): sigma_t(eta)^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    dir_coef = (1 - a_prev - sigma**2).clamp(min=0).sqrt()  # "direction pointing to x_t"
    sqrt_a, sqrt_1m_a, sqrt_a_prev = a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt()
    sqrt_a, sqrt_1m_a, sqrt_a_prev, dir_coef, sigma = (
        on_sample(c, x_T) for c in (sqrt_a, sqrt_1m_a, sqrt_a_prev, dir_coef, sigma)
    )
    t_all = timesteps.to(x_T.device)
    clip_range = clip_sample_range if clip_sample else None
    x = x_T
    for i in step_range(start_step, num_steps, progress, "DDIM"):
        t = t_all[i].expand(x.shape[0])  # (B,)
        x0, eps = _denoise(model_fn, x, t, sqrt_a[i], sqrt_1m_a[i], schedule, clip_range)
        x = sqrt_a_prev[i] * x0 + dir_coef[i] * eps  # DDIM eq. (12)
        if eta > 0:
            x = x + sigma[i] * randn_like(x, generator)
    return x


def sample_ddpm(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    num_steps: int | None = None,
    *,
    generator: Generators = None,
    sigmas: str = "default",
    progress: bool = False,
    variance_type: VarianceType = "fixed_small",
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    start_step: int = 0,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), from x_T (B, ...) to x_0 (B, ...).

    By default every training timestep t = T-1 ... 0 is visited. With ``num_steps`` the
    timesteps of ``make_timesteps`` are visited instead, each step drawing from the
    posterior q(x_{t_prev} | x_t, x0_pred) between consecutive listed timesteps; the last
    step goes to alpha_bar = 1 and adds no noise. The noise variance is the posterior's
    beta-tilde (``fixed_small``, DDPM eq. 7) or beta (``fixed_large``).
    """
    check_timestep_sampler("ddpm", sigmas)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(
            f"unknown variance_type {variance_type!r}; allowed: {', '.join(VARIANCE_TYPES)}"
        )
    T = schedule.num_train_timesteps
    if num_steps is None:
        num_steps = T
        timesteps = torch.arange(T - 1, -1, -1, dtype=torch.int64)
    else:
        timesteps = make_timesteps(
            num_steps, T, timestep_spacing=timestep_spacing, steps_offset=steps_offset
        )
    check_start_step(start_step, num_steps)
    a_t, a_prev = _alpha_bars(schedule, timesteps, 1.0)  # (N,) float64
    alpha = a_t / a_prev  # alpha_t of the (possibly strided) step
    beta = 1 - alpha
    # DDPM eq. (7): posterior mean = coef_x0 * x0 + coef_xt * x_t, variance beta-tilde
    coef_x0 = a_prev.sqrt() * beta / (1 - a_t)
    coef_xt = alpha.sqrt() * (1 - a_prev) / (1 - a_t)
    variance = (1 - a_prev) / (1 - a_t) * beta if variance_type == "fixed_small" else beta
    adds_noise = ((a_prev < 1.0) & (variance > 0)).tolist()  # host-side, before the loop
    sqrt_a, sqrt_1m_a, coef_x0, coef_xt, std = (
        on_sample(c, x_T) for c in (a_t.sqrt(), (1 - a_t).sqrt(), coef_x0, coef_xt, variance.sqrt())
    )
    t_all = timesteps.to(x_T.device)
    clip_range = clip_sample_range if clip_sample else None
    x = x_T
    for i in step_range(start_step, num_steps, progress, "DDPM"):
        t = t_all[i].expand(x.shape[0])  # (B,)
        x0, _ = _denoise(model_fn, x, t, sqrt_a[i], sqrt_1m_a[i], schedule, clip_range)
        x = coef_x0[i] * x0 + coef_xt[i] * x  # posterior mean, DDPM eq. (7)
        if adds_noise[i]:
            x = x + std[i] * randn_like(x, generator)  # Algorithm 2, line 4
    return x


# ----------------------------------------------------------------------------- guidance


def guided_eps_fn(
    model_fn: ConditionalModelFn,
    context: Tensor,
    uncond_context: Tensor | None,
    guidance_scale: float,
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a model callable.

    ``model_fn(x_t, t, context)`` is a conditional network; ``context`` (B, L, D) is the
    prompt encoding and ``uncond_context`` (B or 1, L, D) the encoding of the empty or
    negative prompt. The returned ``fn(x_t, t)`` computes
    out_u + guidance_scale * (out_c - out_u) with one batched call on [uncond, cond].
    At guidance_scale == 1 that equals out_c, so it makes one unbatched conditional call.
    Guidance is linear, so it is the same whether the network predicts eps or v.
    """
    if guidance_scale == 1:
        return lambda x_t, t: model_fn(x_t, t, context)
    if uncond_context is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs uncond_context (the encoding of the empty "
            "or negative prompt); pass it, or use guidance_scale=1 for no guidance"
        )
    uncond = uncond_context.expand_as(context) if uncond_context.shape[0] == 1 else uncond_context
    if uncond.shape != context.shape:
        raise ValueError(
            f"uncond_context shape {tuple(uncond_context.shape)} does not match context shape "
            f"{tuple(context.shape)} (its batch may be 1 or the same as context's)"
        )
    both_contexts = torch.cat([uncond, context])  # (2B, L, D)

    def fn(x_t: Tensor, t: Tensor) -> Tensor:
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), both_contexts)  # (2B, ...)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return fn


# ----------------------------------------------------------------------------- inversion


def invert_ddim(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    num_steps: int,
    *,
    progress: bool = False,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    fixed_point_iters: int = 0,
) -> Tensor:
    """Deterministic DDIM inversion: run eq. (12) with eta = 0 backwards, x0 -> x_T.

    It visits the timesteps of ``sample_ddim`` in reverse, so that ``sample_ddim`` with the
    same settings and eta = 0 maps the result back to about x0. Going up from the level of
    t_{i+1} to that of t_i it uses eps_pred = model_fn(x, t_i), the noise the sampler will
    predict at t_i, evaluated at the lower-noise x it has: DDIM's ODE form, eq. (13), run
    forwards (Song et al. 2021, section 4.3). The error shrinks as steps get smaller.

    ``fixed_point_iters`` = k > 0 re-evaluates eps_pred at the estimate of x_{t_i} k more
    times per step, which converges to the exact inverse of the sampling step (Pan et al.
    2023, "AIDI") at (k + 1) model calls per step.
    """
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    timesteps = make_timesteps(
        num_steps,
        schedule.num_train_timesteps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
    )
    final = 1.0 if set_alpha_to_one else float(schedule.alphas_cumprod64[0])
    a_t, a_prev = _alpha_bars(schedule, timesteps, final)  # (N,) float64; step i: a_prev -> a_t
    # x_{t} = sqrt(a_t) x0_pred + sqrt(1 - a_t) eps, x0_pred = (x - sqrt(1 - a_prev) eps) / sqrt(a_prev)
    ratio = (a_t / a_prev).sqrt()
    coef_x, coef_eps = ratio, (1 - a_t).sqrt() - ratio * (1 - a_prev).sqrt()
    sqrt_a, sqrt_1m_a, coef_x, coef_eps = (
        on_sample(c, x0) for c in (a_t.sqrt(), (1 - a_t).sqrt(), coef_x, coef_eps)
    )
    t_all = timesteps.to(x0.device)
    x = x0
    for i in tqdm(
        range(num_steps - 1, -1, -1), desc="DDIM inversion", disable=not progress, leave=False
    ):
        t = t_all[i].expand(x.shape[0])  # (B,)
        x_next = x
        for _ in range(1 + fixed_point_iters):
            pred = model_fn(x_next, t)
            _, eps = split_prediction(
                pred, x_next, sqrt_a[i], sqrt_1m_a[i], schedule.prediction_type
            )
            x_next = coef_x[i] * x + coef_eps[i] * eps
        x = x_next
    return x
