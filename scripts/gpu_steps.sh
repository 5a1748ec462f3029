# Shared by scripts/gpu_check.sh and scripts/gpu_followup.sh (sourced, not run): time-limited steps recorded in
# $DIR/steps.tsv, and the archive that comes back from the GPU machine.
#
# The caller sets: PY (python), DIR (the run's folder under $STAGE/profiles), STAGE, OUT_DIR, T0 (start, epoch
# seconds), BUDGET (seconds from T0 for every step together) and SKIP (" name name ", steps to leave out).

log() { echo "$*" | tee -a "$DIR/check.log"; }

# Compile caches, kept from one GPU session to the next: a bare machine spends much of the check compiling (the
# first H100 run's pytest step mostly compiled Triton kernels; a benchmark case took ~12 s cold, ~6 s warm).
# Triton's kernels and autotuning results, and inductor's caches: the training's own folder ($STAGE/inductor,
# whose generated source the check archives) and one for everything else. scripts/gpu_check.sh unpacks an earlier
# session's archive (GPU_CHECK_CACHE); archive() below writes this session's as $OUT_DIR/compile_cache.tar.gz.
export TRITON_CACHE_DIR=$STAGE/triton TRITON_CACHE_AUTOTUNING=1 TORCHINDUCTOR_CACHE_DIR=$STAGE/inductor-shared
CACHE_LIMIT=$((16 * 1024 * 1024))  # the device tool brings back files of at most 16 MiB

save_caches() {
  local dirs=() name
  for name in triton inductor inductor-shared; do [[ -d $STAGE/$name ]] && dirs+=("$name"); done
  ((${#dirs[@]})) || return 0
  tar czf "$OUT_DIR/compile_cache.tar.gz" -C "$STAGE" "${dirs[@]}" 2>>"$DIR/check.log" || return 0
  local bytes
  bytes=$(stat -c %s "$OUT_DIR/compile_cache.tar.gz")
  if ((bytes > CACHE_LIMIT)); then
    log "compile caches: $bytes B, over the device tool's 16 MiB: left out"
    rm -f "$OUT_DIR/compile_cache.tar.gz"
  else
    log "compile caches: $bytes B in compile_cache.tar.gz (keep it as .gpu_cache/compile_cache.tar.gz; carry it)"
  fi
}

# skipped NAME WHY LOGFILE : record a step that did not run, and why.
skipped() {
  printf '%s\tskipped (%s)\t0\t%s\n' "$1" "$2" "$3" >>"$DIR/steps.tsv"
  log "== $1: skipped ($2)"
}

# step NAME LIMIT_S LOGFILE CMD... : run CMD under min(LIMIT_S, budget left), record status and seconds.
step() {
  local name=$1 limit=$2 logfile=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - T0)))
  if [[ $SKIP == *" $name "* ]]; then
    skipped "$name" GPU_CHECK_SKIP "$logfile"
    return
  elif ((left < 15)); then
    skipped "$name" "budget: ${left}s left" "$logfile"
    return
  fi
  ((limit > left)) && limit=$left
  log "== $name (limit ${limit}s): $*"
  local start=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$DIR/$logfile" 2>&1
  local rc=$? secs=$(($(date +%s) - start)) status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$logfile" >>"$DIR/steps.tsv"
  tail -n 4 "$DIR/$logfile" | sed 's/^/    /' | tee -a "$DIR/check.log"
}

# archive TOTAL_TEXT NAME FILE... : the compile caches, summary.md, then $OUT_DIR/NAME.tar.gz of the whole profiles
# tree (files over 8 MB left out and listed in large_files.txt: the archive must come back whole, 16 MiB at most)
# and copies of the few FILEs worth reading at once (the device tool returns at most 8 files); prints the summary;
# the exit status says whether every step that ran succeeded (skipped steps do not count).
archive() {
  local total=$1 name=$2
  shift 2
  save_caches
  $PY scripts/gpu_check_summary.py "$DIR" "$total" >"$DIR/summary.md" 2>>"$DIR/check.log"
  (cd "$STAGE" && find profiles -type f -size +8M -printf '%p\t%s bytes\n') >"$DIR/large_files.txt"
  tar czf "$OUT_DIR/$name.tar.gz" -C "$STAGE" -X <(cut -f1 "$DIR/large_files.txt") profiles
  local f
  for f in summary.md "$@"; do
    [[ -f "$DIR/$f" ]] && cp "$DIR/$f" "$OUT_DIR/"
  done
  cat "$DIR/summary.md"
  awk -F'\t' '$2 ~ /^(failed|timeout)/ { bad = 1 } END { exit bad }' "$DIR/steps.tsv"
}
