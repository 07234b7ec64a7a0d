"""ddpm.py: Denoising Diffusion Probabilistic Models and DDIM in one file.

Implements Ho, Jain & Abbeel 2020 ("Denoising Diffusion Probabilistic Models", DDPM), the cosine
schedule of Nichol & Dhariwal 2021, and Song, Meng & Ermon 2020 ("Denoising Diffusion Implicit
Models", DDIM) with DDIM inversion. Depends on torch alone, so the file can be copied anywhere:

    import torch, ddpm
    model = ddpm.UNet(**ddpm.PRESETS["tiny"]).eval()      # any model(x_t, t) -> eps works
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    loss = diffusion.loss(model, x0)                      # x0 in [-1, 1], shape [B, C, H, W]
    x = diffusion.ddim_sample(model, (16, 3, 32, 32), steps=50)

Timesteps are integers t = 0 .. T-1 throughout; code index t is the paper's step t + 1, so
alphas_cumprod[0] is the paper's alpha-bar_1 and alphas_cumprod[T-1] is alpha-bar_T.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# helpers


def extract(a, t, x_shape):
    """Gather a[t] for a batch of timesteps t [B] and shape it [B, 1, 1, ...] to broadcast on x."""
    return a.gather(0, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def _check_t(t, x):
    if t.dtype != torch.long or t.shape != (x.shape[0],):
        raise ValueError(f"t must be a LongTensor of shape [{x.shape[0]}], got {t.dtype} {tuple(t.shape)}")

# ----------------------------------------------------------------------------------------------
# beta schedules (float64)

SCHEDULES = ("linear", "cosine")


def make_betas(schedule, T, beta_start=1e-4, beta_end=0.02):
    """Return T betas as a float64 tensor.

    "linear": evenly spaced from beta_start to beta_end (Ho et al.; not rescaled with T).
    "cosine": Nichol & Dhariwal eq. 17, alpha-bar(t) = f(t) / f(0) with
              f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008, betas clipped at 0.999.
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")

# ----------------------------------------------------------------------------------------------
# U-Net blocks


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps t [B] -> [B, dim] (Vaswani et al. 2017).

    Frequencies w_i = max_period^(-2i/dim), i = 0 .. dim/2 - 1, laid out as [sin(t w), cos(t w)]:
    the halves of seed 000's eq. 8 concatenated instead of interleaved (the same features in a
    fixed order, which the MLP that follows does not care about).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _act(name):
    return {"silu": nn.SiLU, "relu": nn.ReLU}[name]()


def _norm(kind, ch):
    # GroupNorm with up to 32 groups (Ho et al. use 32 groups); BatchNorm as in seed 000.
    return nn.GroupNorm(math.gcd(32, ch), ch) if kind == "group" else nn.BatchNorm2d(ch)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between, plus a residual path;
    optionally followed by self-attention (Ho et al. put it after the res blocks at 16x16)."""

    def __init__(self, cin, cout, temb_dim, dropout, act, norm, attn=False):
        super().__init__()
        self.norm1, self.act1, self.conv1 = _norm(norm, cin), _act(act), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Sequential(_act(act), nn.Linear(temb_dim, cout))
        self.norm2, self.act2 = _norm(norm, cout), _act(act)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (Ho et al.)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = AttnBlock(cout, norm) if attn else None

    def forward(self, x, temb):
        h = self.conv1(self.act1(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        h = self.skip(x) + h
        return self.attn(h) if self.attn is not None else h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch, norm):
        super().__init__()
        self.norm = _norm(norm, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        # (B, HW, 3C): a free view when x is channels_last, one copy otherwise
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(B, 1, H * W, 3 * C)
        h = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # (B, 1, HW, C), one head
        return x + self.proj(h.reshape(B, H, W, C).permute(0, 3, 1, 2))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, temb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

# ----------------------------------------------------------------------------------------------
# U-Net

PRESETS = {
    # 0.63 M parameters: tests and CPU demos at 28-32 px.
    "tiny": dict(base_channels=24, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                 dropout=0.0, image_size=32),
    # Ho et al. CIFAR-10 model: 35.7 M parameters.
    "cifar10": dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1, image_size=32),
    # 64x64 faces in the spirit of seed 000: four levels to 8x8, attention only at 8x8 (cheap).
    "faces64": dict(base_channels=64, channel_mults=(1, 2, 2, 4), num_res_blocks=2,
                    attn_resolutions=(8,), dropout=0.1, image_size=64),
}


class UNet(nn.Module):
    """The DDPM noise predictor eps_theta(x_t, t) (Ho et al., appendix B).

    A U-Net of residual blocks with one resolution level per entry of channel_mults, a 2x
    downsampling between levels, self-attention at the listed resolutions, skip connections from
    every down block to its mirror up block, and a sinusoidal time embedding fed through an MLP
    into every residual block. `self.config` holds the constructor arguments (JSON-friendly).
    """

    def __init__(self, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, activation="silu", norm="group", image_size=32):
        super().__init__()
        if activation not in ("silu", "relu"):
            raise ValueError(f"activation must be 'silu' or 'relu', got {activation!r}")
        if norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} is not divisible by {factor} "
                             f"({len(channel_mults) - 1} downsamplings for channel_mults {tuple(channel_mults)})")
        self.config = dict(in_channels=in_channels, base_channels=base_channels,
                           channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout,
                           activation=activation, norm=norm, image_size=image_size)
        ch, temb_dim = base_channels, 4 * base_channels
        block = dict(temb_dim=temb_dim, dropout=dropout, act=activation, norm=norm)
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), _act(activation), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down, skips, res, cur = nn.ModuleList(), [ch], image_size, ch
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, attn=res in attn_resolutions, **block))
                cur = ch * mult
                skips.append(cur)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, attn=True, **block), ResBlock(cur, cur, **block)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, attn=res in attn_resolutions, **block))
                cur = ch * mult
            if level > 0:
                self.up.append(Upsample(cur))
                res *= 2

        self.out = nn.Sequential(_norm(norm, cur), _act(activation), nn.Conv2d(cur, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):
        """x: [B, C, H, W], t: [B] integer timesteps -> predicted noise [B, C, H, W]."""
        temb = self.temb(timestep_embedding(t, self.config["base_channels"]))
        hs = [self.conv_in(x)]
        for m in self.down:
            hs.append(m(hs[-1], temb))
        h = hs[-1]
        for m in self.mid:
            h = m(h, temb)
        for m in self.up:
            h = m(h) if isinstance(m, Upsample) else m(torch.cat([h, hs.pop()], dim=1), temb)
        return self.out(h)


def count_params(model):
    return sum(p.numel() for p in model.parameters())

# ----------------------------------------------------------------------------------------------
# exponential moving average of weights


class EMA:
    """Exponential moving average of a model's weights, kept in `self.model` (an eval-mode copy).

    update() does shadow <- d * shadow + (1 - d) * weights with d = min(decay, (1 + n) / (10 + n))
    after n updates, so that short runs are not dominated by the random initialisation.
    Buffers (e.g. BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model, decay=0.9999):
        self.decay, self.num_updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def copy_to(self, model):
        model.load_state_dict(self.model.state_dict())

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.model.load_state_dict(state["model"])

