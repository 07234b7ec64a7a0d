"""Tests of the process contract (ddpm.ScoreSDE) and flow matching (ddpm.FlowMatching): the conversions between
predictions, every sampler, the loss and the likelihood on the flow against closed forms for Gaussian data, and a
process written here, outside ddpm.py, running through all of them. CPU only.

Run every test file:  python -m pytest -q
"""
import math

import pytest
import torch
from scipy import stats

import ddpm

from conftest import gen

MU, SD = 0.3, 0.5


def flow(**kw):
    return ddpm.FlowMatching(**kw)


def gaussian_std(process, t, sd=SD):
    """std of x_t for x0 ~ N(mu, sd^2): sqrt(alpha^2 sd^2 + sigma^2)."""
    alpha, sigma = process.marginal(torch.tensor(t, dtype=torch.float64))
    return math.sqrt(alpha.item() ** 2 * sd ** 2 + sigma.item() ** 2)


class CosineVP(ddpm.ScoreSDE):
    """The contract met outside ddpm.py: alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2) on t in [1e-3, 1] (the
    cosine schedule of Nichol & Dhariwal 2021 in continuous time, without its offset), pure noise at t = 1."""
    name = "cosine-vp"
    variance_preserving = True
    spacings = ("time",)
    t_start, t_end = 1.0, 1e-3

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def __init__(self):
        super().__init__()
        self.register_buffer("one", torch.ones(()), persistent=False)

    def marginal(self, t):
        return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)

    def marginal_slope(self, t):
        return -math.pi / 2 * torch.sin(math.pi / 2 * t), math.pi / 2 * torch.cos(math.pi / 2 * t)

    def sde(self, t):  # f = d log alpha / dt; g^2 = d sigma^2 / dt - 2 f sigma^2 = pi tan(pi t / 2)
        tan = torch.tan(math.pi / 2 * t)
        return -math.pi / 2 * tan, math.pi * tan

    def train_t(self, n, generator=None, device=None):
        return self.t_end + (1 - self.t_end) * torch.rand(n, generator=generator, device=device or self.device)


SAMPLERS = {  # name -> (sample(process, model, shape, generator), tolerance on the std at that cost)
    "ddpm": (lambda p, m, shape, g: p.ddpm_sample(m, shape, steps=200, clip_x0=False, generator=g), 0.03),
    "ddim": (lambda p, m, shape, g: p.ddim_sample(m, shape, steps=100, clip_x0=False, generator=g), 0.03),
    "ddim-eta1": (lambda p, m, shape, g: p.ddim_sample(m, shape, steps=500, eta=1, clip_x0=False, generator=g), 0.03),
    "dpm++2m": (lambda p, m, shape, g: p.dpm_solver_sample(m, shape, steps=50, order=2, eta=0, clip_x0=False,
                                                           generator=g), 0.03),
    "dpm++3m": (lambda p, m, shape, g: p.dpm_solver_sample(m, shape, steps=20, order=3, eta=0, clip_x0=False,
                                                           generator=g), 0.03),
    "sde-dpm++2m": (lambda p, m, shape, g: p.dpm_solver_sample(m, shape, steps=100, order=2, eta=1, clip_x0=False,
                                                               generator=g), 0.03),
    "em": (lambda p, m, shape, g: p.sde_sample(m, shape, steps=500, generator=g), 0.03),
    "pc": (lambda p, m, shape, g: p.sde_sample(m, shape, steps=300, corrector_steps=1, generator=g), 0.04),
    "ode": (lambda p, m, shape, g: p.ode_sample(m, shape, generator=g)[0], 0.01),
}


# ----------------------------------------------------------------------------------------------
# predictions


