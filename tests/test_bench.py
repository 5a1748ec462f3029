"""tgolf.bench on the CPU: the CLI's outputs, and correctness before speed (no timing assertions)."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from tgolf.bench import core
from tgolf.bench.__main__ import main as bench_main
from tgolf.bench.core import BenchCase, Impl, RunOptions, rel_err, run_case
from tgolf.bench.registry import FAMILIES, collect
from tgolf.bench.report import markdown
from tgolf.bench.timing import summarize

STATUSES = ("ok", "incorrect", "unavailable", "error", "skipped")
CPU = RunOptions(device=torch.device("cpu"), quick=True, compile_anchors=False)


def _linear_inputs(device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(24, 40, generator=gen, device=device), torch.randn(32, 40, generator=gen, device=device))


def _case(candidate, anchors=None, **kw) -> BenchCase:
    return BenchCase(op="test.linear", shape=dict(M=24, K=40, N=32), make_inputs=_linear_inputs,
                     candidate=Impl(lambda: candidate), reference=lambda: F.linear,
                     anchors=anchors or {}, flops=2.0 * 24 * 40 * 32, bytes=4.0 * (24 * 40 + 32 * 40 + 24 * 32),
                     grad_argnums=(0, 1), dtype="fp32", tol=1e-5, **kw)


class _WrongBackward(torch.autograd.Function):
    """Right forward, gradient of x off by 2×: only the forward+backward check can catch it."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return 2 * g @ w, g.T @ x


