"""Build script for the native CPU kernels in csrc/ (pybind11).

Set AMBIENT_FAST_NO_EXT=1 to skip the native build; the package then falls back to the
plain-PyTorch reference on CPU with one warning at import.
"""

import glob
import os

from setuptools import setup

ext_modules = []
if os.environ.get("AMBIENT_FAST_NO_EXT", "0") != "1":
    sources = sorted(glob.glob("csrc/*.cpp"))
    if sources:
        from pybind11.setup_helpers import Pybind11Extension

        ext_modules.append(
            Pybind11Extension("ambient_fast._C", sources, cxx_std=17, extra_compile_args=["-O3"])
        )

setup(ext_modules=ext_modules)
