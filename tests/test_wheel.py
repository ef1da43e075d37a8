"""The distribution: the C headers ship with the package and bncore.get_include()
finds them; a C program compiled against them agrees with float64 NumPy and
with the Python API; the wheel and sdist carry the license, headers, stub and
console script.

.ci/wheel runs this file in a fresh virtual environment where the repaired
wheel is installed (not editable), with BNCORE_WHEEL and BNCORE_SDIST naming
the files it built; the checks of an installed wheel skip elsewhere."""
import glob
import os
import shutil
import subprocess
import tarfile
import zipfile

import numpy as np
import pytest

import bncore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKOUT_HEADERS = sorted(glob.glob(os.path.join(ROOT, "include", "*.h")))
WHEEL = os.environ.get("BNCORE_WHEEL")
SDIST = os.environ.get("BNCORE_SDIST")


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_get_include_holds_the_headers():
    inc = bncore.get_include()
    assert os.path.isabs(inc) and os.path.isfile(os.path.join(inc, "bncore.h"))
    assert CHECKOUT_HEADERS, "no include/*.h in the checkout"
    for h in CHECKOUT_HEADERS:
        shipped = os.path.join(inc, os.path.basename(h))
        assert os.path.isfile(shipped), f"{os.path.basename(h)} missing from {inc}"
        assert _bytes(shipped) == _bytes(h), f"{shipped} differs from the checkout's {h}"


@pytest.mark.skipif(not WHEEL, reason="only where an installed wheel is under test (.ci/wheel)")
def test_installed_package_is_not_the_checkout():
    pkg = os.path.dirname(os.path.abspath(bncore.__file__))
    assert not pkg.startswith(ROOT + os.sep), f"bncore imported from the checkout: {pkg}"
    assert bncore.get_include() == os.path.join(pkg, "include")
    assert os.path.isfile(os.path.join(pkg, "py.typed"))
    assert os.path.isfile(os.path.join(pkg, "_kernels.pyi"))


def _cc():
    for name in (os.environ.get("CC", "").split() or [None])[:1] + ["cc", "gcc", "clang"]:
        if name and shutil.which(name):
            return name
    pytest.skip("no C compiler on PATH")


def test_c_program_against_get_include(tmp_path):
    """tests/c/example.c (eval of an NCHW float32 buffer), compiled with only
    bncore.get_include() on the include path, against float64 NumPy."""
    cc, exe = _cc(), str(tmp_path / "example")
    src = os.path.join(ROOT, "tests", "c", "example.c")
    base = [cc, "-O2", "-I", bncore.get_include(), src, "-o", exe, "-lm"]
    for flags in (["-fopenmp"], []):  # bncore.h runs serially without OpenMP
        r = subprocess.run(base[:1] + flags + base[1:], capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(3)
    n, c, h, w = 3, 5, 7, 6
    x = (rng.standard_normal((n, c, h, w)) * 2 + 50).astype(np.float32)
    weight, bias = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    mean, var = rng.standard_normal(c) + 50, rng.uniform(0.5, 4, c)
    np.concatenate([weight, bias, mean, var]).tofile(tmp_path / "params.bin")
    x.tofile(tmp_path / "x.bin")
    r = subprocess.run([exe, str(tmp_path / "params.bin"), str(tmp_path / "x.bin"),
                        str(tmp_path / "y.bin"), *map(str, (n, c, h, w))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    y = np.fromfile(tmp_path / "y.bin", dtype=np.float32).reshape(x.shape)
    b = (slice(None), None, None)
    want = (x.astype(np.float64) - mean[b]) / np.sqrt(var[b] + 1e-5) * weight[b] + bias[b]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    py = bncore.batch_norm_eval(x, mean, var, weight, bias)
    np.testing.assert_allclose(y, py, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not WHEEL, reason="BNCORE_WHEEL names no wheel (.ci/wheel sets it)")
def test_wheel_contents():
    with zipfile.ZipFile(WHEEL) as z:
        names = z.namelist()
        dist = [n for n in names if n.split("/")[0].endswith(".dist-info")]
        licenses = [n for n in dist if os.path.basename(n) == "LICENSE"]
        assert licenses, f"no LICENSE in {os.path.basename(WHEEL)}'s .dist-info"
        assert z.read(licenses[0]) == _bytes(os.path.join(ROOT, "LICENSE"))
        for h in CHECKOUT_HEADERS:
            assert z.read(f"bncore/include/{os.path.basename(h)}") == _bytes(h)
        for f in ("bncore/py.typed", "bncore/_kernels.pyi", "bncore/_include.py"):
            assert f in names, f
        assert any(n.startswith("bncore/_kernels.") and n.endswith((".so", ".pyd"))
                   for n in names), "no compiled extension"
        assert "bncore/_kernels.c" not in names
        entry = z.read(next(n for n in dist if n.endswith("entry_points.txt"))).decode()
        assert "bncore = bncore.__main__:main" in entry
        meta = z.read(next(n for n in dist if n.endswith("/METADATA"))).decode()
        assert f"Version: {bncore.__version__}" in meta
    if os.environ.get("BNCORE_WHEEL_REPAIRED"):
        assert "manylinux" in os.path.basename(WHEEL), os.path.basename(WHEEL)


@pytest.mark.skipif(not SDIST, reason="BNCORE_SDIST names no sdist (.ci/wheel sets it)")
def test_sdist_contents():
    with tarfile.open(SDIST) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for f in ["LICENSE", "README.md", "setup.py", "setup.cfg", "pyproject.toml",
              "bncore/_kernels.pyx", "bncore/_kernels.pyi", "bncore/py.typed"] + \
            [os.path.relpath(h, ROOT) for h in CHECKOUT_HEADERS]:
        assert f in names, f"{f} missing from the sdist"
