"""The run's code packed into one self-extracting script (tgolf.export.codepack) and counted at its size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tgolf
from tgolf.config import PRESETS, Config, env_overrides
from tgolf.export import codebytes, codepack
from tgolf.export.codestrip import strip

ROOT = Path(tgolf.__file__).resolve().parent.parent
TINY = ["--preset", "smoke", "--num-layers", "2", "--model-dim", "32", "--num-heads", "2", "--num-kv-heads", "1",
        "--train-seq-len", "32", "--train-batch-tokens", "512", "--val-batch-size", "1024", "--val-tokens-limit",
        "2048", "--iterations", "4", "--warmdown-iters", "2", "--compressor", "zlib", "--device", "cpu"]


def _clean_env() -> dict[str, str]:
    """This environment without tgolf's settings (the packed script sets its own where these are unset)."""
    fields = {name.upper() for name in Config().to_dict()}
    return {k: v for k, v in os.environ.items() if k not in fields and k not in ("PYTHONPATH", "TGOLF_BACKEND")}


def test_pack_is_deterministic_and_reads_back_without_running():
    files = {"tgolf/a.py": "x = 'é'\n" * 50, "tgolf/kernels/k.py": "pass\n"}
    env = {"NUM_LAYERS": "11"}
    script = codepack.pack_script(files, env)
    assert script == codepack.pack_script(dict(reversed(files.items())), env)  # order does not matter
    assert codepack.read_pack(script) == {"env": env, "files": files}
    compile(script, "train_gpt.py", "exec")
    with pytest.raises(codepack.PackError, match="not a tgolf packed script"):
        codepack.read_pack("print('hello')\n")
    broken = script.replace(script[script.index('"') + 1:script.index('"') + 9], "~~~~~~~~")
    with pytest.raises(codepack.PackError, match="do not decode"):
        codepack.read_pack(broken)


def test_paths_in_the_pack_follow_the_package_layout():
    assert codepack.packed_path("kernels/ternary.py") == "tgolf/kernels/ternary.py"  # a symlink in the checkout
    assert codepack.packed_path("tgolf/ops/loss/__init__.py") == "tgolf/ops/loss/__init__.py"
    assert codepack.unpackable(["tgolf/a.py", "kernels/b.py", "csrc/ops.cpp", "tgolf_build.py"]) == ""
    assert "not source text" in codepack.unpackable(["tgolf/_C.cpython-311-x86_64-linux-gnu.so"])
    assert "outside" in codepack.unpackable(["/opt/elsewhere/tgolf/a.py"])
    with pytest.raises(codepack.PackError, match="not source text"):
        codepack.packed_script(ROOT, ["tgolf/_C.so"], {})
    cpp = codepack.read_pack(codepack.packed_script(ROOT, ["csrc/ops.cpp"], {}))["files"]["csrc/ops.cpp"]
    assert cpp == (ROOT / "csrc" / "ops.cpp").read_text()  # C++ is packed as it is (comments too)


def test_run_settings_travel_as_environment_variables_that_rebuild_the_config():
    cfg = Config(num_layers=11, tie_embeddings=False, matrix_lr=0.0375, linear="ternary-g128", data_path="/data",
                 run_id="mine", out_dir="/tmp/x", submission_dir="/tmp/s").validate()
    env = codepack.run_env(cfg.to_dict())
    assert env == {"NUM_LAYERS": "11", "TIE_EMBEDDINGS": "0", "MATRIX_LR": "0.0375", "LINEAR": "ternary-g128"}
    rebuilt = Config(**env_overrides(env), data_path="/data", run_id="mine", out_dir="/tmp/x", submission_dir="/tmp/s")
    assert rebuilt == cfg
    record = Config(**PRESETS["record"]).validate()  # every kind of field: bools, floats, ints, strings
    assert Config(**env_overrides(codepack.run_env(record.to_dict()))) == record


def test_code_bytes_count_the_packed_script_of_the_imported_sources(monkeypatch):
    packed = codebytes.count_code_bytes(pack="lzma", config={"num_layers": 3})
    plain = codebytes.count_code_bytes()
    assert packed.files == plain.files and packed.raw == plain.raw == plain.total
    script = codepack.packed_script(ROOT, [f for f, _ in packed.files], {"num_layers": 3})
    assert packed.pack == "lzma" and packed.total == len(script.encode()) < packed.raw / 2
    assert codepack.read_pack(script)["env"] == {"NUM_LAYERS": "3"}
    real = codebytes._source_files
    binary = ROOT / "tgolf" / "_C.cpython-311-x86_64-linux-gnu.so"  # an extension whose sources are not here
    monkeypatch.setattr(codebytes, "_source_files", lambda exclude: real(exclude) | {binary})
    without_sources = codebytes.count_code_bytes(pack="lzma")
    assert without_sources.pack == "none" and "not source text" in without_sources.not_packed
    assert without_sources.total == without_sources.raw
    with pytest.raises(ValueError, match="code pack 'zip'"):
        codebytes.count_code_bytes(pack="zip")


