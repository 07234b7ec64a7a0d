"""Tests of ddpm.py, the core: schedules, the forward process, losses, samplers, guidance, inpainting,
likelihoods, the U-Net. CPU only, no downloads.

Run every test file:  python -m pytest -q
Most diffusion checks use data x0 ~ N(mu, sd^2 I), whose noise predictor E[eps | x_t] is known in
closed form, so the samplers can be checked against exact statistics with no training.
"""
import math

import numpy as np
import pytest
import torch

import ddpm

from conftest import gen, run_ddpm_py_alone

MU, SD = 0.3, 0.5


gaussian_oracle = ddpm.gaussian_eps  # the exact eps-predictor of N(mu, sd^2 I) data on any process


def perturbed_unet(scale=0.05, **overrides):
    """A tiny UNet whose zero-initialised layers are given random weights, so it is not eps = 0."""
    torch.manual_seed(0)
    cfg = dict(ddpm.PRESETS["tiny"], image_size=16) | overrides
    model = ddpm.UNet(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, scale)
    return model.eval()

# ----------------------------------------------------------------------------------------------
# schedules


def test_linear_betas_are_float64_and_evenly_spaced():
    b = ddpm.make_betas("linear", 300, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (300,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert torch.allclose(b.diff(), torch.full((299,), (0.02 - 1e-4) / 299, dtype=torch.float64))


def test_cosine_alphas_cumprod_matches_formula():
    T, s = 1000, 0.008
    d = ddpm.Diffusion(ddpm.make_betas("cosine", T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 1, 100, 500, 900):  # code index t is the paper's t + 1; beta clipping only bites at the end
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert ddpm.make_betas("cosine", T).max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alphas_cumprod_T_is_near_zero(schedule):
    d = ddpm.Diffusion(ddpm.make_betas(schedule, 1000))
    assert d.alphas_cumprod[-1].item() < 1e-4
    assert (d.alphas_cumprod.diff() < 0).all()


def test_rescaled_linear_is_linear_stretched_to_T_steps():
    """improved-diffusion's convention: both ends times 1000 / T, so alpha-bar_T stays near Ho et al.'s
    (4e-5 at T = 1000) where plain linear at T = 300 leaves 0.048."""
    assert torch.equal(ddpm.make_betas("rescaled-linear", 1000), ddpm.make_betas("linear", 1000))
    b = ddpm.make_betas("rescaled-linear", 300)
    assert b.dtype == torch.float64 and torch.allclose(b, ddpm.make_betas("linear", 300) * 1000 / 300)
    a_T = {name: torch.prod(1 - ddpm.make_betas(name, 300)).item() for name in ("linear", "rescaled-linear")}
    assert a_T["linear"] == pytest.approx(0.048, abs=0.001) and a_T["rescaled-linear"] < 1e-4
    with pytest.raises(ValueError, match="rescaled-linear needs"):
        ddpm.make_betas("rescaled-linear", 20)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="linear, cosine"):
        ddpm.make_betas("quadratic", 10)


def test_buffers_are_float32_casts_of_float64_math_and_follow_to():
    betas = ddpm.make_betas("linear", 1000)
    d = ddpm.Diffusion(betas)
    ac = torch.cumprod(1 - betas, 0)
    assert d.alphas_cumprod.dtype == torch.float32
    assert torch.equal(d.alphas_cumprod, ac.float())
    assert torch.equal(d.sqrt_one_minus_alphas_cumprod, (1 - ac).sqrt().float())
    names = {n for n, _ in d.named_buffers()}
    assert {"sqrt_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "posterior_mean_coef1", "posterior_mean_coef2"} <= names
    assert all(b.device.type == "meta" for b in d.to("meta").buffers())

# ----------------------------------------------------------------------------------------------
# forward process and posterior


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_matches_iterated_chain(schedule):
    """x_t from the closed form q(x_t | x_0) has the mean and variance of t+1 chained steps
    q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s)."""
    T, n = 200, 200_000
    d = ddpm.Diffusion(ddpm.make_betas(schedule, T))
    x0 = torch.full((n, 1, 1, 1), 0.7)
    x, g = x0.clone(), gen(1)
    for t in range(T):
        x = (1 - d.betas[t]).sqrt() * x + d.betas[t].sqrt() * torch.randn(x.shape, generator=g)
        if t in (0, 20, 100, T - 1):
            closed = d.q_sample(x0, torch.full((n,), t), torch.randn(x0.shape, generator=g))
            a = d.alphas_cumprod[t].item()
            for xs in (x, closed):
                assert xs.mean().item() == pytest.approx(0.7 * math.sqrt(a), abs=5 / math.sqrt(n))
                assert xs.var().item() == pytest.approx(1 - a, rel=0.02, abs=2e-5)


def test_q_sample_is_not_clamped_and_predict_x0_inverts_it():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    x0 = torch.rand(8, 3, 4, 4, generator=gen()) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(1)) * 3
    t = torch.tensor([0, 1, 10, 100, 400, 700, 900, 999])
    xt = d.q_sample(x0, t, noise)
    assert xt.abs().max() > 1  # x_t is not clamped to [-1, 1]: the forward process has no bounds
    assert torch.allclose(d.predict_x0(xt, t, noise), x0, atol=2e-4)


def test_q_posterior_is_bayes_rule_on_gaussians():
    """q(x_{t-1} | x_t, x0) is proportional to N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)
    times N(x_{t-1}; sqrt(a-bar_{t-1}) x0, 1 - a-bar_{t-1}), computed here in float64."""
    betas = ddpm.make_betas("cosine", 500)
    d = ddpm.Diffusion(betas)
    ac = torch.cumprod(1 - betas, 0)
    x0, xt = torch.tensor([[[[0.4]]], [[[-0.9]]], [[[0.1]]]]), torch.tensor([[[[1.3]]], [[[0.2]]], [[[-2.0]]]])
    t = torch.tensor([1, 50, 499])
    mean, var, logvar = d.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        prec = 1 / (1 - ac[ti - 1]) + (1 - betas[ti]) / betas[ti]
        m = (ac[ti - 1].sqrt() * x0[i] / (1 - ac[ti - 1]) + (1 - betas[ti]).sqrt() * xt[i] / betas[ti]) / prec
        assert mean[i].item() == pytest.approx(m.item(), rel=1e-5)
        assert var[i].item() == pytest.approx(1 / prec.item(), rel=1e-5)
        assert logvar[i].item() == pytest.approx(-math.log(prec.item()), rel=1e-5)
    # at t = 0 the posterior is a point mass at x0 and its log-variance is clipped to t = 1's
    mean0, var0, logvar0 = d.q_posterior(x0, xt, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(mean0, x0) and (var0 == 0).all()
    assert torch.allclose(logvar0, d.posterior_variance[1].log().expand(3, 1, 1, 1))


def test_shapes_are_checked_at_the_api():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 10))
    with pytest.raises(ValueError, match="LongTensor"):
        d.q_sample(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        d.loss(lambda x, t: x, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="steps must be in 1..10"):
        d.ddim_sample(lambda x, t: x, (1, 1, 2, 2), steps=11)

# ----------------------------------------------------------------------------------------------
# loss


@pytest.mark.parametrize("loss_type,fn", [("l2", torch.nn.functional.mse_loss),
                                          ("l1", torch.nn.functional.l1_loss),
                                          ("huber", torch.nn.functional.smooth_l1_loss)])
def test_loss_is_the_distance_between_true_and_predicted_noise(loss_type, fn):
    d = ddpm.Diffusion(ddpm.make_betas("linear", 100))
    x0, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 5, 50, 99])
    model = lambda x, t: 2 * x + 0.01 * t[:, None, None, None]
    loss = d.loss(model, x0, loss_type, t=t, noise=noise)
    assert loss.shape == () and loss.item() == pytest.approx(fn(model(d.q_sample(x0, t, noise), t), noise).item())
    with pytest.raises(ValueError, match="l2, l1, huber"):
        d.loss(model, x0, "l3")


def test_l2_loss_of_the_exact_predictor_is_the_posterior_variance_of_eps():
    """For Gaussian data E||eps - E[eps | x_t]||^2 / dim = a sd^2 / (a sd^2 + 1 - a)."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    x0 = MU + SD * torch.randn(20_000, 1, 2, 2, generator=gen())
    for t in (10, 300, 900):
        a = d.alphas_cumprod[t].item()
        loss = d.loss(gaussian_oracle(d), x0, t=torch.full((20_000,), t))
        assert loss.item() == pytest.approx(a * SD ** 2 / (a * SD ** 2 + 1 - a), rel=0.03)

def test_v_prediction_loss_and_its_eps_model():
    """v = alpha eps - sigma x0 (Salimans & Ho): a model returning the true v has loss 0, and
    EpsFromV turns it into the true eps at integer and fractional t."""
    d = ddpm.Diffusion(ddpm.make_betas("cosine", 100))
    x0, noise = torch.rand(4, 1, 8, 8, generator=gen(1)) * 2 - 1, torch.randn(4, 1, 8, 8, generator=gen(2))
    t = torch.tensor([0, 5, 50, 99])
    a, s = d.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1), d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = a * noise - s * x0
    true_v = lambda x, tt: v
    assert d.loss(true_v, x0, t=t, noise=noise, prediction="v").item() < 1e-12
    x_t = d.q_sample(x0, t, noise)
    assert torch.allclose(ddpm.EpsFromV(true_v, d)(x_t, t), noise, atol=1e-5)
    tf = torch.tensor([0.5, 5.25, 49.9, 98.5])  # fractional t: marginal() of the VP SDE
    af, sf = (m.reshape(-1, 1, 1, 1) for m in d.marginal(tf))
    vf, x_tf = af * noise - sf * x0, af * x0 + sf * noise
    assert torch.allclose(ddpm.EpsFromV(lambda x, tt: vf, d)(x_tf, tf), noise, atol=1e-5)
    with pytest.raises(ValueError, match="eps, v, x0, velocity"):
        d.loss(true_v, x0, prediction="score")


@pytest.mark.parametrize("prediction", ddpm.PREDICTIONS)
def test_min_snr_weights_are_min_snr_gamma_times_the_x0_error(prediction):
    """Hang et al.: with weights min(SNR, gamma) / SNR (eps), / (SNR + 1) (v) or / x0_weight for any prediction,
    every sample's loss is min(SNR_t, gamma) ||x0 - x0_hat||^2 for the x0_hat the prediction implies."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    x0, noise = torch.rand(5, 1, 4, 4, generator=gen(1)) * 2 - 1, torch.randn(5, 1, 4, 4, generator=gen(2))
    t = torch.tensor([0, 10, 100, 500, 999])
    model = lambda x, tt: 0.7 * x + 0.1
    per = d.loss(model, x0, t=t, noise=noise, prediction=prediction, min_snr=5.0, reduction="none")
    eps_model = model if prediction == "eps" else ddpm.Predictor(model, d, prediction)
    x_t = d.q_sample(x0, t, noise)
    x0_err = ((d.predict_x0(x_t, t, eps_model(x_t, t)) - x0) ** 2).flatten(1).mean(1)
    snr = (d.alphas_cumprod64[t] / (1 - d.alphas_cumprod64[t])).float()
    assert per.shape == (5,)
    assert torch.allclose(per, snr.clamp(max=5.0) * x0_err, rtol=1e-4)
    assert d.loss(model, x0, t=t, noise=noise, prediction=prediction, min_snr=5.0).item() == \
        pytest.approx(per.mean().item())


