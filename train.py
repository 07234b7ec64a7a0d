"""train.py: train a DDPM (Ho et al. 2020) on a folder of images, or on a built-in demo set.

    python train.py                                           # demo: coloured shapes at 32x32, CPU minutes
    python train.py --data ./faces --T 300 --schedule cosine --preset faces64 --image-size 64
    python train.py --data ../shared/data/mnist --channels 1 --image-size 32 --preset tiny
    python train.py --data ../shared/data/mnist --channels 1 --process ve   # seed 002's score model
    python train.py --resume runs/faces                       # continue exactly where it stopped
    torchrun --standalone --nproc_per_node 8 train.py --data ./faces --batch-size 256   # 8 GPUs, same run

A folder is searched recursively for png/jpg/jpeg/bmp/webp images (and MNIST's IDX files); each
is decoded once, its short side resized and centre-cropped to --image-size, and kept in memory
as uint8. The run folder (--out) gets config.json, ckpt.pt (written atomically; Ctrl-C saves
it), log.csv, loss.png and samples/step_NNNNNN.png grids drawn by the EMA model (SDE-DPM-Solver++).
"""
import argparse
import concurrent.futures
import csv
import functools
import gzip
import json
import math
import os
import signal
import sys
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from PIL import Image, ImageDraw, ImageOps

import ddpm
import fid

TRAIN_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit status 1."""

# ----------------------------------------------------------------------------------------------
# data


def fit_image(im, size, mode):
    """PIL image -> uint8 array [C, size, size]: short side resized (bicubic), centre crop."""
    a = np.asarray(ImageOps.fit(fid.to_8bit(im).convert(mode), (size, size), Image.BICUBIC))
    return a.reshape(size, size, -1).transpose(2, 0, 1)


def fit_file(path, size, mode):
    """An image file through fit_image; None when it cannot be decoded, fid.TOO_LARGE when too large."""
    try:
        with Image.open(path) as im:
            return fit_image(im, size, mode)
    except Image.DecompressionBombError:
        return fid.TOO_LARGE
    except Exception:
        return None


def read_idx_images(path):
    """Images from an MNIST-style IDX file (optionally gzipped) as uint8 [N, H, W]."""
    try:
        raw = (gzip.open if str(path).endswith(".gz") else open)(path, "rb").read()
        if len(raw) < 16 or raw[2] != 0x08 or raw[3] != 3:
            raise ValueError("no IDX header for uint8 images")
        n, h, w = np.frombuffer(raw, ">i4", 3, offset=4)
        return np.frombuffer(raw, np.uint8, n * h * w, offset=16).reshape(n, h, w)
    except (OSError, EOFError, ValueError) as e:  # a damaged gzip stream, a short file
        raise UserError(f"{path}: not a readable IDX file of uint8 images ({e})") from None


def _readable(path):
    """path when its image header can be read, else None (a cheap check before streaming)."""
    try:
        with Image.open(path):
            return path
    except Image.DecompressionBombError:
        return fid.TOO_LARGE
    except Exception:
        return None


def memory_budget():
    """Bytes of decoded images to keep in memory: half of this machine's RAM."""
    return 0.5 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class StreamedImages:
    """A folder too large for memory, indexed like the uint8 tensor load_folder returns; each
    batch is decoded on demand by a pool of threads (Pillow decodes and resizes without the GIL)."""

    def __init__(self, files, size, channels, workers):
        self.files = files
        self.decode = functools.partial(fit_file, size=size, mode="L" if channels == 1 else "RGB")
        self.pool = concurrent.futures.ThreadPoolExecutor(max(workers, 1))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx):
        paths = [self.files[i] for i in idx.tolist()]
        arrays = list(self.pool.map(self.decode, paths))
        for path, a in zip(paths, arrays):
            if a is None or isinstance(a, str):
                raise UserError(f"{path}: could not be decoded during training")
        return torch.from_numpy(np.stack(arrays))


