"""The C API (include/bncore.h) without Python: C programs built here with the
system compiler and OpenMP run on data written by the test, and their results
are compared with the Python API's on the same data (the same kernels, so
they agree to the last bit or within a few float32 ulps)."""
import os
import shutil
import subprocess

import numpy as np
import pytest

import bncore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(ROOT, "include")
CDIR = os.path.join(ROOT, "tests", "c")
N, C, H, W = 4, 20, 30, 31  # 74K elements: above the single-thread threshold


def _compiler(names):
    for name in names:
        if shutil.which(name):
            return name
    pytest.skip(f"no C/C++ compiler ({', '.join(names)}) on PATH")


def _build(tmp, sources, exe, compiler=("cc", "gcc", "clang"), extra=()):
    cc = _compiler(os.environ.get("CC", "").split()[:1] + list(compiler))
    base = [cc, "-O2", "-I", INCLUDE, *extra, *(os.path.join(CDIR, s) for s in sources),
            "-o", str(tmp / exe), "-lm"]
    # with OpenMP when the compiler has it; bncore.h runs serially (same results) without
    for flags in (["-fopenmp"], []):
        r = subprocess.run(base[:1] + flags + base[1:], capture_output=True, text=True)
        if r.returncode == 0:
            return str(tmp / exe)
    pytest.fail(f"compiling {sources} failed:\n{r.stderr}")


def _read(tmp, name, dtype, shape=None):
    a = np.fromfile(tmp / name, dtype=dtype)
    return a if shape is None else a.reshape(shape)


@pytest.fixture(scope="module")
def c_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("c_api")
    exe = _build(tmp, ["bn_check.c", "bncore_impl.c"], "bn_check")
    rng = np.random.default_rng(7)
    x64 = rng.standard_normal((N, C, H, W)) * 3 + 100  # |mean| >> std
    dy64 = rng.standard_normal((N, C, H, W))
    params = np.concatenate([rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C),
                             rng.standard_normal(C), rng.standard_normal(C) + 100,
                             rng.uniform(0.5, 2, C)])
    data = dict(x32=x64.astype(np.float32), dy32=dy64.astype(np.float32), x64=x64, dy64=dy64)
    for k, v in data.items():
        v.tofile(tmp / f"{k}.bin")
    params.tofile(tmp / "params.bin")
    r = subprocess.run([exe, str(tmp), str(N), str(C), str(H), str(W)], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr
    return tmp, data, params.reshape(4, C)


def _close(got, want, dtype):
    if np.dtype(dtype) == np.float32:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    else:
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14 * np.abs(want).max())


def test_c_eval_matches_python(c_results):
    tmp, d, (w, b, rm, rv) = c_results
    shape = (N, C, H, W)
    want = bncore.batch_norm_eval(d["x32"], rm, rv, w, b, activation=("leaky_relu", 0.1))
    _close(_read(tmp, "eval32.bin", np.float32, shape), want, np.float32)
    # one thread gives the same bits as the default
    np.testing.assert_array_equal(_read(tmp, "eval32_t1.bin", np.float32),
                                  _read(tmp, "eval32.bin", np.float32))
    nhwc = d["x32"].reshape(N, H, W, C)  # the same buffer read as channels-last
    want = bncore.batch_norm_eval(nhwc, rm, rv, axis=-1, eps=1e-3)
    _close(_read(tmp, "eval32_nhwc.bin", np.float32, nhwc.shape), want, np.float32)
    frozen = bncore.FrozenBatchNorm.from_state_dict(
        {"weight": w, "bias": b, "running_mean": rm, "running_var": rv}, activation="relu")
    _close(_read(tmp, "apply64.bin", np.float64, shape), frozen(d["x64"]), np.float64)