# ----------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_with_exact_predictor_samples_the_data_distribution(schedule, variance):
    d = ddpm.Diffusion(ddpm.make_betas(schedule, 1000))
    x = d.ddpm_sample(gaussian_oracle(d), (4096, 1, 4, 4), variance=variance, clip_x0=False, generator=gen())
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(SD, rel=0.02)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_exact_predictor_converges_to_the_data_distribution(schedule):
    """Deterministic DDIM is an ODE solver: its error in the std shrinks as steps grow."""
    d = ddpm.Diffusion(ddpm.make_betas(schedule, 1000))
    mean_err, std_err = [], []
    for steps in (10, 50, 250, 1000):
        x = d.ddim_sample(gaussian_oracle(d), (4096, 1, 4, 4), steps=steps, clip_x0=False, generator=gen(),
                          spacing="leading")
        mean_err.append(abs(x.mean().item() - MU))
        std_err.append(abs(x.std().item() - SD))
    assert std_err == sorted(std_err, reverse=True) and std_err[1] < 0.05 and std_err[-1] < 0.01
    assert mean_err[0] > mean_err[-1] and max(mean_err[2:]) < 0.01


def test_ddim_eta1_with_all_steps_is_ddpm_with_posterior_variance():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 100))
    model = perturbed_unet()
    x_T = torch.randn(2, 3, 16, 16, generator=gen(3))
    for clip in (True, False):
        a = d.ddpm_sample(model, x_T=x_T, variance="posterior", clip_x0=clip, generator=gen(7))
        b = d.ddim_sample(model, x_T=x_T, steps=100, eta=1.0, clip_x0=clip, generator=gen(7))
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_ddim_eta0_is_deterministic_and_generator_independent():
    d = ddpm.Diffusion(ddpm.make_betas("cosine", 200))
    model = perturbed_unet()
    x_T = torch.randn(2, 3, 16, 16, generator=gen())
    a = d.ddim_sample(model, x_T=x_T, steps=20, generator=gen(1))
    b = d.ddim_sample(model, x_T=x_T, steps=20, generator=gen(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_shape_dtype_determinism_and_trajectory(sampler):
    d = ddpm.Diffusion(ddpm.make_betas("linear", 30))
    model, calls = perturbed_unet(in_channels=1), []
    kw = dict(steps=10, eta=0.5) if sampler == "ddim" else {}
    run = getattr(d, f"{sampler}_sample")
    x, traj = run(model, (3, 1, 16, 16), generator=gen(5), return_trajectory=True,
                  progress=lambda i, n: calls.append((i, n)), **kw)
    n = 10 if sampler == "ddim" else 30
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert len(traj) == n + 1 and torch.equal(traj[-1], x) and calls == [(i + 1, n) for i in range(n)]
    assert torch.equal(x, run(model, (3, 1, 16, 16), generator=gen(5), **kw))
    assert not torch.equal(x, run(model, (3, 1, 16, 16), generator=gen(6), **kw))
    assert x.abs().max() <= 1  # clip_x0 and no noise at the last step keep x_0 in [-1, 1]


def test_ddpm_adds_no_noise_at_the_last_step():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 20))
    model = perturbed_unet()
    _, traj = d.ddpm_sample(model, (2, 3, 16, 16), clip_x0=False, generator=gen(), return_trajectory=True)
    x1, t0 = traj[-2], torch.zeros(2, dtype=torch.long)
    with torch.inference_mode():
        assert torch.allclose(traj[-1], d.predict_x0(x1, t0, model(x1, t0)), atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_invert_then_sample_returns_the_image(schedule):
    d = ddpm.Diffusion(ddpm.make_betas(schedule, 1000))
    oracle = gaussian_oracle(d)
    x0 = MU + SD * torch.randn(64, 1, 4, 4, generator=gen())
    errors = []
    for refine in (0, 1, 2):  # on the DDIM paper's sequence, as the README's figures
        x_T = d.ddim_invert(oracle, x0, steps=50, refine=refine, spacing="leading")
        errors.append((d.ddim_sample(oracle, x_T=x_T, steps=50, clip_x0=False, spacing="leading") - x0).abs().max().item())
    assert errors[0] > 10 * errors[1] > 100 * errors[2] and errors[2] < 2e-3
    x_T = d.ddim_invert(oracle, x0, steps=50)  # the default spacing round-trips as well
    assert (d.ddim_sample(oracle, x_T=x_T, steps=50, clip_x0=False) - x0).abs().max() < 2e-3
    # and the other way round: noise -> image -> noise
    x_T = torch.randn(64, 1, 4, 4, generator=gen(1))
    x0 = d.ddim_sample(oracle, x_T=x_T, steps=50, clip_x0=False)
    assert (d.ddim_invert(oracle, x0, steps=50) - x_T).abs().max() < 2e-3


def test_ddim_invert_round_trip_with_a_network():
    """A denoiser-like model: the exact predictor plus a small non-linear, spatially mixing U-Net."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    oracle, net = gaussian_oracle(d, mu=0.0), perturbed_unet(scale=0.01)
    model = lambda x, t: oracle(x, t) + net(x, t)
    x0 = torch.rand(2, 3, 8, 8, generator=gen()) * 2 - 1
    errors = [(d.ddim_sample(model, x_T=d.ddim_invert(model, x0, steps=50, refine=r), steps=50, clip_x0=False)
               - x0).abs().max().item() for r in range(4)]
    assert all(e1 < e0 / 5 for e0, e1 in zip(errors, errors[1:])) and errors[-1] < 1e-3

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_timesteps_are_valid_for_every_step_count_and_spacing(schedule):
    d = ddpm.Diffusion(ddpm.make_betas(schedule, 1000))
    for spacing in ddpm.SPACINGS if schedule == "linear" else ["logsnr"]:  # only logsnr reads the schedule
        for steps in range(1, d.T + 1):
            ts = torch.tensor(d.ddim_timesteps(steps, spacing))
            assert len(ts) == steps and ts[0] >= 0 and ts[-1] <= d.T - 1, (spacing, steps)
            assert (ts.diff() > 0).all() and ts[-1] >= d.T - math.ceil(d.T / steps), (spacing, steps)
    assert d.ddim_timesteps(10, "leading") == list(range(0, 1000, 100))  # the DDIM paper's sequence
    assert d.ddim_timesteps(10, "trailing") == list(range(99, 1000, 100))
    assert d.ddim_timesteps(4, "linspace") == [0, 333, 666, 999]
    assert d.ddim_timesteps(300, "leading")[-1] == 996  # T // steps would have stopped at 897
    if schedule == "linear":  # evenly spaced in lambda (cosine's lambda plunges at t = T-1, where they are pushed apart)
        lam = (0.5 * torch.log(d.alphas_cumprod64 / (1 - d.alphas_cumprod64)))[d.ddim_timesteps(8, "logsnr")]
        assert lam.diff().neg().std() < 0.05 * lam.diff().neg().mean()
    with pytest.raises(ValueError, match="spacing"):
        d.ddim_timesteps(10, "uniform")


def test_dpm_solver_of_order_one_is_ddim():
    d = ddpm.Diffusion(ddpm.make_betas("cosine", 200))
    model, x_T = perturbed_unet(), torch.randn(2, 3, 16, 16, generator=gen())
    for clip in (True, False):
        a = d.dpm_solver_sample(model, x_T=x_T, steps=12, order=1, eta=0.0, clip_x0=clip)
        b = d.ddim_sample(model, x_T=x_T, steps=12, clip_x0=clip)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_sde_dpm_solver_of_order_one_is_ancestral_ddim():
    """SDE-DPM-Solver++ with eta = 1 at order 1 is DDIM with eta = 1, noise draw for noise draw."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 200))
    model, x_T = perturbed_unet(), torch.randn(2, 3, 16, 16, generator=gen())
    for clip in (True, False):
        a = d.dpm_solver_sample(model, x_T=x_T, steps=12, order=1, eta=1.0, clip_x0=clip, generator=gen(5))
        b = d.ddim_sample(model, x_T=x_T, steps=12, eta=1.0, clip_x0=clip, generator=gen(5))
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_dpm_solver_steps_integrate_a_quadratic_x0_exactly(eta):
    """Along the (SDE-)DPM-Solver++ step the data term is alpha_{k+1} times the integral of x0_hat(lambda)
    against the kernel (1 + eta) e^(-(1 + eta)(lambda_{k+1} - lambda)) (Lu et al. 2022b): the first-order
    update is exact for a constant x0_hat and the third-order multistep one for x0_hat quadratic in lambda, on
    an uneven grid (2M's -phi_1 / 2 in place of phi_2 is exact for neither); against the trapezoid rule on
    20,001 points."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    alpha, sigma = d._grid(torch.tensor([999, 700, 520, 300, 180, 90, 40]))
    lam, g = torch.log(alpha / sigma), 1 + eta
    for order, poly in ((1, lambda l: 0.3 + 0 * l), (3, lambda l: 0.3 - 0.7 * l + 0.25 * l ** 2)):
        c, w, s = ddpm.dpm_solver_coefficients(alpha, sigma, order, eta)
        S = len(lam) - 1  # the steps where the order is full: history enough, not among the last (h = inf last)
        for k in range(order - 1, min(S - order + 1, S - 1)):
            u = torch.linspace(lam[k].item(), lam[k + 1].item(), 20_001, dtype=torch.float64)
            exact = alpha[k + 1] * torch.trapezoid(g * torch.exp(-g * (lam[k + 1] - u)) * poly(u), u)
            got = sum(w[k, j] * poly(lam[k - j]) for j in range(order))
            assert got.item() == pytest.approx(exact.item(), rel=1e-6), (order, k)


@pytest.mark.parametrize("order,eta", [(2, 0.5), (2, 1.0), (3, 1.0)])
def test_sde_dpm_solver_samples_the_data_distribution(order, eta):
    """With the exact predictor the stochastic 2M and 3M solvers converge to the data distribution (the 2M
    solver's discretisation error at 20 steps is 3% in the std, as the deterministic solver's)."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    x = d.dpm_solver_sample(gaussian_oracle(d), (4096, 1, 4, 4), steps=200, order=order, eta=eta, clip_x0=False,
                            generator=gen())
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(SD, rel=0.01)


