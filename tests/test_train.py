"""Training loop: schedule, Muon, wall-clock cap, non-finite stop, checkpoints, SIGTERM and resume."""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from tgolf.config import Config
from tgolf.data.loader import TokenLoader
from tgolf.model import build_model
from tgolf.train import checkpoint, loop
from tgolf.train.distributed import DistEnv
from tgolf.train.logging import RunLogger
from tgolf.train.loop import NonFiniteLoss, Preempted, Trainer
from tgolf.train.optim import Muon, split_parameters
from tgolf.train.orthogonalize import (NEWTON_SCHULZ, evaluate_quintic, muon_polynomials, optimal_odd_quintic,
                                      orthogonalize, polar_express_coefficients)
from tgolf.train.schedule import lr_scale

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = dict(num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=1024, train_seq_len=32,
            train_batch_tokens=256, grad_accum_steps=2, warmup_steps=0, val_loss_every=0, train_log_every=0,
            max_wallclock_seconds=0.0, warmdown_iters=3, compile="off", device="cpu")


def _trainer(tmp_path: Path, data: Path, **overrides) -> Trainer:
    cfg = Config(**{**TINY, **overrides}).validate()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    loader = TokenLoader(data, seed=cfg.seed, vocab_size=cfg.vocab_size)
    return Trainer(cfg, CPU, model, loader, RunLogger(None), validate=lambda m: {}, run_dir=tmp_path)


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.raw_model.parameters()]


# --- schedule and optimizer ---------------------------------------------------------------------------------

def test_time_keyed_warmdown_ends_at_the_budget():
    kw = dict(iterations=10**9, warmdown_iters=100, max_wallclock_s=600.0)
    assert lr_scale(0, 0.0, 0.5, **kw) == 1.0
    assert lr_scale(0, 549.0, 0.5, **kw) == 1.0  # warmdown = 100 steps × 0.5 s = the last 50 s
    assert lr_scale(0, 575.0, 0.5, **kw) == pytest.approx(0.5)
    assert lr_scale(0, 600.0, 0.5, **kw) == 0.0
    assert lr_scale(0, 575.0, 0.25, **kw) == 1.0  # faster steps: the warmdown starts later, still ends at 600 s


def test_warmdown_fraction_and_floor():
    capped = dict(iterations=10**9, warmdown_iters=100, max_wallclock_s=600.0, warmdown_frac=0.5)
    assert [lr_scale(0, t, 0.5, **capped) for t in (0.0, 300.0, 450.0, 600.0)] == [1.0, 1.0, 0.5, 0.0]
    steps = dict(iterations=8, warmdown_iters=0, max_wallclock_s=0.0, warmdown_frac=0.5, min_lr=0.3)
    assert [lr_scale(s, 0.0, 0.0, **steps) for s in (3, 4, 5, 6, 7)] == [1.0, 1.0, 0.75, 0.5, 0.3]
    # the floor holds under the step-count warmdown too
    assert lr_scale(100, 0.0, 0.0, iterations=100, warmdown_iters=10, max_wallclock_s=0.0, min_lr=0.1) == 0.1
    for field, value in [("warmdown_frac", 1.5), ("min_lr", 1.0), ("min_lr", -0.1)]:
        with pytest.raises(ValueError, match=f"{field}="):
            Config(**{field: value}).validate()


