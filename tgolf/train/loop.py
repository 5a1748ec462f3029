"""The timed training loop: compile warm-up (then restored), steps inside the wall-clock budget, periodic
validation, checkpoints on a timer and on SIGTERM, and a clean stop on a non-finite loss.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from tgolf.config import Config, parse_step_range
from tgolf.nvtx import nvtx_range
from tgolf.train import checkpoint, distributed
from tgolf.train.distributed import DistEnv
from tgolf.train.ema import WeightEMA
from tgolf.train.logging import RunLogger
from tgolf.train.optim import apply_schedule, build_optimizers, muon_momentum
from tgolf.train.schedule import lr_scale, training_fraction
from tgolf.train.switches import Switch, training_switches, warmup_combinations


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(RuntimeError):
    """Raised after the SIGTERM checkpoint is written, so the caller exits without exporting."""


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    last_loss: float
    tokens: int
    val_history: list[dict] = field(default_factory=list)
    stopped_by: str = "iterations"  # iterations | wallclock
    switch_steps: dict[str, int] = field(default_factory=dict)  # the step each switch turned on at (train.switches)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    if cfg.grad_accum_steps > 0:
        return cfg.grad_accum_steps
    if 8 % world_size:
        raise ValueError(f"world_size={world_size} must divide 8 when grad_accum_steps=0 (the baseline rule); "
                         "set --grad-accum-steps")
    return 8 // world_size


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs (fp32 master weights); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_compile(cfg: Config, device: torch.device) -> bool:
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def inductor_options(cfg: Config) -> dict[str, bool]:
    """Inductor settings for compiling the model.

    Inductor (torch ≥ 2.10) fuses each RMSNorm backward with the column sums of the per-channel parameters
    (``attn_scale``, ``mlp_scale``, ``resid_mix``) into one "mix-order reduction" kernel. Without a cap on the loads
    such a kernel absorbs, it spills registers on this very model (pytorch#179423, found on a Parameter Golf
    model; the cap ``triton.mix_order_reduction_max_reads`` came with its fix). tgolf's H100 profile on torch 2.11
    (profiles/2026-11-27-NVIDIA-H100-80GB-HBM3) shows it: two such kernels (grid 2048 × 64 threads, 32
    registers) took 4.4 and 3.8 ms per micro-batch, 36% of the step with the other norm kernels, where their
    bytes cost tens of µs. So "auto" turns the fusion off where torch lacks the cap, and leaves torch's default
    (or an explicit TORCHINDUCTOR_MIX_ORDER_REDUCTION) alone elsewhere.

    ``cuda_graphs`` has inductor record the compiled forward and backward as CUDA graphs and replay them, so the
    host's launches leave the step. Why it may pay: the 2026-11-28 H200 profile of the compiled baseline had 25 ms
    of every 295 ms step idle inside forward and backward, and an eager forward+backward of tgolf's ops took up to
    about 1 ms longer than its graph replay (profiles/2026-11-28-NVIDIA-H200). Not yet measured in training on a
    GPU; CPU tensors are never graphed.
    """
    import torch._inductor.config as inductor_config

    options = mix_order_options(cfg.mix_order_reduction,
                                has_fusion=hasattr(inductor_config.triton, "mix_order_reduction"),
                                has_cap=hasattr(inductor_config.triton, "mix_order_reduction_max_reads"),
                                env_set="TORCHINDUCTOR_MIX_ORDER_REDUCTION" in os.environ)
    if cfg.cuda_graphs:  # what torch.compile's mode="reduce-overhead" sets (mode and options exclude each other)
        options["triton.cudagraphs"] = True
    return options


def mix_order_options(setting: str, *, has_fusion: bool, has_cap: bool, env_set: bool) -> dict[str, bool]:
    """The decision of ``inductor_options``, from what this torch has and what the environment says."""
    if not has_fusion:  # a torch before the fusion existed
        return {}
    if setting == "auto":
        return {} if env_set or has_cap else {"triton.mix_order_reduction": False}
    return {"triton.mix_order_reduction": setting == "on"}


def compile_model(cfg: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` compiled whole (static shapes, no graph breaks) when ``cfg.compile`` asks for it, else itself."""
    if not use_compile(cfg, device):
        return model
    return torch.compile(model, dynamic=False, fullgraph=True, options=inductor_options(cfg) or None)


