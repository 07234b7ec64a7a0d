"""Tests of the samplers by name (ddpm.SAMPLERS), the step protocol of the one loop, the Karras grid and Heun's
sampler (Karras et al. 2022) against closed forms for Gaussian data N(MU, SD^2) on every process. CPU only.

Run every test file:  python -m pytest -q
"""
import math

import pytest
import torch

import ddpm

from conftest import gen

MU, SD = 0.3, 0.5
PROCESSES = {"vp": lambda: ddpm.Diffusion(ddpm.make_betas("linear", 1000)), "ve": lambda: ddpm.VESDE(25.0),
             "flow": lambda: ddpm.FlowMatching()}


class Counting(torch.nn.Module):
    """The exact Gaussian predictor (ddpm.GaussianOracle), counting its calls."""
    predicts_x0 = True

    def __init__(self, process):
        super().__init__()
        self.oracle, self.calls = ddpm.gaussian_eps(process, MU, SD), 0

    def predict(self, x, t):
        self.calls += 1
        return self.oracle.predict(x, t)

    def forward(self, x, t):
        self.calls += 1
        return self.oracle(x, t)


def exact_flow(process, x_T):
    """Where the probability-flow ODE takes x_T for Gaussian data (it is affine), its last step E[x0 | x] included:
    the law of every deterministic sampler in the limit."""
    (a_e, s_e), (a_s, s_s) = (process.marginal(torch.tensor(t, dtype=torch.float64))
                              for t in (process.t_end, process.t_start))
    std_e, std_s = (a_e ** 2 * SD ** 2 + s_e ** 2).sqrt(), (a_s ** 2 * SD ** 2 + s_s ** 2).sqrt()
    x_end = a_e * MU + std_e / std_s * (x_T.double() - a_s * MU)
    return (MU + SD ** 2 * a_e / std_e ** 2 * (x_end - a_e * MU)).float()


# ----------------------------------------------------------------------------------------------
# the Karras grid and Heun


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_the_karras_grid_equals_its_formula_in_the_noise_level(process):
    """sigma_i = (sigma_max^(1/rho) + i / (S - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al. eq. 5)
    in the process's noise level (sigma / alpha; the flow's t), its ends the process's own."""
    p = PROCESSES[process]()
    for rho in (7.0, 3.0):
        times = p.time_grid(12, "karras", rho=rho)
        assert times.dtype == torch.float64 and times[0] == p.t_start and times[-1] == p.t_end
        level = p.noise_level(times)[0]
        top, low = level[0] ** (1 / rho), level[-1] ** (1 / rho)
        expected = (top + torch.arange(12, dtype=torch.float64) / 11 * (low - top)) ** rho
        assert torch.allclose(level, expected, rtol=1e-9), (level - expected).abs().max()
    if process == "flow":
        assert torch.equal(times, level)  # the flow's noise level is t itself
    with pytest.raises(ValueError, match="rho"):
        p.time_grid(5, "karras", rho=0.0)


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_heun_converges_at_second_order(process):
    """Without churn Heun solves the probability-flow ODE: its error against the exact flow of Gaussian data
    falls about fourfold per doubling of steps, and its last step (Euler into the clean image) returns x0_hat."""
    p = PROCESSES[process]()
    x_T = p.prior_std * torch.randn(2048, 1, 2, 2, generator=gen())
    ref = exact_flow(p, x_T)
    errors = [(p.heun_sample(ddpm.gaussian_eps(p, MU, SD), x_T=x_T, steps=k, clip_x0=False) - ref).pow(2).mean().sqrt()
              for k in (10, 20, 40)]
    ratios = [(errors[i] / errors[i + 1]).item() for i in range(2)]
    assert all(3.3 < r < 6 for r in ratios) and errors[-1] < 0.01, (errors, ratios)


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_heun_with_churn_keeps_the_data_law(process):
    """The churn adds noise by the forward process and the step removes it again: Gaussian data keep their mean
    and std (the sampling error of 65,536 values is 0.002 in the mean, 0.0014 in the std), and the samples now
    depend on the generator."""
    p = PROCESSES[process]()
    x_T = p.prior_std * torch.randn(16384, 1, 2, 2, generator=gen())
    run = lambda g: p.heun_sample(ddpm.gaussian_eps(p, MU, SD), x_T=x_T, steps=160, churn=32.0, clip_x0=False,
                                  generator=gen(g))
    x = run(1)
    assert abs(x.mean().item() - MU) < 0.008 and abs(x.std().item() - SD) < 0.008, (x.mean(), x.std())
    assert not torch.equal(x, run(2))
    exact = exact_flow(p, x_T)  # the churn moves the samples off the ODE's solution
    assert (x - exact).pow(2).mean().sqrt() > 0.05


