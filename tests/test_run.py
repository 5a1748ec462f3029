"""The whole run: training → export → roundtrip score → summary → submission, in one process and under torchrun."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tgolf.export.artifact import read_artifact
from tgolf.train.__main__ import main

TINY_FLAGS = ["--preset", "smoke", "--num-layers", "2", "--model-dim", "32", "--num-heads", "2", "--num-kv-heads", "1",
              "--train-seq-len", "32", "--train-batch-tokens", "512", "--val-batch-size", "1024",
              "--val-tokens-limit", "2048", "--iterations", "6", "--warmdown-iters", "2", "--compressor", "zlib",
              "--train-log-every", "2", "--device", "cpu"]


def _flags(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_FLAGS, "--data-path", str(data), "--out-dir", str(out), *extra]


def test_one_command_trains_exports_scores_and_packages(tmp_path, tiny_shards, capsys):
    sub = tmp_path / "submission"
    assert main(_flags(tiny_shards, tmp_path, "--run-id", "r1", "--submission-dir", str(sub),
                       "--val-loss-every", "3")) == 0
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    for key in ("val_bpb", "val_loss", "val_tokens", "val_bytes", "roundtrip_val_bpb", "artifact_bytes",
                "code_bytes", "model_bytes", "params", "steps", "train_seconds", "tokens_per_second", "config"):
        assert key in summary, key
    assert summary["steps"] == 6 and summary["artifact_bytes"] == summary["model_bytes"] + summary["code_bytes"]
    assert summary["model_bytes"] == (tmp_path / "r1" / "model.tgolf").stat().st_size
    assert summary["entropy_coder"] == "rans"  # the default: the int codes rANS-coded (tgolf.export.rans)
    assert abs(summary["roundtrip_val_bpb"] - summary["val_bpb"]) < 0.05  # int8 roundtrip barely moves the score
    assert [h["step"] for h in summary["val_history"]] == [3, 6]
    record = json.loads((sub / "submission.json").read_text())
    assert record["val_bpb"] == summary["roundtrip_val_bpb"] and record["bytes_total"] == summary["artifact_bytes"]
    assert (sub / "train.log").read_text().count("train_loss:") == 6  # the first 10 steps are always logged
    script = sub / "train_gpt.py"  # the packed code (tests/test_codepack.py runs one)
    assert script.exists() == (summary["code_pack"] == "lzma")
    assert (script.stat().st_size if script.exists() else summary["code_bytes_raw"]) == summary["code_bytes"]
    out = capsys.readouterr().out
    assert "step:2/6 train_loss:" in out and "roundtrip val_loss:" in out


@pytest.mark.parametrize("stop, code", [("Preempted", 143), ("NonFiniteLoss", 3)])
def test_a_run_stopped_in_training_releases_the_trainer_before_the_process_group(tmp_path, tiny_shards, monkeypatch,
                                                                                  stop, code):
    # DDP left for interpreter exit goes after its process group, and gloo then aborts the process: the exit code
    # the run promises (143, 3) would become SIGABRT (see Trainer.close)
    from tgolf.train import distributed, loop

    calls: list[str] = []

    def stopped(self):
        raise getattr(loop, stop)("stopped here")

    monkeypatch.setattr(loop.Trainer, "run", stopped)
    monkeypatch.setattr(loop.Trainer, "close", lambda self: calls.append("close"))
    monkeypatch.setattr(distributed, "teardown", lambda: calls.append("teardown"))
    assert main(_flags(tiny_shards, tmp_path, "--run-id", "stop")) == code
    assert calls == ["close", "teardown"]


def test_over_budget_artifact_fails_before_any_submission(tmp_path, tiny_shards, capsys):
    sub = tmp_path / "submission"
    code = main(_flags(tiny_shards, tmp_path, "--run-id", "big", "--submission-dir", str(sub),
                       "--max-artifact-bytes", "1000"))
    assert code == 4 and not sub.exists()
    assert "over the 1,000-byte limit" in capsys.readouterr().err


def test_export_fit_that_cannot_fit_stops_every_rank(tmp_path, tiny_shards):
    """Rank 0 exports alone; when the fit fails, every rank must stop with the error, not wait. (The tiny model's
    matrices stay float, so the fit fails after one export: nothing but the embedding has bits to take away.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tgolf.train",
           *_flags(tiny_shards, tmp_path, "--run-id", "fit", "--grad-accum-steps", "1", "--iterations", "2",
                   "--export-fit", "--max-artifact-bytes", "1000")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("tgolf.train: export fit: ") == 2, proc.stderr[-3000:]


def test_export_fill_runs_in_the_run(tmp_path, tiny_shards, capsys):
    # the MLP matrices (640 x 128) are rounded; with room to spare, fill takes their K down to the end of its
    # range (a quarter of the start): the finest grid the search allows
    assert main(_flags(tiny_shards, tmp_path, "--run-id", "fill", "--model-dim", "128", "--num-heads", "4",
                       "--num-kv-heads", "2", "--mlp-mult", "5", "--export-scheme", "int6", "--export-clip-sigmas",
                       "12", "--export-fill")) == 0
    out = capsys.readouterr().out
    assert out.count("export fill: matrices' SDClip K=") == 2 and "export fill: matrices' SDClip K=3 gives" in out
    assert json.loads((tmp_path / "fill" / "summary.json").read_text())["export_clip_sigmas"] == 3.0
    _, _, meta = read_artifact(tmp_path / "fill" / "model.tgolf")
    assert meta["clip_sigmas"] == {"blocks.0.mlp.fc.weight": 3.0, "blocks.0.mlp.proj.weight": 3.0,
                                   "blocks.1.mlp.fc.weight": 3.0, "blocks.1.mlp.proj.weight": 3.0}


def test_bad_flag_value_is_a_clear_error(tmp_path, capsys):
    assert main(["--linear", "int3", "--out-dir", str(tmp_path)]) == 2
    assert "linear" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_gloo_torchrun_ranks_agree(tmp_path, tiny_shards):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tgolf.train",
           *_flags(tiny_shards, tmp_path, "--run-id", "ddp", "--grad-accum-steps", "1",
                   # GPTQ's second moments are averaged over the ranks: 2 layers' MLP matrices (640 x 128) and
                   # the tied embedding
                   "--model-dim", "128", "--num-heads", "4", "--num-kv-heads", "2", "--mlp-mult", "5",
                   "--gptq-tokens", "512",
                   # a graph that changes mid-run under DDP (the recurrence, on from step 3 of 6), parallel lanes
                   # (no parameter left without a gradient) and MuonEq-R on each rank's share of the matrices
                   "--recur-layers", "0", "--recur-start", "0.5", "--max-wallclock-seconds", "0",
                   "--parallel-last-n", "2", "--muon-row-normalize",
                   # score-first TTT over both ranks, scored as the submission's val_bpb
                   "--ttt-enabled", "--ttt-chunk-tokens", "512", "--ttt-batch-seqs", "3",
                   "--submission-dir", str(tmp_path / "submission"),
                   "--save-trained")]  # written by rank 0 alone, while the others wait in the evaluation
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all 2 ranks agree on the trained parameters" in proc.stdout
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["gptq_tensors"] == 5
    assert summary["recurrence_step"] == 3
    assert summary["ttt_chunks"] == 4 and summary["ttt_adapted_chunks"] == 3 and "ttt val_loss:" in proc.stdout
    record = json.loads((tmp_path / "submission" / "submission.json").read_text())
    assert record["val_bpb"] == summary["ttt_val_bpb"] and record["roundtrip_val_bpb"] == summary["roundtrip_val_bpb"]
    from tgolf.export.trained import load_trained

    load_trained(tmp_path / "ddp" / "trained.pt")  # loads strictly into the plain model: no DDP or compile names


