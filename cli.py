"""cli.py: what the command lines (train.py, sample.py, fid.py, bench.py) share.

The one error type and the one main() guard; the processes of a torchrun launch (rank, each one's
share of the work, gathering on rank 0); atomic writes; image files (one set of extensions, 16-bit
and float grey images read with their real range); a run's training images (a folder, MNIST's IDX
files, streamed from disk when too large for memory, the built-in demo shapes); checkpoint files and the
guides of autoguidance; glibc's allocator set to reuse freed memory.
Of the project's files it imports ddpm.py alone.
"""
import concurrent.futures
import ctypes
import ctypes.util
import datetime
import errno
import functools
import gzip
import math
import os
import platform
import re
import signal
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

import ddpm

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


class UserError(Exception):
    """Bad input, a missing file or weights: reported as one line on stderr, exit status 1."""


class Stopped(Exception):
    """SIGTERM: torchrun ends the other processes when one fails (or the job is cancelled)."""


class Interrupted(Exception):
    """Ctrl-C after the work was put away (train.py saved its checkpoint): its message, exit status 130."""


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory(keep=1 << 31, largest=1 << 30):
    """On glibc, serve allocations up to `largest` bytes from the heap and keep up to `keep` freed bytes for reuse
    (mallopt's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), in place of its default of mapping every large block anew
    and unmapping it at free. A CPU sampling loop frees and re-allocates its activations every step; by default each
    is fresh pages from the kernel, zeroed and faulted in: 28-57% of the time at batch 64-512 (docs/performance.md).
    The cost: memory freed after a peak stays with the process. Both settings or neither (either alone is slower
    than the defaults). Returns whether they were set (False off glibc, where the allocator is left alone)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_TRIM_THRESHOLD, keep) == 1 and libc.mallopt(M_MMAP_THRESHOLD, largest) == 1


def run_command(script, body, lost_note=""):
    """The main() of every command: body(procs) with this process's Processes; a UserError, ValueError,
    OSError or a lost torchrun peer is one line on stderr and exit status 1, Ctrl-C is 130 (as shells expect,
    so that `train.py ... && sample.py ...` does not go on with a half-trained run)."""
    reuse_freed_memory()
    procs = Processes()
    try:
        body(procs)
    except (UserError, ValueError, OSError, Stopped) as e:
        print(f"{procs.prefix(script)}error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # another process died: its own message says why
        lost = procs.lost_contact(e)
        if lost is None:
            raise
        print(f"{procs.prefix(script)}error: {lost}{lost_note}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{script}: interrupted", file=sys.stderr)
        return 130
    except Interrupted as e:
        if procs.main:
            print(f"\n{script}: interrupted: {e}", file=sys.stderr)
        return 130
    finally:
        procs.close()
    return 0


def expand_home(args):
    """args with every path-like value that begins with ~ expanded to the home folder: a shell leaves
    --out=~/runs as written, which would make a folder literally named ~ in the current one."""
    for name, value in vars(args).items():
        if isinstance(value, str) and (value == "~" or value.startswith("~/")):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~/") else v
                                 for v in value])
    return args


def check_device(name):
    """torch.device(name), or UserError when it is not a device name or names a CUDA this machine lacks."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 ..)")
    backend = getattr(torch, device.type, None)
    if device.type not in ("cpu", "cuda") and not (hasattr(backend, "is_available") and backend.is_available()):
        raise UserError(f"--device {name}: this build of torch cannot compute on {device.type} here; use cpu or cuda")
    return device

# ----------------------------------------------------------------------------------------------
# mixed precision: --amp of train.py and sample.py

AMP = ("auto", "bf16", "fp16", "fp32")
AMP_MARGIN = 0.9  # auto takes bf16 when its timed step is below this share of float32's