def test_heun_churn_stays_in_its_window_of_noise_levels():
    """tmin > every level of the grid: no churn, the deterministic sampler bit for bit."""
    p = PROCESSES["vp"]()
    x_T = torch.randn(64, 1, 2, 2, generator=gen())
    model = ddpm.gaussian_eps(p, MU, SD)
    plain = p.heun_sample(model, x_T=x_T, steps=8)
    assert torch.equal(plain, p.heun_sample(model, x_T=x_T, steps=8, churn=40.0, tmin=1e4, generator=gen(1)))
    assert not torch.equal(plain, p.heun_sample(model, x_T=x_T, steps=8, churn=40.0, generator=gen(1)))
    with pytest.raises(ValueError, match="churn"):
        p.heun_sample(model, x_T=x_T, steps=8, churn=-1.0)


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_euler_ancestral_is_k_diffusions_algorithm(process):
    """k-diffusion's sample_euler_ancestral written out in the noise level sigma = sigma_t / alpha_t on y = x /
    alpha_t: the Euler step to sigma_down, then noise of std sigma_up. SAMPLERS["euler-a"] (DDIM's table) gives
    the same samples from the same noise, at eta 1 and 0.5."""
    p = PROCESSES[process]()
    model = ddpm.gaussian_eps(p, MU, SD)
    x_T = p.prior_std * torch.randn(256, 1, 2, 2, generator=gen())
    times = p.time_grid(10, "karras")
    level, scale = (v.tolist() for v in p.noise_level(times))
    level.append(0.0)
    for eta in (1.0, 0.5):
        g, y = gen(3), x_T / scale[0]
        for i in range(10):
            x0 = model.predict(scale[i] * y, p.model_time(times[i:i + 1]).expand(256))[0]
            s, s_next = level[i], level[i + 1]
            up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
            down = math.sqrt(s_next ** 2 - up ** 2)
            y = y + (y - x0) / s * (down - s)
            if s_next > 0:
                y = y + up * torch.randn(y.shape, generator=g)
        ours = ddpm.sample(p, model, "euler-a", x_T=x_T, steps=10, spacing="karras", eta=eta, clip_x0=False,
                           generator=gen(3))
        assert torch.allclose(ours, y, atol=1e-4), (eta, (ours - y).abs().max())


# ----------------------------------------------------------------------------------------------
# every sampler in the registry


def fine(name):
    """The sampler's settings at a cost where its step error is below the test's tolerance."""
    fine = {"ode": {}, "em": {"steps": 500}, "pc": {"steps": 300}, "euler-a": {"steps": 500}, "heun": {"steps": 40},
            "cm": {"steps": 4, "eta": 1.0}}  # cm: its fresh draws, exact for the exact consistency function
    return fine.get(name, {"steps": 100})


@pytest.mark.parametrize("process", sorted(PROCESSES))
@pytest.mark.parametrize("name", sorted(ddpm.SAMPLERS))
def test_every_registered_sampler_returns_the_gaussian_law_with_the_calls_it_promises(process, name):
    """Each sampler of the registry on each process, from its defaults: the mean and std of Gaussian data (the
    stochastic ones) or of the exact flow from the same x_T (the deterministic ones), and exactly the model calls
    that its entry promises."""
    p, spec = PROCESSES[process](), ddpm.SAMPLERS[name]
    x_T = p.prior_std * torch.randn(4096, 1, 4, 4, generator=gen(2))
    model, options = Counting(p), fine(name)
    if name == "cm":  # a consistency model's sampler: the consistency function, not the denoiser
        model.oracle = ConsistencyOracle(p)
    x = ddpm.sample(p, model, name, x_T=x_T, clip_x0=False, generator=gen(3), **options)
    x = x[0] if name == "ode" else x
    if spec.calls:
        assert model.calls == spec.calls(spec.defaults() | options)
    again = ddpm.sample(p, model, name, x_T=x_T, clip_x0=False, generator=gen(4), **options)
    deterministic = torch.equal(x, again[0] if name == "ode" else again)
    mean, std = (exact_flow(p, x_T).mean().item(), exact_flow(p, x_T).std().item()) if deterministic else (MU, SD)
    tolerance = 0.04 if name == "pc" else 0.02
    assert abs(x.mean().item() - mean) < tolerance and abs(x.std().item() - std) < tolerance, (x.mean(), x.std())