# ----------------------------------------------------------------------------------------------
# the diffusion process: forward process, loss and samplers

LOSSES = ("l2", "l1", "huber")


class Diffusion(nn.Module):
    """Gaussian diffusion with a fixed beta schedule (Ho et al.), with DDPM and DDIM samplers.

    All coefficients are computed in float64 and stored as float32 buffers, so they follow
    `.to(device)`. Timesteps are t = 0 .. T-1 for the paper's 1 .. T. `model` arguments are any
    callable model(x_t, t) -> eps_hat with t a LongTensor [B]; put an nn.Module in eval mode
    before sampling.
    """

    def __init__(self, betas):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D sequence of values in (0, 1)")
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # beta-tilde, eq. 7
        buffers = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,
            # beta-tilde is 0 at t = 0: clip the log to the next value, as Ho et al. do
            posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def T(self):
        return self.betas.shape[0]

    # -- forward process ----------------------------------------------------------------------

    def q_sample(self, x0, t, noise=None):
        """Sample q(x_t | x_0) = N(sqrt(a-bar_t) x_0, (1 - a-bar_t) I) (Ho et al. eq. 4)."""
        _check_t(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x0
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.shape),
                extract(self.posterior_log_variance_clipped, t, x_t.shape))

    def predict_x0(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - a-bar_t) eps) / sqrt(a-bar_t), eq. 4 solved for x_0."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    # -- training -----------------------------------------------------------------------------

    def loss(self, model, x0, loss_type="l2", t=None, noise=None):
        """L_simple (Ho et al. eq. 14): E_{t, x0, eps} ||eps - eps_theta(x_t, t)||, t ~ U{0..T-1}.

        loss_type: "l2" (the paper's), "l1", or "huber" (SmoothL1, as seed 003). Returns a scalar.
        """
        if x0.ndim != 4:
            raise ValueError(f"x0 must be [B, C, H, W], got shape {tuple(x0.shape)}")
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        eps = model(self.q_sample(x0, t, noise), t)
        if loss_type == "l2":
            return F.mse_loss(eps, noise)
        if loss_type == "l1":
            return F.l1_loss(eps, noise)
        if loss_type == "huber":
            return F.smooth_l1_loss(eps, noise)
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSSES)}")

    # -- samplers -----------------------------------------------------------------------------

    def _start(self, shape, x_T, generator):
        if x_T is not None:
            return x_T.to(self.betas.device, torch.float32)
        if shape is None:
            raise ValueError("give shape or x_T")
        return torch.randn(tuple(shape), generator=generator, device=self.betas.device)

    @torch.inference_mode()
    def ddpm_sample(self, model, shape=None, x_T=None, variance="beta", clip_x0=True, generator=None,
                    return_trajectory=False, progress=None):
        """Ancestral sampling, Ho et al. Algorithm 2: T model calls from x_T ~ N(0, I) to x_0.

        x_{t-1} = mu + sigma_t z with mu the posterior mean of q(x_{t-1} | x_t, x0_hat) (which
        equals eq. 11 when x0_hat is not clipped) and sigma_t^2 = beta_t ("beta") or beta-tilde_t
        ("posterior"). clip_x0 clips x0_hat to [-1, 1] first. `generator` lives on the sampling
        device. progress(i, n) is called after each step. Returns x_0, or (x_0, [x_T, ..., x_0]).
        """
        if variance not in ("beta", "posterior"):
            raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
        x = self._start(shape, x_T, generator)
        sigmas = (self.betas if variance == "beta" else self.posterior_variance).sqrt()
        ts = torch.arange(self.T, device=x.device)
        trajectory = [x]
        for n, i in enumerate(reversed(range(self.T))):
            t = ts[i].expand(x.shape[0])
            x0 = self.predict_x0(x, t, model(x, t))
            if clip_x0:
                x0 = x0.clamp(-1, 1)
            x = self.posterior_mean_coef1[i] * x0 + self.posterior_mean_coef2[i] * x
            if i > 0:  # no noise at the last step: x_0 is the mean
                x = x + sigmas[i] * torch.randn(x.shape, generator=generator, device=x.device)
            if return_trajectory:
                trajectory.append(x)
            if progress:
                progress(n + 1, self.T)
        return (x, trajectory) if return_trajectory else x

    def ddim_timesteps(self, steps):
        """The DDIM sub-sequence t_i = i * (T // steps), i = 0 .. steps-1, ascending."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in 1..{self.T}, got {steps}")
        return [i * (self.T // steps) for i in range(steps)]

    @torch.inference_mode()
    def ddim_sample(self, model, shape=None, x_T=None, steps=50, eta=0.0, clip_x0=True, generator=None,
                    return_trajectory=False, progress=None):
        """DDIM sampling (Song et al. eq. 12) over the sub-sequence ddim_timesteps(steps), reversed:

        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev), with a_prev = 1 after the
        last step. eta = 0 is deterministic; eta = 1 with steps = T is DDPM with beta-tilde.
        With clip_x0, eps_hat is recomputed from the clipped x0_hat. Returns as ddpm_sample.
        """
        x = self._start(shape, x_T, generator)
        ts = self.ddim_timesteps(steps)[::-1]
        # every per-step coefficient is computed once here, in float64, before the loop
        a = self.alphas_cumprod.double()[ts]
        a_prev = torch.cat([a[1:], a.new_ones(1)])
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        c_x0, c_eps = a_prev.sqrt().float(), (1 - a_prev - sigma ** 2).clamp(min=0).sqrt().float()
        sigma, t_all = sigma.float(), torch.tensor(ts, device=x.device)
        trajectory = [x]
        for k in range(steps):
            t = t_all[k].expand(x.shape[0])
            eps = model(x, t)
            x0 = self.predict_x0(x, t, eps)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = (extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x - x0) \
                    / extract(self.sqrt_recipm1_alphas_cumprod, t, x.shape)
            x = c_x0[k] * x0 + c_eps[k] * eps
            if eta > 0 and k < steps - 1:  # no noise at the last step (sigma is 0 there anyway)
                x = x + sigma[k] * torch.randn(x.shape, generator=generator, device=x.device)
            if return_trajectory:
                trajectory.append(x)
            if progress:
                progress(k + 1, steps)
        return (x, trajectory) if return_trajectory else x

    @torch.inference_mode()
    def ddim_invert(self, model, x0, steps=50, refine=2, progress=None):
        """DDIM inversion: the deterministic (eta = 0) DDIM step solved for x_t, run x_0 -> x_T.

        The sampler's step from t_k to t_{k-1} is solved for its input,
        x = sqrt(a / a_prev) (x_prev - sqrt(1 - a_prev) eps) + sqrt(1 - a) eps, first with eps taken
        at (x_prev, t_{k-1}) (the classic inversion of Song et al.: refine=0), then `refine`
        fixed-point iterations with eps at (x, t_k), the point the sampler will see. Each costs one
        model call and shrinks the round-trip error of ddim_sample(..., clip_x0=False) about tenfold.
        """
        x = x0.to(self.betas.device, torch.float32)
        ts = self.ddim_timesteps(steps)
        a = self.alphas_cumprod.double()[ts]
        a_prev = torch.cat([a.new_ones(1), a[:-1]])  # a-bar before each step; 1 for the clean image
        c_prev, s_prev, s = (a / a_prev).sqrt().float(), (1 - a_prev).sqrt().float(), (1 - a).sqrt().float()
        t_all = torch.tensor(ts, device=x.device)
        for k in range(steps):
            x_prev = x
            for j in range(refine + 1):
                t = t_all[max(k - 1, 0) if j == 0 else k].expand(x.shape[0])
                eps = model(x, t)
                x = c_prev[k] * (x_prev - s_prev[k] * eps) + s[k] * eps
            if progress:
                progress(k + 1, steps)
        return x
