#!/usr/bin/env bash
# The second call of a GPU session, on the machine scripts/gpu_check.sh has just run on (still warm: its Triton,
# inductor and fla caches make a benchmark case ~6 s instead of 12 s or more):
#
#   scripts/gpu_followup.sh [OUT_DIR [SHARDS_DIR]]
#
# Within GPU_FOLLOWUP_SECONDS (default 230), first what is measured once: per-document LoRA TTT on the check's
# artifact and SHARDS_DIR (lora_ttt.json); its trained weights exported again without and with low-rank corrections
# (lowrank-*.log); what the entropy coder saves on those artifacts (measure_codes.json); a few profiled steps with
# depth recurrence and parallel lanes (profile-recurrence-lanes/), and with CUDA graphs (profile-cuda-graphs/).
# Then, where torch lacks the fix of pytorch#179423, a few profiled baseline steps with inductor's mix-order
# reductions on (profile-mix-order-on/: the check trained with them off, see tgolf.train.loop.inductor_options);
# the contest benchmarks still missing
# (`tgolf.bench --resume` into the check's own bench/); with what is left, the Triton GEMMs' tile search
# (`tgolf.bench.tune`, into tune/). The check's folder (${TMPDIR:-/tmp}/tgolf_gpu_check/profiles/<date>-<device>)
# is updated in place and comes back whole as OUT_DIR/gpu_followup.tar.gz (replace the committed folder with
# it), with summary.md, bench.md and tune.md beside it. The wheels the check installed stay on its PYTHONPATH.
#
# GPU_CHECK_DEVICE=cpu rehearses it after a CPU rehearsal of the check (tests/test_gpu_check.py).
# Exit status 0 when every step that ran succeeded, 1 when one failed or timed out, 2 when there is no check to
# follow up.
set -u -o pipefail
OUT_DIR=$(realpath -m "${1:-${OUT:-gpu_check_out}}")
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${GPU_FOLLOWUP_SECONDS:-230}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SKIP=" ${GPU_CHECK_SKIP:-} "
DATA=${2:-}
case $DEVICE in
  cuda) BENCH_ARGS=(--shapes contest --device cuda); TUNE_ENV=(); RUN_ARGS=(--preset baseline); AB_LIMIT=100
    EVAL_ARGS=(); LOOP_ARGS=(--recur-layers 3-5 --parallel-last-n 3) ;;
  cpu) BENCH_ARGS=(--shapes quick --device cpu --no-compile); TUNE_ENV=(TRITON_INTERPRET=1)
    RUN_ARGS=(--preset smoke --device cpu --compile off); AB_LIMIT=60; EVAL_ARGS=(--device cpu)
    LOOP_ARGS=(--recur-layers 1 --parallel-last-n 2) ;;
  *) echo "GPU_CHECK_DEVICE=$DEVICE: expected cuda or cpu" >&2; exit 2 ;;
esac
T0=$(date +%s)
export PYTHONUNBUFFERED=1
STAGE=${TMPDIR:-/tmp}/tgolf_gpu_check
DIR=$(find "$STAGE/profiles" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n 1)
if [[ -z $DIR || ! -f $DIR/bench/bench.json ]]; then
  echo "gpu_followup: no check to follow up under $STAGE/profiles (run scripts/gpu_check.sh first, on this machine)" >&2
  exit 2
fi
[[ -d $STAGE/site ]] && export PYTHONPATH=$STAGE/site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT_DIR" || exit 1
# shellcheck source=gpu_steps.sh
source scripts/gpu_steps.sh

log "tgolf GPU follow-up → $DIR (budget ${BUDGET}s)"
# exit status 0: this torch lacks the cap on mix-order reductions, so the check ran with them off
$PY -c "import sys, torch._inductor.config as c; sys.exit(hasattr(c.triton, 'mix_order_reduction_max_reads'))" \
  2>/dev/null || AB_LIMIT=0
# Per-document LoRA TTT on the artifact the check trained: its time on a GPU and its gain over the roundtrip
# val_bpb in the check's train/baseline/summary.json.
ARTIFACT=$DIR/train/baseline/model.tgolf
if [[ -f $ARTIFACT && -n $DATA ]]; then
  step lora-ttt 60 lora-ttt.log $PY -m tgolf.eval --artifact "$ARTIFACT" --data "$DATA" "${EVAL_ARGS[@]}" \
    --ttt-enabled --ttt-mode lora --out "$DIR/lora_ttt.json"
else
  skipped lora-ttt "no artifact from the check's training, or no shards given" lora-ttt.log
fi
# Low-rank corrections at the baseline's shapes: the weights the check trained, exported again with int6 matrices and
# embedding and GPTQ, with no correction, a rank-8 one on the embedding, and rank-8 ones on the other matrices (bytes
# and roundtrip val_bpb: the last line of each log). Its trained.pt (68 MB) stays out of the archive, which leaves
# out files over 8 MB.
TRAINED=$DIR/train/baseline/trained.pt
for cell in none:0:0 embed8:0:8 matrices8:8:0; do
  IFS=: read -r name rank embed_rank <<<"$cell"
  if [[ -f $TRAINED && -n $DATA ]]; then
    step lowrank-$name 60 lowrank-$name.log $PY -m tgolf.export --trained "$TRAINED" --data "$DATA" \
      --out "$STAGE/lowrank-$name.tgolf" --overwrite --score --val-tokens-limit 4194304 --export-scheme int6 \
      --export-embed-scheme int6 --gptq-tokens 65536 --export-lowrank-rank "$rank" \
      --export-lowrank-embed-rank "$embed_rank" "${EVAL_ARGS[@]}"
  else
    skipped lowrank-$name "no trained weights from the check's training, or no shards given" lowrank-$name.log
  fi
done
# What the rANS coder saves on weights trained on a GPU (tgolf.export.measure_codes): the check's int8 artifact
# and the int6 GPTQ one just exported, per matrix and for the whole file, with and without the coder.
MEASURED=()
for candidate in "$ARTIFACT" "$STAGE/lowrank-none.tgolf"; do [[ -f $candidate ]] && MEASURED+=("$candidate"); done
if ((${#MEASURED[@]})); then
  step measure-codes 90 measure-codes.log $PY -m tgolf.export.measure_codes "${MEASURED[@]}" \
    --json "$DIR/measure_codes.json"
else
  skipped measure-codes "no artifact from the check's training or the low-rank exports" measure-codes.log
fi
# The step time of depth recurrence (layers 3-5 twice: 12 blocks run for 9) with parallel lanes in the last 3
# layers and MuonEq-R, against the check's profile of the plain baseline (profile/profile.md).
step profile-recurrence-lanes 60 profile-recurrence-lanes.log env TORCHINDUCTOR_CACHE_DIR="$STAGE/inductor" \
  $PY -m tgolf.profile "${RUN_ARGS[@]}" ${DATA:+--data-path "$DATA"} "${LOOP_ARGS[@]}" --muon-row-normalize \
  --steps 3 --warmup 2 --no-charts --out "$DIR/profile-recurrence-lanes"
# The same steps replayed from CUDA graphs (--cuda-graphs), against the check's profile: does the step's idle time
# (host launches) go? A GPU question only.
if [[ $DEVICE == cuda ]]; then
  step profile-cuda-graphs 60 profile-cuda-graphs.log env TORCHINDUCTOR_CACHE_DIR="$STAGE/inductor" \
    $PY -m tgolf.profile "${RUN_ARGS[@]}" ${DATA:+--data-path "$DATA"} --cuda-graphs --steps 3 --warmup 2 \
    --no-charts --out "$DIR/profile-cuda-graphs"
else
  skipped profile-cuda-graphs "CUDA graphs need a GPU" profile-cuda-graphs.log
fi
# The A/B profile of inductor's mix-order reductions, then the benchmark cases still missing (`tgolf.bench --resume`
# into the check's bench/, three quarters of what is left; 40 s of it is the margin for the case in flight when the
# time budget passes), then the tile search. They come after the quality steps above: those are measured once,
# while the check resumes the benchmarks from the last committed run of the same GPU model in every session.
if ((AB_LIMIT > 0)); then
  step profile-mix-order-on "$AB_LIMIT" profile-mix-order-on.log env TORCHINDUCTOR_CACHE_DIR="$STAGE/inductor" \
    $PY -m tgolf.profile "${RUN_ARGS[@]}" ${DATA:+--data-path "$DATA"} --mix-order-reduction on --steps 3 --warmup 2 \
    --no-charts --out "$DIR/profile-mix-order-on"
else
  skipped profile-mix-order-on "torch has the fix of pytorch#179423: nothing to compare" profile-mix-order-on.log
fi
limit=$(((BUDGET - ($(date +%s) - T0)) * 3 / 4))
step bench-resume "$limit" bench-resume.log $PY -m tgolf.bench "${BENCH_ARGS[@]}" --resume "$DIR/bench" \
  --out "$DIR/bench" --time-budget $((limit > 41 ? limit - 40 : 1))
left=$((BUDGET - ($(date +%s) - T0) - 20))
step tune "$left" tune.log env "${TUNE_ENV[@]}" $PY -m tgolf.bench.tune --device "$DEVICE" --out "$DIR/tune" \
  --time-budget $((left > 31 ? left - 30 : 1))
archive "$(cat "$DIR/total.txt" 2>/dev/null || echo "? (check)") + $(($(date +%s) - T0)) (follow-up)" gpu_followup \
  bench/bench.md tune/tune.md profile-mix-order-on/profile.md
