"""Shared by the test files: the repository root, seeded generators, files and weights the tests create.

Run every test file:  python -m pytest -q
"""
import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import fid

ROOT = Path(__file__).resolve().parent


def pytest_configure(config):
    """Float32 wherever --amp auto decides: auto takes bf16 on processors with native bfloat16, and the tests'
    answers must not depend on the machine. Tests about bf16 fake the answer they need; commands run in a
    subprocess are given --amp fp32."""
    cli.native_bf16 = lambda device: False


NATIVE_BF16 = cli.native_bf16  # the real one, for the tests of it


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run_ddpm_py_alone(folder, code):
    """code run in a folder that holds a copy of ddpm.py and nothing else, where numpy, PIL and scipy cannot be
    imported: its stdout."""
    shutil.copy(ROOT / "ddpm.py", folder)
    code = "import sys\nsys.modules.update(numpy=None, PIL=None, scipy=None)\nimport ddpm, torch\n" + code
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                         env={"PATH": "", "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    return out.stdout


def random_inception_state():
    """Random weights in the published layout, He-initialised so features stay O(1)."""
    torch.manual_seed(0)
    net = fid.FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def inception(inception_weights):
    return fid.load_inception(inception_weights)


def write_images(folder, n, seed, size=24, bright=0):
    """n smooth random RGB images (a few as grey / JPEG / in a subfolder) -> folder."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        small = g.integers(0, 256 - bright, (4, 4, 3), dtype=np.uint8) + bright
        im = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        if i % 4 == 1:
            im.convert("L").save(folder / f"{i:03d}.png")
        elif i % 4 == 2:
            (folder / "sub").mkdir(exist_ok=True)
            im.save(folder / "sub" / f"{i:03d}.jpg", quality=95)
        else:
            im.save(folder / f"{i:03d}.png")
    return folder


def fid_from_features(fa, fb):
    """FID of two feature sets without any d x d root, as an independent check: with centred
    features A, B, S1 S2 has the nonzero eigenvalues of (A B^T)(A B^T)^T / ((n1 - 1)(n2 - 1)), so
    Tr((S1 S2)^(1/2)) is the nuclear norm of A B^T / sqrt((n1 - 1)(n2 - 1))."""
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    a, b = fa - fa.mean(0), fb - fb.mean(0)
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = fa.mean(0) - fb.mean(0)
    return diff @ diff + (a * a).sum() / (len(a) - 1) + (b * b).sum() / (len(b) - 1) - 2 * tr_sqrt


def read_log(run):
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def parser_of(call):
    """The ArgumentParser that call() builds and parses with (captured before it parses)."""
    captured, real = {}, argparse.ArgumentParser.parse_args

    def capture(self, *a, **kw):
        captured["p"] = self
        raise SystemExit
    argparse.ArgumentParser.parse_args = capture
    try:
        call()
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["p"]
