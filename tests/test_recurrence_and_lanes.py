"""Depth recurrence (``recur_layers``, switched on at ``recur_start``) and parallel residual lanes
(``parallel_last_n``), each against a plain reference: the looped model against the same blocks unrolled into a
deeper plain model, a parallel block against its two-lane formula, and lanes that start equal against the
sequential model. Then the training switch: warmed up, on at its step, kept on resume, on at the end."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tgolf.config import Config
from tgolf.data.loader import TokenLoader
from tgolf.model import build_model
from tgolf.train.distributed import DistEnv
from tgolf.train.logging import RunLogger
from tgolf.train.loop import Trainer
from tgolf.train.switches import warmup_combinations

TINY = dict(num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=97)
# the records' additions that depend on a layer's index ride along: they must follow the physical layer
INDEXED = dict(ln_scale=True, xsa_last_n=2, value_embed_layers="2,4", value_embed_dim=8)


def _model(**kw) -> torch.nn.Module:
    model = build_model(Config(**{**TINY, **kw}).validate())
    with torch.no_grad():  # leave the zero-initialised projections so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ids(batch: int = 2, length: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 97, (batch, length)), torch.randint(0, 97, (batch, length))


# --- depth recurrence ---------------------------------------------------------------------------------------

def test_layer_order_loops_the_range_and_the_unet_pairs_the_longer_order():
    model = _model(num_layers=11, recur_layers="3-5", recur_passes=3)
    assert model.layer_order() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert model.layer_order(False) == list(range(11))
    assert model.skip_weights.shape == (8, 32)  # 17 // 2 pairs; the plain order uses the first 5
    assert _model(num_layers=11, recur_layers="4").layer_order() == [0, 1, 2, 3, 4, 4, *range(5, 11)]
    plain = _model(num_layers=11)
    assert plain.layer_order() == list(range(11)) and not plain.set_recurrence(True)


def _unrolled(looped: torch.nn.Module) -> torch.nn.Module:
    """A plain model with one block per entry of ``looped``'s order: copies of its blocks, its other weights."""
    order = looped.layer_order()
    cfg = Config(**{**looped.config.to_dict(), "num_layers": len(order), "recur_layers": "",
                    "xsa_last_n": 0, "value_embed_layers": ""})
    unrolled = build_model(cfg)
    unrolled.value_embed = looped.value_embed  # the copied blocks carry their own index-keyed parts
    unrolled.blocks = torch.nn.ModuleList(copy.deepcopy(looped.blocks[i]) for i in order)
    with torch.no_grad():
        unrolled.tok_emb.weight.copy_(looped.tok_emb.weight)
        unrolled.skip_weights.copy_(looped.skip_weights[: unrolled.skip_weights.shape[0]])
    return unrolled


@pytest.mark.parametrize("extra", [{}, INDEXED], ids=["baseline", "indexed-additions"])
def test_looped_model_is_its_blocks_unrolled_and_sums_their_gradients(extra):
    model = _model(recur_layers="2-3", recur_passes=3, **extra)
    unrolled = _unrolled(model)
    ids, targets = _ids()
    loss, reference = model(ids, targets), unrolled(ids, targets)
    torch.testing.assert_close(loss, reference)
    loss.backward()
    reference.backward()
    order = model.layer_order()
    for name, p in model.blocks.named_parameters():
        index, rest = name.split(".", 1)
        copies = [dict(unrolled.blocks[j].named_parameters())[rest].grad for j, i in enumerate(order)
                  if i == int(index)]
        torch.testing.assert_close(p.grad, torch.stack(copies).sum(0), msg=name)
    torch.testing.assert_close(model.skip_weights.grad[: unrolled.skip_weights.shape[0]], unrolled.skip_weights.grad)


def test_recurrence_off_is_the_plain_model_and_on_changes_the_output():
    looped = _model(recur_layers="1-2")
    plain = build_model(Config(**TINY))
    state = {k: v[:3] if k == "skip_weights" else v for k, v in looped.state_dict().items()}
    plain.load_state_dict(state)
    ids, targets = _ids()
    on = looped(ids, targets)
    assert looped.set_recurrence(False) and looped.layer_order() == list(range(6))
    torch.testing.assert_close(looped(ids, targets), plain(ids, targets))
    assert not torch.allclose(on, plain(ids, targets))


