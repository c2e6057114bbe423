import pytest
import torch

from ldm.diffusion.losses import diffusion_loss, loss_by_timestep_bucket, min_snr_weight
from ldm.diffusion.schedule import NoiseSchedule


def exact_model(schedule, x0):
    """A model that knows x0, so it can return the exact target: loss 0."""

    def fn(x_t, t, context):
        a = schedule.alphas_cumprod64[t].to(x_t.dtype).view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return schedule.target(x0, eps, t)

    return fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_exact_prediction_has_zero_loss_and_zero_has_the_target_power(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    x0 = torch.randn(64, 4, 8, 8, dtype=torch.float64)
    context = torch.zeros(64, 3, 8)
    out = diffusion_loss(
        exact_model(schedule, x0), schedule, x0, context, generator=torch.Generator().manual_seed(0)
    )
    assert out.loss.item() < 1e-18 and out.per_sample.shape == (64,) and out.t.dtype == torch.int64
    # predicting 0: the loss is E||target||^2 = 1 for eps, and 1 for v when x0 ~ N(0, 1) as well
    zero = diffusion_loss(
        lambda x, t, c: torch.zeros_like(x),
        schedule,
        x0,
        context,
        generator=torch.Generator().manual_seed(0),
    )
    assert zero.loss.item() == pytest.approx(1.0, abs=0.05)


def test_same_generator_same_draws_and_loss_equals_the_mse():
    schedule = NoiseSchedule()
    x0 = torch.randn(8, 4, 8, 8)
    fn = lambda x, t, c: 0.5 * x  # noqa: E731
    a = diffusion_loss(
        fn, schedule, x0, torch.zeros(8, 1, 1), generator=torch.Generator().manual_seed(3)
    )
    b = diffusion_loss(
        fn, schedule, x0, torch.zeros(8, 1, 1), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a.t, b.t) and a.loss.item() == b.loss.item()
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = schedule.add_noise(x0, eps, t)
    assert torch.equal(t, a.t)
    torch.testing.assert_close(a.loss, (0.5 * x_t - eps).pow(2).mean())


def test_min_snr_weights_closed_form():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    torch.testing.assert_close(
        min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.05])
    )
    torch.testing.assert_close(
        min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.01 / 1.01, 0.5, 5 / 6, 5 / 101])
    )
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0, got 0"):
        min_snr_weight(snr, 0, "epsilon")
    # in the loss: the weighted mean of the per-sample losses
    schedule = NoiseSchedule()
    x0 = torch.randn(16, 4, 4, 4)
    out = diffusion_loss(
        lambda x, t, c: torch.zeros_like(x),
        schedule,
        x0,
        torch.zeros(16, 1, 1),
        generator=torch.Generator().manual_seed(1),
        min_snr_gamma=5.0,
    )
    weights = min_snr_weight(schedule.snr(out.t), 5.0, "epsilon")
    torch.testing.assert_close(out.loss, (weights * out.per_sample).mean())


def test_noise_offset_shifts_channel_means():
    # eps + offset * n with n of shape (B, C, 1, 1): the per-(sample, channel) mean of the
    # noise gets variance offset^2 on top of 1 / (h w)
    schedule = NoiseSchedule()
    x0 = torch.zeros(2000, 4, 8, 8)
    captured = {}

    def fn(x, t, c):
        captured["eps"] = x  # at x0 = 0, x_t = sqrt(1 - a) eps
        captured["t"] = t
        return torch.zeros_like(x)

    diffusion_loss(
        fn,
        schedule,
        x0,
        torch.zeros(2000, 1, 1),
        generator=torch.Generator().manual_seed(2),
        noise_offset=0.1,
    )
    sqrt_1m_a = (1 - schedule.alphas_cumprod[captured["t"]]).sqrt().view(-1, 1, 1, 1)
    means = (captured["eps"] / sqrt_1m_a).mean(dim=(2, 3))
    assert means.var().item() == pytest.approx(0.1**2 + 1 / 64, rel=0.1)


def test_loss_by_timestep_bucket():
    per_sample = torch.tensor([1.0, 3.0, 5.0, 7.0])
    t = torch.tensor([5, 95, 150, 999])
    assert loss_by_timestep_bucket(per_sample, t, 1000) == {
        "0-99": 2.0,
        "100-199": 5.0,
        "900-999": 7.0,
    }