def test_step_keyed_warmdown_without_a_cap():
    kw = dict(iterations=100, warmdown_iters=10, max_wallclock_s=0.0)
    assert [lr_scale(s, 0.0, 0.0, **kw) for s in (0, 89, 90, 95, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]


def test_newton_schulz_orthogonalises():
    g = torch.randn(24, 40, dtype=torch.float64)
    x = orthogonalize(g, muon_polynomials("newton_schulz", 10))
    singular = torch.linalg.svdvals(x.double())
    assert singular.min() > 0.5 and singular.max() < 1.5  # the quintic iteration lands near 1, not exactly


def test_polar_express_reproduces_the_papers_first_polynomial():
    # Amsel et al. 2025 (arXiv:2505.16932), for singular values in [0.001, 1] with their cushion, before the safety
    # factor: p1(x) = 8.28721201814563 x - 23.595886519098837 x³ + 17.300387312530933 x⁵
    first = polar_express_coefficients(5, safety=1.0)[0]
    assert first == pytest.approx((8.28721201814563, -23.595886519098837, 17.300387312530933), rel=1e-9)
    guarded = polar_express_coefficients(5)
    assert guarded[0] == pytest.approx((first[0] / 1.01, first[1] / 1.01 ** 3, first[2] / 1.01 ** 5))
    assert guarded[-1] == polar_express_coefficients(5, safety=1.0)[-1]  # the last step lands centred on 1


@pytest.mark.parametrize("lower, upper", [(0.02, 1.0), (0.3, 1.7), (0.999, 1.001), (0.5, 0.5001)])
def test_optimal_odd_quintic_is_minimax(lower, upper):
    quintic, error = optimal_odd_quintic(lower, upper)
    x = np.linspace(lower, upper, 200_001)
    worst = np.abs(1 - evaluate_quintic(quintic, x)).max()
    assert worst == pytest.approx(error, rel=1e-6, abs=1e-12)
    # no quintic does better: perturbing the coefficients raises the worst error
    for delta in np.eye(3) * 1e-4:
        nudged = tuple(q + d * abs(q) for q, d in zip(quintic, delta))
        assert np.abs(1 - evaluate_quintic(nudged, x)).max() > worst - 1e-12


def test_polar_express_lands_every_singular_value_near_one():
    # singular values spread from 0.001 to 0.5 of the Frobenius norm (the scale orthogonalize divides by). Each
    # step applies its quintic to every singular value: 5 Newton–Schulz steps leave the smallest near 0.47, Polar
    # Express lands all of them in [0.852, 1.124] (the paper's [0.876, 1.124], lowered by the safety factor)
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 48, dtype=torch.float64))
    spectrum = torch.logspace(-3, 0, 48, dtype=torch.float64)
    spectrum = (spectrum / spectrum.norm()).clamp(min=1.001e-3)
    g = u @ torch.diag(spectrum * 7.0) @ v.T
    landed = {}
    for backend in ("newton_schulz", "polar_express"):
        polynomials = muon_polynomials(backend, 5)
        expected = spectrum / spectrum.norm()
        for quintic in polynomials:
            expected = evaluate_quintic(quintic, expected)
        landed[backend] = torch.linalg.svdvals(orthogonalize(g, polynomials).double())
        torch.testing.assert_close(landed[backend], expected.sort(descending=True).values, rtol=1e-4, atol=1e-4)
    assert 0.85 < landed["polar_express"].min() and landed["polar_express"].max() < 1.13
    assert landed["newton_schulz"].min() < 0.5


def test_muon_backend_is_checked():
    with pytest.raises(ValueError, match="muon backend 'newton'"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], lr=0.1, momentum=0.9, backend="newton")
    with pytest.raises(ValueError, match="muon_backend='newton'"):
        Config(**{**TINY, "muon_backend": "newton"}).validate()


def test_parameter_split_puts_block_matrices_in_muon():
    model = build_model(Config(**TINY))
    groups = split_parameters(model)
    assert {id(p) for p in groups["embed"]} == {id(model.tok_emb.weight)}
    assert all(p.ndim == 2 for p in groups["matrix"]) and len(groups["matrix"]) == 2 * 6
    assert sum(map(len, groups.values())) == len(list(model.parameters()))


def test_muon_step_moves_weights_by_lr_sized_orthogonal_update():
    p = torch.nn.Parameter(torch.randn(16, 16))
    before = p.detach().clone()
    p.grad = torch.randn(16, 16)
    Muon([p], lr=0.1, momentum=0.0, nesterov=False).step()
    delta = (before - p.detach()) / 0.1
    assert torch.linalg.svdvals(delta).max() < 1.5 and delta.abs().sum() > 0


def _muon_one_matrix_at_a_time(params, grads_per_step, lr, momentum, polynomials):
    """Muon as the baseline writes it: momentum, Nesterov, then one orthogonalisation per matrix."""
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, buf in zip(params, grads, bufs):
            buf.mul_(momentum).add_(g)
            update = orthogonalize(g.add(buf, alpha=momentum), polynomials)
            p.sub_(lr * max(1.0, p.size(0) / p.size(1)) ** 0.5 * update)


