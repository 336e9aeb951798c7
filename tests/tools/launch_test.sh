#!/bin/sh
# Launch.SupervisesLocalRanks: `foremoe launch` with the hidden `launch-selftest` subcommand
# as its ranks (each prints its rank variables and pid, then fails, dies or sleeps as asked).
#   launch_test.sh <path to the foremoe executable>
# Checks: the variables each rank sees (distinct RANK 0..N-1, WORLD_SIZE, one MASTER_PORT);
# --prefix-output; a failing rank's status (exit code or 128 + signal) becomes the job's and
# the sleeping ranks are stopped promptly (also one that ignores SIGTERM, by SIGKILL after
# --grace-s); SIGINT and SIGTERM to the launcher reach the ranks; --timeout-s stops a hanging
# job (exit 124); a launcher killed by SIGKILL takes its ranks with it; the ranks log at the
# launcher's --log-level; bad flags exit 1 with a message.
set -u
FOREMOE=$1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/foremoe_launch_test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# field <name> <line>: the value of name=... in a selftest line.
field() {
  echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"
}

# ranks_gone <output file>: every pid printed by a rank no longer exists.
ranks_gone() {
  for pid in $(sed -n 's/.* pid=\([0-9]*\).*/\1/p' "$1"); do
    if kill -0 "$pid" 2>/dev/null; then return 1; fi
  done
  return 0
}

# run_timed <name> <launch args...>: runs foremoe launch; sets rc and secs; the ranks' lines
# in $TMP/<name>.out (stdout also has the launcher's log line), stderr in $TMP/<name>.err.
run_timed() {
  name=$1
  shift
  t0=$(date +%s)
  "$FOREMOE" launch "$@" >"$TMP/$name.log" 2>"$TMP/$name.err"
  rc=$?
  grep '^\(\[rank [0-9]*\] \)\{0,1\}rank=' "$TMP/$name.log" >"$TMP/$name.out"
  secs=$(($(date +%s) - t0))
}

# --- the rank variables: 3 ranks, distinct RANK 0..2, one free MASTER_PORT
run_timed env --nproc 3 -- launch-selftest
[ $rc -eq 0 ] || fail "3 ranks exiting 0: launch exited $rc: $(cat "$TMP/env.err")"
[ "$(wc -l <"$TMP/env.out")" -eq 3 ] || fail "expected 3 rank lines, got: $(cat "$TMP/env.out")"
ranks=$(for r in 0 1 2; do grep -c "^rank=$r " "$TMP/env.out"; done | tr -d '\n')
[ "$ranks" = "111" ] || fail "RANK 0, 1, 2 once each expected, got: $(cat "$TMP/env.out")"
ports=$(sed -n 's/.* master_port=\([^ ]*\) .*/\1/p' "$TMP/env.out" | sort -u)
[ "$(echo "$ports" | wc -l)" -eq 1 ] && [ "$ports" -gt 0 ] 2>/dev/null ||
  fail "one MASTER_PORT > 0 on all ranks expected, got: $ports"
while read -r line; do
  r=$(field rank "$line")
  [ "$(field world_size "$line")" = 3 ] && [ "$(field local_world_size "$line")" = 3 ] &&
    [ "$(field local_rank "$line")" = "$r" ] && [ "$(field master_addr "$line")" = 127.0.0.1 ] &&
    [ "$(field launched "$line")" = 1 ] || fail "rank $r saw: $line"
done <"$TMP/env.out"

# --- a given --master-port and --master-addr are passed as they are; --prefix-output
run_timed prefix --nproc 2 --master-addr localhost --master-port 29517 --prefix-output \
  -- launch-selftest
[ $rc -eq 0 ] || fail "--prefix-output: launch exited $rc: $(cat "$TMP/prefix.err")"
for r in 0 1; do
  grep -q "^\[rank $r\] rank=$r .* master_addr=localhost master_port=29517 " "$TMP/prefix.out" ||
    fail "--prefix-output: no '[rank $r] rank=$r ... port 29517' line in: $(cat "$TMP/prefix.out")"
