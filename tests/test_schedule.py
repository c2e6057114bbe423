import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm.diffusion.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr

SCHEDULES = [
    ("linear", 1e-4, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
]


def diffusers_scheduler(kind: str, beta_start: float, beta_end: float, **kwargs) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=kind,
        beta_start=beta_start,
        beta_end=beta_end,
        **kwargs,
    )


@pytest.mark.parametrize(("kind", "beta_start", "beta_end"), SCHEDULES)
def test_alphas_cumprod_matches_diffusers(kind, beta_start, beta_end):
    ours = NoiseSchedule(kind, 1000, beta_start, beta_end)
    ref = diffusers_scheduler(kind, beta_start, beta_end)
    assert ours.alphas_cumprod.dtype == torch.float32 and ours.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=1e-6)


def test_cosine_is_an_alias_of_squaredcos_cap_v2():
    a = NoiseSchedule("cosine", 1000)
    b = NoiseSchedule("squaredcos_cap_v2", 1000)
    assert a.kind == b.kind == "cosine"
    assert torch.equal(a.alphas_cumprod64, b.alphas_cumprod64)
    # Nichol & Dhariwal eq. (17): betas clipped at 0.999, reached at the very end
    assert a.betas.max().item() == pytest.approx(0.999)


def test_float64_maths_closed_forms():
    T = 1000
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    ours = NoiseSchedule("linear", T, 1e-4, 0.02)
    assert ours.alphas_cumprod64.dtype == torch.float64
    np.testing.assert_allclose(ours.alphas_cumprod64.numpy(), np.cumprod(1 - betas), rtol=1e-13)
    # scaled_linear: sqrt(beta) is evenly spaced from sqrt(0.00085) to sqrt(0.012)
    sqrt_betas = make_betas("scaled_linear", T, 0.00085, 0.012).sqrt().numpy()
    np.testing.assert_allclose(
        np.diff(sqrt_betas), (0.012**0.5 - 0.00085**0.5) / (T - 1), rtol=1e-9
    )
    assert sqrt_betas[0] ** 2 == pytest.approx(0.00085) and sqrt_betas[-1] ** 2 == pytest.approx(
        0.012
    )


@pytest.mark.parametrize(("kind", "beta_start", "beta_end"), SCHEDULES)
def test_zero_terminal_snr_matches_diffusers(kind, beta_start, beta_end):
    ours = NoiseSchedule(
        kind,
        1000,
        beta_start,
        beta_end,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    )
    ref = diffusers_scheduler(kind, beta_start, beta_end, rescale_betas_zero_snr=True)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-6)
    assert ours.alphas_cumprod64[-1].item() == 0.0
    assert ours.snr(torch.tensor([999])).item() == 0.0
    # Lin et al. Algorithm 1 keeps sqrt(alpha_bar_0) and is linear in the old sqrt(alpha_bar)
    plain = NoiseSchedule(kind, 1000, beta_start, beta_end)
    assert ours.alphas_cumprod64[0].item() == pytest.approx(
        plain.alphas_cumprod64[0].item(), rel=1e-12
    )
    betas = make_betas("cosine" if "cos" in kind else kind, 1000, beta_start, beta_end)
    # same algorithm: at the same (float64) precision the betas agree to rounding
    torch.testing.assert_close(
        rescale_zero_terminal_snr(betas), diffusers_rescale(betas), rtol=1e-12, atol=1e-14
    )


def test_zero_terminal_snr_requires_v_prediction():
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule(rescale_betas_zero_snr=True)


def test_bad_arguments_name_the_value_and_the_choices():
    with pytest.raises(
        ValueError, match=r"'quadratic'.*linear, scaled_linear, cosine, squaredcos_cap_v2"
    ):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match=r"'sample'.*epsilon, v_prediction"):
        NoiseSchedule(prediction_type="sample")
    with pytest.raises(ValueError, match="integer tensor"):
        NoiseSchedule().add_noise(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([1.5]))


def test_add_noise_is_the_closed_form_and_matches_diffusers():
    s = NoiseSchedule()
    x0, eps = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    a = s.alphas_cumprod64[t].view(-1, 1, 1, 1)
    expected = (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).float()
    torch.testing.assert_close(s.add_noise(x0, eps, t), expected, rtol=0, atol=1e-6)
    ref = diffusers_scheduler("scaled_linear", 0.00085, 0.012)
    torch.testing.assert_close(
        s.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=0, atol=1e-5
    )


def test_add_noise_moments():
    # q(x_t | x0) = N(sqrt(a) x0, (1 - a) I): check mean and variance on 10^6 draws
    s = NoiseSchedule()
    t = torch.full((1000,), 400)
    x0 = torch.full((1000, 1000), 0.7)
    x_t = s.add_noise(x0, torch.randn(1000, 1000), t)
    a = s.alphas_cumprod64[400].item()
    assert x_t.mean().item() == pytest.approx(a**0.5 * 0.7, abs=3e-3)
    assert x_t.var().item() == pytest.approx(1 - a, rel=5e-3)


def test_snr_and_velocity_match_their_definitions():
    s = NoiseSchedule()
    t = torch.arange(0, 1000, 37)
    a = s.alphas_cumprod64[t]
    torch.testing.assert_close(s.snr(t), (a / (1 - a)).float())
    x0, eps = torch.randn(len(t), 3, 2, 2), torch.randn(len(t), 3, 2, 2)
    ref = diffusers_scheduler("scaled_linear", 0.00085, 0.012)
    torch.testing.assert_close(
        s.velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_conversions_round_trip(prediction_type):
    s = NoiseSchedule("scaled_linear", prediction_type=prediction_type)
    t = torch.tensor([0, 10, 500, 900, 999])
    x0, eps = torch.randn(5, 4, 3, 3).double(), torch.randn(5, 4, 3, 3).double()
    x_t = s.add_noise(x0, eps, t)
    target = s.target(x0, eps, t)
    assert (
        torch.equal(target, eps) if prediction_type == "epsilon" else not torch.equal(target, eps)
    )
    x0_pred, eps_pred = s.to_x0_eps(target, x_t, t)
    torch.testing.assert_close(x0_pred, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_pred, eps, rtol=0, atol=1e-10)


def test_v_prediction_converts_at_zero_terminal_snr():
    s = NoiseSchedule(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    t = torch.tensor([999, 999])
    x0, eps = torch.randn(2, 4), torch.randn(2, 4)
    x_t = s.add_noise(x0, eps, t)
    assert torch.equal(x_t, eps)  # pure noise at the last step
    x0_pred, eps_pred = s.to_x0_eps(s.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_pred, x0)
    torch.testing.assert_close(eps_pred, eps)
