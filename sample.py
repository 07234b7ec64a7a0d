"""sample.py: images from a checkpoint of train.py, with DDPM (Ho et al. 2020) or DDIM (Song et al. 2020).

    python sample.py runs/demo --n 64                              # 8x8 grid of DDIM samples -> samples.png
    python sample.py runs/demo --sampler ddpm --n 16 --out imgs/   # DDPM; also one PNG per image
    python sample.py runs/demo --trajectory strip.png              # rows from x_T to x_0
    python sample.py runs/demo --forward photo.png                 # forward process q(x_t | x_0) of one image
    python sample.py runs/demo --interpolate                       # slerp between two noises, DDIM-decoded
    python sample.py runs/mnist --invert two.png five.png --mix 0.5   # DDIM-invert, mix latents, decode
    python sample.py runs/demo --n 1000 --fid real.npz             # FID of the samples against a folder/.npz

The EMA weights are used unless --no-ema. Checkpoints load with weights_only=True, so a
checkpoint file cannot run code.
"""
import argparse
import math
import sys
from pathlib import Path

import torch
from PIL import Image

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


def generate(args, diffusion, model, shape, x_T=None, trajectory=False):
    """Samples [N, C, H, W] in [-1, 1] (and the trajectories), in batches of --batch-size."""
    device = diffusion.betas.device
    g = torch.Generator(device).manual_seed(args.seed)
    n = shape[0] if x_T is None else x_T.shape[0]
    xs, trajs = [], []
    for i in range(0, n, args.batch_size):
        k = min(args.batch_size, n - i)
        start = None if x_T is None else x_T[i:i + k].to(device)
        kw = dict(x_T=start, generator=g, return_trajectory=trajectory,
                  progress=make_progress(f"batch {i // args.batch_size + 1}/{math.ceil(n / args.batch_size)}"))
        if args.sampler == "ddpm":
            out = diffusion.ddpm_sample(model, (k, *shape[1:]), variance=args.variance, **kw)
        else:
            out = diffusion.ddim_sample(model, (k, *shape[1:]), steps=args.steps, eta=args.eta, **kw)
        x, traj = out if trajectory else (out, None)
        xs.append(x.cpu())
        if trajectory:
            trajs.append(torch.stack([t.cpu() for t in traj], 1))  # (k, steps + 1, C, H, W)
    return torch.cat(xs), (torch.cat(trajs) if trajectory else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("run", metavar="RUN_OR_CKPT", help="a run folder of train.py or its ckpt.pt")
    a("--n", type=int, default=64, help="number of samples")
    a("--sampler", default="ddim", choices=("ddpm", "ddim"))
    a("--steps", type=int, default=50, help="DDIM steps")
    a("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic, 1: DDPM-like)")
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
    return p.parse_args(argv)


def run(args):
    device = torch.device(args.device)
    ckpt, model, ema, diffusion = train.load_checkpoint(args.run, device)
    net = (model if args.no_ema else ema.model).eval()
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    cfg = ckpt["config"]["model"]
    c, s = cfg["in_channels"], cfg["image_size"]
    print(f"{args.run}: step {ckpt['step']}, {ddpm.count_params(net) / 1e6:.2f} M parameters, "
          f"{'raw' if args.no_ema else 'EMA'} weights", file=sys.stderr)
    if args.fid:  # check the reference and the weights before spending time on sampling
        ref = fid.check_input(args.fid, 2)
        inception = fid.load_inception(args.fid_weights, device)

    if args.forward:  # q(x_t | x_0) at t = 0, T/9, ..., T-1 with one shared noise
        x0 = load_image(args.forward, s, c).to(device)
        ts = torch.linspace(0, diffusion.T - 1, 10).round().long().to(device)
        noise = torch.randn(x0.shape, generator=torch.Generator(device).manual_seed(args.seed), device=device)
        row = diffusion.q_sample(x0.expand(10, -1, -1, -1), ts, noise.expand(10, -1, -1, -1))
        train.save_grid(torch.cat([x0, row]), args.grid, nrow=11)
        print(f"wrote {args.grid}: the image, then x_t at t = {ts.tolist()}", file=sys.stderr)
        return

    if args.invert:  # seed 004's experiment: invert two images, slerp their latents, decode
        x0 = torch.cat([load_image(f, s, c) for f in args.invert]).to(device)
        x_T = diffusion.ddim_invert(net, x0, steps=args.steps, progress=make_progress("inverting"))
        latents = torch.cat([x_T, slerp(x_T[:1], x_T[1:], args.mix)])
        out = diffusion.ddim_sample(net, x_T=latents, steps=args.steps, clip_x0=False)
        pixel = (torch.cat([x0, 0.5 * (x0[:1] + x0[1:])]), out)
        train.save_grid(torch.cat(pixel).clamp(-1, 1), args.grid, nrow=3)
        err = (out[:2] - x0).abs().max().item()
        print(f"wrote {args.grid}: top row A, B, their pixel average; bottom row A and B decoded from their "
              f"inversions (max error {err:.4f}) and the latent mix at {args.mix}", file=sys.stderr)
        return

    shape = (args.n, c, s, s)
    x_T = None
    if args.interpolate:
        g = torch.Generator(device).manual_seed(args.seed)
        a, b = (torch.randn((1, c, s, s), generator=g, device=device) for _ in range(2))
        x_T = slerp(a.expand(args.n, -1, -1, -1), b.expand(args.n, -1, -1, -1),
                    torch.linspace(0, 1, args.n, device=device).reshape(-1, 1, 1, 1))
        args.sampler, args.eta = "ddim", 0.0  # deterministic decoding makes the path smooth
    x, traj = generate(args, diffusion, net, shape, x_T, trajectory=bool(args.trajectory))
    train.save_grid(x, args.grid, nrow=args.n if args.interpolate else None)
    print(f"wrote {args.grid} ({x.shape[0]} images)", file=sys.stderr)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(fid.to_uint8(x)):
            Image.fromarray(im.permute(1, 2, 0).squeeze(2).numpy()).save(Path(args.out) / f"{i:06d}.png")
        print(f"wrote {x.shape[0]} PNGs to {args.out}", file=sys.stderr)
    if args.trajectory:
        cols = torch.linspace(0, traj.shape[1] - 1, 10).round().long()
        rows = traj[:8, cols]  # (rows, 10, C, H, W)
        train.save_grid(rows.flatten(0, 1), args.trajectory, nrow=10)
        print(f"wrote {args.trajectory}: columns from x_T (left) to x_0 (right)", file=sys.stderr)
    if args.fid:
        ref = ref if ref is not None else fid.path_statistics(args.fid, inception)
        feats = fid.get_activations(fid.tensor_batches(x), inception)[0]
        print(f"FID: {fid.frechet_distance(*fid.activation_statistics(feats), *ref):.4f}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (train.UserError, fid.FIDError, ValueError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
