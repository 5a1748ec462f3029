"""The whole contest run in one call: data → training → pre-export val_bpb → artifact (quantize, compress,
count bytes, 16 MB guard) → roundtrip val_bpb of the model reloaded from disk → summary.json → submission.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tgolf.config import Config
from tgolf.model import build_model, count_parameters
from tgolf.train import distributed
from tgolf.train.distributed import DistEnv
from tgolf.train.logging import RunLogger
from tgolf.train.loop import Trainer, autocast_context


# Code bytes the export fit allows for modules the run imports after it (its code is counted at the end; on a
# smoke run with TTT the final count equalled the estimate without this slack).
FIT_CODE_SLACK = 4096


def resolve_data(cfg: Config, env: DistEnv, logger: RunLogger) -> tuple[str, str]:
    """The shards folder and tokenizer; without DATA_PATH, the embedded default corpus (prepared once, cached)."""
    if cfg.data_path:
        tokenizer = cfg.tokenizer_path or str(Path(cfg.data_path) / "tokenizer.model")
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer_path {tokenizer!r} does not exist (set TOKENIZER_PATH or --tokenizer-path)")
        return cfg.data_path, tokenizer
    from tgolf.data.corpus import prepare_default_data

    cache = Path(cfg.out_dir) / "default_data"
    if env.is_main:
        logger.log(f"no DATA_PATH: preparing the embedded default corpus (Python standard library sources) in {cache}")
        paths = prepare_default_data(cache, vocab_size=cfg.vocab_size)
    distributed.barrier()
    if not env.is_main:
        paths = prepare_default_data(cache, vocab_size=cfg.vocab_size)  # cached by now: only reads
    return str(paths[0]), str(paths[1])


def hardware_name(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size}x {torch.cuda.get_device_name(device)}"
    return f"{world_size}x CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def gptq_hessians(cfg: Config, model: torch.nn.Module, loader: Any, accum: int, env: DistEnv
                  ) -> dict[str, torch.Tensor]:
    """Input second moments of the model's dense linears (and of a tied embedding as the output head) on
    ``cfg.gptq_tokens`` tokens, averaged over ranks: fresh training tokens from ``loader``, or with
    ``gptq_calibration="self"`` sequences the model samples (tgolf.export.calibration; ``loader`` unused).
    Measured on a copy with the reference MLP, whose linears run as modules (a fused MLP's do not)."""
    from dataclasses import replace

    from tgolf.export.gptq import collect_hessians
    from tgolf.export.quantize import SMALL_NUMEL, unwrap_model

    dense = build_model(replace(cfg, mlp="reference", linear="bf16")).to(env.device)
    dense.load_state_dict(unwrap_model(model).state_dict())
    with autocast_context(env.device):  # the activations the trained model sees: bf16 on GPUs, as in training
        if cfg.gptq_calibration == "self":
            from tgolf.config import parse_temperatures
            from tgolf.export.calibration import self_generated_batches

            sequences = -(-cfg.gptq_tokens // cfg.gptq_self_seq_len)
            if sequences < env.world_size:
                raise ValueError(f"config field gptq_tokens={cfg.gptq_tokens}: {sequences} sampled sequences of "
                                 f"gptq_self_seq_len={cfg.gptq_self_seq_len} tokens cannot give each of the "
                                 f"{env.world_size} ranks one")
            batches = self_generated_batches(dense, cfg.gptq_tokens, cfg.gptq_self_seq_len,
                                             parse_temperatures(cfg.gptq_self_temperatures), cfg.seed,
                                             rank=env.rank, world_size=env.world_size)
        else:
            micro_tokens = cfg.train_batch_tokens // accum  # over all ranks, as in a training micro-step
            batches = (loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, accum, env.device)
                       for _ in range(-(-cfg.gptq_tokens // micro_tokens)))
        # A tied embedding is also the output head: GPTQ it for that use (its input: the final hidden states).
        head = {"tok_emb.weight": lambda m, x: m.hidden_states(x)} if cfg.tie_embeddings else {}
        hessians = collect_hessians(dense, batches, min_numel=SMALL_NUMEL, inputs_of=head)
    names = sorted(hessians)
    distributed.average([hessians[name] for name in names])
    return {name: hessians[name] for name in names}


def calibration_overrun(cfg: Config, train_seconds: float, gptq_seconds: float) -> str | None:
    """A warning when training and GPTQ's reading of training data together passed the time budget (the contest
    counts both as training), else None."""
    over = train_seconds + gptq_seconds - cfg.max_wallclock_seconds
    if cfg.gptq_calibration != "train" or cfg.max_wallclock_seconds <= 0 or over <= 0:
        return None
    return (f"warning: training ({train_seconds:.1f}s) and GPTQ's reading of training data ({gptq_seconds:.1f}s) "
            f"took {over:.1f}s more than max_wallclock_seconds={cfg.max_wallclock_seconds:g}, and the contest counts "
            "both as training: raise --gptq-reserve-seconds, or calibrate on sampled text (--gptq-calibration self)")


def export(cfg: Config, model: torch.nn.Module, path: Path, hessians: dict | None, logger: RunLogger,
           fit_code_bytes: int | None = None) -> tuple[Any, tuple[str, str, float]]:
    """The artifact (its code bytes are counted later, once the roundtrip has imported everything), and the
    schemes of the matrices and the MLP matrices it has and their SDClip K: the configured ones, or with
    ``export_fit`` the first of fewer bits that fit beside ``fit_code_bytes`` of code (default: this process's
    code, estimated), or with ``export_fill`` the K that fills the limit best beside that code."""
    from tgolf.export import CodeBytes, write_artifact
    from tgolf.export.quantize import CLIP_SEARCH_QUANTILES, part_clip_sigmas, part_lowrank_ranks, part_schemes

    options = dict(compressor=cfg.compressor, hessians=hessians, code=CodeBytes(total=0, files=()),
                   clip_search=CLIP_SEARCH_QUANTILES if cfg.export_clip_search else (),
                   lowrank_ranks=part_lowrank_ranks(model, cfg.export_lowrank_rank, cfg.export_lowrank_embed_rank),
                   lowrank_scheme=cfg.export_lowrank_scheme,
                   clip_sigmas=part_clip_sigmas(model, cfg.export_clip_sigmas, cfg.export_embed_clip_sigmas),
                   entropy_coder=cfg.export_entropy_coder)
    schemes = part_schemes(model, cfg.export_embed_scheme, cfg.export_mlp_scheme)
    if not (cfg.export_fit or cfg.export_fill):
        info = write_artifact(path, model, cfg.to_dict(), scheme=cfg.export_scheme, overwrite=True, schemes=schemes,
                              **options)
        return info, (cfg.export_scheme, cfg.export_mlp_scheme or cfg.export_scheme, cfg.export_clip_sigmas)
    code = estimated_code_bytes(cfg) if fit_code_bytes is None else fit_code_bytes
    if cfg.export_fill:
        from tgolf.export.fill import write_filling_artifact

        del options["clip_sigmas"]  # fill chooses the matrices' K
        info, k = write_filling_artifact(path, model, cfg.to_dict(), scheme=cfg.export_scheme, schemes=schemes,
                                         sigmas=cfg.export_clip_sigmas, embed_sigmas=cfg.export_embed_clip_sigmas,
                                         limit=cfg.max_artifact_bytes, code_bytes=code, log=logger.log, **options)
        return info, (cfg.export_scheme, cfg.export_mlp_scheme or cfg.export_scheme, k)
    from tgolf.export.fit import write_fitting_artifact

    info, other, mlp = write_fitting_artifact(path, model, cfg.to_dict(), scheme=cfg.export_scheme,
                                              mlp_scheme=cfg.export_mlp_scheme, embed_scheme=cfg.export_embed_scheme,
                                              limit=cfg.max_artifact_bytes, code_bytes=code, log=logger.log, **options)
    return info, (other, mlp, cfg.export_clip_sigmas)


def estimated_code_bytes(cfg: Config) -> int:
    """The run's code bytes, counted before the evaluation has imported all of its modules."""
    from tgolf.export import count_code_bytes

    # imported now, so that the estimate counts them
    if cfg.export_lowrank_rank or cfg.export_lowrank_embed_rank:
        import tgolf.export.lowrank  # noqa: F401
    if cfg.export_entropy_coder == "rans":
        import tgolf.export.rans  # noqa: F401
    if cfg.export_fill:
        import tgolf.export.fill  # noqa: F401
    if cfg.ttt_enabled:
        import tgolf.eval.ttt  # noqa: F401
        if cfg.ttt_mode == "lora":
            import tgolf.eval.lora_ttt  # noqa: F401
    return count_code_bytes(pack=cfg.code_pack, config=cfg.to_dict()).total + FIT_CODE_SLACK


def score_first_ttt(cfg: Config, model: torch.nn.Module, val_tokens: torch.Tensor, tables: Any, env: DistEnv,
                    logger: RunLogger, roundtrip: dict) -> Any:
    """The roundtrip model scored while adapted to the val tokens already scored (tgolf.eval.ttt, or per document:
    tgolf.eval.lora_ttt); full TTT adapts the model in place."""
    from tgolf.eval.ttt import evaluate_configured_ttt

    result = evaluate_configured_ttt(cfg, model, val_tokens, cfg.eval_seq_len or cfg.train_seq_len,
                                     cfg.val_batch_size, tables, env.device, rank=env.rank,
                                     world_size=env.world_size, stride=cfg.eval_stride, log=logger.log)
    logger.log(f"ttt val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} (gain "
               f"{result.val_bpb - roundtrip['val_bpb']:+.4f}) {cfg.ttt_mode}: adapted on {result.adapted_chunks} "
               f"of {result.chunks} {result.unit}, eval_time:{1000 * result.seconds:.0f}ms "
               f"(training {1000 * result.adapt_seconds:.0f}ms)")
    return result


def run(cfg: Config) -> dict[str, Any]:
    from tgolf.data.loader import TokenLoader, load_val_tokens
    from tgolf.data.tokenizer import build_byte_tables
    from tgolf.eval.bpb import evaluate
    from tgolf.export import BudgetExceeded, check_budget, count_code_bytes, load_artifact
    from tgolf.export.compress import check_available

    check_available(cfg.compressor)  # fail now, not after training
    if cfg.submission_dir:  # imported now, so that the code bytes counted before it is called include it
        from tgolf.export.submission import write_submission

    wall_start = time.perf_counter()
    env = distributed.setup(cfg.device)
    run_dir = Path(cfg.out_dir) / cfg.run_id
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    logger = RunLogger(run_dir / "train.log", enabled=env.is_main)
    trainer: Trainer | None = None
    try:
        torch.manual_seed(cfg.seed)
        data_path, tokenizer_path = resolve_data(cfg, env, logger)
        tables = build_byte_tables(tokenizer_path, cfg.vocab_size)
        eval_seq_len = cfg.eval_seq_len or cfg.train_seq_len
        val_tokens = load_val_tokens(data_path, eval_seq_len, cfg.val_tokens_limit, cfg.vocab_size)
        loader = TokenLoader(data_path, env.rank, env.world_size, seed=cfg.seed, vocab_size=cfg.vocab_size)

        model = build_model(cfg).to(env.device)
        params = count_parameters(model)
        logger.log(f"run {cfg.run_id}: {params:,} parameters, device {hardware_name(env.device, env.world_size)}, "
                   f"data {data_path}, tokenizer {tokenizer_path}, val tokens {val_tokens.numel() - 1:,}")
        logger.log("config: " + json.dumps(cfg.to_dict(), sort_keys=True))

        def validate(m: torch.nn.Module, stride: int = 0) -> dict:
            result = evaluate(m, val_tokens, eval_seq_len, cfg.val_batch_size, tables, env.device,
                              rank=env.rank, world_size=env.world_size, stride=stride)
            return {"val_loss": result.val_loss, "val_bpb": result.val_bpb, "val_tokens": result.tokens,
                    "val_bytes": result.bytes, "eval_seconds": result.seconds}

        trainer = Trainer(cfg, env, model, loader, logger, validate, run_dir)
        if cfg.resume:
            trainer.resume(cfg.resume)
        else:
            trainer.warmup()
        if cfg.gptq_reserve_seconds > 0 and cfg.max_wallclock_seconds > 0:
            logger.log(f"training budget {cfg.train_budget_seconds():.1f}s: max_wallclock_seconds "
                       f"{cfg.max_wallclock_seconds:g} less gptq_reserve_seconds {cfg.gptq_reserve_seconds:g}")
        result = trainer.run()
        trainer.load_average()
        trainer.close()  # DDP's gradient buckets are not needed for evaluation and export
        distributed.check_replicas_agree(model, env.device)
        if env.enabled:
            logger.log(f"all {env.world_size} ranks agree on the trained parameters")
        peak_mem = torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else 0
        if cfg.save_trained and env.is_main:
            from tgolf.export.trained import save_trained

            save_trained(run_dir / "trained.pt", model, cfg)
            logger.log(f"trained weights saved to {run_dir / 'trained.pt'} (python -m tgolf.export re-exports them)")

        pre = validate(model, cfg.eval_stride)
        logger.log(f"pre-export val_loss:{pre['val_loss']:.4f} val_bpb:{pre['val_bpb']:.4f} "
                   f"eval_time:{1000 * pre['eval_seconds']:.0f}ms")

        hessians, gptq_seconds = None, 0.0
        if cfg.gptq_tokens:
            start = time.perf_counter()
            hessians = gptq_hessians(cfg, model, loader, trainer.accum, env)
            gptq_seconds = time.perf_counter() - start
            source = ("tokens sampled by the model at temperatures " + cfg.gptq_self_temperatures
                      if cfg.gptq_calibration == "self" else "training tokens")
            logger.log(f"gptq: input second moments of {len(hessians)} matrices on {cfg.gptq_tokens:,} {source} "
                       f"in {1000 * gptq_seconds:.0f}ms")
            overrun = calibration_overrun(cfg, result.train_seconds, gptq_seconds)
            if overrun:
                logger.log(overrun)
        artifact_path = run_dir / "model.tgolf"
        exported: tuple | BudgetExceeded | None = None
        if env.is_main:
            try:
                exported = export(cfg, model, artifact_path, hessians, logger)
            except BudgetExceeded as exc:  # raised on every rank below: the others wait in the broadcast
                exported = exc
        exported = distributed.broadcast_object(exported)  # the other ranks read the artifact once it is written
        if isinstance(exported, BudgetExceeded):
            raise exported
        info, (export_scheme, mlp_scheme, clip_sigmas) = exported
        roundtrip_model, _ = load_artifact(artifact_path, env.device)
        post = validate(roundtrip_model, cfg.eval_stride)
        logger.log(f"roundtrip val_loss:{post['val_loss']:.4f} val_bpb:{post['val_bpb']:.4f} "
                   f"(gap {post['val_bpb'] - pre['val_bpb']:+.4f}) eval_time:{1000 * post['eval_seconds']:.0f}ms")
        ttt = score_first_ttt(cfg, roundtrip_model, val_tokens, tables, env, logger, post) if cfg.ttt_enabled else None
        if env.is_main:  # every module the run needs is imported by now (the roundtrip's kernels too): its code
            info = info.with_code(count_code_bytes(pack=cfg.code_pack, config=cfg.to_dict()))
            packed = (f"packed script, {info.code_bytes_raw:,} B as files" if info.code_pack != "none"
                      else info.code_not_packed or "as files")
            logger.log(f"artifact {artifact_path}: model {info.model_bytes:,} B ({info.compressor}, codes "
                       f"{info.entropy_coder}) + code "
                       f"{info.code_bytes:,} B ({packed}) = {info.artifact_bytes:,} B (limit "
                       f"{cfg.max_artifact_bytes:,})")
        info = distributed.broadcast_object(info)

        summary = {
            "run_id": cfg.run_id,
            "val_bpb": pre["val_bpb"], "val_loss": pre["val_loss"],
            "val_tokens": pre["val_tokens"], "val_bytes": pre["val_bytes"],
            "roundtrip_val_bpb": post["val_bpb"], "roundtrip_val_loss": post["val_loss"],
            "quantization_gap_bpb": post["val_bpb"] - pre["val_bpb"],
            "artifact_bytes": info.artifact_bytes, "code_bytes": info.code_bytes, "model_bytes": info.model_bytes,
            "code_pack": info.code_pack, "code_bytes_raw": info.code_bytes_raw,
            "compressor": info.compressor, "entropy_coder": info.entropy_coder,
            "export_scheme": export_scheme, "export_mlp_scheme": mlp_scheme, "export_clip_sigmas": clip_sigmas,
            "artifact_path": str(artifact_path),
            "gptq_tensors": len(hessians or {}), "gptq_seconds": gptq_seconds,
            "params": params, "steps": result.steps, "stopped_by": result.stopped_by,
            "late_qat_step": result.switch_steps.get("late_qat"),
            "recurrence_step": result.switch_steps.get("recurrence"),
            "train_seconds": result.train_seconds,
            "tokens_per_second": result.tokens / result.train_seconds if result.train_seconds > 0 else 0.0,
            "step_ms": 1000 * result.train_seconds / max(result.steps, 1),
            **{f"ttt_{name}": getattr(ttt, name) if ttt else None
               for name in ("val_bpb", "val_loss", "seconds", "chunks", "adapted_chunks")},
            "eval_seconds": pre["eval_seconds"] + post["eval_seconds"] + (ttt.seconds if ttt else 0.0),
            "peak_memory_bytes": peak_mem,
            "wall_seconds": time.perf_counter() - wall_start,
            "hardware": hardware_name(env.device, env.world_size), "world_size": env.world_size,
            "torch": torch.__version__, "val_history": result.val_history,
            "data_path": data_path, "tokenizer_path": tokenizer_path,
            "config": cfg.to_dict(),
        }
        if env.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            check_budget(info, cfg.max_artifact_bytes)  # fails loudly before any submission is written
            if cfg.submission_dir:
                write_submission(cfg.submission_dir, summary, run_dir / "train.log", cfg.to_dict(),
                                 name=cfg.run_id, code_files=[f for f, _ in info.code_files])
                logger.log(f"submission written to {cfg.submission_dir}")
            after_ttt = f" ttt_val_bpb:{ttt.val_bpb:.4f}" if ttt else ""
            logger.log(f"final val_bpb:{summary['val_bpb']:.4f} roundtrip_val_bpb:{summary['roundtrip_val_bpb']:.4f}"
                       f"{after_ttt} artifact_bytes:{summary['artifact_bytes']:,} summary {run_dir / 'summary.json'}")
        return summary
    finally:
        logger.close()
        if trainer is not None:  # also when training stopped with an error: DDP goes before its group (see close)
            trainer.close()
        distributed.teardown()
