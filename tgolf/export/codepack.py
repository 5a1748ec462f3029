"""The run's code as one self-extracting script, the way contest records ship theirs.

Code bytes count toward the 16,000,000-byte artifact. Records pack their source with LZMA and base85 into a
``train_gpt.py`` of a few lines (openai/parameter-golf PRs #1394 and #1412: 78 KB of source became 23 KB); a tgolf
run's sources (all the modules it imported, see tgolf.export.codebytes) pack the same way, into one script that
unpacks them into a temporary folder and runs ``tgolf.train`` from there:

* the payload is JSON (no pickle): ``{"env": {...}, "files": {path: text}}``, LZMA (xz, preset 9 extreme), then
  base85, whose alphabet needs no escaping inside a Python string literal;
* ``files`` are the sources without comments and docstrings (tgolf.export.codestrip checks that the code is
  unchanged), laid out as the package imports them: ``tgolf/...`` and the Triton kernels under
  ``tgolf/kernels/`` (a symlink in the checkout). A run that loaded the compiled CUDA extension ``tgolf._C``
  also packs its C++/CUDA sources (``csrc/``) and their build recipe (``tgolf_build.py``): the script builds them
  first (just in time, cached, with the machine's CUDA toolkit), or warns and lets those ops run on Triton;
* ``env`` holds the run's settings as the environment variables tgolf reads (those that differ from the
  defaults, without the machine's paths and names), set only where the environment does not set them, so
  ``torchrun --nproc_per_node=8 train_gpt.py`` repeats the run and variables or flags still override it.

Packing is deterministic (sorted keys, fixed settings): the same sources and settings give the same bytes, so
the size counted at the end of a run is the size of the script a submission ships.

``python -m tgolf.export.codepack train_gpt.py [--extract DIR]`` shows what a packed script holds (settings, files
and their sizes) without running it, and writes the files out.
"""
from __future__ import annotations

import ast
import base64
import json
import lzma
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from tgolf.config import changed_fields
from tgolf.export.codestrip import strip

# Settings that name this machine's files or this run rather than what was trained: not carried by the script.
MACHINE_FIELDS = ("data_path", "tokenizer_path", "run_id", "out_dir", "submission_dir", "resume", "profile_steps")
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_BLOB = "@BLOB@"
_SCRIPT = f'''\
# tgolf: a training run's code, packed (LZMA + base85). Use it like `python -m tgolf.train`, under torchrun too:
# it unpacks the tgolf sources into a temporary folder and runs tgolf.train there with the packed run's settings
# (environment variables and flags override them).
import atexit, base64, json, lzma, os, runpy, shutil, sys, tempfile
P = json.loads(lzma.decompress(base64.b85decode("{_BLOB}")))
d = tempfile.mkdtemp(prefix="tgolf-code-")
atexit.register(shutil.rmtree, d, True)
for name, text in P["files"].items():
    path = os.path.join(d, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
for key, value in P["env"].items():
    os.environ.setdefault(key, value)
sys.path.insert(0, d)
if "tgolf_build.py" in P["files"]:  # the run used tgolf's CUDA kernels: build them as setup.py does (needs nvcc)
    try:
        import tgolf_build
        sys.modules["tgolf._C"] = tgolf_build.load_extension(os.path.join(d, "csrc"))
    except Exception as err:
        print(f"tgolf: the CUDA extension did not build ({{err}}); its ops run on Triton", file=sys.stderr)
runpy.run_module("tgolf.train", run_name="__main__", alter_sys=True)
'''


class PackError(ValueError):
    """A packed script that cannot be read back."""


def packed_path(repo_path: str) -> str:
    """Where a file counted in the code bytes (a path relative to the repository root) sits in the pack."""
    parts = PurePosixPath(repo_path).parts
    if parts and parts[0] == "kernels":  # tgolf/kernels is a symlink to the checkout's kernels/
        return str(PurePosixPath("tgolf", *parts))
    return str(PurePosixPath(*parts))


def run_env(config: Mapping[str, Any]) -> dict[str, str]:
    """The run's settings that differ from Config's defaults, as tgolf's environment variables (not the machine's
    paths and names: MACHINE_FIELDS)."""
    return {name.upper(): ("1" if value else "0") if isinstance(value, bool) else str(value)
            for name, value in sorted(changed_fields(config).items()) if name not in MACHINE_FIELDS}


