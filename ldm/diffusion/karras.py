"""Samplers in sigma space: Euler, Euler ancestral and Heun (Karras et al. 2022).

Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", write a diffusion model as x = x0 + sigma eps, with the denoiser D(x; sigma) = x0_pred
and the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (their eq. 4 with
sigma(t) = t, s(t) = 1). A model trained on x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
is such a denoiser after two changes of variable (their table 1, "VP"): x = x_t / sqrt(alpha_bar),
sigma = sqrt((1 - alpha_bar) / alpha_bar). `SigmaSpace` makes them, once, for every sampler
here and in `ldm.diffusion.multistep`.

Every sampler takes standard normal x_T, as DDIM does, and scales it to the first noise level
itself: x = x_T sqrt(sigma_0^2 + 1), the same point DDIM starts from. With ``start_step`` > 0
(image-to-image) x_T is a sample at the level of that step, as `ldm.diffusion.registry.img2img_start`
makes it. The noise levels are `ldm.diffusion.schedule.sigma_steps`'s.
"""

from __future__ import annotations

from torch import Tensor

from ldm.config.names import SigmaScheduleName, TimestepSpacing
from ldm.diffusion.samplers import (
    Generators,
    ModelFn,
    check_start_step,
    on_sample,
    randn_like,
    step_range,
)
from ldm.diffusion.schedule import NoiseSchedule, model_timesteps, sigma_steps, split_prediction


class SigmaSpace:
    """A model callable seen as a denoiser D(x; sigma_j) on a grid of noise levels sigma_j.

    ``sigmas`` (N+1,) and ``timesteps`` (N,) are float64 from `sigma_steps`. The coefficients
    are cast once to the sample's dtype and device; nothing is read back to the host.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: NoiseSchedule,
        sigmas: Tensor,
        timesteps: Tensor,
        like: Tensor,
    ) -> None:
        self.model_fn, self.prediction_type = model_fn, schedule.prediction_type
        c_in = 1 / (sigmas**2 + 1).sqrt()  # sqrt(alpha_bar) of each level
        self.c_in, self.c_noise = on_sample(c_in, like), on_sample(sigmas * c_in, like)
        self.t = model_timesteps(timesteps).to(like.device)  # (N,)
        self.sigmas64 = sigmas  # host copy, for coefficients computed before a loop
        self.sigma = on_sample(sigmas, like)

    def start(self, x_T: Tensor, j: int) -> Tensor:
        """x_T (a sample of the VP process at level j) in sigma space: x_T / sqrt(alpha_bar)."""
        return x_T / self.c_in[j]

    def denoise(self, x: Tensor, j: int) -> Tensor:
        """D(x; sigma_j): one model call at x_t = x sqrt(alpha_bar_j) and timestep t_j."""
        x_t = x * self.c_in[j]
        pred = self.model_fn(x_t, self.t[j].expand(x.shape[0]))
        x0, _ = split_prediction(pred, x_t, self.c_in[j], self.c_noise[j], self.prediction_type)
        return x0


def start_in_sigma_space(
    model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step, multistep=False
) -> tuple[SigmaSpace, Tensor]:
    """The denoiser on `sigma_steps`'s grid, and x_T scaled to the level of ``start_step``."""
    levels, timesteps = sigma_steps(schedule, num_steps, sigmas, multistep=multistep, **spacing)
    check_start_step(start_step, num_steps)
    space = SigmaSpace(model_fn, schedule, levels, timesteps, x_T)
    return space, space.start(x_T, start_step)


def sample_euler(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    num_steps: int,
    *,
    generator: Generators = None,
    sigmas: SigmaScheduleName | Tensor = "default",
    progress: bool = False,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    start_step: int = 0,
) -> Tensor:
    """Euler's method for the probability-flow ODE (Karras et al. 2022, Algorithm 1 without
    its second-order correction, lines 6-8): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i with
    d_i = (x_i - D(x_i; sigma_i)) / sigma_i, eq. (4). One model call per step. On the same
    timesteps it is DDIM (Song et al. 2021, eq. 13) in these variables. ``generator`` is
    not used (the sampler is deterministic)."""
    spacing = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    space, x = start_in_sigma_space(model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step)
    for i in step_range(start_step, num_steps, progress, "Euler"):
        d = (x - space.denoise(x, i)) / space.sigma[i]
        x = x + (space.sigma[i + 1] - space.sigma[i]) * d
    return x


def sample_euler_ancestral(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    num_steps: int,
    *,
    generator: Generators = None,
    sigmas: SigmaScheduleName | Tensor = "default",
    progress: bool = False,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    start_step: int = 0,
) -> Tensor:
    """Euler ancestral ("Euler a"): an Euler step down to sigma_down, then fresh noise up to
    sigma_{i+1}, with sigma_up^2 = sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2 and
    sigma_down^2 = sigma_{i+1}^2 - sigma_up^2 (Crowson's k-diffusion ``sample_euler_ancestral``).
    That split is DDIM's eq. (16) at eta = 1 in sigma space, so each step draws from the DDPM
    posterior (Ho et al. 2020, eq. 7) given x0_pred. One model call and one draw per step,
    from ``generator`` (one per image, or a list of them)."""
    spacing = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    space, x = start_in_sigma_space(model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step)
    s, s_next = space.sigmas64[:-1], space.sigmas64[1:]
    sigma_up = (s_next**2 * (s**2 - s_next**2) / s**2).clamp(min=0).sqrt()
    sigma_down = (s_next**2 - sigma_up**2).clamp(min=0).sqrt()
    adds_noise = (sigma_up > 0).tolist()  # host-side, before the loop
    sigma_up, sigma_down = on_sample(sigma_up, x), on_sample(sigma_down, x)
    for i in step_range(start_step, num_steps, progress, "Euler a"):
        d = (x - space.denoise(x, i)) / space.sigma[i]
        x = x + (sigma_down[i] - space.sigma[i]) * d
        if adds_noise[i]:
            x = x + sigma_up[i] * randn_like(x, generator)
    return x


def sample_heun(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    num_steps: int,
    *,
    generator: Generators = None,
    sigmas: SigmaScheduleName | Tensor = "default",
    progress: bool = False,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    start_step: int = 0,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1): an Euler step to
    sigma_{i+1}, then the average of the slopes at both ends, d_i and
    d'_i = (x'_{i+1} - D(x'_{i+1}; sigma_{i+1})) / sigma_{i+1}. The step to sigma = 0 is
    Euler's. So N steps make 2N - 1 model calls. ``generator`` is not used."""
    spacing = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    space, x = start_in_sigma_space(model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step)
    corrects = (space.sigmas64[1:] > 0).tolist()  # host-side: no correction at sigma = 0
    for i in step_range(start_step, num_steps, progress, "Heun"):
        dt = space.sigma[i + 1] - space.sigma[i]
        d = (x - space.denoise(x, i)) / space.sigma[i]
        x_euler = x + dt * d
        if not corrects[i]:
            x = x_euler
            continue
        d_next = (x_euler - space.denoise(x_euler, i + 1)) / space.sigma[i + 1]
        x = x + dt * (d + d_next) / 2  # Algorithm 1, line 8
    return x