def load_folder(folder, size, channels, workers=0):
    """Every image under folder as one uint8 tensor [N, C, size, size] (decoded in parallel), or
    as StreamedImages when that tensor would not fit in memory_budget()."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: no such folder")
    mode = "L" if channels == 1 else "RGB"
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    files = [p for p in paths if p.suffix.lower() in TRAIN_EXTENSIONS]
    idx = [p for p in paths if p.name.endswith(("idx3-ubyte", "idx3-ubyte.gz"))]
    arrays = [fit_image(Image.fromarray(a), size, mode) for p in idx for a in read_idx_images(p)]
    need = (len(files) + len(arrays)) * channels * size * size
    stream = need > memory_budget()
    if stream and arrays:
        raise UserError(f"{folder}: too large to hold in memory ({need / 2**30:.1f} GiB) and it mixes IDX files "
                        "with image files; give them separate folders")
    skipped = {}
    decode = _readable if stream else functools.partial(fit_file, size=size, mode=mode)
    found = [x for batch in fid.decode_files(files, decode, 64, workers, skipped) for x in batch]
    if skipped:
        print(f"{folder}: image files skipped: {fid.describe_skipped(skipped)}", file=sys.stderr)
    if not found and not arrays:
        raise UserError(f"--data {folder}: no images ({', '.join(sorted(TRAIN_EXTENSIONS))} or IDX)")
    if stream:
        print(f"{folder}: {len(found)} images at {size}x{size} would need {need / 2**30:.1f} GiB; decoding each "
              f"batch from disk instead", file=sys.stderr)
        return StreamedImages(found, size, channels, workers)
    return torch.from_numpy(np.stack(arrays + found))


def demo_shapes(n=2048, size=32, channels=3, seed=0):
    """A built-in data set: one coloured circle, square or triangle on a plain background."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        while np.abs(bg - fg).sum() < 200:  # keep the shape visible
            fg = rng.integers(0, 256, 3)
        im = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
        draw, r = ImageDraw.Draw(im), rng.uniform(0.2, 0.35) * size
        cx, cy = rng.uniform(r, size - r, 2)
        kind, color = rng.integers(3), tuple(int(c) for c in fg)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        out[i] = np.asarray(im)
    x = torch.from_numpy(out).permute(0, 3, 1, 2)
    return x if channels == 3 else x.float().mean(1, keepdim=True).round().to(torch.uint8)