def test_compiled_model_follows_the_switch_fullgraph_with_one_graph_per_state():
    model = _model(recur_layers="2-3", parallel_last_n=2)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    ids, targets = _ids()
    model(ids, targets)  # fills the rotary tables' cache, a guard of its own
    for active in (False, True, False, True):
        model.set_recurrence(active)
        torch.testing.assert_close(compiled(ids, targets), model(ids, targets))
    assert len(graphs) == 2  # once the warm-up has traced both, the switch in the timed run compiles nothing


@pytest.mark.parametrize("field, value, message", [
    ("recur_layers", "5-3", "recur_layers='5-3'"),
    ("recur_layers", "2-6", "recur_layers='2-6'"),
    ("recur_layers", "two", "recur_layers='two'"),
    ("recur_passes", 1, "recur_passes=1"),
    ("recur_start", 1.0, "recur_start=1.0"),
    ("attention_layers", "softmax,softmax,linear", "names layer 2, whose attention is 'linear'"),
    ("parallel_last_n", 3, "straddle the first parallel layer"),
    ("parallel_last_n", 7, "parallel_last_n=7"),
    ("parallel_last_n", 1, "one parallel layer is none"),
    ("recur_layers", "4-5", "the last layer joins the parallel lanes"),
])
def test_bad_recurrence_and_lane_fields_name_the_field(field, value, message):
    base = dict(TINY, recur_layers="2-3", recur_start=0.3, parallel_last_n=2)
    with pytest.raises(ValueError, match=message):
        Config(**{**base, field: value}).validate()


def test_loops_inside_the_parallel_layers_are_allowed():
    Config(**TINY, recur_layers="3-4", parallel_last_n=3).validate()
    Config(**TINY, recur_layers="0-1", parallel_last_n=6).validate()


# --- parallel residual lanes --------------------------------------------------------------------------------

def test_parallel_block_is_its_two_lane_formula_and_the_last_joins_them():
    model = _model(parallel_last_n=3)
    block = model.blocks[4]
    assert block.parallel and block.splits and not model.blocks[2].parallel
    a, m, x0 = (torch.randn(2, 7, 32) for _ in range(3))
    mix = block.resid_mix
    a_in, m_in = mix[0] * a + mix[1] * x0, mix[0] * m + mix[1] * x0
    y = block.attn(block._norm(a_in))
    a_mid, m_mid = a_in + block.lane_attn_scale * y, m_in + block.attn_scale * y
    z = block.mlp(block._norm(m_mid))
    out_a, out_m = block((a, m), x0)
    torch.testing.assert_close(out_a, a_mid + block.lane_mlp_scale * z)
    torch.testing.assert_close(out_m, m_mid + block.mlp_scale * z)
    last = model.blocks[5]
    assert last.parallel and not last.splits and not hasattr(last, "lane_attn_scale")
    mix = last.resid_mix
    a_in, m_in = mix[0] * a + mix[1] * x0, mix[0] * m + mix[1] * x0
    m_mid = m_in + last.attn_scale * last.attn(last._norm(a_in))
    torch.testing.assert_close(last((a, m), x0), m_mid + last.mlp_scale * last.mlp(last._norm(m_mid)))


def test_equal_lane_weights_keep_the_sequential_model_and_the_lanes_then_learn_apart():
    lanes = _model(parallel_last_n=3, recur_layers="3-4")
    plain = build_model(Config(**TINY, recur_layers="3-4"))
    plain.load_state_dict(lanes.state_dict(), strict=False)  # everything but the lanes' own weights
    with torch.no_grad():
        for block in lanes.blocks[3:5]:
            block.lane_attn_scale.copy_(block.attn_scale)
            block.lane_mlp_scale.copy_(block.mlp_scale)
    ids, targets = _ids()
    loss = lanes(ids, targets)
    torch.testing.assert_close(loss, plain(ids, targets))
    loss.backward()
    assert all(block.lane_attn_scale.grad.abs().sum() > 0 and block.lane_mlp_scale.grad.abs().sum() > 0
               for block in lanes.blocks[3:5])
    missing = [n for n, p in lanes.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_fresh_lanes_start_as_the_sequential_model():
    torch.manual_seed(3)
    lanes = build_model(Config(**TINY, parallel_last_n=4))
    torch.manual_seed(3)
    plain = build_model(Config(**TINY))
    ids, targets = _ids()
    torch.testing.assert_close(lanes(ids, targets), plain(ids, targets))


# --- the training switch ------------------------------------------------------------------------------------

TRAIN = dict(num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=1024, train_seq_len=32,
             train_batch_tokens=256, grad_accum_steps=2, warmup_steps=0, val_loss_every=0, train_log_every=0,
             max_wallclock_seconds=0.0, warmdown_iters=3, compile="off", device="cpu", recur_layers="1")


def _trainer(tmp_path: Path, data: Path, **overrides) -> Trainer:
    cfg = Config(**{**TRAIN, **overrides}).validate()
    torch.manual_seed(cfg.seed)
    loader = TokenLoader(data, seed=cfg.seed, vocab_size=cfg.vocab_size)
    return Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")), build_model(cfg), loader, RunLogger(None),
                   validate=lambda m: {}, run_dir=tmp_path)


