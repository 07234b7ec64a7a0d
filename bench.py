"""bench.py: how fast ddpm trains, samples and computes FID features on this machine.

    python bench.py                 # a few minutes on 2 CPU cores; writes bench.json
    python bench.py --quick         # about a minute
    python bench.py --device cuda --amp bf16 --channels-last --compile   # GPU variants (default: fp32, and bf16
                                                                         # beside it where the device has it natively)
    python bench.py --solvers runs/mnist    # DDIM vs DPM-Solver++: error against the ODE, s/image
    python bench.py --peer ../shared/tools/peer_bench.py   # against diffusers' UNet2DModel (that script builds it)
    python bench.py --quality base minsnr   # training recipes on MNIST: FD after 15 CPU-minutes each
    python bench.py --digits mnist/ 1000 digits/             # the first 1000 digits under digits/<label>/
    python bench.py --digits mnist/ 1000 nn/ --nearest       # their lower halves from the nearest digit

Measures training images/s (forward, backward, AdamW and EMA) for the tiny preset at 32x32 and
faces64 at 64x64; sampling cost per denoising step and image, seconds per image for DDPM
(T = 1000, 300) and DDIM (50, 20 steps), and the samplers' own work outside the network (timed
with a model that costs nothing); fid.py feature extraction images/s; peak memory. Inception
runs on random weights (same cost as the real ones).
"""
import argparse
import csv
import io
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import cli
import ddpm
import fid

HERE = Path(__file__).resolve().parent  # train.py and sample.py sit beside this file


def machine(device):
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
            "native_bf16": cli.native_bf16(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(preset, args, device, channels=3):
    model = ddpm.UNet(**dict(ddpm.PRESETS[preset], in_channels=channels)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def bench_train(preset, batch, args, device, amp="fp32"):
    model = build(preset, args, device)
    size = model.config["image_size"]
    ema = ddpm.EMA(model)
    fwd = torch.compile(model) if args.compile else model
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    def steps():
        for _ in range(args.iters):
            with cli.autocast(amp, device):
                loss = diffusion.loss(fwd, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)

    seconds = timed(steps, device, args.repeats) / args.iters
    return {"preset": preset, "size": size, "batch": batch, "params_M": round(ddpm.count_params(model) / 1e6, 2),
            "amp": amp, "images_per_s": round(batch / seconds, 1), "ms_per_step": round(seconds * 1e3, 1)}


def bench_sampling(args, device, amp="fp32"):
    model = build("tiny", args, device).eval()
    for p in model.parameters():  # non-zero output layer, as a trained model (the cost is the same)
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, 0, 0.02)
    fwd = torch.compile(model) if args.compile else model
    batch, size = args.sample_batch, model.config["image_size"]
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((batch,), 500, device=device)
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000)).to(device)
    short = ddpm.Diffusion(ddpm.make_betas("linear", args.ddpm_steps)).to(device)

    free = lambda x, t: x  # a model that costs nothing: what remains is the sampler's own work
    with torch.inference_mode(), cli.autocast(amp, device):
        call = timed(lambda: fwd(x, t), device, args.repeats * 5)
        ddim = {k: timed(lambda: diffusion.ddim_sample(fwd, x_T=x, steps=k), device, args.repeats) for k in (20, 50)}
        ddpm_loop = timed(lambda: short.ddpm_sample(fwd, x_T=x), device, args.repeats) / args.ddpm_steps
        own = {"ddim": timed(lambda: diffusion.ddim_sample(free, x_T=x, steps=50), device, args.repeats) / 50,
               "ddpm": timed(lambda: short.ddpm_sample(free, x_T=x), device, args.repeats) / args.ddpm_steps}
    per_image = lambda s: round(s / batch, 4)
    return {
        "preset": "tiny", "size": size, "batch": batch, "amp": amp,
        "ms_per_step_per_image": round(call / batch * 1e3, 3),
        "sampler_overhead_pct": {k: round(100 * v / call, 2) for k, v in own.items()},
        "s_per_image": {"ddim_20": per_image(ddim[20]), "ddim_50": per_image(ddim[50]),
                        "ddpm_300": per_image(ddpm_loop * 300), "ddpm_1000": per_image(ddpm_loop * 1000)},
        "note": f"DDPM: the measured per-step cost of ddpm_sample over T={args.ddpm_steps}, times T",
    }


