"""Decides whether setup.py builds the optional CUDA extension ``tgolf._C``, and how.

Kept out of setup.py so that the decision (opted out? torch importable? CUDA toolkit present?) is one small
function that the build and ``python -m tgolf.info`` explain the same way, and so that a packed run's code
(tgolf.export.codepack) can build the extension just in time with the same recipe (``load_extension``).

Environment: ``TGOLF_NO_CUDA_EXT=1`` skips the extension; ``TORCH_CUDA_ARCH_LIST`` picks the GPU targets
(default ``8.0;9.0a``: sm_80 and sm_90a); ``MAX_JOBS`` the parallel compile jobs (default 2).
"""
from __future__ import annotations

import glob
import os

DEFAULT_ARCH_LIST = "8.0;9.0a"
DEFAULT_MAX_JOBS = "2"
_ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH, else /usr/local/cuda when it holds nvcc (torch's own guess follows `which nvcc`,
    which can be a wrapper script outside the toolkit), else torch's guess."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def _late_include_dirs(cuda_home: str) -> list[str]:
    """Headers of the pip CUDA package (nvidia/cu13/include: cuBLAS and friends) when the toolkit lacks them;
    searched after the toolkit's own headers (its crt/ folder is not in the pip package)."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        found += sorted(glob.glob(os.path.join(root, "cu[0-9]*", "include")))
    return found


def extension_plan() -> tuple[bool, str]:
    """(build it?, why) for the CUDA extension, from the environment alone."""
    if os.environ.get("TGOLF_NO_CUDA_EXT") == "1":
        return False, "TGOLF_NO_CUDA_EXT=1"
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError:
        return False, ("torch is not importable at build time (install torch first, then "
                       "`pip install --no-build-isolation -e .`)")
    cuda_home = _find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return False, "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)"
    return True, f"CUDA toolkit at {cuda_home}"


def _prepare_toolchain() -> list[str]:
    """Point torch's extension builder at the toolkit and set the default targets and jobs; return the C++
    compiler's extra flags."""
    from torch.utils import cpp_extension

    cuda_home = _find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # read when CUDAExtension and the build resolve include and lib paths
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", DEFAULT_MAX_JOBS)
    late = [flag for d in _late_include_dirs(cuda_home) for flag in ("-idirafter", d)]
    # the C++ standard is the one torch's headers need (torch adds it)
    return ["-O3"] + late


# The .cu files include no torch headers (fast nvcc); -lineinfo: source lines for compute-sanitizer and ncu.
_NVCC_FLAGS = ["-O3", "-lineinfo"]


def _sources(csrc: str) -> list[str]:
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))


def cuda_extension_kwargs() -> dict:
    """Return ``ext_modules``/``cmdclass`` for setup(), or {} when the extension cannot be built."""
    build, why = extension_plan()
    if not build:
        print(f"tgolf: not building the CUDA extension tgolf._C: {why}")
        return {}
    from torch.utils import cpp_extension

    cxx_flags = _prepare_toolchain()
    print(f"tgolf: building the CUDA extension tgolf._C ({why}; TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']})")
    extension = cpp_extension.CUDAExtension(
        name="tgolf._C",
        sources=_sources("csrc"),
        include_dirs=[os.path.join(_ROOT, "csrc")],
        # Find torch's libraries even when tgolf._C is imported before torch: beside an installed tgolf, or where
        # torch was at build time (editable installs).
        extra_link_args=[f"-Wl,-rpath,{path}" for path in ("$ORIGIN/../torch/lib", cpp_extension.TORCH_LIB_PATH)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": _NVCC_FLAGS},
    )
    return {"ext_modules": [extension],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


def load_extension(csrc: str, build_dir: str | None = None):
    """Build ``csrc``'s sources as setup.py does, just in time, and return the loaded module (the packed code of a
    run that used tgolf._C rebuilds it this way, tgolf.export.codepack). The build is cached in ``build_dir``
    (default ``$TGOLF_EXTENSION_DIR`` or ``~/.cache/tgolf/extension``) and rebuilt when a source changes; ranks
    started together wait for one build."""
    build, why = extension_plan()
    if not build:
        raise RuntimeError(f"cannot build the CUDA extension tgolf._C: {why}")
    from torch.utils import cpp_extension

    cxx_flags = _prepare_toolchain()
    build_dir = build_dir or os.environ.get("TGOLF_EXTENSION_DIR") or os.path.expanduser("~/.cache/tgolf/extension")
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load("_C", _sources(csrc), extra_include_paths=[csrc], extra_cflags=cxx_flags,
                              extra_cuda_cflags=_NVCC_FLAGS, build_directory=build_dir)
