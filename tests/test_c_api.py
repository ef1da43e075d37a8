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