def _watch(trainer: Trainer, seen: list) -> None:
    original = trainer.train_step

    def step(batches):
        seen.append(trainer.raw_model.recurrence_active)
        return original(batches)

    trainer.train_step = step


def test_recurrence_is_warmed_up_then_on_from_its_fraction_of_the_steps(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards, iterations=8, recur_start=0.5, warmup_steps=4)
    assert not trainer.raw_model.recurrence_active
    seen: list[bool] = []
    _watch(trainer, seen)
    trainer.warmup()
    assert seen == [False, False, True, True] and not trainer.raw_model.recurrence_active
    seen.clear()
    result = trainer.run()
    assert result.switch_steps == {"recurrence": 4} and seen == [False] * 4 + [True] * 4


def test_recurrence_from_the_start_needs_no_switch(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards, iterations=2)
    assert trainer.switches == [] and trainer.raw_model.recurrence_active
    assert trainer.run().switch_steps == {}


def test_warmup_runs_every_combination_of_two_switches(tmp_path, tiny_shards):
    assert warmup_combinations([None, None], 8) == [(False, False)] * 2 + [(False, True)] * 2 + \
        [(True, False)] * 2 + [(True, True)] * 2
    trainer = _trainer(tmp_path, tiny_shards, iterations=8, recur_start=0.5, linear="qat6", warmdown_iters=4,
                       late_qat_threshold=0.6)
    result = trainer.run()  # lr scale .5 < .6 from step 6; half the steps done at step 4
    assert result.switch_steps == {"recurrence": 4, "late_qat": 6}


def test_a_run_that_ends_before_recur_start_is_evaluated_looped_with_a_warning(tmp_path, tiny_shards, capsys):
    trainer = _trainer(tmp_path, tiny_shards, iterations=4, recur_start=0.9)
    result = trainer.run()
    assert result.switch_steps == {} and trainer.raw_model.recurrence_active
    assert "before switch 'recurrence' was due" in capsys.readouterr().out


def test_resume_after_the_recurrence_switch_keeps_it_on_and_its_step(tmp_path, tiny_shards):
    first = _trainer(tmp_path / "a", tiny_shards, iterations=8, recur_start=0.5)
    assert first.run().switch_steps == {"recurrence": 4}
    folder = first._save_checkpoint()
    resumed = _trainer(tmp_path / "b", tiny_shards, iterations=10, recur_start=0.5)
    assert not resumed.raw_model.recurrence_active
    resumed.resume(str(folder))
    assert resumed.raw_model.recurrence_active
    assert resumed.run().switch_steps == {"recurrence": 4}


def test_checkpoints_from_before_switches_keep_their_late_qat_step(tmp_path):
    from tgolf.train import checkpoint

    folder = checkpoint.save(tmp_path, rank=0, world_size=1, step=3, train_seconds=1.0, config={}, model_state={},
                             optimizer_states=[], loader_state={}, barrier=lambda: None, switch_steps={"late_qat": 2})
    main = torch.load(folder / "model.pt", weights_only=True)
    assert main["switch_steps"] == {"late_qat": 2}
    del main["switch_steps"]
    main["late_qat_step"] = 2
    torch.save(main, folder / "model.pt")
    assert checkpoint.load(folder, 0, 1).switch_steps == {"late_qat": 2}
