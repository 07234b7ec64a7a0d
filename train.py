"""train.py: train a DDPM (Ho et al. 2020) on a folder of images, or on a built-in demo set.

    python train.py                                           # demo: coloured shapes at 32x32, CPU minutes
    python train.py --data ./faces --T 300 --schedule cosine --preset faces64 --image-size 64
    python train.py --data mnist/ --channels 1 --image-size 32 --no-flip   # a folder of MNIST's IDX files
    python train.py --data mnist/ --channels 1 --no-flip --process ve     # the VE score SDE (Song et al. 2021)
    python train.py --data mnist/ --channels 1 --no-flip --process flow   # flow matching, logit-normal t
    python train.py --data ./pets --class-cond                # pets/cat, pets/dog, ...: one class a subfolder
    python train.py --resume runs/faces                       # continue exactly where it stopped
    python train.py --init-from runs/mnist --data mnist/ --objective cd --steps 750 --out runs/mnist-cd
                                                              # distilled to 2 calls: sample.py --sampler cm
    torchrun --standalone --nproc_per_node 8 train.py --data ./faces --batch-size 256   # 8 GPUs, same run

A folder is searched recursively for images (and MNIST's IDX files); each is decoded once, its short
side resized and centre-cropped to --image-size, and kept in memory as uint8. --class-cond takes each
top-level subfolder as a class and trains one network for the conditional and the unconditional model
(Ho & Salimans 2022). The run folder (--out) gets config.json, ckpt.pt (written atomically; Ctrl-C
saves it), log.csv, loss.png and samples/step_NNNNNN.png grids drawn by the EMA model.
"""
import argparse
import copy
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from PIL import Image, ImageDraw

import cli
import ddpm
import fid
from cli import UserError

# ----------------------------------------------------------------------------------------------
# a run's settings: one table, from which the command line, the checks and the configuration follow


@dataclasses.dataclass(frozen=True)
class Setting:
    """One option of train.py and, unless stored=False, one key of the run's configuration (config.json
    and the checkpoint). model: the U-Net argument it sets, stored under config["model"]; None as the
    default takes the preset's (model settings) or the preset's recipe (lr, prediction, min_snr). valid:
    (test, words) for numbers. legacy: what a configuration saved before the setting existed means."""
    name: str
    default: object = None
    help: str = ""
    type: type = None
    choices: tuple = None
    valid: tuple = None
    model: str = None
    stored: bool = True
    legacy: object = None
    metavar: str = None


TEACHER_AUTOGUIDANCE = 2.0  # --objective cd's autoguided teacher: the student learns the guided ODE, whose samples
# (40 steps) on the MNIST flow run score best at 2 of 2, 2.5, 3.5 and 5; 10 steps are best at 2.5 (docs/consistency.md)


def at_least(n, why=""):
    return (lambda v: v >= n), f"at least {n}{why}"


