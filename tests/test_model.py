"""The baseline GPT: parameter count, causality, loss reductions, and compile-friendliness."""
from __future__ import annotations

import pytest
import torch

from tgolf.config import Config
from tgolf.model import build_model, count_parameters
from tgolf.ops.loss.reference import softcap_cross_entropy_reference

TINY = dict(num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=97)


def _tiny_model(**kw) -> torch.nn.Module:
    model = build_model(Config(**{**TINY, **kw}))
    with torch.no_grad():  # leave the zero-initialised projections so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_baseline_parameter_count_is_the_official_one():
    assert count_parameters(build_model(Config())) == 17_059_912


# the records' additions (tests/test_record_stack.py): the smear gate and the bigram table read the previous token
RECORD_ADDITIONS = dict(rope_dims=4, ln_scale=True, xsa_last_n=2, smear_gate=True, bigram_vocab_size=13, bigram_dim=4,
                        ortho_init=True, value_embed_layers="2", value_embed_dim=4)


@pytest.mark.parametrize("extra", [{}, RECORD_ADDITIONS, dict(num_layers=6, recur_layers="1-3", parallel_last_n=2)],
                         ids=["baseline", "record-additions", "recurrence-lanes"])
def test_causal_outputs_do_not_see_the_future(extra):
    model = _tiny_model(**extra)
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = torch.randint(0, 97, (2, 4))
    a, b = model.logits(ids), model.logits(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_per_token_losses_average_to_the_mean_and_match_the_logits():
    model = _tiny_model()
    ids, targets = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    per_token = model(ids, targets, reduction="none")
    assert per_token.shape == (2, 10)
    torch.testing.assert_close(per_token.mean(), model(ids, targets))
    manual = torch.nn.functional.cross_entropy(model.logits(ids).reshape(-1, 97), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(per_token.reshape(-1), manual)


def test_softcap_bounds_logits():
    model = _tiny_model(logit_softcap=2.0)
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000)
    assert model.logits(torch.randint(0, 97, (1, 6))).abs().max() <= 2.0


def test_reference_loss_matches_plain_cross_entropy_without_cap():
    h, w, t = torch.randn(7, 5), torch.randn(11, 5), torch.randint(0, 11, (7,))
    torch.testing.assert_close(softcap_cross_entropy_reference(h, w, t, softcap=0.0),
                               torch.nn.functional.cross_entropy(h @ w.T, t))


def test_untied_head_and_gradients_reach_every_parameter():
    model = _tiny_model(tie_embeddings=False)
    loss = model(torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_compiles_fullgraph():
    model = _tiny_model()
    ids, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids, targets), model(ids, targets))


def test_inductor_compiles_every_tgolf_part_and_matches_eager():
    # What training on a GPU runs: the default inductor backend, fullgraph, over tgolf's own ops (ternary linear,
    # fused MLP and loss, softmax/linear/hybrid attention) and the records' additions, attention inside documents
    # (BOS = 1 opens two in the first row), depth recurrence and parallel lanes included. Loss and every gradient
    # must match eager mode.
    model = _tiny_model(linear="ternary", mlp="fused", loss="fused", num_layers=5,
                        attention_layers="linear,hybrid,softmax,softmax,softmax", attention_window=4,
                        doc_attention=True, recur_layers="2", parallel_last_n=2,
                        **{**RECORD_ADDITIONS, "xsa_last_n": 1})
    ids, targets = torch.randint(2, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    ids[0, [3, 6]] = 1
    expected = model(ids, targets)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = torch.compile(model, fullgraph=True)(ids, targets)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_kinds_per_layer():
    from tgolf.nn.attention import CausalSelfAttention
    from tgolf.nn.linear_attention import LinearAttention

    model = build_model(Config(**{**TINY, "num_layers": 5}, attention_layers="softmax, linear"))
    kinds = [type(block.attn) for block in model.blocks]
    assert kinds == [CausalSelfAttention, LinearAttention, CausalSelfAttention, LinearAttention, CausalSelfAttention]
    assert model(torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 8))).isfinite()


def test_bad_per_layer_attention_kind_names_the_field():
    import pytest

    with pytest.raises(ValueError, match="attention_layers"):
        Config(attention_layers="softmax,flash").validate()


def test_linear_kind_options_reach_every_layer():
    """``--linear ternary-g16`` / ``qat5-g8`` / ``fp8-row``: every attention and MLP matrix is that layer with
    that option; ``make_linear`` refuses options for nn.Linear, and ``convert`` takes the same kinds."""
    import pytest
    import torch.nn as nn

    import tgolf
    from tgolf.nn import FP8Linear, QATLinear, TernaryLinear, make_linear

    small = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    for kind, cls, attr, value in [("ternary-g16", TernaryLinear, "group_size", 16),
                                   ("qat5-g8", QATLinear, "group_size", 8), ("fp8-row", FP8Linear, "scaling", "row")]:
        model = build_model(Config(**small, linear=kind))
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(layers) == 2 * 6 and all(isinstance(m, cls) and getattr(m, attr) == value for m in layers), kind
    assert make_linear("qat5-g8", 16, 4).bits == 5
    with pytest.raises(ValueError, match="takes no layer options"):
        make_linear("bf16", 16, 4, group_size=8)
    model, names = tgolf.convert(nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 4)), "ternary-g4")
    assert len(names) == 2 and all(m.group_size == 4 for m in model)
