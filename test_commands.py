"""Tests of train.py and sample.py: runs, resume, sampling modes, editing, pictures and bad input."""
import argparse
import ast
import gzip
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import ddpm
import fid
import sample
import train

import conftest
from conftest import ROOT, parser_of, fid_from_features, read_log, run_ddpm_py_alone, write_images

TINY = ["--preset", "tiny", "--image-size", "16", "--batch-size", "4", "--T", "50", "--schedule", "linear",
        "--sample-n", "4", "--sample-steps", "5", "--workers", "0", "--warmup", "2"]


def mixed_folder(root):
    """Images of several sizes, modes and formats, one corrupt file, one non-image."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    specs = [("a.png", "RGB", (40, 30)), ("b.jpg", "RGB", (16, 16)), ("c.bmp", "L", (20, 24)),
             ("sub/d.webp", "RGB", (33, 17)), ("sub/deeper/e.png", "RGBA", (16, 16)), ("f.png", "P", (18, 18)),
             ("g.PNG", "RGB", (64, 64)), ("h.jpeg", "L", (17, 31))]
    for name, mode, (w, h) in specs:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    run = root / "run"
    assert train.main(["--data", str(mixed_folder(root / "data")), "--out", str(run), "--steps", "6",
                       "--save-every", "3", "--sample-every", "3", "--log-every", "1", *TINY]) == 0
    return run


def test_training_run_folder_holds_everything(trained_run):
    assert json.loads((trained_run / "config.json").read_text())["model"]["image_size"] == 16
    assert [int(r["step"]) for r in read_log(trained_run)] == list(range(1, 7))
    assert sorted(p.name for p in (trained_run / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    grid = Image.open(trained_run / "samples" / "step_000006.png")
    assert grid.size == (2 * 18 + 2, 2 * 18 + 2) and grid.mode == "RGB"  # 4 samples of 16 px, 2 px padding
    assert Image.open(trained_run / "loss.png").size == (640, 360)
    ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and not list(trained_run.rglob("*.tmp"))
    assert set(ckpt) >= {"model", "ema", "optimizer", "step", "epoch", "config", "rng"}
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_ddpm_load_in_a_copied_file_samples_what_the_run_samples(tmp_path, trained_run):
    """ddpm.py alone in an empty folder loads a checkpoint of train.py (model, EMA or raw weights, process,
    configuration) and draws the samples that the toolkit draws from it."""
    out = run_ddpm_py_alone(tmp_path, "for ema in (True, False):\n"
                            f"    model, process, cfg = ddpm.load({str(trained_run / 'ckpt.pt')!r}, ema=ema)\n"
                            "    x = process.dpm_solver_sample(model, (2, 3, 16, 16), steps=5,\n"
                            "                                  generator=ddpm.sample_generators(0, [0, 1]))\n"
                            "    torch.save(x, f'x{int(ema)}.pt')\n"
                            "print(type(process).__name__, cfg['T'], cfg['model']['image_size'])\n")
    assert out.split() == ["Diffusion", "50", "16"]
    ckpt, model, ema, process = cli.load_checkpoint(trained_run)
    for weights, name in ((ema.model, "x1.pt"), (model, "x0.pt")):
        x = process.dpm_solver_sample(weights.eval(), (2, 3, 16, 16), steps=5, generator=ddpm.sample_generators(0, [0, 1]))
        assert torch.equal(torch.load(tmp_path / name), x)
    assert not torch.equal(torch.load(tmp_path / "x0.pt"), torch.load(tmp_path / "x1.pt"))


def test_folder_loading_fits_every_format_and_skips_the_corrupt_file(tmp_path, capsys):
    data = cli.load_folder(mixed_folder(tmp_path), 16, 3)
    assert data.shape == (8, 3, 16, 16) and data.dtype == torch.uint8
    assert "image files skipped: 1 unreadable" in capsys.readouterr().err
    assert cli.load_folder(tmp_path, 12, 1).shape == (8, 1, 12, 12)
    # fitting: short side resized, centre crop
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 5, 20))  # a blue band on the left is cropped away
    assert (cli.fit_image(im, 8, "RGB")[:, :, 0] == np.array([[255], [0], [0]])).all()


def test_a_folder_too_large_for_memory_is_streamed_with_the_same_batches(tmp_path, monkeypatch, capsys):
    data = mixed_folder(tmp_path / "data")
    in_memory = cli.load_folder(data, 16, 3)
    monkeypatch.setattr(cli, "memory_budget", lambda: 0)
    streamed = cli.load_folder(data, 16, 3, workers=2)
    assert isinstance(streamed, cli.StreamedImages) and len(streamed) == len(in_memory) == 8
    assert "decoding each batch from disk" in capsys.readouterr().err
    idx = torch.tensor([7, 0, 3, 3])
    assert torch.equal(streamed[idx], in_memory[idx])
    args = ["--data", str(data), "--steps", "5", "--sample-every", "0", "--log-every", "1", *TINY]
    assert train.main(["--out", str(tmp_path / "streamed"), *args]) == 0
    monkeypatch.setattr(cli, "memory_budget", lambda: 1e12)
    assert train.main(["--out", str(tmp_path / "memory"), *args]) == 0
    assert [r["loss"] for r in read_log(tmp_path / "streamed")] == [r["loss"] for r in read_log(tmp_path / "memory")]


def test_idx_files_are_read_exactly(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + np.array([5, 28, 28], ">i4").tobytes()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + imgs.tobytes())
    assert np.array_equal(cli.read_idx_images(tmp_path / "t10k-images-idx3-ubyte.gz"), imgs)
    assert np.array_equal(cli.load_folder(tmp_path, 28, 1)[:, 0].numpy(), imgs)


def test_bench_digits_are_the_idx_digits_and_nearest_takes_the_lower_half_of_the_nearest_upper_half(tmp_path):
    import bench
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
    imgs[1, :3] = imgs[0, :3] + (imgs[0, :3] < 250)  # 0 and 1 share an upper half but for 1s; 2, 3 far apart
    imgs[2, :3], imgs[3, :3] = 0, 255
    labels = np.array([4, 9, 4, 1], np.uint8)
    for name, dims, data in (("images-idx3", [4, 6, 6], imgs), ("labels-idx1", [4], labels)):
        with gzip.open(tmp_path / f"t10k-{name}-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, len(dims)]) + np.array(dims, ">i4").tobytes() + data.tobytes())
    bench.export_digits(tmp_path, 4, tmp_path / "plain")
    bench.export_digits(tmp_path, 3, tmp_path / "nn", nearest=True)
    read = lambda path: np.array(Image.open(path))
    assert sorted(p.relative_to(tmp_path / "plain").as_posix() for p in (tmp_path / "plain").rglob("*.png")) == [
        "1/00003.png", "4/00000.png", "4/00002.png", "9/00001.png"]
    assert all(np.array_equal(read(tmp_path / "plain" / f"{labels[i]}/{i:05d}.png"), imgs[i]) for i in range(4))
    d = [((imgs[2, :3].astype(float) - imgs[j, :3]) ** 2).sum() for j in (0, 1, 3)]
    nearest = {0: 1, 1: 0, 2: (0, 1, 3)[int(np.argmin(d))]}  # 0 and 1 each other's: each takes the other's original
    for i, j in nearest.items():
        out = read(tmp_path / "nn" / f"{labels[i]}/{i:05d}.png")
        assert np.array_equal(out[:3], imgs[i, :3]) and np.array_equal(out[3:], imgs[j, 3:])


def test_demo_shapes_are_deterministic_and_varied():
    a, b = cli.demo_shapes(64, 32, seed=3), cli.demo_shapes(64, 32, seed=3)
    assert torch.equal(a, b) and a.shape == (64, 3, 32, 32)
    assert a.float().std((1, 2, 3)).min() > 10  # every image has a visible shape on its background
    assert cli.demo_shapes(8, 16, channels=1).shape == (8, 1, 16, 16)


def test_batch_order_is_a_function_of_seed_and_step():
    first_epoch = torch.cat([train.batch_indices(20, 5, s, seed=1)[0] for s in range(4)])
    assert sorted(first_epoch.tolist()) == list(range(20))  # an epoch visits each image once
    assert train.batch_indices(20, 5, 4, seed=1)[1] == 1
    assert torch.equal(train.batch_indices(20, 5, 6, seed=1)[0], train.batch_indices(20, 5, 6, seed=1)[0])


def test_amp_auto_takes_bf16_only_where_the_processor_has_it_and_a_timed_step_is_faster(tmp_path, monkeypatch):
    cpu, timed = torch.device("cpu"), []
    timer = lambda rates: lambda amp: timed.append(amp) or rates[amp]
    for flags, native in (("fpu avx2 avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True),
                          ("fpu amx_tile amx_bf16", True)):
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : {flags}\n")
        assert conftest.NATIVE_BF16(cpu, tmp_path / "cpuinfo") is native
    assert conftest.NATIVE_BF16(cpu, tmp_path / "missing") is False
    monkeypatch.setattr(cli, "native_bf16", lambda device: False)
    assert cli.choose_amp("auto", cpu, timer({}))[0] == "fp32" and timed == []  # emulated bf16: not even timed
    monkeypatch.setattr(cli, "native_bf16", lambda device: True)
    choice, why = cli.choose_amp("auto", cpu, timer({"fp32": 1.0, "bf16": 0.6}))
    assert choice == "bf16" and "a timed step: fp32 1000 ms, bf16 600 ms" in why
    assert timed == ["fp32", "bf16"] * 3  # alternated, each once as a warm-up
    assert cli.choose_amp("auto", cpu, timer({"fp32": 1.0, "bf16": 0.95}))[0] == "fp32"  # not faster enough
    assert cli.choose_amp("bf16", cpu, None) == ("bf16", None) and cli.choose_amp("fp32", cpu, None) == ("fp32", None)
    with pytest.raises(cli.UserError, match="--amp fp16 needs a CUDA device"):
        cli.choose_amp("fp16", cpu, None)


def test_bf16_training_learns_and_agrees_with_float32_within_its_precision():
    """Autocast to bfloat16 with float32 weights: the loss of a fixed batch falls over 40 steps, and the trained
    model's bf16 loss is its fp32 loss to bf16's 8 bits of mantissa (a relative 2^-8 per operation)."""
    torch.manual_seed(0)
    model, d = ddpm.UNet(**dict(ddpm.PRESETS["tiny"], image_size=16)), ddpm.Diffusion(ddpm.make_betas("linear", 100))
    x0 = cli.demo_images(n=32, size=16, seed=0).images.float() / 127.5 - 1
    t, noise = torch.randint(0, 100, (32,), generator=torch.Generator().manual_seed(0)), torch.randn(x0.shape)
    opt, cpu = torch.optim.AdamW(model.parameters(), lr=2e-3), torch.device("cpu")
    losses = []
    for _ in range(40):
        with cli.autocast("bf16", cpu):
            loss = d.loss(model, x0, t=t, noise=noise)
        assert loss.dtype == torch.float32
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        with cli.autocast("bf16", cpu):
            low = d.loss(model, x0, t=t, noise=noise).item()
        assert low == pytest.approx(d.loss(model, x0, t=t, noise=noise).item(), rel=2e-2)


def test_amp_auto_is_recorded_and_a_bf16_run_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "native_bf16", lambda device: True)
    monkeypatch.setattr(cli, "AMP_MARGIN", 100.0)  # any timing takes bf16: the test does not depend on this CPU
    common = ["--data", str(mixed_folder(tmp_path / "data")), "--sample-every", "0", "--log-every", "1", *TINY]
    assert train.main([*common, "--out", str(tmp_path / "full"), "--steps", "6"]) == 0
    assert "amp: bf16 (native bfloat16 on this processor; a timed step: fp32" in capsys.readouterr().err
    assert json.loads((tmp_path / "full" / "config.json").read_text())["amp"] == "bf16"
    assert train.main([*common, "--out", str(tmp_path / "cut"), "--steps", "3"]) == 0
    monkeypatch.setattr(cli, "AMP_MARGIN", 0.0)  # a resumed run keeps its choice: it is not timed again
    assert train.main(["--resume", str(tmp_path / "cut"), "--steps", "6"]) == 0
    assert [r["loss"] for r in read_log(tmp_path / "cut")] == [r["loss"] for r in read_log(tmp_path / "full")]
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("full", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert train.main([*common, "--out", str(tmp_path / "fp32"), "--steps", "6", "--amp", "fp32"]) == 0
    bf16, fp32 = ([float(r["loss"]) for r in read_log(tmp_path / r)] for r in ("full", "fp32"))
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=5e-2)  # bf16 was used, and agrees to its precision
    assert train.main([*common, "--out", str(tmp_path / "x"), "--amp", "fp16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "train.py: error: --amp fp16 needs a CUDA device; on a CPU use --amp bf16 (or auto)"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_and_resume_continues_the_uninterrupted_run(tmp_path, stop):
    """Ctrl-C, or SIGTERM (a job scheduler's stop) in one process, finishes the step, saves and exits:
    status 130 for Ctrl-C (as shells expect: `train.py && sample.py` must not go on), 1 with one line for SIGTERM."""
    data = mixed_folder(tmp_path / "data")
    common = ["--data", str(data), "--steps", "24", "--save-every", "1000", "--sample-every", "0",
              "--log-every", "1", "--amp", "fp32", *TINY]  # fp32 in the subprocess as in this one (conftest)
    assert train.main(["--out", str(tmp_path / "full"), *common]) == 0
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "cut"), *common]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # interrupt once it is properly under way
        log = tmp_path / "cut" / "log.csv"
        if log.exists() and len(log.read_text().splitlines()) > 5:
            break
        time.sleep(0.05)
    proc.send_signal(stop)
    err = proc.communicate(timeout=120)[1]
    if stop == signal.SIGINT:
        assert proc.returncode == 130 and "train.py: interrupted: saved" in err, err
    else:
        assert proc.returncode == 1 and err.strip().splitlines()[-1].startswith("train.py: error: stopped by SIGTERM: "
                                                                                "saved"), err
    cut = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"]
    assert 5 <= cut < 24
    assert train.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"]) == 0
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [str(s) for s in range(1, 25)]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # same batches, noise and updates
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert b["step"] == 24 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    for name in ("1-16.pt", "1-8.pt", "1-4.pt"):  # the snapshots at steps 2, 3, 6: kept through the stop
        sa, sb = (torch.load(tmp_path / r / "snapshots" / name, weights_only=True) for r in ("full", "cut"))
        assert sa["step"] == sb["step"] and all(torch.equal(sa["ema"]["model"][k], sb["ema"]["model"][k])
                                                for k in sa["ema"]["model"])


def test_one_run_at_a_time_on_a_folder_and_a_run_killed_before_its_first_save_starts_again(tmp_path, trained_run,
                                                                                             capsys):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("config.json", "log.csv"):  # a run's files, and no checkpoint yet
        shutil.copy(trained_run / name, out / name)
    (out / ".lock").write_text(str(os.getpid()))  # a live process holds it
    assert train.main([*TINY, "--out", str(out), "--steps", "2", "--sample-every", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by another train.py (process {os.getpid()})" in err[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(dead.stdout.strip())  # killed: its lock is stale, its files are ours
    (out / ".ckpt.pt.123.tmp").write_bytes(b"half a checkpoint")
    (out / "samples").mkdir()
    cli.save_grid(torch.zeros(1, 3, 4, 4), out / "samples" / "step_000400.png")
    assert train.main([*TINY, "--out", str(out), "--steps", "2", "--sample-every", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "config.json", "log.csv", "samples", "snapshots"]
    assert not list((out / "samples").iterdir())  # the old run's grid went with it; no lock is left
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "config.json").write_text('{"model": "mine"}')  # not train.py's: never taken over
    assert train.main([*TINY, "--out", str(tmp_path / "users"), "--steps", "2"]) == 1
    assert (tmp_path / "users" / "config.json").read_text() == '{"model": "mine"}'


def test_resume_says_when_config_json_was_edited_and_the_log_survives_a_full_disk(tmp_path, trained_run, monkeypatch,
                                                                                  capsys):
    shutil.copytree(trained_run, tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg | {"lr": 0.5}))
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "7"]) == 0
    assert "config.json differs from the configuration saved in the checkpoint" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == cfg["lr"]  # the checkpoint's
    log = tmp_path / "r" / "log.csv"
    before, real = log.read_bytes(), os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:len(data) // 2]))  # a disk that fills up
    with pytest.raises(OSError, match="No space left"):
        cli.append_whole(log, b"8,0,0.5,1e-3,10.0\r\n")
    monkeypatch.undo()
    assert log.read_bytes() == before


@pytest.mark.parametrize("case", ["inside", "huge", "lr", "one image", "black", "small", "unicode", "loop", "exif"])
def test_unusual_data_and_settings_give_one_line_or_a_correct_run(tmp_path, capsys, case):
    data = tmp_path / "data ünï 🎲" if case == "unicode" else tmp_path / "data"
    data.mkdir()
    size = 4 if case == "small" else 24
    for i in range(1 if case == "one image" else 6):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels * (case != "black")).save(data / f"{i}.png")
    if case == "loop":  # a symbolic link back to the folder itself: not followed
        (data / "again").symlink_to(data, target_is_directory=True)
    args = [*TINY, "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "3", "--sample-every", "0"]
    if case == "inside":
        assert train.main([*args[:-6], "--out", str(data / "run"), "--steps", "3", "--sample-every", "0"]) == 1
        assert "is inside --data" in capsys.readouterr().err and not (data / "run").exists()
    elif case == "huge":
        assert train.main([*args, "--image-size", "200000"]) == 1
        assert "the first feature map alone needs" in capsys.readouterr().err
    elif case == "lr":
        assert train.main([*args, "--lr", "1e10", "--steps", "30", "--grad-clip", "0"]) == 1
        err = capsys.readouterr().err
        assert "loss is nan" in err or "no longer finite" in err
    elif case == "exif":  # a phone photo stored sideways with its orientation tag: trained upright
        im = Image.fromarray(np.tile(np.arange(24, dtype=np.uint8)[None] * 10, (16, 1)))  # 24 wide, 16 high
        exif = im.getexif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to view
        im.save(data / "side.jpg", exif=exif, quality=100)
        upright = cli.fit_file(data / "side.jpg", 16, "L")[0]
        steps = lambda axis: np.abs(np.diff(upright.astype(int), axis=axis)).sum()
        assert steps(0) > 10 * steps(1)  # the gradient runs down the picture, as the camera saw it
    else:
        assert train.main(args) == 0  # one image, all black, smaller than --image-size, unicode, a loop: a run
        assert (tmp_path / "out" / "ckpt.pt").is_file()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_loss, calls = ddpm.Diffusion.loss, []

    def loss_that_breaks(self, *a, **kw):
        calls.append(1)
        value = real_loss(self, *a, **kw)
        return value * float("nan") if len(calls) == 4 else value

    monkeypatch.setattr(ddpm.Diffusion, "loss", loss_that_breaks)
    code = train.main(["--out", str(tmp_path / "r"), "--steps", "10", "--save-every", "2", "--sample-every", "0",
                       *TINY])
    err = capsys.readouterr().err
    assert code == 1 and "loss is nan at step 3" in err and "Traceback" not in err
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_fid_during_training_and_its_one_notice_without_weights(tmp_path, monkeypatch, inception_weights, capsys):
    base = ["--steps", "4", "--sample-every", "0", "--save-every", "4", "--fid-samples", "6", *TINY]
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL", (tmp_path / "nowhere" / "pt_inception-x.pth").as_uri())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert train.main(["--out", str(tmp_path / "a"), "--fid-every", "2", *base]) == 0  # two FID points, no weights
    err = capsys.readouterr().err
    assert err.count("note: FID skipped") == 1 and not (tmp_path / "a" / "fid.csv").exists()
    real_load = fid.load_inception
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": real_load(inception_weights, device))
    assert train.main(["--out", str(tmp_path / "b"), "--fid-every", "4", *base]) == 0
    rows = (tmp_path / "b" / "fid.csv").read_text().split()
    assert len(rows) == 1 and rows[0].startswith("4,") and float(rows[0][2:]) > 0


@pytest.mark.parametrize("argv,message", [
    (["--data", "/no/such/folder"], "no such folder"),
    (["--data", "EMPTY"], "no images"),
    (["--image-size", "30"], "not divisible by 4"),
    (["--channel-mults", "1,x"], "comma-separated integers"),
    (["--out", "EXISTING"], "holds a run already"),
    (["--resume", "/no/such/run"], "no such checkpoint"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--save-every", "0"], "--save-every must be at least 1"),
    (["--sample-n", "0"], "--sample-n must be at least 1"),
    (["--image-size", "0"], "--image-size must be at least 1"),
    (["--T", "0"], "--T must be at least 1"),
    (["--T", "-5"], "--T must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--dropout", "nan"], "--dropout must be at least 0"),
    (["--channel-mults", "0,0"], "every channel_mult must be at least 1"),
    (["--beta-start", "0.05", "--beta-end", "0.01"], "0 < --beta-start < --beta-end < 1"),
    (["--T", "300", "--schedule", "rescaled-linear", "--beta-end", "2"], "0 < --beta-start < --beta-end < 1"),
    (["--attn-resolutions", "3"], "attention resolutions [3] are not among"),
    (["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "--device"),
    (["--process", "ve", "--sigma", "0.5"], "sigma must be a number above 1"),
    (["--out", "FILE"], "a file, not a folder"),
    (["--out", "USERS"], "not empty and is not a run of train.py"),
    (["--min-snr", "-1"], "--min-snr must be a number >= 0"),
    (["--process", "ve", "--prediction", "v"], "--prediction v does not apply to --process ve"),
    (["--process", "ve", "--min-snr", "5"], "--min-snr does not apply to --process ve"),
    (["--process", "flow", "--prediction", "eps"], "--prediction eps does not apply to --process flow"),
    (["--process", "flow", "--logit-scale", "0"], "--logit-scale must be a positive number"),
    (["--process", "flow", "--logit-mean", "nan"], "logit-normal's mean must be a number"),
    (["--num-heads", "5"], "num_heads must be at least 1 and divide"),
    (["--norm-group-size", "5"], "norm_group_size must be at least 1 and divide"),
    (["--norm-group-size", "-1"], "--norm-group-size must be at least 0"),
])
def test_train_bad_input_is_one_line(tmp_path, trained_run, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("a file of the user's")
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "config.json").write_text("the user's own config")
    places = {"EMPTY": tmp_path / "empty", "EXISTING": trained_run, "FILE": tmp_path / "file", "USERS": tmp_path / "users"}
    argv = [str(places.get(a, a)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "r")]
    assert train.main([*TINY, *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error:") and message in err[-1], err
    assert (tmp_path / "users" / "config.json").read_text() == "the user's own config"  # nothing of theirs lost
    assert not (tmp_path / "r").exists() or "--data" in argv  # checked before the run folder is made


def test_training_defaults_follow_the_preset_recipe_and_ho_et_al_stay_reachable():
    config = lambda *argv: train.run_config(train.parse_args(list(argv)))
    tiny = config("--preset", "tiny")
    assert (tiny["lr"], tiny["prediction"], tiny["min_snr"], tiny["schedule"]) == (1e-3, "eps", 5.0, "linear")
    ho = config("--preset", "tiny", "--lr", "2e-4", "--prediction", "eps", "--min-snr", "0", "--schedule", "linear")
    assert (ho["lr"], ho["min_snr"], train.loss_options(ho)["min_snr"]) == (2e-4, 0.0, None)
    faces = config("--preset", "faces64")
    assert (faces["lr"], faces["prediction"], faces["min_snr"]) == (2e-4, "eps", 0.0)
    assert config("--T", "300")["schedule"] == train.SCHEDULE_AT_OTHER_T
    assert config("--T", "300", "--schedule", "linear")["schedule"] == "linear"  # the seeds' exact betas
    assert config("--process", "ve")["min_snr"] == 0.0
    # 0 asks for the old GroupNorm rule, which a model config spells None (as configs saved before it do)
    assert config("--norm-group-size", "0")["model"]["norm_group_size"] is None
    assert config("--norm-group-size", "8")["model"]["norm_group_size"] == 8
    assert faces["model"].get("norm_group_size") is None


FAULTS = """
import resource, sys
import torch
import cli
on = cli.reuse_freed_memory() if sys.argv[1] == "reuse" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a step's activations: 32 MiB allocated, written and freed
    x = torch.empty(8 << 20).fill_(1.0)
    del x
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_commands_reuse_freed_memory_instead_of_faulting_in_fresh_pages_each_step():
    """cli.reuse_freed_memory (run by every command): a 32 MiB block freed and allocated again twenty times is
    faulted in once (8,192 pages of 4 KiB), where glibc's defaults unmap and map it anew each time (20 times as
    many page faults)."""
    runs = {how: subprocess.run([sys.executable, "-c", FAULTS, how], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split() for how in ("reuse", "default")}
    assert runs["reuse"][0] == "True" and runs["default"][0] == "False"
    reuse, default = int(runs["reuse"][1]), int(runs["default"][1])
    assert default > 15 * 8192 and reuse < 3 * 8192, (reuse, default)


FAKE_PEER = """
import torch


class Net(torch.nn.Module):
    def __init__(self, name, in_ch):
        super().__init__()
        self.name, self.conv = name, torch.nn.Conv2d(in_ch, in_ch, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def build_ours(size, ch, mults, attn, in_ch):
    return Net("ours", in_ch)


def build_peer(size, ch, mults, attn, in_ch):
    {peer}
    return Net("peer", in_ch)


def peer_call(m):
    return lambda x, t: m(x, t)
"""


def test_bench_peer_alternates_the_two_models_and_refuses_a_missing_peer_in_one_line(tmp_path, capsys):
    """bench.py --peer SCRIPT: training and inference of both models in alternated runs (A B A B), the ratio the
    median of the pairs' ratios; a missing script, or one whose peer cannot be imported, is one line."""
    import bench
    script, out = tmp_path / "peer.py", tmp_path / "peer.json"
    script.write_text(FAKE_PEER.format(peer="pass"))
    calls = []
    real = bench.load_peer

    def load(path):
        ours, peer, call = real(path)
        for m in (ours, peer):
            m.register_forward_hook(lambda m, *_: calls.append(m.name))
        return ours, peer, call
    bench.load_peer = load
    try:
        bench.main(["--peer", str(script), "--amp", "fp32", "--quick", "--out", str(out)])
    finally:
        bench.load_peer = real
    rows = json.loads(out.read_text())["peer"]
    assert [(r["task"], r["amp"]) for r in rows] == [("train", "fp32"), ("inference", "fp32")]
    for r in rows:
        assert r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1] and r["ours"] > 0 and r["diffusers"] > 0
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]  # each timed run's model
    assert runs == ["ours", "peer"] * 4  # two pairs a task (--quick), alternated
    capsys.readouterr()
    script.write_text(FAKE_PEER.format(peer="import diffusers_that_is_not_here"))
    for path, says in ((tmp_path / "none.py", "no such file"), (script, "pip install diffusers")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--peer", str(path), "--out", str(tmp_path / "no.json")])
        assert says in str(e.value) and str(e.value).startswith("bench.py: --peer") and "\n" not in str(e.value)
    assert not (tmp_path / "no.json").exists()


def test_every_option_of_every_command_shows_its_default_in_help():
    """The README's claim: `--help` on each script lists every option with its default."""
    import bench
    for name, call in (("train.py", lambda: train.parse_args([])), ("sample.py", lambda: sample.parse_args([])),
                       ("fid.py", lambda: fid.main([])), ("bench.py", bench.main)):
        p = parser_of(call)
        options = [a for a in p._actions if a.option_strings and a.dest != "help"]
        assert p.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        silent = [a.option_strings[0] for a in options if not (a.help and a.help.strip())]  # help-less: no default
        assert not silent, (name, silent)
        formatter = p._get_formatter()
        assert all("%(default)s" in formatter._get_help_string(a) for a in options), name
        assert " ".join(p.format_help().split()).count("(default: ") >= len(options), name


def test_every_file_the_commands_write_goes_through_the_atomic_writer_or_appender():
    """The README's claim that every file is written atomically, read from the code: a file opened for writing
    (open, Image.save, torch.save, np.savez) is the temporary file `tmp` of cli.atomic_write (or a file object
    opened on it), and only cli.atomic_write and cli.append_whole open anything else."""
    writers = {"save", "savez", "savez_compressed", "write_text", "write_bytes"}
    for name in ("cli.py", "train.py", "sample.py", "fid.py", "bench.py"):
        tree = ast.parse((ROOT / name).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.Lambda)) or getattr(fn, "name", "") in ("atomic_write",
                                                                                               "append_whole"):
                continue
            for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call)):
                f = call.func
                mode = next((a.value for a in call.args[1:2] if isinstance(a, ast.Constant)), "r")
                opens = isinstance(f, ast.Name) and f.id == "open" and set(str(mode)) & set("wax")
                saves = isinstance(f, ast.Attribute) and f.attr in writers and not (isinstance(f.value, ast.Name)
                                                                                   and f.value.id == "tmp")
                safe = any(isinstance(a, ast.Name) and a.id in ("tmp", "f") for a in call.args)  # tmp, or a file on it
                assert not ((opens or saves) and not safe), f"{name}:{call.lineno} writes outside the atomic writer"


