#!/bin/sh
# Launch.ExpertParallelGloo: expert parallelism through real processes. `foremoe launch
# --nproc W -- ep-check --backend gloo` (W = 2 and 4, one Gloo process per rank) and
# `ep-check --backend inprocess --ranks 4` (threads) must match the single-rank model of the
# tiny preset with uneven routing (loss, log-probs, gradients, grad norm, parameters after
# AdamW steps, within fp32 tolerance) and print one "ok" line per rank; the checker's self-test
# (--perturb-rank 1 scales rank 1's expert weights) must fail with MISMATCH.
#   ep_launch_test.sh <path to the foremoe executable>
# Exits 77 (ctest SKIP_RETURN_CODE) when foremoe was built without Gloo: install Debian's
# libgloo-dev (e.g. `make deps`) and reconfigure.
set -u
FOREMOE=$1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/foremoe_ep_launch_test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# run <name> <foremoe args...>: sets rc; stdout and stderr together in $TMP/<name>.log.
run() {
  name=$1
  shift
  "$FOREMOE" "$@" >"$TMP/$name.log" 2>&1
  rc=$?
}

# expect_ok <name> <W>: exit 0, W "ok" rank lines, an expert without tokens, the summary.
expect_ok() {
  [ $rc -eq 0 ] || fail "$1: exited $rc: $(cat "$TMP/$1.log")"
  for r in $(seq 0 $(($2 - 1))); do
    grep -q "^ep-check rank $r/$2 .* ok$" "$TMP/$1.log" ||
      fail "$1: no ok line for rank $r in: $(cat "$TMP/$1.log")"
  done
  grep -q "^ep-check: router load, MoE layer 0: .*no tokens for expert [0-9]" "$TMP/$1.log" ||
    fail "$1: no expert without tokens reported in: $(cat "$TMP/$1.log")"
  grep -q "^ep-check: $2 ranks match the single-rank model: ok" "$TMP/$1.log" ||
    fail "$1: no summary line in: $(cat "$TMP/$1.log")"
  grep "^ep-check rank" "$TMP/$1.log"
}

# --- two and four Gloo processes
run gloo2 launch --nproc 2 --timeout-s 240 -- ep-check --backend gloo --steps 2 --timeout-s 120
if [ $rc -ne 0 ] && grep -q "no Gloo backend" "$TMP/gloo2.log"; then
  echo "SKIP: this foremoe build has no Gloo backend (install Debian's libgloo-dev and" \
    "reconfigure): $(grep "no Gloo backend" "$TMP/gloo2.log" | head -n 1)"
  exit 77
fi
expect_ok gloo2 2
run gloo4 launch --nproc 4 --timeout-s 240 -- ep-check --backend gloo --steps 2 --timeout-s 120
expect_ok gloo4 4

# --- four in-process ranks (threads), another seed and batch size
run inproc4 ep-check --backend inprocess --ranks 4 --seed 5 --tokens-per-rank 9 --steps 1
expect_ok inproc4 4

# --- the checker's self-test: rank 1's perturbed expert weights must be caught
run perturb launch --nproc 2 --timeout-s 240 -- ep-check --backend gloo --steps 0 \
  --perturb-rank 1 --timeout-s 120
[ $rc -ne 0 ] || fail "--perturb-rank 1: exited 0: $(cat "$TMP/perturb.log")"
grep -q "^ep-check rank 1/2 .* MISMATCH$" "$TMP/perturb.log" ||
  fail "--perturb-rank 1: no MISMATCH line for rank 1 in: $(cat "$TMP/perturb.log")"
grep -q "ep-check: MISMATCH: rank(s) \\([0-9]*, \\)*1 of 2 differ from the single-rank model" \
  "$TMP/perturb.log" || fail "--perturb-rank 1: no MISMATCH summary in: $(cat "$TMP/perturb.log")"

# --- bad use: gloo without rank variables, --ranks with gloo
run nolaunch ep-check --backend gloo
[ $rc -eq 1 ] && grep -q "run it as \`foremoe launch --nproc N -- ep-check\`" "$TMP/nolaunch.log" ||
  fail "gloo without launch: exit $rc: $(cat "$TMP/nolaunch.log")"

if [ $failures -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "OK: ep-check matches the single-rank model on 2 and 4 Gloo processes and 4 threads;" \
  "a perturbed rank is reported as MISMATCH"