PEER = dict(size=32, ch=32, mults=(1, 2, 2), attn=(16,), in_ch=1)  # the matched pair (1.62 M parameters each)


def load_peer(script):
    """The module of a peer-benchmark script (a file defining build_ours, build_peer and peer_call, the latter two
    around diffusers' UNet2DModel): diffusers is never imported by this project, only by that script."""
    import importlib.util
    path = Path(script)
    if not path.is_file():
        raise cli.UserError(f"--peer {script}: no such file")
    spec = importlib.util.spec_from_file_location("peer_bench", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        peer = module.build_peer(**PEER)
    except ImportError as e:
        raise cli.UserError(f"--peer {script}: {e} (the peer needs `pip install diffusers`)") from None
    except AttributeError:
        raise cli.UserError(f"--peer {script}: it defines no build_ours, build_peer and peer_call") from None
    return module.build_ours(**PEER), peer, module.peer_call(peer)


def bench_peer(script, args, device, amps, batch=64):
    """Training and inference images/s of ddpm.UNet against the peer's UNet2DModel at the same size, in runs
    alternated A B A B so that a machine drifting in speed still gives an honest ratio (the median of pairs);
    under bf16 both run in autocast with float32 weights."""
    ours, peer, peer_call = load_peer(script)
    ours, peer = ours.to(device), peer.to(device)
    x = torch.randn(batch, PEER["in_ch"], PEER["size"], PEER["size"], device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    rows = []
    for amp in amps:
        for task in ("train", "inference"):
            rates = {"ours": [], "diffusers": []}
            for _ in range(args.pairs):
                for name, model, call in (("ours", ours, ours), ("diffusers", peer, peer_call)):
                    step = train_step(model, call, x, t, amp, device) if task == "train" else \
                        inference_step(call, x, t, amp, device)
                    rates[name].append(batch / timed(step, device, args.iters))
            ratios = [o / p for o, p in zip(rates["ours"], rates["diffusers"])]
            rows.append({"task": task, "amp": amp, "batch": batch, "params_M": round(ddpm.count_params(ours) / 1e6, 2),
                         **{k: round(statistics.median(v), 1) for k, v in rates.items()},
                         "ratio": round(statistics.median(ratios), 2), "ratio_range": [round(min(ratios), 2),
                                                                                        round(max(ratios), 2)]})
    return rows


def train_step(model, call, x, t, amp, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with cli.autocast(amp, device):
            loss = torch.nn.functional.mse_loss(call(x, t).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def inference_step(call, x, t, amp, device):
    def step():
        with torch.inference_mode(), cli.autocast(amp, device):
            call(x, t)
    return step


def bench_fid(args, device):
    model = fid.FIDInceptionV3().eval().requires_grad_(False).to(device).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (args.fid_batch, 3, 32, 32), dtype=torch.uint8)
    seconds = timed(lambda: fid.get_activations([images], model), device, args.repeats)
    return {"batch": args.fid_batch, "input": "32x32 uint8, resized to 299 inside",
            "images_per_s": round(args.fid_batch / seconds, 1)}


def solver_errors(diffusion, model, x_T, nfes, spacings):
    """RMSE per pixel against DDIM with all T steps from the same x_T (the ODE's reference solution), for the
    deterministic samplers of the registry (DDIM, DPM-Solver++ 2M and 3M at eta 0, Heun) at each number of model
    calls (Heun: the grid of (calls + 1) / 2 points, rounded up) and spacing; clip_x0 off."""
    ref = diffusion.ddim_sample(model, x_T=x_T, steps=diffusion.T, clip_x0=False)
    solvers = (("ddim", "ddim", {}), ("dpm++2M", "dpm++", dict(order=2, eta=0.0)),
               ("dpm++3M", "dpm++", dict(order=3, eta=0.0)), ("heun", "heun", {}))
    rows = []
    for spacing in spacings:
        for name, sampler, kw in solvers:
            steps = (lambda k: (k + 2) // 2) if sampler == "heun" else (lambda k: k)
            run = lambda k: ddpm.sample(diffusion, model, sampler, x_T=x_T, steps=steps(k), clip_x0=False,
                                        spacing=spacing, **kw)
            rows.append({"sampler": name, "spacing": spacing,
                         **{str(k): round((run(k) - ref).pow(2).mean().sqrt().item(), 4) for k in nfes}})
    return rows


SOLVER_SPACINGS = ("linspace", "trailing", "lambda", "karras")  # the default, the one before, lambda, Karras


def oracle_std_errors(diffusion, x_T, nfes, spacings):
    """std(x_0) - 0.5 for the exact predictor of x0 ~ N(0.3, 0.5^2): DDIM, DPM-Solver++(2M) and the SDE forms
    (eta = 1) of 2M and 3M at each number of model calls and spacing; clip_x0 off."""
    model, rows = ddpm.gaussian_eps(diffusion), []
    for spacing in spacings:
        for name, kw in (("ddim", None), ("dpm++2M", dict(eta=0.0)), ("sde-dpm++2M", dict(eta=1.0)),
                         ("sde-dpm++3M", dict(eta=1.0, order=3))):
            run = (lambda k: diffusion.ddim_sample(model, x_T=x_T, steps=k, clip_x0=False, spacing=spacing)) if kw is None \
                else (lambda k: diffusion.dpm_solver_sample(model, x_T=x_T, steps=k, clip_x0=False, spacing=spacing,
                                                            generator=torch.Generator(x_T.device).manual_seed(1), **kw))
            rows.append({"sampler": name, "spacing": spacing, **{str(k): round(run(k).std().item() - 0.5, 4) for k in nfes}})
    return rows


def bench_solvers(args, device):
    """docs/samplers.md's tables: the exact Gaussian predictor (linear and cosine, T = 1000; the flow) and a
    trained run."""
    nfes, g = (5, 10, 20, 30, 50), torch.Generator(device).manual_seed(0)  # a superset of the oracle's calls
    out = {}
    for schedule in ("linear", "cosine"):
        d = ddpm.Diffusion(ddpm.make_betas(schedule, 1000)).to(device)
        x_T = torch.randn(4096, 1, 4, 4, generator=g, device=device)
        out[f"gaussian_{schedule}"] = solver_errors(d, ddpm.gaussian_eps(d), x_T, nfes, SOLVER_SPACINGS)
        out[f"gaussian_std_{schedule}"] = oracle_std_errors(d, x_T, (5, 10, 20), SOLVER_SPACINGS)
    out["gaussian_std_flow"] = oracle_std_errors(ddpm.FlowMatching().to(device), x_T, (5, 10, 20), ("time",))
    ckpt, net, d = cli.load_run(args.solvers, device)
    c, s = ckpt["config"]["model"]["in_channels"], ckpt["config"]["model"]["image_size"]
    x_T = torch.randn(args.solver_n, c, s, s, generator=g, device=device)
    out["trained"] = solver_errors(d, net, x_T, nfes, SOLVER_SPACINGS)
    batch = x_T[:args.sample_batch]
    with torch.inference_mode():
        out["s_per_image"] = {f"{name}_{k}": round(timed(lambda: fn(k), device, args.repeats) / batch.shape[0], 4)
                              for name, fn in (("ddim", lambda k: d.ddim_sample(net, x_T=batch, steps=k)),
                                               ("dpm++2M", lambda k: d.dpm_solver_sample(
                                                   net, x_T=batch, steps=k, order=2, eta=0.0)))
                              for k in (10, 20, 50)}
    for name, rows in out.items():
        if name == "s_per_image":
            print("s/image (batch %d): " % batch.shape[0] + ", ".join(f"{k} {v}" for k, v in rows.items()))
            continue
        calls = [k for k in nfes if str(k) in rows[0]]
        what = "std - 0.5" if "std" in name else f"RMSE per pixel against DDIM-{d.T if name == 'trained' else 1000}"
        print(f"{name}: {what} at NFE " + " / ".join(map(str, calls)))
        for r in rows:
            print(f"  {r['sampler']:11s} {r['spacing']:9s} " + "  ".join(f"{r[str(k)]:+.4f}" for k in calls))
    return out


# ----------------------------------------------------------------------------------------------
# training recipes: sample quality after a fixed CPU budget (docs/recipes.md)

MNIST_RUN = ["--channels", "1", "--image-size", "32", "--no-flip", "--preset", "tiny", "--sample-every", "0",
             "--save-every", "100000"]
OLD_TINY = ["--base-channels", "24", "--norm-group-size", "0"]  # the tiny preset before 16 channels, 4 a group
HO = [*OLD_TINY, "--lr", "1e-3", "--prediction", "eps", "--min-snr", "0", "--schedule", "linear"]  # its recipe
MINSNR = [*HO[:-4], "--min-snr", "5", "--schedule", "linear"]
TINY_NOW = [*MINSNR, "--base-channels", "16", "--norm-group-size", "4"]  # the tiny preset
RECIPES = {  # name -> train.py options on top of MNIST_RUN; each changes one thing from its parent
    "base": HO,
    "minsnr": MINSNR,                                  # parent: base
    "minsnr-seed1": [*MINSNR, "--seed", "1"],         # the same recipe, another seed: the spread
    "v": [*HO, "--prediction", "v"],                  # parent: base
    "v-minsnr": [*MINSNR, "--prediction", "v"],       # parent: minsnr
    "cosine": [*MINSNR, "--schedule", "cosine"],      # parent: minsnr
    "lr2e-3": [*MINSNR, "--lr", "2e-3"],
    "w32": [*MINSNR, "--base-channels", "32"],
    "w16": [*MINSNR, "--base-channels", "16"],
    "w16-g4": TINY_NOW,                               # parent: w16
    "w16-g4-seed1": [*TINY_NOW, "--seed", "1"],
    "w16-g4-seed2": [*TINY_NOW, "--seed", "2"],
    "w16-g4-d2": [*TINY_NOW, "--num-res-blocks", "2"],
    "w16-g4-cosine": [*TINY_NOW, "--schedule", "cosine"],
    "w32-g4": [*MINSNR, "--base-channels", "32", "--norm-group-size", "4"],  # parent: w32
    "g4": [*MINSNR, "--norm-group-size", "4"],         # parent: minsnr
    "heads4": [*MINSNR, "--num-heads", "4"],
    "b32": [*MINSNR, "--batch-size", "32"],
    "t300-linear": [*MINSNR, "--T", "300", "--schedule", "linear"],  # alpha-bar_T = 0.048
    "t300-rescaled": [*MINSNR, "--T", "300", "--schedule", "rescaled-linear"],
    "t300-cosine": [*MINSNR, "--T", "300", "--schedule", "cosine"],
}


def recipe_speed(name, flags, args):
    """Training images/s of a recipe, from a short run (its first 20 steps not counted)."""
    out = Path(args.quality_dir) / f"{name}.probe"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, str(HERE / "train.py"), "--data", args.mnist, "--out", str(out), *MNIST_RUN, *flags,
           "--steps", "60", "--log-every", "10"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))[2:]
    return statistics.mean(float(r["images_per_s"]) for r in rows)


def recipe_fd(run, sampler, args):
    """mnist_fd.py's FD of --fd-n samples from `run` drawn by SAMPLER:CALLS[:sample.py options]."""
    kind, calls, *extra = sampler.split(":", 2)
    tag = "".join(c for c in sampler if c.isalnum() or c in "+-")
    folder = Path(f"{run}.samples") / tag
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    subprocess.run([sys.executable, str(HERE / "sample.py"), str(run), "--n", str(args.fd_n), "--batch-size", "250",
                    "--sampler", kind, "--steps", calls, *" ".join(extra).split(), "--out", str(folder),
                    "--grid", f"{run}_{tag}.png"], check=True, stderr=subprocess.DEVNULL)
    fd = subprocess.run([sys.executable, args.fd_tool, str(folder)], check=True, capture_output=True, text=True)
    return float(fd.stdout.split(" FD ")[1].split()[0])


def bench_recipe(name, args):
    """Train recipe `name` for the steps this machine makes in --minutes (or --recipe-steps), sample
    --fd-n images with each of --fd-samplers, score them with mnist_fd.py; rows appended to results.csv.
    With --fd-only, the run is not trained again."""
    flags = RECIPES[name]
    root = Path(args.quality_dir)
    root.mkdir(parents=True, exist_ok=True)
    run = root / name
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 64
    if args.fd_only:
        with open(run / "log.csv") as f:
            rows = list(csv.DictReader(f))
        steps, ips, minutes = int(rows[-1]["step"]), statistics.mean(float(r["images_per_s"]) for r in rows), None
    else:
        ips = recipe_speed(name, flags, args)
        steps = args.recipe_steps or round(args.minutes * 60 * ips / batch)
        subprocess.run(["rm", "-rf", str(run), f"{run}.samples"], check=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "train.py"), "--data", args.mnist, "--out", str(run), *MNIST_RUN, *flags,
                        "--steps", str(steps)], check=True)
        minutes = round((time.perf_counter() - t0) / 60, 1)
    rows = []
    for sampler in args.fd_samplers.split(","):
        value = recipe_fd(run, sampler, args)
        rows.append({"recipe": name, "flags": " ".join(flags), "steps": steps, "images_per_s": round(ips, 1),
                     "train_minutes": minutes, "sampler": sampler, "n": args.fd_n, "fd": value})
        print(f"{name}: {steps} steps, {sampler}: FD {value:.2f}", flush=True)
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=list(rows[0]))
    if not (root / "results.csv").exists():
        w.writeheader()
    w.writerows(rows)
    cli.append_whole(root / "results.csv", table.getvalue().encode())


