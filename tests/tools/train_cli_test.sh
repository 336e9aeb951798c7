#!/bin/sh
# Train.RlJobEndToEnd: `foremoe train` on an RL config as `make demo` runs it (4 in-process
# ranks), shrunk, and the same job on 2 Gloo processes under `foremoe launch`.
#   train_cli_test.sh <path to the foremoe executable> <source dir>
# The RL config has no checkpoint, so the job runs the SFT warm start first (cut short by
# init.sft_steps), then GRPO steps with evaluations, checkpoints and the last step's
# routing traces. Checks the run directory, the step lines (plain: output is a file),
# `foremoe eval` on the final checkpoint, `--resume`, and that bad input fails with exit 1
# and a message naming the file and key.
set -u
FOREMOE=$1
SRC=$2
TMP=$(mktemp -d "${TMPDIR:-/tmp}/foremoe_train_test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# --- configs: the demo's SFT and RL configs, shrunk
sed -e 's/^  steps: .*/  steps: 40/' -e 's/total_steps: .*/total_steps: 40/' \
  -e 's/eval_every: .*/eval_every: 0/' -e 's/eval_examples: .*/eval_examples: 8/' \
  -e 's/log_every: .*/log_every: 10/' "$SRC/configs/sft/add_tiny.yaml" >"$TMP/sft.yaml"
sed -e "s#^  sft: .*#  sft: $TMP/sft.yaml#" -e 's/^  sft_steps: .*/  sft_steps: 30/' \
  -e 's/train_batch_size: .*/train_batch_size: 4/' -e 's/^  n: .*/  n: 4/' \
  -e 's/ppo_mini_batch_size: .*/ppo_mini_batch_size: 4/' \
  -e 's/total_steps: .*/total_steps: 3/' -e 's/eval_every: .*/eval_every: 2/' \
  -e 's/eval_examples: .*/eval_examples: 8/' -e 's/checkpoint_every: .*/checkpoint_every: 2/' \
  -e "s#run_dir: .*#run_dir: $TMP/run#" "$SRC/configs/rl/demo.yaml" >"$TMP/rl.yaml"
grep -q "sft_steps: 30" "$TMP/rl.yaml" || fail "the demo config has no init.sft_steps to shrink"
# The demo runs on 4 in-process ranks (one prompt each here).
grep -q "ranks: 4" "$TMP/rl.yaml" || fail "the demo config does not run on 4 ranks"

# --- the job
"$FOREMOE" train --config "$TMP/rl.yaml" --threads 1 >"$TMP/train.log" 2>&1
rc=$?
[ $rc -eq 0 ] || fail "foremoe train exited $rc: $(tail -n 20 "$TMP/train.log")"
RUN="$TMP/run"
[ -s "$RUN/config.yaml" ] || fail "run directory: config.yaml missing"
[ -d "$RUN/sft/checkpoints/step_000030" ] || fail "SFT warm start: no checkpoint at step 30"
for s in 000002 000003; do
  [ -d "$RUN/checkpoints/step_$s" ] || fail "no RL checkpoint step_$s"
done
[ -s "$RUN/traces/step_000003.safetensors" ] || fail "no routing trace of the last step"
steps=$(grep -c '"kind":"rl_step"' "$RUN/metrics.jsonl")
[ "$steps" -eq 3 ] || fail "metrics.jsonl: $steps rl_step lines, expected 3"
evals=$(grep -c '"kind":"eval"' "$RUN/metrics.jsonl")
[ "$evals" -eq 3 ] || fail "metrics.jsonl: $evals eval lines (steps 0, 2, 3), expected 3"
n=$(grep -c '^step  *[0-9][0-9]*  reward .* \[gen .* | step .* s\]$' "$TMP/train.log")
[ "$n" -eq 3 ] || fail "expected 3 plain step lines, got $n: $(cat "$TMP/train.log")"
grep -q "$(printf '\033')" "$TMP/train.log" && fail "terminal control codes in a non-terminal log"
grep -q "^held-out accuracy [0-9.]* -> [0-9.]* over 3 RL steps" "$TMP/train.log" ||
  fail "no closing accuracy line: $(tail -n 3 "$TMP/train.log")"

# --- eval of the final checkpoint
"$FOREMOE" eval --checkpoint "$RUN/checkpoints/step_000003" --task add -n 8 --threads 1 \
  >"$TMP/eval.log" 2>&1 || fail "foremoe eval failed: $(cat "$TMP/eval.log")"

# --- resume from step 2 into another directory: step 3 again, same numbers
"$FOREMOE" train --config "$TMP/rl.yaml" --threads 1 --resume "$RUN/checkpoints/step_000002" \
  --run-dir "$TMP/resumed" >"$TMP/resume.log" 2>&1 ||
  fail "resume failed: $(tail -n 20 "$TMP/resume.log")"
a=$(grep '"kind":"rl_step"' "$RUN/metrics.jsonl" | tail -n 1 | sed 's/"timing_s".*//;s/"tokens_per_second":[^,]*,//;s/"planner_ms":[^,]*,//g')
b=$(grep '"kind":"rl_step"' "$TMP/resumed/metrics.jsonl" | tail -n 1 | sed 's/"timing_s".*//;s/"tokens_per_second":[^,]*,//;s/"planner_ms":[^,]*,//g')
[ -n "$a" ] && [ "$a" = "$b" ] || fail "resumed step 3 differs:
  $a
  $b"

# --- the same job on 2 Gloo processes (foremoe launch), from the warm start's checkpoint
"$FOREMOE" launch --nproc 2 -- train --config "$TMP/rl.yaml" --steps 1 \
  --init-checkpoint "$RUN/sft/checkpoints/step_000030" --run-dir "$TMP/launched" \
  >"$TMP/launch.log" 2>&1
rc=$?
if [ $rc -ne 0 ] && grep -q "no Gloo backend" "$TMP/launch.log"; then
  echo "note: this build has no Gloo backend; the launched RL run was not tried"
else
  [ $rc -eq 0 ] || fail "launch --nproc 2 -- train exited $rc: $(tail -n 20 "$TMP/launch.log")"
  grep -q "2 ranks (experts 4 per rank" "$TMP/launch.log" ||
    fail "the launched run does not report 2 ranks: $(cat "$TMP/launch.log")"
  n=$(grep -c '"kind":"rl_step"' "$TMP/launched/metrics.jsonl")
  [ "$n" -eq 1 ] || fail "launched run: $n rl_step lines in metrics.jsonl (one writer), expected 1"
  [ -s "$TMP/launched/traces/step_000001.safetensors" ] || fail "launched run: no routing trace"
  [ -d "$TMP/launched/checkpoints/step_000001" ] || fail "launched run: no checkpoint"
fi
"$FOREMOE" train --config "$TMP/rl.yaml" --ranks 3 --run-dir "$TMP/bad0" >"$TMP/bad0.log" 2>&1
rc=$?
[ $rc -eq 1 ] || fail "--ranks 3 for 4 prompts: exit $rc, expected 1"
grep -q "3 ranks must divide data.train_batch_size = 4" "$TMP/bad0.log" ||
  fail "--ranks 3: message was: $(cat "$TMP/bad0.log")"

# --- --device: a bad name is refused when the command line is parsed; cuda runs the job on the
# GPU where one is visible and is refused with the reason where none is
"$FOREMOE" train --config "$TMP/rl.yaml" --device gpu >"$TMP/dev0.log" 2>&1
rc=$?
[ $rc -ne 0 ] || fail "--device gpu: exit 0"
grep -q "device 'gpu': expected cpu, cuda or cuda:N" "$TMP/dev0.log" ||
  fail "--device gpu: message was: $(cat "$TMP/dev0.log")"
"$FOREMOE" train --config "$TMP/rl.yaml" --steps 1 --device cuda \
  --init-checkpoint "$RUN/sft/checkpoints/step_000030" --run-dir "$TMP/on_cuda" \
  >"$TMP/dev1.log" 2>&1
rc=$?
if [ $rc -eq 1 ] && grep -Eq "device 'cuda': (no CUDA GPU is visible|this foremoe build has no CUDA)" "$TMP/dev1.log"; then
  echo "note: no GPU visible here; --device cuda refused with the reason"
elif [ $rc -eq 0 ]; then
  grep -q "on add (cuda:0)" "$TMP/dev1.log" || fail "--device cuda: not run on cuda:0: $(cat "$TMP/dev1.log")"
  n=$(grep -c '"kind":"rl_step"' "$TMP/on_cuda/metrics.jsonl")
  [ "$n" -eq 1 ] || fail "--device cuda: $n rl_step lines, expected 1"
else
  fail "--device cuda: exit $rc: $(tail -n 20 "$TMP/dev1.log")"
fi

# --- bad input: exit 1 and a message naming the key
sed 's/^  sft_steps: .*/  sft_steps: 400/' "$TMP/rl.yaml" >"$TMP/bad_steps.yaml"
"$FOREMOE" train --config "$TMP/bad_steps.yaml" --run-dir "$TMP/bad1" >"$TMP/bad1.log" 2>&1
rc=$?
[ $rc -eq 1 ] || fail "init.sft_steps beyond the SFT run: exit $rc, expected 1"
grep -q "init.sft_steps: 400 is more than the 40 steps" "$TMP/bad1.log" ||
  fail "init.sft_steps beyond the SFT run: message was: $(cat "$TMP/bad1.log")"

sed 's/^  ppo_epochs: .*/  ppo_epochs: -1/' "$TMP/rl.yaml" >"$TMP/bad_epochs.yaml"
"$FOREMOE" train --config "$TMP/bad_epochs.yaml" --run-dir "$TMP/bad2" >"$TMP/bad2.log" 2>&1
rc=$?
[ $rc -eq 1 ] || fail "negative actor.ppo_epochs: exit $rc, expected 1"
grep -q "bad_epochs.yaml.*actor.ppo_epochs" "$TMP/bad2.log" ||
  fail "negative actor.ppo_epochs: message was: $(cat "$TMP/bad2.log")"

if [ $failures -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "OK: SFT warm start, 3 GRPO steps on 4 ranks, eval, resume, 2 launched Gloo ranks, --device and bad configs"
