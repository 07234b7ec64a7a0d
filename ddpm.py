"""ddpm.py: diffusion models in one file: DDPM, DDIM, DPM-Solver++ and the score-SDE view.

Implements Ho, Jain & Abbeel 2020 ("Denoising Diffusion Probabilistic Models", DDPM), the cosine
schedule of Nichol & Dhariwal 2021, Song, Meng & Ermon 2020 ("Denoising Diffusion Implicit
Models", DDIM) with DDIM inversion, Lu et al. 2022 (DPM-Solver++), and Song et al. 2021
("Score-Based Generative Modeling through SDEs"): the VE SDE, and for both it and DDPM read as
the VP SDE, Euler-Maruyama, predictor-corrector and probability-flow ODE samplers and exact
likelihoods; flow matching (Lipman et al. 2022, Esser et al. 2024) as a third process; Karras et al.
2022's grid and Heun sampler. SAMPLERS names every sampler, sample() runs one by name. Depends on
torch alone, so the file can be copied anywhere:

    import torch, ddpm
    model = ddpm.UNet(**ddpm.PRESETS["tiny"]).eval()      # any model(x_t, t) -> eps works
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    loss = diffusion.loss(model, x0)                      # x0 in [-1, 1], shape [B, C, H, W]
    x = diffusion.dpm_solver_sample(model, (16, 3, 32, 32), steps=10)
    x = ddpm.sample(diffusion, model, "heun", (16, 3, 32, 32), steps=18)  # 35 model calls
    x, nfe = diffusion.ode_sample(model, (16, 3, 32, 32))  # the same model as an SDE

Training takes eps- or v-prediction (Salimans & Ho 2022; EpsFromV turns a v-model into the eps-model
every sampler takes) and min-SNR-gamma weights (Hang et al. 2023). Every sampler's generator may be a
list of per-sample generators (sample_generators), so that a sample does not depend on its batch.

Timesteps are integers t = 0 .. T-1 throughout; code index t is the paper's step t + 1, so
alphas_cumprod[0] is the paper's alpha-bar_1 and alphas_cumprod[T-1] is alpha-bar_T. The SDE
samplers call a DDPM model at fractional t in [0, T-1], and a VESDE model at t in (0, 1].
"""
import copy
import inspect
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# helpers


def extract(a, t, x_shape):
    """Gather a[t] for a batch of timesteps t [B] and shape it [B, 1, 1, ...] to broadcast on x."""
    return a.gather(0, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def randn(shape, generator=None, device=None):
    """Standard normal noise of `shape`. generator: a torch.Generator, or a list of one per sample
    (shape[0] of them), so that each sample's noise does not depend on the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device)


def sample_generators(seed, indices, device="cpu"):
    """One generator per sample, seeded from (seed, sample index): pass the list as any sampler's
    generator and sample i is the same whichever batch, or process, draws it. The CPU generator keeps
    32 bits of a seed, so (seed, i) maps to (i + seed * 0x9E3779B1) mod 2^32: seed 0 seeds sample i with i."""
    return [torch.Generator(device).manual_seed((i + seed * 0x9E3779B1) % 2 ** 32) for i in indices]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element for data on the 8-bit grid in [-1, 1] under N(mean, e^(2 log_scale)) integrated
    over x's bin of width 2/255, the end bins reaching to -inf and +inf (Ho et al. section 3.3, eq. 13).
    The bin's mass is a difference of log-CDFs on the side of the mean where both are small (a bin above
    the mean is reflected below it), so it stays exact many scales into either tail."""
    lo, hi = (x - mean - 1 / 255) / log_scale.exp(), (x - mean + 1 / 255) / log_scale.exp()
    above = lo > 0
    a, b = torch.where(above, -hi, lo), torch.where(above, -lo, hi)  # a < b, and a < 0
    log_b = torch.special.log_ndtr(b)
    middle = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))
    return torch.where(x < -0.999, torch.special.log_ndtr(hi),
                       torch.where(x > 0.999, torch.special.log_ndtr(-lo), middle))


def _central_slopes(y):
    """dy/di at each index of a 1-D sequence: central differences inside, one-sided at the two ends."""
    if len(y) < 2:
        return torch.zeros_like(y)
    inner = (y[2:] - y[:-2]) / 2
    return torch.cat([y[1:2] - y[:1], inner, y[-1:] - y[-2:-1]])

# ----------------------------------------------------------------------------------------------
# beta schedules (float64)

SCHEDULES = ("linear", "cosine", "rescaled-linear")


def make_betas(schedule, T, beta_start=1e-4, beta_end=0.02):
    """Return T betas as a float64 tensor.

    "linear": evenly spaced from beta_start to beta_end (Ho et al.; not rescaled with T).
    "rescaled-linear": the same with both ends times 1000 / T (improved-diffusion's convention), so
              that alpha-bar_T stays near Ho et al.'s 4.0e-5: 2.0e-5 at T = 100, 3.4e-5 at 300, 4.2e-5
              at 2000, but 7.7e-6 at 50 and 2.4e-7 at 25; "linear" at T = 1000.
    "cosine": Nichol & Dhariwal eq. 17, alpha-bar(t) = f(t) / f(0) with
              f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008, betas clipped at 0.999.
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "rescaled-linear":
        if beta_end * 1000 / T >= 1:
            raise ValueError(f"rescaled-linear needs beta_end * 1000 / T < 1, got T = {T}")
        return torch.linspace(beta_start * 1000 / T, beta_end * 1000 / T, T, dtype=torch.float64)
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
    the two halves concatenated as in Ho et al.'s code, not interleaved as in Vaswani et al. (the same features in a
    fixed order, which the MLP that follows does not care about).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _act(name):
    return {"silu": nn.SiLU, "relu": nn.ReLU}[name]()


def _norm(kind, ch, group_size=None):
    """GroupNorm (Wu & He 2018), or BatchNorm. group_size channels per group; None: gcd(32, ch) groups,
    which is Ho et al.'s 32 at their widths but a single channel per group (an instance norm, which
    discards every channel's mean) at 16 or 32 channels, the U-Net's rule before group_size existed."""
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    return nn.GroupNorm(math.gcd(32, ch) if group_size is None else ch // group_size, ch)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between, plus a residual path;
    optionally followed by self-attention (Ho et al. put it after the res blocks at 16x16)."""

    def __init__(self, cin, cout, temb_dim, dropout, act, norm, attn_heads=0, group_size=None):
        super().__init__()
        self.norm1, self.act1 = _norm(norm, cin, group_size), _act(act)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Sequential(_act(act), nn.Linear(temb_dim, cout))
        self.norm2, self.act2 = _norm(norm, cout, group_size), _act(act)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (Ho et al.)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = AttnBlock(cout, norm, attn_heads, group_size) if attn_heads else None

    def forward(self, x, temb):
        h = self.conv1(self.act1(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        h = self.skip(x) + h
        return self.attn(h) if self.attn is not None else h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch, norm, num_heads=1, group_size=None):
        super().__init__()
        self.norm = _norm(norm, ch, group_size)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.num_heads = num_heads
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        n = self.num_heads
        # (B, HW, 3C): a free view when x is channels_last, one copy otherwise
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, 3 * C)
        q, k, v = (a.reshape(B, H * W, n, C // n).transpose(1, 2) for a in qkv.chunk(3, dim=-1))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)  # (B, HW, C)
        # the 1x1 projection as the matmul it is: on this (B, HW, C) layout a conv's weight gradient comes out
        # channels_last, which DDP's gradient buckets (laid out as the weight) warn about and copy
        h = F.linear(h, self.proj.weight.flatten(1), self.proj.bias)
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)


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
    # 0.28 M parameters: tests and CPU demos at 28-32 px. Four channels per GroupNorm group, where
    # the gcd(32, C) rule gives 16 and 32 channels one each, an instance norm (docs/recipes.md).
    "tiny": dict(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                 dropout=0.0, image_size=32, norm_group_size=4),
    # Ho et al. CIFAR-10 model: 35.7 M parameters.
    "cifar10": dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1, image_size=32),
    # 64x64 faces: four levels to 8x8, attention only at 8x8 (cheap).
    "faces64": dict(base_channels=64, channel_mults=(1, 2, 2, 4), num_res_blocks=2,
                    attn_resolutions=(8,), dropout=0.1, image_size=64),
}


