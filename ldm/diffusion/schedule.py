"""The forward (noising) process of a discrete-time diffusion model.

Notation (Ho et al. 2020, "DDPM"; Song et al. 2021, "DDIM"; see docs/sampling.md):

    T                    num_train_timesteps; timesteps t are integers in [0, T)
    beta_t               betas[t], variance of the noise added at step t
    alpha_t              1 - beta_t
    alpha_bar_t          alphas_cumprod[t] = prod_{s <= t} alpha_s (DDIM writes it alpha_t)
    SNR(t)               alpha_bar_t / (1 - alpha_bar_t)
    x0, x_t, eps         clean sample, noisy sample, standard Gaussian noise
    v                    sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0 (Salimans & Ho 2022)
    sigma_t              sqrt((1 - alpha_bar_t) / alpha_bar_t): the noise level of
                         x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps (Karras et al. 2022, eq. 1 ff.)

The maths runs in float64; the tensors used in training are stored as float32, and the
float64 master copy `alphas_cumprod64` is what samplers build their coefficients from.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ldm.config.model import SchedulerConfig
from ldm.config.names import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    SIGMA_SCHEDULES,
    TIMESTEP_SPACINGS,
    BetaSchedule,
    PredictionType,
    SigmaScheduleName,
    TimestepSpacing,
)

SD = SchedulerConfig()  # Stable Diffusion 1.5's schedule: the defaults below
# In sigma space a zero terminal alpha_bar (sigma = inf) stands in as 2**-24 (sigma = 4096), as
# diffusers' Euler, DPM-Solver and UniPC schedulers set it.
ZERO_SNR_ALPHA_BAR = 2.0**-24
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. (5)


def make_betas(
    kind: BetaSchedule, num_train_timesteps: int, beta_start: float, beta_end: float
) -> Tensor:
    """Return the betas of a named schedule, shape (T,), float64.

    - ``linear``: beta_t evenly spaced from beta_start to beta_end (DDPM section 4).
    - ``scaled_linear``: sqrt(beta_t) evenly spaced (Stable Diffusion: 0.00085 to 0.012).
    - ``cosine`` (diffusers: ``squaredcos_cap_v2``): Nichol & Dhariwal 2021 eq. (17),
      alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), beta_t = 1 - alpha_bar((t+1)/T) /
      alpha_bar(t/T) clipped at 0.999. beta_start and beta_end are not used.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    T = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that alpha_bar at the last step is exactly 0 (SNR(T-1) = 0).

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1: shift sqrt(alpha_bar) so its last value is 0, scale it so its first value
    is unchanged, and convert back to betas.
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def split_prediction(
    pred: Tensor,
    x_t: Tensor,
    sqrt_alpha_bar: Tensor,
    sqrt_one_minus_alpha_bar: Tensor,
    prediction_type: PredictionType,
) -> tuple[Tensor, Tensor]:
    """Turn a network output into the pair (x0_pred, eps_pred).

    ``pred`` and ``x_t`` have the same shape; the two coefficient tensors broadcast against
    it (0-d inside a sampler, (B, 1, ..., 1) in training). For ``epsilon``, DDPM eq. (15):
    x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar). For ``v_prediction``
    (Salimans & Ho 2022, section 4): x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v and
    eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t.
    """
    if prediction_type == "epsilon":
        return (x_t - sqrt_one_minus_alpha_bar * pred) / sqrt_alpha_bar, pred
    if prediction_type == "v_prediction":
        x0 = sqrt_alpha_bar * x_t - sqrt_one_minus_alpha_bar * pred
        eps = sqrt_alpha_bar * pred + sqrt_one_minus_alpha_bar * x_t
        return x0, eps
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}"
    )


