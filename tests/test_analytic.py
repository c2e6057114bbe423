import pytest
import torch

from ldm.diffusion.analytic import MomentErrors, gaussian_model_fn
from ldm.diffusion.schedule import NoiseSchedule

MU, SIGMA = 0.5, 0.8


@pytest.mark.parametrize("t", [0, 100, 500, 900, 999])
def test_gaussian_eps_is_the_least_squares_predictor(t):
    # regress eps on x_t over 10^6 draws: the fitted line is the exact E[eps | x_t]
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(t)
    x0 = MU + SIGMA * torch.randn(1_000_000, generator=g, dtype=torch.float64)
    eps = torch.randn(1_000_000, generator=g, dtype=torch.float64)
    ts = torch.full((1_000_000,), t)
    x_t = schedule.add_noise(x0, eps, ts)
    design = torch.stack([x_t, torch.ones_like(x_t)], 1)  # (n, 2)
    slope, intercept = torch.linalg.lstsq(design, eps[:, None]).solution[:, 0]
    pred = gaussian_model_fn(schedule, MU, SIGMA)(
        torch.tensor([0.0, 1.0], dtype=torch.float64), ts[:2]
    )
    assert pred[0].item() == pytest.approx(intercept.item(), abs=3e-3)
    assert (pred[1] - pred[0]).item() == pytest.approx(slope.item(), abs=3e-3)


def test_v_prediction_form_gives_the_same_x0_and_eps():
    eps_schedule = NoiseSchedule()
    v_schedule = NoiseSchedule(prediction_type="v_prediction")
    x_t = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 300, 600, 998, 999])
    eps = gaussian_model_fn(eps_schedule, MU, SIGMA)(x_t, t)
    v = gaussian_model_fn(v_schedule, MU, SIGMA)(x_t, t)
    x0_from_eps, _ = eps_schedule.to_x0_eps(eps, x_t, t)
    x0_from_v, eps_from_v = v_schedule.to_x0_eps(v, x_t, t)
    torch.testing.assert_close(eps_from_v, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_from_v, x0_from_eps, rtol=0, atol=1e-10)


def test_moment_errors():
    x = torch.tensor([0.0, 2.0])  # mean 1, std sqrt(2)
    errors = MomentErrors.of(x, mu=0.5, sigma=2.0)
    assert errors.mean == pytest.approx(0.25)
    assert errors.std == pytest.approx(2**0.5 / 2 - 1)
