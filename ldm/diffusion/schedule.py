"""The forward (noising) process of a discrete-time diffusion model.

Notation (Ho et al. 2020, "DDPM"; Song et al. 2021, "DDIM"; see docs/sampling.md):

    T                    num_train_timesteps; timesteps t are integers in [0, T)
    beta_t               betas[t], variance of the noise added at step t
    alpha_t              1 - beta_t
    alpha_bar_t          alphas_cumprod[t] = prod_{s <= t} alpha_s (DDIM writes it alpha_t)
    SNR(t)               alpha_bar_t / (1 - alpha_bar_t)
    x0, x_t, eps         clean sample, noisy sample, standard Gaussian noise
    v                    sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0 (Salimans & Ho 2022)

The maths runs in float64; the tensors used in training are stored as float32, and the
float64 master copy `alphas_cumprod64` is what samplers build their coefficients from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.config.model import SchedulerConfig
from ldm.config.names import BETA_SCHEDULES, PREDICTION_TYPES, BetaSchedule, PredictionType

SD = SchedulerConfig()  # Stable Diffusion 1.5's schedule: the defaults below


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
