#!/bin/sh
# Plot.RendersRunMetrics: `foremoe plot` on small fake runs.
#   plot_test.sh <path to the foremoe executable>
# An RL run (rl_step + eval lines, an unknown kind, unknown keys, a null value)
# must give reward / kl_entropy / timing / expert_load / imbalance PNGs and no loss.png; an
# SFT run gives loss.png only; an empty metrics file is fine; a missing run
# directory and a malformed line fail with exit 1 and a message naming the file
# and line. Exits 77 (ctest SKIP_RETURN_CODE) when no Python with matplotlib is
# found: install the Debian package python3-matplotlib.
set -u
FOREMOE=$1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/foremoe_plot_test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# A PNG file starts with the 8 bytes 89 50 4E 47 0D 0A 1A 0A.
is_png() {
  [ -s "$1" ] && [ "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ]
}

# --- an RL run; the run directory name has a space to exercise argument passing
RL="$TMP/rl run"
mkdir -p "$RL"
{
  echo '{"kind":"run","model":"tiny"}'
  for s in 1 2 3 4 5 6; do
    kl=0.00$s
    [ $s -eq 4 ] && kl=null # non-finite values are written as null
    echo "{\"kind\":\"rl_step\",\"step\":$s,\"reward_mean\":0.$s,\"accuracy\":0.$s,\"kl\":$kl,\"entropy\":0.8$s,\"pg_clipfrac\":0.01,\"grad_norm\":0.9,\"tokens_per_second\":812.0,\"timing_s\":{\"gen\":1.2,\"reward\":0.01,\"old_log_prob\":0.3,\"ref\":0.3,\"values\":0.0,\"adv\":0.001,\"update_critic\":0.0,\"update_actor\":0.9,\"step\":2.7},\"expert_load\":[[120,80,95,$((100 + s * 10))],[10,20,30,$s]],\"balance\":{\"update_actor\":{\"planner\":\"foresight\",\"micro_before\":[1.5,2.$s],\"micro_after\":[1.0,1.0$s]}},\"unknown_key\":{\"x\":[1,2]}}"
    [ $s -eq 3 ] && echo '{"kind":"eval","step":3,"accuracy":0.5,"mean_reward":0.5}'
  done
  echo '{"kind":"eval","step":6,"accuracy":0.62,"mean_reward":0.62}'
} >"$RL/metrics.jsonl"

"$FOREMOE" plot "$RL" >"$TMP/rl.log" 2>&1
rc=$?
if [ $rc -ne 0 ] && grep -q "python3-matplotlib" "$TMP/rl.log"; then
  echo "SKIP: no Python with matplotlib (apt-get install -y python3-matplotlib):"
  cat "$TMP/rl.log"
  exit 77
fi
[ $rc -eq 0 ] || fail "foremoe plot on an RL run exited $rc: $(cat "$TMP/rl.log")"
for name in reward kl_entropy timing expert_load imbalance; do
  is_png "$RL/plots/$name.png" || fail "RL run: $RL/plots/$name.png missing or not a PNG"
done
[ ! -e "$RL/plots/loss.png" ] || fail "RL run: loss.png written though no line has a loss"

# --- an SFT run (lines without "kind"), written to --out
SFT="$TMP/sft"
mkdir -p "$SFT"
cat >"$SFT/metrics.jsonl" <<'EOF'
{"step":0,"eval_examples":64,"accuracy":0.1,"mean_reward":0.1}
{"step":1,"loss":2.5,"lm_loss":2.5,"grad_norm":1.0,"lr":0.001}
{"step":2,"loss":2.1,"lm_loss":2.1,"grad_norm":1.0,"lr":0.001}
{"step":2,"eval_examples":64,"accuracy":0.4,"mean_reward":0.4}
EOF
"$FOREMOE" plot "$SFT" --out "$TMP/sft_plots" >"$TMP/sft.log" 2>&1 ||
  fail "foremoe plot on an SFT run failed: $(cat "$TMP/sft.log")"
is_png "$TMP/sft_plots/loss.png" || fail "SFT run: loss.png missing or not a PNG"
for name in reward kl_entropy timing expert_load imbalance; do
  [ ! -e "$TMP/sft_plots/$name.png" ] || fail "SFT run: $name.png written without RL steps"
done

# --- an empty metrics file plots nothing and succeeds
mkdir -p "$TMP/empty" && : >"$TMP/empty/metrics.jsonl"
"$FOREMOE" plot "$TMP/empty" >"$TMP/empty.log" 2>&1 ||
  fail "foremoe plot on an empty metrics file failed: $(cat "$TMP/empty.log")"

# --- bad input: exit 1 and a message naming what is wrong
"$FOREMOE" plot "$TMP/no_such_run" >"$TMP/missing.log" 2>&1
rc=$?
[ $rc -eq 1 ] || fail "missing run directory: exit $rc, expected 1"
grep -q "no_such_run: no such run directory" "$TMP/missing.log" ||
  fail "missing run directory: message was: $(cat "$TMP/missing.log")"

mkdir -p "$TMP/nometrics"
"$FOREMOE" plot "$TMP/nometrics" >"$TMP/nometrics.log" 2>&1
rc=$?
[ $rc -eq 1 ] || fail "missing metrics.jsonl: exit $rc, expected 1"
grep -q "metrics.jsonl: no metrics file" "$TMP/nometrics.log" ||
  fail "missing metrics.jsonl: message was: $(cat "$TMP/nometrics.log")"

mkdir -p "$TMP/bad"
printf '{"kind":"rl_step","step":1}\n{"kind":"rl_step",\n' >"$TMP/bad/metrics.jsonl"
"$FOREMOE" plot "$TMP/bad" >"$TMP/bad.log" 2>&1
rc=$?
[ $rc -eq 1 ] || fail "malformed line: exit $rc, expected 1"
grep -q "bad/metrics.jsonl:2: malformed JSON line" "$TMP/bad.log" ||
  fail "malformed line: message was: $(cat "$TMP/bad.log")"

if [ $failures -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "OK: RL, SFT, empty and bad-input runs"
