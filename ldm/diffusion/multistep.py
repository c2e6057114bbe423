"""Multistep solvers in sigma space: DPM-Solver++ 2M, its SDE variant, and UniPC.

They reuse the denoiser outputs of earlier steps instead of calling the model more than once
per step, so each step costs one model call and is of second order. Written in the variables
of `ldm.diffusion.karras` (x = x0 + sigma eps), with lambda = -log sigma, the half-log-SNR of
Lu et al. 2022 (their lambda_t = log(alpha_t / sigma_t)), and h_i = lambda_{i+1} - lambda_i.

Every step is linear in the sample and the denoiser outputs, x_{i+1} = a_i x_i + b_i D_i +
c_i D_{i-1} (+ n_i z), so the coefficients are computed in float64 before the loop from the
noise levels alone. As in diffusers, the first step run and the step to sigma = 0 are of first
order (``lower_order_final``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.config.names import SigmaScheduleName, TimestepSpacing
from ldm.diffusion.karras import start_in_sigma_space
from ldm.diffusion.samplers import Generators, ModelFn, on_sample, randn_like, step_range
from ldm.diffusion.schedule import NoiseSchedule


def _orders(num_steps: int, start_step: int) -> list[int]:
    """The order of each step: 1 for the first step run and for the last, 2 otherwise."""
    return [1 if i in (start_step, num_steps - 1) else 2 for i in range(num_steps)]


def dpmpp_coefficients(sigmas: Tensor, orders: list[int], *, sde: bool = False):
    """(a, b, c, n), float64 (N,) each, of the DPM-Solver++(2M) step
    x_{i+1} = a_i x_i + b_i D_i + c_i D_{i-1} + n_i z on the noise levels ``sigmas`` (N+1,).

    With ratio = sigma_{i+1} / sigma_i = exp(-h_i) and r_i = h_{i-1} / h_i, Lu et al. 2022,
    Algorithm 2 (the ODE, eq. 9's multistep form): a = ratio, and the weight 1 - ratio goes to
    D_i at first order and to (1 + 1/(2 r)) D_i - 1/(2 r) D_{i-1} at second. The SDE variant
    (``sde``, the solver of their eq. 11 with the second-order midpoint correction, diffusers'
    ``sde-dpmsolver++``): a = ratio^2, weight 1 - ratio^2, and n = sigma_{i+1} sqrt(1 - ratio^2).
    """
    s, s_next = sigmas[:-1], sigmas[1:]
    ratio = s_next / s
    keep = ratio**2 if sde else ratio
    weight = 1 - keep
    h = (s / s_next).log()  # h_i = lambda_{i+1} - lambda_i; inf at the step to sigma = 0
    r = torch.cat([h.new_ones(1), h[:-1] / h[1:]])  # r_i = h_{i-1} / h_i (unused where order 1)
    second = torch.tensor([order == 2 for order in orders])
    b = torch.where(second, weight * (1 + 1 / (2 * r)), weight)
    c = torch.where(second, -weight / (2 * r), torch.zeros_like(weight))
    n = s_next * weight.sqrt() if sde else torch.zeros_like(weight)  # weight = 1 - ratio^2
    return keep, b, c, n


def _sample_dpmpp(
    model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step, generator, progress, sde
):
    space, x = start_in_sigma_space(
        model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step, True
    )
    orders = _orders(num_steps, start_step)
    coefficients = dpmpp_coefficients(space.sigmas64, orders, sde=sde)
    adds_noise = (coefficients[3] > 0).tolist()  # host-side, before the loop
    a, b, c, n = (on_sample(v, x) for v in coefficients)
    previous = None
    for i in step_range(start_step, num_steps, progress, "DPM++ 2M SDE" if sde else "DPM++ 2M"):
        denoised = space.denoise(x, i)
        x = a[i] * x + b[i] * denoised
        if orders[i] == 2:
            x = x + c[i] * previous
        if adds_noise[i]:
            x = x + n[i] * randn_like(x, generator)
        previous = denoised
    return x


def sample_dpmpp_2m(
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
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the data-prediction
    form of the exponentially integrated ODE, eq. (9), with D linearised over lambda from the
    last two denoiser outputs. One model call per step; coefficients in `dpmpp_coefficients`.
    ``generator`` is not used (the sampler is deterministic)."""
    spacing = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    return _sample_dpmpp(
        model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step, None, progress, False
    )


def sample_dpmpp_2m_sde(
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
    """DPM-Solver++(2M) SDE (Lu et al. 2022, eq. 11 and section 4.2; Gonzalez et al.'s
    second-order midpoint form, as in k-diffusion and diffusers): the reverse SDE solved with
    the same linearised D, so each step forgets part of x and draws fresh noise, one draw per
    step from ``generator`` (one per image, or a list of them)."""
    spacing = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    return _sample_dpmpp(
        model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step, generator, progress, True
    )


def unipc_corrector(sigmas: Tensor, i: int, order: int) -> tuple[float, float, float, float]:
    """UniC-p (Zhao et al. 2023, "UniPC", Algorithm 2, B(h) = e^h - 1: "bh2") for the sample at
    step i: x_i^c = a x_{i-1} + b D_i + c D_{i-1} + d D_{i-2}, where D_i is the denoiser at the
    predicted x_i. ``order`` is the order of the predictor step that made x_i. The rhos solve
    eq. (8)'s small linear system with the phi functions of their Appendix, as diffusers does."""
    lam = [-math.log(sigmas[j].item()) for j in range(i - order, i + 1)]
    h = lam[-1] - lam[-2]
    hh = -h  # data prediction
    ratio = sigmas[i].item() / sigmas[i - 1].item()
    h_phi_1 = B_h = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    if order == 1:
        rho = 0.5
        return ratio, -B_h * rho, -h_phi_1 + B_h * rho, 0.0
    rk = (lam[0] - lam[1]) / h
    b1 = h_phi_k / B_h
    b2 = 2 * (h_phi_k / hh - 0.5) / B_h
    rho0, rho1 = torch.linalg.solve(
        torch.tensor([[1.0, 1.0], [rk, 1.0]], dtype=torch.float64),
        torch.tensor([b1, b2], dtype=torch.float64),
    ).tolist()
    return ratio, -B_h * rho1, -h_phi_1 + B_h * rho1 + B_h * rho0 / rk, -B_h * rho0 / rk


def sample_unipc(
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
    """UniPC (Zhao et al. 2023, Algorithm 2 and 3), order 2, bh2, data prediction. UniP, the
    predictor of order 2 with B(h) = e^h - 1, is the DPM-Solver++(2M) step. After each model
    call UniC (`unipc_corrector`) corrects the sample that call was made at, using that call's
    output, and the next predictor starts from the corrected sample: second order at one model
    call per step. ``generator`` is not used (the sampler is deterministic)."""
    spacing = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    space, x = start_in_sigma_space(
        model_fn, schedule, x_T, num_steps, sigmas, spacing, start_step, True
    )
    orders = _orders(num_steps, start_step)
    a, b, c, _ = (on_sample(v, x) for v in dpmpp_coefficients(space.sigmas64, orders))
    corrector = {
        i: [
            on_sample(torch.tensor(v, dtype=torch.float64), x)
            for v in unipc_corrector(space.sigmas64, i, orders[i - 1])
        ]
        for i in range(start_step + 1, num_steps)
    }
    x_last = d_last = d_before = None
    for i in step_range(start_step, num_steps, progress, "UniPC"):
        denoised = space.denoise(x, i)
        if i in corrector:
            ca, cb, cc, cd = corrector[i]
            x = ca * x_last + cb * denoised + cc * d_last
            if orders[i - 1] == 2:
                x = x + cd * d_before
        x_last = x
        x = a[i] * x + b[i] * denoised
        if orders[i] == 2:
            x = x + c[i] * d_last
        d_before, d_last = d_last, denoised
    return x
