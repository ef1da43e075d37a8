"""Builds the one extension, bncore._kernels (metadata lives in setup.cfg).

OpenMP: the compiler that builds the extension is probed with each known flag
set (GCC and LLVM clang ``-fopenmp``, Apple clang ``-Xpreprocessor -fopenmp
-lomp``, MSVC ``/openmp``); the first that compiles, links and runs a small
program wins. If none does, the kernels are built serially and
``bncore.show_config()`` reports ``openmp: off (serial build)``.

The C headers (``include/*.h``, the source of truth) are also copied into the
package as ``bncore/include/``, so a wheel ships them and
``bncore.get_include()`` finds them in an installed package.

Environment:
  BNCORE_NO_OPENMP=1   build serial kernels without probing
  BNCORE_NO_DISPATCH=1 no run-time SIMD dispatch (defines BNCORE_NO_DISPATCH): the
                       portable baseline kernels only
  BNCORE_SANITIZE=1    AddressSanitizer + UndefinedBehaviorSanitizer (GCC/clang)
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy  # build requirement: its C API serves the fast paths in _kernels.pyx
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HEADERS = sorted(glob.glob(os.path.join("include", "*.h")))

PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d\n", n > 0);
    return 0;
}
"""


def _libomp_dirs():
    """Include and library folders of a Homebrew/MacPorts libomp (Apple clang ships none)."""
    prefixes = [os.environ.get("BNCORE_LIBOMP_PREFIX", ""), "/opt/homebrew/opt/libomp",
                "/usr/local/opt/libomp", "/opt/local"]
    for p in filter(None, prefixes):
        inc, lib = os.path.join(p, "include"), os.path.join(p, "lib")
        if os.path.exists(os.path.join(inc, "omp.h")) or \
                os.path.exists(os.path.join(inc, "libomp", "omp.h")):
            incs = [inc, os.path.join(inc, "libomp")]
            libs = [lib, os.path.join(lib, "libomp")]
            return [d for d in incs if os.path.isdir(d)], [d for d in libs if os.path.isdir(d)]
    return [], []


def openmp_candidates(compiler_type):
    """(name, compile args, link args, include dirs, library dirs) to try, in order."""
    if compiler_type == "msvc":
        return [("/openmp", ["/openmp"], [], [], [])]
    cands = [("-fopenmp", ["-fopenmp"], ["-fopenmp"], [], [])]
    if sys.platform == "darwin":
        inc, lib = _libomp_dirs()
        cands.append(("-Xpreprocessor -fopenmp -lomp", ["-Xpreprocessor", "-fopenmp"],
                      ["-lomp"] + [f"-Wl,-rpath,{d}" for d in lib], inc, lib))
    return cands


def probe_openmp(compiler):
    """The first OpenMP flag set this compiler builds and runs a program with, or None."""
    for cand in openmp_candidates(compiler.compiler_type):
        name, cargs, largs, incs, libs = cand
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(PROBE)
            try:
                objs = compiler.compile([src], output_dir=tmp, include_dirs=incs,
                                        extra_postargs=cargs)
                exe = os.path.join(tmp, "probe")
                compiler.link_executable(objs, exe, library_dirs=libs, extra_postargs=largs)
                if compiler.compiler_type == "msvc":
                    exe += ".exe"
                # a cross build cannot run the probe; linking is then the test
                if not os.environ.get("BNCORE_CROSS_COMPILING"):
                    subprocess.run([exe], check=True, capture_output=True, timeout=60)
            except Exception:  # CompileError, LinkError, OSError, a failed run
                continue
        return cand
    return None


class BuildExt(build_ext):
    """Picks optimization and OpenMP flags for the compiler actually used."""

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        omp = None if os.environ.get("BNCORE_NO_OPENMP") else probe_openmp(self.compiler)
        if os.environ.get("BNCORE_NO_OPENMP"):
            print("bncore: BNCORE_NO_OPENMP is set: building serial kernels", file=sys.stderr)
        elif omp is None:
            print("bncore: no OpenMP flag worked with this compiler "
                  f"({', '.join(c[0] for c in openmp_candidates(ctype))}); "
                  "building serial kernels", file=sys.stderr)
        else:
            print(f"bncore: OpenMP with {omp[0]}", file=sys.stderr)
        if ctype == "msvc":
            cargs, largs = ["/O2"], []
        else:
            cargs, largs = ["-O3"], []
            if os.environ.get("BNCORE_SANITIZE"):
                san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                       "-fno-sanitize-recover=undefined"]
                cargs, largs = ["-O1", "-g"] + san, list(san)
        for ext in self.extensions:
            ext.extra_compile_args = cargs + (omp[1] if omp else [])
            ext.extra_link_args = largs + (omp[2] if omp else [])
            if omp:
                ext.include_dirs += omp[3]
                ext.library_dirs += omp[4]
        super().build_extensions()


class BuildPy(build_py):
    """Copies the C headers into the built package as bncore/include/."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "bncore", "include")
        os.makedirs(dest, exist_ok=True)
        for h in HEADERS:
            shutil.copy2(h, dest)

    def get_outputs(self, include_bytecode=True):
        out = super().get_outputs(include_bytecode)
        dest = os.path.join(self.build_lib, "bncore", "include")
        return out + [os.path.join(dest, os.path.basename(h)) for h in HEADERS]


macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if os.environ.get("BNCORE_NO_DISPATCH"):
    macros.append(("BNCORE_NO_DISPATCH", "1"))  # portable baseline kernels

ext = Extension(
    "bncore._kernels",
    ["bncore/_kernels.pyx"],
    include_dirs=["include", numpy.get_include()],
    depends=HEADERS,
    define_macros=macros,
)

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": 3}),
      cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
