"""Tests of torchrun: several processes (gloo on CPU) give the results of one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import fid
import sample
import train

from conftest import ROOT, parser_of, read_log, write_images


def one_thread_env(**extra):
    """The environment with one thread per process, as torchrun's processes get: a one-process run
    compared with them bit for bit needs it too, as the thread count changes the order of float sums."""
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def torchrun(nproc, script, *argv, env=None, wait=True):
    """`torchrun --nproc_per_node nproc --standalone script argv` (as python -m torch.distributed.run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(ROOT / script), *map(str, argv)]
    environ = one_thread_env(**(env or {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def weights_of(run):
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    return ckpt["model"], ckpt["ema"]["model"], ckpt


def assert_same_run(a, b):
    """Log losses to relative 1e-5 and weights and EMA to 1e-5 (they are O(1e-3..1)), as the issue asks;
    and Adam's first moments to 1e-4 of their size, which, unlike the weights, show a gradient off by
    any factor (Adam's steps and the clipped norm do not)."""
    la, lb = read_log(a), read_log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5)
    (ma, ea, ca), (mb, eb, cb) = weights_of(a), weights_of(b)
    for wa, wb in ((ma, mb), (ea, eb)):
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        m = sa["exp_avg"].abs().max().item()
        assert (sa["exp_avg"] - sb["exp_avg"]).abs().max().item() <= 1e-4 * m + 1e-12


DIST = ["--steps", "6", "--batch-size", "8", "--log-every", "1", "--save-every", "3", "--sample-every", "0",
        "--preset", "tiny", "--image-size", "16", "--T", "50", "--workers", "0", "--warmup", "2",
        "--class-cond", "--amp", "fp32"]  # the demo shapes' kinds as labels: they travel with their images through the
#                                            sharding; float32 as in the one-process runs (conftest)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dist") / "one"
    assert train.main([*DIST, "--out", str(run)]) == 0
    return run


def test_two_processes_train_as_one_and_say_so(tmp_path, one_process_run):
    """Same global batch on 2 processes, and with --grad-accum 2 on top: the losses and weights of 1."""
    out = torchrun(2, "train.py", *DIST, "--out", tmp_path / "two", "--grad-accum", "2")
    assert "2 processes x 4 (2 micro-batches of 2)" in out.stderr and "| 2 processes |" in out.stderr
    assert_same_run(one_process_run, tmp_path / "two")
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert (cfg["world_size"], cfg["grad_accum"]) == (2, 2)
    assert weights_of(tmp_path / "two")[2]["config"]["world_size"] == 2
    snapshots = sorted(p.name for p in (tmp_path / "two" / "snapshots").iterdir())  # rank 0 wrote them, once
    assert snapshots == ["1-16.pt", "1-4.pt", "1-8.pt"]
    for name in snapshots:
        a, b = (torch.load(r / "snapshots" / name, weights_only=True) for r in (one_process_run, tmp_path / "two"))
        assert a["step"] == b["step"] and max((a["ema"]["model"][k] - b["ema"]["model"][k]).abs().max().item()
                                              for k in a["ema"]["model"]) < 1e-5


def test_grad_accum_on_one_process_equals_the_whole_batch(tmp_path, one_process_run):
    assert train.main([*DIST, "--out", str(tmp_path / "acc"), "--grad-accum", "4"]) == 0
    assert_same_run(one_process_run, tmp_path / "acc")


def test_a_two_process_run_resumes_in_one(tmp_path, one_process_run):
    torchrun(2, "train.py", *DIST, "--out", tmp_path / "r", "--steps", "3")
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "6"]) == 0
    assert_same_run(one_process_run, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["world_size"] == 1


def test_a_batch_that_does_not_split_is_one_line(tmp_path, capsys):
    assert train.main([*DIST, "--out", str(tmp_path / "x"), "--grad-accum", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 8 is the global batch: it does not split evenly" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("n", [5, 1])
def test_two_processes_write_the_same_samples_and_fid_as_one(tmp_path, one_process_run, inception_weights, n):
    """Shares of 2 and 3 samples (batches of 2 and 1), and one sample for two processes: the files of one."""
    fid_args = ["--fid", tmp_path / "ref", "--fid-weights", inception_weights] if n > 1 else []
    common = [one_process_run, "--num-samples", str(n), "--batch-size", "2", "--sampler", "ddpm", "--steps", "4",
              *fid_args]
    write_images(tmp_path / "ref", 4, seed=1)
    one = subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, common), "--out", str(tmp_path / "a"),
                          "--grid", str(tmp_path / "a.png")], capture_output=True, text=True, cwd=ROOT,
                         env=one_thread_env())
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "sample.py", *common, "--out", tmp_path / "b", "--grid", tmp_path / "b.png")
    files = lambda folder: sorted((str(p.relative_to(folder)) for p in folder.rglob("*.png")), key=lambda n: n[-10:])
    names = files(tmp_path / "a")  # in one folder per class: the labels are functions of (seed, index) as well
    assert [f[-10:] for f in names] == [f"{i:06d}.png" for i in range(n)] and names == files(tmp_path / "b")
    assert {n.split("/")[0] for n in names} <= set(cli.DEMO_CLASSES)
    for name in [*names]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    fid_line = lambda out: [line for line in out.splitlines() if line.startswith("FID:")]
    assert fid_line(one.stdout) == fid_line(two.stdout) and len(fid_line(two.stdout)) == (n > 1)


