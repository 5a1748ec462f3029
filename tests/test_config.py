"""Config resolution: preset → environment → CLI, and clear errors for bad values."""
from __future__ import annotations

import argparse

import pytest

from tgolf.config import (PRESETS, Config, add_config_arguments, env_overrides, parse_linear_kind,
                          resolve_config)


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_baseline_defaults_match_the_official_configuration():
    cfg = resolve_config(_args(["--preset", "baseline"]), environ={})
    assert (cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult) == (9, 512, 8, 4, 2)
    assert (cfg.train_batch_tokens, cfg.train_seq_len, cfg.warmdown_iters) == (524_288, 1024, 1200)
    assert cfg.max_wallclock_seconds == 600.0 and cfg.vocab_size == 1024


def test_preset_defaults_to_smoke_without_data_path_and_baseline_with_it():
    assert resolve_config(_args([]), environ={}).model_dim == PRESETS["smoke"]["model_dim"]
    assert resolve_config(_args([]), environ={"DATA_PATH": "/data"}).model_dim == 512


def test_environment_overrides_preset_and_cli_overrides_environment():
    env = {"SEED": "7", "ITERATIONS": "33", "TIE_EMBEDDINGS": "0", "MAX_WALLCLOCK_SECONDS": "12.5"}
    cfg = resolve_config(_args(["--preset", "baseline", "--iterations", "44"]), environ=env)
    assert cfg.seed == 7 and cfg.iterations == 44 and cfg.tie_embeddings is False
    assert cfg.max_wallclock_seconds == 12.5


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="SEED"):
        env_overrides({"SEED": "abc"})


@pytest.mark.parametrize("field, value, fragment", [
    ("linear", "int3", "linear"), ("linear", "fp8-g128", "config field linear: linear kind 'fp8-g128'"),
    ("num_heads", 7, "num_heads"), ("train_batch_tokens", 1000, "train_batch_tokens"),
    ("num_kv_heads", 3, "num_kv_heads"), ("iterations", 0, "iterations"),
])
def test_validate_names_the_field(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        Config(**{field: value}).validate()


def test_dict_round_trip_and_unknown_fields():
    cfg = Config(seed=3, linear="ternary")
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        Config.from_dict({"bogus": 1})


def test_help_reuses_the_field_comments():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "tokens per optimizer step, over all ranks (default 524288; env TRAIN_BATCH_TOKENS)" in text


@pytest.mark.parametrize("kind, family, options", [
    ("bf16", "bf16", {}), ("qat6", "qat6", {}), ("qat4-g64", "qat4", {"group_size": 64}),
    ("ternary", "ternary", {}), ("ternary-g128", "ternary", {"group_size": 128}),
    ("fp8", "fp8", {}), ("fp8-row", "fp8", {"scaling": "row"}),
])
def test_linear_kinds_carry_their_layer_options(kind, family, options):
    assert parse_linear_kind(kind) == (family, options)
    cfg = resolve_config(_args(["--linear", kind]), environ={})
    assert cfg.linear == kind and resolve_config(_args([]), environ={"LINEAR": kind}).linear == kind


@pytest.mark.parametrize("kind", ["ternary-g0", "ternary-g", "fp8-g128", "bf16-row", "ternary-row", "qat9",
                                  "qat6-g128-row", "Ternary", "", None])
def test_bad_linear_kinds_are_refused_by_name(kind):
    with pytest.raises(ValueError, match="linear kind"):
        parse_linear_kind(kind)


def test_gptq_follows_the_linear_family():
    Config(linear="fp8-row", gptq_tokens=512).validate()
    with pytest.raises(ValueError, match="gptq_tokens"):
        Config(linear="qat6-g64", gptq_tokens=512).validate()


def test_export_fill_needs_a_starting_k_and_no_fit():
    Config(export_fill=True, export_clip_sigmas=12.85).validate()
    for fields in (dict(export_fill=True), dict(export_fill=True, export_clip_sigmas=12.85, export_fit=True)):
        with pytest.raises(ValueError, match="export_fill needs export_clip_sigmas > 0.*export_fit off"):
            Config(**fields).validate()
    with pytest.raises(ValueError, match="export_entropy_coder='zip'"):
        Config(export_entropy_coder="zip").validate()