S = Setting
SETTINGS = (
    S("data", help="image folder (searched recursively); none: the built-in demo shapes"),
    S("out", "runs/ddpm", "run folder"),
    S("resume", help="continue the run in this folder (its config wins)", metavar="RUN", stored=False),
    S("init_from", help="a new run from this run's weights (its EMA), model and process, with a fresh optimizer and "
      "this run's data, steps and recipe: fine-tuning, or --objective ect or cd", metavar="RUN"),
    S("init_raw", False, "--init-from: the run's raw weights rather than its EMA", legacy=False),
    S("objective", "denoise", "denoise: the diffusion model's loss; ect: Easy Consistency Tuning of --init-from's "
      "model (Geng et al. 2024); cd: consistency distillation of its guided sampler (Song et al. 2023); both for "
      "sample.py --sampler cm (docs/consistency.md)", choices=("denoise", "ect", "cd"), legacy="denoise"),
    S("teacher_guidance", help=f"cd: the teacher's guidance weight; None: autoguidance by --teacher-guide at "
      f"{TEACHER_AUTOGUIDANCE:g}, or classifier-free at --init-from's --sample-guidance; 1: the plain model",
      type=float, valid=at_least(0)),
    S("teacher_guide", help="cd: the teacher's autoguidance guide: a snapshot of --init-from's run (a fraction) or "
      f"another run; None: its snapshot at {cli.DEFAULT_GUIDE} for an unconditional run", metavar="SNAPSHOT_OR_RUN"),
    S("ect_stages", 4, "ect: stages of the mapping r/t = 1 - n(t) / 2^(stage + 1), evenly over --steps",
      valid=at_least(1), legacy=4),
    S("image_size", help="None: the preset's (32 tiny/cifar10, 64 faces64)", type=int, valid=at_least(1),
      model="image_size"),
    S("channels", 3, "1 for grayscale", choices=(1, 3), model="in_channels"),
    S("no_flip", False, "no random horizontal flips"),
    S("workers", min(4, os.cpu_count() or 1), "decoding processes", valid=at_least(0)),
    S("process", "ddpm", "ddpm (Ho et al.; also sampled as the VP SDE), ve: the variance-exploding SDE "
      "dx = sigma^t dw of Song et al. 2021, or flow: flow matching x_t = (1 - t) x_0 + t eps (rectified flow; "
      "docs/sde.md)", choices=tuple(ddpm.PROCESSES), legacy="ddpm"),
    S("sigma", 25.0, "ve: sigma of dx = sigma^t dw"),
    S("time_density", "logit-normal", "flow: the training times' density (Esser et al. 2024: logit-normal "
      "beats uniform)", choices=ddpm.FlowMatching.densities, legacy="logit-normal"),
    S("logit_mean", 0.0, "flow: the logit-normal's mean m, t = sigmoid(m + s n)", legacy=0.0),
    S("logit_scale", 1.0, "flow: the logit-normal's scale s", valid=((lambda v: v > 0), "a positive number"),
      legacy=1.0),
    S("T", 1000, "diffusion steps", valid=at_least(1)),
    S("schedule", help="None: linear (Ho et al.) at --T 1000, else rescaled-linear (docs/recipes.md)",
      choices=ddpm.SCHEDULES),
    S("beta_start", 1e-4, "linear schedules: beta_1 (Ho et al.)"),
    S("beta_end", 0.02, "linear schedules: beta_T (Ho et al.; rescaled-linear: x 1000/T)"),
    S("loss", "l2", "the distance of the prediction to its target (l2: Ho et al.'s L_simple)", choices=ddpm.LOSSES),
    S("class_cond", False, "class-conditional: each top-level subfolder of --data is a class (MNIST's IDX images "
      "take their labels file; the demo shapes their kind), and classifier-free guidance when sampling",
      legacy=False),
    S("label_dropout", 0.1, "class_cond: the share of labels replaced by the null class (Ho & Salimans 2022)",
      valid=((lambda v: 0 <= v < 1), "in [0, 1)")),
    S("sample_guidance", 1.5, "class_cond: the guidance scale of the grids and FID (1: the conditional model; "
      "docs/conditional.md)",
      valid=at_least(0)),
    S("prediction", help="what the network predicts (v: Salimans & Ho; velocity: eps - x_0, the flow's); None: "
      "the preset's recipe (ddpm), velocity (flow), eps (ve)", choices=ddpm.PREDICTIONS, legacy="eps"),
    S("min_snr", help="ddpm, flow: min-SNR-gamma loss weights (Hang et al. 2023; 5 is theirs; 0: off); None: the "
      "preset's recipe", type=float, valid=((lambda v: v >= 0), "a number >= 0 (0: off)"), legacy=0.0,
      metavar="GAMMA"),
    S("preset", "tiny", "the U-Net's size and its training recipe (README: the presets)",
      choices=tuple(sorted(ddpm.PRESETS)), stored=False),
    S("base_channels", help="channels at full resolution; None: the preset's", type=int, valid=at_least(1),
      model="base_channels"),
    S("channel_mults", help="e.g. 1,2,2", model="channel_mults"),
    S("num_res_blocks", help="residual blocks per resolution; None: the preset's", type=int, valid=at_least(1),
      model="num_res_blocks"),
    S("attn_resolutions", help="e.g. 16 or 16,8; 'none' for no attention", model="attn_resolutions"),
    S("num_heads", help="attention heads", type=int, valid=at_least(1), model="num_heads"),
    S("dropout", help="dropout in the residual blocks; None: the preset's", type=float, valid=at_least(0),
      model="dropout"),
    S("act", "silu", "activation", choices=("silu", "relu"), model="activation"),
    S("norm", "group", "normalisation: GroupNorm (Wu & He 2018) or BatchNorm", choices=("group", "batch"),
      model="norm"),
    S("norm_group_size", help="channels per GroupNorm group; 0: gcd(32, C) groups (Ho et al.'s 32 at their "
      "widths: the cifar10 and faces64 presets' rule); None: the preset's", type=int, valid=at_least(0),
      model="norm_group_size"),
    S("batch_size", 64, "the global batch: split evenly among torchrun's processes", valid=at_least(1)),
    S("grad_accum", 1, "micro-batches per process and step (same result, less memory)", valid=at_least(1),
      legacy=1),
    S("lr", help="peak learning rate; None: the preset's recipe", type=float,
      valid=((lambda v: v > 0), "a positive number")),
    S("warmup", 200, "linear warm-up steps", valid=at_least(0)),
    S("decay", "cosine", "learning-rate decay to 10%% after warm-up", choices=("cosine", "none")),
    S("grad_clip", 1.0, "max gradient norm (0: off)", valid=at_least(0)),
    S("ema_decay", 0.999, "decay of the weights' exponential moving average, which samples",
      valid=((lambda v: 0 <= v < 1), "in [0, 1)")),
    S("steps", help="optimizer steps; None: 1500 on the demo set, else --epochs worth", type=int, valid=at_least(1)),
    S("epochs", 100, "passes over --data when --steps is not given", valid=at_least(1)),
    S("amp", "auto", "mixed precision: autocast to bf16 (CPU or CUDA) or fp16 (CUDA), with float32 weights, "
      "optimizer and EMA; fp32: none; auto: bf16 where the device computes it natively (on a CPU, when a timed "
      "step is also faster), else fp32 (docs/performance.md)", choices=cli.AMP, legacy="fp32"),
    S("compile", False, "torch.compile the model"),
    S("channels_last", False, "channels_last memory format (docs/performance.md: faster on some models)",
      legacy=False),
    S("snapshots", "1/16,1/8,1/4", "fractions of --steps at which the EMA weights are kept as snapshots/"
      "<a>-<b>.pt, the guides of autoguidance (sample.py --guide 1/16; Karras et al. 2024); 'none': none",
      legacy="none"),
    S("seed", 0, "seed of the weights, the batches, the noise and the grids"),
    S("device", "cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda or cuda:N"),
    S("sample_every", 500, "steps between sample grids (0: off)", valid=at_least(0)),
    S("sample_n", 36, "samples in each grid", valid=at_least(1)),
    S("sample_steps", 20, "SDE-DPM-Solver++ steps for the grids and FID", valid=at_least(1)),
    S("save_every", 500, "steps between checkpoints (and one at the end)", valid=at_least(1)),
    S("log_every", 10, "steps between lines of log.csv", valid=at_least(1)),
    S("fid_every", 0, "steps between FIDs against the training set (0: off)", valid=at_least(0)),
    S("fid_samples", 1000, "samples (and training images) of each --fid-every FID",
      valid=at_least(2, " (a covariance)")),
)
LEGACY = {s.name: s.legacy for s in SETTINGS if s.legacy is not None}
# Training defaults by preset. The tiny preset's recipe was measured on MNIST at a budget of 15
# CPU-minutes (docs/recipes.md); the other presets keep Ho et al.'s, which these flags also restore
# for tiny: --lr 2e-4 --prediction eps --min-snr 0 --schedule linear (and --norm-group-size 0 their
# GroupNorm rule).
RECIPES = {"ho": dict(lr=2e-4, prediction="eps", min_snr=0.0),
           "tiny": dict(lr=1e-3, prediction="eps", min_snr=5.0)}