def test_the_registry_is_the_one_place_for_the_defaults():
    """The library's defaults are the command line's: a sampler's defaults are its method's keyword defaults with
    the settings that make it that sampler over them."""
    import inspect
    for name, spec in ddpm.SAMPLERS.items():
        params = inspect.signature(getattr(ddpm.ScoreSDE, spec.method)).parameters
        defaults = spec.defaults()
        for key, value in defaults.items():
            assert key in params, (name, key)
            assert value == spec.fixed.get(key, params[key].default)
    assert ddpm.SAMPLERS["dpm++"].defaults()["eta"] == 1.0 and ddpm.SAMPLERS["euler-a"].defaults()["eta"] == 1.0
    assert ddpm.SAMPLERS["pc"].defaults()["corrector_steps"] == 1 and ddpm.SAMPLERS["heun"].calls({"steps": 18}) == 35


@pytest.mark.parametrize("name", [n for n, s in sorted(ddpm.SAMPLERS.items()) if s.fills])
def test_every_filling_sampler_keeps_known_pixels_with_a_hook_and_a_repaint_path(name):
    """Inpainting by replacement with a RePaint path (10 steps, jumps of 3, 2 passes) through each sampler that
    takes hooks and paths: the known pixels come back exactly, the rest is finite, and the model calls are the
    forward moves' calls."""
    p = PROCESSES["vp"]()
    x0 = torch.rand(2, 1, 4, 4, generator=gen()) * 2 - 1
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[..., :2] = True
    model, steps = Counting(p), 4 if name == "cm" else 10  # cm: 3 middle levels, down by fours
    path = ddpm.repaint_path(steps, 3 if steps > 3 else 1, 2)
    x = ddpm.sample(p, model, name, (2, 1, 4, 4), steps=steps, generator=gen(1), hook=ddpm.Replace(x0, keep, gen(2)),
                    path=path)
    assert torch.equal(x[keep.expand_as(x)], x0[keep.expand_as(x0)]) and x.isfinite().all()
    spec = ddpm.SAMPLERS[name]
    per_step = spec.calls(spec.defaults() | {"steps": 1}) if name != "heun" else None
    moves = [i for i, j in zip(path, path[1:]) if j > i]
    expected = len(moves) * per_step if per_step else sum(1 if i == steps - 1 else 2 for i in moves)
    assert model.calls == expected


# ----------------------------------------------------------------------------------------------
# consistency: the sampler and Easy Consistency Tuning