done
[ "$(wc -l <"$TMP/prefix.out")" -eq 2 ] || fail "--prefix-output: $(cat "$TMP/prefix.out")"

# --- a failing rank: its exit code is the job's, the others (sleeping 60 s) are stopped
run_timed exit --nproc 3 -- launch-selftest --exit-rank 1 --exit-code 3 --exit-after-s 1 \
  --sleep-s 60
[ $rc -eq 3 ] || fail "rank 1 exiting 3: launch exited $rc, expected 3"
[ $secs -lt 10 ] || fail "rank 1 exiting 3: the job took $secs s (others sleep 60 s)"
grep -q "foremoe launch: rank 1 exited with status 3; stopping the other ranks" "$TMP/exit.err" ||
  fail "rank 1 exiting 3: message was: $(cat "$TMP/exit.err")"
[ "$(wc -l <"$TMP/exit.out")" -eq 3 ] || fail "rank 1 exiting 3: output: $(cat "$TMP/exit.out")"
ranks_gone "$TMP/exit.out" || fail "rank 1 exiting 3: a rank is still running"

# --- a rank killed by a signal: 128 + signal
run_timed signal --nproc 2 -- launch-selftest --exit-rank 0 --exit-signal 9 --exit-after-s 1 \
  --sleep-s 60
[ $rc -eq 137 ] || fail "rank 0 killed by SIGKILL: launch exited $rc, expected 137"
[ $secs -lt 10 ] || fail "rank 0 killed by SIGKILL: the job took $secs s"
grep -q "foremoe launch: rank 0 exited with status 137 (killed by signal 9" "$TMP/signal.err" ||
  fail "rank 0 killed by SIGKILL: message was: $(cat "$TMP/signal.err")"
ranks_gone "$TMP/signal.out" || fail "rank 0 killed by SIGKILL: a rank is still running"

# --- a rank that ignores SIGTERM is killed after --grace-s
run_timed grace --nproc 2 --grace-s 1 -- launch-selftest --exit-rank 1 --exit-code 5 \
  --exit-after-s 1 --sleep-s 60 --ignore-sigterm
[ $rc -eq 5 ] || fail "rank ignoring SIGTERM: launch exited $rc, expected 5"
[ $secs -lt 10 ] || fail "rank ignoring SIGTERM: the job took $secs s"
grep -q "still running 1 s after being asked to stop; sending SIGKILL" "$TMP/grace.err" ||
  fail "rank ignoring SIGTERM: message was: $(cat "$TMP/grace.err")"
ranks_gone "$TMP/grace.out" || fail "rank ignoring SIGTERM: a rank is still running"