def test_c_training_matches_python(c_results):
    tmp, d, (w, b, rm, rv) = c_results
    shape = (N, C, H, W)
    count, mean, m2 = bncore.batch_norm_stats(d["x32"])
    _close(_read(tmp, "stats_mean32.bin", np.float64), mean, np.float64)
    _close(_read(tmp, "stats_m2_32.bin", np.float64), m2, np.float64)
    rm2, rv2 = rm.copy(), rv.copy()
    y, m, inv = bncore.batch_norm_train(d["x32"], w, b, running_mean=rm2, running_var=rv2,
                                        activation="relu")
    _close(_read(tmp, "train32.bin", np.float32, shape), y, np.float32)
    _close(_read(tmp, "train_mean32.bin", np.float64), m, np.float32)
    _close(_read(tmp, "train_invstd32.bin", np.float64), inv, np.float32)
    _close(_read(tmp, "running_mean.bin", np.float64), rm2, np.float64)
    _close(_read(tmp, "running_var.bin", np.float64), rv2, np.float64)
    dx, dw, db = bncore.batch_norm_backward(d["dy32"], d["x32"], m, inv, w, activation="relu", y=y)
    _close(_read(tmp, "bwd32.bin", np.float32, shape), dx, np.float32)
    _close(_read(tmp, "bwd_dw32.bin", np.float64), dw, np.float32)
    _close(_read(tmp, "bwd_db32.bin", np.float64), db, np.float32)
    y64, m64, inv64 = bncore.batch_norm_train(d["x64"], w, b)
    _close(_read(tmp, "train64.bin", np.float64, shape), y64, np.float64)
    dx64, _, _ = bncore.batch_norm_backward(d["dy64"], d["x64"], m64, inv64, w)
    _close(_read(tmp, "bwd64.bin", np.float64, shape), dx64, np.float64)


def test_c_inplace_abn_matches_python(c_results):
    tmp, d, (w, b, _, _) = c_results
    act = ("leaky_relu", 0.05)
    x, dy = d["x32"].reshape(N, H, W, C).copy(), d["dy32"].reshape(N, H, W, C)
    y, _, inv = bncore.batch_norm_train(x, w, b, axis=-1, activation=act, out=x)
    _close(_read(tmp, "inplace_y32.bin", np.float32, x.shape), y, np.float32)
    dx, dw, db = bncore.batch_norm_backward_from_output(dy, y, inv, w, b, axis=-1, activation=act)
    _close(_read(tmp, "inplace_dx32.bin", np.float32, x.shape), dx, np.float32)
    _close(_read(tmp, "inplace_dw32.bin", np.float64), dw, np.float32)
    _close(_read(tmp, "inplace_db32.bin", np.float64), db, np.float32)


def test_c_invalid_arguments_return_einval_before_writing(tmp_path):
    """tests/c/bn_invalid.c: every function, each invalid argument of its contract in
    bncore.h (sizes, G, NULL pointers, eps, activation, n_threads, partial overlap,
    running_var + eps < 0, ...) returns BN_EINVAL with every output untouched."""
    exe = _build(tmp_path, ["bn_invalid.c", "bncore_impl.c"], "bn_invalid")
    r = subprocess.run([exe], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr}"
    assert "all checks passed" in r.stdout