class ConsistencyOracle(torch.nn.Module):
    """The exact consistency function of Gaussian data on any process, f*(x, t) = MU + (SD / std_t)(x - alpha_t MU)
    with std_t^2 = alpha_t^2 SD^2 + sigma_t^2: where the probability-flow ODE takes x_t at the clean end."""
    predicts_x0 = True

    def __init__(self, process):
        super().__init__()
        self.process = process

    def predict(self, x, t):
        a, s = (v.float().reshape(-1, 1, 1, 1) for v in self.process.marginal_at(t))
        x0 = MU + SD / (a ** 2 * SD ** 2 + s ** 2).sqrt() * (x - a * MU)
        return x0, (x - a * x0) / s


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_the_consistency_sampler_with_the_exact_function_returns_the_data_law(process):
    """f* maps x_T to the data's law in one call, and each re-noising keeps it: 1, 2 and 4 calls give mean MU and
    std SD within the sampling error of 65,536 values; the calls are the registry's."""
    p = PROCESSES[process]()
    a, s = (v.item() for v in p.marginal(torch.tensor(p.t_start, dtype=torch.float64)))
    x_T = a * MU + math.sqrt(a ** 2 * SD ** 2 + s ** 2) * torch.randn(16384, 1, 2, 2, generator=gen())  # x_T's law
    for steps in (1, 2, 4):
        model = Counting(p)
        model.oracle = ConsistencyOracle(p)
        x = ddpm.sample(p, model, "cm", x_T=x_T, steps=steps, eta=1.0, clip_x0=False, generator=gen(steps))
        assert abs(x.mean().item() - MU) < 0.008 and abs(x.std().item() - SD) < 0.006, (steps, x.mean(), x.std())
        assert model.calls == steps
    if process == "vp":  # sigma / alpha is 157 at its noise end
        with pytest.raises(ValueError, match="below the start"):
            p.cm_sample(ConsistencyOracle(p), (2, 1, 2, 2), steps=2, middle=1e3)
    with pytest.raises(ValueError, match="eta must be in"):
        p.cm_sample(ConsistencyOracle(p), (2, 1, 2, 2), steps=2, eta=1.5)


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_the_consistency_samplers_kept_noise_has_its_closed_form_law(process):
    """Two calls keeping sqrt(1 - eta^2) of x_T's noise: with f*, x_T = alpha_T MU + std_T z gives x0_hat = MU + SD z
    and eps_hat = c_T z, c_T = (std_T - alpha_T SD) / sigma_T, so the second x0_hat is MU + SD / std_m ((alpha_m SD
    + sigma_m sqrt(1 - eta^2) c_T) z + sigma_m eta z'): mean MU, and an std above SD for eta < 1, as the sampler
    gives; eta = 0 is the same for every generator."""
    p = PROCESSES[process]()
    middle = p.time_of_log_snr(torch.tensor(-math.log(ddpm.CM_MIDDLE), dtype=torch.float64))  # sigma/alpha there
    (a_T, s_T), (a_m, s_m) = (torch.stack(p.marginal(torch.as_tensor(t, dtype=torch.float64))).tolist()
                              for t in (p.t_start, middle))
    std = lambda a, s: math.sqrt(a ** 2 * SD ** 2 + s ** 2)
    x_T = a_T * MU + std(a_T, s_T) * torch.randn(65536, 1, 2, 2, generator=gen())
    c_T = (std(a_T, s_T) - a_T * SD) / s_T
    for eta in (0.0, 0.5, 1.0):
        x = p.cm_sample(ConsistencyOracle(p), x_T=x_T, steps=2, eta=eta, clip_x0=False, generator=gen(1))
        law = SD / std(a_m, s_m) * math.hypot(a_m * SD + s_m * math.sqrt(1 - eta ** 2) * c_T, s_m * eta)
        assert abs(x.mean().item() - MU) < 0.004 and abs(x.std().item() - law) < 0.004, (eta, x.std(), law)
    one, two = (p.cm_sample(ConsistencyOracle(p), x_T=x_T, steps=2, eta=0.0, clip_x0=False, generator=gen(g))
                for g in (1, 2))
    assert torch.equal(one, two)


@pytest.mark.parametrize("prediction", ["eps", "v", "velocity"])
def test_the_consistency_loss_at_the_schedules_start_is_the_denoising_loss(prediction):
    """With r = 0 the target is x0 itself: the same loss as `loss` on the same t and noise (and min-SNR weights)."""
    p = ddpm.FlowMatching() if prediction == "velocity" else PROCESSES["vp"]()
    net = ddpm.UNet(in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1, attn_resolutions=(),
                    image_size=8, norm_group_size=4, time_scale=p.model_time_scale)
    x0, noise = torch.rand(6, 1, 8, 8, generator=gen()) * 2 - 1, torch.randn(6, 1, 8, 8, generator=gen(1))
    t = p.train_t(6, generator=gen(2))
    min_snr = None if prediction == "velocity" else 5.0
    plain = p.loss(net, x0, t=t, noise=noise, prediction=prediction, min_snr=min_snr, reduction="none")
    tuned = p.consistency_loss(net, x0, None, t=t, noise=noise, prediction=prediction, min_snr=min_snr,
                               reduction="none")
    assert torch.allclose(plain, tuned, rtol=1e-5, atol=1e-7), (plain, tuned)
    later = p.consistency_loss(net, x0, 3, t=t, noise=noise, prediction=prediction, min_snr=min_snr, reduction="none")
    assert not torch.allclose(plain, later)  # past the start the target is the model's own


def test_the_ect_mapping_is_the_papers():
    """r/t = 1 - (1 + 8 sigmoid(-t)) / 2^(stage + 1), at least 0; at alpha = 0 (t = inf) n = 1."""
    level = torch.tensor([0.01, 0.5, 2.0, 80.0, math.inf])
    for stage in range(5):
        expected = (1 - (1 + 8 / (1 + torch.exp(level))) / 2 ** (stage + 1)).clamp(min=0)
        assert torch.allclose(ddpm.ect_ratio(level, stage), expected)
    assert ddpm.ect_ratio(level, 0)[:2].eq(0).all() and ddpm.ect_ratio(level, 0)[-1] == 0.5