def native_bf16(device, cpuinfo="/proc/cpuinfo"):
    """Whether the device computes bfloat16 natively: CUDA's own answer; on a CPU the x86 flags avx512_bf16
    (AMD Zen 4, Intel Cooper Lake) or amx_bf16 (Intel Sapphire Rapids and later) in `cpuinfo`. Where they are
    missing (and off Linux), oneDNN emulates bfloat16 and is slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast(amp, device):
    """The torch.autocast context of a resolved --amp ("bf16", "fp16"; "fp32" or None: disabled)."""
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp in ("bf16", "fp16"))


class Autocast(torch.nn.Module):
    """A model whose calls run under autocast (a resolved --amp) and return float32, for the samplers."""

    def __init__(self, model, amp, device):
        super().__init__()
        self.model, self.amp, self.device = model, amp, device

    def forward(self, *args):
        with autocast(self.amp, self.device):
            return self.model(*args).float()


def autocast_model(model, amp, device):
    """model with its network's calls under autocast (Autocast); a ddpm.Predictor keeps its conversions
    between predictions outside, in float32, and its predict."""
    if isinstance(model, ddpm.Predictor):
        return ddpm.Predictor(Autocast(model.model, amp, device), model.process, model.kind)
    return Autocast(model, amp, device)


def choose_amp(requested, device, seconds_per_step):
    """--amp resolved for this device: (choice, the line that says why, or None). "auto" is bf16 where the
    device computes it natively and, on a CPU, seconds_per_step(amp) times bf16's step below AMP_MARGIN of
    float32's; fp32 elsewhere. fp16 needs CUDA (its loss scaling does not exist on other devices)."""
    if requested in (None, "fp32"):
        return "fp32", None
    if requested == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; on a CPU use --amp bf16 (or auto)")
    if requested != "auto":
        return requested, None
    if not native_bf16(device):
        return "fp32", f"amp: fp32 (this {'processor' if device.type == 'cpu' else 'device'} has no native bfloat16)"
    if device.type != "cpu":
        return "bf16", f"amp: bf16 ({device.type} supports it natively)"
    times = {"fp32": [], "bf16": []}
    for amp in ("fp32", "bf16") * 3:  # alternated, the first of each a warm-up: the best of the other two
        times[amp].append(seconds_per_step(amp))
    fp32, bf16 = min(times["fp32"][1:]), min(times["bf16"][1:])
    choice = "bf16" if bf16 < AMP_MARGIN * fp32 else "fp32"
    return choice, (f"amp: {choice} (native bfloat16 on this processor; a timed step: fp32 {fp32 * 1e3:.0f} ms, "
                    f"bf16 {bf16 * 1e3:.0f} ms)")


# ----------------------------------------------------------------------------------------------
# processes: one (python script.py), or many launched by torchrun (torch.distributed)

DIST_TIMEOUT = datetime.timedelta(minutes=30)  # how long a rank waits for the others, e.g. while rank 0 saves