def make_train_step(cfg: Config, model: nn.Module, env: DistEnv, accum: int) -> Callable[[list], torch.Tensor]:
    """step(micro_batches) runs forward and backward over ``accum`` (x, y) pairs; returns the mean loss (tensor)."""
    ddp = isinstance(model, DistributedDataParallel)

    def step(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), device=env.device)
        for i, (x, y) in enumerate(micro_batches):
            sync = not ddp or i == len(micro_batches) - 1
            if cfg.cuda_graphs:  # each micro-batch is a new replay: the last one's outputs are used up by now
                torch.compiler.cudagraph_mark_step_begin()
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with nvtx_range("forward"), autocast_context(env.device):
                    loss = model(x, y)
                with nvtx_range("backward"):
                    (loss / len(micro_batches)).backward()
            total += loss.detach()
        return total / len(micro_batches)

    return step


class _SigtermFlag:
    """Sets a flag on SIGTERM (torchrun and schedulers send it) instead of dying mid-step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> "_SigtermFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# no buffer sync per forward: the only buffers (RoPE tables) are identical on every rank. torch 2.14 renamed the
# argument (its forward_sync_buffers=False still syncs once at init, which is harmless here)
_NO_BUFFER_SYNC_PER_FORWARD = ({"forward_sync_buffers": False}
                               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                               else {"broadcast_buffers": False})


# Config fields a resumed run may change: none shapes the training steps still to come. The rest must equal the
# checkpoint's (iterations may grow: a run stopped by time continues by time).
_RESUME_MAY_CHANGE = frozenset({
    "resume", "run_id", "out_dir", "submission_dir", "device", "compile", "mix_order_reduction", "cuda_graphs",
    "profile_steps",
    "max_wallclock_seconds", "iterations", "checkpoint_every", "val_loss_every", "train_log_every",
    "val_batch_size", "val_tokens_limit", "eval_stride", "eval_seq_len", "compressor", "code_pack",
    "max_artifact_bytes"})


def _resume_may_change(field: str) -> bool:
    return field in _RESUME_MAY_CHANGE or field.startswith(("export_", "ttt_", "gptq_"))


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, loader, logger: RunLogger,
                 validate: Callable[[nn.Module], dict], run_dir: Path):
        self.cfg, self.env, self.loader, self.logger = cfg, env, loader, logger
        self.validate, self.run_dir = validate, run_dir
        self.raw_model = model
        self.optimizers = build_optimizers(cfg, model)
        # the average starts from the initial weights, which the warm-up restores; only run() updates it
        self.ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.accum = grad_accum_steps(cfg, env.world_size)
        micro_tokens = cfg.train_batch_tokens // (env.world_size * self.accum)
        if micro_tokens < cfg.train_seq_len or micro_tokens % cfg.train_seq_len:
            raise ValueError(f"train_batch_tokens={cfg.train_batch_tokens} over world_size={env.world_size} × "
                             f"grad_accum_steps={self.accum} gives {micro_tokens} tokens per micro-batch, "
                             f"not a positive multiple of train_seq_len={cfg.train_seq_len}")
        self.switches = training_switches(cfg, model)
        self.switch_steps: dict[str, int] = {}  # the step each switch turned on at
        net = compile_model(cfg, model, env.device)
        if env.enabled:
            net = DistributedDataParallel(net, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                          **_NO_BUFFER_SYNC_PER_FORWARD)
        # the only reference to the DDP wrapper (``close`` drops it)
        self.train_step: Callable[[list], torch.Tensor] | None = make_train_step(cfg, net, env, self.accum)
        self.window = None  # the profiled window of --profile-steps, on the main rank only
        steps = parse_step_range(cfg.profile_steps, "config field profile_steps")
        if steps is not None and env.is_main:
            # an instrument, imported only when asked for (tgolf.profile is not counted in the code bytes)
            from tgolf.profile.run import run_meta
            from tgolf.profile.window import StepWindow

            params = sum(p.numel() for p in model.parameters())
            self.window = StepWindow(steps, run_dir / "profile", env.device,
                                     run_meta(cfg, env.device, params, self.accum, env.world_size))
        self.step = 0
        self.train_seconds = 0.0
        self.last_finite_loss = math.nan
        self.nonfinite: tuple[int, float] | None = None

    # --- pieces -------------------------------------------------------------------------------
    def _micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with nvtx_range("data"):
            return self.loader.next_batches(self.cfg.train_batch_tokens, self.cfg.train_seq_len, self.accum,
                                            self.env.device)

    def _optimizer_step(self, scale: float) -> None:
        with nvtx_range("optimizer"):
            apply_schedule(self.optimizers, scale, muon_momentum(self.cfg, self.step))
            if self.cfg.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip_norm)
            for opt in self.optimizers:
                opt.step()
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)

    def _check_finite(self, step: int, loss: float) -> None:
        """Remember the first non-finite loss; the loop stops every rank at its next step boundary."""
        if math.isfinite(loss):
            self.last_finite_loss = loss
        elif self.nonfinite is None:
            self.nonfinite = (step, loss)

    def _nonfinite_error(self) -> NonFiniteLoss:
        last = "none yet" if math.isnan(self.last_finite_loss) else f"{self.last_finite_loss:.4f}"
        if self.nonfinite is None:
            return NonFiniteLoss(f"non-finite training loss on another rank; this rank's last finite loss {last}")
        step, loss = self.nonfinite
        return NonFiniteLoss(f"non-finite training loss {loss} at step {step}; last finite loss {last}")

    def _save_checkpoint(self) -> Path:
        model_state = {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}
        return checkpoint.save(self.run_dir / "checkpoints", rank=self.env.rank, world_size=self.env.world_size,
                               step=self.step, train_seconds=self.train_seconds, config=self.cfg.to_dict(),
                               model_state=model_state, optimizer_states=[o.state_dict() for o in self.optimizers],
                               loader_state=self.loader.state_dict(), barrier=distributed.barrier,
                               ema_state=self.ema.state_dict() if self.ema is not None else None,
                               switch_steps=self.switch_steps)

    def resume(self, path: str) -> None:
        ckpt = checkpoint.load(path, self.env.rank, self.env.world_size, map_location=self.env.device)
        mine, theirs = self.cfg.to_dict(), ckpt.config
        differing = sorted(k for k in mine if not _resume_may_change(k) and mine[k] != theirs.get(k))
        if differing:
            raise ValueError(f"--resume {path}: config differs from the checkpoint's in {differing} (a resumed "
                             "run may change only where it writes, how long it runs and logs, and how it "
                             "evaluates and exports)")
        self.raw_model.load_state_dict(ckpt.model)
        if self.ema is not None:  # the config check above guarantees the checkpoint kept one
            self.ema.load_state_dict(ckpt.ema)
        for opt, state in zip(self.optimizers, ckpt.optimizers):
            opt.load_state_dict(state)
        self.loader.load_state_dict(ckpt.loader)
        for switch in self.switches:  # on from the first resumed step, and reported as it happened
            if switch.name in ckpt.switch_steps:
                switch.set(True)
                self.switch_steps[switch.name] = ckpt.switch_steps[switch.name]
        checkpoint.restore_rng(ckpt.rng)
        self.step, self.train_seconds = ckpt.step, ckpt.train_seconds
        self.logger.log(f"resumed from {checkpoint.resolve(path)} at step {self.step}, "
                        f"train_time:{1000 * self.train_seconds:.0f}ms")

    def warmup(self) -> None:
        """Run ``warmup_steps`` steps to compile and warm kernels, then restore model, optimizers and data."""
        if self.cfg.warmup_steps <= 0:
            return
        saved_model = copy.deepcopy(self.raw_model.state_dict())
        saved_opts = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        saved_loader = copy.deepcopy(self.loader.state_dict())
        t0 = time.perf_counter()
        pending = self._pending_switches()
        for combination in warmup_combinations(pending, self.cfg.warmup_steps):
            for switch, on in zip(pending, combination):
                switch.set(on)  # each graph the run may reach is compiled now, not inside the timed run
            self.train_step(self._micro_batches())
            self._optimizer_step(1.0)
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()
        for switch in pending:
            switch.set(False)
        self.raw_model.load_state_dict(saved_model)
        for opt, state in zip(self.optimizers, saved_opts):
            opt.load_state_dict(state)
        self.loader.load_state_dict(saved_loader)
        self.logger.log(f"warmup: {self.cfg.warmup_steps} steps in {time.perf_counter() - t0:.1f}s "
                        "(not counted; model, optimizer and data state restored)")

    def _pending_switches(self) -> list[Switch]:
        return [switch for switch in self.switches if switch.name not in self.switch_steps]

    def _flip_due_switches(self, scale: float, done: float) -> None:
        for switch in self._pending_switches():
            if switch.due(scale, done):
                switch.set(True)
                self.switch_steps[switch.name] = self.step
                self.logger.log(f"{switch.reason(scale, done)} from step {self.step}")

    def _finish_switches(self) -> None:
        """Switch on what the artifact's model has on, when training ended before it was due."""
        for switch in self._pending_switches():
            if switch.on_at_end:
                switch.set(True)
                self.logger.log(f"warning: training ended at step {self.step}, before switch {switch.name!r} was "
                                "due; the model is evaluated and exported with it on, as the artifact's model "
                                "runs, though it never trained so")

    def _finish_profile(self) -> None:
        """Write the profiled window's trace (outside the timed training) and say how to read it."""
        if self.window is None:
            return
        trace = self.window.finish(self.step - 1)
        first, last = self.window.steps
        if trace is None:
            self.logger.log(f"profile_steps {first}:{last}: nothing recorded, the run stopped at step {self.step}")
            return
        self.logger.log(f"profiled steps {first}..{first + len(self.window.step_ms) - 1} → {trace}; report: "
                        f"python -m tgolf.profile --from-trace {trace} --out {trace.parent}")

    def load_average(self) -> None:
        """With ``ema_decay``: put the weights' moving average into the model, for evaluation and export (the
        last step's weights are gone then: call it once training is over)."""
        if self.ema is not None:
            self.ema.copy_to_model()
            self.logger.log(f"weights: the moving average (ema_decay {self.cfg.ema_decay}) replaces the last step's "
                            "for evaluation and export")

    def close(self) -> None:
        """Release the step and the DDP wrapper it holds; the trainer cannot train after this. DDP sits in a
        reference cycle, so only the garbage collector frees it: left to interpreter exit, it goes after the
        process group, and gloo then aborts the process ("terminate called without an active exception": 7 of 45
        two-rank test runs on a 2-core CPU). ``distributed.teardown`` collects it while the group still exists."""
        self.train_step = None

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        budget = cfg.train_budget_seconds()
        history: list[dict] = []
        pending: tuple[int, torch.Tensor] | None = None  # last step's loss, read one step late (no GPU stall)
        last_ckpt = self.train_seconds
        stopped_by = "iterations"
        start_step, start_seconds = self.step, self.train_seconds
        # with a wall-clock budget the bar counts training seconds, which is what ends the run
        progress = (self.logger.progress(total=budget, initial=self.train_seconds, unit="s") if budget > 0
                    else self.logger.progress(total=cfg.iterations, initial=self.step))
        with _SigtermFlag() as sigterm:
            segment_start = time.perf_counter()
            previous_elapsed = self.train_seconds
            while self.step < cfg.iterations:
                # One all-reduce per step: the flags, and the slowest rank's clock, which every rank then
                # follows. Each rank's own clock would give each its own learning rate in the time-keyed
                # warmdown (and its own checkpoint times), and the replicas would drift apart.
                # The profiler's bookkeeping (the main rank's; the others wait for it in this all-reduce) is not
                # training time: every rank moves its clock's start by it.
                bad, term, elapsed, profiler_s = distributed.max_over_ranks(
                    [self.nonfinite is not None, sigterm.raised,
                     self.train_seconds + time.perf_counter() - segment_start,
                     self.window.take_overhead() if self.window else 0.0], env.device)
                segment_start += profiler_s
                elapsed -= profiler_s
                done = self.step - start_step
                mean_step = (elapsed - start_seconds) / done if done else 0.0
                # predict the next step by the slower of the mean and the last one, so a slow spell does not
                # carry the run past the budget
                next_step = max(mean_step, elapsed - previous_elapsed)
                previous_elapsed = elapsed
                over = budget > 0 and elapsed + next_step > budget
                if bad:
                    raise self._nonfinite_error()
                if term or over:
                    if term:
                        self.train_seconds = elapsed
                        folder = self._save_checkpoint()
                        self.logger.log(f"SIGTERM: checkpoint written to {folder} at step {self.step}; "
                                        f"resume with --resume {folder}")
                        raise Preempted(f"stopped by SIGTERM at step {self.step}")
                    stopped_by = "wallclock"
                    break
                scale = lr_scale(self.step, elapsed, mean_step, iterations=cfg.iterations,
                                 warmdown_iters=cfg.warmdown_iters, max_wallclock_s=budget,
                                 warmdown_frac=cfg.warmdown_frac, min_lr=cfg.min_lr)
                # the same step on every rank: they share the clock
                self._flip_due_switches(scale, training_fraction(self.step, elapsed, iterations=cfg.iterations,
                                                                 budget_s=budget))
                with self.window.around(self.step) if self.window else contextlib.nullcontext():
                    loss = self.train_step(self._micro_batches())
                    self._optimizer_step(scale)
                    if self.ema is not None:
                        with nvtx_range("optimizer"):  # the profile counts the average as optimizer work
                            self.ema.update()
                if pending is not None:
                    self._check_finite(pending[0], pending[1].item())
                pending = (self.step + 1, loss)
                self.step += 1
                now = time.perf_counter()
                progress.update(min(self.train_seconds + now - segment_start, budget) - progress.n if budget > 0 else 1)
                log_now = cfg.train_log_every > 0 and (self.step % cfg.train_log_every == 0 or self.step <= 10)
                val_now = cfg.val_loss_every > 0 and self.step % cfg.val_loss_every == 0
                ckpt_now = cfg.checkpoint_every > 0 and elapsed - last_ckpt >= 60 * cfg.checkpoint_every
                if log_now or val_now or ckpt_now:
                    value = pending[1].item()  # waits for the GPU: the queued work is training time too
                    self._check_finite(pending[0], value)
                    pending = None
                    self.train_seconds += time.perf_counter() - segment_start
                    ms = 1000 * self.train_seconds
                    avg = (self.train_seconds - start_seconds) / (self.step - start_step)
                    progress.set_postfix(step=self.step, loss=f"{value:.4f}")
                    if log_now:
                        self.logger.log(f"step:{self.step}/{cfg.iterations} train_loss:{value:.4f} "
                                        f"train_time:{ms:.0f}ms step_avg:{1000 * avg:.2f}ms")
                    if val_now:
                        result = self.validate(self.raw_model)
                        history.append({"step": self.step, "train_seconds": self.train_seconds, **result})
                        self.logger.log(f"step:{self.step}/{cfg.iterations} val_loss:{result['val_loss']:.4f} "
                                        f"val_bpb:{result['val_bpb']:.4f} train_time:{ms:.0f}ms "
                                        f"step_avg:{1000 * avg:.2f}ms")
                    if ckpt_now:
                        self._save_checkpoint()
                        last_ckpt = elapsed
                    segment_start = time.perf_counter()  # validation and checkpoints are not training time
            if pending is not None:
                self._check_finite(pending[0], pending[1].item())
            if distributed.any_rank([self.nonfinite is not None], env.device)[0]:
                raise self._nonfinite_error()
            if env.device.type == "cuda":
                torch.cuda.synchronize()  # the queued GPU work is training time too
            if self.window:  # the profiler's bookkeeping after the last step, if it ended the window
                segment_start += self.window.take_overhead()
            self.train_seconds += time.perf_counter() - segment_start
        progress.close()
        tokens = (self.step - start_step) * cfg.train_batch_tokens
        self.logger.log(f"stopped at step:{self.step}/{cfg.iterations} ({stopped_by}) "
                        f"train_time:{1000 * self.train_seconds:.0f}ms")
        self._finish_profile()
        self._finish_switches()
        return TrainResult(steps=self.step, train_seconds=self.train_seconds, last_loss=self.last_finite_loss,
                           tokens=tokens, val_history=history, stopped_by=stopped_by,
                           switch_steps=dict(self.switch_steps))
