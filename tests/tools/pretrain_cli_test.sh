#!/bin/sh
# Pretrain.TextEndToEnd: `foremoe corpus synthetic` then `foremoe pretrain` on it, shrunk:
# the tokenizer trained into the run directory, metrics.jsonl, eval.jsonl (held-out loss,
# MaxVio_global, Gini, per-layer load), checkpoints; `--resume` continuing bit-identically;
# bad input failing with exit 1 and a message naming the file and key.
#   pretrain_cli_test.sh <path to the foremoe executable>
set -u
FOREMOE=$1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/foremoe_pretrain_test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

"$FOREMOE" corpus synthetic --lines 3000 --seed 5 --out "$TMP/text.txt" >/dev/null 2>&1 ||
  fail "foremoe corpus synthetic failed"
[ "$(wc -l <"$TMP/text.txt")" -eq 3000 ] || fail "synthetic corpus: expected 3000 lines"

write_config() {  # $1: file, $2: run dir, $3: extra top-level YAML
  cat >"$1" <<YAML
model: tiny
optimizer: {lr: 0.003, warmup_steps: 2, total_steps: 12}
train:
  seed: 3
  steps: 12
  micro_batches: 2
  sequences_per_micro_batch: 2
  seq_len: 32
  log_every: 4
  eval_every: 6
  eval_tokens: 1024
  eval_sequences: 4
  checkpoint_every: 6
  run_dir: $2
data:
  files: [$TMP/text.txt]
  valid_fraction: 0.1
  block_lines: 20
  vocab_size: 400
$3
YAML
}

write_config "$TMP/run.yaml" "$TMP/run" ""
"$FOREMOE" pretrain --config "$TMP/run.yaml" --threads 1 >"$TMP/run.log" 2>&1 ||
  fail "foremoe pretrain failed: $(tail -n 20 "$TMP/run.log")"
RUN="$TMP/run"
[ -s "$RUN/tokenizer.model" ] || fail "no tokenizer.model in the run directory"
grep -q "trained on 2700 training lines" "$TMP/run.log" ||
  fail "the tokenizer was not trained on the 2700 training lines: $(head -n 3 "$TMP/run.log")"
[ "$(grep -c '"step"' "$RUN/metrics.jsonl")" -eq 12 ] || fail "metrics.jsonl: expected 12 steps"
[ "$(wc -l <"$RUN/eval.jsonl")" -eq 2 ] || fail "eval.jsonl: expected evaluations at 6 and 12"
grep -q '"max_vio":\[' "$RUN/eval.jsonl" && grep -q '"gini":\[' "$RUN/eval.jsonl" &&
  grep -q '"load":\[\[' "$RUN/eval.jsonl" || fail "eval.jsonl lacks max_vio, gini or load"
grep -q '"tokens":1024' "$RUN/eval.jsonl" || fail "eval.jsonl: the held-out set is not 1024 tokens"
grep -q "^eval     12  held-out loss [0-9.]* over 1024 tokens  MaxVio_global" "$TMP/run.log" ||
  fail "no held-out line for step 12: $(tail -n 5 "$TMP/run.log")"
for s in 000006 000012; do
  [ -d "$RUN/checkpoints/step_$s" ] || fail "no checkpoint step_$s"
done

# --- resume from step 6 into another run directory: steps 7..12 give the same numbers
"$FOREMOE" pretrain --config "$TMP/run.yaml" --threads 1 --run-dir "$TMP/resumed" \
  --resume "$RUN/checkpoints/step_000006" >"$TMP/resume.log" 2>&1 ||
  fail "resume failed: $(tail -n 20 "$TMP/resume.log")"
last=$(grep '"step":12,' "$RUN/metrics.jsonl" | sed 's/"tokens_per_second":[^,}]*//')
again=$(grep '"step":12,' "$TMP/resumed/metrics.jsonl" | sed 's/"tokens_per_second":[^,}]*//')
[ -n "$last" ] && [ "$last" = "$again" ] || fail "resumed step 12 differs: $last vs $again"
cmp -s "$RUN/eval.jsonl" "$TMP/resumed/eval.jsonl" 2>/dev/null ||
  [ "$(tail -n 1 "$RUN/eval.jsonl")" = "$(tail -n 1 "$TMP/resumed/eval.jsonl")" ] ||
  fail "resumed held-out evaluation at step 12 differs"

# --- bad input: exit 1, the message names the file and the key
expect_error() {  # $1: what, $2: grep pattern, then the command
  what=$1
  pattern=$2
  shift 2
  "$@" >"$TMP/err.log" 2>&1
  rc=$?
  [ $rc -eq 1 ] || fail "$what: exit $rc, expected 1"
  grep -q -- "$pattern" "$TMP/err.log" || fail "$what: message lacks '$pattern': $(cat "$TMP/err.log")"
}
write_config "$TMP/both.yaml" "$TMP/x" "task: {symbols: 8}"
expect_error "task and data" "both.yaml: task: .*not both" \
  "$FOREMOE" pretrain --config "$TMP/both.yaml"
sed "s#$TMP/text.txt#$TMP/missing.txt#" "$TMP/run.yaml" >"$TMP/missing.yaml"
expect_error "missing text file" "missing.yaml: data.files: '$TMP/missing.txt' is not a readable file" \
  "$FOREMOE" pretrain --config "$TMP/missing.yaml"
sed "s#vocab_size: 400#vocab_size: 12#" "$TMP/run.yaml" >"$TMP/vocab.yaml"
expect_error "tiny vocabulary" "vocab.yaml: data.vocab_size: must be in" \
  "$FOREMOE" pretrain --config "$TMP/vocab.yaml"
expect_error "synthetic-task config" "needs a \`data:\` section" \
  "$FOREMOE" pretrain --config train/synthetic_tiny
expect_error "not a Brown package" "no Brown corpus documents" \
  "$FOREMOE" corpus brown --package "$TMP" --out "$TMP/brown.txt"
[ -e "$TMP/brown.txt" ] && fail "a failed conversion left $TMP/brown.txt"

[ $failures -eq 0 ] || exit 1
echo "pretrain CLI: all checks passed"