def batch_indices(n, batch_size, step, seed):
    """Indices of the batch at `step`: epochs are seeded permutations, so the order is a pure
    function of (seed, step) and a resumed run sees exactly the batches it would have seen."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size], epoch

# ----------------------------------------------------------------------------------------------
# pictures


def save_grid(images, path, nrow=None, pad=2):
    """Save uint8 [N, C, H, W] (or float in [-1, 1]) as one PNG grid, nrow images per row."""
    if images.dtype != torch.uint8:
        images = fid.to_uint8(images)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for k, im in enumerate(images.cpu().permute(0, 2, 3, 1).numpy()):
        y, x = pad + (k // nrow) * (h + pad), pad + (k % nrow) * (w + pad)
        grid[y:y + h, x:x + w] = im
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fid.save_image(grid[..., 0] if c == 1 else grid, path)


def plot_loss(log_path, png_path, width=640, height=360):
    """Loss against step from log.csv, log-scaled, drawn with Pillow."""
    with open(log_path) as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    if len(rows) < 2:
        return
    steps = np.array([s for s, _ in rows])
    loss = np.log10(np.maximum([v for _, v in rows], 1e-8))
    k = max(1, len(loss) // 50)  # moving average over ~2% of the run
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 60, width - 15, 15, height - 35
    lo, hi = math.floor(loss.min() * 2) / 2, math.ceil(loss.max() * 2) / 2 + 1e-9
    px = lambda s: left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (right - left)
    py = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)
    d.rectangle([left, top, right, bottom], outline="black")
    for e in np.arange(lo, hi, 0.5):
        d.line([left - 4, py(e), left, py(e)], fill="black")
        d.text((5, py(e) - 6), f"{10 ** e:.3g}", fill="black")
    for s in np.linspace(steps[0], steps[-1], 5):
        d.line([px(s), bottom, px(s), bottom + 4], fill="black")
        d.text((px(s) - 15, bottom + 8), f"{int(s)}", fill="black")
    d.text(((left + right) // 2 - 40, height - 16), "step (loss, log)", fill="black")
    d.line([(px(s), py(v)) for s, v in zip(steps, loss)], fill=(190, 205, 235))
    d.line([(px(s), py(v)) for s, v in zip(steps[k - 1:], smooth)], fill=(20, 60, 160), width=2)
    fid.atomic_write(png_path, lambda tmp: im.save(tmp, format="PNG"))

# ----------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, state):
    """Write atomically: a kill during the write leaves the previous checkpoint intact."""
    fid.atomic_write(path, lambda tmp: torch.save(state, tmp))


def unreadable_checkpoint(path, error):
    """Why torch.load failed, in words that do not pass on its advice to load unsafely."""
    if not zipfile.is_zipfile(path):
        return "not a torch checkpoint: the file is damaged, truncated or of another kind"
    if "weights only" in str(error).lower():
        return "a torch file holding Python objects that a safe load refuses: not a checkpoint of train.py"
    return f"a damaged torch checkpoint ({type(error).__name__}); a complete one is rewritten at every save"


def load_checkpoint(path, device="cpu"):
    """(checkpoint dict, model, EMA, Diffusion) from a run folder or a ckpt.pt, built from the
    configuration inside it. weights_only=True: loading a checkpoint never runs code."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: {unreadable_checkpoint(path, e)}") from None
    try:
        cfg = ckpt["config"]
        model = ddpm.UNet(**cfg["model"]).to(device)
        model.load_state_dict(ckpt["model"])
        ema = ddpm.EMA(model, cfg["ema_decay"])
        ema.load_state_dict(ckpt["ema"])
    except Exception as e:
        raise UserError(f"{path}: not a checkpoint of this version of train.py "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return ckpt, model, ema, make_process(cfg).to(device)

# ----------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", help="image folder (searched recursively); none: the built-in demo shapes")
    a("--out", default="runs/ddpm", help="run folder")
    a("--resume", metavar="RUN", help="continue the run in this folder (its config wins)")
    a("--image-size", type=int, default=None, help="None: the preset's (32 tiny/cifar10, 64 faces64)")
    a("--channels", type=int, default=3, choices=(1, 3), help="1 for grayscale")
    a("--no-flip", action="store_true", help="no random horizontal flips")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    a("--process", default="ddpm", choices=("ddpm", "ve"),
      help="ddpm (Ho et al.; also sampled as the VP SDE) or ve: seed 002's score model on dx = sigma^t dw")
    a("--sigma", type=float, default=25.0, help="ve: sigma of dx = sigma^t dw")
    a("--T", type=int, default=1000, help="diffusion steps")
    a("--schedule", choices=ddpm.SCHEDULES, help="None: linear (Ho et al.) at --T 1000, else rescaled-linear (README)")
    a("--beta-start", type=float, default=1e-4)
    a("--beta-end", type=float, default=0.02)
    a("--loss", default="l2", choices=ddpm.LOSSES)
    a("--prediction", choices=ddpm.PREDICTIONS, help="ddpm: what the network predicts (v: Salimans & Ho); "
                                                      "None: the preset's recipe")
    a("--min-snr", type=float, metavar="GAMMA", help="ddpm: min-SNR-gamma loss weights (Hang et al. 2023; 5 is "
                                                     "theirs; 0: off); None: the preset's recipe")
    a("--preset", default="tiny", choices=sorted(ddpm.PRESETS))
    a("--base-channels", type=int)
    a("--channel-mults", help="e.g. 1,2,2")
    a("--num-res-blocks", type=int)
    a("--attn-resolutions", help="e.g. 16 or 16,8; 'none' for no attention")
    a("--num-heads", type=int, help="attention heads")
    a("--dropout", type=float)
    a("--act", choices=("silu", "relu"), default="silu")
    a("--norm", choices=("group", "batch"), default="group")
    a("--norm-group-size", type=int, help="channels per GroupNorm group; 0: gcd(32, C) groups (Ho et al.'s 32 "
                                          "at their widths: the cifar10 and faces64 presets' rule); None: the preset's")
    a("--batch-size", type=int, default=64, help="the global batch: split evenly among torchrun's processes")
    a("--grad-accum", type=int, default=1, help="micro-batches per process and step (same result, less memory)")
    a("--lr", type=float, help="peak learning rate; None: the preset's recipe")
    a("--warmup", type=int, default=200, help="linear warm-up steps")
    a("--decay", default="cosine", choices=("cosine", "none"), help="learning-rate decay to 10%% after warm-up")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    a("--ema-decay", type=float, default=0.999)
    a("--steps", type=int, help="optimizer steps; None: 1500 on the demo set, else --epochs worth")
    a("--epochs", type=int, default=100)
    a("--amp", choices=("bf16", "fp16"), help="autocast on CUDA")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--channels-last", action="store_true", help="channels_last memory format (see README: faster on some models)")
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--sample-every", type=int, default=500, help="steps between sample grids (0: off)")
    a("--sample-n", type=int, default=36)
    a("--sample-steps", type=int, default=20, help="SDE-DPM-Solver++ steps for the grids and FID (ddpm runs)")
    a("--save-every", type=int, default=500)
    a("--log-every", type=int, default=10)
    a("--fid-every", type=int, default=0, help="steps between FIDs against the training set (0: off)")
    a("--fid-samples", type=int, default=1000)
    return p.parse_args(argv)


FIRST_GRID = 400  # a grid this early too: the CPU demo's shapes are recognisable by then (about 2 minutes)
AT_LEAST_ONE = ("batch_size", "log_every", "save_every", "sample_n", "image_size", "T", "epochs", "sample_steps",
                "base_channels", "num_res_blocks", "steps", "num_heads", "grad_accum")
AT_LEAST_ZERO = ("warmup", "workers", "sample_every", "fid_every", "grad_clip", "dropout", "norm_group_size")


def check_args(args):
    """Numbers, the device and the run folder, checked before any data is read: one UserError line."""
    for names, least in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and value >= least):
                raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.fid_samples < 2:
        raise UserError(f"--fid-samples must be at least 2 (a covariance), got {args.fid_samples}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if args.min_snr is not None and not (math.isfinite(args.min_snr) and args.min_snr >= 0):
        raise UserError(f"--min-snr must be a number >= 0 (0: off), got {args.min_snr}")
    if args.process == "ve" and (args.prediction not in (None, "eps") or args.min_snr):
        raise UserError("--prediction v and --min-snr apply to --process ddpm; a ve model predicts the scaled score")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    fid.check_device(args.device)


def prepare_out(out):
    """A new run's folder: created if missing; refused when it is a file, holds a run, or holds anything
    else (a folder of the user's: we would overwrite its config.json and log.csv)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder")
    if (out / "ckpt.pt").exists():
        raise UserError(f"{out} holds a run already: --resume {out}, or choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder is not empty and is not a run of train.py; choose a new one")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fid.atomic_write(out / ".write-test", lambda tmp: tmp.write_bytes(b""))
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def run_config(args):
    """The run's configuration (model included) from the command line."""
    cfg = dict(ddpm.PRESETS[args.preset])
    for key, value in (("base_channels", args.base_channels), ("num_res_blocks", args.num_res_blocks),
                       ("dropout", args.dropout), ("image_size", args.image_size), ("num_heads", args.num_heads),
                       ("norm_group_size", args.norm_group_size)):
        if value is not None:
            cfg[key] = value
    if cfg.get("norm_group_size") == 0:  # the old rule, which a model config spells None
        cfg["norm_group_size"] = None
    try:
        if args.channel_mults:
            cfg["channel_mults"] = [int(m) for m in args.channel_mults.split(",")]
        if args.attn_resolutions:
            cfg["attn_resolutions"] = ([] if args.attn_resolutions == "none"
                                       else [int(r) for r in args.attn_resolutions.split(",")])
    except ValueError:
        raise UserError("--channel-mults and --attn-resolutions take comma-separated integers") from None
    if not args.attn_resolutions:  # the preset's attention where this image size has that resolution
        levels = ddpm.unet_resolutions(cfg["image_size"], cfg["channel_mults"])
        dropped = [r for r in cfg["attn_resolutions"] if r not in levels]
        cfg["attn_resolutions"] = [r for r in cfg["attn_resolutions"] if r in levels]
        if dropped:
            print(f"note: the {args.preset} preset's attention at {dropped} does not exist at {cfg['image_size']} px "
                  f"(resolutions {levels}); --attn-resolutions sets it", file=sys.stderr)
    cfg.update(in_channels=args.channels, activation=args.act, norm=args.norm)
    if args.process == "ve":  # t in (0, 1]: see UNet.forward
        cfg["time_scale"] = 1000.0
    skip = {"resume", "preset", "base_channels", "channel_mults", "num_res_blocks", "attn_resolutions",
            "dropout", "image_size", "act", "norm", "num_heads", "norm_group_size"}
    run = {k: v for k, v in vars(args).items() if k not in skip}
    if args.data:  # absolute, so that --resume works from any directory
        run["data"] = str(Path(args.data).resolve())
    recipe = dict(RECIPES.get(args.preset, RECIPES["ho"]))
    if args.process == "ve":  # a VE model predicts the scaled score, unweighted
        recipe.update(prediction="eps", min_snr=0.0)
    for key, value in recipe.items():
        if run[key] is None:
            run[key] = value
    if run["schedule"] is None:
        run["schedule"] = "linear" if run["T"] == 1000 else SCHEDULE_AT_OTHER_T
    if run["schedule"] in ("linear", "rescaled-linear") and not 0 < args.beta_start < args.beta_end < 1:
        raise UserError(f"the {run['schedule']} schedule needs 0 < --beta-start < --beta-end < 1, got "
                        f"{args.beta_start} and {args.beta_end}")
    ddpm.UNet(**cfg)  # raises ValueError for an impossible architecture, before any work
    make_process(run)  # and for an impossible process
    return run | {"model": cfg}


# Training defaults by preset. The tiny preset's recipe was measured on MNIST at a budget of 15
# CPU-minutes (README, "A training recipe per CPU-minute"); the other presets keep Ho et al.'s, which
# these flags also restore for tiny: --lr 2e-4 --prediction eps --min-snr 0 --schedule linear
# (and --norm-group-size 0 their GroupNorm rule).
RECIPES = {"ho": dict(lr=2e-4, prediction="eps", min_snr=0.0),
           "tiny": dict(lr=1e-3, prediction="eps", min_snr=5.0)}
SCHEDULE_AT_OTHER_T = "rescaled-linear"  # the default schedule when --T is not 1000 (measured: README)


def make_process(cfg):
    """The run's process: ddpm.Diffusion with its beta schedule, or ddpm.VESDE."""
    if cfg.get("process", "ddpm") == "ve":
        return ddpm.VESDE(cfg["sigma"])
    return ddpm.Diffusion(ddpm.make_betas(cfg["schedule"], cfg["T"], cfg["beta_start"], cfg["beta_end"]))


def loss_options(cfg):
    """The keyword arguments of the run's loss beyond its type (DDPM runs; older configs have none)."""
    if cfg.get("process", "ddpm") == "ve":
        return {}
    return {"prediction": cfg.get("prediction", "eps"), "min_snr": cfg.get("min_snr") or None}


def sampling_model(cfg, model, process):
    """The network as the samplers take it: an eps model (a v-prediction network is converted)."""
    return ddpm.EpsFromV(model, process) if cfg.get("prediction", "eps") == "v" else model


def draw(process, model, shape, steps, generator):
    """Samples for grids and FID during training: SDE-DPM-Solver++(2M) with `steps` calls for DDPM runs
    (the best images per model call, README), the probability-flow ODE at tolerance 1e-3 for VE."""
    if isinstance(process, ddpm.VESDE):
        return process.ode_sample(model, shape, rtol=1e-3, atol=1e-3, generator=generator)[0]
    return process.dpm_solver_sample(model, shape, steps=steps, eta=1.0, generator=generator)


def lr_at(step, cfg, total):
    """Linear warm-up, then cosine decay to 10% of --lr (or constant)."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    if cfg["decay"] == "none":
        return cfg["lr"]
    progress = (step - cfg["warmup"]) / max(total - cfg["warmup"], 1)
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def progress_line(step, total, epoch, loss, ips, eta_s, world):
    shared = f" | {world} processes" if world > 1 else ""
    return (f"step {step}/{total} | epoch {epoch} | loss {loss:.4f} | {ips:.0f} img/s{shared} | "
            f"ETA {int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m{int(eta_s % 60):02d}s")

# ----------------------------------------------------------------------------------------------
# the run, top to bottom: setup -> data -> model and optimiser -> the loop -> save.
# Under torchrun every process runs all of it; rank 0 alone writes the run folder.


def setup(args, procs):
    """Checked options, this process's device, the run's configuration and folder: (cfg, out,
    resumed, device). A resumed run takes its configuration from its checkpoint."""
    check_args(args)
    device = procs.start(args.device)
    resumed = None
    if args.resume:
        resumed = load_checkpoint(args.resume, device)
        cfg, out = resumed[0]["config"], Path(args.resume)
        out = out.parent if out.is_file() else out  # --resume RUN or RUN/ckpt.pt, as sample.py
        if args.steps:  # what a resume may change: how long to go on, and how the batch is split
            cfg["steps"] = args.steps
        cfg["grad_accum"] = args.grad_accum
        defaults, kept = vars(parse_args([])), ("resume", "steps", "device", "grad_accum")
        ignored = [k for k, v in vars(args).items() if k not in kept and v != defaults[k]]
        if ignored and procs.main:
            print(f"note: {', '.join('--' + k.replace('_', '-') for k in ignored)} ignored: a resumed run keeps "
                  f"its configuration (only --steps, --grad-accum and --device apply)", file=sys.stderr)
    else:
        cfg, out = run_config(args), Path(args.out)
    cfg["world_size"] = procs.world
    check_split(cfg)
    if not args.resume:
        procs.agree(lambda: prepare_out(out))
    return cfg, out, resumed, device


def check_split(cfg):
    """The global batch must split evenly into world_size x grad_accum equal parts."""
    batch, world, accum = cfg["batch_size"], cfg["world_size"], cfg.get("grad_accum", 1)
    if batch % (world * accum):
        raise UserError(f"--batch-size {batch} is the global batch: it does not split evenly among {world} "
                        f"process{'es' * (world > 1)} x {accum} micro-batch{'es' * (accum > 1)} (--grad-accum)")
    if world * accum > 1 and cfg["model"]["norm"] == "batch":
        raise UserError("--norm batch with several processes or --grad-accum: its statistics would depend on how "
                        "the batch is split; use --norm group")


def load_data(cfg, device, procs):
    """The training images (uint8, on the device when they fit in memory) and the steps an epoch."""
    size, channels = cfg["model"]["image_size"], cfg["model"]["in_channels"]
    if cfg["data"]:
        data = load_folder(cfg["data"], size, channels, cfg["workers"])
    else:
        data = demo_shapes(size=size, channels=channels, seed=cfg["seed"])
    if isinstance(data, torch.Tensor):
        data = data.to(device)
    per_epoch = max(len(data) // cfg["batch_size"], 1)
    if not cfg["steps"]:
        cfg["steps"] = 1500 if not cfg["data"] else cfg["epochs"] * per_epoch
    if procs.main:
        print(f"data: {len(data)} images {channels}x{size}x{size} from {cfg['data'] or 'the built-in demo shapes'}; "
              f"{per_epoch} steps an epoch, {cfg['steps']} steps", file=sys.stderr)
    return data, per_epoch


def build(cfg, resumed, device, procs):
    """The model (new, or from the checkpoint), its EMA, the process, the optimiser, the loss scaler
    and `draws`, the generator of every step's flips, timesteps and noise; the step to start from."""
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    if resumed:
        ckpt, model, ema, process = resumed
    else:
        model = ddpm.UNet(**cfg["model"]).to(device)
        ema = ddpm.EMA(model, cfg["ema_decay"])
        process = make_process(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    draws = torch.Generator(device).manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"] + procs.rank)  # dropout: each rank its own masks
    step = 0
    if resumed:
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if "draws" in ckpt["rng"]:
            draws.set_state(ckpt["rng"]["draws"].cpu())
        else:  # a checkpoint of an earlier version, whose draws came from the global generator
            draws.manual_seed(cfg["seed"] + step)
        if procs.main:
            torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
            if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    use_amp = bool(cfg["amp"]) and device.type == "cuda"
    if cfg["amp"] and not use_amp and procs.main:
        print("note: --amp applies on CUDA only; training in float32", file=sys.stderr)
    memory_format = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
    model.to(memory_format=memory_format)
    net = model
    if procs.world > 1:  # gradients averaged across ranks in backward; no buffers to keep in step
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
    return SimpleNamespace(
        model=model, ema=ema, process=process, opt=opt, draws=draws, step=step, net=net,
        fwd=torch.compile(net) if cfg["compile"] else net, memory_format=memory_format,
        amp=dict(device_type=device.type, enabled=use_amp,
                 dtype=torch.bfloat16 if cfg["amp"] == "bf16" else torch.float16),
        scaler=torch.amp.GradScaler(enabled=use_amp and cfg["amp"] == "fp16"))


def describe(cfg, state, procs):
    """What rank 0 says about the model, the process and the split of the batch before training."""
    print(f"model: {ddpm.count_params(state.model) / 1e6:.2f} M parameters", file=sys.stderr)
    process = state.process
    if isinstance(process, ddpm.VESDE):
        print(f"process: VE SDE dx = {process.sigma:g}^t dw, prior std {process.prior_std:.2f}", file=sys.stderr)
        a_T = 0.0
    else:
        a_T = process.alphas_cumprod64[-1].item()
        print(f"schedule: {cfg['schedule']} T={cfg['T']}, alpha-bar_T = {a_T:.2e}", file=sys.stderr)
    if a_T > 0.01:
        print(f"warning: alpha-bar_T = {a_T:.3f} > 0.01: x_T keeps {math.sqrt(a_T):.0%} of the image, so "
              "sampling from pure noise starts off the training distribution; use --schedule cosine "
              "or a larger --beta-end", file=sys.stderr)
    world, accum, batch = procs.world, cfg["grad_accum"], cfg["batch_size"]
    if world * accum > 1:
        print(f"batch: {batch} images a step, {world} process{'es' * (world > 1)} x {batch // world} "
              f"({accum} micro-batch{'es' * (accum > 1)} of {batch // world // accum})", file=sys.stderr)
    if world > 1 and cfg["model"]["dropout"] > 0:
        print("note: with dropout each process draws its own masks, so the run is not the same as on one "
              "process (everything else is)", file=sys.stderr)

# ----------------------------------------------------------------------------------------------
# what rank 0 writes, and the FID that every rank helps to compute


class RunFolder:
    """The run folder, written by rank 0 alone: config.json, log.csv (rows after the checkpoint's step
    dropped on resume), ckpt.pt (atomic), loss.png, samples/step_NNNNNN.png and fid.csv."""

    def __init__(self, out, cfg, step, resumed, procs, per_epoch):
        self.out, self.cfg, self.main, self.log_path = out, cfg, procs.main, out / "log.csv"
        self.per_epoch = per_epoch
        if not self.main:
            return
        (out / "samples").mkdir(parents=True, exist_ok=True)
        fid.atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(cfg, indent=2) + "\n"))
        rows = []
        if resumed and self.log_path.exists():
            with open(self.log_path) as f:
                rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= step]

        def write_log(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["step", "epoch", "loss", "lr", "images_per_s"], *rows])
        fid.atomic_write(self.log_path, write_log)

    def log(self, row):
        if self.main:
            with open(self.log_path, "a", newline="") as f:
                csv.writer(f).writerow(row)

    def checkpoint(self, state):
        if not self.main:
            return
        rng = {"cpu": torch.get_rng_state(), "draws": state.draws.get_state(),
               "cuda": torch.cuda.get_rng_state() if state.draws.device.type == "cuda" else None}
        save_checkpoint(self.out / "ckpt.pt", {
            "model": state.model.state_dict(), "ema": state.ema.state_dict(), "optimizer": state.opt.state_dict(),
            "step": state.step, "epoch": state.step // self.per_epoch, "config": self.cfg, "rng": rng})
        plot_loss(self.log_path, self.out / "loss.png")

    def grid(self, state):
        if not self.main:
            return
        cfg, m = self.cfg, self.cfg["model"]
        g = torch.Generator(state.draws.device).manual_seed(cfg["seed"])  # its own: training draws untouched
        net = sampling_model(cfg, state.ema.model, state.process)
        x = draw(state.process, net, (cfg["sample_n"], m["in_channels"], m["image_size"], m["image_size"]),
                 cfg["sample_steps"], g)
        save_grid(x, self.out / "samples" / f"step_{state.step:06d}.png")


class TrainingFID:
    """FID of --fid-samples EMA samples against as many training images. Every rank draws and embeds
    its share (sample i's noise from (seed + 1, i)); rank 0 gathers the features and writes fid.csv.
    Without Inception weights: one note, then off."""

    def __init__(self, cfg, data, procs):
        self.cfg, self.data, self.procs, self.net, self.ref, self.off = cfg, data, procs, None, None, False

    def features(self, images):
        return torch.from_numpy(fid.get_activations(images.split(50), self.net)[0])

    def start(self):
        try:
            self.net = fid.load_inception(device=self.procs.device)
        except fid.FIDError as e:
            error = str(e)
        else:
            error = None
        if self.procs.any(error is not None):
            if self.procs.main:
                print(f"\nnote: FID skipped for this run: {error or 'Inception weights missing on a process'}",
                      file=sys.stderr)
            self.off = True
            return
        n = self.cfg["fid_samples"]
        pick = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.cfg["seed"]))[:n]
        lo, hi = self.procs.span(len(pick))  # a random subset of the training set, not its first files
        feats = self.procs.gather(self.features(self.data[pick[lo:hi]].to(self.procs.device)))
        self.ref = fid.activation_statistics(feats.numpy()) if self.procs.main else None

    def measure(self, state, out):
        if self.net is None and not self.off:
            self.start()
        if self.off:
            return
        cfg, m, device = self.cfg, self.cfg["model"], self.procs.device
        net = sampling_model(cfg, state.ema.model, state.process)
        lo, hi = self.procs.span(cfg["fid_samples"], 100)
        xs = [draw(state.process, net, (min(100, hi - i), m["in_channels"], m["image_size"], m["image_size"]),
                   cfg["sample_steps"], ddpm.sample_generators(cfg["seed"] + 1, range(i, min(i + 100, hi)), device))
              for i in range(lo, hi, 100)]
        mine = self.features(fid.to_uint8(torch.cat(xs))) if xs else torch.zeros(0, 2048, dtype=torch.float64)
        feats = self.procs.gather(mine)
        if self.procs.main:
            value = fid.frechet_distance(*fid.activation_statistics(feats.numpy()), *self.ref)
            with open(out / "fid.csv", "a") as f:
                f.write(f"{state.step},{value:.4f}\n")
            print(f"\nstep {state.step}: FID {value:.2f} ({cfg['fid_samples']} samples)", file=sys.stderr)