def test_a_loaded_extension_counts_its_sources_and_build_recipe():
    """Where tgolf._C is loaded, csrc/ and tgolf_build.py (which compiles them) are part of the code."""
    import tgolf_build
    from tgolf import _extension

    if not (tgolf_build.extension_plan()[0] and _extension.load()):
        pytest.skip("the CUDA extension is not built here")
    files = dict(codebytes.count_code_bytes().files)
    assert "tgolf_build.py" in files and "csrc/ops.cpp" in files and "csrc/common.cuh" in files


def test_the_script_runs_its_own_sources_and_leaves_nothing_behind(tmp_path):
    # tgolf's __init__ with a marker, and a stand-in for the training entry point
    files = {"tgolf/__init__.py": (ROOT / "tgolf/__init__.py").read_text() + "\nprint('tgolf from', __file__)\n"}
    files["tgolf/train/__init__.py"] = ""
    files["tgolf/train/__main__.py"] = "import os, sys\nprint('NUM_LAYERS', os.environ['NUM_LAYERS'], sys.argv[1:])\n"
    script = tmp_path / "train_gpt.py"
    script.write_text(codepack.pack_script(files, {"NUM_LAYERS": "11", "SEED": "7"}))
    env = {**_clean_env(), "SEED": "8", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script), "--flag"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.startswith(f"tgolf from {tmp_path}/tgolf-code-") and first.endswith("tgolf/__init__.py")
    assert second == "NUM_LAYERS 11 ['--flag']"
    assert [p.name for p in tmp_path.iterdir()] == ["train_gpt.py"]  # the unpacked folder is removed


