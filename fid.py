"""fid.py: FID with pytorch-fid's numbers; Inception Score and KID with torch-fidelity's; precision and recall.

FID (Heusel et al. 2017) compares the mean and covariance of Inception-v3 pool3 features of two
image sets. The network is the TensorFlow 2015-12-05 Inception graph as ported by pytorch-fid,
with its FID-specific blocks, and loads pytorch-fid's published weights file unchanged (fetched
once by torch.hub into its cache). FID's preprocessing is pytorch-fid's: RGB in [0, 1] (grey
replicated), bilinear resize to 299x299 on floats (align_corners=False, no antialias), scaled to
[-1, 1]. The Inception Score (Salimans et al. 2016) feeds the network as torch-fidelity does:
TensorFlow 1's bilinear resize (no half-pixel offset) on [0, 255], then (x - 128) / 128, and takes
the 1008-way logits without the fc bias. KID (Binkowski et al. 2018) takes pool3 features on that same
input path, as torch-fidelity does; precision/recall (Kynkaanniemi et al. 2019) takes pool3 features on
FID's input path, with torch-fidelity's definition and defaults but not its VGG-16 features.

    python fid.py real/ generated/                      # FID of two image folders
    python fid.py --save-stats real/ real.npz           # save mu and sigma (pytorch-fid's format)
    python fid.py real.npz generated/                   # FID against saved statistics
    python fid.py --isc generated/                      # Inception Score, mean and std over splits
    python fid.py --kid real/ generated/                # FID, then KID (torch-fidelity's input path and subsets)
    python fid.py --prc real/ generated/                # FID, then precision and recall (k = 3)
    torchrun --nproc_per_node 4 fid.py real/ generated/ # each process embeds a quarter of the images
"""
import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import (IMAGE_EXTENSIONS, UserError, atomic_write, decode_files, describe_skipped, list_images, read_image,
                 run_command, to_uint8)

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")

# ----------------------------------------------------------------------------------------------
# the network: module and parameter names are those of pt_inception-2015-12-05-6726825d.pth


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TensorFlow's average pool ignores the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """pool="avg" for Mixed_7b; "max" for Mixed_7c, where the FID graph has a max pool."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
                          self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x, size):
    """Bilinear resize of float images [N, C, H, W] to size x size as TensorFlow 1's resize_bilinear
    (align_corners=False, no half-pixel offset), in float32 like it: output pixel i reads the source
    coordinate i * in / out, and each value is top + (bottom - top) * y_frac after the same blend along x."""
    def axis(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor()
        return lo.long(), torch.clamp(src.ceil(), max=n_in - 1).long(), src - lo

    (r0, r1, fy), (c0, c1, fx) = axis(x.shape[2]), axis(x.shape[3])
    top, bottom = x[:, :, r0], x[:, :, r1]
    top = top[..., c0] + (top[..., c1] - top[..., c0]) * fx
    bottom = bottom[..., c0] + (bottom[..., c1] - bottom[..., c0]) * fx
    return top + (bottom - top) * fy[:, None]


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID reference graph: images [N, 3, H, W] -> (pool3 features [N, 2048],
    logits without bias [N, 1008]). Input in [0, 1], resized as pytorch-fid does (FID); or, with
    isc_input, in [0, 255], resized as torch-fidelity does for the Inception Score."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x, isc_input=False):
        if isc_input:  # torch-fidelity: TF1-compatible resize on [0, 255], then (x - 128) / 128
            x = (resize_bilinear_tf1(x, 299) - 128) / 128
        else:  # pytorch-fid: bilinear with half-pixel centres on [0, 1], then [-1, 1]
            x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        pool3 = x.mean((2, 3))  # (N, 2048)
        return pool3, pool3 @ self.fc.weight.T


def weights_cache_path():
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]


def load_inception(weights=None, device="cpu"):
    """The FID Inception network in eval mode, from a local file or pytorch-fid's release
    (downloaded once into the torch hub cache). Raises UserError when neither can be read."""
    model = FIDInceptionV3()
    try:
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=False,
                                                       check_hash=True, weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # network, file and format errors all end the same way for the user
        where = weights or f"{FID_WEIGHTS_URL} (cache: {weights_cache_path()})"
        hint = "" if weights else f"; download it by hand to {weights_cache_path()} or pass --weights PATH"
        raise UserError(f"cannot load the Inception weights from {where}: {str(e).splitlines()[0]}{hint}") from None
    model = model.eval().requires_grad_(False).to(device)
    return model.to(memory_format=torch.channels_last)

