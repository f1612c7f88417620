"""Build script for the native CPU kernels in csrc/ (pybind11, no torch headers).

The extension ``ambient_fast._C`` is portable: -O3 with an x86-64-v2 baseline (no
-march=native); the hot loops carry GCC target_clones for x86-64-v3 (AVX2) and x86-64-v4
(AVX-512; not for the float32 streaming loops, see csrc/common.h), picked at load time.
-ffp-contract=off keeps every clone bitwise equal to the PyTorch reference and the sampler
bitwise equal to its numpy twin. OpenMP is used when the
compiler accepts -fopenmp. See csrc/ARCHITECTURE.md.

The extension is optional: if it does not compile (no C++17 compiler; only GCC and Clang
on Linux and macOS are supported), pip prints the error and installs the package without
it, exactly as with AMBIENT_FAST_NO_EXT=1.

Environment:
    AMBIENT_FAST_NO_EXT=1       skip the native build; CPU ops then fall back to the
                                plain-PyTorch reference (one warning) and the sampler to numpy.
    AMBIENT_FAST_BUILD_JOBS=N   parallel compile jobs (default: 1 per CPU).
"""

import glob
import os
import platform

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("AMBIENT_FAST_NO_EXT", "0") != "1":
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag

    ParallelCompile("AMBIENT_FAST_BUILD_JOBS").install()

    # Each flag is kept only if the compiler accepts it.
    # -fno-trapping-math lets GCC if-convert the fp16 conversions (results are unchanged:
    # it only allows speculating operations whose exception flags nobody reads).
    OPTIONAL_FLAGS = ["-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        OPTIONAL_FLAGS.insert(0, "-march=x86-64-v2")

    class BuildExt(build_ext):
        """build_ext that probes the optional flags with the actual compiler."""

        def build_extensions(self):
            if self.compiler.compiler_type != "msvc":
                accepted = [flag for flag in OPTIONAL_FLAGS if has_flag(self.compiler, flag)]
                for ext in self.extensions:
                    ext.extra_compile_args += accepted
                    if "-fopenmp" in accepted:
                        ext.extra_link_args.append("-fopenmp")
            super().build_extensions()

    ext_modules.append(
        Pybind11Extension(
            "ambient_fast._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            depends=sorted(glob.glob("csrc/*.h")),
            cxx_std=17,
            extra_compile_args=["-O3"],
            optional=True,  # a failed native build installs the package without _C (reference fallback)
        )
    )
    cmdclass["build_ext"] = BuildExt

setup(ext_modules=ext_modules, cmdclass=cmdclass)