SCHEDULE_AT_OTHER_T = "rescaled-linear"  # the default schedule when --T is not 1000 (docs/recipes.md)
FIRST_GRID = 400  # a grid this early too: the CPU demo's shapes are recognisable by then (about 2 minutes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        if s.default is False:
            p.add_argument(flag, action="store_true", help=s.help)
        else:
            kind = s.type or (type(s.default) if s.default is not None else str)
            p.add_argument(flag, type=kind, default=s.default, choices=s.choices, help=s.help, metavar=s.metavar)
    return cli.expand_home(p.parse_args(argv))


def check_args(args):
    """Numbers, the device and the run folder, checked before any data is read: one UserError line. Returns
    --init-from's configuration (None without), read once here for the notes and the run's configuration."""
    for s in SETTINGS:
        value = getattr(args, s.name)
        if s.valid and value is not None and not (math.isfinite(value) and s.valid[0](value)):
            raise UserError(f"--{s.name.replace('_', '-')} must be {s.valid[1]}, got {value}")
    process = ddpm.PROCESSES[args.process]
    if args.prediction not in (None, *process.predictions):
        raise UserError(f"--prediction {args.prediction} does not apply to --process {args.process}; it trains "
                        f"{', '.join(process.predictions)}")
    if args.min_snr and not process.weighted:
        raise UserError(f"--min-snr does not apply to --process {args.process}: its loss is unweighted")
    if args.objective in cli.CONSISTENCY_OBJECTIVES and not (args.init_from or args.resume):
        raise UserError(f"--objective {args.objective} tunes a trained run into a consistency model: give --init-from "
                        "RUN")
    if args.init_from and args.resume:
        raise UserError("--init-from starts a new run; --resume continues one: give one of them")
    if args.data and not args.resume and Path(args.out).resolve().is_relative_to(Path(args.data).resolve()):
        raise UserError(f"--out {args.out} is inside --data {args.data}: its grids would become training images")
    device = cli.check_device(args.device)
    if args.amp != "auto":  # fp16 off CUDA: one line now (auto is decided by a timing once the model exists)
        cli.choose_amp(args.amp, device, None)
    snapshot_fractions(args.snapshots)
    base = cli.read_checkpoint(args.init_from)["config"] if args.init_from else None
    if not args.resume:
        note_unused_options(args, base)
    return base


def note_unused_options(args, base=None):
    """A note for each option given that has no effect on this run, and for guided grids of a class-conditional
    run whose null label is never trained (--label-dropout 0). base: --init-from's configuration, whose process
    the run keeps."""
    defaults = vars(parse_args([]))
    process = args.process if base is None else base.get("process", LEGACY["process"])
    process_options = [(name, process == p.name, f"--process {p.name}")
                       for p in ddpm.PROCESSES.values() for name in p.options if name in defaults]
    consistency = [(name, args.objective in objectives, why) for name, objectives, why in (
        ("ect_stages", cli.CONSISTENCY_OBJECTIVES, "--objective ect or cd"),
        ("teacher_guidance", ("cd",), "--objective cd"),
        ("teacher_guide", ("cd",), "--objective cd"))]
    for name, applies, why in (("label_dropout", args.class_cond, "--class-cond"),
                               ("sample_guidance", args.class_cond, "--class-cond"), *process_options, *consistency):
        if not applies and getattr(args, name) != defaults[name]:
            print(f"note: --{name.replace('_', '-')} has no effect without {why}", file=sys.stderr)
    if args.class_cond and args.label_dropout == 0 and args.sample_guidance != 1:
        print(f"note: --label-dropout 0 leaves the null label untrained, and the grids use classifier-free guidance "
              f"{args.sample_guidance:g}, which needs it: --sample-guidance 1, or a --label-dropout above 0",
              file=sys.stderr)


def snapshot_fractions(spec):
    """--snapshots as {name: fraction}: 'none', or comma-separated fractions a/b (or decimals) in (0, 1)."""
    if spec == "none":
        return {}
    fractions = {}
    for item in spec.split(","):
        try:
            value = eval_fraction(item)
        except (ValueError, ZeroDivisionError):
            value = math.nan
        if not 0 < value < 1:  # nan too
            raise UserError(f"--snapshots takes fractions of the run in (0, 1) such as 1/16,1/4, or none; got {item!r}")
        fractions[item.strip()] = value
    return fractions


def eval_fraction(text):
    """'1/16' -> 0.0625, '0.25' -> 0.25 (ValueError for anything else)."""
    num, _, den = text.strip().partition("/")
    value = float(num) / float(den) if den else float(num)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def snapshot_steps(cfg):
    """{step: [names]} of the run's snapshots: round(fraction x steps), at least step 1 (short runs may keep
    several fractions at one step)."""
    steps = {}
    for name, f in snapshot_fractions(cfg["snapshots"]).items():
        steps.setdefault(max(1, round(f * cfg["steps"])), []).append(name)
    return steps


def snapshot_path(out, name):
    """Where the snapshot at fraction `name` ('1/16') is kept: RUN/snapshots/1-16.pt."""
    return Path(out) / "snapshots" / f"{name.replace('/', '-')}.pt"


RUN_FILES = ("config.json", "log.csv", "loss.png", "fid.csv", "samples", "snapshots", ".lock")  # what a run folder holds


LOG_HEADER = ["step", "epoch", "loss", "lr", "images_per_s"]