def pack_script(files: Mapping[str, str], env: Mapping[str, str]) -> str:
    """The self-extracting script for ``files`` ({path in the pack: source text}) and ``env``."""
    payload = json.dumps({"env": dict(env), "files": dict(files)}, sort_keys=True, ensure_ascii=False)
    blob = lzma.compress(payload.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                         filters=_LZMA_FILTERS)
    return _SCRIPT.replace(_BLOB, base64.b85encode(blob).decode("ascii"))


def read_pack(script: str, name: str = "script") -> dict[str, Any]:
    """The payload (``env`` and ``files``) of a packed script, read without running any of it."""
    try:
        tree = ast.parse(script, name)
    except SyntaxError as err:
        raise PackError(f"{name}: not a tgolf packed script (not Python: {err.msg}, line {err.lineno})") from None
    literals = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                and isinstance(node.value, str) and len(node.value) > 64]
    if len(literals) != 1:
        raise PackError(f"{name}: not a tgolf packed script (expected one long string literal, found "
                        f"{len(literals)})")
    try:
        payload = json.loads(lzma.decompress(base64.b85decode(literals[0])))
    except (ValueError, lzma.LZMAError) as err:
        raise PackError(f"{name}: the packed sources do not decode: {err}") from None
    if not isinstance(payload, dict) or set(payload) != {"env", "files"}:
        raise PackError(f"{name}: the payload is not {{'env', 'files'}}")
    return payload


def unpackable(repo_paths: list[str]) -> str:
    """Why these files (relative to the repository root) cannot be packed, or "" when they can."""
    for rel in repo_paths:
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts:
            return f"{rel} lies outside the checkout holding the tgolf package"
        if path.suffix != ".py" and path.parts[0] != "csrc":
            return (f"{rel} is not source text (the compiled extension tgolf._C, without its csrc/ sources beside "
                    "the package); the files count as they are")
    return ""


def packed_script(root: Path, repo_paths: list[str], config: Mapping[str, Any]) -> str:
    """The packed script of the files (relative to ``root``, the repository root), stripped of their prose, and
    the run's ``config``."""
    why = unpackable(repo_paths)
    if why:
        raise PackError(f"cannot pack this run's code: {why}")
    files = {}
    for rel in repo_paths:
        text = (root / rel).read_text(encoding="utf-8")
        files[packed_path(rel)] = strip(text) if rel.endswith(".py") else text
    return pack_script(files, run_env(config))


def extract(script: str, out_dir: Path) -> list[Path]:
    """Write a packed script's files under ``out_dir`` (read, never run); refuses to replace existing files."""
    files = read_pack(script)["files"]
    targets = []
    for name in files:
        path = Path(name)
        if path.is_absolute() or ".." in path.parts:
            raise PackError(f"packed file {name!r} would land outside {out_dir}")
        targets.append(out_dir / path)
    clashes = [str(t) for t in targets if t.exists()]
    if clashes:
        raise FileExistsError(f"extract: {len(clashes)} files already exist, first {clashes[0]}; nothing written")
    for target, text in zip(targets, files.values()):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return targets


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tgolf.export.codepack",
                                     description="Show what a packed train_gpt.py holds (its settings and files), "
                                                 "without running it; --extract writes the files out.")
    parser.add_argument("script", type=Path)
    parser.add_argument("--extract", type=Path, metavar="DIR", help="write the packed files under DIR")
    args = parser.parse_args(argv)
    try:
        text = args.script.read_text(encoding="utf-8")
        payload = read_pack(text, str(args.script))
        written = extract(text, args.extract) if args.extract else []
    except (OSError, PackError) as err:
        print(f"tgolf.export.codepack: {err}", file=sys.stderr)
        return 2
    print(f"{args.script}: {len(text.encode('utf-8')):,} bytes, {len(payload['files'])} files, "
          f"{sum(len(t.encode('utf-8')) for t in payload['files'].values()):,} bytes unpacked")
    for key, value in payload["env"].items():
        print(f"  {key}={value}")
    for name, source in payload["files"].items():
        print(f"  {len(source.encode('utf-8')):8,}  {name}")
    if written:
        print(f"wrote {len(written)} files under {args.extract}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