def test_quick_cli_writes_json_and_markdown_with_a_row_per_op(tmp_path, monkeypatch):
    # The plumbing is under test here, not the kernels (their own tests run them under the interpreter):
    # PyTorch backends keep this test to seconds.
    monkeypatch.setenv("TGOLF_BACKEND", "reference")
    assert bench_main(["--device", "cpu", "--shapes", "quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["shapes"] == "quick"
    assert data["limits"]["peak_flops"]["bf16"] == 989e12
    cases, failed = collect([], "quick")
    expected_ops = {c.op for c in cases} | {f["op"] for f in failed}
    assert {r["op"] for r in data["rows"]} == expected_ops
    assert {c.family for c in cases} | {f["family"] for f in failed} == set(FAMILIES)
    for row in data["rows"]:
        assert row["status"].split(":")[0] in STATUSES, row["status"]
        if row["status"] == "ok":
            assert row["time"]["median_ms"] > 0 and row["rel_err"] <= row["tol"]
        else:
            assert row.get("time") is None
    table = (tmp_path / "bench.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    assert len(body) == len(data["rows"])
    ok_families = {r["family"] for r in data["rows"] if r["status"] == "ok"}
    assert {p.name for p in tmp_path.glob("bench_*.png")} == {f"bench_{f}.png" for f in ok_families}


@pytest.mark.parametrize("shapes", ["contest", "sweep"])
def test_large_shape_sets_declare_work(shapes):
    cases, failed = collect([], shapes)
    assert not failed and len({c.op for c in cases}) >= 7
    assert all(c.flops > 0 and c.bytes > 0 for c in cases)


def test_correct_candidate_is_timed_with_ratios():
    rows = run_case(_case(F.linear, anchors={"eager": Impl(lambda: F.linear)}), CPU)
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        assert r["status"] == "ok" and r["rel_err"] <= 1e-6
        assert r["time"]["median_ms"] > 0 and r["tflops"] > 0
        assert r["pct_peak_flops"] is None  # no % of H100 limits for a CPU run
        assert r["anchors"]["eager"]["status"] == "ok" and r["anchors"]["eager"]["speedup"] > 0


@pytest.mark.parametrize("wrong", [
    lambda x, w: F.linear(x, w) * 1.01,
    lambda x, w: torch.full((x.shape[0], w.shape[0]), math.nan),
    lambda x, w: F.linear(x, w)[:, :-1],
])
def test_wrong_kernel_gets_no_speed_figure(wrong):
    rows = run_case(_case(wrong, anchors={"eager": Impl(lambda: F.linear)}), CPU)
    assert rows[0]["status"].startswith("incorrect: rel err")
    for r in rows:
        assert r["time"] is None and "tflops" not in r and r["anchors"] == {}


def test_wrong_gradient_is_caught_in_forward_backward_only():
    fwd, fwd_bwd = run_case(_case(_WrongBackward.apply), CPU)
    assert fwd["status"] == "ok"
    assert fwd_bwd["status"].startswith("incorrect") and fwd_bwd["time"] is None


def test_unavailable_and_skipped_cases():
    def missing():
        raise ImportError("no module named tgolf.ops.nothing")
    case = _case(F.linear)
    case.candidate = Impl(missing)
    assert all(r["status"].startswith("unavailable: ImportError") for r in run_case(case, CPU))
    late = RunOptions(device=torch.device("cpu"), quick=True, compile_anchors=False, deadline=time.monotonic() - 1)
    assert all(r["status"] == "skipped: time budget" for r in run_case(_case(F.linear), late))
    gpu_only = _case(F.linear, anchors={"flash": Impl(lambda: F.linear, cuda_only=True),
                                        "compiled": Impl(lambda: F.linear, compiled=True)})
    anchors = run_case(gpu_only, CPU)[0]["anchors"]
    assert anchors["flash"]["status"] == "skipped: needs CUDA"
    assert anchors["compiled"]["status"].startswith("skipped: torch.compile")


def test_rel_err_and_summary():
    ref = torch.tensor([1.0, 2.0, 3.0])
    assert rel_err(ref.clone(), ref) == 0.0
    assert rel_err(torch.tensor([1.0, math.nan, 3.0]), ref) == math.inf
    assert rel_err(ref[:2], ref) == math.inf
    stats = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats.median_ms, stats.q25_ms, stats.q75_ms, stats.reps) == (3.0, 2.0, 4.0, 5)


def test_resume_keeps_finished_cases_and_measures_those_the_budget_cut(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TGOLF_BACKEND", "reference")
    first, second = tmp_path / "first", tmp_path / "second"
    assert bench_main(["--device", "cpu", "--shapes", "quick", "--ops", "ternary", "--no-plots",
                       "--out", str(first)]) == 0
    data = json.loads((first / "bench.json").read_text())
    sizes = list(dict.fromkeys((r["op"], r["size"]) for r in data["rows"]))
    assert len(sizes) >= 3
    cut_whole, cut_anchor = sizes[0], sizes[1]
    for row in data["rows"]:
        key = (row["op"], row["size"])
        row["marker"] = True  # what a kept row still carries
        if key == cut_whole:
            row.update(status="skipped: time budget", time=None, anchors={})
        if key == cut_anchor:
            row["anchors"] = {"eager": {"status": "skipped: time budget"}}
    (first / "bench.json").write_text(json.dumps(data))

    assert bench_main(["--device", "cpu", "--shapes", "quick", "--ops", "ternary", "--no-plots",
                       "--resume", str(first), "--out", str(second)]) == 0
    resumed = json.loads((second / "bench.json").read_text())
    assert resumed["meta"]["resumed_from"] == str(first)
    assert list(dict.fromkeys((r["op"], r["size"]) for r in resumed["rows"])) == sizes  # same cases, same order
    for row in resumed["rows"]:
        remeasured = (row["op"], row["size"]) in (cut_whole, cut_anchor)
        assert row.get("marker", False) is not remeasured, row
        assert row["status"] != "skipped: time budget"
    assert "(kept)" in capsys.readouterr().err

    # A resumed run stopped midway still leaves every kept row on disk.
    def stop(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(core, "run_case", stop)
    with pytest.raises(KeyboardInterrupt):
        bench_main(["--device", "cpu", "--shapes", "quick", "--ops", "ternary", "--no-plots",
                    "--resume", str(first), "--out", str(tmp_path / "stopped")])
    stopped = json.loads((tmp_path / "stopped" / "bench.json").read_text())
    assert {(r["op"], r["size"]) for r in stopped["rows"]} == set(sizes) - {cut_whole, cut_anchor}


def test_resume_runs_unreached_cases_then_cut_ones_then_those_of_older_commits(tmp_path, monkeypatch, capsys):
    """Cases no run has reached come first, then the cases an earlier budget cut, then the cases kept from an older
    commit, which are measured again while the budget lasts and otherwise kept, saying which commit measured them."""
    monkeypatch.setenv("TGOLF_BACKEND", "reference")
    first = tmp_path / "first"
    argv = ["--device", "cpu", "--shapes", "quick", "--ops", "ternary", "--no-plots"]
    assert bench_main([*argv, "--out", str(first)]) == 0
    data = json.loads((first / "bench.json").read_text())
    sizes = list(dict.fromkeys((r["op"], r["size"]) for r in data["rows"]))
    cut, unreached, older = sizes[0], sizes[-1], sizes[1:-1]
    assert older
    data["meta"]["git_commit"] = "0ldc0de"
    data["rows"] = [dict(r, status="skipped: time budget", time=None, anchors={}) if (r["op"], r["size"]) == cut
                    else r for r in data["rows"] if (r["op"], r["size"]) != unreached]
    assert all("measured" in r for r in data["rows"])  # every row says when and at which commit it was measured
    for row in data["rows"]:
        del row["measured"]  # as a bench.json written before rows carried it: the run's meta stands in
    (first / "bench.json").write_text(json.dumps(data))

    def started(err: str) -> list[tuple[str, str]]:
        names = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("[")]
        return [tuple(name.split(" ", 1)) for name in names if not name.endswith("(kept)")]
    capsys.readouterr()
    assert bench_main([*argv, "--resume", str(first), "--out", str(tmp_path / "again")]) == 0
    order = started(capsys.readouterr().err)
    assert order[:2] == [unreached, cut] and sorted(order[2:]) == sorted(older)  # no budget: all measured again
    again = json.loads((tmp_path / "again" / "bench.json").read_text())
    assert list(dict.fromkeys((r["op"], r["size"]) for r in again["rows"])) == sizes  # the cases' own order
    assert all(r["measured"]["git_commit"] == again["meta"]["git_commit"] and r["case_seconds"] >= 0
               for r in again["rows"])

    # A budget already spent: the cases of the older commit keep their rows, and the table says whose they are.
    assert bench_main([*argv, "--resume", str(first), "--out", str(tmp_path / "spent"), "--time-budget", "1e-9"]) == 0
    spent = json.loads((tmp_path / "spent" / "bench.json").read_text())
    kept = [r for r in spent["rows"] if (r["op"], r["size"]) in older]
    assert kept and all(r["measured"]["git_commit"] == "0ldc0de" and "time budget" not in r["status"] for r in kept)
    assert (tmp_path / "spent" / "bench.md").read_text().count("(measured at commit 0ldc0de)") == len(kept)


def test_resume_refuses_another_gpu_model(tmp_path, monkeypatch):
    from tgolf.bench.__main__ import _resumed

    (tmp_path / "bench.json").write_text(json.dumps(
        {"meta": {"shapes": "contest", "device": "cuda", "device_name": "NVIDIA H200"}, "rows": []}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match="measured on NVIDIA H200, not on this NVIDIA H100 80GB HBM3"):
        _resumed(tmp_path / "bench.json", "contest", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert _resumed(tmp_path / "bench.json", "contest", torch.device("cuda")) == ({}, set())


@pytest.mark.parametrize("argv, message", [
    (["--resume", "{tmp}/missing"], "no such benchmark results"),
    (["--resume", "{tmp}/bad.json"], "not a tgolf bench.json"),
    (["--resume", "{tmp}/sweep.json"], "measured --shapes sweep on cuda, not --shapes quick on cpu"),
])
def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "sweep.json").write_text(json.dumps({"meta": {"shapes": "sweep", "device": "cuda"}, "rows": []}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert bench_main(["--device", "cpu", "--shapes", "quick", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_graph_timing_is_shown_beside_eager_timing():
    row = run_case(_case(F.linear, anchors={"eager": Impl(lambda: F.linear)}), CPU)[0]
    assert "graph_ms" not in row["time"]  # CUDA only
    row["time"]["graph_ms"], row["anchors"]["eager"]["graph_speedup"] = 0.25, 1.5
    line = markdown({}, [row]).splitlines()[-1]
    assert "; graph 0.250 |" in line and "×; graph 1.50×)" in line
    row["time"].pop("graph_ms")
    row["time"]["graph_status"] = "not capturable: RuntimeError: sync"
    assert "; graph: not capturable |" in markdown({}, [row]).splitlines()[-1]


def test_peak_memory_is_reported_where_measured():
    row = run_case(_case(F.linear, anchors={"eager": Impl(lambda: F.linear)}), CPU)[0]
    assert row["time"]["peak_bytes"] is None  # a CUDA figure only
    row["time"]["peak_bytes"], row["anchors"]["eager"]["peak_bytes"] = 3 * 2**20, 12 * 2**20
    line = markdown({}, [row]).splitlines()[-1]
    assert ", 3 MiB |" in line and "×, 12 MiB)" in line


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        collect(["nonsense"], "quick")
    assert bench_main(["--device", "cpu", "--ops", "nonsense", "--out", "/nonexistent"]) == 2


@pytest.mark.gpu
def test_cuda_timing_path(tmp_path):
    """On a GPU: events, L2 flush and input rotation run; rows carry % of the H100 limits."""
    cuda = RunOptions(device=torch.device("cuda"), compile_anchors=False)

    def inputs(device, seed):
        return tuple(t.to(torch.bfloat16) for t in _linear_inputs(device, seed))
    case = _case(F.linear, anchors={"eager": Impl(lambda: F.linear)})
    case.make_inputs, case.tol = inputs, 1e-2
    for row in run_case(case, cuda):
        assert row["status"] == "ok", row["status"]
        assert row["time"]["reps"] >= 10 and row["pct_peak_flops"] is not None
        assert row["time"]["peak_bytes"] >= 24 * 32 * 2  # at least the bf16 output it allocates
        assert row["time"]["graph_ms"] > 0 and row["anchors"]["eager"]["graph_speedup"] > 0  # CUDA-graph replays
    assert bench_main(["--device", "cuda", "--shapes", "quick", "--no-compile", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert not [r for r in rows if r["status"].startswith("error: timing")]


@pytest.mark.parametrize("family, label", [("quant", "fp8 row after rms_norm, compiled"),
                                           ("ternary", "row a8 after rms_norm, compiled")])
def test_compiled_layers_after_their_norm_are_checked_then_timed_beside_bf16(family, label):
    """The quantizing layers as a compiled model runs them (activation quantization fused into the norm), beside
    the same block in bf16, checked against the reference before timing."""
    import importlib

    case = importlib.import_module(f"tgolf.bench.{family}").cases("quick")[-1]
    assert case.label.endswith(label) and set(case.anchors) == {"compiled_bf16"}
    assert case.candidate.compiled and case.anchors["compiled_bf16"].compiled
    rows = run_case(case, RunOptions(device=torch.device("cpu"), quick=True, compile_anchors=True))
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["rel_err"] <= case.tol for r in rows)
    assert all(r["anchors"]["compiled_bf16"]["status"] == "ok" for r in rows)


def test_document_attention_case_checks_tgolfs_path_and_packs_documents_for_varlen():
    """The case behind ``--doc-attention``: the candidate passes its reference check on the CPU (the boolean mask),
    and the varlen anchor's untimed packing lays the documents end to end with one offset per document start."""
    from tgolf.bench.attention import _packed, cases
    from tgolf.data.tokenizer import BOS_ID

    case = cases("quick")[0]
    q, k, v, ids = case.make_inputs(torch.device("cpu"), 1)
    assert 2 < int((ids == BOS_ID).sum()) < ids.numel() // 2  # several documents, most of them longer than one
    rows = run_case(case, RunOptions(device=torch.device("cpu"), quick=True))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["anchors"]["varlen"]["status"] for r in rows] == ["skipped: needs CUDA"] * 2

    ids = torch.full((2, 6), BOS_ID + 1)
    ids[0, 3] = ids[1, 0] = ids[1, 1] = BOS_ID
    q = torch.arange(2 * 2 * 6 * 1.0).view(2, 2, 6, 1)  # [B, H, T, D], value = its flat index
    k = v = q[:, :1]  # one KV head, repeated for varlen
    pq, pk, _, offsets, longest = _packed((q, k, v, ids))
    assert offsets.tolist() == [0, 3, 6, 7, 12] and longest == 5
    assert torch.equal(pq[:, :, 0], q[..., 0].transpose(1, 2).reshape(12, 2))
    assert torch.equal(pk[:, 0], pk[:, 1])