def unet_resolutions(image_size, channel_mults):
    """The feature-map sizes of the U-Net's levels, image_size halved at each; ValueError when the
    downsamplings do not divide image_size."""
    factor = 2 ** (len(channel_mults) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by {factor} "
                         f"({len(channel_mults) - 1} downsamplings for channel_mults {tuple(channel_mults)})")
    return [image_size // 2 ** level for level in range(len(channel_mults))]


class UNet(nn.Module):
    """The DDPM noise predictor eps_theta(x_t, t) (Ho et al., appendix B).

    A U-Net of residual blocks with one resolution level per entry of channel_mults, a 2x
    downsampling between levels, self-attention (num_heads heads) at the listed resolutions, skip connections from
    every down block to its mirror up block, and a sinusoidal time embedding fed through an MLP
    into every residual block. `self.config` holds the constructor arguments (JSON-friendly).
    norm_group_size: channels per GroupNorm group (see _norm); None keeps the rule of configs saved
    before it existed, whose models it therefore rebuilds unchanged.
    """

    def __init__(self, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, activation="silu", norm="group", image_size=32,
                 time_scale=1.0, num_heads=1, norm_group_size=None, num_classes=None):
        super().__init__()
        if activation not in ("silu", "relu"):
            raise ValueError(f"activation must be 'silu' or 'relu', got {activation!r}")
        if norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")
        if base_channels < 1 or num_res_blocks < 1 or not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"base_channels, num_res_blocks and every channel_mult must be at least 1, got "
                             f"{base_channels}, {num_res_blocks} and {tuple(channel_mults)}")
        resolutions = unet_resolutions(image_size, channel_mults)
        if set(attn_resolutions) - set(resolutions):
            raise ValueError(f"attention resolutions {sorted(set(attn_resolutions) - set(resolutions))} are not among "
                             f"this U-Net's resolutions {resolutions}")
        widths = {base_channels * m for m in channel_mults}
        if num_heads < 1 or any(w % num_heads for w in widths):
            raise ValueError(f"num_heads must be at least 1 and divide every level's channels {sorted(widths)}, "
                             f"got {num_heads}")
        if norm_group_size is not None and (norm_group_size < 1 or any(w % norm_group_size for w in widths)):
            raise ValueError(f"norm_group_size must be at least 1 and divide every level's channels "
                             f"{sorted(widths)}, got {norm_group_size}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.config = dict(in_channels=in_channels, base_channels=base_channels,
                           channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout,
                           activation=activation, norm=norm, image_size=image_size, time_scale=time_scale,
                           num_heads=num_heads, norm_group_size=norm_group_size, num_classes=num_classes)
        ch, temb_dim = base_channels, 4 * base_channels
        block = dict(temb_dim=temb_dim, dropout=dropout, act=activation, norm=norm, group_size=norm_group_size)
        heads = lambda res: num_heads if res in attn_resolutions else 0  # 0: no attention at this resolution
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), _act(activation), nn.Linear(temb_dim, temb_dim))
        # class embeddings added to the time embedding (Dhariwal & Nichol 2021); row num_classes is the null class
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down, skips, res, cur = nn.ModuleList(), [ch], image_size, ch
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, attn_heads=heads(res), **block))
                cur = ch * mult
                skips.append(cur)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, attn_heads=num_heads, **block), ResBlock(cur, cur, **block)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, attn_heads=heads(res), **block))
                cur = ch * mult
            if level > 0:
                self.up.append(Upsample(cur))
                res *= 2

        self.out = nn.Sequential(_norm(norm, cur, norm_group_size), _act(activation),
                                 nn.Conv2d(cur, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None):
        """x: [B, C, H, W], t: [B] timesteps (integers, or floats for the SDE samplers), y: [B] class labels
        of a class-conditional U-Net (None, or the index num_classes: the null class) -> noise [B, C, H, W].

        time_scale multiplies t first. A VE model's t in (0, 1] is scaled by 1000 so that its embedding
        spans the same frequencies as DDPM's 0..999; sigma_t grows monotonically with t (log sigma_t
        tends to t ln sigma), so this conditions on the noise level much as NCSN++'s log-sigma does.
        """
        scale = self.config["time_scale"]
        temb = self.temb(timestep_embedding(t if scale == 1 else t * scale, self.config["base_channels"]))
        if self.label_emb is not None:
            null = torch.full((x.shape[0],), self.config["num_classes"], dtype=torch.long, device=x.device)
            temb = temb + self.label_emb(null if y is None else y)
        elif y is not None:
            raise ValueError("labels given to a U-Net without num_classes")
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
# training targets

LOSSES = ("l2", "l1", "huber")


def eps_distance(eps, noise, loss_type, weight=None, reduction="mean"):
    """The training distance between prediction and target, averaged over each sample's elements:
    "l2", "l1" or "huber"; times weight [B] if given; then "mean" over the batch, or "none" ([B])."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSSES)}")
    fn = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}[loss_type]
    per_sample = fn(eps.float(), noise.float(), reduction="none").flatten(1).mean(1)  # in float32 under autocast
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean() if reduction == "mean" else per_sample


PREDICTIONS = ("eps", "v", "x0", "velocity")
ECT_Q, ECT_K, ECT_B = 2.0, 8.0, 1.0  # Geng et al. 2024's mapping: q = 2 halves t - r a stage; n = 1 + 8 sigmoid(-t)


def ect_ratio(level, stage, q=ECT_Q, k=ECT_K, b=ECT_B):
    """r / t of Easy Consistency Tuning's mapping (Geng et al. 2024, sec. 3): 1 - n(t) / q^(stage + 1) with
    n(t) = 1 + k sigmoid(-b t), at least 0 (r = 0: the denoising target), in the noise level t = sigma / alpha of
    Karras et al. 2022 (inf at alpha = 0, where n = 1)."""
    return (1 - (1 + k * torch.sigmoid(-b * level)) / q ** (stage + 1)).clamp(min=0)


def from_prediction(kind, out, x, alpha, sigma):
    """(x0_hat, eps_hat) from a network's output `out` at x_t = alpha x_0 + sigma eps, for any (alpha, sigma):
    "eps"; "x0"; "v" = alpha eps - sigma x_0 (Salimans & Ho 2022), inverted with alpha^2 + sigma^2 (1 on VP);
    "velocity" u = eps - x_0, the flow's dx_t/dt (Liu et al. 2022), inverted with alpha + sigma (1 on the flow).
    Only v and velocity are defined at both ends (alpha = 0: pure noise; sigma = 0: the data)."""
    if kind == "eps":
        return (x - sigma * out) / alpha, out
    if kind == "x0":
        return out, (x - alpha * out) / sigma
    if kind == "v":
        norm = alpha ** 2 + sigma ** 2
        return (alpha * x - sigma * out) / norm, (sigma * x + alpha * out) / norm
    if kind == "velocity":
        return (x - sigma * out) / (alpha + sigma), (x + alpha * out) / (alpha + sigma)
    raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")


def prediction_target(kind, x0, eps, alpha, sigma):
    """What a network predicting `kind` is trained to output (from_prediction's inverse)."""
    return {"eps": lambda: eps, "x0": lambda: x0, "v": lambda: alpha * eps - sigma * x0,
            "velocity": lambda: eps - x0}[kind]()


def x0_weight(kind, alpha, sigma):
    """The squared error of `kind` over that of x0_hat at one x_t (x fixed, so eps_hat's error is -alpha / sigma
    times x0_hat's): SNR = alpha^2 / sigma^2 for eps, (alpha^2 + sigma^2)^2 / sigma^2 for v (SNR + 1 on VP),
    (alpha + sigma)^2 / sigma^2 for velocity, 1 for x0."""
    return {"eps": lambda: (alpha / sigma) ** 2, "x0": lambda: torch.ones_like(alpha),
            "v": lambda: (alpha ** 2 + sigma ** 2) ** 2 / sigma ** 2,
            "velocity": lambda: (alpha + sigma) ** 2 / sigma ** 2}[kind]()


def min_snr_weight(kind, alpha, sigma, gamma):
    """Per-sample weights that make the loss of `kind` min(SNR_t, gamma) times the x_0 error (Hang et al. 2023)."""
    return ((alpha / sigma) ** 2).clamp(max=gamma) / x0_weight(kind, alpha, sigma)


def _column(v, x):
    return v.reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)


def predicts_x0(model):
    """Whether model offers predict(x, t) -> (x0_hat, eps_hat) of its own (a network whose x0_hat is not
    (x - sigma eps_hat) / alpha, which has no value where alpha = 0)."""
    return getattr(model, "predicts_x0", False)


def denoise(model, process, x, t, *labels):
    """(x0_hat, eps_hat) of any model at x_t: its own predict where it has one, else eps_hat = model(x, t) and
    x0_hat = (x - sigma_t eps_hat) / alpha_t (Ho et al. eq. 4 solved for x_0). t: [B]."""
    if predicts_x0(model):
        return model.predict(x, t, *labels)
    alpha, sigma = (_column(v, x) for v in process.marginal_at(t))
    return from_prediction("eps", model(x, t, *labels), x, alpha, sigma)


class Predictor(nn.Module):
    """A network predicting `kind` (PREDICTIONS) as the eps model every sampler, likelihood and editing tool
    takes: forward(x, t, *labels) -> eps_hat, and predict(x, t, *labels) -> (x0_hat, eps_hat) by
    from_prediction, which the samplers use where alpha_t = 0 would make (x - sigma eps_hat) / alpha_t void."""

    def __init__(self, model, process, kind):
        super().__init__()
        if kind not in PREDICTIONS:
            raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")
        self.model, self.process, self.kind = model, process, kind
        # v on VP keeps the eps route of Salimans & Ho (alpha_t > 0 there), the same numbers as ever
        self.predicts_x0 = kind != "eps" and not (kind == "v" and process.variance_preserving)

    def predict(self, x, t, *labels):
        alpha, sigma = (_column(v, x) for v in self.process.marginal_at(t))
        return from_prediction(self.kind, self.model(x, t, *labels), x, alpha, sigma)

    def forward(self, x, t, *labels):
        if self.kind == "v" and self.process.variance_preserving:  # alpha^2 + sigma^2 = 1: no division
            alpha, sigma = (_column(v, x) for v in self.process.marginal_at(t))
            return sigma * x + alpha * self.model(x, t, *labels)
        return self.predict(x, t, *labels)[1]


class EpsFromV(Predictor):
    """A v-prediction network (Salimans & Ho 2022) as an eps model: Predictor(model, process, "v")."""

    def __init__(self, model, diffusion):
        super().__init__(model, diffusion, "v")


class Guided(nn.Module):
    """An eps model guided by a second one: eps~ = eps_guide + s (eps_main - eps_guide). x0_hat is affine in
    eps with the same coefficients for both, so this is the guidance D_w = D_guide + w (D_main - D_guide) of
    Karras et al. 2024 (eq. 1, their w = s).

    Classifier-free guidance (Ho & Salimans 2022), guide=None: main = model(x, t, y), guide = the same model
    with the null label (the U-Net's num_classes), both in one call on a batch of 2B; s = 1 + w for their w
    (the scale of diffusers and k-diffusion): s = 1 is the conditional model, s = 0 the unconditional one.
    Autoguidance (Karras et al. 2024), guide=a weaker eps model (the same network earlier in its training):
    one call of each, both with y where y is given (a class-conditional pair) or none.
    interval=(lo, hi), with process: guidance only where lo < sigma_t / alpha_t <= hi, the main model alone
    (one call) elsewhere (Kynkaanniemi et al. 2024); sigma/alpha = exp(-lambda_t) is the same noise level on
    every process (EDM's sigma on VP). Deciding it reads t's values on the host, once a call; per_sample: both
    models on the whole batch and the choice made per sample on the device (a teacher in training, whose t differs
    per sample). predict(x, t) -> (x0_hat, eps_hat), each guided alike, for a model with its own (predicts_x0);
    process turns an eps model's.
    """

    def __init__(self, model, y, scale, null=None, guide=None, interval=None, process=None, per_sample=False):
        super().__init__()
        if guide is None and y is not None and null is None:
            raise ValueError("classifier-free guidance needs the null label (null=num_classes)")
        if interval is not None and process is None:
            raise ValueError("a guidance interval needs the process, for sigma_t / alpha_t")
        self.model, self.guide, self.y, self.scale, self.null = model, guide, y, float(scale), null
        self.interval, self.process, self.per_sample = interval, process, per_sample

    @property
    def predicts_x0(self):
        return predicts_x0(self.model)

    def _call(self, model, x, t, y, pair):
        """(eps_hat,), or (x0_hat, eps_hat) with pair: guidance combines each the same way."""
        args = (x, t) if y is None else (x, t, y)
        return denoise(model, self.process, *args) if pair else (model(*args),)

    def _inside(self, t):
        if self.interval is None:
            return True
        alpha, sigma = self.process.marginal_at(t)
        ratio, (lo, hi) = (sigma / alpha).double(), self.interval
        if self.per_sample:
            return ((ratio > lo) & (ratio <= hi)).reshape(-1, *(1,) * 3)
        inside = ((ratio > lo) & (ratio <= hi)).tolist()
        if all(inside) or not any(inside):
            return all(inside)
        return torch.tensor(inside, device=t.device).reshape(-1, *(1,) * 3)

    def _guided(self, x, t, pair):
        inside = self.scale != 1 and self._inside(t)
        if inside is False or self.scale == 1:
            return self._call(self.model, x, t, self.y, pair)
        if self.guide is not None:
            main, weak = self._call(self.model, x, t, self.y, pair), self._call(self.guide, x, t, self.y, pair)
        elif self.scale == 0 and inside is True:
            return self._call(self.model, x, t, torch.full_like(self.y, self.null), pair)
        else:
            both = self._call(self.model, torch.cat([x, x]), torch.cat([t, t]),
                              torch.cat([self.y, torch.full_like(self.y, self.null)]), pair)
            main, weak = zip(*(v.chunk(2) for v in both))
        guided = [w + self.scale * (m - w) for m, w in zip(main, weak)]
        return tuple(g if inside is True else torch.where(inside, g, m) for g, m in zip(guided, main))

    def forward(self, x, t):
        return self._guided(x, t, False)[0]

    def predict(self, x, t):
        return self._guided(x, t, True)


class GaussianOracle(nn.Module):
    """The exact model of data x0 ~ N(mu, sd^2 I) on any process x_t = alpha_t x0 + sigma_t z: with
    v_t = alpha^2 sd^2 + sigma^2, E[eps | x_t] = sigma (x_t - alpha mu) / v_t and E[x0 | x_t] = mu + alpha sd^2
    (x_t - alpha mu) / v_t, both defined at alpha = 0 and at sigma = 0. Every sampler's answer for it is known
    in closed form, which makes it the reference model of the tests and benchmarks."""
    predicts_x0 = True

    def __init__(self, process, mu=0.3, sd=0.5):
        super().__init__()
        self.process, self.mu, self.sd = process, mu, sd

    def predict(self, x, t):
        alpha, sigma = (_column(v, x) for v in self.process.marginal_at(t))
        r = (x - alpha * self.mu) / (alpha ** 2 * self.sd ** 2 + sigma ** 2)
        return self.mu + alpha * self.sd ** 2 * r, sigma * r

    def forward(self, x, t):
        return self.predict(x, t)[1]


def gaussian_eps(process, mu=0.3, sd=0.5):
    """GaussianOracle(process, mu, sd): the exact eps model of N(mu, sd^2 I) data."""
    return GaussianOracle(process, mu, sd)


def drop_labels(y, p, null, generator=None):
    """Labels y [B] with each replaced by the null class with probability p (Ho & Salimans 2022's p_uncond),
    so that one network learns the conditional and the unconditional model."""
    return torch.where(torch.rand(y.shape, generator=generator, device=y.device) < p, null, y)

# ----------------------------------------------------------------------------------------------
# an adaptive ODE solver, for the probability-flow ODE and the likelihood

# Dormand & Prince (1980) 5(4): nodes, stages, 5th-order weights and the 5th - 4th order difference.
DOPRI_C = (0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1)
DOPRI_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
           (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DOPRI_E = (71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _rms(x):
    return x.pow(2).mean().sqrt().item()  # a host sync: used once per solver step, for step-size control


ODE_MAX_CALLS = 100_000  # odeint gives up past this: at rtol = atol = 1e-5 the samplers here take about 100-300


def odeint(f, y, t0, t1, rtol=1e-5, atol=1e-5, progress=None):
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction) with the adaptive Dormand-Prince
    5(4) pair, the state on its own device; t is passed to f as a Python float. The error is the RMS
    over the whole state of err / (atol + rtol |y|), as scipy's RK45. Returns (y(t1), calls of f)."""
    sign, span = (1.0 if t1 > t0 else -1.0), abs(t1 - t0)
    k1, nfe = f(t0, y), 1
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale), _rms(k1 / scale)  # the initial step of Hairer, Norsett & Wanner II.4
    h = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    d2 = _rms((f(t0 + sign * h, y + sign * h * k1) - k1) / scale) / h
    nfe += 1
    h = min(100 * h, (0.01 / max(d1, d2)) ** 0.2 if max(d1, d2) > 1e-15 else max(1e-6, h * 1e-3), span)
    done = 0.0
    while done < span:
        h = min(h, span - done)
        t, ks = t0 + sign * done, [k1]
        for c, a in zip(DOPRI_C[1:], DOPRI_A[1:]):
            y_new = y + sign * h * sum(w * k for w, k in zip(a, ks) if w)
            ks.append(f(t + sign * c * h, y_new))
        nfe += 6  # y_new is the 5th-order solution; ks[6] = f(t + h, y_new) is the next step's k1
        err = sign * h * sum(w * k for w, k in zip(DOPRI_E, ks) if w)
        ratio = _rms(err / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if not math.isfinite(ratio):
            raise ValueError(f"the ODE state is no longer finite at t = {t:.4g}")
        if h < 1e-10 * span or nfe > ODE_MAX_CALLS:  # the tolerance lies below the state's rounding
            raise ValueError(f"the ODE solver is stuck at t = {t:.4g} (step {h:.2g}, {nfe} calls): rtol {rtol:g} and "
                             f"atol {atol:g} are below what {y.dtype} can reach")
        if ratio <= 1:
            done = span if span - done <= h else done + h
            y, k1 = y_new, ks[6]
            if progress:
                progress(round(100 * done / span), 100)
        h *= min(10.0, max(0.2, 0.9 * ratio ** -0.2)) if ratio > 0 else 10.0
    return y, nfe



# ----------------------------------------------------------------------------------------------
# the fixed-step samplers as tables of coefficients on a grid of times (float64)
#
# A grid is S model-call times from the noise end down; the sampler's last step goes from the last
# call to the clean image, alpha = 1 and sigma = 0, where it returns x0_hat. With alpha, sigma [S + 1]
# the marginals at the grid and then the clean image, step k of every sampler below is
#     x_{k+1} = c[k] x_k + sum_j w[k, j] x0_hat_{k-j} + s[k] z,   x0_hat_k = (x_k - sigma_k eps_hat_k) / alpha_k.

SPACINGS = ("leading", "trailing", "linspace", "logsnr")  # Diffusion's grids of integer timesteps
RHO = 7.0  # the Karras grid's rho (Karras et al. 2022, eq. 5: their choice for every data set)
CM_MIDDLE, CM_ETA = 2.4, 0.4  # cm_sample's first middle sigma / alpha and share of fresh noise: where two calls' FD-wide
# is flat at its best over middles 1 to 6 and shares 0 to 1 on MNIST (docs/consistency.md)


def _pairs(alpha, sigma):
    """(alpha_k, sigma_k, alpha_{k+1}, sigma_{k+1}) and the variance of the forward transition
    q(x_k | x_{k+1}), sigma_k^2 - (alpha_k / alpha_{k+1})^2 sigma_{k+1}^2: beta_t on Ho et al.'s chain."""
    a, s, a1, s1 = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
    return a, s, a1, s1, (s ** 2 - (a / a1) ** 2 * s1 ** 2).clamp(min=0)


def ddpm_coefficients(alpha, sigma, variance="beta"):
    """Ancestral sampling (Ho et al. Algorithm 2) on the grid: x_{k+1} is the mean of q(x_{k+1} | x_k,
    x0_hat) (eqs. 6-7, with c = posterior_mean_coef2, w = coef1) plus noise of variance the forward
    transition's ("beta": beta_t) or the posterior's ("posterior": beta-tilde_t)."""
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    a, s, a1, s1, var = _pairs(alpha, sigma)
    noise = var if variance == "beta" else s1 ** 2 * var / s ** 2
    return (a / a1) * s1 ** 2 / s ** 2, (a1 * var / s ** 2)[:, None], noise.sqrt()


def ddim_coefficients(alpha, sigma, eta=0.0):
    """DDIM (Song et al. 2020 eq. 12): x_{k+1} = alpha_{k+1} x0_hat + sqrt(sigma_{k+1}^2 - s^2) eps_hat + s z,
    with s = eta times the posterior's standard deviation; eta = 0 is deterministic, eta = 1 ancestral."""
    a, s, a1, s1, var = _pairs(alpha, sigma)
    noise = eta * s1 / s * var.sqrt()
    c = (s1 ** 2 - noise ** 2).clamp(min=0).sqrt() / s
    return c, (a1 - c * a)[:, None], noise


def dpm_solver_coefficients(alpha, sigma, order=2, eta=0.0, lower_order_final=False):
    """DPM-Solver++(order M) (Lu et al. 2022b) in lambda = log(alpha / sigma), h_k = lambda_{k+1} - lambda_k,
    phi_1 = expm1(-h): order 1 is x_{k+1} = sigma_{k+1} / sigma_k x_k - alpha_{k+1} phi_1 D with D = x0_hat_k
    (DDIM); order 2 (Algorithm 2) takes D = (1 + 1/2r) m_0 - 1/2r m_1, r = h_{k-1} / h_k; order 3 adds the
    second difference. The order drops to what the history allows on the first steps, to 1 on the last
    step (h = inf) and, with lower_order_final, to 1 on the step into the last model call and at most 2
    before it, on every grid that ends at the data end, where that step is long. (Lu et al.'s code lowers the
    order there only below 10 steps; a long last step in lambda is as long at 20 steps, and its high-order
    extrapolation is as unstable, so the lower order pays at every step count.)

    eta > 0 is SDE-DPM-Solver++ (Lu et al. 2022b, appendix) with its noise scaled by eta:
    c = sigma_{k+1} / sigma_k e^(-eta h), phi_1 = expm1(-(1 + eta) h) and s = sigma_{k+1} sqrt(-expm1(-2 eta h)),
    so x_{k+1} keeps the marginal's variance; eta = 1 at order 1 is DDIM with eta = 1 (ancestral sampling).
    Order 3 at any eta integrates the Taylor expansion of x0_hat in lambda to second order against the step's
    kernel (1 + eta) e^(-(1 + eta)(lambda_{k+1} - lambda)), whose moments are -phi_1, h phi_2 and
    h^2 (1/2 - phi_2 / H) with H = (1 + eta) h and phi_2 = 1 + phi_1 / H; the divided differences give
    D1 = h x0_hat' and D2 = h^2 x0_hat'' / 2, so D2 enters with twice the last moment and the step is exact
    when x0_hat is quadratic in lambda (Lu et al.'s multistep code weights D2 by the moment alone).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    S = len(alpha) - 1
    lam = torch.log(alpha / sigma)  # +inf at the clean image
    h = lam[1:] - lam[:-1]
    m0, m1, m2 = torch.eye(3, dtype=torch.float64)  # x0_hat_k, x0_hat_{k-1}, x0_hat_{k-2} as weights
    w = torch.zeros(S, 3, dtype=torch.float64)
    for k in range(S):
        q, phi1 = max(1, min(order, k + 1, S - k - lower_order_final)), torch.expm1(-(1 + eta) * h[k])
        if q == 1:
            D = m0
        elif q == 2:
            r0 = h[k - 1] / h[k]
            D = (1 + 1 / (2 * r0)) * m0 - 1 / (2 * r0) * m1
        else:  # the multistep third-order update: D_1 and D_2 approximate the first two derivatives
            r0, r1 = h[k - 1] / h[k], h[k - 2] / h[k]
            d0, d1 = (m0 - m1) / r0, (m1 - m2) / r1
            D1, D2 = d0 + r0 / (r0 + r1) * (d0 - d1), (d0 - d1) / (r0 + r1)
            H = (1 + eta) * h[k]
            phi2 = phi1 / H + 1
            D = m0 - phi2 / phi1 * D1 + 2 * (phi2 / H - 0.5) / phi1 * D2
        w[k] = -alpha[k + 1] * phi1 * D
    ratio = sigma[1:] / sigma[:-1]
    if not eta:  # (0 * inf is nan on the last step)
        return ratio, w[:, :order], torch.zeros(S, dtype=torch.float64)
    return ratio * torch.exp(-eta * h), w[:, :order], sigma[1:] * (-torch.expm1(-2 * eta * h)).sqrt()


def euler_maruyama_coefficients(times, alpha, sigma, f, g2):
    """Euler-Maruyama on the reverse SDE dx = [f x - g^2 score] dt + g dw (Song et al. eq. 6) from t_k to
    t_{k+1}: x <- x - (f x + g^2 eps_hat / sigma) dt + g sqrt(dt) z, with eps_hat = (x - alpha x0_hat) / sigma;
    the last call returns x0_hat = E[x_0 | x] without noise. Where f or g is infinite (the flow's pure-noise
    end, alpha = 0) or |f| dt >= 1 (near it: the Euler step would overshoot the drift's own decay) the step is
    the ancestral one (ddpm_coefficients), the reverse SDE's exact transition with x0_hat held fixed."""
    dt = (times[:-1] - times[1:]).abs()
    a, s, f, g2 = alpha[:-2], sigma[:-2], f[:-1], g2[:-1]
    zero, one = times.new_zeros(1), times.new_ones(1)
    c = torch.cat([1 - f * dt - g2 * dt / s ** 2, zero])
    w = torch.cat([g2 * dt * a / s ** 2, one])
    noise = torch.cat([(g2 * dt).sqrt(), zero])
    finite = c.isfinite() & w.isfinite() & noise.isfinite() & torch.cat([f.abs() * dt < 1, one.bool()])
    if finite.all():
        return c, w[:, None], noise
    ancestral = ddpm_coefficients(alpha, sigma)
    return (torch.where(finite, c, ancestral[0]), torch.where(finite, w, ancestral[1][:, 0])[:, None],
            torch.where(finite, noise, ancestral[2]))


class TableStep:
    """One step of a table sampler on the grid (the equation above), with its multistep history."""

    def __init__(self, times, coefficients, restart=None):
        self.evals, self.table, self.restart = times, coefficients, restart or ()
        self.noisy = bool((coefficients[2][:-1] > 0).any())
        self.history = []

    def to(self, device):
        self.c, self.w, self.s = (v.float().to(device) for v in self.table)
        self.restart = [v.float().to(device) for v in self.restart]
        return self

    def calls(self, k):
        return 1

    def reset(self):
        self.history = []

    def __call__(self, x, k, denoise, noise, last):
        self.history = [denoise(x, k), *self.history[:self.w.shape[1] - 1]]
        full = len(self.history) == self.w.shape[1] or not self.restart
        row = self.w[k] if full else self.restart[len(self.history) - 1][k]
        x = self.c[k] * x + sum(row[j] * m for j, m in enumerate(self.history))
        if self.noisy and not last:  # no noise at the last step: x_0 is the mean
            x = x + self.s[k] * noise()
        return x


class HeunStep:
    """Heun's second-order step in the noise level (Karras et al. 2022, Algorithm 2): with y = x / scale and
    d = (y - x0_hat) / level (noise_level), an Euler step from level l to l', then the average of d there and
    at its end; the step to the clean image is Euler (it returns x0_hat). The churn first raises the level to
    l (1 + gamma), gamma = min(churn / S, sqrt 2 - 1) where tmin <= l <= tmax, by a draw of the forward process
    with s_noise times its noise. Two model calls a step, one on the last: 2 S - 1 in all."""

    def __init__(self, process, times, churn=0.0, tmin=0.0, tmax=math.inf, s_noise=1.0):
        for name, value in (("churn", churn), ("tmin", tmin), ("tmax", tmax), ("s_noise", s_noise)):
            if not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        alpha, sigma = process._grid(times)
        level, scale = process.noise_level(times.to(torch.float64))
        S, top = len(times), process.noise_level(torch.tensor([process.t_start], dtype=torch.float64))[0]
        gamma = min(churn / S, math.sqrt(2) - 1) * ((level >= tmin) & (level <= tmax) & (alpha[:-1] > 0))
        hat = torch.minimum(level * (1 + gamma), top)
        raised = hat > level
        t_hat = times.to(torch.float64) if raised.any() else times
        if raised.any():
            t_hat = torch.where(raised, process.time_of_noise_level(hat), t_hat)
        a_hat, s_hat = process.marginal(t_hat.to(torch.float64))
        level_hat, scale_hat = process.noise_level(t_hat.to(torch.float64))
        r = torch.where(raised, a_hat / alpha[:-1], 1.0)
        # step k calls the model at t_hat_k and, but on the last step, at t_{k+1}
        following = torch.cat([times[1:].to(t_hat.dtype), t_hat[:1]])
        self.evals = torch.stack([t_hat, following], 1).flatten()[:2 * S - 1]
        self.S, self.raised, self.r = S, raised.tolist(), r.tolist()
        self.n = (s_noise * (s_hat ** 2 - r ** 2 * sigma[:-1] ** 2).clamp(min=0).sqrt()).tolist()
        self.level_hat, self.scale_hat = level_hat.tolist(), scale_hat.tolist()
        self.level, self.scale = level.tolist() + [0.0], scale.tolist() + [1.0]

    def to(self, device):
        return self

    def calls(self, k):
        return 1 if k == self.S - 1 else 2

    def reset(self):
        pass

    def __call__(self, x, k, denoise, noise, last):
        if self.raised[k]:
            x = self.r[k] * x + self.n[k] * noise()
        x0 = denoise(x, 2 * k)
        if k == self.S - 1:  # Euler into level 0: y + (0 - l) (y - x0_hat) / l = x0_hat
            return x0
        y, h = x / self.scale_hat[k], self.level[k + 1] - self.level_hat[k]
        d = (y - x0) / self.level_hat[k]
        y_next = y + h * d
        d_next = (y_next - denoise(self.scale[k + 1] * y_next, 2 * k + 1)) / self.level[k + 1]
        return self.scale[k + 1] * (y + h / 2 * (d + d_next))

# ----------------------------------------------------------------------------------------------
# a diffusion process: the loss and every sampler, written once (Song et al. 2021)


class ScoreSDE(nn.Module):
    """A diffusion read as the SDE dx = f(t) x dt + g(t) dw (Song et al. 2021) whose marginals are
    x_t = alpha_t x_0 + sigma_t z, driven by an eps-model: the score is -eps_hat / sigma_t.

    The contract: a process answers marginal(t) -> (alpha_t, sigma_t) at any t (float64 in, float64 out),
    sde(t) -> (f(t), g(t)^2), t_start (the noise end) and t_end (the data end), train_t(n) (the training
    times' density) and from_config(cfg); its class says its name in PROCESSES, the predictions it trains
    (the first its default), weighted (whether min-SNR weights apply), recipe (training settings it fixes),
    options (the configuration keys it reads), model_time_scale (the U-Net's time_scale for its t),
    prior_std, the spacings of its grids and the command line's default autoguidance weight.
    The loss, the fixed-step samplers (one loop, each sampler a table of coefficients), DDIM inversion, the
    SDE and ODE samplers and the likelihood are written once against those answers. model(x, t) is any
    callable -> eps_hat with t a tensor [B] (a Predictor for other predictions); put an nn.Module in eval
    mode before sampling.
    """
    name = None
    predictions = PREDICTIONS
    weighted = True  # min-SNR weights apply
    recipe = {}
    options = ()
    model_time_scale = 1.0
    variance_preserving = False  # alpha_t^2 + sigma_t^2 = 1
    prior_std = 1.0
    spacings = ("time", "lambda", "karras")
    default_spacing = "time"
    ode_form = "ve"  # the samplers' noise level and scale (noise_level): sigma / alpha and alpha
    default_order = 2  # dpm_solver_sample's order when none is given: the lower FD by mnist_fd at 10 calls
    autoguidance = 2.0  # sample.py's default autoguidance weight (docs/guidance.md: measured on MNIST)

    @classmethod
    def from_config(cls, cfg):
        raise NotImplementedError(f"{cls.__name__}.from_config")

    def marginal(self, t):
        raise NotImplementedError(f"{type(self).__name__}.marginal")

    def sde(self, t):
        raise NotImplementedError(f"{type(self).__name__}.sde")

    def train_t(self, n, generator=None, device=None):
        raise NotImplementedError(f"{type(self).__name__}.train_t")

    @property
    def t_start(self):
        raise NotImplementedError(f"{type(self).__name__}.t_start")

    @property
    def t_end(self):
        raise NotImplementedError(f"{type(self).__name__}.t_end")

    @property
    def device(self):
        return next(self.buffers(), torch.empty(0)).device

    def marginal_at(self, t):
        return self.marginal(t)

    def langevin_alpha(self, t):
        """Song et al.'s alpha_i in the corrector's step size (Algorithm 5); 1 unless a process says."""
        return torch.ones_like(t)

    def chain(self, start=None):
        """The ancestral sampler's grid when no steps are given: 1000 noise levels evenly spaced in log sigma
        (Song et al. 2021's N = 1000 for SMLD)."""
        return self.time_grid(1000, "lambda", start)

    def model_time(self, times):
        """The grid's times as the model is called with them: float32 (Diffusion: integers stay integers)."""
        return times if not times.is_floating_point() else times.float()

    # -- forward process and training ---------------------------------------------------------------

    def _check_t(self, t, x):
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a tensor of shape [{x.shape[0]}], got {tuple(t.shape)}")

    def q_sample(self, x0, t, noise=None):
        """Sample q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) (Ho et al. eq. 4 for Diffusion)."""
        self._check_t(t, x0)
        alpha, sigma = (v.reshape(-1, *(1,) * (x0.ndim - 1)) for v in self.marginal_at(t))
        return alpha * x0 + sigma * (torch.randn_like(x0) if noise is None else noise)

    def loss(self, model, x0, loss_type="l2", t=None, noise=None, prediction="eps", min_snr=None,
             reduction="mean", y=None):
        """The denoising loss E_{t, x0, eps} ||target - model(x_t, t)|| with t ~ train_t, the target being what
        the network predicts (prediction_target): L_simple (Ho et al. eq. 14) for "eps"; for VESDE denoising
        score matching with lambda(t) = sigma_t^2 (Song et al. eq. 7); "v" (Salimans & Ho 2022); "velocity",
        the flow's u = eps - x0 (Liu et al. 2022; Esser et al. 2024's rectified-flow loss, which is the eps loss
        weighted by (alpha + sigma)^2 / alpha^2, 1 / (1 - t)^2 on the flow); "x0". Sample with Predictor.

        loss_type: "l2" (the paper's), "l1", or "huber" (SmoothL1). min_snr = gamma weights each sample so that
        the loss is min(SNR_t, gamma) times the x_0 error, SNR_t = alpha_t^2 / sigma_t^2 (Hang et al. 2023):
        min(SNR_t, gamma) / SNR_t for eps, / (SNR_t + 1) for v on VP (x0_weight). y: class labels [B], passed
        to model(x_t, t, y). Returns a scalar, or the per-sample losses [B] for reduction="none".
        """
        if x0.ndim != 4:
            raise ValueError(f"x0 must be [B, C, H, W], got shape {tuple(x0.shape)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        t = self.train_t(x0.shape[0], device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        alpha, sigma = self.marginal_at(t)
        target = prediction_target(prediction, x0, noise, alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1))
        weight = None
        if min_snr is not None:
            weight = min_snr_weight(prediction, alpha, sigma, min_snr)
        x_t = self.q_sample(x0, t, noise)
        return eps_distance(model(x_t, t) if y is None else model(x_t, t, y), target, loss_type, weight, reduction)

    def consistency_loss(self, model, x0, stage, loss_type="l2", t=None, noise=None, prediction="eps", min_snr=None,
                         reduction="mean", y=None, teacher=None):
        """Easy Consistency Tuning (Geng et al. 2024): the model's x0_hat at x_t = alpha_t x0 + sigma_t eps is pulled
        towards its own x0_hat at x_r = alpha_r x0 + sigma_r eps (the same eps; no gradient, the same dropout),
        r < t from ect_ratio at `stage` (stage None: r = 0, where the target is x0 itself). The target enters the
        denoising loss in the network's own prediction (prediction_target at x_t), so at r = 0 this is `loss` on
        the same t and noise; the weight 1 / (1 - r/t) is ECT's 1 / (t - r) relative to its value at r = 0, on the
        squared distance of loss_type (ECT divides the distance's norm; see docs/consistency.md).

        teacher(x, t, y) -> (x0_hat, eps_hat): consistency distillation (Song et al. 2023, eq. 7) instead, x_r being
        the teacher's DDIM step from x_t, alpha_r x0_hat + sigma_r eps_hat (Song et al. 2020, eq. 12), and its x0_hat
        the target where r = 0; with a guided teacher the model learns the guided probability-flow ODE."""
        if x0.ndim != 4:
            raise ValueError(f"x0 must be [B, C, H, W], got shape {tuple(x0.shape)}")
        t = self.train_t(x0.shape[0], device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        alpha, sigma = self.marginal_at(t)
        a, s = _column(alpha, x0), _column(sigma, x0)
        x_t = self.q_sample(x0, t, noise)
        end, ratio = (x0, noise), torch.zeros_like(alpha)
        if teacher is not None:
            with torch.no_grad():
                end = tuple(v.float() for v in teacher(x_t, t, y))
        target_x0 = end[0]
        if stage is not None:
            ratio = ect_ratio((sigma / alpha).float(), stage)
            r = self.time_of_log_snr(self.log_snr(t.float()) - ratio.log())  # lambda_r = lambda_t - log(r / t)
            a_r, s_r = (_column(v, x0) for v in self.marginal(r))
            with torch.no_grad(), torch.random.fork_rng(devices=[x0.device] if x0.device.type == "cuda" else []):
                x_r = a_r * end[0] + s_r * end[1]
                out = model(x_r, r) if y is None else model(x_r, r, y)
                own = from_prediction(prediction, out.float(), x_r, a_r, s_r)[0]
            target_x0 = torch.where(_column(ratio, x0) > 0, own, end[0])
        target = prediction_target(prediction, target_x0, (x_t - a * target_x0) / s, a, s)
        weight = 1 / (1 - ratio)
        if min_snr is not None:
            weight = weight * min_snr_weight(prediction, alpha, sigma, min_snr)
        return eps_distance(model(x_t, t) if y is None else model(x_t, t, y), target, loss_type, weight, reduction)

    # -- time grids ------------------------------------------------------------------------------

    def time_grid(self, steps, spacing=None, start=None, rho=RHO):
        """`steps` model-call times from the noise end down, on the CPU: "time" evenly spaced in t from
        t_start to t_end, "lambda" evenly spaced in lambda = log(alpha / sigma) from lambda(t_start) to
        lambda(t_end) (Lu et al. 2022's logSNR steps), "karras" evenly spaced in the noise level to the power
        1 / rho (Karras et al. 2022, eq. 5; noise_level), all float64. The samplers step from the last one
        to the clean image, where they return x0_hat. start (SDEdit's t_0, Meng et al. 2022): the grid
        squeezed linearly in t into [t_end, start] (Diffusion's integer grids rounded, repeats dropped)."""
        times = self._grid_times(steps, spacing, rho)
        if start is None or start == self.t_start:
            return times
        if not self.t_end <= start <= self.t_start:
            raise ValueError(f"start must be in [{self.t_end:g}, {self.t_start:g}], got {start}")
        squeezed = self.t_end + (times.double() - self.t_end) * (start - self.t_end) / (self.t_start - self.t_end)
        return squeezed if times.is_floating_point() else squeezed.round().long().unique_consecutive()

    def _grid_times(self, steps, spacing, rho=RHO):
        spacing = spacing or self.default_spacing
        if spacing not in self.spacings:
            raise ValueError(f"unknown spacing {spacing!r} for {type(self).__name__}; valid: {', '.join(self.spacings)}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        ends = torch.tensor([self.t_start, self.t_end], dtype=torch.float64)
        if spacing == "time" or steps == 1:
            return torch.linspace(*ends.tolist(), steps, dtype=torch.float64)
        if spacing == "karras":
            if not (math.isfinite(rho) and rho > 0):
                raise ValueError(f"rho must be a positive number, got {rho}")
            top, low = self.noise_level(ends)[0] ** (1 / rho)
            u = torch.linspace(0, 1, steps, dtype=torch.float64)
            times = self.time_of_noise_level((top + u * (low - top)) ** rho)
        else:
            times = self.time_of_log_snr(torch.linspace(*self.log_snr(ends).tolist(), steps, dtype=torch.float64))
        times[[0, -1]] = ends  # exactly, not to the bisection's last bit
        return times

    def noise_level(self, t):
        """(level, scale) of the samplers that step in a noise level (Karras et al. 2022): x / scale = a x_0 +
        level eps with dx/dlevel = (x - x0_hat) / level along the probability-flow ODE. ode_form "ve": level =
        sigma / alpha, scale = alpha (a = 1; their sigma(t) = t, s(t) = 1); "flow": level = sigma / (alpha +
        sigma), scale = alpha + sigma (a = 1 - level, the straight path: finite where alpha = 0)."""
        alpha, sigma = self.marginal(t)
        scale = alpha if self.ode_form == "ve" else alpha + sigma
        return sigma / scale, scale

    def log_snr(self, t):
        """lambda_t = log(alpha_t / sigma_t), decreasing in t."""
        alpha, sigma = self.marginal(t)
        return torch.log(alpha / sigma)

    def time_of_noise_level(self, level):
        """The times whose noise_level is `level`: lambda = -log level ("ve") or log((1 - level) / level) ("flow")."""
        return self.time_of_log_snr(-level.log() if self.ode_form == "ve" else torch.log1p(-level) - level.log())

    def time_of_log_snr(self, lam):
        """The times where lambda_t = lam (float64), by bisection between t_end and t_start."""
        lo, hi = torch.full_like(lam, self.t_end), torch.full_like(lam, self.t_start)
        for _ in range(64):  # the interval halves: 2^-64 of t_start - t_end, float64's resolution
            mid = (lo + hi) / 2
            above = self.log_snr(mid) > lam  # lambda is decreasing: the root lies later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return ((lo + hi) / 2).clamp(self.t_end, self.t_start)

    def _grid(self, times):
        """alpha and sigma at the grid's times, then at the clean image (1, 0): [S + 1], float64."""
        alpha, sigma = self.marginal(times.to(torch.float64))
        return torch.cat([alpha, alpha.new_ones(1)]), torch.cat([sigma, sigma.new_zeros(1)])

    # -- the fixed-step samplers: one loop ---------------------------------------------------------

    def _start(self, shape, x_T, generator):
        if x_T is not None:
            return x_T.to(self.device, torch.float32)
        if shape is None:
            raise ValueError("give shape or x_T")
        return self.prior_std * randn(shape, generator, self.device)

    def run_grid(self, model, x, times, coefficients, clip_x0=True, generator=None, return_trajectory=False,
                 progress=None, hook=None, path=None, restart=None):
        """The loop of every fixed-step sampler. `coefficients` is a table (c, w, s): at grid point k, eps_hat =
        model(x, t_k), x0_hat (the model's own where it has one, predicts_x0; clipped to [-1, 1] with clip_x0),
        then x <- c[k] x + sum_j w[k, j] x0_hat_{k-j} + s[k] z, no noise on the last step; restart, the weights
        w of the same sampler at orders 1 .. M - 1, serves while the history holds fewer than M points. Or it
        is a step (HeunStep): an object with `evals`, the times it calls the model at, `calls(k)` and
        step(x, k, denoise, noise, last) -> x at the next point, where denoise(x, e) is x0_hat at evals[e].
        hook(x, k, alpha_k, sigma_k) -> x runs before step k and at the end (k = S, the clean image: alpha 1,
        sigma 0). `path`, the grid points visited (0 .. S by default), may step back from k to j < k: a draw of
        q(x_j | x_k), the forward process (Lugmayr et al. 2022), after which a multistep table restarts its
        order. progress(i, n) after each step, counting model calls. Returns x_0, or (x_0, [x_T, ..., x_0])."""
        alpha, sigma = self._grid(times)
        ends = list(zip(alpha.tolist(), sigma.tolist()))
        S, device = len(times), x.device
        step = coefficients if hasattr(coefficients, "evals") else TableStep(times, coefficients, restart)
        evals = step.evals
        t = self.model_time(evals).to(device)
        a, s = self.marginal(evals.to(torch.float64))
        inv_alpha, sigma_over_alpha = (v.float().to(device) for v in (1 / a, s / a))
        step = step.to(device)
        direct = predicts_x0(model)

        def denoise(x, e):  # x0_hat at evals[e]
            if direct:
                x0 = model.predict(x, t[e].expand(x.shape[0]))[0]
            else:
                x0 = inv_alpha[e] * x - sigma_over_alpha[e] * model(x, t[e].expand(x.shape[0]))
            return x0.clamp(-1, 1) if clip_x0 else x0

        noise = lambda: randn(x.shape, generator, device)
        path = list(range(S + 1)) if path is None else list(path)
        calls, done, trajectory = sum(step.calls(i) for i, j in zip(path, path[1:]) if j > i), 0, [x]
        for i, j in zip(path, path[1:]):
            if j < i:  # back to the noisier point j through the forward process; a multistep history is void
                r = (alpha[j] / alpha[i]).item()
                x = r * x + (sigma[j] ** 2 - r ** 2 * sigma[i] ** 2).sqrt().item() * noise()
                step.reset()
            else:
                x = hook(x, i, *ends[i]) if hook else x
                x = step(x, i, denoise, noise, last=j == S)
                done += step.calls(i)
                if progress:
                    progress(done, calls)
            if return_trajectory:
                trajectory.append(x)
        if hook:
            x = hook(x, S, 1.0, 0.0)
            trajectory[-1] = x
        return (x, trajectory) if return_trajectory else x

    @torch.inference_mode()
    def ddpm_sample(self, model, shape=None, x_T=None, variance="beta", clip_x0=True, generator=None,
                    return_trajectory=False, progress=None, steps=None, spacing=None, start=None, rho=RHO, **loop):
        """Ancestral sampling, Ho et al. Algorithm 2, over the process's own chain (Diffusion: all T steps;
        VESDE: 1000 noise levels), or respaced to `steps` calls on time_grid(steps, spacing) as improved-
        diffusion's respacing. variance: sigma_t^2 = beta_t ("beta") or beta-tilde_t ("posterior");
        clip_x0 clips x0_hat to [-1, 1]. `generator` (or one per sample) lives on the sampling device.
        start: the time x_T is at (SDEdit's t_0; see time_grid); **loop: run_grid's hook and path."""
        times = self.time_grid(steps, spacing, start, rho) if steps is not None else self.chain(start)
        x = self._start(shape, x_T, generator)
        return self.run_grid(model, x, times, ddpm_coefficients(*self._grid(times), variance), clip_x0, generator,
                             return_trajectory, progress, **loop)

    @torch.inference_mode()
    def ddim_sample(self, model, shape=None, x_T=None, steps=50, eta=0.0, clip_x0=True, generator=None,
                    return_trajectory=False, progress=None, spacing=None, start=None, rho=RHO, **loop):
        """DDIM sampling (Song et al. 2020 eq. 12) over time_grid(steps, spacing, start); eta = 0 is deterministic,
        eta = 1 with every step of Ho et al.'s chain is DDPM with beta-tilde. It is also Euler's method in the
        noise level (Karras et al. 2022; noise_level) at eta = 0, and k-diffusion's Euler-ancestral with the
        same eta (its step to sigma_down, then noise of std sigma_up). Returns as ddpm_sample."""
        times = self.time_grid(steps, spacing, start, rho)
        x = self._start(shape, x_T, generator)
        return self.run_grid(model, x, times, ddim_coefficients(*self._grid(times), eta), clip_x0, generator,
                             return_trajectory, progress, **loop)

    @torch.inference_mode()
    def dpm_solver_sample(self, model, shape=None, x_T=None, steps=10, order=None, spacing=None, clip_x0=True,
                          eta=1.0, generator=None, return_trajectory=False, progress=None, start=None, rho=RHO,
                          **loop):
        """DPM-Solver++ multistep (Lu et al. 2022b): one model call per step over time_grid(steps, spacing).
        order 1 is DDIM (eta = 0), 2 is DPM-Solver++(2M), 3 is 3M, None the process's default_order; eta = 1,
        the default, is SDE-DPM-Solver++ on the reverse SDE (dpm_solver_coefficients; the lower FD-wide on MNIST,
        docs/samplers.md), eta = 0 the ODE solver. clip_x0 clips each x0_hat (thresholding). Returns as
        ddpm_sample."""
        times = self.time_grid(steps, spacing, start, rho)
        order = order or self.default_order
        x = self._start(shape, x_T, generator)
        tables = [dpm_solver_coefficients(*self._grid(times), q, eta, lower_order_final=bool(times[-1] == self.t_end))
                  for q in (range(1, order + 1) if loop.get("path") else [order])]
        return self.run_grid(model, x, times, tables[-1], clip_x0, generator, return_trajectory, progress,
                             restart=[t[1] for t in tables[:-1]], **loop)

    @torch.inference_mode()
    def heun_sample(self, model, shape=None, x_T=None, steps=18, spacing="karras", churn=0.0, tmin=0.0,
                    tmax=math.inf, s_noise=1.0, clip_x0=True, generator=None, return_trajectory=False,
                    progress=None, start=None, rho=RHO, **loop):
        """Karras et al. 2022's sampler (Algorithm 2; HeunStep) over time_grid(steps, spacing, start, rho), the
        Karras grid by default, 18 steps (35 calls, their CIFAR-10 setting; fewer are much worse on MNIST:
        docs/samplers.md): 2 steps - 1 model calls. churn = 0 is their deterministic Algorithm 1; their
        S_churn, S_tmin, S_tmax and S_noise are churn, tmin and tmax (noise levels) and s_noise."""
        times = self.time_grid(steps, spacing, start, rho)
        x = self._start(shape, x_T, generator)
        return self.run_grid(model, x, times, HeunStep(self, times, churn, tmin, tmax, s_noise), clip_x0, generator,
                             return_trajectory, progress, **loop)

    @torch.inference_mode()
    def cm_sample(self, model, shape=None, x_T=None, steps=2, middle=CM_MIDDLE, eta=CM_ETA, clip_x0=True,
                  generator=None, return_trajectory=False, progress=None, start=None, **loop):
        """The consistency models' multistep sampler (Song et al. 2023, Algorithm 1): x0_hat from x_T, then at each
        middle noise level sigma / alpha (middle, middle / 4, middle / 16, ...: steps - 1 of them) a draw
        x = alpha x0_hat + sigma (sqrt(1 - eta^2) eps_hat + eta z) and x0_hat again: `steps` model calls, for a
        model tuned by consistency_loss. eps_hat = (x_k - alpha_k x0_hat) / sigma_k is the noise that x0_hat
        implies at the point left; eta = 1 is Algorithm 1's fresh draw, exact for an exact consistency function;
        eta = 0 the deterministic jump of DDIM (Song et al. 2020, eq. 12) with the consistency model's x0_hat,
        which keeps x_T's noise (test_samplers.py gives the law of both on Gaussian data). As a table:
        c = sqrt(1 - eta^2) sigma_{k+1} / sigma_k, w = alpha_{k+1} - c alpha_k, s = eta sigma_{k+1}.
        start: the time x_T is at (SDEdit)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        top = self.t_start if start is None else start
        levels = middle * 4.0 ** -torch.arange(steps - 1, dtype=torch.float64)
        times = torch.cat([torch.tensor([top], dtype=torch.float64), self.time_of_log_snr(-levels.log())])
        if not (times.diff() < 0).all():
            raise ValueError(f"the middle noise levels {levels.tolist()} must lie below the start's")
        alpha, sigma = self._grid(times)
        x = self._start(shape, x_T, generator)
        c = math.sqrt(1 - eta ** 2) * sigma[1:] / sigma[:-1]  # 0 on the last step, into sigma = 0
        table = c, (alpha[1:] - c * alpha[:-1])[:, None], eta * sigma[1:]
        return self.run_grid(model, x, times, table, clip_x0, generator, return_trajectory, progress, **loop)

    @torch.inference_mode()
    def sde_sample(self, model, shape=None, x_T=None, steps=500, corrector_steps=0, snr=0.16, generator=None,
                   return_trajectory=False, progress=None, spacing="time", start=None, clip_x0=False, rho=RHO,
                   **loop):
        """Euler-Maruyama on the reverse SDE (euler_maruyama_coefficients) over `steps` times evenly spaced
        from t_start to t_end; the last call returns E[x_0 | x] without noise. corrector_steps >= 1 runs
        that many Langevin steps before each predictor step (PC, Song et al. Algorithms 4-5), of size
        2 alpha_i (snr |z| / |score|)^2 with the norms averaged over the batch. clip_x0 clips each x0_hat to
        [-1, 1], as the fixed-step samplers do (the command line does). Returns as ddpm_sample.
        """
        if steps < 2:
            raise ValueError(f"steps must be at least 2, got {steps}")
        times = self.time_grid(steps, spacing, start, rho)
        x = self._start(shape, x_T, generator)
        alpha, sigma = self._grid(times)
        f, g2 = self.sde(times)
        t, lang = self.model_time(times).to(x.device), self.langevin_alpha(times).float().to(x.device)
        sigma_k = sigma.float().to(x.device)
        # norms averaged over the batch, as Song et al.'s code: per-sample ratios are noisy at small D
        norm = lambda v: v.flatten(1).norm(dim=1).mean()

        def corrector(x, k, *_):
            for _ in range(corrector_steps if k < len(times) else 0):
                score, z = -model(x, t[k].expand(x.shape[0])) / sigma_k[k], randn(x.shape, generator, x.device)
                step = 2 * lang[k] * (snr * norm(z) / norm(score)) ** 2
                x = x + step * score + (2 * step).sqrt() * z
            return x
        given = loop.pop("hook", None)  # e.g. inpainting's: before the corrector
        hook = corrector if not given else lambda x, *at: corrector(given(x, *at), *at)
        return self.run_grid(model, x, times, euler_maruyama_coefficients(times, alpha, sigma, f, g2), clip_x0,
                             generator, return_trajectory, progress, hook=hook if corrector_steps or given else None,
                             **loop)

    @torch.inference_mode()
    def ddim_invert(self, model, x0, steps=50, refine=2, progress=None, spacing=None, start=None):
        """DDIM inversion: the deterministic DDIM step solved for its input, x_0 -> x_T (or x at start) on
        ddim_sample's grid. The step from point k to the next point (alpha', sigma') towards the data is
        x = alpha_k / alpha' (x' - sigma' eps) + sigma_k eps: first with eps at (x', t') (Song et al.'s
        inversion: refine=0), then `refine` fixed-point iterations with eps at (x, t_k), the point the
        sampler will see; each costs a model call and cuts the round-trip error about tenfold."""
        times = self.time_grid(steps, spacing, start).flip(0)  # from the data end up
        alpha, sigma = (v.flip(0) for v in self._grid(times.flip(0)))  # [clean, t_0 (data end), ..., noise end]
        c_prev, s_prev, s = (v.float().to(self.device) for v in (alpha[1:] / alpha[:-1], sigma[:-1], sigma[1:]))
        t = self.model_time(times).to(self.device)
        x = x0.to(self.device, torch.float32)
        for k in range(len(times)):
            x_prev = x
            for j in range(refine + 1):
                eps = model(x, t[max(k - 1, 0) if j == 0 else k].expand(x.shape[0]))
                x = c_prev[k] * (x_prev - s_prev[k] * eps) + s[k] * eps
            if progress:
                progress(k + 1, len(times))
        return x

    # -- the probability-flow ODE and the likelihood ------------------------------------------------

    def clipped(self, model):
        """The model whose x0_hat is clipped to [-1, 1], with eps_hat = (x - alpha_t clip(x0_hat)) / sigma_t: the
        fixed-step samplers' clip_x0 for the ODE (an under-trained model's unclipped x0_hat can run far outside
        the data's range)."""
        return Clipped(model, self)

    def marginal_slope(self, t):
        """(d alpha_t / dt, d sigma_t / dt) = (f alpha, f sigma + g^2 / (2 sigma)) from sde(t), unless a process
        knows them in closed form where f is infinite (the flow at alpha = 0)."""
        (alpha, sigma), (f, g2) = self.marginal(t), self.sde(t)
        return f * alpha, f * sigma + 0.5 * g2 / sigma

    def ode_drift(self, model, t, x):
        """The probability-flow ODE (Song et al. eq. 13), dx/dt = f(t) x - g(t)^2 score / 2 = f(t) x + g(t)^2
        eps_hat / (2 sigma_t); for a model with its own x0_hat (predicts_x0), the same drift as
        alpha_t' x0_hat + sigma_t' eps_hat (x_t = alpha_t x0 + sigma_t eps differentiated), finite at alpha = 0."""
        t = torch.full((), t, device=x.device)
        if predicts_x0(model):
            x0, eps = model.predict(x, t.expand(x.shape[0]))
            da, ds = self.marginal_slope(t)
            return da * x0 + ds * eps
        (_, sigma), (f, g2) = self.marginal(t), self.sde(t)
        return f * x + 0.5 * g2 / sigma * model(x, t.expand(x.shape[0]))

    @torch.inference_mode()
    def ode_sample(self, model, shape=None, x_T=None, rtol=1e-5, atol=1e-5, generator=None, progress=None,
                   start=None, clip_x0=False):
        """Samples by the probability-flow ODE (Song et al. eq. 13) from t_start (or start) to t_end with
        odeint's Dormand-Prince 5(4), then x0_hat = E[x_0 | x_{t_end}]; clip_x0: the drift of the clipped model
        (`clipped`). Deterministic given x_T. Returns (x_0, model calls)."""
        model = self.clipped(model) if clip_x0 else model
        x = self._start(shape, x_T, generator)
        x, nfe = odeint(lambda t, y: self.ode_drift(model, t, y), x, self.t_start if start is None else start,
                        self.t_end, rtol, atol, progress)
        return denoise(model, self, x, torch.full((x.shape[0],), self.t_end, device=x.device))[0], nfe + 1

    def bits_per_dim(self, model, x0, rtol=1e-5, atol=1e-5, hutchinson=1, generator=None):
        """-log p(x0) / (D ln 2) for the probability-flow ODE's density at t_end, at x0 as given
        (Song et al. appendix D.2): log p(x0) = log N(x(t_start); 0, prior_std^2 I) + the integral from
        t_end to t_start of div f~(x(t), t), integrated with the state. The divergence is exact
        (D backward passes) when hutchinson = 0, else the Skilling-Hutchinson estimate with that many
        Gaussian probes, fixed along the path. Returns a tensor [B]."""
        x0 = x0.to(self.device, torch.float32)
        B, D = x0.shape[0], x0[0].numel()
        probes = torch.randn((hutchinson, *x0.shape), generator=generator, device=x0.device)

        def augmented(t, state):  # d/dt [x, integral of div] = [f~(x, t), div f~(x, t)]
            with torch.enable_grad():
                x = state[:, :D].reshape(x0.shape).detach().requires_grad_(True)
                dx = self.ode_drift(model, t, x)
                if hutchinson:
                    div = sum((torch.autograd.grad(dx, x, v, retain_graph=True)[0] * v).flatten(1).sum(1)
                              for v in probes) / hutchinson
                else:
                    flat = dx.flatten(1)
                    div = sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                              for i in range(D))
            return torch.cat([dx.detach().flatten(1), div.detach()[:, None]], 1)

        start = torch.cat([x0.flatten(1), x0.new_zeros(B, 1)], 1)
        end, _ = odeint(augmented, start, self.t_end, self.t_start, rtol, atol)
        z, integral = end[:, :D], end[:, D]
        prior = -0.5 * D * math.log(2 * math.pi * self.prior_std ** 2) - z.pow(2).sum(1) / (2 * self.prior_std ** 2)
        return -(prior + integral) / (D * math.log(2))

# ----------------------------------------------------------------------------------------------
# editing: inpainting (replacement, RePaint) through run_grid's hook and path


class Clipped(nn.Module):
    """ScoreSDE.clipped: model's x0_hat clipped to [-1, 1], its eps_hat = (x - alpha_t x0_hat) / sigma_t."""

    def __init__(self, model, process):
        super().__init__()
        self.model, self.process = model, process
        self.predicts_x0 = predicts_x0(model)

    def predict(self, x, t):
        alpha, sigma = (_column(v, x) for v in self.process.marginal_at(t))
        return from_prediction("x0", denoise(self.model, self.process, x, t)[0].clamp(-1, 1), x, alpha, sigma)

    def forward(self, x, t):
        return self.predict(x, t)[1]


class Replace:
    """Inpainting by replacement (Song et al. 2021, appendix I.2), a run_grid hook: before every model call
    the known pixels (keep true) are set to a draw of q(x_t | x0) at that point's time, alpha_t x0 + sigma_t z,
    and at the end to x0 itself. x0 [B, C, H, W]; keep broadcasts to it."""

    def __init__(self, x0, keep, generator=None):
        self.x0, self.keep, self.generator = x0, keep.bool(), generator

    def __call__(self, x, k, alpha, sigma):
        known = alpha * self.x0 + (sigma * randn(x.shape, self.generator, x.device) if sigma > 0 else 0)
        return torch.where(self.keep, known, x)


class ReconstructionGuided(nn.Module):
    """Reconstruction guidance for inpainting (Ho et al. 2022, "Video diffusion models", eq. 7), an eps model
    to use with Replace: the unknown pixels' x0_hat moves down the gradient of the known pixels' reconstruction
    error, x0_tilde = x0_hat - (weight alpha_t / 2) grad_{x_t} ||keep (x0 - x0_hat(x_t))||^2 on the unknown
    pixels, so that they agree with the known ones through the model rather than only through x_t. Returns
    (x_t - alpha_t x0_tilde) / sigma_t; each call costs a backward pass through the model. weight 0 is the
    model itself. t: the model's times, which marginal_at reads."""

    def __init__(self, model, process, x0, keep, weight):
        super().__init__()
        self.model, self.process, self.weight = model, process, weight
        self.x0, self.keep = x0, keep.bool()

    @property
    def predicts_x0(self):
        return predicts_x0(self.model)

    def predict(self, x, t):
        alpha, sigma = (v.float().reshape(-1, *(1,) * (x.ndim - 1)) for v in self.process.marginal_at(t))
        with torch.inference_mode(False), torch.enable_grad():  # autograd inside the samplers' inference mode
            x, t, alpha, sigma, known, keep = (v.clone() for v in (x, t, alpha, sigma, self.x0, self.keep))
            x.requires_grad_(True)
            x0 = denoise(self.model, self.process, x, t)[0]
            grad, = torch.autograd.grad(torch.where(keep, known - x0, 0).square().sum(), x)
        x0 = (x0.detach() - torch.where(keep, 0, self.weight * alpha / 2 * grad)).detach()
        return from_prediction("x0", x0, x.detach(), alpha, sigma)

    def forward(self, x, t):
        return self.predict(x, t)[1]


def repaint_path(steps, jump=10, resample=10):
    """RePaint's schedule (Lugmayr et al. 2022, Algorithm 1 with jumps) as run_grid's path over the grid
    points 0 (the noise end) .. steps (the clean image): down one point at a time; on reaching a point k whose
    timestep t = steps - 1 - k (t = 0: the last model call, never the clean image) is a multiple of `jump` below
    steps - jump, back `jump` points through the forward process and down again, resample - 1 times (their
    schedule of times 249, ..., 230, 240, ..., 230, ... for 250 steps, jump 10). Model calls: steps + (resample - 1)
    jump len(range(0, steps - jump, jump)), 2,410 for the paper's 250 steps, jump 10, resample 10."""
    if steps < 1 or jump < 1 or resample < 1:
        raise ValueError(f"steps, jump and resample must be at least 1, got {steps}, {jump} and {resample}")
    jumps = set(range(0, steps - jump, jump))
    path = [0]
    for k in range(1, steps + 1):
        path.append(k)
        if steps - 1 - k in jumps:
            path += [k - jump, *range(k - jump + 1, k + 1)] * (resample - 1)
    return path

# ----------------------------------------------------------------------------------------------
# the DDPM process: Ho et al.'s chain, read as the VP SDE


class Diffusion(ScoreSDE):
    """Gaussian diffusion with a fixed beta schedule (Ho et al.), also read as the VP SDE.

    All coefficients are computed in float64 and stored as float32 buffers, so they follow
    `.to(device)`. Timesteps are t = 0 .. T-1 for the paper's 1 .. T; the model is called with a
    LongTensor t on the integer grids (SPACINGS) and with float t at fractional times.
    """
    name = "ddpm"
    options = ("T", "schedule", "beta_start", "beta_end")
    variance_preserving = True
    spacings = SPACINGS + ScoreSDE.spacings
    default_spacing = "linspace"
    default_order = 3

    @classmethod
    def from_config(cls, cfg):
        return cls(make_betas(cfg["schedule"], cfg["T"], cfg["beta_start"], cfg["beta_end"]))

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
            alphas_cumprod=alphas_cumprod,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,
            # beta-tilde is 0 at t = 0: clip the log to the next value, as Ho et al. do
            posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
            log_alphas_cumprod=alphas_cumprod.log(),  # for the VP SDE at fractional timesteps
            log_alphas_cumprod_slope=_central_slopes(alphas_cumprod.log()),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        # the float64 sources of every derived schedule (the samplers' grids, respacing); they stay on the CPU
        self.alphas_cumprod64 = alphas_cumprod
        self.log_alphas_cumprod64 = alphas_cumprod.log()
        self.log_alphas_cumprod_slope64 = _central_slopes(self.log_alphas_cumprod64)

    @property
    def T(self):
        return self.betas.shape[0]

    def extra_repr(self):
        return f"T={self.T}, alpha-bar_T={self.alphas_cumprod64[-1].item():.2e}"

    # -- forward process ----------------------------------------------------------------------

    def _check_t(self, t, x):
        if t.dtype not in (torch.long, torch.float32, torch.float64) or t.shape != (x.shape[0],):
            raise ValueError(f"t must be a LongTensor (or float timesteps) of shape [{x.shape[0]}], got {t.dtype} "
                             f"{tuple(t.shape)}")

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

    def train_t(self, n, generator=None, device=None):
        """n training timesteps t ~ U{0..T-1}."""
        return torch.randint(0, self.T, (n,), generator=generator, device=device or self.device)

    # -- the same process as the VP SDE (Song et al. eq. 11, appendix B), in timestep units ---------

    t_end = 0.0

    @property
    def t_start(self):
        return float(self.T - 1)

    def _log_alphas_cumprod_at(self, t):
        """log a-bar at fractional timesteps t in [0, T-1] and beta(t) = -d log a-bar / dt.

        log a-bar is the cubic Hermite interpolant of its values at the integers, with central-
        difference slopes: exact at every integer and C^1, so beta(t) is continuous. (Linear
        interpolation makes beta jump at each of the T-1 integers; the adaptive ODE solver then stalls
        at an error near 1e-3 however small its tolerance: measured with the tests' Gaussian predictor.)
        float64 t (on the CPU) reads the float64 tables.
        """
        wide = t.dtype == torch.float64
        log_ab = self.log_alphas_cumprod64 if wide else self.log_alphas_cumprod
        slopes = self.log_alphas_cumprod_slope64 if wide else self.log_alphas_cumprod_slope
        i = (t if wide else t.float()).floor().clamp(0, self.T - 2)
        w, i = t - i, i.long()
        p0, p1, m0, m1 = log_ab[i], log_ab[i + 1], slopes[i], slopes[i + 1]
        value = (2 * w ** 3 - 3 * w ** 2 + 1) * p0 + (w ** 3 - 2 * w ** 2 + w) * m0 \
            + (3 * w ** 2 - 2 * w ** 3) * p1 + (w ** 3 - w ** 2) * m1
        slope = (6 * w ** 2 - 6 * w) * (p0 - p1) + (3 * w ** 2 - 4 * w + 1) * m0 + (3 * w ** 2 - 2 * w) * m1
        return value, -slope

    def marginal(self, t):
        """alpha_t = sqrt(a-bar(t)) and sigma_t = sqrt(1 - a-bar(t)) at fractional timesteps."""
        log_ab, _ = self._log_alphas_cumprod_at(t)
        return (0.5 * log_ab).exp(), (-torch.expm1(log_ab)).sqrt()

    def marginal_at(self, t):
        """marginal(t), read from the float64-made tables when t holds integers."""
        if t.is_floating_point():
            return self.marginal(t)
        return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]

    def sde(self, t):
        """dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw: f = -beta / 2 and g^2 = beta."""
        _, beta = self._log_alphas_cumprod_at(t)
        return -0.5 * beta, beta

    def langevin_alpha(self, t):
        return torch.exp(-self._log_alphas_cumprod_at(t)[1])  # about 1 - beta_t at the integers

    # -- likelihood: the variational bound --------------------------------------------------------

    @torch.inference_mode()
    def vlb_bits_per_dim(self, model, x0, variance="beta", clip_x0=True, generator=None, progress=None):
        """The variational bound on -log p(x0) (Ho et al. eq. 5) in bits/dim, per image: "prior" L_T =
        KL(q(x_T | x0) || N(0, I)), "kl" the sum over t >= 1 of KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),
        "decoder" L_0 = -log p(x0 | x_1) with the discretised Gaussian, and "total". Each term at one
        x_t ~ q(x_t | x0), as improved-diffusion's calc_bpd_loop; p's variance is beta_t ("beta", with
        beta-tilde at t = 0 as there) or beta-tilde_t ("posterior"). x0: 8-bit values in [-1, 1]. T model calls.
        """
        if variance not in ("beta", "posterior"):
            raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
        x0 = x0.to(self.device, torch.float32)
        B, bits = x0.shape[0], 1 / (x0[0].numel() * math.log(2))
        logvar = (torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]])) if variance == "beta"
                  else self.posterior_log_variance_clipped)
        per_image = lambda v: v.flatten(1).sum(1) * bits
        kl, decoder = x0.new_zeros(B), None
        for n, i in enumerate(reversed(range(self.T))):
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, torch.randn(x0.shape, generator=generator, device=x0.device))
            x0_hat = self.predict_x0(x_t, t, model(x_t, t))
            mean = self.q_posterior(x0_hat.clamp(-1, 1) if clip_x0 else x0_hat, x_t, t)[0]  # p's mean
            if i == 0:
                decoder = -per_image(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar[0]))
            else:
                true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
                kl += per_image(normal_kl(true_mean, true_logvar, mean, logvar[i]))
            if progress:
                progress(n + 1, self.T)
        a_T = self.alphas_cumprod[-1]
        prior = per_image(normal_kl(a_T.sqrt() * x0, torch.log(1 - a_T), torch.zeros_like(x0), torch.zeros_like(x0)))
        return {"total": prior + kl + decoder, "prior": prior, "kl": kl, "decoder": decoder}

    # -- grids of timesteps -------------------------------------------------------------------------

    def chain(self, start=None):
        """Ho et al.'s chain: every timestep, T-1 (or start) down to 0."""
        return self.time_grid(self.T, "linspace", start)

    def _grid_times(self, steps, spacing, rho=RHO):
        """As ScoreSDE's (float times, read through the interpolation of marginal), and the integer spacings of
        ddim_timesteps (SPACINGS) as a LongTensor."""
        if (spacing or self.default_spacing) in SPACINGS:
            return torch.tensor(self.ddim_timesteps(steps, spacing or self.default_spacing)).flip(0)
        return super()._grid_times(steps, spacing, rho)

    def respaced(self, timesteps):
        """The process on the kept `timesteps` (ascending) alone, improved-diffusion's respacing:
        a-bar'_i = a-bar_{timesteps[i]} and beta'_i = 1 - a-bar'_i / a-bar'_{i-1}, in float64. The
        model is still called with the original timesteps."""
        a = self.alphas_cumprod64[timesteps]
        return Diffusion(1 - a / torch.cat([a.new_ones(1), a[:-1]])).to(self.betas.device)

    def ddim_timesteps(self, steps, spacing="trailing"):
        """`steps` strictly increasing timesteps in 0..T-1 for the sub-sequence samplers.

        "leading" (the DDIM paper's; starts at 0): floor(i T / steps). "trailing" (Lin et al. 2024;
        ends at T-1): T - 1 - floor((steps - 1 - i) T / steps). "linspace": round(i (T-1) / (steps-1)).
        "logsnr" (the DPM-Solver paper's): the nearest timesteps to values of lambda = log(alpha /
        sigma) evenly spaced from lambda_{T-1} to lambda_0, pushed apart where two coincide. For
        every steps in 1..T the largest is at least T - ceil(T / steps): sampling starts near noise.
        """
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in 1..{self.T}, got {steps}")
        i, T = torch.arange(steps, dtype=torch.long), self.T
        if spacing == "leading":
            ts = i * T // steps
        elif spacing == "trailing":
            ts = T - 1 - (steps - 1 - i) * T // steps
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
        elif spacing == "logsnr":
            lam = 0.5 * torch.log(self.alphas_cumprod64 / (1 - self.alphas_cumprod64))  # decreasing in t
            target = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
            ts = (lam[None] - target[:, None]).abs().argmin(1).flip(0)
            # ts - i non-decreasing and at most T - steps <=> strictly increasing within 0..T-1
            ts = (ts - i).cummax(0).values.clamp(max=T - steps) + i
        else:
            raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
        return ts.tolist()

