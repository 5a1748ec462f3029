"""Code bytes, counted the contest's way for a package instead of a single script.

The contest counts the bytes of the training script (train_gpt.py) toward the 16,000,000-byte artifact. A tgolf
run is the tgolf source files it actually imported, so code bytes are the UTF-8 bytes on disk of:

* every module in ``sys.modules`` named ``tgolf`` or ``tgolf.*`` with a ``__file__``, plus any module whose file
  lies inside the tgolf package (``python -m tgolf.train`` runs as ``__main__``);
* the Triton kernels (``kernels/``, reached through the ``tgolf/kernels`` symlink), counted once by real path;
* when the compiled extension ``tgolf._C`` is loaded: the C++/CUDA sources under ``csrc/`` beside the package and
  ``tgolf_build.py``, the recipe that compiles them (the sources are the code; the shared library is a build
  product), or the binary itself where they are absent;

excluding the instruments a scored run does not need: ``tgolf.bench`` and ``tgolf.profile`` (benchmarks and
profilers), and tests (never under the ``tgolf`` package). Call it in the process that trained, after training,
so the modules the run used are imported; the report lists every file so the count can be checked.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import tgolf
from tgolf.config import CODE_PACKS
from tgolf.export.codepack import PackError, packed_script

EXCLUDED_PACKAGES = ("tgolf.bench", "tgolf.profile")
_CSRC_SUFFIXES = (".cu", ".cuh", ".cpp", ".cc", ".h", ".hpp")


@dataclass(frozen=True)
class CodeBytes:
    total: int  # what counts toward the artifact: the packed script's bytes, or the files' where not packed
    files: tuple[tuple[str, int], ...]  # (path relative to the repository root where possible, bytes)
    raw: int = 0  # the files' bytes as they are
    pack: str = "none"  # "lzma" when ``total`` is the packed script's size
    not_packed: str = ""  # why a requested pack was not made


def _excluded(module_name: str, path: Path, package_dir: Path, exclude: tuple[str, ...]) -> bool:
    for prefix in exclude:
        if module_name == prefix or module_name.startswith(prefix + "."):
            return True
        parts = prefix.split(".")
        if parts[0] == "tgolf" and path.is_relative_to(package_dir.joinpath(*parts[1:])):
            return True
    return False


def _source_files(exclude: tuple[str, ...]) -> set[Path]:
    package_dir = Path(tgolf.__file__).resolve().parent
    roots = (package_dir, (package_dir / "kernels").resolve())
    found: set[Path] = set()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        ours = name == "tgolf" or name.startswith("tgolf.") or any(path.is_relative_to(r) for r in roots)
        if not ours or _excluded(name, path, package_dir, exclude):
            continue
        if path.suffix == ".py":
            found.add(path)
        else:  # a compiled extension: count its sources, and the recipe that builds them, when the checkout has them
            sources = [p.resolve() for p in (package_dir.parent / "csrc").rglob("*") if p.suffix in _CSRC_SUFFIXES]
            recipe = package_dir.parent / "tgolf_build.py"
            if sources and recipe.is_file():
                sources.append(recipe.resolve())
            found.update(sources or [path])
    return found


def count_code_bytes(exclude: tuple[str, ...] = EXCLUDED_PACKAGES, pack: str = "none",
                     config: Mapping[str, Any] | None = None) -> CodeBytes:
    """Bytes of the tgolf code this process imported (see the module docstring), with the list of files.

    ``pack="lzma"`` counts the self-extracting script of those files and the run's ``config``
    (tgolf.export.codepack) instead, where it can be made: not when the run loaded the compiled extension, which
    the script could not rebuild (``not_packed`` says so, and the files count as they are).
    """
    if pack not in CODE_PACKS:
        raise ValueError(f"code pack {pack!r}: expected one of {CODE_PACKS}")
    repo_root = Path(tgolf.__file__).resolve().parent.parent
    files = []
    for path in sorted(_source_files(exclude)):
        shown = path.relative_to(repo_root) if path.is_relative_to(repo_root) else path
        files.append((str(shown), path.stat().st_size))
    raw = sum(size for _, size in files)
    if pack == "none":
        return CodeBytes(total=raw, files=tuple(files), raw=raw)
    try:
        script = packed_script(repo_root, [f for f, _ in files], config or {})
    except PackError as err:
        return CodeBytes(total=raw, files=tuple(files), raw=raw, not_packed=str(err))
    return CodeBytes(total=len(script.encode("utf-8")), files=tuple(files), raw=raw, pack=pack)