def test_fid_py_on_two_processes_equals_one(tmp_path, inception_weights):
    write_images(tmp_path / "x", 5, seed=2)
    write_images(tmp_path / "y", 4, seed=3, bright=60)
    args = [tmp_path / "x", tmp_path / "y", "--weights", inception_weights, "--kid", "--kid-subset-size", "3"]
    one = subprocess.run([sys.executable, str(ROOT / "fid.py"), *map(str, args)], capture_output=True, text=True,
                         env=one_thread_env())
    two = torchrun(2, "fid.py", *args)
    assert one.returncode == 0 and one.stdout.startswith("FID:") and two.stdout == one.stdout


def test_every_option_passes_through_torchrun():
    """torchrun's own parser must hand every option of the three scripts to the script: --n would be
    taken as an abbreviation of torchrun's --nnodes / --nproc-per-node, hence --num-samples."""
    from torch.distributed.run import get_args_parser
    for script, call in (("train.py", lambda: train.parse_args([])), ("sample.py", lambda: sample.parse_args([])),
                         ("fid.py", lambda: fid.main([]))):
        p = parser_of(call)
        options = [o for a in p._actions for o in a.option_strings if o.startswith("--") and o not in ("--help", "--n")]
        for option in options:
            got = get_args_parser().parse_args(["--nproc-per-node", "2", script, option, "1"])
            assert got.training_script_args == [option, "1"], (script, option)
    with pytest.raises(SystemExit):  # why --num-samples exists
        get_args_parser().parse_args(["--nproc-per-node", "2", "sample.py", "--n", "5"])


def child_with_rank(parent, rank):
    """The pid of the torchrun worker with RANK=rank under parent (read from /proc)."""
    for _ in range(600):
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(fields[1]) in parent and f"RANK={rank}".encode() in environ:
                return int(stat.parent.name)
        time.sleep(0.1)
    raise AssertionError("no worker found")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_a_killed_rank_ends_every_process_with_one_line_and_the_checkpoint_loads(tmp_path):
    run = tmp_path / "k"
    proc = torchrun(2, "train.py", *DIST, "--out", run, "--steps", "100000", "--save-every", "2", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "ckpt.pt").exists():
        time.sleep(0.1)
    agents = {proc.pid}
    victim = child_with_rank(agents, 1)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("train.py (rank")]
    assert len(ours) == 1 and ours[0].startswith("train.py (rank 0): error:"), err[-3000:]
    ckpt, model, ema, _ = cli.load_checkpoint(run)
    assert ckpt["step"] >= 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