@pytest.mark.parametrize("backend", ["newton_schulz", "polar_express"])
def test_muon_batches_by_shape_without_changing_the_updates(backend):
    torch.manual_seed(0)
    shapes = [(16, 24), (24, 16), (16, 24), (8, 8), (24, 16), (16, 24)]  # repeated shapes, both aspect ratios
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    expected = [p.detach().clone() for p in params]
    grads_per_step = [[torch.randn(s) for s in shapes] for _ in range(3)]
    opt = Muon(params, lr=0.05, momentum=0.9, backend=backend)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    _muon_one_matrix_at_a_time(expected, grads_per_step, lr=0.05, momentum=0.9,
                               polynomials=muon_polynomials(backend, 5))
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, rtol=1e-5, atol=1e-6)
    batch = torch.randn(3, 24, 16)
    polynomials = muon_polynomials(backend, 5)
    assert torch.allclose(orthogonalize(batch, polynomials), torch.stack([orthogonalize(m, polynomials) for m in batch]),
                          rtol=1e-5, atol=1e-6)


# --- the loop -----------------------------------------------------------------------------------------------

def test_runs_the_requested_steps_and_learns(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards, iterations=12)
    result = trainer.run()
    assert result.steps == 12 and result.stopped_by == "iterations"
    assert result.tokens == 12 * 256 and math.isfinite(result.last_loss)
    assert result.last_loss < math.log(1024)  # below the uniform-prediction loss


class _StepClock:
    """Stands in for the ``time`` module of tgolf.train.loop: only training steps advance it, each by the next of
    the given durations, so the cap's decisions do not depend on how loaded the machine is."""

    def __init__(self, durations: list[float]):
        self.now, self.durations = 0.0, iter(durations)

    def perf_counter(self) -> float:
        return self.now

    def timed(self, train_step):
        def step(batches):
            self.now += next(self.durations)
            return train_step(batches)
        return step


@pytest.mark.parametrize("durations, steps", [
    ([0.3] * 20, 6),  # 6 steps = 1.8 s; a 7th would end at 2.1
    # a slow spell: the prediction takes the slower of the mean step (0.24 s after 7) and the last (0.6 s), so
    # the 8th step, which would end at 2.3 s, is not started
    ([0.1] * 5 + [0.6] * 20, 7),
])
def test_wallclock_cap_holds(tmp_path, tiny_shards, monkeypatch, durations, steps):
    clock = _StepClock(durations)
    monkeypatch.setattr(loop, "time", clock)
    trainer = _trainer(tmp_path, tiny_shards, iterations=10**6, max_wallclock_seconds=2.0)
    trainer.train_step = clock.timed(trainer.train_step)
    result = trainer.run()
    assert result.stopped_by == "wallclock" and result.steps == steps
    assert result.train_seconds == pytest.approx(sum(durations[:steps])) and result.train_seconds <= 2.0


def test_gptq_reserve_ends_training_that_much_earlier(tmp_path, tiny_shards, monkeypatch):
    clock = _StepClock([0.3] * 20)
    monkeypatch.setattr(loop, "time", clock)
    trainer = _trainer(tmp_path, tiny_shards, iterations=10**6, max_wallclock_seconds=2.5, gptq_reserve_seconds=0.5)
    trainer.train_step = clock.timed(trainer.train_step)
    result = trainer.run()  # as the 2.0 s cap above: 6 steps
    assert result.stopped_by == "wallclock" and result.steps == 6 and result.train_seconds <= 2.0
    with pytest.raises(ValueError, match="gptq_reserve_seconds=600"):
        Config(gptq_reserve_seconds=600).validate()


def _rank_with_skewed_clock(rank: int, init_file: str, data: str, out_dir: str) -> None:
    import torch.distributed as dist

    from tgolf.train.distributed import check_replicas_agree, teardown

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        # rank 1's clock runs 1% slow: on its own clock its time-keyed warmdown would give it other learning rates
        clock = _StepClock([0.3 * (1.01 if rank else 1.0)] * 100)
        loop.time = clock
        cfg = Config(**{**TINY, "iterations": 10**6, "max_wallclock_seconds": 2.0, "warmdown_iters": 5}).validate()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        env = DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        loader = TokenLoader(data, rank, 2, seed=cfg.seed, vocab_size=cfg.vocab_size)
        trainer = Trainer(cfg, env, model, loader, RunLogger(None), validate=lambda m: {}, run_dir=Path(out_dir))
        trainer.train_step = clock.timed(trainer.train_step)
        result = trainer.run()
        check_replicas_agree(model, env.device)  # raises if the ranks' weights differ at all
        Path(out_dir, f"rank{rank}.steps").write_text(str(result.steps))
        # as tgolf.train ends: without these, DDP outlives the group, and gloo aborts one exit in ten on 2 cores
        trainer.close()
        teardown()
    finally:
        if dist.is_initialized():  # a failed rank: no barrier, the other may be stuck elsewhere
            dist.destroy_process_group()