# ----------------------------------------------------------------------------------------------
# one step, and the loop


def train_step(state, data, cfg, procs):
    """One optimiser step on the global batch of state.step. Every rank draws the whole batch's flips,
    timesteps and noise from state.draws and takes its share, and --grad-accum splits the share into
    micro-batches, so the result does not depend on either. The loss is sum(per-sample) x world / batch:
    DDP averages over the world, giving the gradient of the mean over the global batch.
    Returns this rank's sum of per-sample losses (on the device: no host sync) and the epoch."""
    device, process, world, accum = procs.device, state.process, procs.world, cfg["grad_accum"]
    idx, epoch = batch_indices(len(data), cfg["batch_size"], state.step, cfg["seed"])
    n, (c, s) = len(idx), (cfg["model"]["in_channels"], cfg["model"]["image_size"])
    flips = None if cfg["no_flip"] else torch.rand(n, generator=state.draws, device=device) < 0.5
    t = process.train_t(n, generator=state.draws, device=device)
    noise = torch.randn((n, c, s, s), generator=state.draws, device=device)
    lo, hi = procs.span(n)
    bounds = [lo + (hi - lo) * k // accum for k in range(accum + 1)]
    for group in state.opt.param_groups:
        group["lr"] = lr_at(state.step, cfg, cfg["steps"])
    total = torch.zeros((), device=device)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        x0 = data[idx[a:b]].to(device).float().div_(127.5).sub_(1).contiguous(memory_format=state.memory_format)
        if flips is not None:
            x0 = torch.where(flips[a:b, None, None, None], x0.flip(3), x0)
        quiet = state.net.no_sync() if world > 1 and k < accum - 1 else nullcontext()  # all-reduce once, at the end
        with quiet:
            with torch.autocast(**state.amp):
                per = process.loss(state.fwd, x0, cfg["loss"], t=t[a:b], noise=noise[a:b], reduction="none",
                                   **loss_options(cfg))
            state.scaler.scale(per.sum() * (world / n)).backward()
        total = total + per.detach().float().sum()
    if cfg["grad_clip"]:
        state.scaler.unscale_(state.opt)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg["grad_clip"])
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad(set_to_none=True)
    state.ema.update(state.model)
    state.step += 1
    return total, epoch