def never_saved(out):
    """True for a run folder that holds train.py's files alone and no checkpoint: a run killed before its
    first save (its temporary checkpoint file included), which a new run may take over. Its config.json
    and log.csv must be train.py's, its grids PNGs that this toolkit wrote."""
    try:
        cfg = json.loads((out / "config.json").read_text())
        header = (out / "log.csv").read_text().splitlines()[:1]
    except (OSError, ValueError):
        return False
    if not (isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and {"T", "seed", "lr"} <= cfg.keys()
            and header == [",".join(LOG_HEADER)]):
        return False
    ours = all(p.name in RUN_FILES or p.name.startswith(".ckpt.pt.") for p in out.iterdir())
    return ours and all(cli.written_by_us(p) for p in (out / "samples").glob("*")) and all(
        is_snapshot(p) for p in (out / "snapshots").glob("*"))


def is_snapshot(path):
    """Whether path is a snapshot that train.py wrote (RunFolder.snapshot), read safely."""
    try:
        return "snapshot" in torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False


def prepare_out(out):
    """A new run's folder, claimed by this process (cli.FolderLock): created if missing; refused when it is a
    file, holds a run, is in use, or holds anything else (a folder of the user's: we would overwrite its
    config.json and log.csv). A run that never saved a checkpoint is started again."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder")
    if (out / "ckpt.pt").exists():
        raise UserError(f"{out} holds a run already: --resume {out}, or choose another --out")
    if out.is_dir() and any(out.iterdir()) and not never_saved(out):
        raise UserError(f"--out {out}: the folder is not empty and is not a run of train.py; choose a new one")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = cli.FolderLock(out, "train.py")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    for p in out.iterdir():  # what a run that never saved left
        if p.name != ".lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return lock


def resume_out(out):
    """The resumed run's folder, claimed (cli.FolderLock), without the temporary files of a killed write."""
    lock = cli.FolderLock(out, "train.py")
    cli.remove_leftovers(out)
    return lock


def model_config(args):
    """The U-Net's arguments: the preset's, then the model settings given on the command line."""
    cfg = dict(ddpm.PRESETS[args.preset])
    try:
        for s in SETTINGS:
            value = getattr(args, s.name)
            if s.model and value is not None:
                if s.name == "channel_mults" or (s.name == "attn_resolutions" and value != "none"):
                    value = [int(m) for m in value.split(",")]
                cfg[s.model] = [] if value == "none" else value
    except ValueError:
        raise UserError("--channel-mults and --attn-resolutions take comma-separated integers") from None
    if cfg.get("norm_group_size") == 0:  # the old rule, which a model config spells None
        cfg["norm_group_size"] = None
    if not args.attn_resolutions:  # the preset's attention where this image size has that resolution
        levels = ddpm.unet_resolutions(cfg["image_size"], cfg["channel_mults"])
        dropped = [r for r in cfg["attn_resolutions"] if r not in levels]
        cfg["attn_resolutions"] = [r for r in cfg["attn_resolutions"] if r in levels]
        if dropped:
            print(f"note: the {args.preset} preset's attention at {dropped} does not exist at {cfg['image_size']} px "
                  f"(resolutions {levels}); --attn-resolutions sets it", file=sys.stderr)
    if ddpm.PROCESSES[args.process].model_time_scale != 1:  # t in [0, 1]: see UNet.forward
        cfg["time_scale"] = ddpm.PROCESSES[args.process].model_time_scale
    ddpm.UNet(**cfg)  # raises ValueError for an impossible architecture, before any work
    return cfg


def check_memory(run, model):
    """Refuse an image size and batch whose first feature map alone, B x base_channels x size^2 floats, is
    larger than this machine's memory (or the CUDA device's): a lower bound of what training needs."""
    device = torch.device(run["device"])
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    need = 4 * run["batch_size"] * model["base_channels"] * model["image_size"] ** 2
    if need > have:
        raise UserError(f"--image-size {model['image_size']} with --batch-size {run['batch_size']}: the first feature "
                        f"map alone needs {need / 2**30:.0f} GiB and this {device.type} has {have / 2**30:.0f} GiB")


def run_config(args, base=None):
    """The run's configuration from the command line: the stored settings, None filled from the preset's
    recipe, and the model's arguments under "model". base: --init-from's configuration (read here if not given)."""
    run = {s.name: getattr(args, s.name) for s in SETTINGS if s.stored and not s.model}
    run["channels"] = args.channels  # at the top level too, as configurations have always had it
    if args.data:  # absolute, so that --resume works from any directory
        run["data"] = str(Path(args.data).resolve())
    recipe = dict(RECIPES.get(args.preset, RECIPES["ho"]))
    recipe.update(ddpm.PROCESSES[args.process].recipe)  # what the process fixes (ve: eps, unweighted)
    for key, value in recipe.items():
        if run[key] is None:
            run[key] = value
    if run["schedule"] is None:
        run["schedule"] = "linear" if run["T"] == 1000 else SCHEDULE_AT_OTHER_T
    if run["schedule"] in ("linear", "rescaled-linear") and not 0 < args.beta_start < args.beta_end < 1:
        raise UserError(f"the {run['schedule']} schedule needs 0 < --beta-start < --beta-end < 1, got "
                        f"{args.beta_start} and {args.beta_end}")
    model = model_config(args)
    check_memory(run, model)
    if args.class_cond:  # the classes, from the folder's listing: no image is decoded yet
        run["classes"] = cli.find_classes(args.data) if args.data else list(cli.DEMO_CLASSES)
        model["num_classes"] = len(run["classes"])
        ddpm.UNet(**model)
    if args.init_from and base is None:
        base = cli.read_checkpoint(args.init_from)["config"]
    if base is not None:
        run, model = inherit(args, run, model, base)
    process = ddpm.make_process(run)  # raises ValueError for an impossible process
    if run["objective"] == "cd":
        run |= teacher_settings(args, run, process, base)
    return run | {"model": model}


