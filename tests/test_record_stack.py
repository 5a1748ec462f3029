"""The records' additions to the baseline: partial RoPE, XSA, LN scale, SmearGate, bigram hash table, value
embeddings, attention inside documents, orthogonal init, weight decay and the weight EMA, each against a plain
reference, and the ``record`` presets' fields."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tgolf.config import PRESETS, Config
from tgolf.model import build_model, count_parameters
from tgolf.data.tokenizer import BOS_ID
from tgolf.nn.attention import CausalSelfAttention, attend, document_mask, exclude_self_value
from tgolf.nn.embeddings import BigramHashEmbedding, SmearGate, bigram_buckets
from tgolf.nn.rotary import Rotary, apply_rotary
from tgolf.train.ema import WeightEMA
from tgolf.train.optim import Muon, build_optimizers, split_parameters

# every addition on, at a size the CPU trains in seconds
TINY_RECORD = dict(num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=97, rope_dims=4,
                   ln_scale=True, xsa_last_n=2, smear_gate=True, bigram_vocab_size=61, bigram_dim=8, ortho_init=True,
                   value_embed_layers="1,3", value_embed_dim=8, doc_attention=True)


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


# --- attention inside documents ---------------------------------------------------------------------------------

def _rows_with_documents(seq_len: int) -> torch.Tensor:
    """Two rows of token ids: one starting mid-document (no BOS at 0) with documents of 1, 6 and the rest; one
    starting at a BOS, with two BOS in a row (a one-token document)."""
    ids = torch.randint(4, 97, (2, seq_len))
    ids[0, [5, 6, 12]] = BOS_ID
    ids[1, [0, 9, 10]] = BOS_ID
    return ids


def _attention_per_document(q, k, v, ids):
    """Plain causal attention over each document of each row on its own (the documents cut at BOS tokens)."""
    out = torch.empty_like(q)
    for row in range(ids.shape[0]):
        starts = [0, *(i for i in (ids[row] == BOS_ID).nonzero().flatten().tolist() if i > 0), ids.shape[1]]
        for lo, hi in zip(starts[:-1], starts[1:]):
            out[row, :, lo:hi] = F.scaled_dot_product_attention(
                q[row:row + 1, :, lo:hi], k[row:row + 1, :, lo:hi], v[row:row + 1, :, lo:hi], is_causal=True,
                enable_gqa=True)[0]
    return out


def test_document_mask_attends_each_document_as_if_alone():
    torch.manual_seed(0)
    ids = _rows_with_documents(23)
    q = torch.randn(2, 4, 23, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 23, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))  # GQA: 2 KV heads
    out = attend(q, k, v, document_mask(ids, BOS_ID, flex=False), enable_gqa=True)
    expected = _attention_per_document(q, k, v, ids)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(a, b)
    plain = attend(q, k, v, None, enable_gqa=True)  # the same rows without the mask: every earlier token
    assert not torch.allclose(plain, expected)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_document_flex_block_mask_gives_the_boolean_masks_attention():
    # the GPU's compiled path; flex attention runs its forward (not its backward) on the CPU. 300 tokens: two
    # 128-token tiles and a ragged one, documents crossing tile edges
    torch.manual_seed(0)
    ids = _rows_with_documents(300)
    ids[0, [127, 128, 200]] = BOS_ID
    q, k, v = torch.randn(2, 4, 300, 16), torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    flex = attend(q, k, v, document_mask(ids, BOS_ID, flex=True), enable_gqa=True)
    torch.testing.assert_close(flex, attend(q, k, v, document_mask(ids, BOS_ID, flex=False), enable_gqa=True),
                               rtol=1e-5, atol=1e-5)
    # under bf16 autocast, as training runs: the normed q and k arrive in float32 (rms_norm's fp32 policy) beside
    # a bf16 v; autocast brings flex attention's inputs to one dtype as it does SDPA's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flex = attend(q, k, v.bfloat16(), document_mask(ids, BOS_ID, flex=True), enable_gqa=True)
        sdpa = attend(q, k, v.bfloat16(), document_mask(ids, BOS_ID, flex=False), enable_gqa=True)
    assert flex.dtype == sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(flex, sdpa, rtol=2e-2, atol=2e-2)


# linear and hybrid layers reset their state at each BOS (tests/test_linear_attention.py checks the modules); XSA
# and value embeddings are softmax-only, so those variants leave them out
_NOT_SOFTMAX_ONLY = dict(xsa_last_n=0, value_embed_layers="", attention_window=4)


@pytest.mark.parametrize("attention", [{}, dict(attention="linear", **_NOT_SOFTMAX_ONLY),
                                       dict(attention="hybrid", **_NOT_SOFTMAX_ONLY),
                                       dict(attention_layers="softmax,hybrid", **_NOT_SOFTMAX_ONLY)],
                         ids=["softmax", "linear", "hybrid", "softmax,hybrid"])
def test_with_doc_attention_a_documents_logits_ignore_the_documents_before_it(attention):
    torch.manual_seed(0)
    # the smear gate and the bigram table read the previous token across a BOS by design; the rest is per document
    tiny = {**TINY_RECORD, "smear_gate": False, "bigram_vocab_size": 0, **attention}
    dtype = torch.float64 if not attention else torch.float32  # the linear-attention op computes in float32
    model = _perturbed(build_model(Config(**tiny))).to(dtype)
    second = torch.cat([torch.tensor([BOS_ID]), torch.randint(4, 97, (9,))])
    row = torch.cat([torch.randint(4, 97, (7,)), second])[None]  # a partial document, then `second`
    torch.testing.assert_close(model.logits(row)[:, 7:], model.logits(second[None]), rtol=1e-4, atol=1e-5)
    mixed = _perturbed(build_model(Config(**{**tiny, "doc_attention": False}))).to(dtype)
    assert not torch.allclose(mixed.logits(row)[:, 7:], mixed.logits(second[None]), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_doc_attention_compiled_flex_training_matches_the_boolean_mask_on_a_gpu():
    """On CUDA under torch.compile the layers attend through flex attention's block mask; eager runs SDPA with
    the boolean mask. Loss and every gradient agree, in float32 and under bf16 autocast as training runs."""
    torch.manual_seed(0)
    cfg = Config(num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, vocab_size=97, doc_attention=True)
    model = _perturbed(build_model(cfg)).cuda()
    ids = torch.randint(4, 97, (4, 300), device="cuda")
    ids[torch.rand(ids.shape, device="cuda") < 0.02] = BOS_ID
    targets = torch.randint(0, 97, (4, 300), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    for autocast, rtol, atol in ((False, 2e-3, 1e-5), (True, 5e-2, 1e-3)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            expected = model(ids, targets)
            expected.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            loss = compiled(ids, targets)
            loss.backward()
        torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[name], rtol=rtol, atol=atol, msg=name)
        model.zero_grad()


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


def test_muon_row_normalize_orthogonalises_the_update_with_unit_rows():
    from tgolf.train.orthogonalize import muon_polynomials, orthogonalize

    grad = torch.randn(6, 10) * torch.logspace(-2, 1, 6)[:, None]  # rows of very different norms
    updates = []
    for row_normalize in (False, True):
        p = torch.nn.Parameter(torch.zeros(6, 10))
        p.grad = grad.clone()
        Muon([p], lr=1.0, momentum=0.0, nesterov=False, row_normalize=row_normalize).step()
        updates.append(-p.detach())
    unit_rows = grad / grad.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(updates[1], orthogonalize(unit_rows[None], muon_polynomials("newton_schulz", 5))[0])
    assert not torch.allclose(updates[0], updates[1], atol=1e-3)
    cfg = Config(**TINY_RECORD, muon_row_normalize=True)
    assert build_optimizers(cfg, build_model(cfg))[1].row_normalize


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
