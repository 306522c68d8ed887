# Sourced by gpu_check.sh and gpu_train.sh: steps run in priority order under one deadline.
# Needs START (epoch seconds), DEADLINE (seconds), OUT, LOG and TABLE; a step appends a line to
# $TABLE, its output to $LOG and its last TAIL (20) lines to $OUT/.tails.

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS CMD...: run CMD for at most MAX_SECONDS, less if the deadline is nearer.
# At the limit CMD gets SIGINT (train.py then saves its step) and SIGKILL 30 s later.
step() {
  local name=$1 max=$2; shift 2
  local l; l=$(left)
  if (( l < 20 )); then printf '%-16s skipped (%ss left)\n' "$name" "$l" >> "$TABLE"; return 1; fi
  (( max > l )) && max=$l
  local t0; t0=$(date +%s)
  echo "===== $name: $*" >> "$LOG"
  timeout --signal=INT --kill-after=30 "$max" "$@" > "$OUT/.step" 2>&1
  local rc=$?
  cat "$OUT/.step" >> "$LOG"
  local verdict=ok; (( rc != 0 )) && verdict="FAILED rc=$rc"; (( rc == 124 )) && verdict="TIMED OUT"
  printf '%-16s %-14s %4ss  limit %ss\n' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "$max" >> "$TABLE"
  { echo "--- $name"; tail -n "${TAIL:-20}" "$OUT/.step"; } >> "$OUT/.tails"
  return $rc
}