def check_health(bad, out, procs):
    """Before a save or a log line: a non-finite loss on any rank stops the run, naming its first step."""
    first = procs.min(bad.clone()).item()
    if first < math.inf:
        saved = (f"{out / 'ckpt.pt'} holds the last good state" if (out / "ckpt.pt").exists()
                 else "no checkpoint had been saved yet")
        raise UserError(f"loss is nan at step {int(first)}: training stopped; {saved} "
                        "(try a lower --lr, --grad-clip or no --amp)")


def loop(cfg, state, data, folder, measure_fid, procs, stop):
    """Steps until cfg["steps"] or Ctrl-C (under torchrun, the ranks agree at the next log step)."""
    total, log_every, world = cfg["steps"], cfg["log_every"], procs.world
    tty, t_last, n_last = sys.stderr.isatty(), time.perf_counter(), 0
    smooth, bad = None, torch.tensor(math.inf, device=procs.device)  # bad: the first step whose loss was not finite
    state.model.train()
    while state.step < total:
        loss_sum, epoch = train_step(state, data, cfg, procs)
        step, n = state.step, cfg["batch_size"]
        mean = loss_sum / n  # this rank's part of the global batch's mean loss
        smooth = mean if smooth is None else 0.98 * smooth + 0.02 * mean
        bad = torch.where(torch.isfinite(mean) | (bad < math.inf), bad, float(step - 1))
        n_last += n
        if step % log_every == 0 or step == total:
            check_health(bad, folder.out, procs)
            loss, smoothed, stops = procs.sum(torch.stack([mean, smooth, torch.tensor(float(bool(stop)),
                                                                                        device=mean.device)])).tolist()
            now = time.perf_counter()
            ips, t_last, n_last = n_last / (now - t_last), now, 0
            folder.log([step, epoch, f"{loss:.6f}", f"{state.opt.param_groups[0]['lr']:.3e}", f"{ips:.1f}"])
            line = progress_line(step, total, epoch, smoothed, ips, (total - step) * n / ips, world)
            if procs.main and tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            elif procs.main and (step % (log_every * 10) == 0 or step == total):
                print(line, file=sys.stderr, flush=True)
            if stops:
                stop.append(1)
                return
        elif world == 1 and stop:
            return
        if cfg["sample_every"] and (step % cfg["sample_every"] == 0 or step in (FIRST_GRID, total)):
            folder.grid(state)
        if measure_fid and (step % cfg["fid_every"] == 0 or step == total):
            measure_fid.measure(state, folder.out)
        if step % cfg["save_every"] == 0 or step == total:
            check_health(bad, folder.out, procs)
            save(state, folder, procs)