@pytest.mark.parametrize("parts", [
    ("--linear", "ternary", "--mlp", "fused", "--loss", "fused"),
    # late QAT: the lr scale is 1, 1, .5 over the 3 steps (warmdown 2): quantization on from step 2
    ("--linear", "qat6", "--mlp-activation", "leaky_relu2", "--export-scheme", "int6", "--late-qat-threshold", "0.6"),
    ("--attention", "hybrid", "--attention-window", "8", "--doc-attention"),
    ("--attention-layers", "softmax,linear", "--linear-decay", "token"),
    ("--linear", "ternary-g16"),  # the kind's options: a scale per 16 input columns, exported with the codes
    ("--linear", "fp8-row"),
    # the record preset's additions (tests/test_record_stack.py checks each), exported and scored on sliding windows
    ("--rope-dims", "8", "--ln-scale", "--xsa-last-n", "1", "--smear-gate", "--ortho-init", "--bigram-vocab-size", "64",
     "--bigram-dim", "8", "--value-embed-layers", "1", "--value-embed-dim", "8", "--doc-attention", "--ema-decay", "0.9", "--muon-weight-decay", "0.04", "--adam-weight-decay", "0.04",
     "--export-scheme", "int6", "--export-embed-scheme", "int8", "--export-mlp-scheme", "int5", "--eval-stride", "16",
     "--gptq-tokens", "512", "--export-lowrank-rank", "4", "--export-lowrank-embed-rank", "2"),
    # per-document LoRA test-time training in the final evaluation
    ("--ttt-enabled", "--ttt-mode", "lora", "--ttt-lora-chunk", "8", "--ttt-lora-docs", "4"),
    # the later records' depth recurrence (on from step 2 of 3: a step-keyed run), two lanes and MuonEq-R; the
    # artifact's model loops as the trained one did
    ("--num-layers", "5", "--recur-layers", "1-2", "--recur-start", "0.5", "--parallel-last-n", "2",
     "--muon-row-normalize", "--max-wallclock-seconds", "0", "--gptq-tokens", "512"),
], ids=["ternary-fused", "qat6", "hybrid", "per-layer", "ternary-g16", "fp8-row", "record-additions", "lora-ttt",
        "recurrence-lanes"])
def test_pluggable_parts_run_end_to_end(tmp_path, tiny_shards, parts):
    assert main(_flags(tiny_shards, tmp_path, "--run-id", "p", "--iterations", "3", "--val-tokens-limit", "512",
                       *parts)) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["roundtrip_val_bpb"])
    assert summary["late_qat_step"] == (2 if "--late-qat-threshold" in parts else None)
    assert summary["recurrence_step"] == (2 if "--recur-start" in parts else None)
    if "--ttt-enabled" in parts:
        assert summary["ttt_adapted_chunks"] == summary["ttt_chunks"] > 1 and math.isfinite(summary["ttt_val_bpb"])
    # quantized layers export their own codes; the rest is per-row int: the roundtrip barely moves the score
    assert abs(summary["roundtrip_val_bpb"] - summary["val_bpb"]) < 0.05
