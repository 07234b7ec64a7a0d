"""sample.py: images from a checkpoint of train.py: DPM-Solver++ (Lu et al. 2022), DDIM (Song et al. 2020),
DDPM (Ho et al. 2020), and the reverse SDE, predictor-corrector and probability-flow ODE (Song et al. 2021).

    python sample.py runs/demo --n 64                              # 8x8 grid, SDE-DPM-Solver++(2M) -> samples.png
    python sample.py runs/ve --sampler pc --steps 500              # a VE run: em, pc or ode
    python sample.py runs/mnist --nll 1000                         # bits/dim of 1000 training images (ODE)
    python sample.py runs/mnist --vlb 100                          # Ho et al.'s variational bound, bits/dim
    python sample.py runs/faces --n 64 --nearest 4                 # does it copy its training images?
    python sample.py runs/demo --sampler ddpm --n 16 --out imgs/   # DDPM; also one PNG per image
    python sample.py runs/demo --trajectory strip.png              # rows from x_T to x_0
    python sample.py runs/demo --forward photo.png                 # forward process q(x_t | x_0) of one image
    python sample.py runs/demo --interpolate                       # slerp between two noises, DDIM-decoded
    python sample.py runs/mnist --invert two.png five.png --mix 0.5   # DDIM-invert, mix latents, decode
    python sample.py runs/demo --n 1000 --fid real.npz             # FID of the samples against a folder/.npz
    torchrun --nproc_per_node 8 sample.py runs/cifar --num-samples 50000 --out imgs/ --fid cifar.npz

Sample i starts from noise seeded by (--seed, i), so the images and file names are the same for any
number of torchrun processes (each draws its share of whole batches; rank 0 writes the grid and the FID).

The EMA weights are used unless --no-ema. Checkpoints load with weights_only=True, so a
checkpoint file cannot run code.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

import ddpm
import fid
import train


def slerp(a, b, w):
    """Spherical interpolation between noise tensors a and b (weight w on b), per sample."""
    af, bf = a.flatten(1), b.flatten(1)
    omega = torch.arccos((af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1))).clamp(1e-6, math.pi - 1e-6)
    omega = omega.reshape(-1, *([1] * (a.ndim - 1)))
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def load_image(path, size, channels):
    """An image file fitted like the training data, as [1, C, size, size] in [-1, 1]."""
    a = train.fit_file(path, size, "L" if channels == 1 else "RGB")
    if a is None:
        raise train.UserError(f"{path}: cannot read this image")
    return torch.from_numpy(a.copy())[None].float() / 127.5 - 1


def make_progress(label):
    if not sys.stderr.isatty():
        return None
    return lambda i, n: print(f"\r{label}: step {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)


DDPM_ONLY = ("ddpm", "ddim", "dpm++")
STEPS = {"ddpm": None, "ddim": 50, "dpm++": 20, "em": 500, "pc": 500}  # --steps by sampler; ddpm: all T


def sample_batch(args, process, model, shape, x_T, generator, trajectory, progress):
    """One batch from the sampler --sampler: (x, trajectory or None)."""
    kw = dict(x_T=x_T, generator=generator, progress=progress)
    steps = args.steps or STEPS.get(args.sampler)
    spacing = {"spacing": args.spacing} if args.spacing else {}
    if args.sampler == "ode":
        x, nfe = process.ode_sample(model, shape, rtol=args.rtol, atol=args.atol, **kw)
        print(f"ode: {nfe} model calls", file=sys.stderr)
        return x, None
    kw["return_trajectory"] = trajectory
    if args.sampler == "ddpm":
        out = process.ddpm_sample(model, shape, variance=args.variance, steps=steps, **spacing, **kw)
    elif args.sampler == "ddim":
        out = process.ddim_sample(model, shape, steps=steps, eta=args.eta, **spacing, **kw)
    elif args.sampler == "dpm++":
        out = process.dpm_solver_sample(model, shape, steps=steps, order=args.order, eta=args.eta, **spacing, **kw)
    else:
        corrector = args.corrector_steps if args.corrector_steps is not None else int(args.sampler == "pc")
        out = process.sde_sample(model, shape, steps=steps, corrector_steps=corrector, snr=args.snr, **kw)
    return out if trajectory else (out, None)


def generate(args, diffusion, model, shape, procs, each, x_T=None, trajectory=False):
    """This rank's share of shape[0] samples, in whole batches of --batch-size: each(i, x) gets every
    batch (x in [-1, 1], i its first sample's index) as it is made. Sample i's noise comes from
    generators seeded by (--seed, i). Returns the trajectories [N, steps + 1, C, H, W] when asked."""
    device = diffusion.device
    n = shape[0] if x_T is None else x_T.shape[0]
    lo, hi = procs.span(n, args.batch_size)
    trajs = []
    for i in range(lo, hi, args.batch_size):
        k = min(args.batch_size, hi - i)
        start = None if x_T is None else x_T[i:i + k].to(device)
        label = f"batch {i // args.batch_size + 1}/{math.ceil(n / args.batch_size)}"
        gens = ddpm.sample_generators(args.seed, range(i, i + k), device)
        x, traj = sample_batch(args, diffusion, model, (k, *shape[1:]), start, gens, trajectory, make_progress(label))
        each(i, x)
        if trajectory:
            trajs.append(torch.stack([t.cpu() for t in traj], 1))  # (k, steps + 1, C, H, W)
    return torch.cat(trajs) if trajectory else None


def training_images(args, ckpt, n):
    """n training images of the run (None: all), picked at random with --seed, as uint8 [n, C, H, W]."""
    cfg = ckpt["config"]
    size, channels = cfg["model"]["image_size"], cfg["model"]["in_channels"]
    data = (train.load_folder(cfg["data"], size, channels) if cfg["data"]
            else train.demo_shapes(size=size, channels=channels, seed=cfg["seed"]))
    return data[torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n]]


def mean_and_error(name, values, unit="bits/dim"):
    """'name: mean +- standard error' of per-image values."""
    values = values.double()
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{name}: {values.mean().item():.4f} +- {se:.4f} {unit}"


def negative_log_likelihood(args, ckpt, process, model):
    """Bits/dim of --nll training images on the 8-bit scale: uniform dequantisation x = (k + u) / 128 - 1
    of the pixel values k, so -log2 p(k + u) = -log2 p(x) + 7 D (the density of [0, 256) vs [-1, 1))."""
    device = process.device
    images, g, bpd = training_images(args, ckpt, args.nll), torch.Generator(device).manual_seed(args.seed), []
    for i in range(0, len(images), args.batch_size):
        k = images[i:i + args.batch_size].to(device).float()
        u = torch.rand(k.shape, generator=g, device=device)
        bpd.append(process.bits_per_dim(model, (k + u) / 128 - 1, rtol=args.rtol, atol=args.atol,
                                        hutchinson=args.hutchinson, generator=g).cpu() + 7)
        print(f"nll: {min(i + args.batch_size, len(images))}/{len(images)} images", file=sys.stderr)
    print(mean_and_error("bits/dim", torch.cat(bpd), f"(standard error, {len(images)} images, 8-bit scale)"))


def variational_bound(args, ckpt, process, model):
    """Ho et al.'s bound on the discrete NLL (eq. 5) of --vlb training images, in bits/dim, with its terms."""
    device = process.device
    images, g, terms = training_images(args, ckpt, args.vlb), torch.Generator(device).manual_seed(args.seed), []
    for i in range(0, len(images), args.batch_size):
        x0 = images[i:i + args.batch_size].to(device).float() / 127.5 - 1
        terms.append(process.vlb_bits_per_dim(model, x0, variance=args.variance, generator=g,
                                              progress=make_progress(f"vlb {i + 1}-{i + len(x0)}")))
    values = {k: torch.cat([t[k].cpu() for t in terms]) for k in ("total", "prior", "kl", "decoder")}
    print(mean_and_error("VLB bits/dim", values["total"], f"(standard error, {len(images)} images; "
                         + ", ".join(f"{k} {values[k].mean().item():.4f}" for k in ("prior", "kl", "decoder")) + ")"))


def nearest_training_images(samples, images, k, inception=None, batch_size=1000):
    """For uint8 samples [N, C, H, W], the indices [N, k] of their k nearest training images (uint8
    [M, C, H, W]) and the distance to the nearest [N], in Inception pool3 features (or pixels without
    a network); and the median over training images of the distance to their nearest other one."""
    if inception is not None:
        a, b = (torch.from_numpy(fid.get_activations(x.split(50), inception)[0]) for x in (samples, images))
    else:
        a, b = samples.flatten(1).double(), images.flatten(1).double()
    d = torch.cdist(a, b)
    order = d.topk(k, dim=1, largest=False).indices
    return order, d.gather(1, order[:, :1]).squeeze(1), fid.knn_radii(b, 1, batch_size).median().item()


def memorisation_check(args, x, images, inception):
    """--nearest: a picture of each sample beside its K nearest training images, and the share of samples
    closer to a training image than the training set's median nearest-neighbour distance."""
    samples = fid.to_uint8(x)
    order, nearest, median = nearest_training_images(samples, images, args.nearest, inception)
    rows = torch.cat([torch.cat([s[None], images[i]]) for s, i in zip(samples, order)])
    train.save_grid(rows, args.nearest_grid, nrow=args.nearest + 1)
    close = (nearest < median).double().mean().item()
    space = "Inception features" if inception is not None else "pixels (no Inception weights: --fid-weights)"
    print(f"wrote {args.nearest_grid}: each sample, then its {args.nearest} nearest training images", file=sys.stderr)
    print(f"nearest: {close:.1%} of {len(samples)} samples are closer to a training image than the median training "
          f"image is to its nearest neighbour ({median:.4g}, in {space})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("run", metavar="RUN_OR_CKPT", help="a run folder of train.py or its ckpt.pt")
    a("--num-samples", "--n", dest="n", type=int, default=64, help="number of samples (--n: not under torchrun)")
    a("--sampler", default=None, choices=("ddpm", "ddim", "dpm++", "em", "pc", "ode"),
      help="None: dpm++ for DDPM runs, ode for VE runs. em/pc/ode solve the reverse SDE / probability-flow ODE")
    a("--steps", type=int, help="model calls; None: ddim 50, dpm++ 20, em/pc 500, ddpm all T (fewer: respaced)")
    a("--spacing", choices=ddpm.SPACINGS, help="timestep spacing of ddpm/ddim/dpm++; None: the sampler's default")
    a("--order", type=int, default=2, choices=(1, 2, 3), help="dpm++: DPM-Solver++ order (2M, 3M)")
    a("--corrector-steps", type=int, help="em/pc: Langevin corrector steps per step; None: 0 for em, 1 for pc")
    a("--snr", type=float, default=0.16, help="pc: the corrector's signal-to-noise ratio")
    a("--rtol", type=float, default=1e-5, help="ode and --nll: relative tolerance of the ODE solver")
    a("--atol", type=float, default=1e-5, help="ode and --nll: absolute tolerance of the ODE solver")
    a("--eta", type=float, help="ddim, dpm++: noise, 0 (deterministic) to 1 (ddim: ancestral; dpm++: SDE-DPM-Solver++); "
                              "None: 1 for dpm++ at orders 1-2 (the best images, README), else 0")
    a("--variance", default="beta", choices=("beta", "posterior"), help="DDPM sigma_t^2")
    a("--seed", type=int, default=0)
    a("--batch-size", type=int, default=128)
    a("--grid", default="samples.png", help="the output picture")
    a("--out", metavar="FOLDER", help="also write one PNG per sample here")
    a("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--channels-last", action="store_true", help="channels_last memory format (faster for some models)")
    a("--trajectory", metavar="PNG", help="also draw x_T -> x_0 for up to 8 samples, 10 columns")
    a("--forward", metavar="IMAGE", help="draw the forward process of IMAGE at 10 evenly spaced t")
    a("--interpolate", action="store_true", help="slerp between two noises in --n frames (DDIM)")
    a("--invert", nargs=2, metavar=("IMG_A", "IMG_B"), help="DDIM-invert two images and decode a mix")
    a("--mix", type=float, default=0.5, help="weight of IMG_B in the latent mix (slerp)")
    a("--fid", metavar="REF", help="FID of the samples against an image folder or .npz")
    a("--fid-weights", help="local Inception weights for --fid")
    a("--nll", type=int, metavar="N", help="bits/dim of N training images (8-bit scale, through the ODE)")
    a("--hutchinson", type=int, default=1, help="--nll: Gaussian probes of the divergence (0: exact, slow)")
    a("--vlb", type=int, metavar="N", help="DDPM runs: Ho et al.'s variational bound (bits/dim) of N training images")
    a("--nearest", type=int, metavar="K", help="memorisation check: each sample beside its K nearest training images")
    a("--nearest-grid", default="nearest.png", help="the picture of --nearest")
    return p.parse_args(argv)


def check_args(args, is_ve):
    """Bad numbers, picture names and options that do not apply to the run's process, as one line."""
    for picture in (args.grid, args.trajectory, args.nearest_grid if args.nearest else None):
        if picture:
            fid.image_format(picture)  # before any sampling
    args.sampler = args.sampler or ("ode" if is_ve else "dpm++")
    if args.eta is None:
        args.eta = 1.0 if args.sampler == "dpm++" and args.order <= 2 else 0.0
    for name, ok, rule in (("eta", lambda v: v >= 0, "a number >= 0"), ("mix", lambda v: True, "a number"),
                           ("snr", lambda v: v > 0, "a number > 0"), ("rtol", lambda v: v > 0, "a number > 0"),
                           ("atol", lambda v: v > 0, "a number > 0")):
        value = getattr(args, name)
        if not (math.isfinite(value) and ok(value)):
            raise train.UserError(f"--{name} must be {rule}, got {value}")
    for name in ("steps", "nll", "vlb", "nearest", "n", "batch_size", "corrector_steps"):
        value, least = getattr(args, name), 0 if name == "corrector_steps" else 1
        if value is not None and value < least:
            flag = "num-samples" if name == "n" else name.replace("_", "-")
            raise train.UserError(f"--{flag} must be at least {least}, got {value}")
    if is_ve and (args.sampler in DDPM_ONLY or args.forward or args.invert or args.vlb):
        what = ("--forward" if args.forward else "--invert" if args.invert else "--vlb" if args.vlb
                else f"--sampler {args.sampler}")
        raise train.UserError(f"{what} needs a DDPM checkpoint; {args.run} is a VE run: use --sampler em, pc or ode")
    if args.sampler == "dpm++" and args.eta > 0 and args.order > 2:
        raise train.UserError("--eta > 0 with --sampler dpm++ (SDE-DPM-Solver++) needs --order 1 or 2")
    if args.trajectory and args.sampler == "ode":
        raise train.UserError("--trajectory needs a fixed-step sampler (ddpm, ddim, dpm++, em or pc), not the adaptive ode")


SINGLE_PROCESS = ("nll", "vlb", "forward", "invert", "interpolate", "trajectory", "nearest")
GRID_LIMIT = 256  # the grid shows the first samples, at most this many


def run(args, procs):
    device = procs.start(args.device)
    single = [name for name in SINGLE_PROCESS if getattr(args, name)]
    if single and procs.world > 1:
        raise train.UserError(f"--{single[0]} runs in one process: start it with python, not torchrun")
    ckpt, model, ema, diffusion = train.load_checkpoint(args.run, device)
    net = train.sampling_model(ckpt["config"], (model if args.no_ema else ema.model).eval(), diffusion)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    cfg = ckpt["config"]["model"]
    c, s = cfg["in_channels"], cfg["image_size"]
    is_ve = isinstance(diffusion, ddpm.VESDE)
    check_args(args, is_ve)
    if procs.main:
        print(f"{args.run}: step {ckpt['step']}, {ddpm.count_params(net) / 1e6:.2f} M parameters, "
              f"{'raw' if args.no_ema else 'EMA'} weights", file=sys.stderr)
    if args.nll:
        negative_log_likelihood(args, ckpt, diffusion, net)
        return
    if args.vlb:
        variational_bound(args, ckpt, diffusion, net)
        return
    if args.fid:  # check the reference and the weights before spending time on sampling
        ref = fid.check_input(args.fid, 2)
        inception = fid.load_inception(args.fid_weights, device)
    if args.nearest:  # the training images and the features' network, before sampling
        images = training_images(args, ckpt, None)
        if args.nearest >= len(images):
            raise train.UserError(f"--nearest {args.nearest}: the run has {len(images)} training images")
        with_weights = args.fid_weights or Path(fid.weights_cache_path()).is_file()
        nearest_net = fid.load_inception(args.fid_weights, device) if with_weights else None
    if args.forward:
        forward_process(args, diffusion, s, c)
        return
    if args.invert:
        invert_and_mix(args, diffusion, net, s, c)
        return

    x_T = None
    if args.interpolate:
        g = torch.Generator(device).manual_seed(args.seed)
        a, b = (torch.randn((1, c, s, s), generator=g, device=device) for _ in range(2))
        x_T = slerp(a.expand(args.n, -1, -1, -1), b.expand(args.n, -1, -1, -1),
                    torch.linspace(0, 1, args.n, device=device).reshape(-1, 1, 1, 1))
        args.sampler, args.eta = ("ode" if is_ve else "ddim"), 0.0  # deterministic decoding: a smooth path
    kept = {"grid": [torch.zeros((0, c, s, s), dtype=torch.uint8)], "all": [], "feats": []}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)

    def each(i, x):  # a batch as it is made: its PNGs, its grid images, its FID features
        images = fid.to_uint8(x).cpu()
        for j, im in enumerate(images) if args.out else ():
            fid.save_image(im.permute(1, 2, 0).squeeze(2).numpy(), Path(args.out) / f"{i + j:06d}.png")
        kept["grid"].append(images[:max(GRID_LIMIT - i, 0)])
        if args.nearest:
            kept["all"].append(x.cpu())
        if args.fid:
            kept["feats"].append(torch.from_numpy(fid.get_activations(images.split(50), inception)[0]))

    traj = generate(args, diffusion, net, (args.n, c, s, s), procs, each, x_T, trajectory=bool(args.trajectory))
    grid = procs.gather(torch.cat(kept["grid"]))
    feats = procs.gather(torch.cat(kept["feats"])) if args.fid else None
    if not procs.main:
        return
    train.save_grid(grid, args.grid, nrow=args.n if args.interpolate else None)
    shown = f"the first {len(grid)} of {args.n} images" if len(grid) < args.n else f"{args.n} images"
    print(f"wrote {args.grid} ({shown})", file=sys.stderr)
    if args.out:
        print(f"wrote {args.n} PNGs to {args.out}" + (f" ({procs.world} processes)" if procs.world > 1 else ""),
              file=sys.stderr)
    if args.trajectory:
        cols = torch.linspace(0, traj.shape[1] - 1, 10).round().long()
        rows = traj[:8, cols]  # (rows, 10, C, H, W)
        train.save_grid(rows.flatten(0, 1), args.trajectory, nrow=10)
        print(f"wrote {args.trajectory}: columns from x_T (left) to x_0 (right)", file=sys.stderr)
    if args.nearest:
        memorisation_check(args, torch.cat(kept["all"]), images, nearest_net)
    if args.fid:
        ref = ref if ref is not None else fid.path_statistics(args.fid, inception)
        print(f"FID: {fid.checked_fid(*fid.activation_statistics(feats.numpy()), *ref):.4f}")


def forward_process(args, diffusion, s, c):
    """--forward: q(x_t | x_0) at t = 0, T/9, ..., T-1 with one shared noise."""
    device = diffusion.device
    x0 = load_image(args.forward, s, c).to(device)
    ts = torch.linspace(0, diffusion.T - 1, 10).round().long().to(device)
    noise = torch.randn(x0.shape, generator=torch.Generator(device).manual_seed(args.seed), device=device)
    row = diffusion.q_sample(x0.expand(10, -1, -1, -1), ts, noise.expand(10, -1, -1, -1))
    train.save_grid(torch.cat([x0, row]), args.grid, nrow=11)
    print(f"wrote {args.grid}: the image, then x_t at t = {ts.tolist()}", file=sys.stderr)


def invert_and_mix(args, diffusion, net, s, c):
    """--invert, seed 004's experiment: DDIM-invert two images, slerp their latents, decode."""
    x0 = torch.cat([load_image(f, s, c) for f in args.invert]).to(diffusion.device)
    steps, spacing = args.steps or STEPS["ddim"], args.spacing or "trailing"
    x_T = diffusion.ddim_invert(net, x0, steps=steps, spacing=spacing, progress=make_progress("inverting"))
    latents = torch.cat([x_T, slerp(x_T[:1], x_T[1:], args.mix)])
    out = diffusion.ddim_sample(net, x_T=latents, steps=steps, spacing=spacing, clip_x0=False)
    pixel = (torch.cat([x0, 0.5 * (x0[:1] + x0[1:])]), out)
    train.save_grid(torch.cat(pixel).clamp(-1, 1), args.grid, nrow=3)
    err = (out[:2] - x0).abs().max().item()
    print(f"wrote {args.grid}: top row A, B, their pixel average; bottom row A and B decoded from their "
          f"inversions (max error {err:.4f}) and the latent mix at {args.mix}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    procs = fid.Processes()
    try:
        run(args, procs)
    except (train.UserError, fid.FIDError, ValueError, OSError, fid.Stopped) as e:
        print(f"{procs.prefix('sample.py')}error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        lost = procs.lost_contact(e)
        if lost is None:
            raise
        print(f"{procs.prefix('sample.py')}error: {lost}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nsample.py: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