def tensor_batches(x, batch_size=50):
    """Yield uint8 batches from generated images x [N, C, H, W] in [-1, 1]."""
    for i in range(0, x.shape[0], batch_size):
        yield to_uint8(x[i:i + batch_size])

# ----------------------------------------------------------------------------------------------
# activations and statistics


@torch.inference_mode()
def get_activations(batches, model, progress=None, isc_input=False):
    """Run uint8 image batches (tensors [B, C, H, W] or lists of [C, H, W], C = 1 or 3, any size)
    through the network (isc_input: the Inception Score's input path). Returns float64 arrays
    (pool3 [N, 2048], logits [N, 1008])."""
    device = next(model.parameters()).device
    feats, logits, n = [], [], 0
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            batch = list(batch)
        same = all(im.shape == batch[0].shape for im in batch)
        groups = [torch.stack(batch)] if same else [im[None] for im in batch]
        for g in groups:
            x = g.to(device).float().expand(-1, 3, -1, -1)
            x = x if isc_input else x / 255
            f, lg = model(x.contiguous(memory_format=torch.channels_last), isc_input=isc_input)
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        n += len(batch)
        if progress:
            progress(n)
    if not feats:
        raise UserError("no images")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def activation_statistics(feats):
    """Mean and covariance (float64) of features [N, D], as pytorch-fid's .npz mu and sigma."""
    if feats.shape[0] < 2:
        raise UserError(f"need at least 2 images for a covariance, got {feats.shape[0]}")
    feats = feats.astype(np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def sqrt_product_trace(sigma1, sigma2):
    """Tr((S1 S2)^(1/2)) for covariances S1, S2: S1 S2 is similar to R S2 R with R = S1^(1/2), a
    symmetric PSD matrix, so the trace is the sum of the roots of its eigenvalues (two eigh, not a
    Schur-form sqrtm: 3 s instead of 30 s at 2048-d on 2 cores). Eigenvalues within rounding of 0
    (below d * eps * the largest, as numpy's matrix_rank) are 0: their roots would be noise."""
    def psd_eigh(m):
        w, v = np.linalg.eigh(m)
        w[w < len(w) * np.finfo(w.dtype).eps * max(w.max(), 0)] = 0
        return w, v
    w, v = psd_eigh(sigma1)
    r = (v * np.sqrt(w)) @ v.T
    return float(np.sqrt(psd_eigh(r @ sigma2 @ r)[0]).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, eq. 6; Dowson & Landau
    1982). pytorch-fid takes the root with scipy's sqrtm; on full-rank statistics the two agree to
    rounding (1e-12 relative at 2048-d), and on rank-deficient ones (fewer images than features)
    this is the exact value where sqrtm warns and drifts."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * sqrt_product_trace(sigma1, sigma2))


def checked_fid(mu1, sigma1, mu2, sigma2):
    """frechet_distance, refusing statistics with NaN or inf (they would print as FID: nan) and
    rounding a tiny negative result (identical sets, -1e-9) up to 0."""
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise UserError("the statistics hold NaN or inf values: no FID")
    return max(frechet_distance(mu1, sigma1, mu2, sigma2), 0.0)


def inception_score(logits, splits=10, shuffle=True, seed=2020):
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean over each split; returns (mean, std) over
    `splits` splits, shuffled with numpy's RandomState(seed) as torch-fidelity does."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = logits.shape[0]
    if n < splits:
        raise UserError(f"need at least {splits} images for {splits} splits, got {n}")
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_py = p[lo:hi].mean(0, keepdim=True).log()
        kl = torch.where(p[lo:hi] > 0, p[lo:hi] * (log_p[lo:hi] - log_py), 0.0)  # 0 log 0 = 0
        scores.append(kl.sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(feats1, feats2, subsets=100, subset_size=1000, seed=2020):
    """KID (Binkowski et al. 2018): the unbiased MMD^2 between two feature sets [N, d] with the kernel
    k(x, y) = (x.y / d + 1)^3, over `subsets` subsets of `subset_size` (capped by the smaller set)
    drawn without replacement by numpy's RandomState(seed), first from set 1 then from set 2, as
    torch-fidelity does. Returns (mean, std) over the subsets, in float64."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise UserError(f"KID needs two feature sets [N, d] of one d, got {f1.shape} and {f2.shape}")
    m, d = min(subset_size, len(f1), len(f2)), f1.shape[1]
    if m < 2:
        raise UserError(f"KID needs at least 2 images in each set, got {len(f1)} and {len(f2)}")
    rng, mmd = np.random.RandomState(seed), np.empty(subsets)
    for i in range(subsets):
        x, y = f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))  # i != j only
        mmd[i] = same - 2 * kxy.mean()
    return float(mmd.mean()), float(mmd.std())


def knn_radii(x, k=1, batch_size=10000):
    """For each point of x [N, d], the distance to its k-th nearest other point (the (k+1)-th smallest
    distance, counting itself), computed batch_size rows at a time."""
    return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(batch_size)])


def precision_recall(real, fake, k=3, batch_size=10000):
    """Improved precision and recall (Kynkaanniemi et al. 2019), as torch-fidelity 0.4 computes them:
    each set's manifold is the union of balls around its points with radius the distance to the k-th
    nearest other point of the set. Precision: the share of fake points inside the real manifold;
    recall: the share of real points inside the fake manifold (distance <= radius). float64."""
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise UserError(f"precision/recall needs two feature sets [N, d] of one d, got {tuple(real.shape)} and "
                       f"{tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall with k = {k} needs more than {k} images in each set, "
                       f"got {len(real)} and {len(fake)}")

    def covered(points, centres, r):
        return torch.cat([(torch.cdist(b, centres) <= r).any(dim=1) for b in points.split(batch_size)])

    precision = covered(fake, real, knn_radii(real, k, batch_size)).double().mean().item()
    recall = covered(real, fake, knn_radii(fake, k, batch_size)).double().mean().item()
    return precision, recall


def is_stats(path):
    """Whether path names saved statistics rather than a folder: a .npz (any case), or a file with no
    extension that is one (np.savez writes zip files)."""
    path = Path(path)
    return path.suffix.lower() == ".npz" or (path.is_file() and zipfile.is_zipfile(path))


def load_stats(path, dims=None):
    """mu [D] and sigma [D, D], arrays of numbers, from a pytorch-fid .npz; D = dims where given (2048: the
    pool3 features that samples are compared in)."""
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"], f["sigma"]
    except KeyError:
        raise UserError(f"{path}: no 'mu' and 'sigma' arrays in this .npz") from None
    except Exception as e:
        raise UserError(f"{path}: cannot read statistics ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise UserError(f"{path}: mu and sigma must be arrays of numbers, not {mu.dtype} and {sigma.dtype}")
    d = dims or (mu.shape[0] if mu.ndim == 1 else -1)
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the statistics of "
                        f"{dims or 'D'} features: ({dims or 'D'},) and ({dims or 'D'}, {dims or 'D'})")
    return mu.astype(np.float64), sigma.astype(np.float64)


def save_stats(path, mu, sigma):
    """mu and sigma as a .npz at exactly `path` (numpy would add .npz to a name without it), atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, mu=mu, sigma=sigma)
    atomic_write(path, write)


def folder_activations(folder, model, batch_size=50, num_workers=0, quiet=False, isc_input=False, procs=None):
    """pool3 features and logits of every readable image under folder (progress on stderr). With
    procs (torchrun), each rank embeds its share of the files and rank 0 gets them all (others None)."""
    files = list_images(folder)
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if procs is not None:
        lo, hi = procs.span(len(files))
        files, quiet = files[lo:hi], quiet or not procs.main
    skipped = {}
    tty = sys.stderr.isatty() and not quiet
    show = (lambda n: print(f"\r{folder}: {n} images", end="", file=sys.stderr)) if tty else None
    batches = decode_files(files, read_image, batch_size, num_workers, skipped)
    try:
        feats, logits = get_activations(batches, model, show, isc_input)
    except UserError:  # no readable image in this share: the others may have some
        feats, logits = np.zeros((0, 2048)), np.zeros((0, 1008))
    if procs is not None and procs.world > 1:
        feats, logits = (procs.gather(torch.from_numpy(a)) for a in (feats, logits))
        if not procs.main:
            return None, None
        feats, logits = feats.numpy(), logits.numpy()
    if len(feats) == 0:
        raise UserError(f"{folder}: no readable images")
    if not quiet:
        print(("\r" if tty else "") + f"{folder}: {feats.shape[0]} images"
              + (f" ({describe_skipped(skipped)}, skipped)" if skipped else ""), file=sys.stderr)
    return feats, logits


def check_input(path, need, dims=None):
    """Fail fast, before the network loads: a .npz must hold mu and sigma (of `dims` features), a folder `need`
    images."""
    if is_stats(path):
        return load_stats(path, dims)
    n = len(list_images(path))
    if n < need:
        raise UserError(f"{path}: {n} image{'s' * (n != 1)}, need at least {need}")
    return None


def path_statistics(path, model, batch_size=50, num_workers=0):
    """mu, sigma of a pytorch-fid .npz, or of the images in a folder."""
    stats = check_input(path, 2)
    return stats if stats is not None else activation_statistics(
        folder_activations(path, model, batch_size, num_workers)[0])

# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", nargs="*", help="two image folders or .npz statistics files")
    p.add_argument("--save-stats", nargs=2, metavar=("FOLDER", "OUT_NPZ"), help="save mu and sigma of FOLDER")
    p.add_argument("--isc", metavar="FOLDER", help="Inception Score of the images in FOLDER")
    p.add_argument("--splits", type=int, default=10, help="splits for the Inception Score")
    p.add_argument("--kid", action="store_true", help="with two folders: KID (mean +- std over subsets) after FID")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (torch-fidelity's default)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size, capped by the smaller set")
    p.add_argument("--prc", action="store_true", help="with two folders, REAL then GENERATED: precision and recall")
    p.add_argument("--prc-k", type=int, default=3, help="nearest neighbours for --prc (torch-fidelity's default)")
    p.add_argument("--batch-size", type=int, default=50, help="images per call of the Inception network")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--weights", help="a local copy of pt_inception-2015-12-05-6726825d.pth")
    args = p.parse_args(argv)
    modes = (len(args.path) > 0) + (args.save_stats is not None) + (args.isc is not None)
    if modes != 1 or (args.path and len(args.path) != 2):
        p.error("give two paths, or --save-stats FOLDER OUT_NPZ, or --isc FOLDER")
    return args


def check_args(args):
    """Numbers, output folder and the pairing of options with inputs, as one UserError line."""
    if args.splits < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise UserError("--splits and --batch-size must be at least 1, --num-workers at least 0")
    if args.save_stats and not Path(args.save_stats[1]).resolve().parent.is_dir():
        raise UserError(f"--save-stats {args.save_stats[1]}: its folder does not exist")
    if args.isc and is_stats(args.isc):
        raise UserError(f"{args.isc}: --isc needs an image folder; statistics files hold no logits")
    for flag in ("kid", "prc"):
        if getattr(args, flag) and (not args.path or any(is_stats(x) for x in args.path)):
            raise UserError(f"--{flag} needs two image folders: statistics files hold no features")
    if args.prc and args.prc_k < 1:
        raise UserError(f"--prc-k must be at least 1, got {args.prc_k}")
    if args.kid and (args.kid_subsets < 1 or args.kid_subset_size < 2):
        raise UserError("--kid-subsets must be at least 1 and --kid-subset-size at least 2")


def run(args, procs):
    """Under torchrun each rank embeds a share of the images; rank 0 reports."""
    device = procs.start(args.device)
    check_args(args)
    inputs = [args.isc] if args.isc else [args.save_stats[0]] if args.save_stats else args.path
    need = args.splits if args.isc else max(2, args.prc_k + 1 if args.prc else 2)
    stats = [check_input(x, need) for x in inputs]
    model = None if all(s is not None for s in stats) else load_inception(args.weights, device)
    acts = [None if s is not None else folder_activations(x, model, args.batch_size, args.num_workers,
                                                          isc_input=bool(args.isc), procs=procs)
            for x, s in zip(inputs, stats)]
    if not procs.main:
        return
    if args.isc:
        mean, std = inception_score(acts[0][1], args.splits)
        print(f"IS: {mean:.4f} +- {std:.4f}")
        return
    stats = [s if s is not None else activation_statistics(a[0]) for s, a in zip(stats, acts)]
    if args.save_stats:
        save_stats(args.save_stats[1], *stats[0])
        print(f"saved {args.save_stats[1]}", file=sys.stderr)
        return
    print(f"FID: {checked_fid(*stats[0], *stats[1]):.4f}")
    if args.kid:  # on torch-fidelity's input path for it, the Inception Score's
        feats = [folder_activations(x, model, args.batch_size, args.num_workers, quiet=True, isc_input=True)[0]
                 for x in inputs]
        mean, std = kernel_inception_distance(*feats, args.kid_subsets, args.kid_subset_size)
        print(f"KID: {mean:.6f} +- {std:.6f}")
    if args.prc:
        precision, recall = precision_recall(acts[0][0], acts[1][0], args.prc_k)
        print(f"precision: {precision:.4f}\nrecall: {recall:.4f}")


def main(argv=None):
    args = parse_args(argv)
    return run_command("fid.py", lambda procs: run(args, procs))


if __name__ == "__main__":
    sys.exit(main())
