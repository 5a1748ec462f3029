"""``python -m tgolf.info [--json]``: versions, the GPU, the CUDA extension, and which backend each op uses and why.

The op families register themselves in ``tgolf.backend.OP_CHOICES`` when imported; this module imports each of
them (a family that fails to import is reported, not fatal) and asks every registered op for its choice on the
GPU (when there is one) and on the CPU.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

import torch

import tgolf
from tgolf import backend

OP_PACKAGES = ("tgolf.ops.ternary", "tgolf.ops.quant", "tgolf.ops.mlp", "tgolf.ops.loss",
               "tgolf.ops.linear_attention")


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}


def _extension() -> dict:
    from tgolf import _extension

    built = _extension.load()
    info = {"built": built}
    if built:
        module = backend.cuda_extension()
        info["path"] = getattr(module, "__file__", None)
        info["ops"] = list(_extension.OP_NAMES)
        return info
    info["why_not"] = _extension.load_error()
    try:
        import tgolf_build
    except ImportError:
        info["build_plan"] = "tgolf_build is not importable (not an installed tgolf?)"
    else:
        would_build, why = tgolf_build.extension_plan()
        info["build_plan"] = f"{'would build' if would_build else 'would skip'}: {why}"
    return info


def _import_ops() -> dict[str, str]:
    """Import every op family; {package: error} for those that failed."""
    errors = {}
    for name in OP_PACKAGES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report any failure of one family, keep the others
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def collect() -> dict:
    """Everything ``python -m tgolf.info`` prints, as plain data."""
    gpu = _gpu()
    import_errors = _import_ops()
    devices = (["cuda"] if gpu else []) + ["cpu"]
    ops = {}
    for name in sorted(backend.OP_CHOICES):
        ops[name] = {}
        for device in devices:
            try:
                choice = backend.OP_CHOICES[name](torch.device(device))
                ops[name][device] = {"backend": choice.backend, "reason": choice.reason}
            except Exception as exc:
                ops[name][device] = {"backend": "error", "reason": f"{type(exc).__name__}: {exc}"}
    return {
        "tgolf": tgolf.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "gpu": gpu,
        "extension": _extension(),
        "environment": {key: os.environ.get(key) for key in ("TGOLF_BACKEND", "TRITON_INTERPRET")},
        "import_errors": import_errors,
        "ops": ops,
    }


def render(info: dict) -> str:
    lines = [
        f"tgolf {info['tgolf']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})  "
        f"triton {info['triton'] or 'not installed'}",
    ]
    gpu = info["gpu"]
    lines.append(f"GPU: {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['multiprocessors']} SMs, "
                 f"{gpu['memory_gib']} GiB, {gpu['count']} device(s))" if gpu else "GPU: none")
    ext = info["extension"]
    if ext["built"]:
        lines.append(f"CUDA extension tgolf._C: loaded from {ext['path']} ({', '.join(ext['ops'])})")
    else:
        lines.append(f"CUDA extension tgolf._C: not available ({ext['why_not']}); {ext['build_plan']}")
    env = ", ".join(f"{k}={v}" for k, v in info["environment"].items() if v is not None) or "none set"
    lines.append(f"environment: {env}")
    for package, error in info["import_errors"].items():
        lines.append(f"! {package} failed to import: {error}")
    lines.append("op backends:")
    width = max((len(name) for name in info["ops"]), default=0)
    for name, per_device in info["ops"].items():
        for i, (device, choice) in enumerate(per_device.items()):
            label = name if i == 0 else ""
            lines.append(f"  {label:<{width}}  {device:<4}  {choice['backend']:<9}  {choice['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tgolf.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