def test_ranks_follow_one_clock_so_the_warmdown_keeps_replicas_identical(tmp_path, tiny_shards):
    import torch.multiprocessing as mp

    mp.spawn(_rank_with_skewed_clock, args=(str(tmp_path / "init"), str(tiny_shards), str(tmp_path)), nprocs=2)
    # the slow clock decides for both: 6 steps of 0.303 s, and a 7th would end past 2 s
    assert [(tmp_path / f"rank{r}.steps").read_text() for r in range(2)] == ["6", "6"]


def test_non_finite_loss_stops_with_step_and_last_finite_loss(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards, iterations=20)
    original = trainer.train_step
    calls = {"n": 0}

    def poisoned(batches):
        calls["n"] += 1
        loss = original(batches)
        return loss * float("nan") if calls["n"] == 4 else loss

    trainer.train_step = poisoned
    with pytest.raises(NonFiniteLoss, match=r"at step 4; last finite loss \d+\.\d+"):
        trainer.run()


@pytest.mark.parametrize("extra", [{}, dict(ema_decay=0.8, muon_weight_decay=0.05, adam_weight_decay=0.05)],
                         ids=["baseline", "ema-and-weight-decay"])
def test_resume_continues_exactly(tmp_path, tiny_shards, extra):
    # no warmdown: a run cut at 5 of 8 iterations must follow the same schedule as the straight one (with an
    # EMA: the averages the two runs end with, which replace the weights, must agree too)
    straight = _trainer(tmp_path / "a", tiny_shards, iterations=8, warmdown_iters=0, **extra)
    straight.run()

    first = _trainer(tmp_path / "b", tiny_shards, iterations=5, warmdown_iters=0, **extra)
    first.run()
    folder = first._save_checkpoint()
    second = _trainer(tmp_path / "c", tiny_shards, iterations=8, warmdown_iters=0, **extra)
    second.resume(str(folder))
    assert second.step == 5
    second.run()
    for a, b in zip(_params(straight), _params(second)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if extra:
        trained = _params(second)
        straight.load_average()
        second.load_average()
        for a, b, last in zip(_params(straight), _params(second), trained):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert any(not torch.equal(a, last) for a, last in zip(_params(second), trained))


def test_resume_takes_new_evaluation_and_export_settings_but_not_new_training(tmp_path, tiny_shards):
    first = _trainer(tmp_path / "a", tiny_shards, iterations=3)
    first.run()
    folder = first._save_checkpoint()
    # where it writes and how it scores and exports may change (a run preempted before its evaluation)
    later = dict(run_id="again", ttt_enabled=True, ttt_lr=0.01, export_scheme="int6", export_fit=True,
                 compressor="zlib", eval_stride=64, iterations=5)
    resumed = _trainer(tmp_path / "b", tiny_shards, **later)
    resumed.resume(str(folder))
    assert resumed.step == 3
    for field, value in [("matrix_lr", 0.01), ("seed", 7), ("mlp_activation", "leaky_relu2"), ("muon_backend_steps", 4)]:
        with pytest.raises(ValueError, match=rf"config differs from the checkpoint's in \['{field}'\]"):
            _trainer(tmp_path / field, tiny_shards, **{**later, field: value}).resume(str(folder))


def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards, iterations=50)
    original = trainer.loader.next_batches
    calls = {"n": 0}

    def next_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3 (one call per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    trainer.loader.next_batches = next_batches
    with pytest.raises(Preempted):
        trainer.run()
    resumed = _trainer(tmp_path / "r", tiny_shards, iterations=6)
    resumed.resume(str(tmp_path / "checkpoints"))
    assert resumed.step == 3
    assert resumed.run().steps == 6


def test_late_qat_switches_quantization_on_when_the_lr_scale_falls_below_the_threshold(tmp_path, tiny_shards):
    from tgolf.nn.quant import QATLinear

    # step-keyed warmdown over the last 4 of 8 steps: lr scale 1, 1, 1, 1, 1, .75, .5, .25 → on at step 6 (< .6)
    trainer = _trainer(tmp_path, tiny_shards, iterations=8, warmdown_iters=4, linear="qat6", late_qat_threshold=0.6,
                       warmup_steps=4)
    layers = [m for m in trainer.raw_model.modules() if isinstance(m, QATLinear)]
    seen: list[bool] = []
    original = trainer.train_step

    def step(batches):
        seen.append(layers[0].active)
        return original(batches)

    trainer.train_step = step
    before = _params(trainer)
    trainer.warmup()  # compiles (here: runs) both variants, then restores the weights and the switch
    assert seen == [False, False, True, True] and not any(m.active for m in layers)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(trainer)))
    seen.clear()
    result = trainer.run()
    assert result.switch_steps == {"late_qat": 6} and seen == [False] * 6 + [True] * 2
    assert all(m.active for m in layers)
    assert _trainer(tmp_path / "o", tiny_shards, iterations=2, linear="qat6").run().switch_steps == {}