def save(state, folder, procs):
    """The checkpoint, refused when the weights are no longer finite (the same on every rank)."""
    if not all(torch.isfinite(p).all() for p in state.model.parameters()):
        raise UserError(f"the weights are no longer finite at step {state.step}; not saving over the last good "
                        f"{folder.out / 'ckpt.pt'} (try a lower --lr or --grad-clip)")
    folder.checkpoint(state)


def train(args, procs):
    cfg, out, resumed, device = setup(args, procs)
    data, per_epoch = load_data(cfg, device, procs)
    state = build(cfg, resumed, device, procs)
    if procs.main:
        describe(cfg, state, procs)
        if resumed:
            print(f"resumed {out} at step {state.step}", file=sys.stderr)
    folder = RunFolder(out, cfg, state.step, resumed is not None, procs, per_epoch)
    measure_fid = TrainingFID(cfg, data, procs) if cfg["fid_every"] else None
    stop = []

    def on_ctrl_c(*_):  # finish the step (under torchrun: until the ranks agree), save, leave
        if not stop and procs.main:
            when = "after this step" if procs.world == 1 else "at the next log line (every process)"
            print(f"\nCtrl-C: stopping {when}, then saving", file=sys.stderr, flush=True)
        stop.append(1)
    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        loop(cfg, state, data, folder, measure_fid, procs, stop)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    procs.barrier()
    if stop:
        save(state, folder, procs)
        if procs.main:
            print(f"\ninterrupted: saved {out / 'ckpt.pt'} at step {state.step}; continue with --resume {out}",
                  file=sys.stderr)
    elif procs.main:
        print(f"\ndone: {out / 'ckpt.pt'}; sample from it with: python sample.py {out}", file=sys.stderr)
    return state.step


def main(argv=None):
    args = parse_args(argv)
    procs = fid.Processes()
    try:
        train(args, procs)
    except (UserError, fid.FIDError, ValueError, OSError, fid.Stopped) as e:
        print(f"{procs.prefix('train.py')}error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # another process died: its own message says why
        lost = procs.lost_contact(e)
        if lost is None:
            raise
        print(f"{procs.prefix('train.py')}error: {lost}; the last checkpoint is intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop, which saves and exits by itself
        print("\ntrain.py: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
