"""sample.py: images from a checkpoint of train.py by every sampler of ddpm.SAMPLERS: DPM-Solver++ (Lu et al.
2022), DDIM (Song et al. 2020), DDPM (Ho et al. 2020), Heun and Euler-ancestral (Karras et al. 2022), the reverse
SDE, predictor-corrector and probability-flow ODE (Song et al. 2021), consistency models (Song et al. 2023);
classifier-free guidance (Ho & Salimans 2022), inpainting (replacement with reconstruction guidance, Ho et al.
2022; RePaint, Lugmayr et al. 2022) and SDEdit (Meng et al. 2022); likelihoods, FID and a memorisation check.

    python sample.py runs/demo --n 64                              # SDE-DPM-Solver++(3M) -> runs/demo/samples.png
    python sample.py runs/demo --sampler ddpm --n 16 --out imgs/   # DDPM; one PNG per image in imgs/ too
    python sample.py runs/mnist --class 3 --guidance 3             # a class-conditional run: threes
    python sample.py runs/mnist --class all --n 2000 --out imgs/   # imgs/0/000000.png ... imgs/9/...
    python sample.py runs/mnist --inpaint digits/ --mask lower-half --n 4 --out fills/  # --recon-guidance 10
    python sample.py runs/mnist --inpaint two.png --mask hole.png --sampler ddpm --steps 250 --resample 10
    python sample.py runs/mnist --edit sketch.png --strength 0.2,0.4,0.6,0.8,1.0    # SDEdit
    python sample.py runs/ve --sampler pc --steps 500              # predictor-corrector; em, ode too
    python sample.py runs/demo --sampler heun --steps 18           # Karras et al.'s Heun: 35 model calls
    python sample.py runs/mnist-ect --sampler cm --steps 2         # a consistency-tuned run: 2 model calls
    python sample.py runs/mnist --nll 1000                         # bits/dim of 1000 training images (ODE)
    python sample.py runs/mnist --vlb 100                          # Ho et al.'s variational bound, bits/dim
    python sample.py runs/faces --n 64 --nearest 4                 # does it copy its training images?
    python sample.py runs/demo --trajectory strip.png              # rows from x_T to x_0
    python sample.py runs/demo --forward photo.png                 # forward process q(x_t | x_0) of one image
    python sample.py runs/demo --interpolate                       # slerp between two noises, DDIM-decoded
    python sample.py runs/mnist --invert two.png five.png --mix 0.5   # DDIM-invert, mix latents, decode
    python sample.py runs/demo --n 1000 --fid real.npz             # FID of the samples against a folder/.npz
    torchrun --nproc_per_node 8 sample.py runs/cifar --num-samples 50000 --out imgs/ --fid cifar.npz

Sample i starts from noise seeded by (--seed, i) and has a label that is a function of (--seed, i), so the
images and file names are the same for any number of torchrun processes (each draws its share of whole
batches; rank 0 writes the grid and the FID). Pictures never replace a file this toolkit did not write.
The EMA weights are used unless --no-ema. Checkpoints load with weights_only=True, so a checkpoint
file cannot run code.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

import cli
import ddpm
import fid
from cli import UserError

SPACINGS = tuple(dict.fromkeys(s for p in ddpm.PROCESSES.values() for s in p.spacings))  # every process's
# the samplers' settings on the command line (their keywords in ddpm; defaults: ddpm.SAMPLERS, docs/samplers.md)
SAMPLER_OPTIONS = ("steps", "spacing", "rho", "eta", "order", "variance", "corrector_steps", "snr", "churn", "tmin",
                   "tmax", "s_noise", "middle")
INVERSION_STEPS = ddpm.SAMPLERS["ddim"].defaults()["steps"]  # DDIM inversion's grid when --steps is not given
REPAINT_STEPS, JUMP = 250, 10  # --resample without --steps or --jump: Lugmayr et al.'s 250 steps, jumps of 10
RECON_GUIDANCE = 10.0  # --inpaint without --recon-guidance: the best class match and FD on MNIST (docs/editing.md)
GRID_LIMIT, GRID_COLUMNS = 256, 16  # the grid shows the first samples; a class's row its first 16
AMP = "fp32"  # sample.py's --amp: float32 unless measured otherwise (docs/performance.md)
MOST = 10_000_000  # the largest count any option takes (samples, steps, images)


def slerp(a, b, w):
    """Spherical interpolation between noise tensors a and b (weight w on b), per sample."""
    af, bf = a.flatten(1), b.flatten(1)
    omega = torch.arccos((af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1))).clamp(1e-6, math.pi - 1e-6)
    omega = omega.reshape(-1, *([1] * (a.ndim - 1)))
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def load_image(path, size, channels):
    """An image file fitted like the training data, as [1, C, size, size] in [-1, 1]."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such image file")
    return cli.read_edit_images(path, size, channels)[0]


