"""Builds the one extension, bncore._kernels (metadata lives in setup.cfg).

OpenMP is used when a probe program compiles, links and runs with -fopenmp;
otherwise the build goes on serially (bncore.show_config() says so).
BNCORE_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer.
"""
import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy  # build requirement: its C API serves the fast paths in _kernels.pyx
from Cython.Build import cythonize
from setuptools import Extension, setup

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


def openmp_flags():
    if os.environ.get("BNCORE_NO_OPENMP"):
        return []
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(PROBE)
        try:
            subprocess.run(cc.split() + ["-fopenmp", src, "-o", exe], check=True,
                           capture_output=True, timeout=120)
            subprocess.run([exe], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            print("bncore: OpenMP not available, building serial kernels", file=sys.stderr)
            return []
    return ["-fopenmp"]


omp = openmp_flags()
compile_args = ["-O3"] + omp
link_args = list(omp)
if os.environ.get("BNCORE_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    compile_args = ["-O1", "-g"] + omp + san
    link_args += san

no_dispatch = [("BNCORE_NO_DISPATCH", "1")] if os.environ.get("BNCORE_NO_DISPATCH") == "1" else []  # portable baseline kernels
ext = Extension(
    "bncore._kernels",
    ["bncore/_kernels.pyx"],
    include_dirs=["include", numpy.get_include()],
    depends=["include/bncore.h", "include/bncore_impl.h", "include/bncore_template.h",
             "include/bncore_norms_template.h"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")] + no_dispatch,
)

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": 3}))
