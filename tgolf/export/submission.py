"""A submission folder in the layout of the openai/parameter-golf records.

The contest's records live in ``records/track_10min_16mb/<date>_<name>/`` and hold a README.md, a
submission.json (``author``, ``github_id``, ``name``, ``blurb``, ``date``, ``val_loss``, ``val_bpb``,
``bytes_total``, ``bytes_code``), the training log and the code that ran. ``write_submission`` writes the same
files, with tgolf's extra figures added to submission.json: the code as ``train_gpt.py`` (where the run packed it,
tgolf.export.codepack: the script whose size is ``bytes_code``) and as readable sources under ``code/``.

``val_bpb`` / ``val_loss`` are the scores of the model reloaded from the artifact (as in the records, where the
scored number is the quantized roundtrip), or, when the run adapted it by score-first test-time training
(``ttt_enabled``), that evaluation's scores, as the records that use it report; the other figures sit beside them.
The byte limit is checked first: an artifact over the limit raises BudgetExceeded and nothing is written.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

import tgolf
from tgolf.config import changed_fields
from tgolf.export.artifact import ARTIFACT_LIMIT, check_budget
from tgolf.export.codepack import packed_script

PACKED_SCRIPT = "train_gpt.py"  # the records' name for the script that trains and scores
REQUIRED_SUMMARY_FIELDS = ("val_bpb", "roundtrip_val_bpb", "artifact_bytes", "model_bytes", "code_bytes")


def describe_hardware() -> str:
    """'8x NVIDIA H100 80GB HBM3' style, or the CPU when no GPU is visible."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def record_folder_name(name: str, when: _dt.datetime | None = None) -> str:
    """``<YYYY-MM-DD>_<name>`` as the records folders are named, the name reduced to [A-Za-z0-9_.-]."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "tgolf"
    return f"{when:%Y-%m-%d}_{slug}"


def _config_dict(config: Any) -> dict[str, Any]:
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def submission_json(summary: Mapping[str, Any], config: Mapping[str, Any], *, name: str, author: str,
                    github_id: str, blurb: str, date: str) -> dict[str, Any]:
    """The contest's fields first, then tgolf's."""
    pre, post, ttt = summary["val_bpb"], summary["roundtrip_val_bpb"], summary.get("ttt_val_bpb")
    return {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb, "date": date,
        "val_loss": summary.get("ttt_val_loss") if ttt is not None else summary.get("roundtrip_val_loss"),
        "val_bpb": ttt if ttt is not None else post,
        "bytes_total": summary["artifact_bytes"], "bytes_code": summary["code_bytes"],
        # tgolf's additions
        "track": "10min_16mb",
        "pre_export_val_bpb": pre, "pre_export_val_loss": summary.get("val_loss"),
        "roundtrip_gap_bpb": None if pre is None or post is None else post - pre,
        "roundtrip_val_bpb": post, "ttt_gain_bpb": None if ttt is None or post is None else ttt - post,
        "bytes_model": summary["model_bytes"],
        "params": summary.get("params"), "steps": summary.get("steps"),
        "train_seconds": summary.get("train_seconds"), "eval_seconds": summary.get("eval_seconds"),
        "tokens_per_second": summary.get("tokens_per_second"),
        "hardware": summary.get("hardware") or describe_hardware(),
        "export_scheme": summary.get("export_scheme", config.get("export_scheme")),
        "compressor": summary.get("compressor"), "code_pack": summary.get("code_pack", "none"),
        "bytes_code_files": summary.get("code_bytes_raw"),
        "tgolf_version": tgolf.__version__,
    }


def _fmt(value: Any, precise: bool = False) -> str:
    """Scores with 8 decimals as the records print them; other numbers with thousands separators."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.8f}" if precise else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_readme(record: Mapping[str, Any], config: Mapping[str, Any], code_files: Sequence[str]) -> str:
    env = " ".join(f"{k.upper()}={v}" for k, v in changed_fields(config).items()) or "(baseline defaults)"
    ttt = record.get("ttt_gain_bpb") is not None
    scored = "artifact roundtrip + score-first TTT" if ttt else "artifact roundtrip"
    scores = [(f"val_bpb ({scored}, scored)", record["val_bpb"]), (f"val_loss ({scored})", record["val_loss"]),
              *([("val_bpb before TTT (artifact roundtrip)", record["roundtrip_val_bpb"]),
                 ("TTT gain (bpb)", record["ttt_gain_bpb"])] if ttt else []),
              ("val_bpb before export", record["pre_export_val_bpb"]),
              ("roundtrip gap (bpb)", record["roundtrip_gap_bpb"])]
    rows = [("artifact bytes (model + code)", record["bytes_total"]),
            ("model bytes (compressed)", record["bytes_model"]),
            ("code bytes", record["bytes_code"]),
            ("export", f"{record['export_scheme']} + {record['compressor']}"),
            ("parameters", record["params"]), ("steps", record["steps"]),
            ("train seconds", record["train_seconds"]), ("eval seconds", record["eval_seconds"]),
            ("tokens/s", record["tokens_per_second"]), ("hardware", record["hardware"])]
    lines = [f"# {record['name']}", "", record["blurb"] or "Trained and exported with tgolf.", "",
             "## Results", "", "| | |", "|---|---|",
             *[f"| {label} | {_fmt(v, precise=True)} |" for label, v in scores],
             *[f"| {label} | {_fmt(v)} |" for label, v in rows], "",
             "## Configuration", "", "Fields that differ from the baseline defaults (as environment variables):", "",
             "```bash", env, "```", "", "Full configuration:", "", "```json",
             json.dumps(dict(config), indent=2, sort_keys=True), "```", "", "## Included files", "",
             "- `README.md` (this file)", "- `submission.json` (leaderboard metadata)",
             "- `train.log` (the training log of this run)"]
    if record.get("code_pack", "none") != "none":
        lines += [f"- `{PACKED_SCRIPT}` (the code counted in the code bytes: the tgolf sources below packed into "
                  "one self-extracting script with this run's settings; run it like `python -m tgolf.train`)",
                  f"- `code/` ({len(code_files)} files: the same sources, readable)"]
    elif code_files:
        lines.append(f"- `code/` ({len(code_files)} files: the tgolf sources counted in the code bytes)")
    return "\n".join(lines) + "\n"