# ----------------------------------------------------------------------------------------------
# the variance-exploding SDE


class VESDE(ScoreSDE):
    """dx = sigma^t dw for t in [eps, 1] (Song et al. 2021, the SMLD / NCSN process as an SDE): x_t ~ N(x_0,
    sigma_t^2 I) with sigma_t^2 = (sigma^(2t) - 1) / (2 ln sigma), prior N(0, sigma_1^2 I). model(x_t, t) takes t
    as a float tensor [B] in (0, 1] and returns eps_hat = -sigma_t * score.
    """
    name = "ve"
    predictions = ("eps",)  # the scaled score, unweighted (Song et al. eq. 7)
    weighted = False
    recipe = {"prediction": "eps", "min_snr": 0.0}
    options = ("sigma",)
    model_time_scale = 1000.0  # t in (0, 1]: see UNet.forward
    t_start = 1.0

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["sigma"])

    def __init__(self, sigma=25.0, eps=1e-5):
        super().__init__()
        if not (math.isfinite(sigma) and sigma > 1):
            raise ValueError(f"sigma must be a number above 1, got {sigma}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.sigma, self.eps = float(sigma), float(eps)
        self.register_buffer("log_sigma", torch.tensor(math.log(sigma)), persistent=False)  # marks the device
        self.prior_std = math.sqrt((sigma ** 2 - 1) / (2 * math.log(sigma)))

    @property
    def t_end(self):
        return self.eps

    def extra_repr(self):
        return f"dx = {self.sigma:g}^t dw, t in [{self.eps:g}, 1], prior std {self.prior_std:.2f}"

    def marginal_std(self, t):
        """sigma_t = sqrt((sigma^(2t) - 1) / (2 ln sigma)), with expm1 for small t."""
        log_sigma = math.log(self.sigma)
        return (torch.expm1(2 * t * log_sigma) / (2 * log_sigma)).sqrt()

    def marginal(self, t):
        return torch.ones_like(t), self.marginal_std(t)

    def sde(self, t):
        """f = 0, g(t)^2 = sigma^(2t) = d sigma_t^2 / dt."""
        return torch.zeros_like(t), torch.exp(2 * t * math.log(self.sigma))

    def train_t(self, n, generator=None, device=None):
        """n training times t ~ U(eps, 1)."""
        return self.eps + (1 - self.eps) * torch.rand(n, generator=generator, device=device or self.device)

# ----------------------------------------------------------------------------------------------
# flow matching


class FlowMatching(ScoreSDE):
    """Flow matching on the straight path (Lipman et al. 2022; Liu et al. 2022's rectified flow): x_t = (1 - t)
    x_0 + t eps for t in [eps, 1], alpha_t = 1 - t, sigma_t = t; t = 1 is pure noise (alpha = 0). The network
    predicts the velocity u = dx_t/dt = eps - x_0 (Predictor "velocity"; v and x0 are trainable too) and is
    trained with t ~ logit-normal, t = sigmoid(mean + scale n), n ~ N(0, 1) (Esser et al. 2024, eq. 19 and
    their best, mean 0, scale 1), or uniform on [eps, 1]. Its loss, the velocity MSE, is the eps MSE weighted
    by 1 / (1 - t)^2 (Esser et al.'s rectified flow weighting w_t = t / (1 - t) in their eq. 8).

    As an SDE, f = -1 / (1 - t) and g^2 = 2 t / (1 - t), both infinite at t = 1: there the samplers read
    x0_hat from the velocity (Predictor.predict), the ODE its drift u = alpha' x0_hat + sigma' eps_hat
    (marginal_slope), and Euler-Maruyama takes the ancestral step. Its DDIM step is the Euler step of dx/dt = u.
    t is the model's time in [0, 1], scaled by 1000 in the U-Net as the VE model's.
    """
    name = "flow"
    predictions = ("velocity", "v", "x0")
    recipe = {"prediction": "velocity", "min_snr": 0.0}
    options = ("time_density", "logit_mean", "logit_scale")
    densities = ("logit-normal", "uniform")
    model_time_scale = 1000.0
    spacings = ("shifted", "time", "karras")  # lambda = log((1 - t) / t) is -inf at the noise end
    ode_form = "flow"  # sigma / alpha is infinite at the noise end; t is the flow's own noise level
    default_spacing = "shifted"  # FD-wide 38 against 82 on "time" at 10 calls on MNIST (docs/sde.md)
    autoguidance = 2.5
    t_start = 1.0

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.get("time_density", "logit-normal"), cfg.get("logit_mean", 0.0), cfg.get("logit_scale", 1.0))

    def __init__(self, density="logit-normal", mean=0.0, scale=1.0, eps=1e-3, shift=3.0):
        super().__init__()
        if density not in self.densities:
            raise ValueError(f"unknown time density {density!r}; valid: {', '.join(self.densities)}")
        if not (math.isfinite(mean) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"the logit-normal's mean must be a number and its scale above 0, got {mean}, {scale}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive number, got {shift}")
        self.density, self.mean, self.scale, self.eps = density, float(mean), float(scale), float(eps)
        self.shift = float(shift)
        self.register_buffer("one", torch.ones(()), persistent=False)  # marks the device

    @property
    def t_end(self):
        return self.eps

    def extra_repr(self):
        law = f"logit-normal({self.mean:g}, {self.scale:g})" if self.density == "logit-normal" else "uniform"
        return f"x_t = (1 - t) x_0 + t eps, t in [{self.eps:g}, 1], training t ~ {law}"

    def marginal(self, t):
        return 1 - t, t.clone()

    def marginal_slope(self, t):
        return -torch.ones_like(t), torch.ones_like(t)

    def sde(self, t):
        """f = d log alpha / dt = -1 / (1 - t), g^2 = d sigma^2 / dt - 2 f sigma^2 = 2 t / (1 - t)."""
        return -1 / (1 - t), 2 * t / (1 - t)

    def chain(self, start=None):
        return self.time_grid(1000, "time", start)

    def _grid_times(self, steps, spacing, rho=RHO):
        """As ScoreSDE's, and "shifted": evenly spaced u mapped to t = s u / (1 + (s - 1) u), s = shift (Esser et
        al. 2024, eq. 23; SD3 samples with s = 3), which spends more of the steps near the noise end."""
        if (spacing or self.default_spacing) != "shifted":
            return super()._grid_times(steps, spacing, rho)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        s, end = self.shift, self.t_end
        u = torch.linspace(1.0, end / (s - (s - 1) * end), steps, dtype=torch.float64)
        times = s * u / (1 + (s - 1) * u)
        times[0] = 1.0
        if steps > 1:
            times[-1] = end  # exactly, not to the last bit of the map
        return times

    def train_t(self, n, generator=None, device=None):
        """n training times: sigmoid(mean + scale N(0, 1)) (logit-normal), or U(eps, 1)."""
        device = device or self.device
        if self.density == "uniform":
            return self.eps + (1 - self.eps) * torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.scale * torch.randn(n, generator=generator, device=device))

