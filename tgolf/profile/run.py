"""Training steps of the real GPT under torch.profiler (or between cudaProfilerStart/Stop for nsys).

The model, optimizers and step function are the training loop's own (tgolf.model.build_model,
tgolf.train.optim.build_optimizers, tgolf.train.loop.make_train_step, compiled as the loop compiles), so
the profile shows the kernels a real run launches. Each step is one ``tgolf_step#N`` range holding the data,
forward/backward and optimizer ranges, and ends with a synchronisation so its window holds all its GPU work.
"""
from __future__ import annotations

import gzip
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from tgolf.config import Config
from tgolf.nvtx import enable_ranges, nvtx_range
from tgolf.profile.telemetry import Telemetry


@dataclass
class RunResult:
    trace_path: Path | None  # None when nsys owned the profiler (CUPTI serves one client)
    step_ms: list[float]  # host-clock time of each profiled step, synchronised at its end
    meta: dict
    telemetry: list[dict] = field(default_factory=list)


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("config device='cuda' but no CUDA device is available")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def train_flops_per_token(cfg: Config, params: int) -> float:
    """6·params (forward + backward of every weight, the tied head included) plus causal softmax attention:
    QKᵀ and AV are 2·T·d multiply-adds per token and layer, half masked, times 3 for forward + backward. With
    ``doc_attention`` the kernels skip what crosses documents, but the count stays the causal one, the usual
    convention, so MFU compares runs by step time alone."""
    return 6.0 * params + 6.0 * cfg.num_layers * cfg.train_seq_len * cfg.model_dim


def _step_batches(cfg: Config, device: torch.device,
                  accum: int) -> Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]:
    """One step's ``accum`` micro-batches (x, y): from the shards in cfg.data_path, else uniform random tokens."""
    micro_tokens = cfg.train_batch_tokens // accum
    if micro_tokens < cfg.train_seq_len or micro_tokens % cfg.train_seq_len:
        raise ValueError(f"train_batch_tokens={cfg.train_batch_tokens} / grad_accum_steps={accum} = {micro_tokens} "
                         f"tokens per micro-batch: not a positive multiple of train_seq_len={cfg.train_seq_len}")
    if cfg.data_path:
        from tgolf.data.loader import TokenLoader

        loader = TokenLoader(cfg.data_path, seed=cfg.seed, vocab_size=cfg.vocab_size)
        return lambda: loader.next_batches(cfg.train_batch_tokens, cfg.train_seq_len, accum, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rows = micro_tokens // cfg.train_seq_len

    def random_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        buf = torch.randint(0, cfg.vocab_size, (accum, rows, cfg.train_seq_len + 1), generator=gen, device=device)
        return [(b[:, :-1], b[:, 1:]) for b in buf]
    return random_batches


def run_meta(cfg: Config, device: torch.device, params: int, accum: int, world_size: int) -> dict:
    """What a report needs besides the trace: model size, tokens and FLOPs of one step on this GPU."""
    tokens = cfg.train_batch_tokens // world_size
    return {
        "preset_config": {k: getattr(cfg, k) for k in ("num_layers", "model_dim", "num_heads", "num_kv_heads",
                                                      "mlp_mult", "vocab_size", "train_seq_len",
                                                      "train_batch_tokens", "linear", "mlp", "attention", "loss",
                                                      "compile")},
        "device": device.type, "params": params, "tokens_per_step": tokens, "grad_accum_steps": accum,
        "world_size": world_size, "flops_per_step": train_flops_per_token(cfg, params) * tokens,
        "data": cfg.data_path or "random tokens",
    }


def save_trace(prof: profile, out_dir: Path) -> Path:
    """Export the chrome trace gzipped (traces compress ~10×, which keeps GPU runs under transfer limits)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "trace.json"
    prof.export_chrome_trace(str(raw))
    trace_path = out_dir / "trace.json.gz"
    with open(raw, "rb") as src, gzip.open(trace_path, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return trace_path


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


def step_profiler(cuda: bool, active: int, warmup: int) -> profile:
    """torch.profiler for ``warmup`` then ``active`` steps; the caller calls ``.step()`` after each step.

    The warm-up steps run with the profiler started but keep nothing, so its start-up (CUPTI initialisation, the
    first buffers) is not charged to the first recorded step. ``warmup=0`` (no step before the window) records at once.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if warmup == 0:
        return profile(activities=activities)
    # One cycle; acc_events keeps its events for the trace (and silences the per-cycle clearing warning).
    return profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
                   acc_events=True)


