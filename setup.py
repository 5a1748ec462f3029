"""Build script for tgolf.

The CUDA extension ``tgolf._C`` is optional: it is built when torch is importable at build time
(``pip install --no-build-isolation``) and a CUDA toolkit is found; otherwise tgolf installs
without it and every op falls back to Triton or PyTorch. See ``csrc/`` and ``tgolf_build.py``.
"""
from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # PEP 517 backends do not put the tree on sys.path
from tgolf_build import cuda_extension_kwargs  # noqa: E402

setup(
    packages=find_packages(include=["tgolf", "tgolf.*"]),
    **cuda_extension_kwargs(),
)
