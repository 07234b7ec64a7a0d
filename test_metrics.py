"""Tests of fid.py: closed forms, the weights layout and loading path, the command line."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import fid

from conftest import ROOT, fid_from_features, gen, write_images

# fid.py: closed forms, the weights layout and loading path, the command line


def test_frechet_distance_equals_pytorch_fids_sqrtm_on_full_rank_statistics():
    """pytorch-fid takes Tr((S1 S2)^(1/2)) from scipy's sqrtm; on full-rank statistics the eigh route
    gives the same number to rounding, and on few images the Gram-matrix route's exact one."""
    from scipy import linalg
    rng = np.random.default_rng(3)
    fa, fb = rng.normal(size=(300, 64)), rng.normal(size=(200, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.1
    sa, sb = (fid.activation_statistics(f) for f in (fa, fb))
    ref = (sa[0] - sb[0]) @ (sa[0] - sb[0]) + np.trace(sa[1]) + np.trace(sb[1]) \
        - 2 * np.trace(linalg.sqrtm(sa[1] @ sb[1])).real
    assert fid.frechet_distance(*sa, *sb) == pytest.approx(ref, rel=1e-10)
    assert fid.frechet_distance(*sa, *sb) == pytest.approx(fid_from_features(fa, fb), rel=1e-10)
    few_a, few_b = fa[:5], fb[:4]  # rank 4 and 3 covariances in 64-d
    assert fid.frechet_distance(*fid.activation_statistics(few_a), *fid.activation_statistics(few_b)) == \
        pytest.approx(fid_from_features(few_a, few_b), rel=1e-9)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    shift = np.arange(6.0)
    assert fid.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-6)
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    assert fid.frechet_distance(np.zeros(3), np.diag(d1), np.zeros(3), np.diag(d2)) == \
        pytest.approx(((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum(), rel=1e-9)
    # non-commuting covariances: Tr((S1 S2)^(1/2)) is the sum of the roots of S1 S2's eigenvalues
    b = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    s2 = np.cov(b, rowvar=False)
    expected = np.trace(sigma) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(sigma @ s2).real).sum()
    assert fid.frechet_distance(mu, sigma, mu, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_singular_covariances_is_finite():
    s = np.diag([1.0, 0.0, 0.0])  # rank 1: the zero eigenvalues must give roots of 0, not of rounding noise
    assert fid.frechet_distance(np.zeros(3), s, np.ones(3), s) == pytest.approx(3.0, abs=1e-4)


def test_inception_score_resize_is_tensorflow_1s_bilinear():
    """TF1 resize_bilinear without half-pixel centres: output i reads source i * in / out (here i / 2),
    the last neighbour clamped; rows [0, 100] and [200, 255] worked by hand."""
    x = torch.tensor([[[[0.0, 100.0], [200.0, 255.0]]]])
    expected = torch.tensor([[0.0, 50.0, 100.0, 100.0], [100.0, 138.75, 177.5, 177.5],
                             [200.0, 227.5, 255.0, 255.0], [200.0, 227.5, 255.0, 255.0]])
    assert torch.equal(fid.resize_bilinear_tf1(x, 4)[0, 0], expected)
    half_pixel = torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    assert half_pixel[0, 0, 0].tolist() == [0.0, 25.0, 75.0, 100.0]  # pytorch-fid's FID resize differs
    big = torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(1, 3, 5, 7)
    out = fid.resize_bilinear_tf1(big, 299)  # source 5 -> 299: output row i reads row i * 5 / 299
    assert out.shape == (1, 3, 299, 299) and torch.equal(out[..., 0, 0], big[..., 0, 0])
    assert torch.allclose(out[0, 0, 60, 0], big[0, 0, 1, 0] + (60 * 5 / 299 - 1) * (big[0, 0, 2, 0] - big[0, 0, 1, 0]))


def test_inception_score_closed_forms():
    n = 12
    assert fid.inception_score(np.zeros((50, 1008)), splits=5) == pytest.approx((1.0, 0.0))
    one_hot = np.full((n, 1008), -1e4)
    one_hot[np.arange(n), np.arange(n)] = 0.0  # n images, n distinct confident classes
    assert fid.inception_score(one_hot, splits=1)[0] == pytest.approx(n, rel=1e-9)
    twice = np.concatenate([one_hot, one_hot])
    assert fid.inception_score(twice, splits=2, shuffle=False) == pytest.approx((n, 0.0), rel=1e-9)


def test_network_shapes_and_published_layout(inception):
    state = inception.state_dict()
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_mean", "Mixed_5b.branch5x5_2.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.running_var", "Mixed_7c.branch3x3dbl_3b.conv.weight"):
        assert key in state
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert all(m.eps == 0.001 for m in inception.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.inference_mode():
        feats, logits = inception(torch.rand(2, 3, 40, 28))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and feats.std() > 0.01


def test_weights_load_strictly_through_the_torch_hub_cache(tmp_path, inception_weights, inception):
    """The same code path as a real download, with the file already in the hub cache."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        (tmp_path / "checkpoints").mkdir()
        shutil.copy(inception_weights, tmp_path / "checkpoints" / inception_weights.name)
        model = fid.load_inception()
    finally:
        torch.hub.set_dir(old)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x)[0], inception(x)[0])


def test_unavailable_weights_are_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL", (tmp_path / "nowhere" / "pt_inception-x.pth").as_uri())
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(cli.UserError, match="--weights PATH"):
            fid.load_inception()
    finally:
        torch.hub.set_dir(old)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(cli.UserError, match="bad.pth"):
        fid.load_inception(bad)


def test_in_memory_activations_equal_those_of_saved_pngs(tmp_path, inception):
    x = torch.rand(5, 3, 20, 20, generator=gen()) * 2 - 1
    for i, im in enumerate(cli.to_uint8(x)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    mem = fid.get_activations(fid.tensor_batches(x, 5), inception)
    disk = fid.folder_activations(tmp_path, inception, batch_size=5, quiet=True)
    assert np.array_equal(mem[0], disk[0]) and np.array_equal(mem[1], disk[1])


def test_npz_round_trip_and_bad_stats(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    fid.save_stats(tmp_path / "s.npz", mu, sigma)
    m2, s2 = fid.load_stats(tmp_path / "s.npz")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(cli.UserError, match="no 'mu' and 'sigma'"):
        fid.load_stats(tmp_path / "bad.npz")
    assert fid.main(["--isc", str(tmp_path / "s.npz")]) == 1  # an .npz has no logits: one line, no traceback
    np.savez(tmp_path / "words.npz", mu=np.array(["a", "b"]), sigma=np.eye(2))
    np.savez(tmp_path / "skew.npz", mu=np.zeros(3), sigma=np.eye(2))
    for name, says in (("words.npz", "must be arrays of numbers"), ("skew.npz", "are not the statistics of D")):
        with pytest.raises(cli.UserError, match=says):
            fid.load_stats(tmp_path / name)
    with pytest.raises(cli.UserError, match=r"not the statistics of 2048 features"):
        fid.check_input(tmp_path / "s.npz", 2, dims=2048)  # sample.py --fid: refused before any sampling
    (tmp_path / "s.npz").rename(tmp_path / "S.NPZ")
    fid.save_stats(tmp_path / "plain", mu, sigma)  # statistics by any name and case are statistics
    assert fid.is_stats(tmp_path / "S.NPZ") and fid.is_stats(tmp_path / "plain") and not fid.is_stats(tmp_path)
    assert np.array_equal(fid.check_input(tmp_path / "S.NPZ", 2)[1], sigma)


def test_fid_command_line_end_to_end(tmp_path, inception_weights, inception, capsys):
    a = write_images(tmp_path / "a", 6, seed=1)
    b = write_images(tmp_path / "b", 6, seed=2, bright=120)
    (a / "corrupt.png").write_bytes(b"not an image")
    w = ["--weights", str(inception_weights), "--num-workers", "0", "--batch-size", "4"]

    def run(*args):
        assert fid.main([*args, *w]) == 0
        out = capsys.readouterr()
        return out.out.strip(), out.err

    fa, fb = (fid.folder_activations(p, inception, quiet=True)[0] for p in (a, b))
    logits_b = fid.folder_activations(b, inception, quiet=True, isc_input=True)[1]  # IS: torch-fidelity's input
    mu_a, sigma_a = fid.activation_statistics(fa)
    expected = fid_from_features(fa, fb)
    out, err = run(str(a), str(b))
    assert "a: 6 images (1 unreadable, skipped)" in err
    assert expected > 1 and out.startswith("FID: ") and float(out[5:]) == pytest.approx(expected, abs=1e-3)
    run("--save-stats", str(a), str(tmp_path / "a.npz"))
    mu, sigma = fid.load_stats(tmp_path / "a.npz")
    assert np.allclose(mu, mu_a, rtol=1e-12) and np.allclose(sigma, sigma_a, rtol=1e-12)
    mean, std = fid.inception_score(logits_b, splits=2)
    assert run("--isc", str(b), "--splits", "2")[0] == f"IS: {mean:.4f} +- {std:.4f}"
    fid_path_logits = fid.folder_activations(b, inception, quiet=True)[1]
    assert not np.allclose(fid_path_logits, logits_b)  # the two input paths really differ
    # two statistics files need no network; identical ones print exactly 0
    fid.save_stats(tmp_path / "s.npz", np.ones(3), np.diag([1.0, 2.0, 3.0]))
    fid.save_stats(tmp_path / "t.npz", np.zeros(3), np.diag([4.0, 2.0, 3.0]))
    assert run(str(tmp_path / "s.npz"), str(tmp_path / "s.npz"))[0] == "FID: 0.0000"
    assert run(str(tmp_path / "s.npz"), str(tmp_path / "t.npz"))[0] == f"FID: {3 + (2 - 1) ** 2:.4f}"


def mmd2_unbiased_by_pairs(x, y):
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair: the definition KID averages."""
    k = lambda a, b: (float(a @ b) / len(a) + 1) ** 3
    m = len(x)
    same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return same - 2 * sum(k(a, b) for a in x for b in y) / m ** 2


def test_kid_equals_the_pairwise_definition_and_closed_forms():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(12, 5)), g.normal(size=(15, 5)) + 0.5
    mean, std = fid.kernel_inception_distance(x, y[:12], subsets=1, subset_size=12)  # one subset: all of both
    assert mean == pytest.approx(mmd2_unbiased_by_pairs(x, y[:12]), rel=1e-12) and std == 0
    mean, std = fid.kernel_inception_distance(x, y, subsets=7, subset_size=1000)  # capped at the smaller set, 12
    assert std > 0 and mean == pytest.approx(np.mean([mmd2_unbiased_by_pairs(
        x[r.choice(12, 12, replace=False)], y[r.choice(15, 12, replace=False)]) for r in [np.random.RandomState(2020)]
        for _ in range(7)]), rel=1e-12)
    # point masses at a and b: every kernel value is known, so MMD^2 = k(a, a) + k(b, b) - 2 k(a, b)
    for shift in (0.0, 0.5, 1.0, 2.0):
        a, b = np.zeros((20, 8)), np.full((20, 8), shift)
        assert fid.kernel_inception_distance(a, b, subsets=3)[0] == pytest.approx((shift ** 2 + 1) ** 3 - 1, abs=1e-12)
    p, q = g.normal(size=(400, 16)), g.normal(size=(400, 16))  # two samples of one distribution
    own, own_std = fid.kernel_inception_distance(p, q, subsets=20, subset_size=200)
    far, _ = fid.kernel_inception_distance(p, q + 0.3, subsets=20, subset_size=200)
    assert abs(own) < 3 * own_std < far / 5  # unbiased: about 0, of either sign, against a clear shift
    with pytest.raises(cli.UserError, match="at least 2"):
        fid.kernel_inception_distance(x[:1], y)


def test_fid_command_line_kid(tmp_path, inception_weights, inception, capsys):
    a, b = write_images(tmp_path / "a", 5, seed=1), write_images(tmp_path / "b", 4, seed=2, bright=120)
    assert fid.main([str(a), str(b), "--kid", "--weights", str(inception_weights), "--num-workers", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    fa, fb = (fid.folder_activations(p, inception, quiet=True)[0] for p in (a, b))
    ka, kb = (fid.folder_activations(p, inception, quiet=True, isc_input=True)[0] for p in (a, b))
    mean, std = fid.kernel_inception_distance(ka, kb)  # KID on torch-fidelity's input path for it
    assert lines[0].startswith("FID: ") and lines[1] == f"KID: {mean:.6f} +- {std:.6f}"
    assert f"{fid.kernel_inception_distance(fa, fb)[0]:.6f}" != f"{mean:.6f}"  # the FID path would differ
    fid.save_stats(tmp_path / "s.npz", np.ones(3), np.eye(3))
    assert fid.main([str(tmp_path / "s.npz"), str(b), "--kid", "--weights", str(inception_weights)]) == 1
    assert "statistics files hold no features" in capsys.readouterr().err
    assert fid.main([str(a), str(b), "--prc", "--prc-k", "2", "--weights", str(inception_weights), "--num-workers", "0"]) == 0
    precision, recall = fid.precision_recall(fa, fb, k=2)
    assert capsys.readouterr().out.strip().splitlines()[1:] == [f"precision: {precision:.4f}", f"recall: {recall:.4f}"]


def torch_fidelity_inception(weights):
    """torch-fidelity's FeatureExtractorInceptionV3 with the given weights, loaded from its file alone (the
    package's __init__ needs torchvision); skips when torch-fidelity is not installed."""
    import importlib.util
    import types
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (a reference for this machine, not a dependency)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("torch_fidelity", package)
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    return module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))


def test_kid_features_of_images_are_torch_fidelitys(tmp_path, inception_weights, inception):
    """On the published layout (random weights), the features KID uses are torch-fidelity's to float32
    rounding (bit for bit in the contiguous layout; ours runs channels_last); FID's input path, pytorch-fid's,
    gives other features (3% apart) and another KID."""
    theirs = torch_fidelity_inception(inception_weights)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8))
    with torch.inference_mode():
        expected = theirs(images)[0].double().numpy()
    assert np.allclose(fid.get_activations([images], inception, isc_input=True)[0], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fid.get_activations([images], inception)[0], expected, rtol=1e-2)


def test_precision_recall_is_the_k_nearest_neighbour_manifold_test():
    g = np.random.default_rng(1)
    real, fake = g.normal(size=(30, 4)), g.normal(size=(25, 4)) * 1.5 + 0.8

    def inside(points, centres, k):  # the definition, point by point
        radius = [sorted(np.linalg.norm(centres - c, axis=1))[k] for c in centres]  # [0] is the point itself
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radius)) for p in points])

    for k in (1, 3, 5):
        assert fid.precision_recall(real, fake, k) == pytest.approx((inside(fake, real, k), inside(real, fake, k)), abs=1e-12)
    precision, recall = fid.precision_recall(real, fake, 3)
    assert 0 < precision < 1 and 0 < recall < 1
    assert fid.precision_recall(real, real) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100.0) == (0.0, 0.0)
    assert fid.precision_recall(real, fake, batch_size=7) == (precision, recall)  # chunking changes nothing
    assert fid.precision_recall(real, real[:20])[0] == 1.0  # a subset of the real set lies inside it
    with pytest.raises(cli.UserError, match="more than 3"):
        fid.precision_recall(real[:3], fake)


@pytest.mark.parametrize("case", ["missing", "empty", "one image", "bad npz"])
def test_fid_command_line_bad_input_is_one_line(tmp_path, inception_weights, case):
    write_images(tmp_path / "good", 3, seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    write_images(tmp_path / "one", 1, seed=0)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    first = {"missing": "nope", "empty": "empty", "one image": "one", "bad npz": "bad.npz"}[case]
    out = subprocess.run([sys.executable, str(ROOT / "fid.py"), first, "good", "--weights", str(inception_weights),
                          "--num-workers", "0"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    lines = [line for line in out.stderr.splitlines() if line.startswith("fid.py: error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr

# ----------------------------------------------------------------------------------------------