def test_resume_after_the_late_qat_switch_keeps_quantization_and_its_step(tmp_path, tiny_shards):
    from tgolf.nn.quant import QATLinear

    late = dict(warmdown_iters=4, linear="qat6", late_qat_threshold=0.6)
    first = _trainer(tmp_path / "a", tiny_shards, iterations=8, **late)
    assert first.run().switch_steps == {"late_qat": 6}
    folder = first._save_checkpoint()
    resumed = _trainer(tmp_path / "b", tiny_shards, iterations=10, **late)
    resumed.resume(str(folder))
    assert all(m.active for m in resumed.raw_model.modules() if isinstance(m, QATLinear))
    assert resumed.run().switch_steps == {"late_qat": 6}  # not 8, the first resumed step


def test_late_qat_needs_qat_layers_and_a_threshold_in_range(tmp_path, tiny_shards):
    with pytest.raises(ValueError, match="late_qat_threshold=1.5"):
        Config(late_qat_threshold=1.5, linear="qat6").validate()
    with pytest.raises(ValueError, match="late_qat_threshold=0.2 needs QAT layers"):
        _trainer(tmp_path, tiny_shards, late_qat_threshold=0.2)


def test_resume_refuses_a_different_model(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards, iterations=1)
    trainer.run()
    folder = trainer._save_checkpoint()
    other = _trainer(tmp_path / "o", tiny_shards, iterations=2, model_dim=64)
    with pytest.raises(ValueError, match="model_dim"):
        other.resume(str(folder))
    # how the model is compiled is not the model: a resume may change it
    _trainer(tmp_path / "c", tiny_shards, iterations=2, mix_order_reduction="off").resume(str(folder))


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.resolve(tmp_path)


def test_warmup_restores_model_optimizer_and_data(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards, iterations=3, warmup_steps=2)
    before, loader_state = _params(trainer), trainer.loader.state_dict()
    trainer.warmup()
    assert trainer.loader.state_dict() == loader_state
    for a, b in zip(before, _params(trainer)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(len(opt.state) == 0 for opt in trainer.optimizers)  # fresh optimizers again


# --- compilation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("has_cap, env_set, setting, expected", [
    (False, False, "auto", {"triton.mix_order_reduction": False}),  # torch 2.11: the fusion spills (pytorch#179423)
    (True, False, "auto", {}),  # a torch with the fix keeps its default
    (False, True, "auto", {}),  # the user's TORCHINDUCTOR_MIX_ORDER_REDUCTION wins over auto
    (False, False, "on", {"triton.mix_order_reduction": True}),
    (True, False, "off", {"triton.mix_order_reduction": False}),
])
def test_mix_order_reduction_setting(has_cap, env_set, setting, expected):
    from tgolf.train.loop import mix_order_options
    assert mix_order_options(setting, has_fusion=True, has_cap=has_cap, env_set=env_set) == expected
    assert mix_order_options(setting, has_fusion=False, has_cap=has_cap, env_set=env_set) == {}


def test_mix_order_reduction_setting_reads_this_torch(monkeypatch):
    import torch._inductor.config as inductor_config

    from tgolf.train.loop import inductor_options
    monkeypatch.delenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", raising=False)
    has_fusion = hasattr(inductor_config.triton, "mix_order_reduction")
    has_cap = hasattr(inductor_config.triton, "mix_order_reduction_max_reads")
    expected = {"triton.mix_order_reduction": False} if has_fusion and not has_cap else {}
    assert inductor_options(Config(mix_order_reduction="auto")) == expected
    monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", "1")
    assert inductor_options(Config(mix_order_reduction="auto")) == {}


def test_compiled_model_with_the_fusion_off_matches_eager():
    from tgolf.train.loop import compile_model
    cfg = Config(**{**TINY, "compile": "on", "mix_order_reduction": "off"}).validate()
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    compiled = compile_model(cfg, model, torch.device("cpu"))
    assert compiled is not model
    torch.testing.assert_close(compiled(x, x), model(x, x), rtol=1e-4, atol=1e-4)
    assert compile_model(Config(**{**TINY, "compile": "off"}), model, torch.device("cpu")) is model