def test_train_error_has_no_traceback_from_the_shell(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "missing")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "no such folder" in out.stderr


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_writes_a_grid_and_matching_pngs(tmp_path, trained_run, sampler):
    args = [str(trained_run), "--n", "5", "--sampler", sampler, "--steps", "10", "--batch-size", "2"]
    assert sample.main([*args, "--grid", str(tmp_path / "g.png"), "--out", str(tmp_path / "pngs")]) == 0
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert len(pngs) == 5 and grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)
    for k, p in enumerate(pngs):  # each PNG is the grid's tile
        y, x = 2 + (k // 3) * 18, 2 + (k % 3) * 18
        assert np.array_equal(np.asarray(Image.open(p)), grid[y:y + 16, x:x + 16])
    assert sample.main([*args, "--grid", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), grid)  # same seed, same images


def test_sample_uses_ema_unless_told(tmp_path, trained_run):
    for name, extra in (("ema.png", []), ("raw.png", ["--no-ema"])):
        assert sample.main([str(trained_run), "--n", "2", "--steps", "5", "--grid", str(tmp_path / name), *extra]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "ema.png")), np.asarray(Image.open(tmp_path / "raw.png")))


def test_sample_trajectory_forward_interpolate_and_invert(tmp_path, trained_run):
    run = str(trained_run)
    assert sample.main([run, "--n", "3", "--steps", "20", "--grid", str(tmp_path / "s.png"),
                        "--trajectory", str(tmp_path / "t.png")]) == 0
    strip, final = np.asarray(Image.open(tmp_path / "t.png")), np.asarray(Image.open(tmp_path / "s.png"))
    assert strip.shape == (2 + 3 * 18, 2 + 10 * 18, 3)
    for k in range(3):  # the last column is x_0, the sample itself
        assert np.array_equal(strip[2 + k * 18:18 + k * 18, 2 + 9 * 18:18 + 9 * 18],
                              final[2 + (k // 2) * 18:18 + (k // 2) * 18, 2 + (k % 2) * 18:18 + (k % 2) * 18])

    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(img)
    assert sample.main([run, "--forward", str(img), "--grid", str(tmp_path / "f.png")]) == 0
    f = np.asarray(Image.open(tmp_path / "f.png")).astype(float)
    tiles = [f[2:18, 2 + k * 18:18 + k * 18] for k in range(11)]
    src = np.asarray(Image.open(img)).astype(float)
    assert np.array_equal(tiles[0], src)
    # x_t at t = 0 is x_0 plus noise of std sqrt(1 - a-bar_0) (uint8 rounding adds variance 1/12)
    cfg = torch.load(trained_run / "ckpt.pt", weights_only=True)["config"]
    beta0 = 1 - ddpm.make_process(cfg).alphas_cumprod64[0].item()
    assert np.std(tiles[1] - src) == pytest.approx(math.sqrt(127.5 ** 2 * beta0 + 1 / 12), rel=0.15)
    diffs = [np.abs(t - src).mean() for t in tiles[1:]]
    assert diffs == sorted(diffs) and diffs[-1] > 30  # ever further from the image

    assert sample.main([run, "--interpolate", "--n", "6", "--steps", "10", "--grid", str(tmp_path / "i.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "i.png")).shape == (2 + 18, 2 + 6 * 18, 3)

    img2 = tmp_path / "in2.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(img2)
    assert sample.main([run, "--invert", str(img), str(img2), "--steps", "20", "--grid", str(tmp_path / "v.png")]) == 0
    v = np.asarray(Image.open(tmp_path / "v.png")).astype(int)
    top, bottom = v[2:18], v[20:36]
    for k in range(2):  # decoding each image's inversion gives the image back
        assert np.abs(bottom[:, 2 + k * 18:18 + k * 18] - top[:, 2 + k * 18:18 + k * 18]).max() <= 2


def test_sample_fid_in_memory_equals_fid_of_the_written_pngs(tmp_path, trained_run, inception_weights, inception,
                                                             capsys):
    ref = write_images(tmp_path / "ref", 4, seed=5, size=16)
    assert sample.main([str(trained_run), "--n", "4", "--steps", "5", "--grid", str(tmp_path / "g.png"),
                        "--out", str(tmp_path / "pngs"), "--fid", str(ref), "--fid-weights", str(inception_weights)]) == 0
    in_memory = capsys.readouterr().out.strip()
    feats = [fid.folder_activations(p, inception, quiet=True)[0] for p in (tmp_path / "pngs", ref)]
    assert in_memory.startswith("FID: ") and float(in_memory[5:]) == pytest.approx(fid_from_features(*feats), abs=1e-3)


class NotWeights:  # a pickled object a safe load must refuse
    pass


@pytest.mark.parametrize("case,says", [("missing", "no such checkpoint"), ("truncated", "not a torch checkpoint"),
                                       ("random bytes", "not a torch checkpoint"),
                                       ("python objects", "a safe load refuses"),
                                       ("other architecture", "not a checkpoint of this version")])
def test_sample_bad_checkpoint_is_one_line(tmp_path, trained_run, capsys, case, says):
    path = tmp_path / "ckpt.pt"
    if case == "truncated":
        path.write_bytes((trained_run / "ckpt.pt").read_bytes()[:1000])
    elif case == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif case == "python objects":
        torch.save({"config": NotWeights()}, path)
    elif case == "other architecture":
        ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
        ckpt["config"]["model"]["base_channels"] = 32
        torch.save(ckpt, path)
    assert sample.main([str(path), "--n", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[0] and "weights_only" not in err[0]  # the truth, and never the unsafe option
    assert len(err) == 1 and err[0].startswith("sample.py: error:") and str(path) in err[0]


@pytest.fixture(scope="module")
def ve_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ve")
    run = root / "run"
    assert train.main(["--process", "ve", "--sigma", "10", "--data", str(mixed_folder(root / "data")), "--out", str(run),
                       "--steps", "3", "--sample-every", "3", *TINY]) == 0
    return run


def test_a_ve_run_records_its_process_and_samples_with_every_sampler(tmp_path, ve_run, capsys):
    ckpt, model, _, process = cli.load_checkpoint(ve_run)
    assert isinstance(process, ddpm.VESDE) and process.sigma == 10 and ckpt["config"]["process"] == "ve"
    assert model.config["time_scale"] == 1000.0  # t in (0, 1] reaches the embedding as 0..1000
    for sampler, spec in ddpm.SAMPLERS.items():  # every sampler of the registry is on the command line
        steps = ["--steps", "4"] if "steps" in spec.defaults() else []
        assert sample.main([str(ve_run), "--sampler", sampler, *steps, "--rtol", "1e-2", "--atol", "1e-2",
                            "--n", "2", "--grid", str(tmp_path / f"{sampler}.png")]) == 0
        assert Image.open(tmp_path / f"{sampler}.png").size == (2 * 18 + 2, 18 + 2)
    assert "model calls" in capsys.readouterr().err  # the ODE says what it cost
    image = tmp_path / "sampled.png"
    Image.open(tmp_path / "dpm++.png").crop((2, 2, 18, 18)).save(image)
    assert sample.main([str(ve_run), "--invert", str(image), str(image), "--grid", str(tmp_path / "inv.png")]) == 0
    capsys.readouterr()
    for bad, says in ((["--vlb", "2"], "is a ve run"), (["--spacing", "trailing"], "VESDE run has time, lambda"),
                      (["--churn", "1"], "--sampler dpm++ takes no churn (it applies to heun)"),
                      (["--sampler", "ode", "--steps", "5"], "--sampler ode takes no steps"),
                      (["--sampler", "heun", "--tmax", "-1"], "--tmax must be a number > 0")):
        assert sample.main([str(ve_run), *bad, "--grid", str(tmp_path / "no.png")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and not (tmp_path / "no.png").exists()


def test_init_from_copies_the_weights_and_keeps_the_model_and_process(tmp_path, flow_run, capsys):
    """--init-from: a new run whose weights are the run's EMA weights exactly (one step at lr 1e-30 moves none),
    whose model and process are the run's, recorded in its configuration; a clashing setting, a foreign folder
    and impossible combinations are refused with one line, before any work."""
    data = str(mixed_folder(tmp_path / "data"))
    common = ["--init-from", str(flow_run), "--data", data, "--sample-every", "0", "--workers", "0",
              "--batch-size", "4"]
    assert train.main([*common, "--out", str(tmp_path / "tuned"), "--steps", "1", "--lr", "1e-30"]) == 0
    base, tuned = (torch.load(r / "ckpt.pt", weights_only=True) for r in (flow_run, tmp_path / "tuned"))
    assert all(torch.equal(base["ema"]["model"][k], tuned["model"][k]) for k in base["model"])
    cfg = tuned["config"]
    assert cfg["model"] == base["config"]["model"] and cfg["init_from"] == str(flow_run.resolve())
    assert (cfg["process"], cfg["prediction"], cfg["time_density"]) == ("flow", "velocity", "logit-normal")
    capsys.readouterr()
    for bad, says in ((["--process", "ve"], f"--process ve: --init-from {flow_run} has flow"),
                      (["--base-channels", "8"], "--base-channels 8: --init-from"),
                      (["--init-from", str(tmp_path / "data")], "no such checkpoint"),
                      (["--resume", str(tmp_path / "tuned")], "--init-from starts a new run")):
        assert train.main([*common, *bad, "--out", str(tmp_path / "no")]) == 1, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and not (tmp_path / "no").exists(), (bad, err)
    assert train.main(["--data", data, "--objective", "ect", "--out", str(tmp_path / "no")]) == 1
    assert "--objective ect tunes a trained run" in capsys.readouterr().err


def test_init_from_takes_a_new_time_density_and_loss_weight_but_keeps_the_rest(tmp_path, flow_run, capsys):
    """The density of training times and min-SNR weights are training choices: given with --init-from they replace
    the run's (without a note that they need --process flow, which the run has); not given, the run's are kept."""
    common = ["--init-from", str(flow_run), "--data", str(mixed_folder(tmp_path / "data")), "--sample-every", "0",
              "--workers", "0", "--batch-size", "4", "--steps", "1"]
    assert train.main([*common, "--logit-mean", "0.8", "--min-snr", "5", "--out", str(tmp_path / "moved")]) == 0
    assert "has no effect" not in capsys.readouterr().err
    assert train.main([*common, "--out", str(tmp_path / "kept")]) == 0
    moved, kept = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("moved", "kept"))
    base = json.loads((flow_run / "config.json").read_text())
    assert (moved["logit_mean"], moved["min_snr"]) == (0.8, 5.0)
    assert (kept["logit_mean"], kept["min_snr"]) == (base["logit_mean"], base["min_snr"])
    assert moved["process"] == kept["process"] == "flow" and moved["model"] == base["model"]


def test_an_ect_run_tunes_resumes_exactly_and_samples_in_two_calls(tmp_path, flow_run, capsys):
    """--objective ect from a flow run: a run cut at step 2 and resumed gives the uninterrupted run's losses and
    weights (one stage: the stages are spread over --steps, which the cut run's differ); its grids and sample.py
    --sampler cm draw in 1, 2 and 4 calls, unguided by default."""
    common = ["--init-from", str(flow_run), "--data", str(mixed_folder(tmp_path / "data")), "--objective", "ect",
              "--ect-stages", "1", "--sample-every", "4", "--log-every", "1", "--workers", "0", "--batch-size", "4",
              "--sample-n", "4"]
    assert train.main([*common, "--out", str(tmp_path / "full"), "--steps", "4"]) == 0
    assert train.main([*common, "--out", str(tmp_path / "cut"), "--steps", "2"]) == 0
    assert train.main(["--resume", str(tmp_path / "cut"), "--steps", "4"]) == 0
    assert [r["loss"] for r in read_log(tmp_path / "cut")] == [r["loss"] for r in read_log(tmp_path / "full")]
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("full", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "full" / "samples" / "step_000004.png").exists()
    capsys.readouterr()
    for steps in ("1", "2", "4"):
        assert sample.main([str(tmp_path / "full"), "--sampler", "cm", "--steps", steps, "--n", "2",
                            "--out", str(tmp_path / f"cm{steps}")]) == 0
        assert len(list((tmp_path / f"cm{steps}").glob("*.png"))) == 2
    err = capsys.readouterr().err
    assert "autoguidance" not in err and "consistency model" not in err
    assert sample.main([str(tmp_path / "full"), "--n", "2", "--grid", str(tmp_path / "g.png")]) == 0
    assert "is a consistency model (--objective ect): --sampler cm" in capsys.readouterr().err


def test_a_cd_run_distils_the_guided_teacher_resumes_exactly_and_refuses_a_missing_guide(tmp_path, flow_run, ve_run,
                                                                                         capsys):
    """--objective cd: the teacher is guided by the run's 1/16 snapshot in sample.py's interval at the teacher's weight,
    recorded in the configuration; a guide that is the teacher itself gives the unguided teacher's losses
    bit for bit; a cut and resumed run gives the uninterrupted one's; a guide the run did not keep is one line."""
    common = ["--init-from", str(flow_run), "--data", str(mixed_folder(tmp_path / "data")), "--objective", "cd",
              "--ect-stages", "1", "--sample-every", "0", "--log-every", "1", "--workers", "0", "--batch-size", "4"]
    assert train.main([*common, "--out", str(tmp_path / "full"), "--steps", "3"]) == 0
    cfg = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["config"]
    assert cfg["teacher_guide"] == str((flow_run / "snapshots" / "1-16.pt").resolve())
    assert (cfg["teacher_guidance"], cfg["teacher_interval"]) == (train.TEACHER_AUTOGUIDANCE, [0.5, 10.0])
    assert train.main([*common, "--out", str(tmp_path / "cut"), "--steps", "2"]) == 0
    assert train.main(["--resume", str(tmp_path / "cut"), "--steps", "3"]) == 0
    assert [r["loss"] for r in read_log(tmp_path / "cut")] == [r["loss"] for r in read_log(tmp_path / "full")]
    itself, plain = ([*common, "--teacher-guide", str(flow_run), "--teacher-guidance", "3"],
                     [*common, "--teacher-guidance", "1"])
    for name, extra in (("itself", itself), ("plain", plain)):
        assert train.main([*extra, "--out", str(tmp_path / name), "--steps", "3"]) == 0
    losses = [[r["loss"] for r in read_log(tmp_path / name)] for name in ("itself", "plain", "full")]
    assert losses[0] == losses[1] != losses[2]
    assert sample.main([str(tmp_path / "full"), "--sampler", "cm", "--steps", "2", "--n", "2",
                        "--out", str(tmp_path / "cm")]) == 0
    capsys.readouterr()
    for bad, says in ((["--teacher-guide", "1/3"], "--teacher-guide 1/3: "),
                      (["--teacher-guide", str(ve_run)], f"--teacher-guide {ve_run}: its "),
                      (["--teacher-guidance", "-1"], "--teacher-guidance must be at least 0")):
        assert train.main([*common, *bad, "--out", str(tmp_path / "no")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and not (tmp_path / "no").exists(), (bad, err)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    run = root / "run"
    assert train.main(["--process", "flow", "--data", str(mixed_folder(root / "data")), "--out", str(run),
                       "--steps", "3", "--sample-every", "3", *TINY[:6], *TINY[10:]]) == 0
    return run


def test_a_flow_run_records_its_process_and_samples_with_every_sampler(tmp_path, flow_run, capsys):
    ckpt, net, process = cli.load_run(flow_run)
    cfg = ckpt["config"]
    assert isinstance(process, ddpm.FlowMatching) and process.density == "logit-normal"
    assert (cfg["process"], cfg["prediction"], cfg["min_snr"]) == ("flow", "velocity", 0.0)
    assert isinstance(net, ddpm.Predictor) and net.kind == "velocity" and net.model.config["time_scale"] == 1000.0
    image = tmp_path / "input.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    for name, extra in [(s, ["--sampler", s]) for s in ("ddpm", "ddim", "dpm++", "em", "pc", "ode")] + [
            ("guided", ["--guidance", "2", "--guide", str(flow_run)]), ("bf16", ["--amp", "bf16"]),
            ("inpaint", ["--inpaint", str(image), "--mask", "center"]), ("edit", ["--edit", str(image)])]:
        steps = ["--steps", "4"] if "--sampler" in extra and extra[1] in ("ddpm", "ddim", "dpm++", "em", "pc") else []
        assert sample.main([str(flow_run), *extra, *steps, "--rtol", "1e-2", "--atol", "1e-2", "--n", "2",
                            "--out", str(tmp_path / name)]) == 0, name
        pixels = np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / name).glob("*.png"))])
        assert len(pixels) == 2 and pixels.std() > 0, name  # images, not a constant from NaN
    assert sample.main([str(flow_run), "--nll", "2", "--rtol", "1e-2", "--atol", "1e-2"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    for bad, says in ((["--vlb", "2"], "is a flow run"),
                      (["--spacing", "lambda"], "FlowMatching run has shifted, time")):
        assert sample.main([str(flow_run), *bad, "--grid", str(tmp_path / "no.png")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and not (tmp_path / "no.png").exists()


def test_sample_nll_is_bits_per_dim_of_dequantised_training_images_on_the_8_bit_scale(trained_run, capsys):
    """x = (k + u) / 128 - 1 maps [0, 256) onto [-1, 1): densities differ by 128^D, so 8-bit bits/dim = ours + 7."""
    assert sample.main([str(trained_run), "--nll", "3", "--rtol", "1e-3", "--atol", "1e-3", "--seed", "4"]) == 0
    out = capsys.readouterr().out.strip()
    value, se = float(out.split()[1]), float(out.split()[3])
    ckpt, _, ema, process = cli.load_checkpoint(trained_run)
    cfg = ckpt["config"]
    data = cli.load_folder(cfg["data"], 16, 3)
    k = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(4))[:3]].float()
    g = torch.Generator().manual_seed(4)
    u = torch.rand(k.shape, generator=g)
    bpd = process.bits_per_dim(ema.model.eval(), (k + u) / 128 - 1, rtol=1e-3, atol=1e-3, generator=g) + 7
    assert value == pytest.approx(bpd.mean().item(), abs=1e-4) and se == pytest.approx(bpd.std().item() / math.sqrt(3), abs=1e-4)


def test_sample_vlb_prints_the_bound_of_training_images_and_its_terms(trained_run, capsys):
    assert sample.main([str(trained_run), "--vlb", "3", "--seed", "2"]) == 0
    out = capsys.readouterr().out.strip()
    ckpt, _, ema, process = cli.load_checkpoint(trained_run)
    data = cli.load_folder(ckpt["config"]["data"], 16, 3)
    x0 = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(2))[:3]].float() / 127.5 - 1
    terms = process.vlb_bits_per_dim(ema.model.eval(), x0, generator=torch.Generator().manual_seed(2))
    assert out.startswith(f"VLB bits/dim: {terms['total'].mean().item():.4f} +- ")
    assert f"prior {terms['prior'].mean().item():.4f}, kl {terms['kl'].mean().item():.4f}" in out
    # --variance is the bound's here, not a sampler's setting
    assert sample.main([str(trained_run), "--vlb", "3", "--seed", "2", "--variance", "posterior"]) == 0
    terms = process.vlb_bits_per_dim(ema.model.eval(), x0, variance="posterior",
                                     generator=torch.Generator().manual_seed(2))
    assert capsys.readouterr().out.startswith(f"VLB bits/dim: {terms['total'].mean().item():.4f} +- ")


@pytest.mark.parametrize("sampler,extra", [("dpm++", ["--order", "3"]), ("ddpm", ["--steps", "7"]),
                                           ("ddim", ["--spacing", "logsnr"]), ("dpm++", ["--eta", "0"])])
def test_sample_fast_samplers_from_the_command_line(tmp_path, trained_run, sampler, extra):
    args = [str(trained_run), "--n", "3", "--sampler", sampler, *extra]
    assert sample.main([*args, "--grid", str(tmp_path / "a.png")]) == 0
    assert sample.main([*args, "--grid", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_the_default_sampler_is_sde_dpm_solver(tmp_path, trained_run):
    """sample.py's default is DPM-Solver++(3M) with eta = 1 (the best FD per model call, docs/samplers.md)."""
    pictures = {}
    for name, extra in (("default", []), ("eta1", ["--sampler", "dpm++", "--eta", "1", "--order", "3"]),
                        ("eta0", ["--eta", "0"]), ("2M", ["--order", "2"])):
        assert sample.main([str(trained_run), "--n", "3", "--steps", "8", "--grid", str(tmp_path / f"{name}.png"),
                            *extra]) == 0
        pictures[name] = (tmp_path / f"{name}.png").read_bytes()
    assert pictures["default"] == pictures["eta1"] != pictures["eta0"] != pictures["2M"] != pictures["default"]


def test_ddpm_load_of_a_file_that_is_not_a_checkpoint_is_a_value_error_without_unsafe_advice(tmp_path, trained_run):
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    (tmp_path / "damaged.pt").write_bytes((trained_run / "ckpt.pt").read_bytes()[:500])
    torch.save({"config": {"model": {}}, "x": np.float64(1.0).__class__}, tmp_path / "unsafe.pt")  # a class: pickled
    for name, says in (("foreign.pt", "not a checkpoint of train.py (KeyError"),
                       ("damaged.pt", "not a checkpoint that loads safely"),
                       ("unsafe.pt", "not a checkpoint that loads safely")):
        with pytest.raises(ValueError, match=re.escape(says)) as caught:
            ddpm.load(tmp_path / name)
        assert "weights_only=False" not in str(caught.value) and "unsafe" not in str(caught.value).replace(
            "unsafe.pt", "")


def test_an_unconditional_run_is_autoguided_by_its_early_snapshot_unless_told(tmp_path, trained_run, capsys):
    """train.py keeps the EMA at 1/16, 1/8 and 1/4 of the run as checkpoints; sample.py guides an unconditional
    run by the 1/16 one at w = its process's autoguidance by default, names it, and --guidance 1 is the plain model."""
    assert sorted(p.name for p in (trained_run / "snapshots").iterdir()) == ["1-16.pt", "1-4.pt", "1-8.pt"]
    steps = {p.stem: torch.load(p, weights_only=True)["step"] for p in (trained_run / "snapshots").iterdir()}
    assert steps == {"1-16": 1, "1-8": 1, "1-4": 2}  # round(fraction x 6 steps), at least 1
    guide, _, cfg = ddpm.load(trained_run / "snapshots" / "1-16.pt")
    assert json.loads(json.dumps(cfg)) == json.loads((trained_run / "config.json").read_text())
    pictures, said = {}, {}
    w = f"{ddpm.Diffusion.autoguidance:g}"
    for name, extra in (("default", []), ("explicit", ["--guide", "1/16", "--guidance", w]),
                        ("by_path", ["--guide", str(trained_run / "snapshots" / "1-16.pt"), "--guidance", w]),
                        ("plain", ["--guidance", "1"]), ("quarter", ["--guide", "1/4"]),
                        ("everywhere", ["--guidance-interval", "0,inf"]),
                        ("interval", ["--guidance-interval", "0,0.3"])):  # this run's sigma/alpha: 0.01 to 0.8
        assert sample.main([str(trained_run), "--n", "3", "--steps", "6", "--grid", str(tmp_path / f"{name}.png"),
                            *extra]) == 0
        pictures[name], said[name] = (tmp_path / f"{name}.png").read_bytes(), capsys.readouterr().err
    assert pictures["default"] == pictures["explicit"] == pictures["by_path"]
    assert len({pictures[k] for k in ("default", "plain", "quarter", "interval", "everywhere")}) == 5
    lo, hi = cli.AUTOGUIDANCE_INTERVAL
    assert (f"autoguidance: w = {w} where {lo} < sigma/alpha <= {hi}, guided by "
            f"{trained_run / 'snapshots' / '1-16.pt'} (step 1); --guidance 1") in said["default"]
    assert "autoguidance" not in said["plain"] and "where 0.0 < sigma/alpha <= 0.3" in said["interval"]
    net, x, t = ddpm.load(trained_run / "ckpt.pt")[0], torch.zeros(2, 3, 16, 16), torch.tensor([10, 10])
    assert not torch.equal(guide(x, t), net(x, t))  # an earlier EMA than the run's


def test_a_guide_must_match_the_run_and_a_run_without_snapshots_is_plain(tmp_path, trained_run, cond_run, capsys):
    assert sample.main([str(trained_run), "--guide", str(cond_run), "--grid", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its channels (1) differ from the run's (3)" in err[0]
    run = tmp_path / "bare"
    assert train.main([*TINY, "--out", str(run), "--steps", "2", "--snapshots", "none", "--sample-every", "0"]) == 0
    assert not (run / "snapshots").exists()
    capsys.readouterr()
    assert sample.main([str(run), "--n", "2", "--steps", "3", "--grid", str(tmp_path / "a.png")]) == 0
    assert "autoguidance" not in capsys.readouterr().err
    assert sample.main([str(run), "--guidance", "2", "--grid", str(tmp_path / "b.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kept no snapshot at 1/16 of its training: name a guide with --guide" in err[0]
    assert sample.main([str(run), "--n", "2", "--steps", "3", "--guide", str(trained_run / "snapshots" / "1-4.pt"),
                        "--grid", str(tmp_path / "c.png")]) == 0  # another run's snapshot guides it
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_a_v_prediction_run_is_sampled_through_its_eps_form(tmp_path):
    run = tmp_path / "v"
    assert train.main([*TINY, "--out", str(run), "--steps", "3", "--sample-every", "0", "--prediction", "v",
                       "--min-snr", "5", "--num-heads", "2"]) == 0
    ckpt, model, ema, d = cli.load_checkpoint(run)
    cfg = ckpt["config"]
    assert (cfg["prediction"], cfg["min_snr"], cfg["model"]["num_heads"]) == ("v", 5.0, 2)
    net = ddpm.sampling_model(ema.model, d, cfg)
    assert isinstance(net, ddpm.Predictor) and net.kind == "v" and net.model is ema.model
    assert ddpm.sampling_model(ema.model, d, dict(cfg, prediction="eps")) is ema.model
    assert sample.main([str(run), "--n", "2", "--steps", "3", "--grid", str(tmp_path / "g.png")]) == 0


def test_sample_nearest_finds_copies_of_training_images(tmp_path, trained_run, monkeypatch, capsys, inception_weights):
    ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
    images = cli.load_folder(ckpt["config"]["data"], 16, 3)
    grid = tmp_path / "near.png"
    monkeypatch.setattr(fid, "weights_cache_path", lambda: tmp_path / "no-weights.pth")  # pixels, no download
    assert sample.main([str(trained_run), "--n", "3", "--steps", "3", "--nearest", "2", "--nearest-grid", str(grid),
                        "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "of 3 samples" in out and "pixels" in out
    assert np.asarray(Image.open(grid)).shape == (2 + 3 * 18, 2 + 3 * 18, 3)  # a row each: sample, 2 neighbours

    copies = images[[4, 0, 6]]  # a model that copies its training set: every sample sits on a training image
    monkeypatch.setattr(sample, "generate", lambda args, d, net, cfg, n, procs, each, *a, **k:
                        each(0, copies.float() / 127.5 - 1))
    assert sample.main([str(trained_run), "--n", "3", "--nearest", "1", "--nearest-grid", str(grid),
                        "--grid", str(tmp_path / "g.png"), "--fid-weights", str(inception_weights)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nearest: 100.0% of 3 samples") and "Inception features" in out
    tiles = np.asarray(Image.open(grid))
    for row in range(3):  # the nearest training image is the copy itself
        y = 2 + row * 18
        assert np.array_equal(tiles[y:y + 16, 2:18], tiles[y:y + 16, 20:36])
    assert sample.main([str(trained_run), "--nearest", "50"]) == 1


def test_every_file_is_written_atomically_and_a_failed_write_leaves_the_old_one(tmp_path, monkeypatch):
    grid = tmp_path / "samples.png"
    cli.save_grid(torch.zeros(4, 3, 8, 8), grid)
    before = grid.read_bytes()

    def full_disk(self, fp, format=None, **kw):  # writes half a file, then fails as a full disk does
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError):
        cli.save_grid(torch.ones(4, 3, 8, 8), grid)
    assert grid.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]
    monkeypatch.undo()
    fid.save_stats(tmp_path / "stats", np.ones(2), np.eye(2))  # the exact name: numpy would write stats.npz
    assert (tmp_path / "stats").is_file() and not (tmp_path / "stats.npz").exists()
    assert np.array_equal(fid.load_stats(tmp_path / "stats")[1], np.eye(2))


def test_sample_refuses_a_picture_it_cannot_write_before_sampling(tmp_path, trained_run, monkeypatch, capsys):
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled before checking --grid"))
    for bad in (["--grid", str(tmp_path / "out.xyz")], ["--trajectory", str(tmp_path / "t")]):
        assert sample.main([str(trained_run), "--n", "2", *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write images with the extension" in err[0]


def test_a_presets_attention_missing_at_this_size_is_dropped_with_a_note(capsys):
    cfg = train.run_config(train.parse_args(["--image-size", "28"]))["model"]
    assert cfg["attn_resolutions"] == [] and "attention at [8] does not exist at 28 px" in capsys.readouterr().err
    assert train.run_config(train.parse_args([]))["model"]["attn_resolutions"] == [8]
    with pytest.raises(ValueError, match="not among"):
        train.run_config(train.parse_args(["--image-size", "28", "--attn-resolutions", "8"]))


@pytest.mark.parametrize("argv,message", [
    (["--eta", "nan"], "--eta must be a number >= 0"), (["--mix", "nan"], "--mix must be a number"),
    (["--snr", "0"], "--snr must be a number > 0"), (["--rtol", "-1"], "--rtol must be at least 1e-6"),
    (["--atol", "1e-12"], "--atol must be at least 1e-6 (float32 reaches no smaller tolerance)"),
    (["--steps", "0"], "--steps must be at least 1"), (["--n", "0"], "--num-samples must be at least 1"),
    (["--guide", "1/3"], "has no snapshot at 1/3 of its training (it has 1/16, 1/4, 1/8)"),
    (["--guide", "nowhere/ckpt.pt"], "nowhere/ckpt.pt: no such checkpoint"),
    (["--guidance-interval", "3,1"], "--guidance-interval takes LO,HI with 0 <= LO < HI"),
    (["--guidance-interval", "x"], "--guidance-interval takes LO,HI"), (["--guidance", "-1"], "--guidance must be"),
    (["--sampler", "cm", "--eta", "1.5"], "--eta with --sampler cm is the share of fresh noise, at most 1, got 1.5"),
])
def test_sample_bad_numbers_are_one_line_before_sampling(tmp_path, trained_run, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled with a bad number"))
    assert sample.main([str(trained_run), *argv, "--grid", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "g.png").exists()


# ----------------------------------------------------------------------------------------------
# class-conditional runs, editing and where the pictures go


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A grey class-conditional run on the demo shapes (classes circle, square, triangle)."""
    run = tmp_path_factory.mktemp("cond") / "run"
    assert train.main([*TINY, "--class-cond", "--channels", "1", "--out", str(run), "--steps", "3",
                       "--sample-every", "3", "--sample-n", "6"]) == 0
    return run


def test_labels_come_from_class_folders_and_idx_files(tmp_path, capsys):
    for rel in ("b/1.png", "a/deep/2.png", "a/3.png", "c/x.png"):  # nested folders belong to their top-level class
        (tmp_path / "set" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), int(rel[-5]) * 40 if rel[-5].isdigit() else 0, np.uint8)).save(tmp_path / "set" / rel)
    (tmp_path / "set" / "c" / "x.png").write_bytes(b"not a png")  # skipped: c has no readable image left
    assert cli.find_classes(tmp_path / "set") == ["a", "b", "c"]  # from the listing, before decoding
    with pytest.raises(cli.UserError, match="class c has no readable image; remove it or add images"):
        cli.load_images(tmp_path / "set", 8, 1, labelled=True)  # it would train on nothing and be sampled
    (tmp_path / "set" / "c" / "x.png").unlink()
    (tmp_path / "set" / "empty").mkdir()
    data = cli.load_images(tmp_path / "set", 8, 1, labelled=True)
    assert "note: --data {}: c, empty hold no images and are not classes".format(tmp_path / "set") in \
        capsys.readouterr().err
    assert data.classes == ["a", "b"] == cli.find_classes(tmp_path / "set")
    assert data.labels.tolist() == [0, 0, 1]  # a/3.png, a/deep/2.png, b/1.png in sorted order
    assert data.images[:, 0, 0, 0].tolist() == [120, 80, 40]
    images, labels = np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2), np.array([7, 3, 7, 9, 3], np.uint8)
    (tmp_path / "idx").mkdir()
    with gzip.open(tmp_path / "idx" / "t-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([5, 2, 2], ">i4").tobytes() + images.tobytes())
    with gzip.open(tmp_path / "idx" / "t-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([5], ">i4").tobytes() + labels.tobytes())
    data = cli.load_images(tmp_path / "idx", 2, 1, labelled=True)
    assert data.classes == ["3", "7", "9"] and data.labels.tolist() == [1, 0, 1, 2, 0]
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    (tmp_path / "set" / "loose.png").write_bytes((tmp_path / "set" / "b" / "1.png").read_bytes())
    for folder, says in ((tmp_path / "set", "loose.png lies in the folder itself"),):
        with pytest.raises(cli.UserError, match=says):
            cli.find_classes(folder)
    (tmp_path / "idx" / "t-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(cli.UserError, match="no labels file t-labels-idx1-ubyte.gz"):
        cli.load_images(tmp_path / "idx", 2, 1, labelled=True)


def test_a_class_conditional_run_sees_its_labels_or_the_null_class(tmp_path, monkeypatch, capsys):
    """Every label the network is given in training is the batch's own, or the null class, about p of them."""
    seen, real = [], ddpm.UNet.forward
    monkeypatch.setattr(ddpm.UNet, "forward", lambda self, x, t, y=None: seen.append(y.clone()) or real(self, x, t, y))
    args = [*TINY, "--class-cond", "--out", str(tmp_path / "r"), "--steps", "40", "--batch-size", "16",
            "--sample-every", "0", "--label-dropout", "0.25"]
    assert train.main(args) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    truth = cli.demo_images(size=16, seed=0).labels
    assert cfg["classes"] == cli.DEMO_CLASSES and cfg["class_counts"] == torch.bincount(truth).tolist()
    assert cfg["model"]["num_classes"] == 3 and f"classes: circle {cfg['class_counts'][0]}" in capsys.readouterr().err
    dropped = 0
    for step, y in enumerate(seen):
        batch = truth[train.batch_indices(len(truth), 16, step, 0)[0]]
        assert ((y == batch) | (y == 3)).all()  # its own label, or the null class: never another's
        dropped += (y == 3).sum().item()
    assert abs(dropped / (40 * 16) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 640)


def test_sample_classes_rows_and_folders(tmp_path, cond_run):
    out = tmp_path / "all"
    assert sample.main([str(cond_run), "--class", "all", "--n", "6", "--steps", "3", "--out", str(out)]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "circle/000000.png", "circle/000001.png", "square/000002.png", "square/000003.png", "triangle/000004.png",
        "triangle/000005.png"]  # classes in equal blocks, in order
    assert Image.open(cond_run / "samples.png").size == (2 * 18 + 2, 3 * 18 + 2)  # one row per class, two columns
    assert not (out / "samples.png").exists()  # --out holds the samples alone, ready for FID
    assert sample.main([str(cond_run), "--class", "square,2", "--n", "4", "--steps", "3", "--out", str(tmp_path / "two"),
                        "--guidance", "2"]) == 0
    assert sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("0*.png")) == [
        "square/000000.png", "square/000001.png", "triangle/000002.png", "triangle/000003.png"]
    assert sample.main([str(cond_run), "--n", "30", "--steps", "2", "--out", str(tmp_path / "freq")]) == 0
    counts = [len(list((tmp_path / "freq" / c).glob("*.png"))) for c in cli.DEMO_CLASSES]
    expected = cli.frequency_labels(json.loads((cond_run / "config.json").read_text())["class_counts"], 30, 0)
    assert counts == torch.bincount(expected, minlength=3).tolist() and sum(counts) == 30


@pytest.mark.parametrize("run,argv,message", [
    ("cond", ["--class", "7"], "--class 7: not a class of this run (3 classes: circle, square, triangle)"),
    ("cond", ["--class", "hexagon"], "--class hexagon: not a class of this run"),
    ("plain", ["--class", "1"], "is not class-conditional"),
    ("cond", ["--guidance", "nan"], "--guidance must be a number >= 0"),
    ("cond", ["--invert", "a.png", "b.png", "--class", "0,1"], "takes one class"),
])
def test_bad_class_arguments_are_one_line_before_sampling(tmp_path, trained_run, cond_run, monkeypatch, capsys, run,
                                                          argv, message):
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled with a bad label"))
    path = cond_run if run == "cond" else trained_run
    assert sample.main([str(path), *argv, "--grid", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "g.png").exists()


def test_sdedit_at_strength_0_is_the_input_and_at_1_plain_sampling(tmp_path, trained_run):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    assert sample.main([str(trained_run), "--edit", str(image), "--strength", "0,0.5,1", "--n", "2", "--steps", "4",
                        "--out", str(tmp_path / "e")]) == 0
    assert sample.main([str(trained_run), "--n", "2", "--steps", "4", "--out", str(tmp_path / "plain")]) == 0
    read = lambda p: np.asarray(Image.open(p))
    assert np.array_equal(read(tmp_path / "e" / "in_s0_1.png"), read(image))
    for k in range(2):
        assert np.array_equal(read(tmp_path / "e" / f"in_s1_{k}.png"), read(tmp_path / "plain" / f"{k:06d}.png"))
    assert not np.array_equal(read(tmp_path / "e" / "in_s0.5_0.png"), read(image))
    assert Image.open(trained_run / "edit.png").size == ((1 + 3 * 2) * 18 + 2, 18 + 2)  # input, 3 strengths x 2


def test_inversion_editing_moves_a_gaussian_input_by_the_closed_form():
    """sample.py's --edit-by inversion: x0 DDIM-inverted to t0 lands on the flow's x_t0 = a mu + (D^1/2 / S)(x0 - mu),
    D = a^2 S^2 + s^2, and the stochastic decoding draws p(x0' | x_t0): x0' ~ N(mu + (a S / D^1/2)(x0 - mu),
    S^2 s^2 / D). An input pixel of 0.9 against data N(0, 0.3^2) moves, where deterministic decoding returned it.
    (Data inside [-1, 1], as the command line clips each x0_hat to it.)"""
    mu, sd = 0.0, 0.3
    d = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    args = sample.parse_args(["run", "--edit", "x.png", "--edit-by", "inversion", "--sampler", "ddpm", "--steps", "200"])
    args.strength_now, args.guide_net, args.classes, args.start = 0.6, None, None, None
    args.start = sample.edit_start(args, d)
    x0 = torch.full((4096, 1, 2, 2), 0.9)
    x = sample.edit_batch(args, d, ddpm.gaussian_eps(d, mu, sd), {"model": {}, "class_cond": False}, x0, None,
                          ddpm.sample_generators(0, range(4096)), None)
    a, s = (v.item() for v in d.marginal_at(torch.tensor([args.start])))
    D = a ** 2 * sd ** 2 + s ** 2
    assert args.start == 599 and x.mean().item() == pytest.approx(mu + a * sd / math.sqrt(D) * (0.9 - mu), abs=0.01)
    assert x.std().item() == pytest.approx(sd * s / math.sqrt(D), rel=0.03)


def test_inversion_editing_from_the_command_line_is_an_edit(tmp_path, trained_run, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    for name, extra in (("inv", []), ("noise", ["--edit-by", "noise"]), ("det", ["--eta", "0"])):
        argv = [str(trained_run), "--edit", str(image), "--steps", "8", "--out", str(tmp_path / name)]
        assert sample.main([*argv, *([] if name == "noise" else ["--edit-by", "inversion"]), *extra]) == 0
    read = lambda p: np.asarray(Image.open(p)).astype(int)
    edited, noised = read(tmp_path / "inv" / "in_s0.5_0.png"), read(tmp_path / "noise" / "in_s0.5_0.png")
    assert np.abs(edited - read(image)).mean() > 10 and not np.array_equal(edited, noised)
    assert "decoded deterministically gives the input back" in capsys.readouterr().err  # the --eta 0 run


def test_options_without_effect_and_untrained_null_labels_are_named(tmp_path, capsys):
    base = [*TINY, "--steps", "2", "--sample-every", "0", "--channels", "1"]
    assert train.main([*base, "--out", str(tmp_path / "a"), "--label-dropout", "0.2", "--sigma", "9"]) == 0
    err = capsys.readouterr().err
    assert "note: --label-dropout has no effect without --class-cond" in err
    assert "note: --sigma has no effect without --process ve" in err
    assert train.main([*base, "--out", str(tmp_path / "b"), "--class-cond", "--label-dropout", "0"]) == 0
    assert "--label-dropout 0 leaves the null label untrained" in capsys.readouterr().err
    assert sample.main([str(tmp_path / "b"), "--n", "2", "--steps", "2", "--class", "all"]) == 0
    err = capsys.readouterr().err
    assert "its unconditional model (the null label) is untrained and guidance 1.5 follows it" in err
    assert "note: --num-samples 2 is fewer than the 3 classes of --class: only the first 2 are drawn" in err
    assert sample.main([str(tmp_path / "b"), "--n", "2", "--steps", "2", "--guidance", "1"]) == 0
    assert "untrained" not in capsys.readouterr().err


def test_sampling_again_into_one_folder_replaces_the_earlier_output(tmp_path, trained_run, capsys):
    out = tmp_path / "s"
    assert sample.main([str(trained_run), "--n", "4", "--steps", "2", "--out", str(out)]) == 0
    assert sample.main([str(trained_run), "--n", "2", "--steps", "2", "--out", str(out), "--seed", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]  # not four: no mixed FID
    assert "note: removed the 4 pictures of an earlier output in" in capsys.readouterr().err
    assert sample.main([str(trained_run), "--n", "2", "--out", str(trained_run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the run's own folder: give the images a folder of their own" in err[0]


def test_repaint_steps_counts_and_shared_stems_are_checked_and_ignored_options_named(tmp_path, trained_run, capsys):
    """Bad combinations are one line before any sampling; an option that has no effect is a note."""
    for name in ("x.png", "x.jpg"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "one" / "a.png")
    run = str(trained_run)
    for argv, says in (
            (["--inpaint", str(tmp_path / "one"), "--mask", "lower-half", "--sampler", "ddpm", "--resample", "2",
              "--steps", "10", "--jump", "10"], "--jump 10 must be below --steps 10"),
            (["--sampler", "ddim", "--steps", "51"], "--steps 51: the run's chain has T = 50 steps"),
            (["--n", "100000000"], "--num-samples must be at most 10,000,000"),
            (["--edit", str(tmp_path)], "x.jpg and x.png in {} share the name x".format(tmp_path))):
        assert sample.main([run, *argv, "--grid", str(tmp_path / "g.png")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert sample.main([run, "--n", "2", "--steps", "2", "--jump", "5", "--strength", "0.3",
                        "--grid", str(tmp_path / "g.png")]) == 0
    err = capsys.readouterr().err
    assert "note: --jump has no effect without --resample" in err and "note: --strength has no effect without --edit" \
        in err


def test_inpainting_from_the_command_line_keeps_the_known_half(tmp_path, cond_run):
    g = np.random.default_rng(1)
    for rel in ("square/a.png", "b.png"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "in" / rel)
    results = {}
    for extra in ([], ["--recon-guidance", "0"], [f"--recon-guidance={sample.RECON_GUIDANCE}"],
                  ["--sampler", "ddpm", "--steps", "12", "--resample", "3", "--jump", "4", "--class", "square"],
                  ["--recon-guidance", "5", "--class", "square"]):
        out = tmp_path / f"out{len(results)}"
        assert sample.main([str(cond_run), "--inpaint", str(tmp_path / "in"), "--mask", "lower-half", "--n", "2",
                            "--steps", "4", "--out", str(out), *extra]) == 0
        for rel in ("square/a", "b"):
            source = np.asarray(Image.open(tmp_path / "in" / f"{rel}.png"))
            for k in range(2):
                result = np.asarray(Image.open(out / f"{rel}_{k}.png"))
                assert np.array_equal(result[:8], source[:8]) and not np.array_equal(result[8:], source[8:])
                results.setdefault(" ".join(extra), []).append(result)
        assert Image.open(cond_run / "inpaint.png").size == (4 * 18 + 2, 2 * 18 + 2)  # input, masked input, 2 results
    same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(results[a], results[b]))
    assert same("", f"--recon-guidance={sample.RECON_GUIDANCE}") and not same("", "--recon-guidance 0")  # the default


def test_masks_and_images_of_every_mode_and_size_load_or_fail_with_one_line(tmp_path, cond_run, trained_run,
                                                                            monkeypatch, capsys):
    grey = np.random.default_rng(2).integers(0, 256, (32, 24), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(grey).convert("P").save(tmp_path / "in" / "palette.png")
    Image.fromarray(grey).convert("RGBA").save(tmp_path / "in" / "rgba.png")
    Image.fromarray(grey).convert("CMYK").save(tmp_path / "in" / "cmyk.jpg", quality=100)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "in" / "deep.png")
    exif = Image.fromarray(grey).convert("RGB").getexif()
    Image.fromarray(grey).convert("RGB").save(tmp_path / "in" / "exif.jpg", exif=exif)
    x, names, sizes = cli.read_edit_images(tmp_path / "in", 16, 1)
    assert x.shape == (5, 1, 16, 16) and names == ["cmyk", "deep", "exif", "palette", "rgba"] and sizes[0] == (24, 32)
    assert (x[1] - x[3]).abs().max() <= 2 / 255  # 16 bits read with their real range, not clipped to white
    (tmp_path / "masks").mkdir()
    for name in names:  # masks of another size but the same shape: fitted as the images are
        Image.fromarray(np.repeat(np.repeat((np.arange(32)[:, None] >= 16).repeat(24, 1), 2, 0), 2, 1).astype(np.uint8) * 255
                        ).save(tmp_path / "masks" / f"{name}.png")
    masks = cli.read_masks(str(tmp_path / "masks"), tmp_path / "in", names, sizes, 16)
    assert masks.shape == (5, 1, 16, 16) and masks[:, :, 8:].all() and not masks[:, :, :8].any()
    Image.fromarray(np.zeros((32, 24), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((32, 24), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.full((10, 40), 255, np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.stack([grey, grey // 2, grey], 2)).save(tmp_path / "colour.png")
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "rgba.png").write_bytes((tmp_path / "masks" / "rgba.png").read_bytes())
    monkeypatch.setattr(sample, "edit_batch", lambda *a, **k: pytest.fail("sampled with a bad input"))
    inp = ["--inpaint", str(tmp_path / "in")]
    for argv, says in (([*inp, "--mask", str(tmp_path / "black.png")], "all black: nothing to fill in"),
                       ([*inp, "--mask", str(tmp_path / "white.png")], "all white: nothing is kept"),
                       ([*inp, "--mask", str(tmp_path / "wide.png")], "does not fit the image"),
                       ([*inp, "--mask", str(tmp_path / "some")], "no mask for cmyk"),
                       ([*inp, "--mask", "middle"], "not one of lower-half"),
                       (["--mask", "center"], "--mask goes with --inpaint"), (inp, "--inpaint needs --mask"),
                       (["--inpaint", str(tmp_path / "colour.png"), "--mask", "center"], "a colour image"),
                       ([*inp, "--mask", "center", "--resample", "2"],
                        "T = 50 steps; --spacing linspace takes at most 50"),
                       ([*inp, "--mask", "center", "--sampler", "ode"], "not the adaptive ode"),
                       ([*inp, "--mask", "center", "--recon-guidance", "-1"], "--recon-guidance must be a number >= 0"),
                       (["--recon-guidance", "2"], "--recon-guidance guides inpainting"),
                       (["--edit", str(tmp_path / "in"), "--strength", "1.5"], "--strength takes numbers in [0, 1]"),
                       ([*inp, "--mask", "center", "--edit", str(tmp_path / "in")], "one at a time")):
        assert sample.main([str(cond_run), *argv, "--grid", str(tmp_path / "g.png")]) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "Traceback" not in err[0], (argv, err)
    assert not (tmp_path / "g.png").exists()


def test_pictures_go_to_the_run_folder_and_never_over_a_users_file(tmp_path, trained_run, monkeypatch, capsys):
    assert sample.main([str(trained_run), "--n", "2", "--steps", "2"]) == 0
    assert cli.written_by_us(trained_run / "samples.png")
    assert sample.main([str(trained_run / "ckpt.pt"), "--n", "2", "--steps", "2"]) == 0  # ours: written again
    capsys.readouterr()
    theirs = tmp_path / "photo.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(theirs)
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "notes.txt").write_text("the user's")
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    for argv, says in ((["--grid", str(theirs)], "was not written by this toolkit"),
                       (["--out", str(tmp_path / "users")], "holds files that this toolkit did not write"),
                       (["--out", str(theirs)], "a file, not a folder")):
        assert sample.main([str(trained_run), "--n", "2", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0]
    assert np.array_equal(np.asarray(Image.open(theirs)), np.zeros((4, 4), np.uint8))


def test_imports_point_one_way():
    """ddpm.py imports no project file; cli.py only ddpm.py; fid.py only cli.py; the commands only those three."""
    allowed = {"ddpm": set(), "cli": {"ddpm"}, "fid": {"cli"}, "train": {"ddpm", "cli", "fid"},
               "sample": {"ddpm", "cli", "fid"}, "bench": {"ddpm", "cli", "fid"}}
    for name, ok in allowed.items():
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        found = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        found |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert found & set(allowed) == ok, (name, found & set(allowed))


def test_an_old_configuration_resumes_with_its_settings_legacy_values(tmp_path, trained_run):
    shutil.copytree(trained_run, tmp_path / "old")
    ckpt = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)
    for key in ("prediction", "min_snr", "grad_accum", "channels_last", "process", "class_cond", "label_dropout",
                "sample_guidance", "amp", "snapshots"):
        ckpt["config"].pop(key, None)
    ckpt["config"]["model"].pop("num_classes", None)
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    assert train.main(["--resume", str(tmp_path / "old"), "--steps", "7"]) == 0
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    assert {k: cfg[k] for k in train.LEGACY} == train.LEGACY and train.LEGACY["process"] == "ddpm"
    model, process, _ = ddpm.load(tmp_path / "old" / "ckpt.pt")
    assert isinstance(process, ddpm.Diffusion) and model.label_emb is None


def test_fid_never_prints_nan_as_a_result(tmp_path, capsys):
    fid.save_stats(tmp_path / "a.npz", np.ones(3), np.eye(3))
    fid.save_stats(tmp_path / "nan.npz", np.array([1.0, np.nan, 0.0]), np.eye(3))
    assert fid.main([str(tmp_path / "a.npz"), str(tmp_path / "nan.npz")]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "NaN or inf" in out.err
    assert fid.main(["--isc", str(tmp_path), "--splits", "0"]) == 1
    assert "--splits" in capsys.readouterr().err


def test_nan_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ddpm.Diffusion, "loss", lambda self, *a, **k: torch.tensor(float("nan"), requires_grad=True))
    assert train.main([*TINY, "--out", str(tmp_path / "r"), "--steps", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at step 0" in err and "no checkpoint had been saved yet" in err


def test_16_bit_and_float_images_are_read_with_their_real_range(tmp_path):
    values = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0 .. 65535 in 16 steps
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = np.round(values / 257).astype(np.uint8)  # 0, 17, 34, ... 255: not saturated to white
    assert np.array_equal(cli.read_image(tmp_path / "g16.png", "L")[0].numpy(), expected)
    assert np.array_equal(cli.fit_file(tmp_path / "g16.png", 4, "L")[0], expected)
    Image.fromarray((values / 65535).astype(np.float32)).save(tmp_path / "f.tiff")
    assert np.array_equal(cli.read_image(tmp_path / "f.tiff", "L")[0].numpy(), expected)


def test_resume_from_elsewhere_through_ckpt_pt_names_what_it_ignores(tmp_path, monkeypatch, capsys):
    mixed_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # a relative --data, stored as an absolute path
    assert train.main(["--data", "data", "--out", "run", "--steps", "3", "--sample-every", "0", *TINY]) == 0
    assert "python sample.py run" in capsys.readouterr().err  # done: says what to do next
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train.main(["--resume", str(tmp_path / "run" / "ckpt.pt"), "--steps", "5", "--lr", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "note: --lr ignored" in err and "--steps" not in err.split("note:")[1].split("ignored")[0]
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["config"]["lr"] != 0.5


def test_a_damaged_idx_file_is_one_line(tmp_path, capsys):
    header = b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    payload = header + np.random.default_rng(0).integers(0, 256, 5 * 28 * 28, dtype=np.uint8).tobytes()
    for name, damaged in (("short", gzip.compress(header + b"\x00" * 100)), ("cut", gzip.compress(payload)[:-300])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "t10k-images-idx3-ubyte.gz").write_bytes(damaged)
        assert train.main([*TINY, "--data", str(tmp_path / name), "--out", str(tmp_path / f"r{name}")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert "not a readable IDX file" in err[-1] and err[-1].startswith("train.py: error:"), err


def test_an_image_too_large_to_decode_is_called_too_large(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "d", 3, seed=0, size=8)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "d" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40 x 40 > 2 x 500: Pillow refuses it as a bomb
    assert cli.read_image(tmp_path / "d" / "huge.png") == cli.TOO_LARGE
    data = cli.load_folder(tmp_path / "d", 8, 3)
    assert len(data) == 3 and "1 too large (over Pillow's limit of 1,000 pixels)" in capsys.readouterr().err


def test_first_grid_comes_early_and_save_stats_needs_its_folder_first(tmp_path, inception_weights, capsys,
                                                                      monkeypatch):
    assert train.FIRST_GRID < train.parse_args([]).sample_every
    run = tmp_path / "run"
    first = 3  # the rule at the step it names, here early enough for a test
    monkeypatch.setattr(train, "FIRST_GRID", first)
    assert train.main([*TINY, "--out", str(run), "--steps", str(first + 1), "--sample-every", "1000",
                       "--save-every", "1000"]) == 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step_{first:06d}.png", f"step_{first + 1:06d}.png"]
    write_images(tmp_path / "a", 3, seed=0)
    assert fid.main(["--save-stats", str(tmp_path / "a"), str(tmp_path / "missing" / "a.npz"),
                     "--weights", str(tmp_path / "not-loaded.pth")]) == 1  # refused before the network loads
    assert "its folder does not exist" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device,says", [("cuda", "no CUDA device"), ("mps", "cannot compute on mps here"),
                                          ("meta", "cannot compute on meta here")])
def test_a_device_this_machine_lacks_is_one_line_for_every_command(tmp_path, trained_run, capsys, device, says):
    write_images(tmp_path / "a", 2, seed=0)
    for main, argv in ((train.main, [*TINY, "--out", str(tmp_path / "r")]), (sample.main, [str(trained_run)]),
                       (fid.main, [str(tmp_path / "a"), str(tmp_path / "a")])):
        assert main([*argv, "--device", device]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err

# ----------------------------------------------------------------------------------------------


def test_an_idx_file_beside_its_gzipped_copy_is_read_once(tmp_path, capsys):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    raw = bytes([0, 0, 8, 3]) + np.array([5, 28, 28], ">i4").tobytes() + imgs.tobytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(cli.load_folder(tmp_path, 28, 1)[:, 0].numpy(), imgs)
    assert "reading t10k-images-idx3-ubyte once, not its gzipped copy" in capsys.readouterr().err


def test_a_transparent_mask_marks_the_hole_by_its_alpha(tmp_path, capsys):
    rgba = np.zeros((16, 16, 4), np.uint8)  # black everywhere; the lower half erased to transparent
    rgba[..., 3] = 255
    rgba[8:, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "hole.png")
    masks = cli.read_masks(str(tmp_path / "hole.png"), "images", ["a", "b"], [(16, 16)] * 2, 16)
    assert torch.equal(masks, cli.builtin_mask("lower-half", 16)[None].expand(2, -1, -1, -1))
    assert capsys.readouterr().err.count("transparent pixels mark what to fill in") == 1
    opaque = rgba.copy()
    opaque[..., 3], opaque[:8, :, :3] = 255, 255  # no transparency: white marks the hole, as ever
    Image.fromarray(opaque, "RGBA").save(tmp_path / "white.png")
    assert torch.equal(cli.read_masks(str(tmp_path / "white.png"), "images", ["a"], [(16, 16)], 16)[0],
                       cli.builtin_mask("upper-half", 16))


def test_a_home_folder_written_as_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = train.parse_args(["--out=~/runs/x", "--data", "~"])
    assert (args.out, args.data) == (str(tmp_path / "runs" / "x"), str(tmp_path))
    args = sample.parse_args(["~/runs/x", "--out=~/s", "--class", "~"])
    assert (args.run, args.out) == (str(tmp_path / "runs" / "x"), str(tmp_path / "s"))


def test_a_failed_first_save_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"PK")  # torch's zip writer has begun, then the disk is full
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    assert train.main(["--out", str(run), "--steps", "2", "--sample-every", "0", "--snapshots", "none", *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: cannot write") and "is the disk full?" in err[-1]
    assert "Traceback" not in "\n".join(err) and not list(run.rglob("*.tmp")) and not (run / "ckpt.pt").exists()
    monkeypatch.undo()
    assert train.main(["--out", str(run), "--steps", "2", "--sample-every", "0", *TINY]) == 0  # starts again


def test_resume_after_the_data_moved_and_after_a_killed_save(tmp_path, capsys):
    mixed_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert train.main(["--data", str(tmp_path / "data"), "--out", str(run), "--steps", "2", "--sample-every", "0",
                       *TINY]) == 0
    (run / ".ckpt.pt.999999.tmp").write_bytes(b"")  # a save killed half-way
    (tmp_path / "data").rename(tmp_path / "moved")
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--steps", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"its data {tmp_path / 'data'} is gone" in err[0] and "--data" in err[0]
    assert train.main(["--resume", str(run), "--steps", "3", "--data", str(tmp_path / "moved")]) == 0
    err = capsys.readouterr().err
    assert "is gone; reading" in err and "--data ignored" not in err and not list(run.rglob("*.tmp"))
    assert json.loads((run / "config.json").read_text())["data"] == str(tmp_path / "moved")
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 3
