"""Export: quantize, serialize (no pickle), compress, account for bytes, reload, and package a submission.

Typical use at the end of a run::

    info = write_artifact(run_dir / "model.tgz", model, config, scheme=config.export_scheme,
                          compressor=config.compressor)
    check_budget(info, config.max_artifact_bytes)         # raises BudgetExceeded when over
    scored_model, cfg = load_artifact(run_dir / "model.tgz", device)
    ...
    write_submission(dir, summary, log_path, config, code_files=[f for f, _ in info.code_files])

Names are imported on first use, so that ``tgolf.export.packing`` (used by the ternary ops) does not pull in
the model and the compressors: ops must not import the model.
"""
from __future__ import annotations

from tgolf._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "tgolf.export.artifact": ("ARTIFACT_LIMIT", "ArtifactInfo", "BudgetExceeded", "check_budget", "load_artifact",
                              "read_artifact", "write_artifact"),
    "tgolf.export.codebytes": ("CodeBytes", "count_code_bytes"),
    "tgolf.export.compress": ("compress", "decompress"),
    "tgolf.export.format": ("FormatError", "deserialize", "serialize"),
    "tgolf.export.lowrank": ("lowrank_correction",),
    "tgolf.export.packing": ("pack_base3", "pack_bits", "pack_fp16_adaptive", "pack_trits", "unpack_base3",
                             "unpack_bits", "unpack_fp16_adaptive", "unpack_trits"),
    "tgolf.export.quantize": ("QuantTensor", "dequantize_model", "quantize_model"),
    "tgolf.export.submission": ("record_folder_name", "write_submission"),
    "tgolf.export.trained": ("load_trained", "save_trained"),
})