# ----------------------------------------------------------------------------------------------
# a run of train.py, loaded with torch alone

PROCESSES = {cls.name: cls for cls in (Diffusion, VESDE, FlowMatching)}


# ----------------------------------------------------------------------------------------------
# the samplers by name: sample.py's --sampler, train.py's grids, bench.py and the tests read this table


class Sampler(NamedTuple):
    """A sampler by name: the process's method that runs it and the settings that make it this sampler over
    the method's own defaults (fixed). calls(options) is its model calls for the full options (None where
    adaptive); fills: it takes run_grid's hook (inpainting) and path (RePaint)."""
    method: str
    summary: str
    fixed: dict = {}
    calls: Optional[Callable] = lambda o: o["steps"]
    fills: bool = True

    def defaults(self):
        """Every setting with its default: the method's keyword defaults, fixed over them."""
        params = inspect.signature(getattr(ScoreSDE, self.method)).parameters
        return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty} | self.fixed


SAMPLERS = {
    "ddpm": Sampler("ddpm_sample", "ancestral sampling (Ho et al. 2020), respaced with --steps",
                    calls=lambda o: o["steps"] or None),
    "ddim": Sampler("ddim_sample", "DDIM (Song et al. 2020); at eta 0 Euler in the noise level"),
    "euler-a": Sampler("ddim_sample", "Euler-ancestral (k-diffusion): DDIM with eta 1", {"eta": 1.0, "steps": 10}),
    "dpm++": Sampler("dpm_solver_sample", "DPM-Solver++ 2M/3M (Lu et al. 2022b); eta 1 its SDE form"),
    "heun": Sampler("heun_sample", "Heun on the Karras grid (Karras et al. 2022, Alg. 2)",
                    calls=lambda o: 2 * o["steps"] - 1),
    "em": Sampler("sde_sample", "Euler-Maruyama on the reverse SDE (Song et al. 2021)",
                  calls=lambda o: o["steps"] * (1 + o["corrector_steps"])),
    "pc": Sampler("sde_sample", "predictor-corrector (Song et al. 2021, Alg. 4-5)", {"corrector_steps": 1},
                  calls=lambda o: o["steps"] * (1 + o["corrector_steps"])),
    "ode": Sampler("ode_sample", "adaptive RK45 on the probability-flow ODE", calls=None, fills=False),
    "cm": Sampler("cm_sample", "consistency models' multistep sampler (Song et al. 2023), for ECT and CD runs"),
}