class Processes:
    """This process's place in a torchrun launch (RANK, WORLD_SIZE and LOCAL_RANK in the environment),
    or the one process of a plain `python` run: rank 0 of 1. start() joins the process group: gloo on
    CPUs, nccl on GPUs, where rank r uses cuda:LOCAL_RANK."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0

    def start(self, device_name):
        """The checked device of this process; joins the process group under torchrun."""
        device = check_device(device_name)
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if self.world > 1 and not dist.is_initialized():
            signal.signal(signal.SIGTERM, self._terminated)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
        self.device = device
        return device

    def _terminated(self, *_):
        raise Stopped(f"rank {self.rank} stopped by torchrun: another process failed or the job was cancelled")

    def close(self):
        if self.world > 1:  # from here on a SIGTERM from torchrun just ends the process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if dist.is_initialized():
            dist.destroy_process_group()

    def lost_contact(self, error):
        """The one-line reason when error is a collective failing because another process is gone
        (gloo, nccl); None for any other error."""
        text = str(error)
        if self.world > 1 and (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text):
            return f"lost contact with another process ({text.splitlines()[0][:150]})"
        return None

    def prefix(self, script):
        """'script: ' or, under torchrun, 'script (rank r): ' for messages."""
        return f"{script}{f' (rank {self.rank})' if self.world > 1 else ''}: "

    def span(self, n, block=1):
        """This rank's share [start, end) of n items dealt in whole blocks, contiguously by rank."""
        blocks = -(-n // block)
        lo, hi = blocks * self.rank // self.world, blocks * (self.rank + 1) // self.world
        return min(lo * block, n), min(hi * block, n)

    def gather(self, x):
        """Rows of x [n_r, ...] from every rank, concatenated in rank order on rank 0 (None elsewhere)."""
        if self.world == 1:
            return x
        local = x.to(self.device)
        counts = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor([len(x)], device=self.device))
        counts = [int(c) for c in counts]
        pad = local.new_zeros((max(counts), *x.shape[1:]))
        pad[:len(x)] = local
        parts = [torch.empty_like(pad) for _ in range(self.world)] if self.main else None
        dist.gather(pad, parts, dst=0)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device) if self.main else None

    def agree(self, fn):
        """Run fn on rank 0; its exception's text is raised on every rank as ErrorType(text)."""
        if self.world == 1:
            return fn()
        error = [None]
        if self.main:
            try:
                fn()
            except Exception as e:  # passed on to every rank below
                error = [(type(e), str(e))]
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise error[0][0](error[0][1])

    def any(self, flag):
        """True on every rank when flag is true on any (a collective: every rank must call it)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, t):
        """t summed over the ranks, in place (a collective: every rank must call it)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def min(self, t):
        """The ranks' elementwise minimum of t, in place."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()

class FolderLock:
    """A folder claimed by one process: the file .lock in it, created exclusively, holds the pid. A second
    claimant gets UserError while that process lives; a lock whose process is gone (killed) is taken over."""

    def __init__(self, folder, what):
        self.path = Path(folder) / ".lock"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self.holder() is not None:
                    raise UserError(f"{folder}: in use by another {what} (process {self.holder()}); wait for it, "
                                    "or choose another folder") from None
                self.path.unlink(missing_ok=True)  # its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise UserError(f"{folder}: could not take its lock file {self.path.name}")

    def holder(self):
        """The pid that holds the lock, if that process still runs."""
        try:
            pid = int(self.path.read_text())
            os.kill(pid, 0)
        except PermissionError:  # alive, another user's
            return pid
        except (OSError, ValueError):
            return None
        return pid

    def release(self):
        if self.holder() == os.getpid():
            self.path.unlink(missing_ok=True)

# ----------------------------------------------------------------------------------------------
# files: atomic writes and images


def atomic_write(path, write):
    """write(tmp) to a temporary file beside path, then rename it over path: an interrupted or failed
    write (a kill, a full disk) leaves the previous file whole and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_whole(path, data):
    """Append bytes to path whole or not at all: a failed or short write (a full disk) is cut back, so a
    log stays readable."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def image_format(path):
    """Pillow's format name for path's extension; UserError for one Pillow cannot write."""
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{path}: cannot write images with the extension {ext or '(none)'!r}; use .png")
    return fmt


SOFTWARE = "ddpm"  # the PNG text chunk that marks an image as written by these commands


def save_image(array, path):
    """A uint8 array [H, W] or [H, W, 3] as an image file, atomically, in the format of path's extension;
    a PNG carries the text chunk Software = SOFTWARE, so that it can be told from the user's files."""
    fmt = image_format(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    extra = {"pnginfo": info} if fmt == "PNG" else {}
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt, **extra))