def profile_training(cfg: Config, steps: int, warmup: int, out_dir: Path,
                     nsys_steps: tuple[int, int] | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Run ``warmup`` untraced steps (compilation), then ``steps`` profiled ones; steps are numbered from 0
    over both, and ``nsys_steps=(a, b)`` brackets steps a..b (inclusive) with cudaProfilerStart/Stop."""
    from tgolf.model import build_model, count_parameters
    from tgolf.train.distributed import DistEnv
    from tgolf.train.loop import compile_model, grad_accum_steps, make_train_step
    from tgolf.train.optim import apply_schedule, build_optimizers, muon_momentum

    enable_ranges(True)
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    params = count_parameters(model)
    accum = grad_accum_steps(cfg, 1)
    net = compile_model(cfg, model, device)
    train_step = make_train_step(cfg, net, DistEnv(0, 1, 0, device), accum)
    optimizers = build_optimizers(cfg, model)
    step_batches = _step_batches(cfg, device, accum)
    cuda = device.type == "cuda"

    def one_step(i: int) -> float:
        t0 = time.perf_counter()
        with record_function(f"tgolf_step#{i}"):
            with nvtx_range("data"):
                micro = step_batches()
            loss = train_step(micro)
            with nvtx_range("optimizer"):
                apply_schedule(optimizers, 1.0, muon_momentum(cfg, i))
                for opt in optimizers:
                    opt.step()
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
            value = loss.item()
            if cuda:
                torch.cuda.synchronize()
        if not value == value:  # NaN: the profile of a diverged run is not worth reading
            raise RuntimeError(f"non-finite loss {value} at step {i}")
        return (time.perf_counter() - t0) * 1e3

    # the last warm-up step runs under the profiler's own warm-up (started, recording nothing)
    profiler_warmup = min(warmup, 1) if nsys_steps is None else 0
    t0 = time.perf_counter()
    for i in range(warmup - profiler_warmup):
        one_step(i)
    log(f"tgolf.profile: {warmup - profiler_warmup} untraced warm-up steps in {time.perf_counter() - t0:.1f}s, "
        f"{profiler_warmup} more under the profiler's warm-up ({params:,} parameters, "
        f"{accum} micro-batches per step, compile={'on' if net is not model else 'off'}, device {device})")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    use_torch_profiler = nsys_steps is None
    prof_ctx = step_profiler(cuda, steps, profiler_warmup) if use_torch_profiler else nullcontext()
    step_ms: list[float] = []
    with Telemetry() as telemetry, prof_ctx as prof:
        for i in range(warmup - profiler_warmup, warmup + steps):
            if nsys_steps and cuda and i == nsys_steps[0]:
                torch.cuda.profiler.start()
            ms = one_step(i)
            if i >= warmup:
                step_ms.append(ms)
            if nsys_steps and cuda and i == nsys_steps[1]:
                torch.cuda.profiler.stop()
            if prof is not None:
                prof.step()
    trace_path = save_trace(prof, out_dir) if use_torch_profiler else None
    meta = {
        **run_meta(cfg, device, params, accum, world_size=1), "warmup_steps": warmup,
        "profiled_steps": list(range(warmup, warmup + steps)), "nsys_steps": list(nsys_steps) if nsys_steps else None,
        "telemetry": telemetry.summary(), **peak_memory(device),
    }
    print(f"tgolf.profile: {steps} profiled steps, median {sorted(step_ms)[len(step_ms) // 2]:.1f} ms",
          file=sys.stderr)
    return RunResult(trace_path, step_ms, meta, telemetry.samples)