class AffineStudent(torch.nn.Module):
    """An eps network affine in x at each time, eps = sigma (x - alpha mu) / (std (std + c alpha SD)): c = 0 is the
    denoiser E[x0 | x_t] of Gaussian data, c = 1 the consistency function f*; x0_hat -> x as sigma -> 0 for any c."""

    def __init__(self, process):
        super().__init__()
        self.process = process
        self.c, self.mu = torch.nn.Parameter(torch.tensor(0.0)), torch.nn.Parameter(torch.tensor(MU))

    def forward(self, x, t):
        a, s = (v.float().reshape(-1, 1, 1, 1) for v in self.process.marginal_at(t))
        std = (a ** 2 * SD ** 2 + s ** 2).sqrt()
        return s * (x - a * self.mu) / (std * (std + self.c * a * SD))


@pytest.mark.parametrize("process", ["flow", "ve"])
def test_ect_tunes_the_denoiser_into_the_consistency_function(process):
    """From the denoiser (c = 0), eight stages of the ECT loss on Gaussian samples move the student to f* (c = 1):
    c within 0.05 of 1 and mu within 0.03 of MU."""
    p, g = PROCESSES[process](), gen()
    student = AffineStudent(p)
    opt = torch.optim.Adam(student.parameters(), lr=2e-2)
    for stage in range(8):
        for _ in range(60):
            x0 = MU + SD * torch.randn(2048, 1, 1, 1, generator=g)
            loss = p.consistency_loss(student, x0, stage, t=p.train_t(2048, generator=g),
                                      noise=torch.randn(2048, 1, 1, 1, generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert abs(student.c.item() - 1) < 0.05 and abs(student.mu.item() - MU) < 0.03, (student.c, student.mu)


def test_consistency_distillation_with_a_teacher_that_knows_the_draw_is_ect():
    """A teacher returning the draw's own (x0, eps) makes its DDIM step land on alpha_r x0 + sigma_r eps: the
    distillation loss is then ECT's, sample by sample, at every stage and at r = 0."""
    p = ddpm.FlowMatching()
    net = ddpm.Predictor(ddpm.UNet(in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                                   attn_resolutions=(), image_size=8, norm_group_size=4,
                                   time_scale=p.model_time_scale), p, "velocity")
    x0, noise = torch.rand(6, 1, 8, 8, generator=gen()) * 2 - 1, torch.randn(6, 1, 8, 8, generator=gen(1))
    t = p.train_t(6, generator=gen(2))
    for stage in (None, 0, 2, 5):
        ect = p.consistency_loss(net.model, x0, stage, t=t, noise=noise, prediction="velocity", reduction="none")
        cd = p.consistency_loss(net.model, x0, stage, t=t, noise=noise, prediction="velocity", reduction="none",
                                teacher=lambda x, t_, y: (x0, noise))
        assert torch.allclose(ect, cd, rtol=1e-5, atol=1e-7), (stage, ect, cd)


@pytest.mark.parametrize("process", ["flow", "ve"])
def test_consistency_distillation_from_the_exact_denoiser_reaches_the_consistency_function(process):
    """With the exact denoiser of Gaussian data as the teacher, eight stages of distillation move the student from
    the denoiser (c = 0) to f* (c = 1): the teacher's DDIM steps shrink with the stages, so c ends within 0.05."""
    p, g = PROCESSES[process](), gen()
    student, oracle = AffineStudent(p), ddpm.GaussianOracle(p, MU, SD)
    opt = torch.optim.Adam(student.parameters(), lr=2e-2)
    for stage in range(8):
        for _ in range(60):
            x0 = MU + SD * torch.randn(2048, 1, 1, 1, generator=g)
            loss = p.consistency_loss(student, x0, stage, t=p.train_t(2048, generator=g),
                                      noise=torch.randn(2048, 1, 1, 1, generator=g),
                                      teacher=lambda x, t, y: oracle.predict(x, t))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert abs(student.c.item() - 1) < 0.05 and abs(student.mu.item() - MU) < 0.03, (student.c, student.mu)