@pytest.mark.parametrize("kind", ddpm.PREDICTIONS)
def test_every_prediction_converts_back_to_x0_and_eps_on_any_process(kind):
    """from_prediction inverts prediction_target for VP, VE and flow marginals; v and velocity at alpha = 0 too."""
    x0, eps = torch.randn(2, 64, generator=gen()).double()
    pairs = [(0.8, 0.6), (1.0, 3.0), (0.3, 0.7), (0.05, 0.95)] + ([(0.0, 1.0)] if kind in ("v", "velocity") else [])
    for alpha, sigma in pairs:
        alpha, sigma = torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
        x = alpha * x0 + sigma * eps
        out = ddpm.prediction_target(kind, x0, eps, alpha, sigma)
        got_x0, got_eps = ddpm.from_prediction(kind, out, x, alpha, sigma)
        assert torch.allclose(got_x0, x0, atol=1e-12) and torch.allclose(got_eps, eps, atol=1e-12)
        # x0_weight: the kind's squared error per unit of x0_hat's, at fixed x
        d = 1e-3 * torch.randn(64, generator=gen(1)).double()
        moved = ddpm.prediction_target(kind, x0 + d, (x - alpha * (x0 + d)) / sigma, alpha, sigma)
        assert ((moved - out) ** 2).sum() / (d ** 2).sum() == pytest.approx(
            ddpm.x0_weight(kind, alpha, sigma).item(), rel=1e-9)


def test_a_velocity_network_is_safe_at_pure_noise():
    """At t = 1 (alpha = 0) the flow's x0_hat = x - u and eps_hat = x, and every wrapper keeps them finite."""
    p, x = flow(), torch.randn(3, 1, 4, 4, generator=gen())
    t = torch.ones(3)
    u = torch.randn(3, 1, 4, 4, generator=gen(1))
    net = ddpm.Predictor(lambda x, t: u, p, "velocity")
    x0, eps = net.predict(x, t)
    assert torch.equal(x0, x - u) and torch.equal(eps, x)
    guided = ddpm.Guided(net, None, 2.0, guide=ddpm.Predictor(lambda x, t: 0 * u, p, "velocity"), process=p)
    g0, geps = guided.predict(x, t)
    assert torch.allclose(g0, x - 2 * u) and torch.allclose(geps, x)
    c0, ceps = p.clipped(net).predict(x, t)
    assert torch.equal(c0, (x - u).clamp(-1, 1)) and torch.allclose(ceps, x)
    assert torch.isfinite(p.ode_drift(net, 1.0, x)).all() and torch.allclose(p.ode_drift(net, 1.0, x), u)
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[..., :2] = True
    r0, reps = ddpm.ReconstructionGuided(net, p, x, keep, 1.0).predict(x, t)
    assert torch.isfinite(r0).all() and torch.allclose(reps, x, atol=1e-6)


def test_a_v_prediction_run_on_ddpm_samples_exactly_as_its_eps_form():
    """Predictor "v" on VP is eps = sigma x + alpha v (Salimans & Ho): bit for bit the former EpsFromV's samples."""
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    oracle = ddpm.gaussian_eps(d)

    def v_net(x, t):
        x0, eps = oracle.predict(x, t)
        alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in d.marginal_at(t))
        return alpha * eps - sigma * x0

    def eps_form(x, t):
        alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in d.marginal_at(t))
        return sigma * x + alpha * v_net(x, t)
    for net in (ddpm.Predictor(v_net, d, "v"), ddpm.EpsFromV(v_net, d)):
        a = d.dpm_solver_sample(net, (8, 1, 4, 4), steps=10, eta=1, generator=gen())
        assert torch.equal(a, d.dpm_solver_sample(eps_form, (8, 1, 4, 4), steps=10, eta=1, generator=gen()))

# ----------------------------------------------------------------------------------------------
# flow matching: closed forms for Gaussian data