def sample(process, model, sampler="dpm++", shape=None, **options):
    """Samples of `process` by SAMPLERS[sampler] with its defaults, `options` over them (the method's keywords,
    e.g. x_T, steps, eta, generator, hook): what the command line and the training grids call."""
    spec = SAMPLERS[sampler]
    return getattr(process, spec.method)(model, shape, **(spec.fixed | options))


def make_process(cfg):
    """The process a run's configuration describes (PROCESSES[cfg["process"]], "ddpm" by default)."""
    name = cfg.get("process", "ddpm")
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; valid: {', '.join(PROCESSES)}")
    return PROCESSES[name].from_config(cfg)


def sampling_model(model, process, cfg):
    """A run's network as the samplers take it: the eps network itself, or a Predictor around one that
    predicts v, x0 or the velocity."""
    kind = cfg.get("prediction", "eps")
    return model if kind == "eps" else Predictor(model, process, kind)


def load(checkpoint, ema=True, device="cpu"):
    """(model, process, config) from a checkpoint of train.py, a path or the dict torch.load gives, with
    torch alone: the U-Net rebuilt from config["model"] with the EMA weights (or the raw ones), in eval
    mode, as an eps model (EpsFromV around a v-prediction network), and its process on `device`:

        model, process, cfg = ddpm.load("runs/x/ckpt.pt")
        x = process.dpm_solver_sample(model, (16, cfg["model"]["in_channels"], 32, 32))

    weights_only=True: loading never runs code from the file. A file that is not such a checkpoint (damaged,
    foreign, or holding objects a safe load refuses) raises ValueError saying so."""
    if isinstance(checkpoint, dict):
        ckpt = checkpoint
    else:
        try:
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's own message would advise loading unsafely
            raise ValueError(f"{checkpoint}: not a checkpoint that loads safely ({type(e).__name__})") from None
    try:
        cfg = ckpt["config"]
        model = UNet(**cfg["model"])
        model.load_state_dict(ckpt["ema"]["model"] if ema else ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{checkpoint if not isinstance(checkpoint, dict) else 'the dict'}: not a checkpoint of "
                         f"train.py ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    model = model.to(device).eval().requires_grad_(False)
    process = make_process(cfg).to(device)
    return sampling_model(model, process, cfg), process, cfg
