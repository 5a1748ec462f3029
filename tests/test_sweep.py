"""tgolf.train.sweep: a grid of real tiny runs at equal wall time, its table, reuse of finished cells, and errors."""
from __future__ import annotations

import json

import pytest

from tgolf.train.sweep import main, parse_grid

TINY = ["--preset", "smoke", "--num-layers", "2", "--model-dim", "32", "--num-heads", "2", "--num-kv-heads", "1",
        "--train-seq-len", "32", "--train-batch-tokens", "512", "--val-batch-size", "1024", "--val-tokens-limit", "2048",
        "--iterations", "4", "--compressor", "zlib", "--device", "cpu"]


def test_grid_is_the_cross_product_in_order():
    cells = parse_grid(["attention=softmax,linear", "train-seq-len=32,64"])
    assert [c.name for c in cells] == ["attention-softmax_train_seq_len-32", "attention-softmax_train_seq_len-64",
                                       "attention-linear_train_seq_len-32", "attention-linear_train_seq_len-64"]
    assert cells[3].flags() == ["--attention", "linear", "--train-seq-len", "64"]
    assert parse_grid(["data_path=/data/fineweb 10B"])[0].name == "data_path-data_fineweb_10B"
    # a bool field is a switch of tgolf.train (--doc-attention / --no-doc-attention), not a flag with a value
    switched = parse_grid(["doc_attention=off,true", "seed=2"])
    assert [c.flags() for c in switched] == [["--no-doc-attention", "--seed", "2"], ["--doc-attention", "--seed", "2"]]


@pytest.mark.parametrize("spec, message", [("atention=softmax", "not a Config field"),
                                           ("attention", "expected FIELD=VALUE"),
                                           ("attention=", "expected FIELD=VALUE"),
                                           ("attention=linear,linear", "share a run folder"),
                                           ("data_path=/a/b,/a_b", "share a run folder"),
                                           ("ln_scale=true,maybe", "--grid ln_scale='maybe': expected a bool")])
def test_bad_grid_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid([spec])


def test_bad_cell_value_fails_before_any_run(tmp_path, capsys):
    code = main(["--grid", "attention=softmax,nonsense", "--seconds", "5", "--out", str(tmp_path), "--", *TINY])
    assert code == 2 and "cell attention-nonsense" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["--grid", "seed=1", "--seconds", "5", "--out", str(tmp_path), "--", "--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_sweep_runs_ranks_reuses_and_reports_failures(tmp_path, tiny_shards, capsys):
    out = tmp_path / "sweep"
    # a budget far above the 4 iterations' time, so a loaded machine still runs them all
    argv = ["--grid", "attention=softmax,linear", "--seconds", "300", "--out", str(out), "--", *TINY,
            "--data-path", str(tiny_shards)]
    assert main(argv) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert [r["attention"] for r in data["rows"]] == ["softmax", "linear"]
    for row in data["rows"]:
        assert row["status"] == "ok" and row["steps"] == 4 and row["val_bpb"] > 0 and row["tokens_per_second"] > 0
        summary = json.loads((out / "runs" / row["cell"] / "summary.json").read_text())
        assert summary["config"]["attention"] == row["attention"] and summary["config"]["max_wallclock_seconds"] == 300
    table = (out / "sweep.md").read_text()
    ranked = sorted(data["rows"], key=lambda r: r["val_bpb"])
    assert table.index(f"| {ranked[0]['attention']} |") < table.index(f"| {ranked[1]['attention']} |")

    # Finished cells are reused; a cell that fails at run time is reported and the others still count.
    capsys.readouterr()
    code = main(["--grid", f"data_path={tiny_shards},{tmp_path / 'missing'}", "--seconds", "300", "--out", str(out),
                 "--", *TINY])
    assert code == 1
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("failed (rc")
    assert main(argv) == 0 and capsys.readouterr().out.count("reusing") == 2