@pytest.mark.slow
def test_a_packed_submission_reruns_to_the_same_code_bytes(tmp_path, tiny_shards):
    """A fresh process packs its code; the submission's train_gpt.py, run under torchrun from another folder with
    only the data given, trains the same settings, counts the same bytes and writes the same script. Triton
    kernels (on the CPU interpreter) are in play, one of them (the fused MLP's) first imported by the roundtrip
    evaluation: the code is counted after it."""
    env = {**_clean_env(), "TRITON_INTERPRET": "1"}
    parts = ["--linear", "ternary", "--mlp", "fused", "--loss", "fused"]
    first = subprocess.run([sys.executable, "-m", "tgolf.train", *TINY, *parts, "--data-path", str(tiny_shards),
                            "--out-dir", str(tmp_path / "runs"), "--run-id", "a", "--submission-dir",
                            str(tmp_path / "sub")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())
    script = tmp_path / "sub" / "train_gpt.py"
    assert summary["code_pack"] == "lzma" and script.stat().st_size == summary["code_bytes"]
    assert summary["code_bytes"] < summary["code_bytes_raw"] / 2
    record = json.loads((tmp_path / "sub" / "submission.json").read_text())
    assert record["bytes_code"] == summary["code_bytes"] and record["code_pack"] == "lzma"
    code = tmp_path / "sub" / "code"  # the readable sources beside it are the packed ones
    packed = codepack.read_pack(script.read_text())["files"]
    assert packed == {codepack.packed_path(p.relative_to(code).as_posix()): strip(p.read_text())
                      for p in code.rglob("*") if p.is_file()}
    assert {"tgolf/kernels/mlp.py", "tgolf/kernels/ternary.py", "tgolf/export/submission.py"} <= set(packed)
    again = tmp_path / "again"
    again.mkdir()
    # as the contest starts it: torchrun on the script (two ranks here, gloo), each rank unpacking its own copy
    rerun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), "--out-dir", str(again / "runs"), "--run-id", "b", "--submission-dir",
                            str(again / "sub")],
                           cwd=again, env={**env, "DATA_PATH": str(tiny_shards), "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "all 2 ranks agree on the trained parameters" in rerun.stdout
    repeat = json.loads((again / "runs" / "b" / "summary.json").read_text())
    assert repeat["code_bytes"] == summary["code_bytes"] and repeat["params"] == summary["params"]
    assert {k: v for k, v in repeat["config"].items() if k not in codepack.MACHINE_FIELDS} == \
        {k: v for k, v in summary["config"].items() if k not in codepack.MACHINE_FIELDS}
    assert (again / "sub" / "train_gpt.py").read_bytes() == script.read_bytes()


_REPORT_EXTENSION = """import sys, torch
module = sys.modules.get("tgolf._C")
print("extension", getattr(module, "__file__", None), hasattr(torch.ops.tgolf, "softcap_ce_chunk_cuda"))
"""


def _extension_pack(tmp_path: Path) -> Path:
    """A packed script holding the CUDA sources, their recipe and what loading them needs; its entry point only
    reports whether the extension is there."""
    repo_paths = ["tgolf/__init__.py", "tgolf/_extension.py", "tgolf_build.py",
                  *(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").iterdir()))]
    files = codepack.read_pack(codepack.packed_script(ROOT, repo_paths, {}))["files"]
    files.update({"tgolf/train/__init__.py": "", "tgolf/train/__main__.py": _REPORT_EXTENSION})
    script = tmp_path / "train_gpt.py"
    script.write_text(codepack.pack_script(files, {}))
    return script


@pytest.mark.slow
def test_the_script_of_a_run_that_used_the_extension_builds_it_first(tmp_path):
    import tgolf_build

    if not tgolf_build.extension_plan()[0]:
        pytest.skip(f"no CUDA toolkit here: {tgolf_build.extension_plan()[1]}")
    env = {**_clean_env(), "TMPDIR": str(tmp_path), "TGOLF_EXTENSION_DIR": str(tmp_path / "build")}
    proc = subprocess.run([sys.executable, str(_extension_pack(tmp_path))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"extension {tmp_path / 'build' / '_C.so'} True"


def test_the_script_warns_and_runs_on_where_the_extension_cannot_be_built(tmp_path):
    env = {**_clean_env(), "TMPDIR": str(tmp_path), "TGOLF_NO_CUDA_EXT": "1"}
    proc = subprocess.run([sys.executable, str(_extension_pack(tmp_path))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the CUDA extension did not build" in proc.stderr and "TGOLF_NO_CUDA_EXT=1" in proc.stderr
    assert proc.stdout.splitlines()[-1] == "extension None False"


# --- prose out of the packed sources -------------------------------------------------------------------------

SAMPLE = '''"""Module docstring."""
from __future__ import annotations

# a whole-line comment
X = "# not a comment"  # a trailing comment


def documented(a):
    """Function docstring,
    over two lines."""
    return a  # trailing


def only_prose():
    """Nothing else."""


def one_line(): "kept: it shares the header's line"


class Thing:
    """Class docstring."""

    value = (1,  # inside brackets
             2)
'''


def test_strip_takes_out_comments_and_docstrings_and_nothing_else():
    out = strip(SAMPLE)
    assert "docstring" not in out and "comment" not in out.replace("# not a comment", "")
    assert '"# not a comment"' in out and "kept: it shares" in out
    assert "def only_prose():\n    pass\n" in out
    namespace: dict = {}
    exec(compile(out, "sample", "exec"), namespace)
    assert namespace["documented"](3) == 3 and namespace["Thing"].value == (1, 2)
    assert namespace["X"] == "# not a comment"
    assert strip(out) == out  # a packed run re-packs its own sources to the same bytes


def test_strip_keeps_what_a_module_reads_of_itself():
    reads_doc = SAMPLE + "\nHELP = __doc__\n"
    out = strip(reads_doc)
    assert '"""Module docstring."""' in out and "Function docstring" in out and "# a whole-line" not in out
    reads_source = SAMPLE + "\nimport inspect\nSOURCE = inspect.getsource(Thing)\n"
    assert strip(reads_source) == reads_source


@pytest.mark.parametrize("cut", [{4: 3}, {10: 10}], ids=["not-python", "other-code"])
def test_strip_keeps_the_original_when_the_result_is_not_the_same_code(monkeypatch, cut):
    from tgolf.export import codestrip

    # comment positions off by a few columns would cut code (`X =`; `return` without its value): the check
    # catches both
    monkeypatch.setattr(codestrip, "_comment_columns", lambda source: cut)
    assert strip(SAMPLE) == SAMPLE


@pytest.mark.parametrize("folder", ["tgolf", "kernels"])
def test_every_source_file_strips_to_the_same_code(folder):
    import ast

    def code_of(source: str) -> str:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                    isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                    isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        return ast.dump(tree)

    files = sorted((ROOT / folder).rglob("*.py"))
    assert len(files) > 5
    for path in files:
        source = path.read_text()
        out = strip(source)
        assert code_of(out) == code_of(source), path
        assert len(out) < len(source) or "getsource" in source or "__doc__" in source or not source.strip(), path


def test_cli_shows_and_extracts_a_packed_script_without_running_it(tmp_path, capsys):
    files = {"tgolf/__init__.py": "raise SystemExit('must not run')\n", "tgolf/kernels/k.py": "K = 1\n"}
    script = tmp_path / "train_gpt.py"
    script.write_text(codepack.pack_script(files, {"NUM_LAYERS": "11"}))
    assert codepack.main([str(script), "--extract", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "2 files" in shown and "NUM_LAYERS=11" in shown and "tgolf/kernels/k.py" in shown
    assert (tmp_path / "out" / "tgolf" / "kernels" / "k.py").read_text() == "K = 1\n"
    assert codepack.main([str(script), "--extract", str(tmp_path / "out")]) == 2  # nothing is replaced
    assert "already exist" in capsys.readouterr().err
    (tmp_path / "notes.md").write_text("| a | b |\n")
    assert codepack.main([str(tmp_path / "notes.md")]) == 2
    assert "not a tgolf packed script" in capsys.readouterr().err
    evil = tmp_path / "evil.py"
    evil.write_text(codepack.pack_script({"../escape.py": "x = 1\n"}, {}))
    assert codepack.main([str(evil), "--extract", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "escape.py").exists() and "outside" in capsys.readouterr().err