def written_by_us(path):
    """True for a PNG that save_image wrote."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == SOFTWARE
    except Exception:
        return False


def check_new_picture(path):
    """A picture may be written at path: its extension is one Pillow writes, and any file there is one of
    ours (never a file of the user's). UserError otherwise, before any work."""
    image_format(path)
    path = Path(path)
    if path.exists() and not (path.is_file() and written_by_us(path)):
        raise UserError(f"{path}: exists and was not written by this toolkit; choose another name or remove it")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not os.access(folder, os.W_OK):
        raise UserError(f"{path}: cannot write into {folder}")


def check_output_folder(folder):
    """A folder for per-image files: new, empty, or holding only pictures that save_image wrote (a former
    output, whose files are returned: the caller replaces them, so that the folder holds one output alone);
    UserError for a file, or a folder of the user's."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: a file, not a folder")
    files = [p for p in folder.rglob("*") if not p.is_dir()] if folder.is_dir() else []
    theirs = next((p for p in files if not written_by_us(p)), None)
    if theirs is not None:
        raise UserError(f"{folder}: holds files that this toolkit did not write ({theirs.name}); "
                        "choose a new or empty folder")
    return files


def to_uint8(x):
    """Images in [-1, 1] -> uint8 in [0, 255], rounded as when they are saved as PNG."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images, path, nrow=None, pad=2):
    """Save uint8 [N, C, H, W] (or float in [-1, 1]) as one PNG grid, nrow images per row."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for k, im in enumerate(images.cpu().permute(0, 2, 3, 1).numpy()):
        y, x = pad + (k // nrow) * (h + pad), pad + (k % nrow) * (w + pad)
        grid[y:y + h, x:x + w] = im
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid[..., 0] if c == 1 else grid, path)


def list_images(folder):
    """Image files under folder, recursively, sorted; UserError when there is no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def to_8bit(im):
    """Pillow's 16-bit ("I;16*", or "I" holding values above 255) and float ("F", [0, 1]) grey images scaled
    from their real range to 8 bits: convert() would clip them at 255, turning most of the image white."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        a = a * 255 if a.max(initial=0) <= 1 else a
    elif im.mode != "I" or a.max(initial=0) > 255:
        a = a / 257  # 65535 -> 255
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


TOO_LARGE = "too large"  # what a decoder returns for an image past Pillow's decompression-bomb limit


def decoded(path, convert):
    """convert(the Pillow image) of the file at path; None when it cannot be decoded, TOO_LARGE when it
    has more pixels than Pillow will decode."""
    try:
        with Image.open(path) as im:
            return convert(im)
    except Image.DecompressionBombError:
        return TOO_LARGE
    except Exception:
        return None


def read_image(path, mode="RGB"):
    """A file as a uint8 tensor [C, H, W] (mode "RGB" or "L"), or as decoded() says why not."""
    a = decoded(path, lambda im: np.asarray(to_8bit(im).convert(mode)))
    if a is None or isinstance(a, str):
        return a
    return torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1).copy()).permute(2, 0, 1)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, files, decode):
        self.files, self.decode = files, decode

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.decode(self.files[i])


def decode_files(files, decode=read_image, batch_size=50, num_workers=0, skipped=None, kept=None):
    """Yield lists of decode(file), decoded by num_workers processes. decode returns None for a file
    it cannot read and TOO_LARGE for one too large to decode: both are left out and counted in the
    dict skipped, by reason ("unreadable", "too large"); the list kept gets the indices of the others."""
    loader = torch.utils.data.DataLoader(_Decoded(files, decode), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=list)
    for b, batch in enumerate(loader):
        good = []
        for j, im in enumerate(batch):
            if im is None or isinstance(im, str):
                if skipped is not None:
                    reason = "unreadable" if im is None else im
                    skipped[reason] = skipped.get(reason, 0) + 1
            else:
                good.append(im)
                if kept is not None:
                    kept.append(b * batch_size + j)
        if good:
            yield good


def describe_skipped(skipped):
    """'2 unreadable, 1 too large (over Pillow's limit of N pixels)' from decode_files' counts."""
    limit = f" (over Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels)" if TOO_LARGE in skipped else ""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) + limit

# ----------------------------------------------------------------------------------------------
# a run's training images


def fit_image(im, size, mode):
    """PIL image -> uint8 array [C, size, size]: turned upright by its EXIF orientation, short side resized
    (bicubic), centre crop."""
    a = np.asarray(ImageOps.fit(to_8bit(ImageOps.exif_transpose(im)).convert(mode), (size, size), Image.BICUBIC))
    return a.reshape(size, size, -1).transpose(2, 0, 1)


def fit_file(path, size, mode):
    """An image file through fit_image, or as decoded() says why not."""
    return decoded(path, lambda im: fit_image(im, size, mode))


def _readable(path):
    """path when its header can be read (a cheap check before streaming), or as decoded() says why not."""
    return decoded(path, lambda im: path)


def _read_idx(path, dims):
    """The uint8 array of an MNIST-style IDX file (optionally gzipped) of `dims` dimensions."""
    try:
        raw = (gzip.open if str(path).endswith(".gz") else open)(path, "rb").read()
        if len(raw) < 4 + 4 * dims or raw[2] != 0x08 or raw[3] != dims:
            raise ValueError(f"no IDX header for uint8 {'images' if dims == 3 else 'labels'}")
        shape = np.frombuffer(raw, ">i4", dims, offset=4)
        return np.frombuffer(raw, np.uint8, int(np.prod(shape)), offset=4 + 4 * dims).reshape(shape)
    except (OSError, EOFError, ValueError) as e:  # a damaged gzip stream, a short file
        raise UserError(f"{path}: not a readable IDX file of uint8 {'images' if dims == 3 else 'labels'} "
                        f"({e})") from None


def read_idx_images(path):
    """Images from an MNIST-style IDX file (optionally gzipped) as uint8 [N, H, W]."""
    return _read_idx(path, 3)


def read_idx_labels(images_path):
    """The labels [N] of an IDX images file from the labels file beside it (MNIST's names:
    X-images-idx3-ubyte[.gz] and X-labels-idx1-ubyte[.gz])."""
    path = Path(images_path)
    path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if not path.is_file():
        raise UserError(f"{images_path}: no labels file {path.name} beside it")
    return _read_idx(path, 1)


IDX_IMAGES = ("idx3-ubyte", "idx3-ubyte.gz")


class Labelled(NamedTuple):
    """A data set's images (a uint8 tensor [N, C, H, W] or StreamedImages), its labels (LongTensor [N], or
    None) and its class names (or None)."""
    images: object
    labels: torch.Tensor = None
    classes: list = None


def _classes_of(folder, files, idx):
    """(class names, each file's class index, the IDX images' labels) of a labelled folder: the top-level
    subfolders, sorted, as torchvision's ImageFolder; or the labels files of MNIST's IDX images."""
    if idx and files:
        raise UserError(f"--data {folder}: a labelled set holds IDX files or class folders of images, not both")
    if idx:
        raw = np.concatenate([read_idx_labels(p) for p in idx])
        values = sorted(set(raw.tolist()))
        return [str(v) for v in values], [], np.searchsorted(values, raw)
    loose = next((f for f in files if len(f.relative_to(folder).parts) == 1), None)
    if loose is not None:
        raise UserError(f"--data {folder}: {loose.name} lies in the folder itself; a labelled set keeps each "
                        "class's images in a subfolder named for the class")
    classes = sorted({f.relative_to(folder).parts[0] for f in files})
    return classes, [classes.index(f.relative_to(folder).parts[0]) for f in files], np.zeros(0, np.int64)


def check_classes(folder, classes, labels, from_idx=False):
    """A labelled set's classes each with an image left after decoding (UserError naming one that has none: it
    would be trained on nothing and sampled); a note naming the top-level subfolders of an image set that hold
    no images, which are not classes."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise UserError(f"--data {folder}: class {empty[0]} has no readable image"
                        + (f" (nor {', '.join(empty[1:])})" if len(empty) > 1 else "") + "; remove it or add images")
    bare = [] if from_idx else sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and p.name not in classes)
    if bare:
        print(f"note: --data {folder}: {', '.join(bare)} hold{'s' * (len(bare) == 1)} no images and "
              f"{'is' if len(bare) == 1 else 'are'} not {'a class' if len(bare) == 1 else 'classes'}",
              file=sys.stderr)


def _listing(folder, say=False):
    """(folder, its image files, its IDX image files), all sorted; an IDX file whose gzipped copy lies beside
    it is read once (say: a note that says so)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: no such folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    idx = [p for p in paths if p.name.endswith(IDX_IMAGES)]
    twins = [p for p in idx if p.suffix == ".gz" and p.with_suffix("") in idx]
    for p in twins if say else ():
        print(f"note: --data {folder}: reading {p.with_suffix('').name} once, not its gzipped copy {p.name} too",
              file=sys.stderr)
    return folder, [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS], [p for p in idx if p not in twins]


def find_classes(folder):
    """The class names of a labelled data folder, without decoding an image (see load_images)."""
    return _classes_of(*_listing(folder))[0]


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


def load_images(folder, size, channels, workers=0, labelled=False):
    """Every image under folder as one uint8 tensor [N, C, size, size] (decoded in parallel), or as
    StreamedImages when that tensor would not fit in memory_budget(); with labelled, their labels and
    class names too (_classes_of). Returns Labelled."""
    folder, files, idx = _listing(folder, say=True)
    mode = "L" if channels == 1 else "RGB"
    classes, file_class, idx_labels = _classes_of(folder, files, idx) if labelled else (None, None, None)
    arrays = [fit_image(Image.fromarray(a), size, mode) for p in idx for a in read_idx_images(p)]
    need = (len(files) + len(arrays)) * channels * size * size
    stream = need > memory_budget()
    if stream and arrays:
        raise UserError(f"{folder}: too large to hold in memory ({need / 2**30:.1f} GiB) and it mixes IDX files "
                        "with image files; give them separate folders")
    skipped, kept = {}, []
    decode = _readable if stream else functools.partial(fit_file, size=size, mode=mode)
    found = [x for batch in decode_files(files, decode, 64, workers, skipped, kept) for x in batch]
    if skipped:
        print(f"{folder}: image files skipped: {describe_skipped(skipped)}", file=sys.stderr)
    if not found and not arrays:
        raise UserError(f"--data {folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))} or IDX)")
    labels = None
    if labelled:
        labels = torch.from_numpy(np.concatenate([idx_labels, np.array(file_class, np.int64)[kept]]).astype(np.int64))
        check_classes(folder, classes, labels, bool(idx))
    if stream:
        print(f"{folder}: {len(found)} images at {size}x{size} would need {need / 2**30:.1f} GiB; decoding each "
              f"batch from disk instead", file=sys.stderr)
        return Labelled(StreamedImages(found, size, channels, workers), labels, classes)
    return Labelled(torch.from_numpy(np.stack(arrays + found)), labels, classes)


def load_folder(folder, size, channels, workers=0):
    """The images of load_images alone."""
    return load_images(folder, size, channels, workers).images


DEMO_CLASSES = ["circle", "square", "triangle"]


def demo_images(n=2048, size=32, channels=3, seed=0):
    """A built-in data set: one coloured circle, square or triangle on a plain background, the shape its
    label. Returns Labelled."""
    rng = np.random.default_rng(seed)
    out, kinds = np.empty((n, size, size, 3), np.uint8), np.empty(n, np.int64)
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
        out[i], kinds[i] = np.asarray(im), kind
    x = torch.from_numpy(out).permute(0, 3, 1, 2)
    x = x if channels == 3 else x.float().mean(1, keepdim=True).round().to(torch.uint8)
    return Labelled(x, torch.from_numpy(kinds), list(DEMO_CLASSES))


def demo_shapes(n=2048, size=32, channels=3, seed=0):
    """The images of demo_images alone."""
    return demo_images(n, size, channels, seed).images

# ----------------------------------------------------------------------------------------------
# images to edit and their masks

MASKS = ("lower-half", "upper-half", "left-half", "right-half", "center", "random")  # white (true): fill in


def image_files(path):
    """(files, their names relative to path without the extension) of an image file or a folder of them."""
    path = Path(path)
    if path.is_file():
        return [path], [path.stem]
    files = list_images(path)
    if not files:
        raise UserError(f"{path}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    names, seen = [str(f.relative_to(path).with_suffix("")) for f in files], {}
    for f, name in zip(files, names):
        if name in seen:  # x.png and x.jpg: their results would be written over each other
            raise UserError(f"{seen[name].name} and {f.name} in {f.parent} share the name {Path(name).name}, and so "
                            "would their results: rename one")
        seen[name] = f
    return files, names


def _fitted(path, size, mode, what):
    a = decoded(path, lambda im: (fit_image(im, size, mode), ImageOps.exif_transpose(im).size, im.mode))
    if a is None or isinstance(a, str):
        raise UserError(f"{path}: cannot read this {what} ({'too large' if a else 'not an image Pillow decodes'})")
    return a


def read_edit_images(path, size, channels):
    """The images to edit, fitted as the training data: (float [N, C, size, size] in [-1, 1], names, sizes).
    A colour image for a grey run is refused: converting it would edit another image than the one given."""
    files, names = image_files(path)
    images, sizes = [], []
    for f in files:
        a, wh, mode = _fitted(f, size, "RGB", "image")
        if channels == 1 and not ((a[0] == a[1]).all() and (a[1] == a[2]).all()):
            raise UserError(f"{f}: a colour image ({mode}), and the run is grey (1 channel); convert it first")
        images.append(a[:1] if channels == 1 else a)
        sizes.append(wh)
    return torch.from_numpy(np.stack(images)).float() / 127.5 - 1, names, sizes


def builtin_mask(name, size, seed=0):
    """A mask [1, size, size], true where the model fills in: a half, the centre square of half the side,
    or random pixels (half of them, from seed)."""
    m, h = torch.zeros(1, size, size, dtype=torch.bool), size // 2
    if name == "random":
        return torch.rand(1, size, size, generator=torch.Generator().manual_seed(seed)) < 0.5
    region = {"lower-half": (slice(h, None), slice(None)), "upper-half": (slice(None, h), slice(None)),
              "left-half": (slice(None), slice(None, h)), "right-half": (slice(None), slice(h, None)),
              "center": (slice(size // 4, size // 4 + h), slice(size // 4, size // 4 + h))}[name]
    m[(slice(None), *region)] = True
    return m


def read_masks(spec, image_path, names, sizes, size):
    """The masks of the images to edit, true (white) where the model fills in, as bool [N, 1, size, size]:
    a built-in name (MASKS), one mask file for every image, or a folder with a mask for each image at the
    same relative name. Each file is fitted as its image (same aspect ratio needed) and thresholded at half
    grey, or, when it has transparent pixels, at half alpha (transparent: fill in); a mask that fills nothing,
    or everything, is refused."""
    if spec in MASKS:
        masks = [builtin_mask(spec, size, i) for i in range(len(names))]
        return torch.stack(masks)
    path = Path(spec)
    if path.is_dir():
        found = {n: f for f, n in zip(*image_files(path))}
        missing = [n for n in names if n not in found]
        if missing:
            raise UserError(f"--mask {spec}: no mask for {missing[0]} of {image_path} ({len(missing)} missing)")
        files = [found[n] for n in names]
    elif path.is_file():
        files = [path] * len(names)
    else:
        raise UserError(f"--mask {spec}: no such file or folder, and not one of {', '.join(MASKS)}")
    masks, noted = [], set()
    for f, n, (w, h) in zip(files, names, sizes):
        (grey, alpha), (mw, mh), _ = _fitted(f, size, "LA", "mask")
        if abs(mw / mh - w / h) > 0.01 * w / h:
            raise UserError(f"{f}: a mask of {mw}x{mh} does not fit the image {n} of {w}x{h} (another shape)")
        m = torch.from_numpy(grey.copy())[None] >= 128
        if (alpha < 255).any():  # erased to transparent, as image editors and image-edit APIs mark a hole
            m = torch.from_numpy(alpha.copy())[None] < 128
            if f not in noted:
                print(f"note: {f}: its transparent pixels mark what to fill in (its alpha channel; grey ignored)",
                      file=sys.stderr)
                noted.add(f)
        if not m.any() or m.all():
            raise UserError(f"{f}: the mask is all {'black: nothing to fill in' if not m.any() else 'white: nothing is kept'}"
                            f" (white marks what to fill in)")
        masks.append(m)
    return torch.stack(masks)


def frequency_labels(counts, n, seed):
    """n class labels drawn with the frequencies `counts` (a class-conditional run's data), from a generator
    seeded with seed: the same on every process, so that each can take its share."""
    weights = torch.tensor(counts, dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))

# ----------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, state):
    """Write atomically: a kill during the write leaves the previous checkpoint intact. A failed write (a full
    disk, which torch's zip writer reports as a RuntimeError) is an OSError naming the file."""
    def write(tmp):
        try:
            torch.save(state, tmp)
        except RuntimeError as e:
            why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
            raise OSError(f"cannot write {path} ({why}; is the disk full?)") from None
    atomic_write(path, write)


def remove_leftovers(folder):
    """The temporary files of atomic_write that a killed writer left in folder and its subfolders (call it
    while holding the folder's FolderLock: no writer of ours is at work there)."""
    for p in Path(folder).rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict of a run folder or a ckpt.pt, with weights_only=True (loading never runs code);
    UserError, in words that do not pass on torch's advice to load unsafely, when it is not one."""
    path = Path(path)
    path = path / "ckpt.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        if not zipfile.is_zipfile(path):
            why = "not a torch checkpoint: the file is damaged, truncated or of another kind"
        elif "weights only" in str(e).lower():
            why = "a torch file holding Python objects that a safe load refuses: not a checkpoint of train.py"
        else:
            why = f"a damaged torch checkpoint ({type(e).__name__}); a complete one is rewritten at every save"
        raise UserError(f"{path}: {why}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path}: not a checkpoint of train.py (no configuration in it)")
    return ckpt


def _built(path, build):
    try:
        return build()
    except Exception as e:
        raise UserError(f"{Path(path)}: not a checkpoint of this version of train.py "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_checkpoint(path, device="cpu"):
    """(checkpoint dict, model, EMA, process) of a run, for training on: built from the configuration inside."""
    ckpt = read_checkpoint(path, device)

    def build():
        cfg = ckpt["config"]
        model = ddpm.UNet(**cfg["model"]).to(device)
        model.load_state_dict(ckpt["model"])
        ema = ddpm.EMA(model, cfg["ema_decay"])
        ema.load_state_dict(ckpt["ema"])
        return ckpt, model, ema, ddpm.make_process(cfg).to(device)
    return _built(path, build)


def load_run(path, device="cpu", ema=True):
    """(checkpoint dict, eps model, process) of a run, for sampling: ddpm.load with the EMA or raw weights."""
    ckpt = read_checkpoint(path, device)
    return (ckpt, *_built(path, lambda: ddpm.load(ckpt, ema, device))[:2])


# Autoguidance of unconditional runs (Karras et al. 2024): the guide, its weight and the noise levels sigma/alpha
# where it applies, chosen on MNIST (docs/guidance.md)
DEFAULT_GUIDE, AUTOGUIDANCE_INTERVAL = "1/16", (0.5, 10.0)  # the weight: the process's autoguidance
CONSISTENCY_OBJECTIVES = ("ect", "cd")  # train.py's objectives that give a consistency model (--sampler cm)
FRACTION = re.compile(r"\d+/\d+")


def find_guide(run, spec, flag):
    """The checkpoint a guide `spec` names for `run`: a fraction such as 1/16 names the run's snapshot (train.py
    --snapshots), anything else a run folder or checkpoint; spec None: the run's snapshot at DEFAULT_GUIDE, or
    None where it kept none. A fraction the run did not keep is one line naming those it did."""
    given, spec, run = spec is not None, spec or DEFAULT_GUIDE, Path(run)
    home = run if run.is_dir() else run.parent
    if FRACTION.fullmatch(spec):
        path = home / "snapshots" / f"{spec.replace('/', '-')}.pt"
        if path.is_file():
            return path
        if given:
            kept = sorted(p.stem.replace("-", "/") for p in (home / "snapshots").glob("*.pt"))
            raise UserError(f"{flag} {spec}: {run} has no snapshot at {spec} of its training "
                            f"({'it has ' + ', '.join(kept) if kept else 'it kept none: train.py --snapshots'})")
        return None
    return Path(spec)


def load_guide(path, cfg, process, device, flag):
    """(eps model, step) of the guide at `path`, checked against the run of configuration cfg: the same images,
    process and labels (one line if not)."""
    ckpt, guide, guide_process = load_run(path, device)
    mine, theirs = cfg["model"], ckpt["config"]["model"]
    for key, what in (("in_channels", "channels"), ("image_size", "image size"), ("num_classes", "classes")):
        if mine.get(key) != theirs.get(key):
            raise UserError(f"{flag} {path}: its {what} ({theirs.get(key)}) differ from the run's ({mine.get(key)})")
    if not same_process(process, guide_process):
        raise UserError(f"{flag} {path}: its process {guide_process!r} is not the run's {process!r}")
    return guide, ckpt["step"]


def same_process(a, b):
    """Whether two processes have the same marginals (alpha_t, sigma_t) on a grid of their time range."""
    if type(a) is not type(b) or (a.t_start, a.t_end) != (b.t_start, b.t_end):
        return False
    times = a.time_grid(50, "time")
    return all(torch.allclose(u, v) for u, v in zip(a.marginal(times), b.marginal(times)))
