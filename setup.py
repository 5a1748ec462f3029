"""Build script for tgolf.

The CUDA extension ``tgolf._C`` is optional: it is built when torch is importable at build time
(``pip install --no-build-isolation``) and a CUDA toolkit is found; otherwise tgolf installs
without it and every op falls back to Triton or PyTorch. See ``csrc/`` and ``tgolf/_build.py``.
"""
from __future__ import annotations

from setuptools import find_packages, setup

from tgolf_build import cuda_extension_kwargs  # noqa: E402  (local helper, see tgolf_build.py)

setup(
    packages=find_packages(include=["tgolf", "tgolf.*"]),
    **cuda_extension_kwargs(),
)