@pytest.mark.parametrize("sampler", ["ddpm", "sde"])
def test_per_sample_generators_make_a_sample_independent_of_its_batch(sampler):
    """With one generator per sample (seeded from (seed, index)), sample i is the same drawn in a batch
    of three or alone, for the stochastic samplers too."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 100))
    run = {"ddpm": lambda shape, g: d.ddpm_sample(gaussian_oracle(d), shape, steps=10, generator=g),
           "sde": lambda shape, g: d.sde_sample(sde_oracle(d), shape, steps=10, generator=g)}[sampler]
    batch = run((3, 1, 4, 4), ddpm.sample_generators(7, range(3)))
    alone = torch.cat([run((1, 1, 4, 4), ddpm.sample_generators(7, [i])) for i in range(3)])
    assert torch.allclose(batch, alone, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        ddpm.randn((3, 1), ddpm.sample_generators(7, range(2)))


def exact_ode_sample(d, x_T, ts, mu=MU, sd=SD):
    """What a deterministic sampler over timesteps ts must return for Gaussian data: the affine probability-flow
    map from ts[-1] to ts[0], x = a mu + std / std_T (x_T - a_T mu), then E[x0 | x] (its last step)."""
    a = d.alphas_cumprod64[[ts[0], ts[-1]]]
    alpha, std = a.sqrt(), (a * sd ** 2 + 1 - a).sqrt()
    return (mu + sd ** 2 * alpha[0] / (std[0] * std[1]) * (x_T.double() - alpha[1] * mu)).float()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_beats_ddim_and_converges_to_the_exact_ode_solution(schedule):
    d = ddpm.Diffusion(ddpm.make_betas(schedule, 1000))
    oracle, x_T = gaussian_oracle(d), torch.randn(4096, 1, 4, 4, generator=gen())

    def errors(sampler, steps, **kw):
        exact = exact_ode_sample(d, x_T, d.ddim_timesteps(steps, "trailing"))
        x = sampler(oracle, x_T=x_T, steps=steps, clip_x0=False, spacing="trailing", **kw)
        return (x - exact).pow(2).mean().sqrt().item(), abs(x.std().item() - exact.std().item())

    rmse_ddim, std_ddim = errors(d.ddim_sample, 10)
    rmse_dpm, std_dpm = errors(d.dpm_solver_sample, 10, eta=0.0)  # the ODE solver
    assert std_dpm < std_ddim / 4 and rmse_dpm < rmse_ddim / 4  # a wide margin at 10 model calls
    for order in (2, 3):
        rmse = [errors(d.dpm_solver_sample, k, order=order, eta=0.0)[0] for k in (20, 100, 500)]
        ddim = [errors(d.ddim_sample, k)[0] for k in (20, 100, 500)]
        assert rmse == sorted(rmse, reverse=True) and rmse[-1] < 5e-4 and rmse[-1] < ddim[-1] / 5, (order, rmse, ddim)


@pytest.mark.parametrize("sampler", ["dpm_solver", "ddpm_respaced"])
def test_fast_samplers_keep_the_conventions(sampler):
    d = ddpm.Diffusion(ddpm.make_betas("linear", 30))
    model, calls = perturbed_unet(in_channels=1), []
    run = d.dpm_solver_sample if sampler == "dpm_solver" else d.ddpm_sample
    x, traj = run(model, (3, 1, 16, 16), steps=10, generator=gen(5), return_trajectory=True,
                  progress=lambda i, n: calls.append((i, n)))
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32 and x.abs().max() <= 1
    assert len(traj) == 11 and torch.equal(traj[-1], x) and calls == [(i + 1, 10) for i in range(10)]
    assert torch.equal(x, run(model, (3, 1, 16, 16), steps=10, generator=gen(5)))


def test_respaced_ddpm_with_all_steps_is_ddpm_and_keeps_the_schedule():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 50))
    model, x_T = perturbed_unet(), torch.randn(2, 3, 8, 8, generator=gen(3))
    a = d.ddpm_sample(model, x_T=x_T, generator=gen(7))
    for spacing in ddpm.SPACINGS:
        assert torch.equal(a, d.ddpm_sample(model, x_T=x_T, steps=50, spacing=spacing, generator=gen(7)))
    kept = d.ddim_timesteps(10, "trailing")
    r = d.respaced(kept)
    assert torch.allclose(r.alphas_cumprod64, d.alphas_cumprod64[kept], rtol=1e-12)  # a-bar of the kept steps
    assert torch.allclose(d.respaced(list(range(50))).alphas_cumprod64, d.alphas_cumprod64, rtol=1e-12)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_respaced_ddpm_samples_the_data_distribution(spacing):
    d = ddpm.Diffusion(ddpm.make_betas("cosine", 1000))
    x = d.ddpm_sample(gaussian_oracle(d), (4096, 1, 4, 4), steps=50, spacing=spacing, clip_x0=False,
                      generator=gen())
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(SD, rel=0.03)

# ----------------------------------------------------------------------------------------------
# score SDEs: the VP reading of Diffusion and the VE process, through one set of samplers

PROCESSES = {"vp": lambda: ddpm.Diffusion(ddpm.make_betas("linear", 1000)), "ve": lambda: ddpm.VESDE(25.0)}


def sde_oracle(process, mu=MU, sd=SD):
    """The exact eps-predictor of any process with marginals x_t = alpha x0 + sigma z, for x0 ~ N(mu, sd^2 I):
    eps_hat = sigma (x_t - alpha mu) / (alpha^2 sd^2 + sigma^2), at float t."""
    def model(x, t):
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        a, s = (v.reshape(-1, 1, 1, 1) for v in process.marginal(t))
        return s * (x - a * mu) / (a ** 2 * sd ** 2 + s ** 2)
    return model


def gaussian_ends(process, sd=SD):
    """alpha and std = sqrt(alpha^2 sd^2 + sigma^2) of x_t at the data end and at the noise end."""
    (a_e, s_e), (a_s, s_s) = (process.marginal(torch.tensor(t)) for t in (process.t_end, process.t_start))
    return a_e, (a_e ** 2 * sd ** 2 + s_e ** 2).sqrt(), a_s, (a_s ** 2 * sd ** 2 + s_s ** 2).sqrt()


def gaussian_ode_sample(process, x_T, mu=MU, sd=SD):
    """For Gaussian data the probability-flow ODE is affine, x_t = alpha_t mu + std_t / std_s (x_s - alpha_s mu):
    what ode_sample must return from x_T, its last step E[x0 | x] included."""
    a_e, std_e, a_s, std_s = gaussian_ends(process, sd)
    x_end = a_e * mu + std_e / std_s * (x_T - a_s * mu)
    return mu + sd ** 2 * a_e / std_e ** 2 * (x_end - a_e * mu)


def test_ve_marginal_std_is_the_seeds_closed_form():
    ve = ddpm.VESDE(25.0)
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
    expected = ((25.0 ** (2 * t) - 1) / (2 * math.log(25.0))).sqrt()
    assert torch.allclose(ve.marginal_std(t.float()).double(), expected, rtol=1e-5)
    assert ve.prior_std == pytest.approx(expected[-1].item())
    f, g2 = ve.sde(t.float())  # d sigma_t^2 / dt = sigma^(2t)
    assert (f == 0).all() and torch.allclose(g2.double(), 25.0 ** (2 * t), rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vp_sde_interpolates_the_schedule_smoothly_and_matches_its_marginals(schedule):
    d = ddpm.Diffusion(ddpm.make_betas(schedule, 1000))
    alpha, sigma = d.marginal(torch.arange(1000).float())  # exact at the integers
    assert torch.allclose(alpha, d.sqrt_alphas_cumprod, rtol=1e-5)
    assert torch.allclose(sigma, d.sqrt_one_minus_alphas_cumprod, rtol=1e-4)
    t = torch.linspace(0, 999, 99901, dtype=torch.float64)  # steps of 0.01
    log_ab, beta = (v.double() for v in d._log_alphas_cumprod_at(t))
    assert (beta > 0).all()  # a valid SDE: g^2 = beta(t) > 0
    end = len(t) if schedule == "linear" else -300  # cosine's last 3 steps: betas clipped at 0.999, a cliff
    slope = (log_ab[2:] - log_ab[:-2]) / 0.02  # beta = -d log a-bar / dt, so the SDE has these marginals
    assert torch.allclose(-slope[:end], beta[1:-1][:end], rtol=1e-3, atol=1e-6)
    jumps = (beta[1:] - beta[:-1]).abs() / beta[:-1]  # continuous: no jump at the integers
    assert jumps[:end].max() < 0.02
    f, g2 = d.sde(t.float())
    assert torch.equal(f, -0.5 * g2)


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_ve_and_vp_loss_of_the_exact_predictor_is_the_posterior_variance_of_eps(process):
    p = PROCESSES[process]()
    x0 = MU + SD * torch.randn(4096, 1, 4, 4, generator=gen())
    t_value = 0.3 if process == "ve" else 300.0
    t = torch.full((4096,), t_value)
    sigma2 = p.marginal(t)[1][0].item() ** 2
    alpha2 = p.marginal(t)[0][0].item() ** 2
    if process == "ve":
        loss = p.loss(sde_oracle(p), x0, t=t, noise=torch.randn(x0.shape, generator=gen(1))).item()
    else:  # Diffusion.loss takes integer timesteps; the VP oracle takes them as floats
        oracle = sde_oracle(p)
        loss = p.loss(lambda x, s: oracle(x, s.float()), x0, t=t.long(), noise=torch.randn(x0.shape, generator=gen(1))).item()
    assert loss == pytest.approx(alpha2 * SD ** 2 / (alpha2 * SD ** 2 + sigma2), rel=0.03)


@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_em_and_pc_with_exact_predictor_sample_the_data_distribution(process, corrector_steps):
    p = PROCESSES[process]()
    x = p.sde_sample(sde_oracle(p), (2048, 1, 4, 4), steps=500, corrector_steps=corrector_steps, generator=gen())
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    # Langevin steps of size 2 (snr |z| / |score|)^2 widen a Gaussian by about (snr^2 / 2): 1.3% at snr 0.16
    assert x.std().item() == pytest.approx(SD * (1 + 0.013 * corrector_steps), rel=0.015)


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_sde_sampler_conventions_and_no_noise_at_the_last_step(process):
    p, net = PROCESSES[process](), perturbed_unet(in_channels=1)
    model = lambda x, t: net(x, t * (999.0 if process == "ve" else 1.0))
    x = p.sde_sample(model, (3, 1, 16, 16), steps=6, corrector_steps=1, generator=gen(5))
    assert torch.equal(x, p.sde_sample(model, (3, 1, 16, 16), steps=6, corrector_steps=1, generator=gen(5)))
    x, traj = p.sde_sample(model, (3, 1, 16, 16), steps=6, generator=gen(5), return_trajectory=True)
    assert x.shape == (3, 1, 16, 16) and len(traj) == 7 and torch.equal(traj[-1], x)
    with torch.inference_mode():  # the last step is E[x0 | x] at t_end: no noise
        assert torch.allclose(x, ddpm.denoise(model, p, traj[-2], torch.full((3,), p.t_end))[0], atol=1e-6)


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_ode_sampler_is_the_exact_flow_and_its_cost_shrinks_with_the_tolerance(process):
    p = PROCESSES[process]()
    x_T = p.prior_std * torch.randn(512, 1, 4, 4, generator=gen())
    exact = gaussian_ode_sample(p, x_T)
    nfes = []
    for tol in (1e-5, 1e-3):
        x, nfe = p.ode_sample(sde_oracle(p), x_T=x_T, rtol=tol, atol=tol)
        assert (x - exact).abs().max() < 50 * tol, (tol, (x - exact).abs().max())
        nfes.append(nfe)
    assert nfes[0] > nfes[1] > 10
    x, _ = p.ode_sample(sde_oracle(p), (4096, 1, 4, 4), generator=gen(1))
    assert x.std().item() == pytest.approx(SD, rel=0.02)  # the prior maps to the data's spread
    assert x.mean().item() == pytest.approx(MU, abs=0.03 if process == "ve" else 0.01)  # VE: prior mean 0, not mu


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_the_continuous_samplers_clip_x0_as_the_fixed_step_ones_do(process):
    """Data N(3, 0.1^2) lies outside [-1, 1], as an under-trained model's unclipped x0_hat can: with clip_x0 the
    Euler-Maruyama, predictor-corrector and ODE samplers stay in [-1, 1] (what sample.py's em, pc and ode do);
    without it they follow the model out."""
    p = PROCESSES[process]()
    far = gaussian_oracle(p, mu=3.0, sd=0.1)
    x_T = p.prior_std * torch.randn(256, 1, 2, 2, generator=gen())
    for clip in (False, True):
        em = p.sde_sample(far, x_T=x_T, steps=100, clip_x0=clip, generator=gen(1))
        pc = p.sde_sample(far, x_T=x_T, steps=100, corrector_steps=1, clip_x0=clip, generator=gen(1))
        ode = p.ode_sample(far, x_T=x_T, clip_x0=clip)[0]
        for x in (em, pc, ode):
            assert (x.abs().max() <= 1 + 1e-5) if clip else (x.mean().item() == pytest.approx(3.0, abs=0.1))


def test_a_tolerance_below_float32s_reach_stops_with_a_reason_instead_of_hanging(monkeypatch):
    """Rounding makes some tiny steps' error estimates 0, so they are accepted and the solver would crawl on
    forever: the call budget ends it (a smaller budget here, for the test's time)."""
    monkeypatch.setattr(ddpm, "ODE_MAX_CALLS", 3000)
    d, calls = ddpm.Diffusion(ddpm.make_betas("linear", 1000)), []
    model = lambda x, t: calls.append(t) or gaussian_oracle(d)(x, t)
    with pytest.raises(ValueError, match="the ODE solver is stuck .* below what torch.float32 can reach"):
        d.ode_sample(model, (64, 1, 4, 4), rtol=1e-13, atol=1e-13, generator=gen())
    assert len(calls) <= 3000 + 8


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_bits_per_dim_is_the_density_of_the_pushed_forward_prior(process):
    p = PROCESSES[process]()
    x0 = MU + SD * torch.randn(64, 1, 2, 2, generator=gen(1))
    a_e, std_e, a_s, std_s = gaussian_ends(p)
    x_T = (a_s * MU + std_s / std_e * (x0 - a_e * MU)).flatten(1)  # the affine flow from t_end to t_start
    D = 4  # log p(x0) = log prior(x_T) + log |det dx_T / dx0|
    log_p = (-0.5 * D * math.log(2 * math.pi * p.prior_std ** 2) - x_T.pow(2).sum(1) / (2 * p.prior_std ** 2)
             + D * torch.log(std_s / std_e))
    expected = -log_p / (D * math.log(2))
    exact = p.bits_per_dim(sde_oracle(p), x0, hutchinson=0, rtol=1e-6, atol=1e-6)
    assert torch.allclose(exact, expected, atol=1e-4), (exact - expected).abs().max()
    estimate = p.bits_per_dim(sde_oracle(p), x0, hutchinson=4, generator=gen(2))
    diff = estimate - expected
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(64) and diff.std() > 0  # unbiased, not exact


def test_vp_ode_on_a_network_agrees_with_ddim_with_all_steps():
    """Both solve the probability-flow ODE of the same process; DDIM with T steps is its first-order solution."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    oracle, net = sde_oracle(d, mu=0.0), perturbed_unet(scale=0.01)
    model = lambda x, t: oracle(x, t.float()) + net(x, t)
    x_T = torch.randn(1, 3, 8, 8, generator=gen())
    ode, nfe = d.ode_sample(model, x_T=x_T)
    ddim = d.ddim_sample(model, x_T=x_T, steps=1000, clip_x0=False)
    coarse = d.ddim_sample(model, x_T=x_T, steps=100, clip_x0=False)
    err = (ode - ddim).abs().max().item()
    assert err < 0.01 and err < (coarse - ddim).abs().max().item() / 3 and nfe < 1000  # fewer calls than DDIM's

SAMPLERS = {  # every fixed-step sampler, by name, from x_T with a model
    "ddpm": lambda p, m, x_T, k, g: p.ddpm_sample(m, x_T=x_T, steps=k, clip_x0=False, generator=g),
    "ddim": lambda p, m, x_T, k, g: p.ddim_sample(m, x_T=x_T, steps=k, clip_x0=False, generator=g),
    "dpm++2M": lambda p, m, x_T, k, g: p.dpm_solver_sample(m, x_T=x_T, steps=k, order=2, eta=0.0, clip_x0=False,
                                                            generator=g),
    "dpm++3M": lambda p, m, x_T, k, g: p.dpm_solver_sample(m, x_T=x_T, steps=k, order=3, eta=0.0, clip_x0=False,
                                                            generator=g),
    "sde-dpm++": lambda p, m, x_T, k, g: p.dpm_solver_sample(m, x_T=x_T, steps=k, eta=1.0, clip_x0=False,
                                                              generator=g),
    "em": lambda p, m, x_T, k, g: p.sde_sample(m, x_T=x_T, steps=k, generator=g),
}


@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_on_both_processes_converges_to_the_data_distribution(process, sampler):
    """Gaussian data through each (process, sampler) pair on its default grid: the error in the mean and std
    falls with the number of steps to within the sampling error (65,536 values: 0.002 in the mean, 0.0014 in
    the std) of the limit: the data for the stochastic samplers, and for the deterministic ones where the exact
    flow takes x_T (the VE prior's mean is 0, not the data's: the ODE keeps 5% of that gap, 0.015)."""
    p = PROCESSES[process]()
    x_T = p.prior_std * torch.randn(4096, 1, 4, 4, generator=gen(2))
    exact = gaussian_ode_sample(p, x_T)
    mean, std = (MU, SD) if sampler in ("ddpm", "sde-dpm++", "em") else (exact.mean().item(), exact.std().item())
    errors = []
    for steps in (10, 1000):
        x = SAMPLERS[sampler](p, gaussian_oracle(p), x_T, steps, gen(3))
        errors.append(abs(x.std().item() - std) + abs(x.mean().item() - mean))
    assert errors[1] < errors[0] / 10 and errors[1] < 0.01, errors


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_time_grids_run_from_the_noise_end_to_the_data_end(process):
    p = PROCESSES[process]()
    for spacing in p.spacings:
        times = p.time_grid(10, spacing).double()
        assert len(times) == 10 and (times.diff() < 0).all(), spacing
        assert (times[0] == p.t_start) != (spacing == "leading"), spacing  # the DDIM paper's starts at 900
        assert (times[-1] == p.t_end) != (spacing == "trailing"), spacing  # Lin et al.'s ends at 99
    lam = p.log_snr(p.time_grid(12, "lambda"))
    assert torch.allclose(lam.diff(), lam.diff().mean().expand(11), rtol=1e-9)  # evenly spaced in lambda
    assert p.time_grid(5, "time").dtype == torch.float64 and p.model_time(p.time_grid(5, "time")).dtype == torch.float32
    if process == "vp":  # integer grids call the model with integer timesteps
        assert p.time_grid(5).tolist() == [999, 749, 500, 250, 0] and p.time_grid(5).dtype == torch.long
    with pytest.raises(ValueError, match="unknown spacing"):
        p.time_grid(5, "uniform")


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_dpm_solver_of_order_one_is_ddim_on_both_processes(process):
    p, net = PROCESSES[process](), perturbed_unet(in_channels=1)
    model = lambda x, t: net(x, t * (1000.0 if process == "ve" else 1.0))
    x_T = p.prior_std * torch.randn(2, 1, 16, 16, generator=gen())
    for eta in (0.0, 1.0):
        a = p.dpm_solver_sample(model, x_T=x_T, steps=8, order=1, eta=eta, generator=gen(5))
        b = p.ddim_sample(model, x_T=x_T, steps=8, eta=eta, generator=gen(5))
        assert torch.allclose(a, b, atol=1e-5), (eta, (a - b).abs().max())


def test_the_step_into_the_data_end_keeps_the_variance():
    """On grids that end at t = 0 the step into the last model call is first order: the stochastic 2M solver
    no longer over-disperses there (its second-order step into t = 0 gave std 0.76 at 20 steps), and on the
    grid even in lambda the solver keeps the variance at 10 calls, where DDIM loses a quarter of it."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    oracle, x_T = gaussian_oracle(d), torch.randn(8192, 1, 4, 4, generator=gen())
    for spacing in ("linspace", "leading"):
        x = d.dpm_solver_sample(oracle, x_T=x_T, steps=20, order=2, eta=1.0, spacing=spacing, clip_x0=False,
                                generator=gen(1))
        assert abs(x.std().item() - SD) < 0.03, spacing
    std = {k: abs(d.dpm_solver_sample(oracle, x_T=x_T, steps=10, order=2, spacing="lambda", clip_x0=False, eta=eta,
                                      generator=gen(1)).std().item() - SD) for k, eta in (("ode", 0.0), ("sde", 1.0))}
    ddim = abs(d.ddim_sample(oracle, x_T=x_T, steps=10, spacing="lambda", clip_x0=False).std().item() - SD)
    assert max(std.values()) < 0.01 and max(std.values()) < ddim / 3 and ddim > 0.1, (std, ddim)


def test_sample_generators_depend_on_the_seed_and_keep_seed_0():
    """The CPU generator keeps 32 bits of a seed: (seed, index) must differ within them."""
    noise = lambda seed, i: ddpm.randn((1, 4), ddpm.sample_generators(seed, [i]))
    assert torch.equal(noise(0, 7), torch.randn((1, 4), generator=gen(7)))  # seed 0: sample i is seeded with i
    assert not torch.equal(noise(0, 7), noise(1, 7)) and not torch.equal(noise(1, 7), noise(2, 7))

# ----------------------------------------------------------------------------------------------
# classifier-free guidance

MEANS = torch.tensor([-0.4, 0.1, 0.6, 0.2])  # three classes' data N(mu_c, SD^2), and the null class's N(mu_u, SD^2)


def class_oracle(process, means=MEANS, sd=SD):
    """The exact predictor of class y's data N(means[y], sd^2 I), the last row the unconditional model."""
    def model(x, t, y):
        a, s = (v.reshape(-1, 1, 1, 1) for v in process.marginal_at(t))
        mu = means.to(x.device)[y].reshape(-1, 1, 1, 1)
        return s * (x - a * mu) / (a ** 2 * sd ** 2 + s ** 2)
    return model


@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_guidance_of_gaussians_is_the_gaussian_of_the_guided_mean(process, sampler):
    """eps(x, null) + s (eps(x, y) - eps(x, null)) is the exact predictor of N(mu_y + (s - 1)(mu_y - mu_u), SD^2):
    every sampler on both processes gives what it gives for that Gaussian."""
    p = PROCESSES[process]()
    y = torch.tensor([0, 1, 2, 0] * 256)
    x_T = p.prior_std * torch.randn(1024, 1, 4, 4, generator=gen(2))
    for scale in (0.0, 1.0, 2.5):
        guided_means = torch.cat([MEANS[:3] + (scale - 1) * (MEANS[:3] - MEANS[3]), MEANS[3:]])
        target = lambda x, t: class_oracle(p, guided_means)(x, t, y)
        a = SAMPLERS[sampler](p, ddpm.Guided(class_oracle(p), y, scale, null=3), x_T, 10, gen(3))
        b = SAMPLERS[sampler](p, target, x_T, 10, gen(3))
        assert torch.allclose(a, b, atol=2e-5), (scale, (a - b).abs().max())


def test_guided_sampling_gives_the_guided_mean_and_the_data_std():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    for c, scale in ((0, 3.0), (2, 0.5)):
        y = torch.full((4096,), c)
        x = d.ddpm_sample(ddpm.Guided(class_oracle(d), y, scale, null=3), (4096, 1, 4, 4), clip_x0=False,
                          generator=gen(c))
        assert x.mean().item() == pytest.approx((MEANS[c] + (scale - 1) * (MEANS[c] - MEANS[3])).item(), abs=0.01)
        assert x.std().item() == pytest.approx(SD, rel=0.02)


def test_guidance_of_a_network_is_one_batched_call_and_exact_at_zero_and_one():
    net = perturbed_unet(in_channels=1, num_classes=3)
    x, t, y = torch.randn(4, 1, 16, 16, generator=gen()), torch.tensor([3, 50, 500, 999]), torch.tensor([0, 1, 2, 1])
    calls = []
    counting = lambda *a: calls.append(a[0].shape[0]) or net(*a)
    with torch.inference_mode():
        cond, uncond = net(x, t, y), net(x, t, None)
        assert torch.equal(uncond, net(x, t, torch.full((4,), 3)))  # no label: the null class, index num_classes
        assert torch.equal(ddpm.Guided(net, y, 1.0, 3)(x, t), cond)  # s = 1: the conditional model, bit for bit
        assert torch.equal(ddpm.Guided(net, y, 0.0, 3)(x, t), uncond)  # s = 0: the unconditional one
        guided = ddpm.Guided(counting, y, 2.0, 3)(x, t)
        assert calls == [8]  # both halves in one call of the doubled batch
        assert torch.allclose(guided, uncond + 2.0 * (cond - uncond), atol=1e-5)
        assert not torch.allclose(cond, uncond)
    with pytest.raises(ValueError, match="without num_classes"):
        perturbed_unet(in_channels=1)(x, t, y)


def test_label_dropout_replaces_the_share_p_by_the_null_class():
    y = torch.randint(0, 10, (200_000,), generator=gen())
    dropped = ddpm.drop_labels(y, 0.1, 10, gen(1))
    null = dropped == 10
    assert abs(null.double().mean().item() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(y))  # within 4 sigma
    assert torch.equal(dropped[~null], y[~null])  # the others untouched
    assert torch.equal(ddpm.drop_labels(y, 0.0, 10, gen(1)), y)


def test_conditional_ddim_inversion_round_trips():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    y = torch.tensor([0, 2] * 32)
    model = ddpm.Guided(class_oracle(d), y, 2.0, null=3)
    x0 = MEANS[y].reshape(-1, 1, 1, 1) + SD * torch.randn(64, 1, 4, 4, generator=gen())
    x_T = d.ddim_invert(model, x0, steps=50)
    assert (d.ddim_sample(model, x_T=x_T, steps=50, clip_x0=False) - x0).abs().max() < 2e-3

# ----------------------------------------------------------------------------------------------
# autoguidance (Karras et al. 2024) and the guidance interval (Kynkaanniemi et al. 2024)

MU_MAIN, MU_GUIDE = 0.3, -0.2  # the main model's data N(MU_MAIN, SD^2) and the weaker guide's N(MU_GUIDE, SD^2)


def test_autoguidance_at_weight_one_or_by_the_model_itself_is_the_main_model_bit_for_bit():
    main, guide = perturbed_unet(in_channels=1), perturbed_unet(scale=0.08, in_channels=1)
    x, t = torch.randn(4, 1, 16, 16, generator=gen()), torch.tensor([3, 50, 500, 999])
    calls = []
    counting = lambda model: lambda *a: calls.append(a[0].shape[0]) or model(*a)
    with torch.inference_mode():
        plain, weak = main(x, t), guide(x, t)
        assert torch.equal(ddpm.Guided(main, None, 1.0, guide=guide)(x, t), plain)
        for w in (0.0, 2.0, 3.5):
            assert torch.equal(ddpm.Guided(main, None, w, guide=main)(x, t), plain)
        guided = ddpm.Guided(counting(main), None, 2.0, guide=counting(guide))(x, t)
        assert torch.allclose(guided, weak + 2.0 * (plain - weak), atol=1e-6) and calls == [4, 4]
        net, y = perturbed_unet(in_channels=1, num_classes=3), torch.tensor([0, 1, 2, 1])
        weak_net = perturbed_unet(scale=0.08, in_channels=1, num_classes=3)  # a class-conditional pair
        both = ddpm.Guided(net, y, 3.0, guide=weak_net)(x, t)
        assert torch.allclose(both, weak_net(x, t, y) + 3.0 * (net(x, t, y) - weak_net(x, t, y)), atol=1e-6)


@pytest.mark.parametrize("process", ["vp", "ve"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_autoguidance_of_gaussians_is_the_gaussian_of_the_extrapolated_mean(process, sampler):
    """eps_g + w (eps_m - eps_g) for data N(mu_m, s^2) and N(mu_g, s^2) is the exact predictor of
    N(mu_m + (w - 1)(mu_m - mu_g), s^2): every sampler on both processes gives what it gives for that Gaussian."""
    p = PROCESSES[process]()
    x_T = p.prior_std * torch.randn(1024, 1, 4, 4, generator=gen(2))
    for w in (1.0, 2.0, 3.0):
        model = ddpm.Guided(gaussian_oracle(p, MU_MAIN), None, w, guide=gaussian_oracle(p, MU_GUIDE))
        target = gaussian_oracle(p, MU_MAIN + (w - 1) * (MU_MAIN - MU_GUIDE))
        a, b = (SAMPLERS[sampler](p, m, x_T, 10, gen(3)) for m in (model, target))
        assert torch.allclose(a, b, atol=2e-5), (w, (a - b).abs().max())
    x = p.ddpm_sample(model, (4096, 1, 4, 4), clip_x0=False, generator=gen(4))  # w = 3, the whole chain
    assert x.mean().item() == pytest.approx(MU_MAIN + 2 * (MU_MAIN - MU_GUIDE), abs=0.015 if process == "vp" else 0.03)
    assert x.std().item() == pytest.approx(SD, rel=0.02)


def interval_flow(p, x_T, lo, hi, w):
    """The exact probability-flow ODE of Gaussian data guided only where lo < sigma/alpha <= hi: three affine
    pieces x_t = alpha_t mu + std_t / std_s (x_s - alpha_s mu), std_t = sqrt(alpha_t^2 SD^2 + sigma_t^2), with
    mu = MU_MAIN outside and the extrapolated mean inside; then E[x0 | x] at the data end (outside)."""
    guided_mu = MU_MAIN + (w - 1) * (MU_MAIN - MU_GUIDE)
    t_hi, t_lo = (p.time_of_log_snr(torch.tensor([-math.log(r)], dtype=torch.float64)) for r in (hi, lo))
    x, s = x_T.double(), torch.tensor([p.t_start], dtype=torch.float64)
    for t, mu in ((t_hi, MU_MAIN), (t_lo, guided_mu), (torch.tensor([p.t_end], dtype=torch.float64), MU_MAIN)):
        (a_s, g_s), (a_t, g_t) = p.marginal(s), p.marginal(t)
        std_s, std_t = (a_s ** 2 * SD ** 2 + g_s ** 2).sqrt(), (a_t ** 2 * SD ** 2 + g_t ** 2).sqrt()
        x, s = a_t * mu + std_t / std_s * (x - a_s * mu), t
    return MU_MAIN + SD ** 2 * a_t / std_t ** 2 * (x - a_t * MU_MAIN), (a_t, std_t)


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_a_guidance_interval_moves_the_flow_by_the_closed_form_and_full_or_empty_intervals_are_exact(process):
    """Through the exact probability-flow ODE each sample lands where the piecewise closed form puts it; the
    mean moves by (w - 1)(mu_m - mu_g) s (alpha_a / std_a - alpha_b / std_b) at the interval's ends a (data
    side) and b, times the data end's gain; an interval holding every noise level is full guidance and an
    empty one none, bit for bit."""
    p, w, (lo, hi) = PROCESSES[process](), 2.5, (0.4, 3.0)
    main, guide = gaussian_oracle(p, MU_MAIN), gaussian_oracle(p, MU_GUIDE)
    x_T = p.prior_std * torch.randn(512, 1, 4, 4, generator=gen())
    x, _ = p.ode_sample(ddpm.Guided(main, None, w, guide=guide, interval=(lo, hi), process=p), x_T=x_T,
                        rtol=1e-6, atol=1e-6)
    exact, _ = interval_flow(p, x_T, lo, hi, w)
    assert (x.double() - exact).abs().max() < 2e-3, (x.double() - exact).abs().max()
    plain, (a_e, std_e) = interval_flow(p, x_T, lo, hi, 1.0)  # w = 1: the main model's own flow
    (a_a, s_a), (a_b, s_b) = (p.marginal(p.time_of_log_snr(torch.tensor([-math.log(r)], dtype=torch.float64)))
                              for r in (lo, hi))
    ratio = lambda a, s: a / (a ** 2 * SD ** 2 + s ** 2).sqrt()
    shift = (w - 1) * (MU_MAIN - MU_GUIDE) * SD * (ratio(a_a, s_a) - ratio(a_b, s_b))
    assert torch.allclose(exact - plain, shift * SD * a_e / std_e, atol=1e-12)  # the data end's gain: 1 to 3e-4
    assert (x.double() - plain).mean().item() == pytest.approx(shift.item(), rel=1e-2)
    for interval, same_as in (((0.0, math.inf), ddpm.Guided(main, None, w, guide=guide)), ((1e6, 1e7), main)):
        a = p.ode_sample(ddpm.Guided(main, None, w, guide=guide, interval=interval, process=p), x_T=x_T)[0]
        assert torch.equal(a, p.ode_sample(same_as, x_T=x_T)[0])


def test_outside_the_interval_one_model_call_and_inside_one_call_of_each():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    calls = {"main": 0, "guide": 0}

    def counting(name, model):
        def f(x, t):
            calls[name] += 1
            return model(x, t)
        return f
    lo, hi = 0.5, 5.0
    guided = ddpm.Guided(counting("main", gaussian_oracle(d, MU_MAIN)), None, 2.0, process=d, interval=(lo, hi),
                         guide=counting("guide", gaussian_oracle(d, MU_GUIDE)))
    times = d.time_grid(10, "linspace")
    d.ddim_sample(guided, (8, 1, 4, 4), steps=10, spacing="linspace")
    alpha, sigma = d.marginal(times)
    assert calls == {"main": 10, "guide": int(((sigma / alpha > lo) & (sigma / alpha <= hi)).sum())}
    assert 0 < calls["guide"] < 10
    with pytest.raises(ValueError, match="needs the process"):
        ddpm.Guided(gaussian_oracle(d), None, 2.0, guide=gaussian_oracle(d), interval=(lo, hi))


def test_per_sample_guidance_chooses_on_the_device_what_the_host_chooses():
    """per_sample=True (a training batch of mixed times) gives the same values as the host's choice, for eps and
    for (x0_hat, eps_hat), on batches inside, outside and across the interval, without reading t on the host."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    main, guide = gaussian_oracle(d, MU_MAIN), gaussian_oracle(d, MU_GUIDE)
    x = torch.randn(4, 1, 4, 4, generator=gen())
    for t in ([3, 50, 500, 999], [400, 420, 450, 500], [1, 2, 3, 4]):
        t = torch.tensor(t)
        host, device = (ddpm.Guided(main, None, 2.0, guide=guide, interval=(0.5, 5.0), process=d, per_sample=per)
                        for per in (False, True))
        assert torch.equal(host(x, t), device(x, t))
        assert all(torch.equal(a, b) for a, b in zip(host.predict(x, t), device.predict(x, t)))


# ----------------------------------------------------------------------------------------------
# inpainting (replacement, RePaint) and SDEdit on Gaussian data, whose conditionals are known

CORR_MU, CORR_COV = torch.tensor([0.2, -0.1], dtype=torch.float64), torch.tensor([[0.25, 0.2], [0.2, 0.25]],
                                                                                 dtype=torch.float64)


def correlated_oracle(process, mu=CORR_MU, cov=CORR_COV):
    """The exact predictor for two correlated pixels x0 ~ N(mu, cov), images [B, 1, 1, 2]: x0_hat = mu + alpha
    cov (alpha^2 cov + sigma^2 I)^-1 (x_t - alpha mu), linear in x_t."""
    def model(x, t):
        a, s = (v.double() for v in process.marginal_at(t))
        flat = x.double().reshape(-1, 2)
        A = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64)
        x0 = mu + a[:, None] * (cov @ torch.linalg.solve(A, (flat - a[:, None] * mu)[..., None]))[..., 0]
        return ((flat - a[:, None] * x0) / s[:, None]).float().reshape(x.shape)
    return model


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_inpainting_keeps_the_known_pixels_exactly_with_every_sampler(process):
    p = PROCESSES[process]()
    x0 = torch.tensor([0.7, 0.0]).reshape(1, 1, 1, 2).expand(64, 1, 1, 2)
    keep = torch.tensor([True, False]).reshape(1, 1, 1, 2)
    for name, run in (("ddpm", p.ddpm_sample), ("ddim", p.ddim_sample), ("dpm++", p.dpm_solver_sample),
                      ("em", p.sde_sample)):
        g = gen(1)
        x = run(correlated_oracle(p), (64, 1, 1, 2), steps=20, generator=g, hook=ddpm.Replace(x0, keep, g))
        assert torch.equal(x[:, 0, 0, 0], x0[:, 0, 0, 0]), name
        assert x[:, 0, 0, 1].std() > 0.1, name  # the unknown pixel is sampled


def test_inpainting_samples_the_gaussian_conditional_and_repaint_closes_the_gap():
    """Pixel 2 given pixel 1 = v must follow N(mu_2 + S_21 / S_11 (v - mu_1), S_22 - S_21^2 / S_11). Replacement
    alone conditions the unknown pixel too weakly; RePaint's resampling harmonises it, more with each pass."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    v = 0.7
    mean = (CORR_MU[1] + CORR_COV[1, 0] / CORR_COV[0, 0] * (v - CORR_MU[0])).item()
    std = (CORR_COV[1, 1] - CORR_COV[1, 0] ** 2 / CORR_COV[0, 0]).sqrt().item()
    x0, keep = torch.tensor([v, 0.0]).reshape(1, 1, 1, 2).expand(4096, 1, 1, 2), torch.tensor([True, False])
    errors = []
    for resample in (1, 2, 10):
        g = gen(0)
        x = d.ddpm_sample(correlated_oracle(d), (4096, 1, 1, 2), steps=200, clip_x0=False, generator=g,
                          hook=ddpm.Replace(x0, keep.reshape(1, 1, 1, 2), g), path=ddpm.repaint_path(200, 10, resample))
        errors.append(abs(x[:, 0, 0, 1].mean().item() - mean) + abs(x[:, 0, 0, 1].std().item() - std))
    assert errors[0] > 0.15 and errors[0] > errors[1] > errors[2] and errors[2] < errors[0] / 4, errors


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_reconstruction_guidance_pulls_the_unknown_pixel_to_its_gaussian_conditional(process):
    """Ho et al. (2022)'s reconstruction guidance on the two correlated pixels, on both processes: weight 0 is
    replacement alone; at weight 2 the unknown pixel's mean and std come within a third of replacement's error of
    the conditional N(0.30, 0.30^2) (replacement: mean 0.14, std 0.37), the known pixel exactly as given, and too
    large a weight overshoots the mean; the guided eps is the model's where nothing is kept."""
    d = PROCESSES[process]()
    v = 0.7
    mean = (CORR_MU[1] + CORR_COV[1, 0] / CORR_COV[0, 0] * (v - CORR_MU[0])).item()
    std = (CORR_COV[1, 1] - CORR_COV[1, 0] ** 2 / CORR_COV[0, 0]).sqrt().item()
    x0 = torch.tensor([v, 0.0]).reshape(1, 1, 1, 2).expand(4096, 1, 1, 2)
    keep = torch.tensor([True, False]).reshape(1, 1, 1, 2)
    got = {}
    for weight in (0.0, 2.0, 10.0):
        g = gen(0)
        model = ddpm.ReconstructionGuided(correlated_oracle(d), d, x0, keep, weight)
        x = d.ddpm_sample(model, (4096, 1, 1, 2), steps=100, clip_x0=False, generator=g,
                          hook=ddpm.Replace(x0, keep, g))
        assert torch.equal(x[:, 0, 0, 0], x0[:, 0, 0, 0])
        got[weight] = x[:, 0, 0, 1].mean().item(), x[:, 0, 0, 1].std().item()
    error = {w: abs(m - mean) + abs(s - std) for w, (m, s) in got.items()}
    assert error[0.0] > 0.15 and error[2.0] < error[0.0] / 3, got
    assert got[10.0][0] > mean + 0.1, got
    x_t, t = torch.randn(8, 1, 1, 2, generator=gen(1)), torch.full((8,), 300 if process == "vp" else 0.3)
    nothing = ddpm.ReconstructionGuided(correlated_oracle(d), d, x0[:8], torch.zeros_like(keep), 5.0)
    with torch.inference_mode():  # as the samplers call it
        assert torch.allclose(nothing(x_t, t), correlated_oracle(d)(x_t, t), atol=1e-6)


def published_repaint_times(steps, jump, resample):
    """Lugmayr et al.'s schedule of timesteps as their sampler visits them (0-based, steps - 1 the noise end,
    -1 the clean image): down one at a time, and at every timestep t in 0, jump, ... below steps - jump back up
    `jump` timesteps, resample - 1 times."""
    left = {t: resample - 1 for t in range(0, steps - jump, jump)}
    t, times = steps, []
    while t >= 1:
        t -= 1
        times.append(t)
        if left.get(t, 0) > 0:
            left[t] -= 1
            times += list(range(t + 1, t + jump + 1))
            t += jump
    return times + [-1]


def test_repaint_schedule_is_the_published_one_and_its_model_calls():
    path = ddpm.repaint_path(250, jump=10, resample=10)
    points = [249 - t for t in published_repaint_times(250, 10, 10)]  # grid point k is timestep 249 - k
    # they go back one timestep at a time, ten forward draws; a jump here is one draw of the same law
    jumped = [k for i, k in enumerate(points) if not (0 < i < len(points) - 1 and points[i - 1] > k > points[i + 1])]
    assert path == jumped
    assert sum(j > i for i, j in zip(path, path[1:])) == 2410  # Lugmayr et al.'s 250 steps, j = 10, r = 10
    assert path[0] == 0 and path[-1] == 250 and all(abs(j - i) in (1, 10) for i, j in zip(path, path[1:]))
    assert 250 not in path[:-1]  # never a jump from the clean image
    assert ddpm.repaint_path(20, 5, 3) == [*range(10), *range(4, 10), *range(4, 15), *range(9, 15), *range(9, 20),
                                           *range(14, 20), *range(14, 21)]  # jumps at timesteps 10, 5 and 0
    assert ddpm.repaint_path(7, 10, 5) == list(range(8))  # shorter than a jump: plain descent
    calls = []
    d = ddpm.Diffusion(ddpm.make_betas("linear", 100))
    d.ddpm_sample(lambda x, t: calls.append(t[0].item()) or torch.zeros_like(x), (1, 1, 2, 2), steps=20,
                  path=ddpm.repaint_path(20, 5, 3), generator=gen())
    grid = d.time_grid(20).tolist()
    assert calls == [grid[i] for i, j in zip(ddpm.repaint_path(20, 5, 3), ddpm.repaint_path(20, 5, 3)[1:]) if j > i]


@pytest.mark.parametrize("order", [2, 3])
def test_multistep_solvers_restart_their_order_after_a_repaint_jump(order):
    """After a jump back the history is void: the next steps take the lower orders' weights, so a RePaint path
    with nothing known leaves the data's law as it is."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    plain, x = (d.dpm_solver_sample(gaussian_oracle(d), (8192, 1, 2, 2), steps=50, order=order, eta=1.0,
                                    clip_x0=False, path=path, generator=gen())
                for path in (None, ddpm.repaint_path(50, 10, 3)))
    assert x.mean().item() == pytest.approx(MU, abs=0.006)  # 0.327 when the weights kept their order
    assert x.std().item() == pytest.approx(plain.std().item(), rel=0.015)  # the solver's own step error


def test_sdedit_from_t0_samples_the_gaussian_closed_form():
    """From x_t0 ~ q(x_t0 | x0) the ancestral sampler draws p(x0' | x_t0), so x0' | x0 ~ N(mu + a^2 S^2 / D (x0 - mu),
    S^2 s^2 (D + a^2 S^2) / D^2) with D = a^2 S^2 + s^2 at t0; the deterministic sampler maps x_t0 affinely."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    x0 = torch.full((8192, 1, 2, 2), 1.2)
    for strength in (0.2, 0.5):
        t0 = round(strength * 999)
        a, s = (v.item() for v in d.marginal_at(torch.tensor([t0])))
        D = a ** 2 * SD ** 2 + s ** 2
        x_t = d.q_sample(x0, torch.full((8192,), t0), torch.randn(x0.shape, generator=gen(1)))
        x = d.ddpm_sample(gaussian_oracle(d), x_T=x_t, start=t0, clip_x0=False, generator=gen(2))
        assert x.mean().item() == pytest.approx(MU + a ** 2 * SD ** 2 / D * (1.2 - MU), abs=0.01)
        assert x.std().item() == pytest.approx(SD * s * math.sqrt(D + a ** 2 * SD ** 2) / D, rel=0.02)
        ode = d.ddim_sample(gaussian_oracle(d), x_T=x_t, start=t0, steps=200, clip_x0=False)
        assert ode.mean().item() == pytest.approx(MU + SD * a / math.sqrt(D) * (1.2 - MU), abs=0.01)
        assert ode.std().item() == pytest.approx(SD * s / math.sqrt(D), rel=0.02)
    grid = d.time_grid(10, start=500)
    assert grid[0] == 500 and grid[-1] == 0 and (grid.diff() < 0).all()

# ----------------------------------------------------------------------------------------------
# DDPM's variational bound in bits/dim


def eight_bit(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def test_discretised_gaussian_is_exact_in_both_tails():
    """log P(bin) against scipy's float64 normal CDF (sf in the upper tail), with the mean up to 9 scales from
    the bin on either side: a difference of float32 CDFs is 0 past -5.5 scales and 1 past +5.4, which read
    log(1e-12) there, tens of nats off."""
    from scipy.stats import norm
    x = (torch.arange(1, 255, dtype=torch.float64) / 127.5 - 1).repeat_interleave(37)  # inner bins only
    z = torch.linspace(-9, 9, 37, dtype=torch.float64).repeat(254)
    scale = 0.02
    got = ddpm.discretized_gaussian_log_likelihood(x.float(), (x - z * scale).float(),
                                                   torch.full_like(x, math.log(scale)).float()).double().numpy()
    lo, hi = z.numpy() - 1 / 255 / scale, z.numpy() + 1 / 255 / scale  # the bin in scales from the mean
    with np.errstate(divide="ignore"):  # np.where evaluates both sides; the side taken is finite
        ref = np.where(lo > 0, np.log(norm.sf(lo) - norm.sf(hi)), np.log(norm.cdf(hi) - norm.cdf(lo)))
    assert np.isfinite(ref).all() and ref.min() < -40  # the reference reaches 9 scales out
    assert np.abs(got - ref).max() < 1e-4


def test_vlb_prior_term_is_the_closed_form_kl():
    d = ddpm.Diffusion(ddpm.make_betas("linear", 50))
    x0 = eight_bit(MU + SD * torch.randn(4, 1, 4, 4, generator=gen()))
    out = d.vlb_bits_per_dim(lambda x, t: torch.zeros_like(x), x0, generator=gen(1))
    a = d.alphas_cumprod64[-1].item()  # KL(N(sqrt(a) x0, 1 - a) || N(0, 1)) per dimension, in bits
    kl = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x0.double() ** 2) / math.log(2)
    assert torch.allclose(out["prior"].double(), kl.flatten(1).mean(1), rtol=1e-5)
    assert torch.allclose(out["total"], out["prior"] + out["kl"] + out["decoder"])


def test_vlb_of_a_model_that_knows_x0_is_its_decoder_term_alone():
    """The true noise makes p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x0) with beta-tilde: every KL is 0, and the
    decoder is N(x0, beta-tilde_1) integrated over each pixel's 8-bit bin."""
    d = ddpm.Diffusion(ddpm.make_betas("cosine", 100))
    x0 = eight_bit(torch.rand(3, 1, 6, 6, generator=gen()) * 2.2 - 1.1)  # some pixels at -1 and 1
    knows = lambda x, t: (x - ddpm.extract(d.sqrt_alphas_cumprod, t, x.shape) * x0) \
        / ddpm.extract(d.sqrt_one_minus_alphas_cumprod, t, x.shape)
    out = d.vlb_bits_per_dim(knows, x0, variance="posterior", clip_x0=False, generator=gen(1))
    assert out["kl"].abs().max() < 1e-4
    z = (1 / 255) / d.posterior_variance[1].double().sqrt()
    inside = torch.special.ndtr(z) - torch.special.ndtr(-z)
    per_pixel = torch.where(x0.double().abs() > 0.999, -torch.special.log_ndtr(z), -torch.log(inside))
    assert torch.allclose(out["decoder"].double(), per_pixel.flatten(1).mean(1) / math.log(2), rtol=1e-4)


def test_vlb_falls_as_the_model_improves_to_the_exact_predictor():
    d = ddpm.Diffusion(ddpm.make_betas("cosine", 100))
    x0 = eight_bit(MU + SD * torch.randn(64, 1, 4, 4, generator=gen()))
    oracle = gaussian_oracle(d)
    totals = [d.vlb_bits_per_dim(lambda x, t: w * oracle(x, t), x0, generator=gen(1))["total"].mean().item()
              for w in (0.0, 0.5, 0.9, 1.0)]
    assert all(math.isfinite(v) for v in totals) and totals == sorted(totals, reverse=True), totals

# ----------------------------------------------------------------------------------------------
# U-Net and EMA


def test_timestep_embedding_is_sin_cos_of_geometric_frequencies():
    t, dim = torch.tensor([0, 1, 37, 999]), 16
    emb = ddpm.timestep_embedding(t, dim)
    for i in range(dim // 2):
        w = 10000 ** (-2 * i / dim)
        assert torch.allclose(emb[:, i], torch.sin(t * w), atol=1e-5)
        assert torch.allclose(emb[:, dim // 2 + i], torch.cos(t * w), atol=1e-5)


def test_presets_have_the_stated_sizes():
    sizes = {name: ddpm.count_params(ddpm.UNet(**cfg)) for name, cfg in ddpm.PRESETS.items()}
    assert sizes["cifar10"] == pytest.approx(35.7e6, rel=0.005)  # Ho et al.'s 35.7 M
    assert sizes["tiny"] == 280_755 and ddpm.count_params(ddpm.UNet(**ddpm.PRESETS["tiny"], in_channels=1)) == 280_177
    # ten classes add an embedding of 11 rows (the null class last) of the time embedding's width, 64
    tiny10 = ddpm.UNet(**ddpm.PRESETS["tiny"], in_channels=1, num_classes=10)
    assert ddpm.count_params(tiny10) == 280_177 + 11 * 64 and tiny10.label_emb.weight.shape == (11, 64)


@pytest.mark.parametrize("channels,size,norm,act", [(1, 28, "group", "silu"), (3, 32, "batch", "relu"),
                                                    (3, 64, "group", "relu")])
def test_unet_maps_images_to_same_shape_and_depends_on_t(channels, size, norm, act):
    model = perturbed_unet(in_channels=channels, image_size=size, channel_mults=(1, 2, 2) if size % 4 == 0 else (1, 2),
                           norm=norm, activation=act, attn_resolutions=(size // 2,))
    x = torch.randn(2, channels, size, size, generator=gen())
    out = model(x, torch.tensor([3, 3]))
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, torch.tensor([700, 700])))
    # each image is processed independently (no batch coupling in eval mode)
    assert torch.allclose(model(x[:1], torch.tensor([3])), out[:1], atol=1e-5)


@pytest.mark.parametrize("amp", [False, True])
def test_every_gradient_keeps_its_weights_layout(amp):
    """DDP copies each gradient into a bucket laid out as its weight and warns ("Grad strides do not match")
    when the layouts differ: every parameter's gradient must have the parameter's strides, bf16 too."""
    net = ddpm.UNet(**dict(ddpm.PRESETS["tiny"], num_classes=3)).train()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = net(torch.randn(4, 3, 32, 32, generator=gen()), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3]))
    out.float().square().mean().backward()
    odd = [n for n, p in net.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert not odd, odd


def test_unet_rejects_indivisible_image_size():
    with pytest.raises(ValueError, match="not divisible by 8"):
        ddpm.UNet(image_size=36)


def test_multi_head_attention_is_heads_of_softmax_attention():
    """AttnBlock with n heads equals attention computed by hand on n channel groups; one head
    with the same weights is a different function, and heads must divide the channels."""
    torch.manual_seed(0)
    block = ddpm.AttnBlock(8, "group", num_heads=4)
    torch.nn.init.normal_(block.proj.weight, std=0.3)
    x = torch.randn(2, 8, 3, 5)
    qkv = block.qkv(block.norm(x)).flatten(2)  # [B, 3C, HW]
    q, k, v = (m.reshape(2, 4, 2, 15) for m in qkv.chunk(3, dim=1))  # [B, heads, C/heads, HW]
    att = torch.softmax(q.transpose(2, 3) @ k / math.sqrt(2), dim=-1)  # [B, heads, HW, HW]
    h = (v @ att.transpose(2, 3)).reshape(2, 8, 3, 5)
    assert torch.allclose(block(x), x + block.proj(h), atol=1e-5)
    block.num_heads = 1
    assert not torch.allclose(block(x), x + block.proj(h), atol=1e-3)
    with pytest.raises(ValueError, match="num_heads"):
        ddpm.UNet(**dict(ddpm.PRESETS["tiny"], num_heads=5))


def test_norm_group_size_sets_channels_per_group_and_none_keeps_the_old_rule():
    """norm_group_size=k: every GroupNorm has k channels per group. A config without the key (saved
    before it existed) rebuilds the old rule, gcd(32, C) groups: one channel per group at C = 16,
    an instance norm, which cannot see a channel's mean; k = 4 can."""
    groups = lambda m: {(g.num_channels, g.num_groups) for g in m.modules() if isinstance(g, torch.nn.GroupNorm)}
    new = ddpm.UNet(**dict(ddpm.PRESETS["tiny"], base_channels=16, norm_group_size=4))
    assert new.config["norm_group_size"] == 4 and all(c == 4 * g for c, g in groups(new))
    old_cfg = {k: v for k, v in new.config.items() if k != "norm_group_size"}
    old = ddpm.UNet(**old_cfg)
    assert all(g == math.gcd(32, c) for c, g in groups(old)) and (16, 16) in groups(old)
    old.load_state_dict(new.state_dict())  # the same parameters: only the config tells them apart
    x = torch.randn(2, 16, 8, 8, generator=gen())
    shifted = x + torch.randn(1, 16, 1, 1, generator=gen())  # a different mean per channel
    instance, grouped = ddpm._norm("group", 16), ddpm._norm("group", 16, 4)
    assert torch.allclose(instance(x), instance(shifted), atol=1e-4)
    assert not torch.allclose(grouped(x), grouped(shifted), atol=1e-2)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="norm_group_size"):
            ddpm.UNet(**dict(ddpm.PRESETS["tiny"], norm_group_size=bad))


def test_fresh_unet_predicts_zero_noise():
    """Zero-initialised output layer (Ho et al.): a new model starts at eps_hat = 0."""
    model = ddpm.UNet(**ddpm.PRESETS["tiny"])
    assert model(torch.randn(2, 3, 32, 32), torch.tensor([1, 500])).abs().max() == 0


def test_ema_is_an_exponential_moving_average():
    """Weights that jump from w0 to c at the first update: the shadow is c + (w0 - c) prod_n d_n with
    d_n = min(decay, (1 + n) / (10 + n)), whose warm-up product is 10! (n + 1)! / (n + 10)! (it telescopes)."""
    def closed_form(w0, c, decay, n):
        warm = [k for k in range(1, n + 1) if (1 + k) / (10 + k) < decay]
        log_prod = (math.lgamma(11) + math.lgamma(len(warm) + 2) - math.lgamma(len(warm) + 11)
                    + (n - len(warm)) * math.log(decay))
        return c + (w0 - c) * math.exp(log_prod)
    for decay, n in ((0.9999, 50), (0.9, 120)):  # the warm-up alone; then the decay binds from update 80
        model = torch.nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(2.0)
        ema = ddpm.EMA(model, decay=decay)
        with torch.no_grad():
            model.weight.fill_(-1.0)
        for _ in range(n):
            ema.update(model)
        assert torch.allclose(ema.model.weight.double(), torch.full((1, 3), closed_form(2.0, -1.0, decay, n),
                                                                     dtype=torch.float64), rtol=1e-5)
    other = ddpm.EMA(torch.nn.Linear(3, 1, bias=False), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 120 and torch.equal(other.model.weight, ema.model.weight)
    ema.copy_to(model)
    assert torch.equal(model.weight, ema.model.weight)


def test_ddpm_py_alone_imports_and_samples(tmp_path):
    """ddpm.py copied into an empty folder needs nothing but torch."""
    out = run_ddpm_py_alone(tmp_path, "m = ddpm.UNet(**ddpm.PRESETS['tiny']).eval()\n"
                                      "d = ddpm.Diffusion(ddpm.make_betas('cosine', 50))\n"
                                      "print(tuple(d.ddim_sample(m, (2, 3, 32, 32), steps=5).shape))\n")
    assert out.strip() == "(2, 3, 32, 32)"

# ----------------------------------------------------------------------------------------------