def _packed_script(summary: Mapping[str, Any], root: Path, code_files: list[str], config: Any) -> str | None:
    """The packed script whose size the run counted (None when its code was not packed), rebuilt from the same
    files and settings; refused when its size differs from the summary's code bytes."""
    if summary.get("code_pack", "none") == "none":
        return None
    script = packed_script(root, code_files, _config_dict(config))
    size = len(script.encode("utf-8"))
    if size != summary["code_bytes"]:
        raise ValueError(f"write_submission: the packed script of these code files is {size:,} bytes, the summary "
                         f"counted {summary['code_bytes']:,} (did the sources or the config change since the run?)")
    return script


def write_submission(out_dir: str | os.PathLike, summary: Mapping[str, Any], train_log_path: str | os.PathLike,
                     config: Any, *, name: str = "tgolf", author: str = "", github_id: str = "", blurb: str = "",
                     code_files: Sequence[str | os.PathLike] = (), code_root: str | os.PathLike | None = None,
                     limit: int = ARTIFACT_LIMIT, overwrite: bool = False) -> Path:
    """Write README.md, submission.json, train.log (and code/) into ``out_dir``; return its path.

    ``summary``: the run's summary.json dict (needs REQUIRED_SUMMARY_FIELDS). ``code_files``: paths relative
    to ``code_root`` (default: the repository root holding the tgolf package), e.g. ArtifactInfo.code_files.
    Raises BudgetExceeded before creating anything when the artifact is over ``limit``; refuses a non-empty
    ``out_dir`` unless ``overwrite``. A fresh folder appears complete or not at all (built aside, then renamed).
    """
    missing = [k for k in REQUIRED_SUMMARY_FIELDS if k not in summary]
    if missing:
        raise ValueError(f"write_submission: summary lacks {missing}")
    check_budget(summary, limit)
    out_dir, log = Path(out_dir), Path(train_log_path)
    if not log.is_file():
        raise FileNotFoundError(f"write_submission: train log {log} does not exist")
    root = Path(code_root) if code_root is not None else Path(tgolf.__file__).resolve().parent.parent
    sources = [(Path(f), root / f) for f in code_files]
    for rel, src in sources:
        if rel.is_absolute() or ".." in rel.parts or not src.is_file():
            raise FileNotFoundError(f"write_submission: code file {rel} is not a file under {root}")
    script = _packed_script(summary, root, [str(rel) for rel, _ in sources], config)
    exists = out_dir.exists() and any(out_dir.iterdir())
    if exists and not overwrite:
        raise FileExistsError(f"submission folder {out_dir} is not empty; pass overwrite=True to write into it")

    cfg = _config_dict(config)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = submission_json(summary, cfg, name=name, author=author, github_id=github_id, blurb=blurb, date=date)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared
    try:
        (stage / "submission.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (stage / "README.md").write_text(render_readme(record, cfg, [str(r) for r, _ in sources]), encoding="utf-8")
        shutil.copyfile(log, stage / "train.log")
        if script is not None:
            (stage / PACKED_SCRIPT).write_text(script, encoding="utf-8")
        for rel, src in sources:
            (stage / "code" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, stage / "code" / rel)
        if out_dir.exists():
            shutil.copytree(stage, out_dir, dirs_exist_ok=True)
        else:
            os.rename(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir
