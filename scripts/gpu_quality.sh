#!/usr/bin/env bash
# Issue 6's quality comparison on one GPU: softmax, linear and hybrid attention, each trained for the same seconds
# at each context length given, on shards of the shared web text; val_bpb and tokens/s side by side
# (python -m tgolf.train.sweep).
#
#   scripts/gpu_quality.sh SHARDS_DIR [OUT_DIR] [LENGTHS]       (LENGTHS: comma-separated, default 1024,8192)
#
# QUALITY_SECONDS (default 45) training seconds per run. A run costs its seconds plus about 60 s of compilation and
# 20 s of export and evaluation (the first H100 check: 61 s to compile the baseline), so the three runs of one
# length fit one 10-minute device call. On the same warm machine, call with `1024` first, then with `1024,8192`:
# finished runs are kept under the stage and reused, so the second call runs only the three new ones and its table
# holds all six. GPU_QUALITY_BUDGET (default 560) bounds each call.
#
# Results: profiles/<date>-<device>-quality/ (env.json, sweep/ with every run's summary and log, sweep.md the table),
# archived as OUT_DIR/gpu_quality.tar.gz (unpack at the repository root) with sweep.md beside it.
# GPU_CHECK_DEVICE=cpu rehearses it on a machine without a GPU (smoke preset, a few steps; tests/test_gpu_check.py).
set -u -o pipefail
DATA=$(realpath -m "${1:?usage: scripts/gpu_quality.sh SHARDS_DIR [OUT_DIR] [LENGTHS]}")
OUT_DIR=$(realpath -m "${2:-${OUT:-gpu_quality_out}}")
LENGTHS=${3:-1024,8192}
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${GPU_QUALITY_BUDGET:-560}
SECONDS_PER_RUN=${QUALITY_SECONDS:-45}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SKIP=" ${GPU_CHECK_SKIP:-} "
case $DEVICE in
  cuda) RUN_ARGS=(--preset baseline --warmup-steps 3 --val-loss-every 0 --val-tokens-limit 4194304) ;;
  cpu) RUN_ARGS=(--preset smoke --device cpu --compile off --num-layers 2 --model-dim 32 --num-heads 2
                 --num-kv-heads 1 --train-batch-tokens 512 --val-batch-size 1024 --val-tokens-limit 2048
                 --iterations 3) ;;
  *) echo "GPU_CHECK_DEVICE=$DEVICE: expected cuda or cpu" >&2; exit 2 ;;
esac
T0=$(date +%s)
export PYTHONUNBUFFERED=1

SLUG=$($PY -m tgolf.profile.env --slug 2>/dev/null || echo "$(date -u +%F)-unknown")
STAGE=${TMPDIR:-/tmp}/tgolf_gpu_quality
DIR=$STAGE/profiles/$SLUG-quality
mkdir -p "$DIR" "$OUT_DIR" || exit 1
touch "$DIR/steps.tsv"
# shellcheck source=gpu_steps.sh
source scripts/gpu_steps.sh

log "tgolf quality comparison → $DIR (lengths $LENGTHS, ${SECONDS_PER_RUN}s per run, budget ${BUDGET}s)"
[[ -f $DIR/env.json ]] || $PY -m tgolf.profile.env --command "scripts/gpu_quality.sh $*" >"$DIR/env.json" \
  2>>"$DIR/check.log"
# The compressor is zlib: the runs compare training, and export time is not part of that comparison.
step "sweep-${LENGTHS//,/-}" $((BUDGET - 20)) "sweep-${LENGTHS//,/-}.log" $PY -m tgolf.train.sweep \
  --grid attention=softmax,linear,hybrid --grid "train_seq_len=$LENGTHS" --seconds "$SECONDS_PER_RUN" \
  --out "$DIR/sweep" -- --data-path "$DATA" --compressor zlib "${RUN_ARGS[@]}"
archive "$(($(date +%s) - T0)) (quality, lengths $LENGTHS)" gpu_quality sweep/sweep.md