@pytest.mark.parametrize("lang", ["c", "c++"])
def test_readme_example(tmp_path, lang):
    """The README's C example (tests/c/example.c), header-only, as C and as C++."""
    if lang == "c":
        exe = _build(tmp_path, ["example.c"], "example")
    else:
        exe = _build(tmp_path, ["example.c"], "example", compiler=("c++", "g++", "clang++"),
                     extra=("-x", "c++"))
    rng = np.random.default_rng(3)
    n, c, h, w = 2, 8, 5, 6
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    p = np.stack([rng.uniform(0.5, 1.5, c), rng.standard_normal(c), rng.standard_normal(c),
                  rng.uniform(0.5, 2, c)])
    x.tofile(tmp_path / "in.bin")
    p.tofile(tmp_path / "params.bin")
    r = subprocess.run([exe, str(tmp_path / "params.bin"), str(tmp_path / "in.bin"),
                        str(tmp_path / "out.bin"), *map(str, (n, c, h, w))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    want = bncore.batch_norm_eval(x, p[2], p[3], p[0], p[1])
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.bin", np.float32).reshape(x.shape),
                                  want)


# ---- edge cases of the float32 kernels: subnormal spreads, constant channels, eps = 0 ----------
# Compared with a float64 NumPy reference of the same float32 input. invstd = 1/sqrt(var), taken
# as 0 where var == 0 (PyTorch's rule); a spread below ~3e-39 has invstd > FLT_MAX, so
# the float32 coefficients overflow unless those channels are evaluated in double.

TINY = 2.0 ** -149  # the smallest float32 subnormal


def _kinds(rng, kind, n):
    """n float32 values of one kind, and the scale of the matching dy."""
    if kind == "normal":
        return (rng.standard_normal(n) * 3 + 100).astype(np.float32), 1.0
    if kind == "subnormal":  # std ~ 1.6e-41 around 0: invstd ~ 6e40
        return (rng.integers(-20000, 20000, n) * TINY).astype(np.float32), 1e-40
    if kind == "subnormal_mean":  # std ~ 8e-43 around a nonzero subnormal mean: invstd ~ 1e42
        return (rng.integers(1000, 3000, n) * TINY).astype(np.float32), 1e-42
    if kind == "edge":  # std ~ 1e-38: invstd fits float32, invstd * weight (10) does not
        return (rng.standard_normal(n) * 1e-38).astype(np.float32), 1e-38
    assert kind == "constant"
    return np.full(n, 3.0, np.float32), 1.0


KINDS = ["normal", "subnormal", "constant", "subnormal_mean", "edge", "normal"]


def _rows_data(rng, rows, length):
    """x (rows, length) float32, one kind per row (cycling), dy scaled to match."""
    x = np.empty((rows, length), np.float32)
    dy = rng.standard_normal((rows, length)).astype(np.float32)
    for r in range(rows):
        x[r], s = _kinds(rng, KINDS[r % len(KINDS)], length)
        dy[r] = (dy[r] * s).astype(np.float32)
    return x, dy


def _inv(var):
    with np.errstate(divide="ignore"):
        return np.where(var == 0, 0.0, 1.0 / np.sqrt(var))


def _near(got, want, red, rtol=2e-6, atol=2e-6):
    """|got - want| <= rtol*|want| + atol*(largest |want| of the same channel or row)."""
    scale = np.abs(want).max(axis=red, keepdims=True) if red else np.abs(want)
    assert np.isfinite(got).all(), "non-finite values"
    assert np.all(np.abs(got - want) <= rtol * np.abs(want) + atol * scale), \
        np.abs(got - want).max()


@pytest.fixture(scope="module")
def edge_exe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("c_edge")
    return _build(tmp, ["bn_edge.c", "bncore_impl.c"], "bn_edge")


def _run_edge(exe, tmp, args, x, dy, w, b):
    x.tofile(tmp / "x.bin")
    dy.tofile(tmp / "dy.bin")
    np.asarray(w, np.float64).tofile(tmp / "w.bin")
    np.asarray(b, np.float64).tofile(tmp / "b.bin")
    r = subprocess.run([exe, str(tmp), *map(str, args)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr
    return lambda name, dt=np.float32: np.fromfile(tmp / name, dt)


@pytest.mark.parametrize("shape", [(4, 6, 300), (600, 6, 1), (2, 6, 12000)],
                         ids=["nchw", "channels_last", "threads"])
def test_c_batch_norm_subnormal_spread_and_constant_channels(edge_exe, tmp_path, shape):
    outer, C, inner = shape
    rng = np.random.default_rng(21)
    xc, dyc = _rows_data(rng, C, outer * inner)  # one row per channel, then laid out
    x = np.ascontiguousarray(xc.reshape(C, outer, inner).transpose(1, 0, 2))
    dy = np.ascontiguousarray(dyc.reshape(C, outer, inner).transpose(1, 0, 2))
    w = np.linspace(0.5, 10, C)  # channel 4 ("edge"): invstd * w > FLT_MAX
    b = np.linspace(-1, 1, C)
    read = _run_edge(edge_exe, tmp_path, ["bn", outer, C, inner], x, dy, w, b)
    x64, g = x.astype(np.float64), dy.astype(np.float64)
    red, cs = (0, 2), (1, C, 1)
    mean = x64.mean(red)
    var = ((x64 - mean.reshape(cs)) ** 2).mean(red)
    inv = _inv(var)
    assert inv[1] > 3.5e38 and inv[3] > 3.5e38 and inv[2] == 0 and (w * inv)[4] > 3.5e38
    np.testing.assert_allclose(read("mean.bin", np.float64), mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(read("invstd.bin", np.float64), inv, rtol=1e-9, atol=0)
    xhat = (x64 - mean.reshape(cs)) * inv.reshape(cs)
    y = xhat * w.reshape(cs) + b.reshape(cs)
    assert np.all(y[:, 2] == b[2])
    _near(read("train_y.bin").reshape(shape), y, red)
    _near(read("eval_y.bin").reshape(shape), y, red)
    _near(read("apply_y.bin").reshape(shape), np.where(y < 0, 0.5 * y, y), red)
    wg = g * w.reshape(cs)
    dx = inv.reshape(cs) * (wg - wg.mean(red, keepdims=True)
                            - xhat * (wg * xhat).mean(red, keepdims=True))
    _near(read("bwd_dx.bin").reshape(shape), dx, red, rtol=1e-5, atol=1e-5)
    _near(read("bwd_dw.bin", np.float64), (g * xhat).sum(red), None, rtol=1e-9)
    _near(read("bwd_db.bin", np.float64), g.sum(red), None, rtol=1e-9)
    _near(read("bwd_eval_dx.bin").reshape(shape), wg * inv.reshape(cs), red)


@pytest.mark.parametrize("case", [("ln", 6, 500), ("ln", 6, 20000), ("gn", 3, 8, 50, 4),
                                  ("gn", 5, 8, 1, 2), ("gn", 3, 4, 40000, 2)],
                         ids=["ln_rows", "ln_long", "gn", "gn_hw1", "gn_long"])
def test_c_layer_and_group_norm_subnormal_spread_and_constant_rows(edge_exe, tmp_path, case):
    rng = np.random.default_rng(22)
    if case[0] == "ln":
        _, rows, cols = case
        length, nparam = cols, cols
    else:
        _, n, C, hw, G = case
        rows, length, nparam = n * G, C // G * hw, C
    x, dy = _rows_data(rng, rows, length)
    w = rng.uniform(0.5, 10, nparam) * rng.choice([-1, 1], nparam)
    b = rng.standard_normal(nparam)
    read = _run_edge(edge_exe, tmp_path, case, x, dy, w, b)
    x64, g = x.astype(np.float64), dy.astype(np.float64)
    if case[0] == "ln":
        wf, bf = w.reshape(1, -1), b.reshape(1, -1)
        g3 = g
    else:  # per element of a (n, g) row: its channel's parameter
        wf = np.tile(np.repeat(w, hw).reshape(G, -1), (n, 1))
        bf = np.tile(np.repeat(b, hw).reshape(G, -1), (n, 1))
        g3 = g.reshape(n, C, hw)
    mean = x64.mean(1, keepdims=True)
    inv = _inv(((x64 - mean) ** 2).mean(1, keepdims=True))
    assert inv[1, 0] > 3.5e38 and inv[2, 0] == 0
    xhat = (x64 - mean) * inv
    np.testing.assert_allclose(read("mean.bin", np.float64), mean[:, 0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(read("invstd.bin", np.float64), inv[:, 0], rtol=1e-9, atol=0)
    y = xhat * wf + bf
    _near(read("y.bin").reshape(rows, length), y, 1)
    wg = g * wf
    dx = inv * (wg - wg.mean(1, keepdims=True) - xhat * (wg * xhat).mean(1, keepdims=True))
    _near(read("dx.bin").reshape(rows, length), dx, 1, rtol=1e-5, atol=1e-5)
    gx = g * xhat
    if case[0] == "ln":
        dw, db = gx.sum(0), g.sum(0)
    else:
        dw, db = gx.reshape(g3.shape).sum((0, 2)), g3.sum((0, 2))
    _near(read("dw.bin", np.float64), dw, None, rtol=1e-9, atol=1e-9 * np.abs(dw).max())
    _near(read("db.bin", np.float64), db, None, rtol=1e-9, atol=1e-9 * np.abs(db).max())
