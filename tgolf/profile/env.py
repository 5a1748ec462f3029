"""What a measurement ran on: device, driver, CUDA, torch and triton versions, date, commit, command.

Every benchmark and profile report carries this block, and ``scripts/gpu_check.sh`` writes it as env.json
(``python -m tgolf.profile.env --command "..."``) so that committed numbers say where they came from.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _nvml() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        info = {"driver": pynvml.nvmlSystemGetDriverVersion(),
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
                "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)}
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in info.items()}
    except Exception as exc:  # telemetry is a nicety, never a failure
        return {"nvml_error": str(exc)}
    finally:
        pynvml.nvmlShutdown()


def collect_env(command: str | None = None) -> dict:
    """A JSON-able description of this process's machine and software."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "git_commit": _git_commit(),
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device="cuda", device_name=props.name, device_count=torch.cuda.device_count(),
                   sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
        env.update(_nvml())
    return env


def device_slug(env: dict) -> str:
    """Folder-safe device name, e.g. ``NVIDIA-H100-80GB-HBM3`` or ``cpu``."""
    name = env.get("device_name") if env.get("device") == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tgolf.profile.env", description=__doc__.splitlines()[0])
    parser.add_argument("--command", default=None, help="the command line to record (default: this one)")
    parser.add_argument("--slug", action="store_true", help="print only '<date>-<device>' for folder names")
    args = parser.parse_args(argv)
    env = collect_env(args.command)
    if args.slug:
        print(f"{env['date_utc'][:10]}-{device_slug(env)}")
    else:
        print(json.dumps(env, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