def test_cuda_graphs_are_asked_of_inductor_and_each_micro_batch_is_a_new_replay(monkeypatch):
    from tgolf.train.loop import inductor_options, make_train_step
    assert inductor_options(Config(cuda_graphs=True))["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in inductor_options(Config())
    with pytest.raises(ValueError, match="cuda_graphs=True: .* needs compile 'auto' or 'on'"):
        Config(**{**TINY, "compile": "off", "cuda_graphs": True}).validate()

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(calls)))
    calls = []

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, y):
            calls.append(x)
            return self.w * (x - y).float().square().mean()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = [(torch.full((2, 3), float(i)), torch.zeros(2, 3)) for i in range(3)]
    for graphs, expected in ((True, [0, 1, 2]), (False, [])):
        marks.clear(), calls.clear()
        loss = make_train_step(Config(**{**TINY, "cuda_graphs": graphs}), Loss(), env, 3)(batches)
        assert marks == expected and len(calls) == 3  # a mark before each forward, none without graphs
        assert loss.item() == pytest.approx((0 + 1 + 4) / 3)


def test_compiled_model_with_cuda_graphs_runs_on_the_cpu_ungraphed():
    """CPU tensors are never graphed: the option compiles and computes the same model there."""
    from tgolf.train.loop import compile_model
    cfg = Config(**{**TINY, "compile": "on", "cuda_graphs": True}).validate()
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    torch.testing.assert_close(compile_model(cfg, model, torch.device("cpu"))(x, x), model(x, x), rtol=1e-4,
                               atol=1e-4)


# --- profiled window ----------------------------------------------------------------------------------------

def test_profiled_window_records_those_steps_for_the_report(tmp_path, tiny_shards):
    import json

    from tgolf.profile.__main__ import main as profile_main

    result = _trainer(tmp_path, tiny_shards, iterations=5, profile_steps="1:2").run()
    assert result.steps == 5
    recorded = json.loads((tmp_path / "profile" / "run.json").read_text())
    assert recorded["meta"]["profiled_steps"] == [1, 2] and len(recorded["meta"]["step_ms_host"]) == 2
    assert recorded["meta"]["flops_per_step"] > 0 and recorded["meta"]["tokens_per_step"] == 256
    out = tmp_path / "report"
    assert profile_main(["--from-trace", str(tmp_path / "profile" / "trace.json.gz"), "--out", str(out),
                         "--no-charts"]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert [s["step"] for s in report["steps"]] == [1, 2]
    for step in report["steps"]:
        assert sum(step["categories"].values()) == pytest.approx(step["ms"], rel=1e-9)
    assert report["totals_ms"]["optimizer"] > 0 and report["totals_ms"]["gemm"] > 0


@pytest.mark.parametrize("window", ["1:2", "3:4"])  # the window ends inside the run, and with its last step
def test_profiler_bookkeeping_is_not_training_time(tmp_path, tiny_shards, monkeypatch, window):
    """The profiler's start and its collection of events at the window's end are left out of the training clock.
    The clock here jumps 1000 s whenever the profiler stops, as a slow collection would make it."""
    import time

    from tgolf.profile.window import StepWindow

    jump = [0.0]
    real_clock, real_stop = time.perf_counter, StepWindow._stop
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + jump[0])

    def slow_stop(self):
        real_stop(self)
        jump[0] += 1000.0
    monkeypatch.setattr(StepWindow, "_stop", slow_stop)
    result = _trainer(tmp_path, tiny_shards, iterations=5, profile_steps=window).run()
    assert jump[0] == 1000.0 and result.steps == 5
    assert result.train_seconds < 1000.0


def test_profiled_window_past_the_end_records_nothing(tmp_path, tiny_shards):
    from tgolf.nvtx import ranges_enabled

    _trainer(tmp_path, tiny_shards, iterations=3, profile_steps="2:9").run()  # the run ends inside the window
    assert (tmp_path / "profile" / "trace.json.gz").exists() and not ranges_enabled()
    _trainer(tmp_path / "late", tiny_shards, iterations=3, profile_steps="5:6").run()
    assert not (tmp_path / "late" / "profile").exists()


@pytest.mark.parametrize("spec", ["3", "2:1", "a:b", "-1:2"])
def test_bad_profile_window_is_refused(spec):
    with pytest.raises(ValueError, match="profile_steps"):
        Config(**TINY, profile_steps=spec).validate()