def teacher_settings(args, run, process, base):
    """--objective cd: the teacher's guide (a checkpoint's absolute path, or None), weight and interval, resolved
    as sample.py resolves them for --init-from's run but for the autoguidance weight: autoguidance by its snapshot
    at the default guide where it kept one (at TEACHER_AUTOGUIDANCE, not the process's sampling weight),
    classifier-free guidance at its --sample-guidance for a class-conditional run, else unguided. base: that
    run's configuration."""
    cond, w = run["class_cond"], args.teacher_guidance
    guide = None
    if args.teacher_guide is not None or (not cond and w != 1):
        guide = cli.find_guide(args.init_from, args.teacher_guide, "--teacher-guide")
    if guide is None and not cond:
        if w not in (None, 1):
            raise UserError(f"--teacher-guidance {w:g}: --init-from {args.init_from} is unconditional and kept no "
                            f"snapshot at {cli.DEFAULT_GUIDE}: name a guide with --teacher-guide")
        if w is None:
            print(f"note: --init-from {args.init_from} kept no snapshot at {cli.DEFAULT_GUIDE}: the teacher is "
                  "unguided", file=sys.stderr)
        w = 1.0
    if guide is not None:  # the same images, classes and process, or one line now
        cli.load_guide(guide, base, process, "cpu", "--teacher-guide")
    if w is None:
        w = TEACHER_AUTOGUIDANCE if guide else base["sample_guidance"]
    return {"teacher_guide": None if guide is None else str(guide.resolve()), "teacher_guidance": w,
            "teacher_interval": list(cli.AUTOGUIDANCE_INTERVAL) if guide else None}


INHERITED = ("process", "sigma", "time_density", "logit_mean", "logit_scale", "T", "schedule", "beta_start",
             "beta_end", "prediction", "min_snr", "class_cond", "channels")  # what --init-from's run fixes
TRAINING_CHOICES = ("time_density", "logit_mean", "logit_scale", "min_snr")  # inherited unless given: the model's
# meaning and the sampling process do not depend on them


def inherit(args, run, model, base):
    """--init-from RUN: the run's model and process settings (INHERITED, the U-Net's arguments, the classes) over
    this run's; one given here that differs from the run's is refused, naming both, except TRAINING_CHOICES
    (the density of training times, the loss weights), which a setting given here replaces. base: RUN's
    configuration."""
    defaults = vars(parse_args([]))
    given = {s.name: getattr(args, s.name) for s in SETTINGS if getattr(args, s.name) != defaults[s.name]}
    for s in SETTINGS:
        if s.name not in given or not (s.model or s.name in INHERITED):
            continue
        key, (theirs, mine) = s.model or s.name, (base["model"], model) if s.model else (base, run)
        if key in theirs and json.dumps(mine[key]) != json.dumps(theirs[key]) and key not in TRAINING_CHOICES:
            raise UserError(f"--{s.name.replace('_', '-')} {given[s.name]}: --init-from {args.init_from} has "
                            f"{theirs[key]}, and a run started from another keeps its model and process")
    kept = [k for k in INHERITED if not (k in TRAINING_CHOICES and k in given)]
    run = run | {k: base.get(k, LEGACY.get(k)) for k in kept} | {"init_from": str(Path(args.init_from).resolve())}
    if base.get("classes"):
        run["classes"], found = base["classes"], cli.find_classes(args.data) if args.data else base["classes"]
        if found != base["classes"]:
            raise UserError(f"--data {args.data}: its classes {found} are not those of --init-from {args.init_from} "
                            f"({base['classes']})")
    return run, dict(base["model"])


def loss_options(cfg):
    """The keyword arguments of the run's loss beyond its type."""
    return {"prediction": cfg["prediction"], "min_snr": cfg["min_snr"] or None}


def draw(cfg, model, process, shape, generator, labels=None):
    """Samples for grids and FID during training: the command line's default sampler, SDE-DPM-Solver++ of the
    process's default order (docs/samplers.md), with sample_steps calls from the network `model` (a consistency
    run of --objective ect or cd: its own sampler, two calls), guided at sample_guidance when labels are given."""
    net = ddpm.sampling_model(model, process, cfg)
    if labels is not None:
        net = ddpm.Guided(net, labels, cfg["sample_guidance"], cfg["model"]["num_classes"], process=process)
    if cfg.get("objective") in cli.CONSISTENCY_OBJECTIVES:  # a consistency model: two calls
        return ddpm.sample(process, net, "cm", shape, steps=2, generator=generator)
    return ddpm.sample(process, net, "dpm++", shape, steps=cfg["sample_steps"], generator=generator)