def export_digits(mnist, n, out, nearest=False):
    """The first n MNIST digits as PNGs under out/<label>/ (the inputs of docs/editing.md). nearest: each
    digit's lower half replaced by that of the other digit whose upper half is nearest in L2, a sample of
    the data's own p(lower half | upper half), the reference for inpainting's class match."""
    cli.check_output_folder(out)
    files = sorted(p for p in Path(mnist).iterdir() if p.name.endswith(cli.IDX_IMAGES)) if Path(mnist).is_dir() else []
    if not files:
        sys.exit(f"bench.py: no IDX images file (*{cli.IDX_IMAGES[0]}[.gz]) in {mnist}")
    images_file = next((p for p in files if "t10k" in p.name), files[0])  # the test digits where there
    x, y = torch.from_numpy(cli.read_idx_images(images_file).copy()), cli.read_idx_labels(images_file)
    if n > len(x):
        raise cli.UserError(f"{images_file} holds {len(x)} digits, fewer than {n}")
    if nearest:
        h = x.shape[1] // 2
        upper = x[:, :h].flatten(1).double()
        lower = x[:, h:].clone()  # from the originals: a completed digit is never a source
        for i in range(n):
            d = (upper - upper[i]).pow(2).sum(1)
            d[i] = float("inf")
            x[i, h:] = lower[d.argmin()]
    for i in range(n):
        folder = Path(out) / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        cli.save_image(x[i].numpy(), folder / f"{i:05d}.png")
    print(f"wrote {n} digits under {out}/<label>/")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("fp32", "bf16"), help="one precision; None: fp32, and bf16 beside it where "
                                                        "the device has native bfloat16")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default="bench.json", help="where the figures go, as JSON")
    p.add_argument("--peer", metavar="SCRIPT", help="only the ratio against diffusers' UNet2DModel at matched size, "
                   "with the peer-benchmark script that builds it (e.g. ../shared/tools/peer_bench.py; needs diffusers)")
    p.add_argument("--solvers", metavar="RUN", help="only the sampler accuracy table, on this trained run")
    p.add_argument("--solver-n", type=int, default=64, help="--solvers: samples from the trained run")
    p.add_argument("--quality", nargs="+", metavar="RECIPE", choices=sorted(RECIPES),
                   help="train these recipes on MNIST for --minutes each and score them with mnist_fd.py")
    p.add_argument("--minutes", type=float, default=15.0, help="--quality: training budget of each recipe")
    p.add_argument("--mnist", help="--quality: a folder of MNIST's IDX files")
    p.add_argument("--fd-tool", help="--quality: a script that prints 'FOLDER: n=N FD value' for a folder of "
                                     "samples (a Frechet distance in an MNIST classifier's features)")
    p.add_argument("--fd-n", type=int, default=2000, help="--quality: samples per FD")
    p.add_argument("--fd-samplers", default="dpm++:20:--eta 1",
                   help="--quality: comma-separated SAMPLER:CALLS[:sample.py options]")
    p.add_argument("--quality-dir", default="runs/quality", help="--quality: where runs and results.csv go")
    p.add_argument("--recipe-steps", type=int, help="--quality: train this many steps instead of --minutes' worth")
    p.add_argument("--fd-only", action="store_true", help="--quality: score the runs already trained")
    p.add_argument("--digits", nargs=3, metavar=("MNIST", "N", "OUT"), help="write the first N test digits under "
                   "OUT/<label>/ (the inputs and class labels of the inpainting measurements)")
    p.add_argument("--nearest", action="store_true", help="--digits: lower halves from the nearest digit by upper half")
    args = p.parse_args(argv)
    cli.reuse_freed_memory()  # as every command does
    if args.digits:
        if not args.digits[1].isdigit() or int(args.digits[1]) < 1:
            p.error(f"--digits: N must be a positive whole number, got {args.digits[1]!r}")
        try:
            export_digits(args.digits[0], int(args.digits[1]), args.digits[2], args.nearest)
        except cli.UserError as e:
            sys.exit(f"bench.py: {e}")
        return
    if args.quality:
        if not (args.mnist and args.fd_tool):
            p.error("--quality needs --mnist FOLDER and --fd-tool SCRIPT")
        for name in args.quality:
            bench_recipe(name, args)
        return
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.repeats = 2 if args.quick else 3
    args.iters = 2 if args.quick else 3
    args.sample_batch = 64
    args.ddpm_steps = 20 if args.quick else 50
    args.fid_batch = (200 if gpu else 8) if args.quick else (500 if gpu else 16)
    torch.manual_seed(0)
    if args.solvers:
        write_json(args.out, {"machine": machine(device), "solvers": bench_solvers(args, device)})
        return

    amps = [args.amp] if args.amp else ["fp32", "bf16"] if cli.native_bf16(device) else ["fp32"]
    if args.peer:
        args.pairs = 2 if args.quick else 4
        try:
            rows = bench_peer(args.peer, args, device, amps)
        except cli.UserError as e:
            sys.exit(f"bench.py: {e}")
        print(" | ".join(f"{k} {v}" for k, v in machine(device).items()))
        for r in rows:
            print(f"peer   {r['task']:9s} {r['amp']} 32x32x1 batch {r['batch']} ({r['params_M']} M each): ours "
                  f"{r['ours']:7.1f} img/s, diffusers {r['diffusers']:7.1f}: {r['ratio']}x "
                  f"(pairs {r['ratio_range'][0]}-{r['ratio_range'][1]})")
        write_json(args.out, {"machine": machine(device), "peer": rows})
        return
    results = {"machine": machine(device), "options": {"amps": amps, "channels_last": args.channels_last,
                                                       "compile": args.compile, "quick": args.quick}}
    print(" | ".join(f"{k} {v}" for k, v in results["machine"].items()))
    results["train"] = [bench_train(preset, batch, args, device, amp) for preset, batch in
                        (("tiny", 256 if gpu else 64), ("faces64", 128 if gpu else (8 if args.quick else 16)))
                        for amp in amps]
    for r in results["train"]:
        print(f"train  {r['preset']:8s} {r['size']}x{r['size']} batch {r['batch']:3d} ({r['params_M']} M) {r['amp']}: "
              f"{r['images_per_s']:8.1f} img/s  ({r['ms_per_step']} ms/step)")
    results["sampling"] = [bench_sampling(args, device, amp) for amp in amps]
    for s in results["sampling"]:
        print(f"sample tiny 32x32 batch {s['batch']} {s['amp']}: {s['ms_per_step_per_image']} ms per step per image; "
              "work outside the network per step: "
              + ", ".join(f"{k} {v}%" for k, v in s["sampler_overhead_pct"].items()) + " of a model call")
        print("       s/image: " + ", ".join(f"{k} {v}" for k, v in s["s_per_image"].items()) + f"  ({s['note']})")
    f = results["fid"] = bench_fid(args, device)
    print(f"fid    Inception features, batch {f['batch']}: {f['images_per_s']} img/s")
    results["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    print(f"peak memory: {results['peak_memory_mb']} MiB ({'CUDA max allocated' if gpu else 'process RSS'})")
    write_json(args.out, results)


def write_json(path, results):
    cli.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