class NoiseSchedule:
    """A beta schedule and everything derived from it.

    Args:
        kind: ``linear``, ``scaled_linear`` (Stable Diffusion's) or ``cosine``
            (``squaredcos_cap_v2`` is accepted as diffusers' name for it).
        num_train_timesteps: T, the number of training timesteps.
        beta_start: the first beta of the (scaled) linear schedules.
        beta_end: the last beta of the (scaled) linear schedules.
        rescale_betas_zero_snr: rescale to zero terminal SNR (Lin et al. 2024). The last
            alpha_bar becomes 0, where an eps-prediction cannot be turned into x0, so this
            requires ``prediction_type="v_prediction"``.
        prediction_type: what the network predicts: ``epsilon`` or ``v_prediction``.

    The defaults are Stable Diffusion 1.5's scheduler config.
    """

    def __init__(
        self,
        kind: BetaSchedule = SD.beta_schedule,
        num_train_timesteps: int = SD.num_train_timesteps,
        beta_start: float = SD.beta_start,
        beta_end: float = SD.beta_end,
        *,
        rescale_betas_zero_snr: bool = SD.rescale_betas_zero_snr,
        prediction_type: PredictionType = SD.prediction_type,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}"
            )
        if rescale_betas_zero_snr and prediction_type != "v_prediction":
            raise ValueError(
                "rescale_betas_zero_snr=True sets the last alpha_bar to 0, where an "
                f"{prediction_type!r} prediction cannot be turned into x0; "
                "use prediction_type='v_prediction' (Lin et al. 2024, section 3.2)"
            )
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.kind = "cosine" if kind == "squaredcos_cap_v2" else kind
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.rescale_betas_zero_snr = rescale_betas_zero_snr
        self.prediction_type: PredictionType = prediction_type
        self.alphas_cumprod64 = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64
        self.betas = betas.float()  # (T,)
        self.alphas_cumprod = self.alphas_cumprod64.float()  # (T,)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end}, "
            f"rescale_betas_zero_snr={self.rescale_betas_zero_snr}, "
            f"prediction_type={self.prediction_type!r})"
        )

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) at integer timesteps t of shape (B,),
        shaped (B, 1, ..., 1) to broadcast against ``like`` and in its dtype and device."""
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"timesteps must be an integer tensor, got dtype {t.dtype}")
        alpha_bar = self.alphas_cumprod64.to(t.device)[t]  # (B,)
        shape = (-1,) + (1,) * (like.ndim - 1)
        sqrt_ab = alpha_bar.sqrt().to(like.dtype).view(shape)
        sqrt_1m_ab = (1.0 - alpha_bar).sqrt().to(like.dtype).view(shape)
        return sqrt_ab, sqrt_1m_ab

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x_0) in closed form, DDPM eq. (4):
        x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.

        x0, eps: (B, ...); t: (B,) int64 in [0, T). Returns x_t, (B, ...).
        """
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x0)
        return sqrt_ab * x0 + sqrt_1m_ab * eps

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), shape of t, float32."""
        alpha_bar = self.alphas_cumprod64.to(t.device)[t]
        return (alpha_bar / (1.0 - alpha_bar)).float()

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, eq. 9 ff.)."""
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x0)
        return sqrt_ab * eps - sqrt_1m_ab * x0

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network should output at (x_t, t) for this schedule's prediction type."""
        return eps if self.prediction_type == "epsilon" else self.velocity(x0, eps, t)

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Turn a network output at timesteps t (B,) into (x0_pred, eps_pred)."""
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x_t)
        return split_prediction(pred, x_t, sqrt_ab, sqrt_1m_ab, self.prediction_type)

    # ------------------------------------------------------------------ sigma space

    @property
    def sigmas64(self) -> Tensor:
        """sigma_t at t = 0 ... T-1, float64 (T,), increasing; a zero terminal alpha_bar counts
        as `ZERO_SNR_ALPHA_BAR`."""
        alpha_bar = self.alphas_cumprod64.clone()
        if alpha_bar[-1] == 0:
            alpha_bar[-1] = ZERO_SNR_ALPHA_BAR
        return ((1 - alpha_bar) / alpha_bar).sqrt()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional timestep of each noise level: log sigma interpolated linearly between
        the two training timesteps around it, clamped to [0, T-1] (k-diffusion's and diffusers'
        ``_sigma_to_t``). Exact at the training sigmas; float64, shape of sigma."""
        log_sigmas = self.sigmas64.log()
        log_sigma = sigma.double().clamp(min=1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(
            0, len(log_sigmas) - 2
        )
        w = ((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])).clamp(0, 1)
        return low + w

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The inverse of `sigma_to_t`: sigma at (fractional) timesteps t in [0, T-1], log sigma
        interpolated linearly; float64, shape of t."""
        log_sigmas = self.sigmas64.log()
        t = t.double().clamp(0, len(log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """alpha_bar at timesteps t (B,): indexed for integer t, through `t_to_sigma` for
        fractional t (alpha_bar = 1 / (1 + sigma^2)); float64."""
        if t.dtype in (torch.int32, torch.int64):
            return self.alphas_cumprod64.to(t.device)[t]
        return 1 / (1 + self.t_to_sigma(t.cpu()) ** 2).to(t.device)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. 2022, eq. (5): n noise levels from sigma_max down to sigma_min, evenly
    spaced in sigma^(1/rho); float64 (n,)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def exponential_sigmas(sigma_max: float, sigma_min: float, n: int) -> Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in log sigma (k-diffusion's
    ``get_sigmas_exponential``); float64 (n,)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def sigma_steps(
    schedule: NoiseSchedule,
    num_steps: int,
    sigmas: SigmaScheduleName | Tensor = "default",
    *,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
    multistep: bool = False,
) -> tuple[Tensor, Tensor]:
    """The noise levels a sigma-space sampler steps through and the timesteps its model sees.

    Returns (sigmas (N+1,), timesteps (N,)), float64; the sigmas descend and end at 0. With
    N = num_steps, as diffusers' schedulers build them from a scheduler config:

    - ``default``: sigma at the timesteps of `make_timesteps`. The multistep solvers
      (``multistep=True``: DPM-Solver++, UniPC) space N + 1 timesteps and end at sigma = 0 in
      place of the last one (so at 20 leading steps they start at 941, not 951).
    - ``karras`` (eq. 5, rho = 7) and ``exponential``: N levels between the highest and the
      lowest of those sigmas, or of all training sigmas for the multistep solvers, with the
      timestep of each from `sigma_to_t`. The multistep solvers round it to an integer.
    - a tensor of N + 1 descending sigmas ending at 0: used as given, timesteps unrounded.
    """
    T = schedule.num_train_timesteps
    if isinstance(sigmas, Tensor):
        levels = sigmas.double().cpu()
        if levels.shape != (num_steps + 1,) or levels[-1] != 0 or (levels.diff() >= 0).any():
            raise ValueError(
                f"sigmas must be {num_steps + 1} descending noise levels ending at 0, "
                f"got shape {tuple(levels.shape)}"
            )
        return levels, schedule.sigma_to_t(levels[:-1])
    if sigmas not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigmas {sigmas!r}; allowed: {', '.join(SIGMA_SCHEDULES)}")
    spacing = {"timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    if multistep and timestep_spacing != "trailing":
        timesteps = make_timesteps(num_steps + 1, T, **spacing)[:-1]
    else:
        timesteps = make_timesteps(num_steps, T, **spacing)
    table = schedule.sigmas64
    levels = table[timesteps]
    if sigmas != "default":
        high, low = (table[-1], table[0]) if multistep else (levels[0], levels[-1])
        spaced = karras_sigmas if sigmas == "karras" else exponential_sigmas
        levels = spaced(high.item(), low.item(), num_steps)
        timesteps = schedule.sigma_to_t(levels)
        timesteps = timesteps.round() if multistep else timesteps
    return torch.cat([levels, levels.new_zeros(1)]), timesteps.double()


def make_timesteps(
    num_steps: int,
    num_train_timesteps: int,
    *,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 1,
) -> Tensor:
    """The descending timesteps a sampler visits, shape (num_steps,), int64 in [0, T).

    With N = num_steps and T = num_train_timesteps, as diffusers' schedulers compute them:

    - ``leading``: t_i = i * (T // N) + steps_offset for i = N-1 ... 0 (Stable Diffusion).
    - ``trailing``: t_i = round(T - i * T / N) - 1 for i = 0 ... N-1; starts at T-1
      (Lin et al. 2024, table 2). Computed in exact integers with halves rounded up, where
      diffusers' floating-point ``np.arange`` breaks such ties either way (so it differs by 1
      at a few timesteps) and for 62 values of N <= 1000 (61, 103, ...) returns N + 1.
    - ``linspace``: N values evenly spaced over [0, T-1], rounded.

    ``steps_offset`` applies to ``leading`` only, as in diffusers. Values are clamped to T-1,
    so ``leading`` with an offset and N = T visits 999 twice rather than indexing past the end.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps must be between 1 and num_train_timesteps={num_train_timesteps}, "
            f"got {num_steps}"
        )
    T, N = num_train_timesteps, int(num_steps)
    if timestep_spacing == "leading":
        timesteps = np.arange(N - 1, -1, -1, dtype=np.int64) * (T // N) + steps_offset
    elif timestep_spacing == "trailing":
        # round(T (N - i) / N) - 1 in exact integers, halves rounded up
        timesteps = (2 * T * np.arange(N, 0, -1, dtype=np.int64) + N) // (2 * N) - 1
    elif timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    else:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; allowed: {', '.join(TIMESTEP_SPACINGS)}"
        )
    return torch.from_numpy(np.clip(timesteps, 0, T - 1).copy())


def model_timesteps(timesteps: Tensor) -> Tensor:
    """What a model callable receives for float64 timesteps: int64 where every one is an
    integer (so a table lookup by t is exact), float32 otherwise (as diffusers passes them)."""
    if bool((timesteps == timesteps.round()).all()):
        return timesteps.round().long()
    return timesteps.float()