def ect_stage(step, cfg):
    """The stage of ECT's mapping at `step`: --ect-stages of them, evenly over the run's steps."""
    return min(step * cfg["ect_stages"] // cfg["steps"], cfg["ect_stages"] - 1)


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
    base = check_args(args)
    device = procs.start(args.device)
    resumed = None
    if args.resume:
        resumed = cli.load_checkpoint(args.resume, device)
        cfg, out = LEGACY | resumed[0]["config"], Path(args.resume)
        out = out.parent if out.is_file() else out  # --resume RUN or RUN/ckpt.pt, as sample.py
        note_edited_config(out, resumed[0]["config"], procs)
        if args.steps:  # what a resume may change: how long to go on, and how the batch is split
            cfg["steps"] = args.steps
        cfg["grad_accum"] = args.grad_accum
        kept = ("resume", "steps", "device", "grad_accum", *moved_data(cfg, args, procs))
        defaults = vars(parse_args([]))
        ignored = [k for k, v in vars(args).items() if k not in kept and v != defaults[k]]
        if ignored and procs.main:
            print(f"note: {', '.join('--' + k.replace('_', '-') for k in ignored)} ignored: a resumed run keeps "
                  f"its configuration (only --steps, --grad-accum and --device apply)", file=sys.stderr)
    else:
        cfg, out = run_config(args, base), Path(args.out)
    cfg["world_size"] = procs.world
    check_split(cfg)
    locks = []  # rank 0's claim on the run folder, released when the run ends
    claim = (lambda: locks.append(resume_out(out))) if args.resume else (lambda: locks.append(prepare_out(out)))
    procs.agree(claim)
    return cfg, out, resumed, device, locks


def moved_data(cfg, args, procs):
    """("data",) when the resumed run's data folder is gone and --data gives its new place (cfg["data"] set to
    it); () when it is where it was. Gone with no --data: one line, before any work."""
    if not cfg.get("data") or Path(cfg["data"]).is_dir():
        return ()
    if not args.data:
        raise UserError(f"--resume {args.resume}: its data {cfg['data']} is gone (moved?); give its new place "
                        f"with --data")
    if procs.main:
        print(f"note: the run's data {cfg['data']} is gone; reading {args.data}, which must hold the same images for "
              "the run to go on as it would have", file=sys.stderr)
    cfg["data"] = str(Path(args.data).resolve())
    return ("data",)


def note_edited_config(out, cfg, procs):
    """A config.json edited since the checkpoint was saved: the checkpoint's configuration is the run's."""
    try:
        edited = json.loads((out / "config.json").read_text()) != json.loads(json.dumps(cfg))
    except (OSError, ValueError):  # removed or damaged: it is written again
        edited = (out / "config.json").exists()
    if edited and procs.main:
        print(f"note: {out / 'config.json'} differs from the configuration saved in the checkpoint, which the run "
              "keeps (and writes back); a resume takes --steps, --grad-accum and --device", file=sys.stderr)


def check_split(cfg):
    """The global batch must split evenly into world_size x grad_accum equal parts."""
    batch, world, accum = cfg["batch_size"], cfg["world_size"], cfg["grad_accum"]
    if batch % (world * accum):
        raise UserError(f"--batch-size {batch} is the global batch: it does not split evenly among {world} "
                        f"process{'es' * (world > 1)} x {accum} micro-batch{'es' * (accum > 1)} (--grad-accum)")
    if world * accum > 1 and cfg["model"]["norm"] == "batch":
        raise UserError("--norm batch with several processes or --grad-accum: its statistics would depend on how "
                        "the batch is split; use --norm group")


def batch_indices(n, batch_size, step, seed):
    """Indices of the batch at `step`: epochs are seeded permutations, so the order is a pure
    function of (seed, step) and a resumed run sees exactly the batches it would have seen."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size], epoch


def load_data(cfg, device, procs):
    """The training images (uint8, on the device when they fit in memory) with their labels (class_cond)
    as cli.Labelled, and the steps an epoch."""
    size, channels = cfg["model"]["image_size"], cfg["model"]["in_channels"]
    if cfg["data"]:
        data = cli.load_images(cfg["data"], size, channels, cfg["workers"], labelled=cfg["class_cond"])
    else:
        data = cli.demo_images(size=size, channels=channels, seed=cfg["seed"])
    images, labels = data.images, data.labels if cfg["class_cond"] else None
    if isinstance(images, torch.Tensor):
        images = images.to(device)
    if labels is not None:
        if data.classes != cfg["classes"]:
            raise UserError(f"--data {cfg['data']}: its classes are no longer the run's {cfg['classes']}")
        cfg["class_counts"] = torch.bincount(labels, minlength=len(data.classes)).tolist()
        labels = labels.to(device)
    per_epoch = max(len(images) // cfg["batch_size"], 1)
    if not cfg["steps"]:
        cfg["steps"] = 1500 if not cfg["data"] else cfg["epochs"] * per_epoch
    if procs.main:
        print(f"data: {len(images)} images {channels}x{size}x{size} from {cfg['data'] or 'the built-in demo shapes'}; "
              f"{per_epoch} steps an epoch, {cfg['steps']} steps", file=sys.stderr)
        if labels is not None:
            print("classes: " + ", ".join(f"{c} {n}" for c, n in zip(cfg["classes"], cfg["class_counts"])),
                  file=sys.stderr)
    return cli.Labelled(images, labels, data.classes), per_epoch


def build(cfg, resumed, device, procs):
    """The model (new, or from the checkpoint), its EMA, the process, the optimiser, the loss scaler
    and `draws`, the generator of every step's flips, timesteps and noise; the step to start from."""
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    if resumed:
        ckpt, model, ema, process = resumed
    else:
        model = ddpm.UNet(**cfg["model"]).to(device)
        if cfg.get("init_from"):
            base = cli.read_checkpoint(cfg["init_from"], device)
            model.load_state_dict(base["model"] if cfg["init_raw"] else base["ema"]["model"])
        ema = ddpm.EMA(model, cfg["ema_decay"])
        process = ddpm.make_process(cfg).to(device)
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
    cfg["amp"] = resolve_amp(cfg, model, process, device, procs)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model.to(memory_format=memory_format)
    net = model
    if procs.world > 1:  # gradients averaged across ranks in backward; no buffers to keep in step
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
    return SimpleNamespace(
        model=model, ema=ema, process=process, opt=opt, draws=draws, step=step, net=net,
        fwd=torch.compile(net) if cfg["compile"] else net, memory_format=memory_format,
        autocast=lambda: cli.autocast(cfg["amp"], device),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16"),
        teacher=teacher(cfg, process, device) if cfg.get("objective") == "cd" else None)


def teacher(cfg, process, device):
    """--objective cd: teacher(x, t, y) -> (x0_hat, eps_hat) of --init-from's EMA model, guided as
    teacher_settings resolved, choosing per sample on the device (a training batch mixes times)."""
    ckpt, net, _ = cli.load_run(cfg["init_from"], device)
    guide = None
    if cfg["teacher_guide"]:
        guide = cli.load_guide(cfg["teacher_guide"], ckpt["config"], process, device, "--teacher-guide")[0]
    interval, null = cfg["teacher_interval"], cfg["model"].get("num_classes")

    def predict(x, t, y):
        return ddpm.Guided(net, y, cfg["teacher_guidance"], null, guide=guide, process=process, per_sample=True,
                           interval=None if interval is None else tuple(interval)).predict(x, t)
    return predict


def resolve_amp(cfg, model, process, device, procs):
    """The run's --amp as it will train (cli.choose_amp): a resumed run keeps the choice its configuration
    records (None, from before auto existed: fp32). Under torchrun bf16 is taken only when every process
    chose it, so that all compute alike."""
    if cfg["amp"] != "auto":
        return cli.choose_amp(cfg["amp"] or "fp32", device, None)[0]
    m, n = cfg["model"], min(cfg["batch_size"] // procs.world, 16)
    probe = copy.deepcopy(model).train()
    x0 = torch.randn((n, m["in_channels"], m["image_size"], m["image_size"]), device=device,
                     generator=torch.Generator(device).manual_seed(0))
    t = process.train_t(n, generator=torch.Generator(device).manual_seed(0), device=device)

    def seconds(amp):  # one forward and backward of a copy, on noise; the training's random states untouched
        with torch.random.fork_rng(devices=[]):
            start = time.perf_counter()
            with cli.autocast(amp, device):
                loss = process.loss(probe, x0, t=t, noise=x0, **loss_options(cfg))
            loss.backward()
            return time.perf_counter() - start
    choice, why = cli.choose_amp("auto", device, seconds)
    if procs.world > 1:
        choice = "bf16" if procs.min(torch.tensor([float(choice == "bf16")], device=device)).item() else "fp32"
    if why and procs.main:
        print(why if procs.world == 1 else f"{why}; with every process: {choice}", file=sys.stderr)
    return choice


def describe(cfg, state, procs):
    """What rank 0 says about the model, the process and the split of the batch before training."""
    print(f"model: {ddpm.count_params(state.model) / 1e6:.2f} M parameters", file=sys.stderr)
    process = state.process
    print(f"process: {process!r}", file=sys.stderr)
    a_T = process.alphas_cumprod64[-1].item() if hasattr(process, "alphas_cumprod64") else 0.0
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
    cli.atomic_write(png_path, lambda tmp: im.save(tmp, format="PNG"))


class RunFolder:
    """The run folder, written by rank 0 alone: config.json, log.csv (rows after the checkpoint's step
    dropped on resume), ckpt.pt (atomic), loss.png, samples/step_NNNNNN.png and fid.csv."""

    def __init__(self, out, cfg, step, resumed, procs, per_epoch):
        self.out, self.cfg, self.main, self.log_path = out, cfg, procs.main, out / "log.csv"
        self.per_epoch = per_epoch
        if not self.main:
            return
        (out / "samples").mkdir(parents=True, exist_ok=True)
        cli.atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(cfg, indent=2) + "\n"))
        rows = []
        if resumed and self.log_path.exists():
            with open(self.log_path) as f:
                rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= step]

        def write_log(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([LOG_HEADER, *rows])
        cli.atomic_write(self.log_path, write_log)

    def log(self, row):
        if self.main:  # appended whole: a full disk leaves log.csv as it was
            line = io.StringIO()
            csv.writer(line).writerow(row)
            cli.append_whole(self.log_path, line.getvalue().encode())

    def checkpoint(self, state):
        if not self.main:
            return
        rng = {"cpu": torch.get_rng_state(), "draws": state.draws.get_state(),
               "cuda": torch.cuda.get_rng_state() if state.draws.device.type == "cuda" else None}
        cli.save_checkpoint(self.out / "ckpt.pt", {
            "model": state.model.state_dict(), "ema": state.ema.state_dict(), "optimizer": state.opt.state_dict(),
            "step": state.step, "epoch": state.step // self.per_epoch, "config": self.cfg, "rng": rng})
        plot_loss(self.log_path, self.out / "loss.png")

    def snapshot(self, state, name):
        """The EMA weights at this step, as a checkpoint that ddpm.load and sample.py --guide read."""
        if self.main:
            path = snapshot_path(self.out, name)
            path.parent.mkdir(exist_ok=True)
            cli.save_checkpoint(path, {"ema": state.ema.state_dict(), "step": state.step, "snapshot": name,
                                       "config": self.cfg})

    def grid(self, state):
        """sample_n EMA samples; for a class-conditional run, one row per class (the first 16 classes)."""
        if not self.main:
            return
        cfg, m, labels, nrow = self.cfg, self.cfg["model"], None, None
        g = torch.Generator(state.draws.device).manual_seed(cfg["seed"])  # its own: training draws untouched
        n = cfg["sample_n"]
        if cfg["class_cond"]:
            rows = min(m["num_classes"], 16)
            nrow = max(n // rows, 1)
            labels = torch.arange(rows, device=g.device).repeat_interleave(nrow)
            n = len(labels)
        x = draw(cfg, state.ema.model, state.process, (n, m["in_channels"], m["image_size"], m["image_size"]), g,
                 labels)
        cli.save_grid(x, self.out / "samples" / f"step_{state.step:06d}.png", nrow=nrow)


class TrainingFID:
    """FID of --fid-samples EMA samples against as many training images. Every rank draws and embeds
    its share (sample i's noise from (seed + 1, i)); rank 0 gathers the features and writes fid.csv.
    Without Inception weights: one note, then off."""

    def __init__(self, cfg, data, procs):
        self.cfg, self.data, self.procs, self.net, self.ref, self.off = cfg, data.images, procs, None, None, False
        n = cfg["fid_samples"]  # class-conditional: labels drawn with the data's class frequencies
        self.labels = cli.frequency_labels(cfg["class_counts"], n, cfg["seed"] + 1) if cfg["class_cond"] else None

    def features(self, images):
        return torch.from_numpy(fid.get_activations(images.split(50), self.net)[0])

    def start(self):
        try:
            self.net = fid.load_inception(device=self.procs.device)
        except cli.UserError as e:
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
        lo, hi = self.procs.span(cfg["fid_samples"], 100)
        labels = lambda i: None if self.labels is None else self.labels[i:min(i + 100, hi)].to(device)
        xs = [draw(cfg, state.ema.model, state.process, (min(100, hi - i), m["in_channels"], m["image_size"],
                                                          m["image_size"]),
                   ddpm.sample_generators(cfg["seed"] + 1, range(i, min(i + 100, hi)), device), labels(i))
              for i in range(lo, hi, 100)]
        mine = self.features(cli.to_uint8(torch.cat(xs))) if xs else torch.zeros(0, 2048, dtype=torch.float64)
        feats = self.procs.gather(mine)
        if self.procs.main:
            value = fid.frechet_distance(*fid.activation_statistics(feats.numpy()), *self.ref)
            cli.append_whole(out / "fid.csv", f"{state.step},{value:.4f}\n".encode())
            print(f"\nstep {state.step}: FID {value:.2f} ({cfg['fid_samples']} samples)", file=sys.stderr)

# ----------------------------------------------------------------------------------------------
# one step, and the loop


def train_step(state, data, cfg, procs):
    """One optimiser step on the global batch of state.step. Every rank draws the whole batch's flips,
    timesteps, noise and dropped labels from state.draws and takes its share, and --grad-accum splits the share into
    micro-batches, so the result does not depend on either. The loss is sum(per-sample) x world / batch:
    DDP averages over the world, giving the gradient of the mean over the global batch.
    Returns this rank's sum of per-sample losses (on the device: no host sync) and the epoch."""
    device, process, world, accum = procs.device, state.process, procs.world, cfg["grad_accum"]
    idx, epoch = batch_indices(len(data.images), cfg["batch_size"], state.step, cfg["seed"])
    n, (c, s) = len(idx), (cfg["model"]["in_channels"], cfg["model"]["image_size"])
    flips = None if cfg["no_flip"] else torch.rand(n, generator=state.draws, device=device) < 0.5
    t = process.train_t(n, generator=state.draws, device=device)
    noise = torch.randn((n, c, s, s), generator=state.draws, device=device)
    y = None if data.labels is None else ddpm.drop_labels(data.labels[idx.to(data.labels.device)], cfg["label_dropout"],
                                                          cfg["model"]["num_classes"], state.draws)
    lo, hi = procs.span(n)
    bounds = [lo + (hi - lo) * k // accum for k in range(accum + 1)]
    for group in state.opt.param_groups:
        group["lr"] = lr_at(state.step, cfg, cfg["steps"])
    total = torch.zeros((), device=device)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        x0 = data.images[idx[a:b]].to(device).float().div_(127.5).sub_(1).contiguous(memory_format=state.memory_format)
        if flips is not None:
            x0 = torch.where(flips[a:b, None, None, None], x0.flip(3), x0)
        quiet = state.net.no_sync() if world > 1 and k < accum - 1 else nullcontext()  # all-reduce once, at the end
        with quiet:
            with state.autocast():
                kw = dict(t=t[a:b], noise=noise[a:b], reduction="none", y=None if y is None else y[a:b])
                if cfg.get("objective") in cli.CONSISTENCY_OBJECTIVES:
                    per = process.consistency_loss(state.fwd, x0, ect_stage(state.step, cfg), cfg["loss"], **kw,
                                                   **loss_options(cfg), teacher=state.teacher)
                else:
                    per = process.loss(state.fwd, x0, cfg["loss"], **kw, **loss_options(cfg))
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
    snapshots = snapshot_steps(cfg)
    state.model.train()
    while state.step < total:
        loss_sum, epoch = train_step(state, data, cfg, procs)
        step, n = state.step, cfg["batch_size"]
        mean = loss_sum / n  # this rank's part of the global batch's mean loss
        smooth = mean if smooth is None else 0.98 * smooth + 0.02 * mean
        bad = torch.where(torch.isfinite(mean) | (bad < math.inf), bad, float(step - 1))
        n_last += n
        for name in snapshots.get(step, ()):  # before a stop can end the loop: a resume starts past this step
            folder.snapshot(state, name)
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
    cfg, out, resumed, device, locks = setup(args, procs)
    try:
        data, per_epoch = load_data(cfg, device, procs)
        state = build(cfg, resumed, device, procs)
        if procs.main:
            describe(cfg, state, procs)
            if resumed:
                print(f"resumed {out} at step {state.step}", file=sys.stderr)
        folder = RunFolder(out, cfg, state.step, resumed is not None, procs, per_epoch)
        return run_loop(cfg, state, data, folder, procs)
    finally:
        for lock in locks:
            lock.release()


def run_loop(cfg, state, data, folder, procs):
    """The loop, with Ctrl-C (and, in one process, SIGTERM) finishing the step, saving and leaving; under
    torchrun the ranks agree on the step to stop at, and torchrun's SIGTERM ends a process at once."""
    measure_fid, stop, out = TrainingFID(cfg, data, procs) if cfg["fid_every"] else None, [], folder.out

    def on_signal(signum, _):  # finish the step (under torchrun: until the ranks agree), save, leave
        if not stop and procs.main:
            when = "after this step" if procs.world == 1 else "at the next log line (every process)"
            print(f"\n{signal.Signals(signum).name}: stopping {when}, then saving", file=sys.stderr, flush=True)
        stop.append(signum)
    signals = [signal.SIGINT] + ([signal.SIGTERM] if procs.world == 1 else [])
    previous = [signal.signal(s, on_signal) for s in signals]
    try:
        loop(cfg, state, data, folder, measure_fid, procs, stop)
    finally:
        for s, handler in zip(signals, previous):
            signal.signal(s, handler)
    procs.barrier()
    if stop:
        save(state, folder, procs)
        saved = f"saved {out / 'ckpt.pt'} at step {state.step}; continue with --resume {out}"
        if signal.SIGTERM in stop:
            raise cli.Stopped(f"stopped by SIGTERM: {saved}")
        raise cli.Interrupted(saved)
    elif procs.main:
        print(f"\ndone: {out / 'ckpt.pt'}; sample from it with: python sample.py {out}", file=sys.stderr)
    return state.step


def main(argv=None):
    args = parse_args(argv)
    return cli.run_command("train.py", lambda procs: train(args, procs), "; the last checkpoint is intact")


if __name__ == "__main__":
    sys.exit(main())