# --- SIGINT and SIGTERM to the launcher reach the ranks; the launcher exits 128 + signal
for sig in INT TERM; do
  expected=130 # 128 + SIGINT (2)
  [ $sig = TERM ] && expected=143 # 128 + SIGTERM (15)
  t0=$(date +%s)
  "$FOREMOE" launch --nproc 2 -- launch-selftest --sleep-s 60 >"$TMP/$sig.out" 2>"$TMP/$sig.err" &
  launcher=$!
  i=0
  while [ "$(grep -c '^rank=' "$TMP/$sig.out")" -lt 2 ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  [ "$(grep -c '^rank=' "$TMP/$sig.out")" -eq 2 ] || fail "SIG$sig: the ranks did not start in 10 s"
  kill -"$sig" $launcher
  wait $launcher
  rc=$?
  secs=$(($(date +%s) - t0))
  [ $rc -eq $expected ] || fail "SIG$sig to the launcher: exited $rc, expected $expected"
  [ $secs -lt 15 ] || fail "SIG$sig to the launcher: the job took $secs s"
  grep -q "received SIG$sig; forwarding it to the ranks" "$TMP/$sig.err" ||
    fail "SIG$sig to the launcher: message was: $(cat "$TMP/$sig.err")"
  ranks_gone "$TMP/$sig.out" || fail "SIG$sig to the launcher: a rank is still running"
done

# --- the launcher killed by SIGKILL: its ranks die with it (PR_SET_PDEATHSIG)
"$FOREMOE" launch --nproc 2 -- launch-selftest --sleep-s 60 >"$TMP/KILL.out" 2>"$TMP/KILL.err" &
launcher=$!
i=0
while [ "$(grep -c '^rank=' "$TMP/KILL.out")" -lt 2 ] && [ $i -lt 100 ]; do
  sleep 0.1
  i=$((i + 1))
done
kill -KILL $launcher
wait $launcher 2>/dev/null # the shell reports "Killed"
i=0
until ranks_gone "$TMP/KILL.out" || [ $i -ge 50 ]; do
  sleep 0.1
  i=$((i + 1))
done
ranks_gone "$TMP/KILL.out" || fail "launcher killed by SIGKILL: a rank is still running after 5 s"

# --- the ranks log at the launcher's --log-level unless the command gives its own
"$FOREMOE" --log-level debug launch --nproc 1 -- launch-selftest >"$TMP/level.log" 2>&1 &&
  "$FOREMOE" --log-level warn launch --nproc 1 -- --log-level trace launch-selftest \
    >>"$TMP/level.log" 2>&1 &&
  "$FOREMOE" launch --nproc 1 -- launch-selftest >>"$TMP/level.log" 2>&1 ||
  fail "--log-level runs failed: $(cat "$TMP/level.log")"
[ "$(sed -n 's/.* log_level=\([a-z]*\) .*/\1/p' "$TMP/level.log" | tr '\n' ' ')" = \
  "debug trace info " ] || fail "--log-level: the ranks saw: $(cat "$TMP/level.log")"

# --- --timeout-s stops a hanging job with exit 124
run_timed timeout --nproc 2 --timeout-s 2 -- launch-selftest --sleep-s 60
[ $rc -eq 124 ] || fail "--timeout-s 2: launch exited $rc, expected 124"
[ $secs -ge 1 ] && [ $secs -lt 10 ] || fail "--timeout-s 2: the job took $secs s"
grep -q "timeout: the job ran longer than --timeout-s 2; stopping the ranks" "$TMP/timeout.err" ||
  fail "--timeout-s 2: message was: $(cat "$TMP/timeout.err")"
ranks_gone "$TMP/timeout.out" || fail "--timeout-s 2: a rank is still running"

# --- bad flags: exit 1 and a message naming the flag
check_bad() {
  expect=$1
  shift
  "$FOREMOE" launch "$@" >"$TMP/bad.log" 2>&1
  rc=$?
  [ $rc -eq 1 ] || fail "launch $*: exit $rc, expected 1"
  grep -q -- "$expect" "$TMP/bad.log" || fail "launch $*: message was: $(cat "$TMP/bad.log")"
}
check_bad "--nproc must be at least 1, got 0" --nproc 0 -- launch-selftest
check_bad "no command to run: give one after --" --nproc 2
check_bad "no command to run: give one after --" --nproc 2 --
check_bad "--timeout-s must be >= 0" --nproc 2 --timeout-s -1 -- launch-selftest
check_bad "--master-port must be in 0..65535" --nproc 2 --master-port 70000 -- launch-selftest
"$FOREMOE" launch -- launch-selftest >"$TMP/bad.log" 2>&1
rc=$?
[ $rc -ne 0 ] && grep -q -- "--nproc" "$TMP/bad.log" ||
  fail "launch without --nproc: exit $rc, message: $(cat "$TMP/bad.log")"

if [ $failures -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "OK: rank variables, prefixed output, failing and killed ranks, grace, SIGINT/SIGTERM," \
  "launcher killed, log level, timeout and bad flags"
