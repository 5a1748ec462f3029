"""Exporting a run's trained weights again (``--save-trained``, ``python -m tgolf.export``): the same settings give
the run's own artifact and scores; other settings give their own; bad input is refused and nothing is replaced."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_run import _flags
from tgolf.export.__main__ import main as export_main
from tgolf.export.artifact import read_artifact
from tgolf.export.trained import load_trained, save_trained
from tgolf.train.__main__ import main as train_main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shards):
    out = tmp_path_factory.mktemp("reexport")
    # 96 wide: the tied embedding (1024 x 96) is the one matrix over 65,536 elements, so the export rounds it
    assert train_main(_flags(tiny_shards, out, "--run-id", "r", "--save-trained", "--export-scheme", "int6",
                             "--model-dim", "96")) == 0
    return out / "r"


def _export(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = export_main(list(argv))
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else None, captured.err


def test_the_runs_own_settings_give_its_artifact_and_scores(trained_run, tmp_path, capsys):
    summary = json.loads((trained_run / "summary.json").read_text())
    code, record, _ = _export(capsys, "--trained", str(trained_run / "trained.pt"), "--out", str(tmp_path / "a.tgolf"),
                              "--score")
    assert code == 0
    assert (tmp_path / "a.tgolf").read_bytes() == (trained_run / "model.tgolf").read_bytes()
    assert record["code_bytes"] == summary["code_bytes"] and record["artifact_bytes"] == summary["artifact_bytes"]
    assert record["val_bpb"] == summary["val_bpb"] and record["roundtrip_val_bpb"] == summary["roundtrip_val_bpb"]
    assert record["export_scheme"] == "int6" and record["fits"]
    assert read_artifact(tmp_path / "a.tgolf")[0]["tok_emb.weight"].scheme == "int6"


def test_other_settings_give_their_own_artifact(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EXPORT_SCHEME", "int5")  # the environment, then the flags
    code, record, _ = _export(capsys, "--trained", str(trained_run / "trained.pt"), "--out", str(tmp_path / "b.tgolf"),
                              "--export-lowrank-embed-rank", "2", "--gptq-tokens", "512", "--code-bytes", "100",
                              "--export-embed-clip-sigmas", "20")
    assert code == 0 and record["export_scheme"] == "int5" and record["gptq_tensors"] > 0
    assert record["artifact_bytes"] == record["model_bytes"] + 100
    tensors, config, meta = read_artifact(tmp_path / "b.tgolf")
    assert meta["lowrank_tensors"] == 1 and config["export_lowrank_embed_rank"] == 2
    assert meta["clip_sigmas"] == {"tok_emb.weight": 20.0}  # SDClip's scales, GPTQ's codes
    assert tensors["tok_emb.weight"].scheme == "int5" and tensors["tok_emb.weight"].correction is not None


def test_self_calibration_reads_no_shards(trained_run, tmp_path, capsys, monkeypatch):
    import tgolf.data.loader

    def no_loader(*args, **kwargs):
        raise AssertionError("a TokenLoader was built")

    monkeypatch.setattr(tgolf.data.loader, "TokenLoader", no_loader)
    code, record, _ = _export(capsys, "--trained", str(trained_run / "trained.pt"), "--out", str(tmp_path / "s.tgolf"),
                              "--gptq-tokens", "64", "--gptq-calibration", "self", "--gptq-self-seq-len", "16")
    assert code == 0 and record["gptq_tensors"] == 1  # the tied embedding
    assert read_artifact(tmp_path / "s.tgolf")[1]["gptq_calibration"] == "self"


def test_bad_input_is_refused_and_nothing_is_replaced(trained_run, tmp_path, capsys):
    kept = tmp_path / "kept.tgolf"
    kept.write_bytes(b"mine")
    trained = str(trained_run / "trained.pt")
    code, _, err = _export(capsys, "--trained", trained, "--out", str(kept))
    assert code == 1 and "already exists" in err and kept.read_bytes() == b"mine"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    code, _, err = _export(capsys, "--trained", str(garbage), "--out", str(tmp_path / "c.tgolf"))
    assert code == 1 and "garbage.pt" in err and "--save-trained" in err
    code, _, err = _export(capsys, "--trained", trained, "--out", str(tmp_path / "c.tgolf"), "--export-scheme", "int3")
    assert code == 1 and "export_scheme" in err and not (tmp_path / "c.tgolf").exists()
    code, record, err = _export(capsys, "--trained", trained, "--out", str(tmp_path / "d.tgolf"),
                                "--max-artifact-bytes", "1000")
    assert code == 4 and record["fits"] is False and "over the 1,000-byte limit" in err


def test_load_trained_checks_the_file(trained_run, tmp_path):
    model, config = load_trained(trained_run / "trained.pt")
    assert not model.training and config.export_scheme == "int6"
    saved = torch.load(trained_run / "trained.pt", weights_only=True)
    torch.save({**saved, "format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'format'"):
        load_trained(tmp_path / "other.pt")
    state = dict(saved["state"])
    state.pop(next(iter(state)))
    torch.save({**saved, "state": state}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_trained(tmp_path / "short.pt")
    save_trained(tmp_path / "again.pt", model, config)  # what is saved loads back equal
    again, _ = load_trained(tmp_path / "again.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
