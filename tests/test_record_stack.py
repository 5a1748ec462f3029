"""The records' additions to the baseline: partial RoPE, XSA, LN scale, SmearGate, bigram hash table, value
embeddings, orthogonal init, weight decay and the weight EMA, each against a plain reference, and the ``record`` preset end to end (training,
export, roundtrip)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tgolf.config import PRESETS, Config
from tgolf.model import build_model, count_parameters
from tgolf.nn.attention import CausalSelfAttention, exclude_self_value
from tgolf.nn.embeddings import BigramHashEmbedding, SmearGate, bigram_buckets
from tgolf.nn.rotary import Rotary, apply_rotary
from tgolf.train.ema import WeightEMA
from tgolf.train.optim import Muon, build_optimizers, split_parameters

# every addition on, at a size the CPU trains in seconds
TINY_RECORD = dict(num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=97, rope_dims=4,
                   ln_scale=True, xsa_last_n=2, smear_gate=True, bigram_vocab_size=61, bigram_dim=8, ortho_init=True,
                   value_embed_layers="1,3", value_embed_dim=8)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # leave the zero-initialised projections so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# --- partial RoPE -------------------------------------------------------------------------------------------

def test_partial_rope_rotates_the_first_dims_as_a_rope_of_that_width_and_passes_the_rest():
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    cos, sin = Rotary(16, 500.0, rope_dims=6).tables(10, x.device, x.dtype)
    full_cos, full_sin = Rotary(6, 500.0).tables(10, x.device, x.dtype)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[..., :6], apply_rotary(x[..., :6], full_cos, full_sin), rtol=0, atol=0)
    torch.testing.assert_close(out[..., 6:], x[..., 6:], rtol=0, atol=0)


def test_partial_rope_scores_depend_on_the_offset_only():
    rotary = Rotary(8, 100.0, rope_dims=4)
    cos, sin = rotary.tables(20, torch.device("cpu"), torch.float64)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(i: int, j: int) -> torch.Tensor:
        return apply_rotary(q, cos[i], sin[i]) @ apply_rotary(k, cos[j], sin[j])

    torch.testing.assert_close(score(7, 3), score(15, 11))
    assert not torch.allclose(score(7, 3), score(7, 5))


@pytest.mark.parametrize("rope_dims", [3, 18, -2])
def test_bad_rope_dims_name_the_field(rope_dims):
    with pytest.raises(ValueError, match="rope_dims"):
        Config(model_dim=64, num_heads=4, rope_dims=rope_dims).validate()


# --- XSA --------------------------------------------------------------------------------------------------------

def test_xsa_removes_each_heads_component_along_its_own_value():
    y = torch.randn(2, 6, 5, 8, dtype=torch.float64)  # 6 query heads over 3 KV heads
    v = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    out = exclude_self_value(y, v)
    for head in range(6):
        own = v[:, head // 2]
        unit = own / own.norm(dim=-1, keepdim=True)
        expected = y[:, head] - (y[:, head] * unit).sum(-1, keepdim=True) * unit
        torch.testing.assert_close(out[:, head], expected)
        torch.testing.assert_close((out[:, head] * own).sum(-1), torch.zeros(2, 5, dtype=torch.float64))


def test_xsa_attention_gradients_match_a_per_head_reference():
    torch.manual_seed(0)
    attn = _perturbed(CausalSelfAttention(32, num_heads=4, num_kv_heads=2, xsa=True, rope_dims=4)).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)

    def reference(x: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.project_qkv(x)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        scores = (q @ k.mT) / math.sqrt(8) + torch.full((7, 7), -math.inf, dtype=x.dtype).triu(1)
        y = scores.softmax(-1) @ v
        unit = F.normalize(v, dim=-1)
        y = y - (y * unit).sum(-1, keepdim=True) * unit
        return attn.proj(y.transpose(1, 2).reshape(2, 7, 32))

    out, expected = attn(x), reference(x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *attn.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *attn.parameters()], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_xsa_on_a_linear_attention_layer_is_refused():
    with pytest.raises(ValueError, match="xsa_last_n=2 covers layer 3, whose attention is 'linear'"):
        Config(num_layers=4, attention_layers="softmax,linear", xsa_last_n=2).validate()


# --- LN scale, SmearGate, bigram table ----------------------------------------------------------------------

def test_ln_scale_feeds_block_i_its_normed_input_at_one_over_sqrt_i_plus_one():
    model = _perturbed(build_model(Config(**TINY_RECORD)))
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, args[0]))
    model.logits(torch.randint(0, 97, (2, 9)))
    for i, x in seen.items():
        rms = x.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, (i + 1) ** -0.5), rtol=1e-4, atol=1e-5)


def test_smear_gate_blends_with_the_previous_token():
    gate = SmearGate(5)
    with torch.no_grad():
        gate.gate.copy_(torch.randn(5))
    x = torch.randn(2, 4, 5)
    g = torch.sigmoid(gate.gate)
    expected = torch.stack([(1 - g) * x[:, t] + g * (x[:, t - 1] if t else 0) for t in range(4)], 1)
    torch.testing.assert_close(gate(x), expected)


def test_bigram_buckets_hash_pairs_into_range_and_give_the_first_position_the_last_row():
    ids = torch.randint(0, 1024, (3, 50))
    rows = bigram_buckets(ids, 64)
    assert rows.shape == ids.shape and rows.dtype == torch.int64
    assert (rows[:, 0] == 63).all() and (rows[:, 1:] < 63).all() and (rows[:, 1:] >= 0).all()
    same_pair = torch.tensor([[5, 9, 5, 9]])
    assert bigram_buckets(same_pair, 64)[0, 1] == bigram_buckets(same_pair, 64)[0, 3]
    # both tokens of the pair matter
    assert bigram_buckets(torch.tensor([[5, 9]]), 64)[0, 1] != bigram_buckets(torch.tensor([[6, 9]]), 64)[0, 1]
    assert bigram_buckets(torch.tensor([[5, 9]]), 64)[0, 1] != bigram_buckets(torch.tensor([[5, 10]]), 64)[0, 1]


def test_bigram_table_starts_silent_then_learns():
    table = BigramHashEmbedding(16, 4, 8)
    ids = torch.randint(0, 100, (2, 6))
    assert table(ids).abs().max() == 0
    table(ids).sum().backward()
    assert table.proj.weight.grad.abs().max() > 0


def test_value_embedding_adds_to_the_values_only():
    attn = _perturbed(CausalSelfAttention(32, num_heads=4, num_kv_heads=2))
    x, bias = torch.randn(2, 5, 32), torch.randn(2, 5, 16)
    q0, k0, v0 = attn.project_qkv(x)
    q, k, v = attn.project_qkv(x, bias)
    torch.testing.assert_close((q, k), (q0, k0), rtol=0, atol=0)
    torch.testing.assert_close(v, v0 + bias.view(2, 5, 2, 8).transpose(1, 2))


def test_value_embedding_reaches_only_its_layers_and_starts_silent():
    cfg = Config(**TINY_RECORD)
    model = _perturbed(build_model(cfg))
    assert [i for i, block in enumerate(model.blocks) if block.value_embed_scale is not None] == [1, 3]
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        model.value_embed.proj.weight.zero_()
        silent = model.logits(ids)
        for block in model.blocks:
            if block.value_embed_scale is not None:
                block.value_embed_scale.fill_(0.0)
        torch.testing.assert_close(model.logits(ids), silent, rtol=0, atol=0)
    with torch.no_grad():
        model.value_embed.proj.weight.normal_()
        for i in (1, 3):
            model.blocks[i].value_embed_scale.fill_(0.5)
    model(ids, ids).backward()
    assert model.value_embed.table.weight.grad.abs().max() > 0
    assert all(model.blocks[i].value_embed_scale.grad.abs() > 0 for i in (1, 3))


@pytest.mark.parametrize("layers, message", [("1,x", "layer indices"), ("4", r"layers are 0\.\.3"),
                                             ("1", "layer 1, whose attention is 'linear'")])
def test_bad_value_embed_layers_name_the_field(layers, message):
    with pytest.raises(ValueError, match=f"value_embed_layers.*{message}"):
        Config(num_layers=4, attention_layers="softmax,linear", value_embed_layers=layers).validate()


def test_compiles_fullgraph_with_every_addition_on():
    model = _perturbed(build_model(Config(**TINY_RECORD)))
    ids, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids, targets), model(ids, targets))


def test_ortho_init_makes_the_input_matrices_orthogonal_and_leaves_the_outputs_at_zero():
    model = build_model(Config(**TINY_RECORD))
    for block in model.blocks:
        for layer in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
            w = layer.weight.detach().double()
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-5, rtol=0)
        assert block.attn.proj.weight.abs().max() == 0 and block.mlp.proj.weight.abs().max() == 0


# --- optimizer: groups and weight decay ---------------------------------------------------------------------

def test_tables_are_embeddings_and_their_projections_muon_matrices():
    model = build_model(Config(**TINY_RECORD))
    group_of = {id(p): group for group, params in split_parameters(model).items() for p in params}
    named = dict(model.named_parameters())
    assert len(group_of) == len(named)  # every parameter in exactly one group
    assert group_of[id(named["bigram.table.weight"])] == "embed"
    assert group_of[id(named["bigram.proj.weight"])] == "matrix"
    assert group_of[id(named["smear.gate"])] == "scalar"
    assert group_of[id(named["value_embed.table.weight"])] == "embed"
    assert group_of[id(named["value_embed.proj.weight"])] == "matrix"
    assert group_of[id(named["blocks.1.value_embed_scale"])] == "scalar"


def test_muon_weight_decay_is_decoupled():
    torch.manual_seed(0)
    weights = [torch.randn(6, 4) for _ in range(3)]
    grads = [torch.randn(6, 4) for _ in range(3)]
    results = []
    for wd in (0.0, 0.1):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        Muon(params, lr=0.5, momentum=0.9, weight_decay=wd).step()
        results.append([p.detach() for p in params])
    for w, plain, decayed in zip(weights, *results):
        torch.testing.assert_close(decayed, plain - 0.5 * 0.1 * w)


def test_adam_weight_decay_skips_an_untied_head():
    cfg = Config(**TINY_RECORD, tie_embeddings=False, adam_weight_decay=0.03, muon_weight_decay=0.02)
    adam, muon = build_optimizers(cfg, build_model(cfg))
    decay = {group["lr"]: group["weight_decay"] for group in adam.param_groups}
    assert decay == {cfg.embed_lr: 0.03, cfg.head_lr: 0.0, cfg.scalar_lr: 0.03}
    assert muon.param_groups[0]["weight_decay"] == 0.02


# --- weight EMA ---------------------------------------------------------------------------------------------

def test_ema_averages_each_step_and_replaces_the_weights_at_the_end():
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    ema.copy_to_model()
    for e, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.detach(), e)
    other = WeightEMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(other.average, ema.average):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        other.load_state_dict({"weight": torch.zeros(2, 3)})


@pytest.mark.parametrize("field, value", [("ema_decay", 1.0), ("ema_decay", -0.1), ("muon_weight_decay", -1.0),
                                          ("bigram_vocab_size", 1), ("xsa_last_n", 10)])
def test_bad_record_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value}).validate()


# --- the preset ---------------------------------------------------------------------------------------------

def test_record_preset_has_the_records_parameter_count():
    # the 1.1248 record (openai/parameter-golf PR #315) reports 26.8M parameters
    cfg = Config(**PRESETS["record"]).validate()
    assert count_parameters(build_model(cfg)) == 26_829_912
    assert list(cfg.xsa_layers()) == [7, 8, 9, 10]


def test_record_ttt_preset_is_the_record_stack_with_the_1194_records_changes():
    record, ttt = PRESETS["record"], Config(**PRESETS["record-ttt"]).validate()
    changed = {k for k, v in PRESETS["record-ttt"].items() if record.get(k) != v}
    assert changed == {"mlp_activation", "bigram_vocab_size", "value_embed_layers", "value_embed_dim",
                       "warmdown_iters", "export_clip_search", "ttt_enabled"}
    assert ttt.value_embed_indices() == [9, 10] and ttt.ttt_enabled and ttt.ttt_chunk_tokens == 32_768
    assert count_parameters(build_model(ttt)) == 26_928_218
