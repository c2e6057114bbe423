"""Samplers against diffusers' schedulers, float64 references and closed forms."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm.diffusion.analytic import MomentErrors, gaussian_model_fn
from ldm.diffusion.registry import SAMPLERS, SIGMA_SAMPLERS, img2img_start
from ldm.diffusion.samplers import (
    guided_eps_fn,
    invert_ddim,
    make_timesteps,
    sample_ddim,
    sample_ddpm,
)
from ldm.diffusion.schedule import NoiseSchedule

SD15 = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
)
MU, SIGMA = 0.5, 0.8


def perturbed_gaussian_fn(schedule: NoiseSchedule):
    """A realistic, nonlinear, timestep-dependent model: the exact Gaussian predictor plus a
    small nonlinear term that mixes channels. Samples stay O(1), as with a trained network."""
    exact = gaussian_model_fn(schedule, MU, SIGMA)
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(123)) * 0.5

    def model_fn(x, t):
        mix = torch.einsum("ij,bjhw->bihw", W.to(x.dtype), x)
        return exact(x, t) + 0.1 * torch.tanh(mix) * torch.cos(t.to(x.dtype) / 300).view(
            -1, 1, 1, 1
        )

    return model_fn


def diffusers_loop(scheduler, model_fn, x_T, generator=None, **step_kwargs):
    x = x_T.clone()
    for t in scheduler.timesteps:
        t_batch = t.expand(x.shape[0])
        x = scheduler.step(
            model_fn(x, t_batch), t, x, generator=generator, **step_kwargs
        ).prev_sample
    return x


@pytest.fixture
def x_T():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_wherever_diffusers_is_in_range(spacing):
    matched = 0
    for n in range(1, 1001):
        ours = make_timesteps(n, 1000, timestep_spacing=spacing, steps_offset=1)
        assert ours.dtype == torch.int64 and ours.shape == (n,)
        assert ours.min() >= 0 and ours.max() <= 999
        assert torch.all(ours[:-1] >= ours[1:]), "timesteps must not increase"
        ref = DDIMScheduler(**SD15, steps_offset=1, timestep_spacing=spacing)
        ref.set_timesteps(n)
        if len(ref.timesteps) != n or ref.timesteps.max() > 999:
            continue
        if (
            spacing == "trailing"
        ):  # exact ties T (N - i) / N = k + 1/2: diffusers' float arange decides
            ties = (2 * 1000 * torch.arange(n, 0, -1)) % (2 * n) == n
            assert torch.equal(ours[~ties], ref.timesteps[~ties]), n
            assert torch.all((ours[ties] - ref.timesteps[ties]).abs() <= 1), n
        else:
            assert torch.equal(ours, ref.timesteps), n
        matched += 1
    # diffusers lists t = 1000 for leading + offset 1 at n = 1000, and n + 1 trailing
    # timesteps for 62 values of n (61, 103, 121, ...); everywhere else we agree
    assert matched == {"leading": 999, "trailing": 938, "linspace": 1000}[spacing]
    assert make_timesteps(1000, 1000, timestep_spacing="leading")[:2].tolist() == [999, 999]
    assert make_timesteps(61, 1000, timestep_spacing="trailing").shape == (61,)


def test_timestep_errors_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match="between 1 and num_train_timesteps=1000, got 0"):
        make_timesteps(0, 1000)
    with pytest.raises(ValueError, match="got 1001"):
        make_timesteps(1001, 1000)
    with pytest.raises(ValueError, match=r"integer, got 2\.5"):
        make_timesteps(2.5, 1000)
    with pytest.raises(ValueError, match=r"'karras'.*leading, trailing, linspace"):
        make_timesteps(10, 1000, timestep_spacing="karras")


# ----------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_sd15(num_steps, eta, x_T):
    schedule = NoiseSchedule()  # SD 1.5 defaults
    model_fn = perturbed_gaussian_fn(schedule)
    ref = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(num_steps)
    # one generator each, seeded alike: both draw one normal per step, in the same order
    expected = diffusers_loop(ref, model_fn, x_T, torch.Generator().manual_seed(7), eta=eta)
    ours = sample_ddim(
        model_fn, schedule, x_T, num_steps, eta=eta, generator=torch.Generator().manual_seed(7)
    )
    assert ours.abs().max() > 0.5  # a real, O(1) sample
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_steps", [10, 25])
def test_ddim_v_prediction_zero_snr_trailing_matches_diffusers(num_steps, x_T):
    # N divides T, so diffusers' "t - T // N" is the next listed timestep (see docs/sampling.md)
    schedule = NoiseSchedule(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    v_fn = gaussian_model_fn(schedule, MU, SIGMA)  # returns v for a v-prediction schedule
    ref = DDIMScheduler(
        **SD15,
        clip_sample=False,
        set_alpha_to_one=False,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    ref.set_timesteps(num_steps)
    expected = diffusers_loop(ref, v_fn, x_T)
    ours = sample_ddim(v_fn, schedule, x_T, num_steps, timestep_spacing="trailing")
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def ddim_reference_float64(model_fn, schedule, x_T, timesteps, final_alpha_bar):
    """DDIM eq. (12), eta = 0, stepping between consecutive listed timesteps, in float64."""
    x = x_T.double()
    a = schedule.alphas_cumprod64
    for i, t in enumerate(timesteps.tolist()):
        a_t = a[t]
        a_prev = (
            a[timesteps[i + 1]]
            if i + 1 < len(timesteps)
            else torch.tensor(final_alpha_bar, dtype=torch.float64)
        )
        eps = model_fn(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@pytest.mark.parametrize(
    ("spacing", "num_steps"),
    [("linspace", 10), ("linspace", 37), ("trailing", 7), ("trailing", 30)],
)
def test_ddim_steps_to_the_next_listed_timestep_where_diffusers_does_not(spacing, num_steps, x_T):
    schedule = NoiseSchedule()
    model_fn = perturbed_gaussian_fn(schedule)
    timesteps = make_timesteps(num_steps, 1000, timestep_spacing=spacing)
    # diffusers' DDIMScheduler.step goes to t - T // N, which is not always the next listed timestep
    assert not torch.equal(timesteps[:-1] - 1000 // num_steps, timesteps[1:])
    reference = ddim_reference_float64(
        model_fn, schedule, x_T, timesteps, schedule.alphas_cumprod64[0].item()
    )
    ours = sample_ddim(model_fn, schedule, x_T, num_steps, timestep_spacing=spacing)
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-5)
    ref = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing)
    ref.set_timesteps(num_steps)
    assert (
        diffusers_loop(ref, model_fn, x_T) - ours
    ).abs().max() > 1e-3  # the documented difference


def test_ddim_set_alpha_to_one_and_clip_sample_match_diffusers(x_T):
    schedule = NoiseSchedule()
    model_fn = perturbed_gaussian_fn(schedule)
    ref = DDIMScheduler(
        **SD15, clip_sample=True, clip_sample_range=0.9, set_alpha_to_one=True, steps_offset=1
    )
    ref.set_timesteps(20)
    expected = diffusers_loop(ref, model_fn, x_T)
    ours = sample_ddim(
        model_fn, schedule, x_T, 20, set_alpha_to_one=True, clip_sample=True, clip_sample_range=0.9
    )
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert ours.abs().max() <= 0.9 + 1e-6  # with alpha_bar = 1 at the end, x = clipped x0_pred


# ----------------------------------------------------------------------------- DDPM


def ddpm_reference_float64(model_fn, schedule, x_T, generator):
    """Ho et al. Algorithm 2 in float64: x_{t-1} = (x_t - beta_t / sqrt(1 - a_t) eps) / sqrt(alpha_t) + sigma_t z,
    sigma_t^2 = beta-tilde_t. Noise is drawn in float32, like the sampler under test."""
    x = x_T.double()
    a = schedule.alphas_cumprod64
    betas = 1 - a / torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    for t in range(999, -1, -1):
        eps = model_fn(x, torch.full((x.shape[0],), t))
        x = (x - betas[t] / (1 - a[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        if t > 0:
            sigma = ((1 - a[t - 1]) / (1 - a[t]) * betas[t]).sqrt()
            x = x + sigma * torch.randn(x.shape, generator=generator).double()
    return x


def test_ddpm_matches_diffusers_and_a_float64_reference(x_T):
    schedule = NoiseSchedule()
    model_fn = perturbed_gaussian_fn(schedule)
    ours = sample_ddpm(model_fn, schedule, x_T, generator=torch.Generator().manual_seed(3))
    ref = DDPMScheduler(**SD15, clip_sample=False)  # fixed_small variance = beta-tilde
    expected = diffusers_loop(ref, model_fn, x_T, torch.Generator().manual_seed(3))
    reference = ddpm_reference_float64(model_fn, schedule, x_T, torch.Generator().manual_seed(3))
    assert ours.abs().max() > 0.5
    torch.testing.assert_close(
        ours, expected, rtol=0, atol=1e-4
    )  # diffusers' coefficients are float32
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("variance_type", "steps_offset"), [("fixed_small", 1), ("fixed_large", 0)]
)
def test_strided_ddpm_matches_diffusers(variance_type, steps_offset, x_T):
    # With fixed_large diffusers adds sqrt(beta_t) noise at the last step whenever that step's
    # t > 0 (t = 1 with offset 1); Algorithm 2 adds none at the last step, nor do we. With
    # offset 0 the last t is 0 and both agree (fixed_small's last variance is 0 either way).
    schedule = NoiseSchedule(prediction_type="v_prediction")
    model_fn = perturbed_gaussian_fn(schedule)  # any smooth function will do as a v-predictor here
    ref = DDPMScheduler(
        **SD15,
        clip_sample=False,
        steps_offset=steps_offset,
        prediction_type="v_prediction",
        variance_type=variance_type,
    )
    ref.set_timesteps(50)
    expected = diffusers_loop(ref, model_fn, x_T, torch.Generator().manual_seed(4))
    ours = sample_ddpm(
        model_fn,
        schedule,
        x_T,
        num_steps=50,
        variance_type=variance_type,
        steps_offset=steps_offset,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- robustness


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spacing", "zero_snr"),
    [("leading", False), ("trailing", False), ("linspace", False), ("trailing", True)],
)
def test_every_step_count_gives_finite_output(spacing, zero_snr):
    # DDIM at eta = 1 uses every DDIM coefficient (eta = 0 only drops sigma); DDPM the others.
    # Zero terminal SNR (alpha_bar_{T-1} = 0) is run as it is meant to be: trailing, v-prediction.
    if zero_snr:
        schedule = NoiseSchedule(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    else:
        schedule = NoiseSchedule()
    x_T = torch.randn(1, 3)
    model_fn = lambda x, t: 0.1 * x  # noqa: E731
    for n in range(1, 1001):
        x = sample_ddim(model_fn, schedule, x_T, n, eta=1.0, timestep_spacing=spacing)
        assert torch.isfinite(x).all(), ("ddim", n)
        if not zero_snr:
            x = sample_ddpm(model_fn, schedule, x_T, num_steps=n, timestep_spacing=spacing)
            assert torch.isfinite(x).all(), ("ddpm", n)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "invert"])
def test_loops_never_read_tensors_back_to_the_host(sampler):
    # on the meta device, .item(), bool(tensor) or .tolist() raise: the loops must not call them
    schedule = NoiseSchedule()
    x_T = torch.empty(2, 4, 8, 8, device="meta")
    generator = torch.Generator().manual_seed(0)  # CPU generator: noise drawn on CPU, moved over
    model_fn = lambda x, t: torch.tanh(x) * t.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
    if sampler == "ddim":
        out = sample_ddim(
            model_fn, schedule, x_T, 20, eta=1.0, generator=generator, clip_sample=True
        )
    elif sampler == "ddpm":
        out = sample_ddpm(
            model_fn, schedule, x_T, num_steps=20, generator=generator, clip_sample=True
        )
    else:
        out = invert_ddim(model_fn, schedule, x_T, 20, fixed_point_iters=1)
    assert out.device.type == "meta" and out.shape == x_T.shape


@pytest.mark.parametrize("sigmas", ["default", "karras"])
@pytest.mark.parametrize("sampler", sorted(SIGMA_SAMPLERS))
def test_sigma_sampler_loops_never_read_tensors_back_to_the_host(sampler, sigmas):
    # their noise levels and coefficients are computed on the host before the loop
    x_T = torch.empty(2, 4, 8, 8, device="meta")
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    model_fn = lambda x, t: torch.tanh(x) * t.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
    out = SAMPLERS[sampler](model_fn, NoiseSchedule(), x_T, 8, generator=generators, sigmas=sigmas)
    assert out.device.type == "meta" and out.shape == x_T.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loops_do_not_synchronise_on_cuda():
    schedule = NoiseSchedule()
    x_T = torch.randn(2, 4, 8, 8, device="cuda")
    model_fn = lambda x, t: torch.tanh(x)  # noqa: E731
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_ddim(model_fn, schedule, x_T, 10, eta=1.0)
        sample_ddpm(model_fn, schedule, x_T, num_steps=10)
        for name in SIGMA_SAMPLERS:
            SAMPLERS[name](model_fn, schedule, x_T, 10, sigmas="karras")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_same_generator_seed_same_sample_and_sampler_argument_errors(x_T):
    schedule = NoiseSchedule()
    fn = perturbed_gaussian_fn(schedule)
    a = sample_ddpm(fn, schedule, x_T, num_steps=20, generator=torch.Generator().manual_seed(9))
    b = sample_ddpm(fn, schedule, x_T, num_steps=20, generator=torch.Generator().manual_seed(9))
    c = sample_ddpm(fn, schedule, x_T, num_steps=20, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    for bad_eta in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0, got {bad_eta}"):
            sample_ddim(fn, schedule, x_T, 10, eta=bad_eta)
    with pytest.raises(ValueError, match=r"'learned'.*fixed_small, fixed_large"):
        sample_ddpm(fn, schedule, x_T, variance_type="learned")
    with pytest.raises(ValueError, match="start_step must be between 0 and num_steps=10, got 11"):
        sample_ddim(fn, schedule, x_T, 10, start_step=11)


# ----------------------------------------------------------------------------- exact Gaussian data


def moments(x):
    errors = MomentErrors.of(x, MU, SIGMA)
    return errors.mean, abs(errors.std)


@pytest.fixture(scope="module")
def gaussian_setup():
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    x_T = torch.randn(2000, 100, generator=torch.Generator().manual_seed(0))  # 200,000 samples
    return schedule, gaussian_model_fn(schedule, MU, SIGMA), x_T


def test_ddpm_1000_steps_samples_the_gaussian(gaussian_setup):
    schedule, model_fn, x_T = gaussian_setup
    mean_err, std_err = moments(
        sample_ddpm(model_fn, schedule, x_T, generator=torch.Generator().manual_seed(1))
    )
    assert mean_err <= 0.02 and std_err <= 0.02, (mean_err, std_err)


@pytest.mark.parametrize(("eta", "tol"), [(0.0, 0.02), (1.0, 0.04)])
def test_ddim_500_steps_samples_the_gaussian(gaussian_setup, eta, tol):
    schedule, model_fn, x_T = gaussian_setup
    x = sample_ddim(
        model_fn, schedule, x_T, 500, eta=eta, generator=torch.Generator().manual_seed(2)
    )
    mean_err, std_err = moments(x)
    assert mean_err <= tol and std_err <= tol, (mean_err, std_err)


def test_few_step_ddim_shrinks_the_spread_at_first_order(gaussian_setup):
    # docs/sampling.md: each DDIM step follows the tangent of a convex trajectory, so a sample
    # lands too close to the mean; the error is first order, about halving as N doubles.
    schedule, model_fn, x_T = gaussian_setup
    deficit = {}
    for n in (10, 20, 40, 500):
        x = sample_ddim(model_fn, schedule, x_T, n, timestep_spacing="trailing")
        deficit[n] = 1 - x.std().item() / SIGMA
        assert moments(x)[0] <= 0.02  # the mean stays put
    assert 0.15 <= deficit[10] <= 0.22, deficit  # measured: 0.187
    assert 1.8 <= deficit[10] / deficit[20] <= 2.2 and 1.8 <= deficit[20] / deficit[40] <= 2.2, (
        deficit
    )
    assert deficit[500] <= 0.01, deficit


# ----------------------------------------------------------------------------- guidance


class CountingModel:
    def __init__(self):
        self.batches = []
        self.W = torch.randn(8, 4)

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        return torch.tanh(
            x + (context.mean(1) @ self.W).view(-1, 4, 1, 1) + t.view(-1, 1, 1, 1) / 1000
        )


def test_guidance_scale_one_is_one_conditional_call():
    model = CountingModel()
    x, t = torch.randn(3, 4, 5, 5), torch.tensor([10, 10, 10])
    context, uncond = torch.randn(3, 7, 8), torch.randn(1, 7, 8)
    out = guided_eps_fn(model, context, uncond, 1.0)(x, t)
    assert model.batches == [3]
    assert torch.equal(out, model(x, t, context))


def test_guidance_is_one_batched_call_and_the_formula():
    model = CountingModel()
    x, t = torch.randn(3, 4, 5, 5), torch.tensor([500, 500, 500])
    context, uncond = torch.randn(3, 7, 8), torch.randn(1, 7, 8)
    out = guided_eps_fn(model, context, uncond, 7.5)(x, t)
    assert model.batches == [6]
    eps_c, eps_u = model(x, t, context), model(x, t, uncond.expand(3, -1, -1))
    torch.testing.assert_close(out, eps_u + 7.5 * (eps_c - eps_u), rtol=0, atol=1e-6)


def test_guidance_argument_errors():
    model = CountingModel()
    with pytest.raises(ValueError, match="needs uncond_context"):
        guided_eps_fn(model, torch.randn(2, 7, 8), None, 3.0)
    with pytest.raises(
        ValueError,
        match=r"uncond_context shape \(3, 7, 8\) does not match context shape \(2, 7, 8\)",
    ):
        guided_eps_fn(model, torch.randn(2, 7, 8), torch.randn(3, 7, 8), 3.0)


# ----------------------------------------------------------------------------- img2img


def test_img2img_start_points():
    schedule = NoiseSchedule()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x, start = img2img_start(schedule, x0, noise, 10, 1.0)
    assert start == 0 and x is noise  # pure noise, not q(x_981 | x0)
    x, start = img2img_start(schedule, x0, noise, 10, 0.0)
    assert start == 10 and x is x0
    assert torch.equal(sample_ddim(lambda x, t: x, schedule, x, 10, start_step=start), x0)
    x, start = img2img_start(schedule, x0, noise, 10, 0.3)
    t = make_timesteps(10, 1000)[7]
    assert start == 7 and t == 201
    torch.testing.assert_close(x, schedule.add_noise(x0, noise, t.expand(2)))
    assert (
        img2img_start(schedule, x0, noise, 10, 0.25)[1] == 7
    )  # round(2.5) = 3 steps: halves round up
    assert img2img_start(schedule, x0, noise, 50, 0.8)[1] == 10
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength must be in"):
            img2img_start(schedule, x0, noise, 10, bad)


def test_img2img_stays_closer_to_the_input_at_lower_strength(gaussian_setup):
    schedule, model_fn, _ = gaussian_setup
    g = torch.Generator().manual_seed(5)
    x0 = MU + SIGMA * torch.randn(500, 100, generator=g)
    noise = torch.randn(500, 100, generator=g)
    # For Gaussian data the exact DDIM (probability-flow) map from q(x_t | x0) back to t = 0 is
    # x = mu + k (x0 + s eps - mu), s^2 = (1 - a) / a, k = sigma / sqrt(sigma^2 + s^2), so
    # RMS(x - x0) = sqrt(sigma^2 (1 - k)^2 + k^2 s^2); from pure noise (s = 1) x is an
    # independent draw and RMS = sqrt(2) sigma. 50 DDIM steps shrink the spread slightly.
    timesteps = make_timesteps(50, 1000)
    rms, predicted = [], []
    for strength in (0.1, 0.3, 0.6, 1.0):
        x_start, start = img2img_start(schedule, x0, noise, 50, strength)
        x = sample_ddim(model_fn, schedule, x_start, 50, start_step=start)
        rms.append(((x - x0) ** 2).mean().sqrt().item())
        if strength == 1.0:
            predicted.append(SIGMA * 2**0.5)
        else:
            a = schedule.alphas_cumprod64[timesteps[start]].item()
            s2 = (1 - a) / a
            k = SIGMA / (SIGMA**2 + s2) ** 0.5
            predicted.append((SIGMA**2 * (1 - k) ** 2 + k**2 * s2) ** 0.5)
    assert rms == sorted(rms), rms
    np.testing.assert_allclose(rms, predicted, rtol=0.03)  # measured: 0.265, 0.724, ..., 1.11


# ----------------------------------------------------------------------------- inversion


@pytest.mark.parametrize(("num_steps", "tol"), [(50, 0.03), (200, 0.01)])
def test_ddim_inversion_round_trip_sd_schedule(num_steps, tol):
    schedule = NoiseSchedule()  # SD 1.5: scaled_linear, leading, offset 1
    model_fn = gaussian_model_fn(schedule, MU, SIGMA)
    x0 = MU + SIGMA * torch.randn(2000, 100, generator=torch.Generator().manual_seed(6))
    x_T = invert_ddim(model_fn, schedule, x0, num_steps)
    assert abs(x_T.std().item() - 1) < 0.05  # it lands on (nearly) unit-variance noise
    rms = ((sample_ddim(model_fn, schedule, x_T, num_steps) - x0) ** 2).mean().sqrt().item()
    assert rms <= tol, rms  # measured: 0.022 at 50 steps, 0.0058 at 200


@pytest.mark.parametrize(("num_steps", "tol"), [(50, 0.03), (200, 0.01)])
def test_ddim_inversion_round_trip_linear_schedule(num_steps, tol, gaussian_setup):
    schedule, model_fn, _ = gaussian_setup
    x0 = MU + SIGMA * torch.randn(2000, 100, generator=torch.Generator().manual_seed(6))
    errors = []
    for iters in (0, 1):
        x_T = invert_ddim(model_fn, schedule, x0, num_steps, fixed_point_iters=iters)
        errors.append(
            ((sample_ddim(model_fn, schedule, x_T, num_steps) - x0) ** 2).mean().sqrt().item()
        )
    # plain inversion: 0.035 at 50 steps, 0.0091 at 200; one fixed-point iteration: 0.0032, 0.0002
    assert errors[1] <= tol and errors[1] < errors[0] / 5, errors
    assert np.isfinite(errors).all()


def test_per_sample_generators_make_each_sample_reproducible_alone():
    schedule = NoiseSchedule()
    fn = perturbed_gaussian_fn(schedule)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seeds = [10, 11, 12]
    batch = sample_ddpm(
        fn, schedule, x_T, num_steps=20, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    alone = sample_ddpm(
        fn, schedule, x_T[1:2], num_steps=20, generator=[torch.Generator().manual_seed(11)]
    )
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        sample_ddim(fn, schedule, x_T, 5, eta=1.0, generator=[torch.Generator(), torch.Generator()])


def test_samplers_table_holds_every_sampler_name_once():
    from ldm.config.names import SAMPLER_NAMES
    from ldm.diffusion.registry import SAMPLERS

    assert tuple(SAMPLERS) == SAMPLER_NAMES
    assert SAMPLERS["ddim"] is sample_ddim and SAMPLERS["ddpm"] is sample_ddpm