def make_progress(label, tty_only=False):
    """progress(i, n) of a sampler: on a terminal one line, rewritten at each model call; elsewhere (a log file)
    one line when the n calls are done, unless tty_only (the caller says it then)."""
    if sys.stderr.isatty():
        return lambda i, n: print(f"\r{label}: step {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)
    if tty_only:
        return None
    return lambda i, n: i == n and print(f"{label}: {n} steps done", file=sys.stderr, flush=True)

# ----------------------------------------------------------------------------------------------
# class labels and guidance


def parse_classes(spec, classes):
    """--class: 'all', or comma-separated class names or indices, as indices into classes."""
    if spec == "all":
        return list(range(len(classes)))
    picked = []
    for item in spec.split(","):
        if item in classes:
            picked.append(classes.index(item))
        elif item.isdigit() and int(item) < len(classes):
            picked.append(int(item))
        else:
            raise UserError(f"--class {item}: not a class of this run ({len(classes)} classes: "
                            f"{', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})")
    return picked


def labels_for(args, cfg, n):
    """The label of each of n samples: --class's classes in equal blocks, in order; without --class, drawn
    with the training data's class frequencies from --seed (so that --fid compares like with like)."""
    if args.classes is None:
        return cli.frequency_labels(cfg["class_counts"], n, args.seed)
    return torch.tensor([args.classes[i * len(args.classes) // n] for i in range(n)])


def guided(args, net, cfg, labels, process):
    """The eps model of a batch: autoguidance by --guide, or classifier-free guidance for a class-conditional
    run, at --guidance and within --guidance-interval."""
    if labels is None and args.guide_net is None:
        return net
    y = None if labels is None else labels.to(process.device)
    return ddpm.Guided(net, y, args.guidance, cfg["model"].get("num_classes"), guide=args.guide_net,
                       interval=args.guidance_interval, process=process)


# ----------------------------------------------------------------------------------------------
# sampling


def sampler_options(args):
    """The settings given for --sampler, as its method's keywords; one that it does not take is refused."""
    takes, options = ddpm.SAMPLERS[args.sampler].defaults(), {}
    for key in SAMPLER_OPTIONS:
        value = getattr(args, key)
        if value is None:
            continue
        if key not in takes:
            flag = key.replace("_", "-")
            users = [n for n, s in ddpm.SAMPLERS.items() if key in s.defaults()]
            raise UserError(f"--{flag}: --sampler {args.sampler} takes no {flag} (it applies to {', '.join(users)})")
        options[key] = value
    return options


def sample_batch(args, process, model, shape, x_T, generator, trajectory, progress, **loop):
    """One batch from the sampler --sampler (ddpm.sample): (x, trajectory or None). loop: run_grid's hook and
    path. x0_hat is clipped to [-1, 1] on every sampler."""
    kw = dict(x_T=x_T, generator=generator, progress=progress, start=args.start, clip_x0=True)
    if args.sampler == "ode":
        x, nfe = ddpm.sample(process, model, "ode", shape, rtol=args.rtol, atol=args.atol, **kw)
        print(f"ode: {nfe} model calls", file=sys.stderr)
        return x, None
    out = ddpm.sample(process, model, args.sampler, shape, return_trajectory=trajectory, **sampler_options(args),
                      **kw, **loop)
    return out if trajectory else (out, None)


def generate(args, process, net, cfg, n, procs, each, x_T=None, trajectory=False, labels=None):
    """This rank's share of n samples (the processes' shares differ by one at most), in batches of --batch-size:
    each(i, x) gets every batch (x in [-1, 1], i its first sample's index) as it is made. Sample i's noise comes
    from generators seeded by (--seed, i), its label is labels[i], so the files do not depend on the number of
    processes. Returns the trajectories [N, steps + 1, C, H, W] when asked."""
    device, m = process.device, cfg["model"]
    lo, hi = procs.span(n)
    trajs = []
    for i in range(lo, hi, args.batch_size):
        k = min(args.batch_size, hi - i)
        start = None if x_T is None else x_T[i:i + k].to(device)
        label = f"samples {i + 1}-{i + k} of {n}" + args.doubled
        gens = ddpm.sample_generators(args.seed, range(i, i + k), device)
        model = guided(args, net, cfg, None if labels is None else labels[i:i + k], process)
        x, traj = sample_batch(args, process, model, (k, m["in_channels"], m["image_size"], m["image_size"]),
                               start, gens, trajectory, make_progress(label))
        each(i, x)
        if trajectory:
            trajs.append(torch.stack([t.cpu() for t in traj], 1))  # (k, steps + 1, C, H, W)
    return torch.cat(trajs) if trajectory else None


def class_rows(images, labels):
    """One row per class present (the first GRID_COLUMNS classes), its first GRID_COLUMNS images, white where
    a class has fewer: (grid images, row length)."""
    present = sorted(set(labels.tolist()))[:GRID_COLUMNS]
    cols = min(GRID_COLUMNS, max(int((labels == c).sum()) for c in present))
    rows = []
    for c in present:
        mine = images[labels == c][:cols]
        rows += [mine, torch.full((cols - len(mine), *images.shape[1:]), 255, dtype=torch.uint8)]
    return torch.cat(rows), cols


def sample_and_write(args, process, net, cfg, procs, inception, ref, nearest):
    """The default mode: --n samples to the grid (one row per class for a class-conditional run), --out's PNGs
    (in one folder per class), --trajectory, the memorisation check and the FID."""
    m, device, x_T = cfg["model"], process.device, None
    if args.interpolate:
        g = torch.Generator(device).manual_seed(args.seed)
        a, b = (torch.randn((1, m["in_channels"], m["image_size"], m["image_size"]), generator=g, device=device)
                for _ in range(2))
        x_T = slerp(a.expand(args.n, -1, -1, -1), b.expand(args.n, -1, -1, -1),
                    torch.linspace(0, 1, args.n, device=device).reshape(-1, 1, 1, 1))
    labels = labels_for(args, cfg, args.n) if cfg["class_cond"] else None
    empty = torch.zeros((0, m["in_channels"], m["image_size"], m["image_size"]), dtype=torch.uint8)
    kept = {"grid": [empty], "rows": [], "all": [], "feats": [torch.zeros((0, 2048), dtype=torch.float64)]}
    shown = {}  # a process with no share gathers empty tensors

    def each(i, x):  # a batch as it is made: its PNGs, its grid images, its FID features
        images = cli.to_uint8(x).cpu()
        for j, im in enumerate(images) if args.out else ():
            folder = Path(args.out) / (cfg["classes"][labels[i + j]] if labels is not None else "")
            folder.mkdir(parents=True, exist_ok=True)
            cli.save_image(im.permute(1, 2, 0).squeeze(2).numpy(), folder / f"{i + j:06d}.png")
        if labels is None:
            kept["grid"].append(images[:max(GRID_LIMIT - i, 0)])
        for j, c in enumerate(labels[i:i + len(images)].tolist() if labels is not None else ()):
            if shown.setdefault(c, 0) < GRID_COLUMNS:  # each class's first images, for its row
                shown[c] += 1
                kept["grid"].append(images[j:j + 1])
                kept["rows"].append(c)
        if nearest:
            kept["all"].append(x.cpu())
        if inception is not None:
            kept["feats"].append(torch.from_numpy(fid.get_activations(images.split(50), inception)[0]))

    traj = generate(args, process, net, cfg, args.n, procs, each, x_T, bool(args.trajectory), labels)
    grid = procs.gather(torch.cat(kept["grid"]))
    rows = procs.gather(torch.tensor(kept["rows"], dtype=torch.long)) if labels is not None else None
    feats = procs.gather(torch.cat(kept["feats"])) if inception is not None else None
    if not procs.main:
        return
    nrow = args.n if args.interpolate else None
    if labels is not None:
        grid, nrow = class_rows(grid, rows)
    cli.save_grid(grid, args.grid, nrow=nrow)
    shown = f"the first {len(grid)} of {args.n} images" if len(grid) < args.n else f"{args.n} images"
    print(f"wrote {args.grid} ({'one row per class' if labels is not None else shown})", file=sys.stderr)
    if args.out:
        print(f"wrote {args.n} PNGs to {args.out}" + (f" ({procs.world} processes)" if procs.world > 1 else ""),
              file=sys.stderr)
    if args.trajectory:
        cols = torch.linspace(0, traj.shape[1] - 1, 10).round().long()
        cli.save_grid(traj[:8, cols].flatten(0, 1), args.trajectory, nrow=10)  # (rows, 10, C, H, W)
        print(f"wrote {args.trajectory}: columns from x_T (left) to x_0 (right)", file=sys.stderr)
    if nearest:
        memorisation_check(args, torch.cat(kept["all"]), *nearest)
    if inception is not None:
        ref = ref if ref is not None else fid.path_statistics(args.fid, inception)
        print(f"FID: {fid.checked_fid(*fid.activation_statistics(feats.numpy()), *ref):.4f}")

# ----------------------------------------------------------------------------------------------
# editing: inpainting and SDEdit


def edit_start(args, process):
    """The time SDEdit starts from, t_0 = t_end + strength (t_start - t_end) (Meng et al. 2022), on the
    sampler's grid: Diffusion's integer grids take the nearest timestep."""
    t0 = process.t_end + args.strength_now * (process.t_start - process.t_end)
    return round(t0) if "linspace" in process.spacings and args.spacing not in ("time", "lambda") else t0


def edit_batch(args, process, net, cfg, x0, keep, gens, labels, progress=None):
    """Inpainting (keep: the known pixels) or SDEdit of a batch x0 with the sampler, --n results each."""
    model = guided(args, net, cfg, labels, process)
    if keep is not None:
        if args.recon_guidance:
            model = ddpm.ReconstructionGuided(model, process, x0, keep, args.recon_guidance)
        path = ddpm.repaint_path(args.steps, args.jump, args.resample) if args.resample else None
        loop = dict(hook=ddpm.Replace(x0, keep, gens), **({"path": path} if path else {}))
        return sample_batch(args, process, model, x0.shape, None, gens, False, progress, **loop)[0]
    if args.strength_now == 0:
        return x0.clone()
    if args.strength_now == 1:  # the image forgotten: plain sampling from the prior
        return sample_batch(args, process, model, x0.shape, None, gens, False, progress)[0]
    t0 = torch.full((len(x0),), edit_start(args, process), device=x0.device)
    if args.edit_by == "inversion":  # DDIM-invert to t_0 by the plain (unconditional) model; decode with the sampler
        x_t = process.ddim_invert(net, x0, steps=INVERSION_STEPS, start=t0[0].item())
    else:
        x_t = process.q_sample(x0, t0 if t0.is_floating_point() else t0.long(), ddpm.randn(x0.shape, gens, x0.device))
    return sample_batch(args, process, model, x0.shape, x_t, gens, False, progress)[0]


def read_edits(args, cfg):
    """The images to edit (float [N, C, H, W]), their names and, for --inpaint, the known pixels (bool
    [N, 1, H, W]): read and checked once, before anything is sampled or said."""
    m, source = cfg["model"], args.inpaint or args.edit
    x0, names, sizes = cli.read_edit_images(source, m["image_size"], m["in_channels"])
    keep = ~cli.read_masks(args.mask, source, names, sizes, m["image_size"]) if args.inpaint else None
    return x0, names, keep


def edit(args, process, net, cfg, edits):
    """--inpaint or --edit: --n results for each input image, in batches of --batch-size, written as
    OUT/<input's name>_<k>.png (for each --strength, _s<strength>_<k>); and a grid with a row for each of
    the first 16 inputs: the input, the masked input, the results. Result k of image i is drawn with the
    generator of sample i * n + k."""
    device, (x0, names, keep) = process.device, edits
    strengths = [None] if args.inpaint else args.strength
    labels = None if args.classes is None else torch.tensor(args.classes * len(x0))[:len(x0)]
    items = [(i, k) for i in range(len(x0)) for k in range(args.n)]
    results = {}  # image index -> its results, for the grid
    for s in strengths:
        args.strength_now = s
        args.start = None if s is None else edit_start(args, process)
        for b in range(0, len(items), args.batch_size):
            chunk = items[b:b + args.batch_size]
            rows = torch.tensor([i for i, _ in chunk])
            gens = ddpm.sample_generators(args.seed, [i * args.n + k for i, k in chunk], device)
            progress = make_progress(f"{'inpainting' if args.inpaint else 'editing'} {b + 1}-{b + len(chunk)}", True)
            out = edit_batch(args, process, net, cfg, x0[rows].to(device), None if keep is None else
                             keep[rows].to(device), gens, None if labels is None else labels[rows], progress).cpu()
            for (i, k), image, im in zip(chunk, out, cli.to_uint8(out)):
                if i < GRID_COLUMNS:
                    results.setdefault(i, []).append(image[None])
                if args.out:
                    target = Path(args.out) / f"{names[i]}{'' if s is None else f'_s{s:g}'}_{k}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    cli.save_image(im.permute(1, 2, 0).squeeze(2).numpy(), target)
            print(f"{'inpainted' if args.inpaint else 'edited'} {min(b + args.batch_size, len(items))}/{len(items)}"
                  + ("" if s is None else f" at strength {s:g}"), file=sys.stderr)
    grid = [torch.cat([x0[i:i + 1], *([x0[i:i + 1] * keep[i]] if keep is not None else []), *results[i]])
            for i in sorted(results)]
    cli.save_grid(torch.cat(grid), args.grid, nrow=1 + (keep is not None) + args.n * len(strengths))
    what = "the masked input and the results" if args.inpaint else f"the results at strength {args.strength}"
    print(f"wrote {args.grid}: each row the input, {what}"
          + (f"; {len(items) * len(strengths)} PNGs to {args.out}" if args.out else ""), file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# likelihoods and memorisation


def training_images(args, cfg, n):
    """n training images of the run (None: all), picked at random with --seed: (uint8 [n, C, H, W], their
    labels or None)."""
    size, channels = cfg["model"]["image_size"], cfg["model"]["in_channels"]
    data = (cli.load_images(cfg["data"], size, channels, labelled=cfg["class_cond"]) if cfg["data"]
            else cli.demo_images(size=size, channels=channels, seed=cfg["seed"]))
    pick = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(args.seed))[:n]
    return data.images[pick], data.labels[pick] if cfg["class_cond"] else None


def mean_and_error(name, values, unit="bits/dim"):
    """'name: mean +- standard error' of per-image values."""
    values = values.double()
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{name}: {values.mean().item():.4f} +- {se:.4f} {unit}"


def negative_log_likelihood(args, cfg, process, net):
    """Bits/dim of --nll training images on the 8-bit scale: uniform dequantisation x = (k + u) / 128 - 1
    of the pixel values k, so -log2 p(k + u) = -log2 p(x) + 7 D (the density of [0, 256) vs [-1, 1)).
    A class-conditional run gives log p(x | its label) under --guidance."""
    device = process.device
    (images, labels), g, bpd = training_images(args, cfg, args.nll), torch.Generator(device).manual_seed(args.seed), []
    for i in range(0, len(images), args.batch_size):
        k = images[i:i + args.batch_size].to(device).float()
        u = torch.rand(k.shape, generator=g, device=device)
        model = guided(args, net, cfg, None if labels is None else labels[i:i + args.batch_size], process)
        bpd.append(process.bits_per_dim(model, (k + u) / 128 - 1, rtol=args.rtol, atol=args.atol,
                                        hutchinson=args.hutchinson, generator=g).cpu() + 7)
        print(f"nll: {min(i + args.batch_size, len(images))}/{len(images)} images", file=sys.stderr)
    print(mean_and_error("bits/dim", torch.cat(bpd), f"(standard error, {len(images)} images, 8-bit scale)"))


def variational_bound(args, cfg, process, net):
    """Ho et al.'s bound on the discrete NLL (eq. 5) of --vlb training images, in bits/dim, with its terms."""
    device = process.device
    (images, labels), g, terms = training_images(args, cfg, args.vlb), torch.Generator(device).manual_seed(args.seed), []
    for i in range(0, len(images), args.batch_size):
        x0 = images[i:i + args.batch_size].to(device).float() / 127.5 - 1
        model = guided(args, net, cfg, None if labels is None else labels[i:i + args.batch_size], process)
        terms.append(process.vlb_bits_per_dim(model, x0, variance=args.variance or "beta", generator=g,
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
    samples = cli.to_uint8(x)
    order, nearest, median = nearest_training_images(samples, images, args.nearest, inception)
    rows = torch.cat([torch.cat([s[None], images[i]]) for s, i in zip(samples, order)])
    cli.save_grid(rows, args.nearest_grid, nrow=args.nearest + 1)
    close = (nearest < median).double().mean().item()
    space = "Inception features" if inception is not None else "pixels (no Inception weights: --fid-weights)"
    print(f"wrote {args.nearest_grid}: each sample, then its {args.nearest} nearest training images", file=sys.stderr)
    print(f"nearest: {close:.1%} of {len(samples)} samples are closer to a training image than the median training "
          f"image is to its nearest neighbour ({median:.4g}, in {space})")

# ----------------------------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("run", metavar="RUN_OR_CKPT", help="a run folder of train.py or its ckpt.pt")
    a("--num-samples", "--n", dest="n", type=int, default=64, help="samples (--inpaint, --edit: results per image; "
                                                                   "--n: not under torchrun)")
    a("--sampler", default="dpm++", choices=tuple(ddpm.SAMPLERS),
      help="; ".join(f"{name}: {spec.summary}" for name, spec in ddpm.SAMPLERS.items()))
    a("--steps", type=int, help="grid points (heun: 2 steps - 1 model calls; pc: 2 a step); None: " + ", ".join(
        f"{name} {spec.defaults()['steps']}" for name, spec in ddpm.SAMPLERS.items() if spec.defaults().get("steps"))
      + ", ddpm the whole chain (fewer: respaced; with --resample 250)")
    a("--spacing", choices=SPACINGS, help="time grid (Diffusion: all; VE: time, lambda, karras; flow: shifted, time, "
                                          "karras); None: the sampler's (heun: karras) or the process's default")
    a("--rho", type=float, help="--spacing karras: rho of Karras et al. 2022's grid; None: 7")
    a("--shift", type=float, help="flow runs, --spacing shifted: s of t = s u / (1 + (s - 1) u) over even u "
                                   "(Esser et al. 2024); None: the process's (3)")
    a("--order", type=int, choices=(1, 2, 3), help="dpm++: DPM-Solver++ order (2M, 3M); None: the process's "
                                                   "default, 3 for DDPM runs, 2 for VE and flow (docs/samplers.md)")
    a("--corrector-steps", type=int, help="em/pc: Langevin corrector steps per step; None: 0 for em, 1 for pc")
    a("--snr", type=float, help="em/pc: the corrector's signal-to-noise ratio; None: 0.16")
    a("--churn", type=float, help="heun: S_churn of Karras et al. 2022 (noise added and removed each step); None: 0")
    a("--tmin", type=float, help="heun: churn only at noise levels >= S_tmin; None: 0")
    a("--tmax", type=float, help="heun: churn only at noise levels <= S_tmax; None: inf")
    a("--s-noise", type=float, help="heun: S_noise, the churn's noise scale; None: 1")
    a("--middle", type=float, help=f"cm: the first middle noise level sigma/alpha (then / 4 each step); None: "
                                   f"{ddpm.CM_MIDDLE} (docs/consistency.md)")
    a("--rtol", type=float, default=1e-5, help="ode and --nll: relative tolerance of the ODE solver")
    a("--atol", type=float, default=1e-5, help="ode and --nll: absolute tolerance of the ODE solver")
    a("--eta", type=float, help="ddim, euler-a, dpm++, cm: noise, 0 (deterministic) to 1 (ddim: ancestral; dpm++: "
                              "SDE-DPM-Solver++; cm: a fresh draw at each middle level); None: 1 for dpm++ and "
                              f"euler-a (docs/samplers.md), 0 for ddim, {ddpm.CM_ETA:g} for cm (docs/consistency.md)")
    a("--variance", choices=("beta", "posterior"), help="ddpm and --vlb: DDPM sigma_t^2; None: beta")
    a("--class", dest="class_", metavar="CLASSES", help="class-conditional runs: 'all', or names or indices "
                                                       "such as 3 or 3,5,7; None: the data's class frequencies")
    a("--guidance", type=float, help="guidance weight s of eps_guide + s (eps - eps_guide): class-conditional runs "
                                     "classifier-free (1: the conditional model, 0: the unconditional one), "
                                     "--guide autoguidance (1: the plain model); None: the run's --sample-guidance, "
                                     "autoguidance the process's (2; flow 2.5: docs/guidance.md)")
    a("--guide", metavar="SNAPSHOT_OR_RUN", help="autoguidance (Karras et al. 2024): guide by a weaker model, a "
                                                 "snapshot of the run (1/16, 1/8, 1/4: train.py --snapshots) or "
                                                 f"another run or checkpoint; None: {cli.DEFAULT_GUIDE} for "
                                                 "unconditional runs that kept it, else none")
    a("--guidance-interval", metavar="LO,HI", help="guide only where LO < sigma_t/alpha_t <= HI (Kynkaanniemi et al. "
                                                   "2024), one model call elsewhere; 0,inf: everywhere; None: "
                                                   "{},{} for autoguidance, else everywhere".format(
                                                       *cli.AUTOGUIDANCE_INTERVAL))
    a("--inpaint", metavar="IMAGES", help="an image or a folder of images to fill in where --mask is white "
                                             "(or transparent)")
    a("--mask", help=f"--inpaint: a mask image, a folder of masks named as the images, or {', '.join(cli.MASKS)}")
    a("--resample", type=int, metavar="R", help="--inpaint with --sampler ddpm: RePaint, R passes over each jump")
    a("--jump", type=int, default=JUMP, help="--resample: RePaint's jump length")
    a("--recon-guidance", type=float, metavar="W", help="--inpaint: reconstruction guidance weight (Ho et al. 2022, "
                                                        "eq. 7), a backward pass a call; 0: replacement alone; "
                                                        f"None: {RECON_GUIDANCE:g}")
    a("--edit", metavar="IMAGES", help="SDEdit: an image or a folder, noised to --strength and sampled back")
    a("--strength", default="0.5", help="--edit: t_0 as a share of the noise end (0: the input, 1: pure noise); "
                                        "comma-separated for a sweep")
    a("--edit-by", default="noise", choices=("noise", "inversion"), help="--edit: start from a draw of q(x_t0 | x0), "
                                                                        "or the DDIM inversion of x0 to t_0 by the "
                                                                        "unconditional model, then sample back")
    a("--seed", type=int, default=0, help="sample i's noise and label come from (seed, i)")
    a("--batch-size", type=int, default=128, help="samples per model call (the files do not depend on it)")
    a("--grid", help="the output picture; None: MODE.png (samples, inpaint, edit, forward, interpolate, invert) in "
                     "the run's folder")
    a("--out", metavar="FOLDER", help="also write one PNG per image here (a new or empty folder, or one of ours)")
    a("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    a("--channels-last", action="store_true", help="channels_last memory format (faster for some models)")
    a("--amp", default=AMP, choices=cli.AMP, help="mixed precision of the model calls: bf16 (CPU or CUDA), fp16 "
                                                 "(CUDA), fp32, or auto: bf16 where the device has it natively and a "
                                                 "timed call is faster (docs/performance.md)")
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
    a("--nearest-grid", help="the picture of --nearest; None: nearest.png beside --grid")
    return cli.expand_home(p.parse_args(argv))


MODES = ("inpaint", "edit", "forward", "interpolate", "invert")


def check_outputs(args):
    """Where the pictures go (--grid and --nearest-grid default to the run's folder: --out holds the images
    alone, ready for FID), and that nothing of the user's is written over: one line, before any sampling."""
    mode = next((m for m in MODES if getattr(args, m)), "samples")
    run = Path(args.run)
    home = run if run.is_dir() else run.parent
    args.grid = args.grid or str(home / f"{mode}.png")
    args.nearest_grid = args.nearest_grid or str(Path(args.grid).with_name("nearest.png"))
    if args.out and Path(args.out).resolve() == home.resolve():
        raise UserError(f"--out {args.out} is the run's own folder: give the images a folder of their own")
    args.former = cli.check_output_folder(args.out) if args.out else []
    for picture in (args.grid, args.trajectory, args.nearest_grid if args.nearest else None):
        if picture:
            cli.check_new_picture(picture)


def check_numbers(args):
    """Every number option, as one line."""
    for name, ok, rule in (("eta", lambda v: v >= 0, "a number >= 0"), ("mix", lambda v: True, "a number"),
                           ("snr", lambda v: v > 0, "a number > 0"),
                           ("rtol", lambda v: v >= 1e-6, "at least 1e-6 (float32 reaches no smaller tolerance)"),
                           ("atol", lambda v: v >= 1e-6, "at least 1e-6 (float32 reaches no smaller tolerance)"),
                           ("guidance", lambda v: v >= 0, "a number >= 0"),
                           ("shift", lambda v: v > 0, "a number > 0"), ("rho", lambda v: v > 0, "a number > 0"),
                           ("churn", lambda v: v >= 0, "a number >= 0"), ("tmin", lambda v: v >= 0, "a number >= 0"),
                           ("tmax", lambda v: v > 0 or v == math.inf, "a number > 0 (inf: no limit)"),
                           ("s_noise", lambda v: v >= 0, "a number >= 0"), ("middle", lambda v: v > 0, "a number > 0"),
                           ("recon_guidance", lambda v: v >= 0, "a number >= 0")):
        value = getattr(args, name)
        if value is not None and not ((math.isfinite(value) or name == "tmax" and value == math.inf) and ok(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if args.sampler == "cm" and args.eta is not None and args.eta > 1:
        raise UserError(f"--eta with --sampler cm is the share of fresh noise, at most 1, got {args.eta}")
    for name in ("steps", "nll", "vlb", "nearest", "n", "batch_size", "corrector_steps", "resample", "jump"):
        value, least = getattr(args, name), 0 if name == "corrector_steps" else 1
        flag = "num-samples" if name == "n" else name.replace("_", "-")
        if value is not None and value < least:
            raise UserError(f"--{flag} must be at least {least}, got {value}")
        if value is not None and value > MOST:  # beyond any use, and beyond memory for the grids and labels
            raise UserError(f"--{flag} must be at most {MOST:,}, got {value:,}")
    if args.guidance_interval is not None:
        args.guidance_interval = parse_interval(args.guidance_interval)
    try:
        args.strength = [float(s) for s in args.strength.split(",")]
    except ValueError:
        raise UserError(f"--strength takes numbers in [0, 1], got {args.strength}") from None
    if not all(0 <= s <= 1 for s in args.strength):  # nan fails too
        raise UserError(f"--strength takes numbers in [0, 1], got {','.join(map(str, args.strength))}")


def check_guidance(args, cfg, process):
    """--class, --guide, --guidance and --guidance-interval against the run. An unconditional run is autoguided
    by its snapshot at cli.DEFAULT_GUIDE where it kept one (--guidance 1: the plain model); a class-conditional
    run takes classifier-free guidance at its --sample-guidance, or autoguidance with --guide."""
    cond, args.classes, args.guide_path = cfg["class_cond"], None, None
    if args.class_ is not None and not cond:
        raise UserError(f"--class: {args.run} is not class-conditional (train it with --class-cond)")
    if cond and args.class_ is not None:
        args.classes = parse_classes(args.class_, cfg["classes"])
        if args.n < len(args.classes) and not (args.inpaint or args.edit or args.invert):
            print(f"note: --num-samples {args.n} is fewer than the {len(args.classes)} classes of --class: only the "
                  f"first {args.n} are drawn", file=sys.stderr)
    likelihood = args.nll or args.vlb  # the plain model's likelihood unless a guide is named
    consistency = cfg.get("objective") in cli.CONSISTENCY_OBJECTIVES  # unguided unless a guide is named
    if consistency and args.sampler != "cm":
        print(f"note: {args.run} is a consistency model (--objective {cfg['objective']}): --sampler cm samples it in "
              "1-4 calls", file=sys.stderr)
    elif args.sampler == "cm" and not consistency:
        print(f"note: {args.run} is a diffusion model; --sampler cm expects one tuned by --objective ect or cd",
              file=sys.stderr)
    if args.guide is not None or (not cond and not likelihood and not consistency and args.guidance != 1):
        args.guide_path = cli.find_guide(args.run, args.guide, "--guide")
    if not cond and args.guide_path is None:
        for flag, value in (("guidance", args.guidance not in (None, 1)), ("guidance-interval", args.guidance_interval)):
            if value:
                why = "is a consistency model" if consistency else \
                    f"kept no snapshot at {cli.DEFAULT_GUIDE} of its training"
                raise UserError(f"--{flag}: {args.run} is unconditional and {why}: name a guide with --guide (a "
                                "snapshot such as 1/4, or another run)")
        args.guidance = 1.0
    elif args.guidance is None:
        args.guidance = process.autoguidance if args.guide_path else cfg["sample_guidance"]
    if args.guidance_interval is None and args.guide_path is not None:
        args.guidance_interval = cli.AUTOGUIDANCE_INTERVAL
    if cond and args.guide_path is None and args.guidance != 1 and cfg.get("label_dropout", 0.1) == 0:
        print(f"note: {args.run} was trained with --label-dropout 0, so its unconditional model (the null label) is "
              f"untrained and guidance {args.guidance:g} follows it: use --guidance 1, or --guide", file=sys.stderr)
    args.doubled = "" if args.guidance == 1 else " (guided: up to twice the model's work a step)"


def parse_interval(text):
    """--guidance-interval LO,HI: 0 <= LO < HI (HI may be inf), as (LO, HI)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not (0 <= lo < hi and not math.isnan(hi)):
        raise UserError(f"--guidance-interval takes LO,HI with 0 <= LO < HI in sigma/alpha (HI may be inf), got {text}")
    return lo, hi


def check_modes(args, process):
    """Options that go together, and options that the run's process cannot answer."""
    if sum(bool(getattr(args, m)) for m in MODES) > 1:
        raise UserError(f"--{', --'.join(m for m in MODES if getattr(args, m))}: one at a time")
    if args.mask and not args.inpaint or args.inpaint and not args.mask:
        raise UserError("--mask goes with --inpaint" if args.mask else "--inpaint needs --mask (white: fill in)")
    fixed_step = ", ".join(name for name, spec in ddpm.SAMPLERS.items() if spec.fills)
    if args.inpaint and not ddpm.SAMPLERS[args.sampler].fills:
        raise UserError(f"--inpaint needs a fixed-step sampler ({fixed_step}), not the adaptive {args.sampler}")
    if args.resample and not args.inpaint:
        raise UserError("--resample (RePaint) resamples inpainting: give --inpaint and --mask")
    if args.resample:
        args.steps = args.steps or REPAINT_STEPS
        if args.jump >= args.steps:
            raise UserError(f"--jump {args.jump} must be below --steps {args.steps}: RePaint jumps back within the grid")
    for flag, given, needs in (("jump", args.jump != JUMP, "--resample"), ("strength", args.strength != [0.5], "--edit"),
                               ("edit-by", args.edit_by != "noise", "--edit"), ("mix", args.mix != 0.5, "--invert")):
        if given and not getattr(args, needs[2:]):
            print(f"note: --{flag} has no effect without {needs}", file=sys.stderr)
    defaults, T = ddpm.SAMPLERS[args.sampler].defaults(), getattr(process, "T", None)
    steps = args.steps or defaults.get("steps")
    spacing = args.spacing or defaults.get("spacing") or process.default_spacing
    if T is not None and steps is not None and steps > T and spacing in ddpm.SPACINGS:
        raise UserError(f"--steps {steps}: the run's chain has T = {T} steps; --spacing {spacing} takes at most {T}")
    if args.recon_guidance is not None and not args.inpaint:
        raise UserError("--recon-guidance guides inpainting: give --inpaint and --mask")
    if args.inpaint and args.recon_guidance is None:
        args.recon_guidance = RECON_GUIDANCE
    if args.edit and args.edit_by == "inversion" and args.classes is None and deterministic(args):
        print("note: --edit-by inversion decoded deterministically gives the input back: decode with noise (--eta "
              "above 0; dpm++'s default is 1) or, on a class-conditional run, towards a --class", file=sys.stderr)
    if args.vlb and not hasattr(process, "vlb_bits_per_dim"):
        raise UserError(f"--vlb is Ho et al.'s bound on a discrete chain; {args.run} is a {process.name} run: "
                        "use --nll")
    if args.shift is not None:
        if not hasattr(process, "shift"):
            print(f"note: --shift has no effect on a {process.name} run (flow runs' shifted grid)", file=sys.stderr)
        else:
            process.shift = args.shift
    if args.spacing and args.spacing not in process.spacings:
        raise UserError(f"--spacing {args.spacing}: a {type(process).__name__} run has {', '.join(process.spacings)}")
    if args.trajectory and not ddpm.SAMPLERS[args.sampler].fills:
        raise UserError(f"--trajectory needs a fixed-step sampler ({fixed_step}), not the adaptive {args.sampler}")
    if args.invert and args.classes is not None and len(args.classes) != 1:
        raise UserError("--invert with --class takes one class, for both images")


def deterministic(args):
    """Whether --sampler with its settings adds no noise on the way."""
    settings = ddpm.SAMPLERS[args.sampler].defaults() | sampler_options(args)
    return args.sampler == "ode" or settings.get("eta") == 0 or settings.get("churn") == 0


def check_args(args, process, cfg):
    """Bad numbers, picture names, labels and options that do not apply to the run, as one line."""
    check_outputs(args)
    check_numbers(args)
    if args.interpolate:  # deterministic decoding: a smooth path
        if args.sampler not in ("ddim", "dpm++") or args.eta not in (None, 0):
            print(f"note: --interpolate decodes with deterministic DDIM, not --sampler {args.sampler}", file=sys.stderr)
        args.sampler, args.eta = "ddim", 0.0
    check_guidance(args, cfg, process)
    check_modes(args, process)
    if not (args.nll or args.vlb or args.forward):  # the modes that sample: their sampler's settings
        sampler_options(args)
    args.start = None


SINGLE_PROCESS = ("nll", "vlb", "forward", "invert", "interpolate", "trajectory", "nearest", "inpaint", "edit")


def run(args, procs):
    device = procs.start(args.device)
    single = [name for name in SINGLE_PROCESS if getattr(args, name)]
    if single and procs.world > 1:
        raise UserError(f"--{single[0]} runs in one process: start it with python, not torchrun")
    ckpt, net, process = cli.load_run(args.run, device, ema=not args.no_ema)
    cfg = {"class_cond": False} | ckpt["config"]
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    check_args(args, process, cfg)
    args.guide_net, guide_step = (cli.load_guide(args.guide_path, cfg, process, device, "--guide") if args.guide_path
                                  else (None, None))
    net, args.guide_net = mixed_precision(args, cfg, net, args.guide_net, device, procs)
    edits = read_edits(args, cfg) if args.inpaint or args.edit else None
    if procs.main:
        print(f"{args.run}: step {ckpt['step']}, {ddpm.count_params(net) / 1e6:.2f} M parameters, "
              f"{'raw' if args.no_ema else 'EMA'} weights", file=sys.stderr)
        if args.guide_net is not None:
            where = "" if args.guidance_interval is None else " where {} < sigma/alpha <= {}".format(*args.guidance_interval)
            print(f"autoguidance: w = {args.guidance:g}{where}, guided by {args.guide_path} (step {guide_step})"
                  + ("; --guidance 1 for the plain model" if args.guide is None else ""), file=sys.stderr)
    if args.nll or args.vlb:
        (negative_log_likelihood if args.nll else variational_bound)(args, cfg, process, net)
        return
    inception, ref, nearest = None, None, None
    if args.fid:  # the reference and the weights are checked before any time is spent on sampling
        ref, inception = fid.check_input(args.fid, 2, dims=2048), fid.load_inception(args.fid_weights, device)
    if args.nearest:  # the training images and the features' network, before sampling
        images = training_images(args, cfg, None)[0]
        if args.nearest >= len(images):
            raise UserError(f"--nearest {args.nearest}: the run has {len(images)} training images")
        with_weights = args.fid_weights or Path(fid.weights_cache_path()).is_file()
        nearest = images, fid.load_inception(args.fid_weights, device) if with_weights else None
    if args.former and procs.main:  # an earlier output in --out: replaced whole, never mixed with this one
        for path in args.former:
            path.unlink()
        print(f"note: removed the {len(args.former)} pictures of an earlier output in {args.out}", file=sys.stderr)
    procs.barrier()  # before any process writes
    if args.forward:
        forward_process(args, process, cfg)
    elif args.invert:
        invert_and_mix(args, process, net, cfg)
    elif edits is not None:
        edit(args, process, net, cfg, edits)
    else:
        sample_and_write(args, process, net, cfg, procs, inception, ref, nearest)


def mixed_precision(args, cfg, net, guide, device, procs):
    """The sampling models under --amp (cli.choose_amp; auto times a model call on a batch of noise): autocast
    around each call, float32 out, the samplers' arithmetic in float32 and float64."""
    m = cfg["model"]

    def seconds(amp):  # called by auto alone: no batch is made for an --amp that is given
        x = torch.randn((min(args.batch_size, 64), m["in_channels"], m["image_size"], m["image_size"]),
                        device=device, generator=torch.Generator(device).manual_seed(0))
        t = torch.full((len(x),), 10, device=device)
        with torch.inference_mode():
            start = time.perf_counter()
            cli.autocast_model(net, amp, device)(x, t)
            return time.perf_counter() - start
    amp, why = cli.choose_amp(args.amp, device, seconds)
    if why and procs.main:
        print(why, file=sys.stderr)
    if amp == "fp32":
        return net, guide
    return cli.autocast_model(net, amp, device), None if guide is None else cli.autocast_model(guide, amp, device)


def forward_process(args, process, cfg):
    """--forward: q(x_t | x_0) at 10 times evenly spaced from the data end to the noise end, one shared noise,
    each divided by its std for x_0 = 0 and 1, sqrt(alpha_t^2 + sigma_t^2) (1 for Diffusion) to be shown."""
    device, m = process.device, cfg["model"]
    x0 = load_image(args.forward, m["image_size"], m["in_channels"]).to(device)
    ts = process.time_grid(10, "linspace" if "linspace" in process.spacings else "time").flip(0)
    noise = torch.randn(x0.shape, generator=torch.Generator(device).manual_seed(args.seed), device=device)
    row = process.q_sample(x0.expand(10, -1, -1, -1), ts.to(device), noise.expand(10, -1, -1, -1))
    alpha, sigma = process.marginal_at(ts.to(device))
    cli.save_grid(torch.cat([x0, row / (alpha ** 2 + sigma ** 2).sqrt().reshape(-1, 1, 1, 1)]), args.grid, nrow=11)
    print(f"wrote {args.grid}: the image, then x_t at t = {[round(t, 4) for t in ts.tolist()]}", file=sys.stderr)


def invert_and_mix(args, process, net, cfg):
    """--invert: DDIM-invert two images, slerp their latents, decode (Song et al. 2020, section 5.4)."""
    m = cfg["model"]
    x0 = torch.cat([load_image(f, m["image_size"], m["in_channels"]) for f in args.invert]).to(process.device)
    steps, spacing = args.steps or INVERSION_STEPS, args.spacing
    labels = None if args.classes is None else torch.tensor(args.classes * 3)
    x_T = process.ddim_invert(guided(args, net, cfg, None if labels is None else labels[:2], process), x0, steps=steps,
                              spacing=spacing, progress=make_progress("inverting"))
    latents = torch.cat([x_T, slerp(x_T[:1], x_T[1:], args.mix)])
    out = process.ddim_sample(guided(args, net, cfg, labels, process), x_T=latents, steps=steps, spacing=spacing, clip_x0=False)
    pixel = (torch.cat([x0, 0.5 * (x0[:1] + x0[1:])]), out)
    cli.save_grid(torch.cat(pixel).clamp(-1, 1), args.grid, nrow=3)
    err = (out[:2] - x0).abs().max().item()
    print(f"wrote {args.grid}: top row A, B, their pixel average; bottom row A and B decoded from their "
          f"inversions (max error {err:.4f}) and the latent mix at {args.mix}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    return cli.run_command("sample.py", lambda procs: run(args, procs))


if __name__ == "__main__":
    sys.exit(main())