def test_flow_marginals_run_from_data_to_pure_noise():
    p = flow()
    alpha, sigma = p.marginal(torch.tensor([p.t_end, 0.5, 1.0], dtype=torch.float64))
    assert torch.equal(alpha, torch.tensor([1 - p.t_end, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(alpha + sigma, torch.ones(3, dtype=torch.float64))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    (f, g2), (da, ds), (a, s) = p.sde(t), p.marginal_slope(t), p.marginal(t)
    assert torch.allclose(f * a, da) and torch.allclose(g2, 2 * s * ds - 2 * f * s ** 2)  # the path's SDE


def test_the_flows_shifted_grid_is_its_formula():
    """t = s u / (1 + (s - 1) u) over u evenly spaced, from pure noise (t = 1) to t_end (Esser et al. 2024)."""
    for shift in (1.0, 3.0):
        p = flow(shift=shift)
        times = p.time_grid(10)  # the flow's default grid
        u = torch.linspace(1, p.t_end / (shift - (shift - 1) * p.t_end), 10, dtype=torch.float64)
        assert torch.allclose(times, shift * u / (1 + (shift - 1) * u), atol=1e-15)
        assert times[0] == 1 and times[-1] == p.t_end and (times[1:] < times[:-1]).all()
    assert torch.allclose(flow(shift=1.0).time_grid(10), flow().time_grid(10, "time"), atol=1e-15)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_on_the_flow_returns_the_data_law(sampler):
    p = flow()
    sample, tol = SAMPLERS[sampler]
    x = sample(p, ddpm.gaussian_eps(p, MU, SD), (4096, 1, 2, 2), gen())
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(SD, rel=tol)


def test_ddim_on_the_flow_is_euler_on_the_velocity_and_its_error_falls_with_steps():
    """DDIM (eta = 0) on the flow is x <- x + (t' - t) u(x, t) (Liu et al. 2022's Euler sampler), ending at t = 0."""
    p = flow()
    oracle = ddpm.gaussian_eps(p, MU, SD)
    x_T = torch.randn(2048, 1, 2, 2, generator=gen())
    times = p.time_grid(8).tolist() + [0.0]
    x = x_T.clone()
    for t, t_next in zip(times, times[1:]):
        x0, eps = oracle.predict(x, torch.full((len(x),), t))
        x = x + (t_next - t) * (eps - x0)
    assert torch.allclose(p.ddim_sample(oracle, x_T=x_T, steps=8, clip_x0=False), x, atol=1e-5)
    errors = [abs(p.ddim_sample(oracle, x_T=x_T, steps=n, clip_x0=False).std().item() - SD) for n in (5, 10, 20, 40)]
    assert all(b < a for a, b in zip(errors, errors[1:])) and errors[-1] < 0.2 * errors[0]


def test_flow_ode_likelihood_is_the_closed_form():
    """bits_per_dim at x0 is -log N(x0; alpha_e mu, alpha_e^2 sd^2 + sigma_e^2) / (D ln 2), the law of x at t_end."""
    p = flow()
    x0 = MU + SD * torch.randn(6, 1, 2, 2, generator=gen())
    alpha, sigma = p.marginal(torch.tensor(p.t_end, dtype=torch.float64))
    var = alpha ** 2 * SD ** 2 + sigma ** 2
    log_p = (-0.5 * torch.log(2 * math.pi * var) - (x0.double() - alpha * MU) ** 2 / (2 * var)).flatten(1).sum(1)
    bpd = p.bits_per_dim(ddpm.gaussian_eps(p, MU, SD), x0, hutchinson=0, rtol=1e-6, atol=1e-6)
    assert torch.allclose(bpd.double(), -log_p / (4 * math.log(2)), atol=2e-3)


@pytest.mark.parametrize("mean, scale", [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_training_times(mean, scale):
    t = flow(mean=mean, scale=scale).train_t(20000, generator=gen()).double()
    assert ((t > 0) & (t < 1)).all()
    assert stats.kstest(torch.logit(t).numpy(), "norm", args=(mean, scale)).pvalue > 0.01
    u = flow(density="uniform").train_t(20000, generator=gen()).double()
    assert stats.kstest(u.numpy(), "uniform", args=(1e-3, 1 - 1e-3)).pvalue > 0.01


def test_flow_loss_at_the_exact_velocity_is_its_posterior_variance():
    """E||u - E[u | x_t]||^2 per element = ((alpha + sigma) / sigma)^2 Var[x0 | x_t] = (alpha + sigma)^2 sd^2 /
    (alpha^2 sd^2 + sigma^2): the velocity MSE of Esser et al. at the optimum."""
    p, t_value = flow(), 0.4
    oracle = ddpm.gaussian_eps(p, MU, SD)
    velocity = lambda x, t: (lambda x0, eps: eps - x0)(*oracle.predict(x, t))
    x0 = MU + SD * torch.randn(8192, 1, 2, 2, generator=gen())
    loss = p.loss(velocity, x0, t=torch.full((8192,), t_value), noise=torch.randn(x0.shape, generator=gen(1)),
                  prediction="velocity").item()
    alpha, sigma = 1 - t_value, t_value
    assert loss == pytest.approx((alpha + sigma) ** 2 * SD ** 2 / (alpha ** 2 * SD ** 2 + sigma ** 2), rel=0.03)


def test_inpainting_and_sdedit_on_the_flow():
    p = flow()
    oracle = ddpm.gaussian_eps(p, MU, SD)
    x0 = torch.full((64, 1, 4, 4), 0.9)
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[..., :2] = True
    x = p.dpm_solver_sample(oracle, x_T=torch.randn(x0.shape, generator=gen()), steps=10,
                            hook=ddpm.Replace(x0, keep, gen(1)), clip_x0=False)
    assert torch.equal(x[..., :2], x0[..., :2]) and torch.isfinite(x).all()
    # SDEdit from t_0 = 0.5: x_t0 = 0.5 x0 + 0.5 z, then the ODE's law: the mean moves from 0.9 towards mu
    start = 0.5
    x_t0 = (1 - start) * x0 + start * torch.randn(x0.shape, generator=gen(2))
    out = p.ddim_sample(oracle, x_T=x_t0, steps=50, start=start, clip_x0=False)
    std_s = gaussian_std(p, start)
    expected = MU + SD * ((1 - start) * 0.9 - (1 - start) * MU) / std_s  # the affine flow's image of x_t0's mean
    assert out.mean().item() == pytest.approx(expected, abs=0.03)

# ----------------------------------------------------------------------------------------------
# the contract: a process defined in this file


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_process_defined_outside_ddpm_runs_with_every_sampler(sampler):
    p = CosineVP()
    sample, tol = SAMPLERS[sampler]
    x = sample(p, ddpm.gaussian_eps(p, MU, SD), (4096, 1, 2, 2), gen())
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(SD, rel=tol)


def test_a_process_defined_outside_ddpm_trains_and_has_a_likelihood():
    p = CosineVP()
    oracle = ddpm.gaussian_eps(p, MU, SD)
    x0 = MU + SD * torch.randn(8192, 1, 2, 2, generator=gen())
    t = torch.full((8192,), 0.5)
    loss = p.loss(oracle, x0, t=t, noise=torch.randn(x0.shape, generator=gen(1))).item()
    alpha2 = math.cos(math.pi / 4) ** 2
    assert loss == pytest.approx(alpha2 * SD ** 2 / (alpha2 * SD ** 2 + 1 - alpha2), rel=0.03)
    x = x0[:4]
    alpha, sigma = p.marginal(torch.tensor(p.t_end, dtype=torch.float64))
    var = alpha ** 2 * SD ** 2 + sigma ** 2
    log_p = (-0.5 * torch.log(2 * math.pi * var) - (x.double() - alpha * MU) ** 2 / (2 * var)).flatten(1).sum(1)
    bpd = p.bits_per_dim(oracle, x, hutchinson=0, rtol=1e-6, atol=1e-6)
    assert torch.allclose(bpd.double(), -log_p / (4 * math.log(2)), atol=2e-3)


def test_the_registry_builds_every_process_from_a_configuration():
    cfg = {"schedule": "linear", "T": 100, "beta_start": 1e-4, "beta_end": 0.02, "sigma": 10.0,
           "time_density": "uniform", "logit_mean": 0.0, "logit_scale": 1.0}
    for name, cls in ddpm.PROCESSES.items():
        p = ddpm.make_process(cfg | {"process": name})
        assert type(p) is cls and p.name == name and p.predictions
    assert ddpm.make_process(cfg | {"process": "flow"}).density == "uniform"
    with pytest.raises(ValueError, match="unknown process 'nope'"):
        ddpm.make_process(cfg | {"process": "nope"})
    with pytest.raises(NotImplementedError, match="CosineVP.sde|ScoreSDE.marginal"):
        ddpm.ScoreSDE().marginal(torch.zeros(1))
