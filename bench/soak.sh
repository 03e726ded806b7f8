#!/usr/bin/env bash
# The soak: one `vilvik-keys serve` (both roles, server defaults) on
# Postgres under mixed admin and verify traffic for SOAK_SECONDS, driven by
# `vilvik-keys-bench soak`. Prints a table per RPC (calls, rate, p50, p99,
# errors by status), the server's RSS and the database's size every
# SAMPLE_SECONDS, and a final JSON line; the output is also written to
# bench/results/soak-<date>-<HHMM>.txt. Fails if an RPC never succeeded,
# if more than MAX_ERRORS calls failed, or if the server does not stop
# cleanly afterwards. A fresh database vk_soak_<pid>, dropped at the end.
# Load goes to 127.0.0.1 only.
#
#   bash bench/soak.sh                          # 10 minutes
#   SIZE=tiny PROFILE=debug bash bench/soak.sh  # seconds (CI)
#
# Knobs (environment), with their SIZE=tiny values in brackets; SIZE,
# PROFILE, RESULTS_DIR and PG_URL as bench/lib.sh says:
#   SOAK_SECONDS=600     how long the traffic runs [5]
#   SAMPLE_SECONDS=60    seconds between samples [2]
#   SOAK_ACCOUNTS=3      accounts, each with a bootstrapped management key
#   ADMIN_TASKS=2        admin tasks, each one call at a time
#   ADMIN_RATE=20        admin calls a second per admin task
#   VERIFY_TASKS=12      verify tasks
#   VERIFY_RATE=2000     verify calls a second in all; 0: full speed
#   MAX_ERRORS           failed calls allowed, refusals at the stored-key
#                        ceiling and by the admin rate limit apart (default
#                        any) [0]
#   PORT=27160           admin listener on 127.0.0.1; verify on PORT+1
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$BENCH_ROOT"
if tiny; then : "${SOAK_SECONDS:=5}" "${SAMPLE_SECONDS:=2}" "${MAX_ERRORS:=0}"; fi
SOAK_SECONDS=${SOAK_SECONDS:-600}
SAMPLE_SECONDS=${SAMPLE_SECONDS:-60}
SOAK_ACCOUNTS=${SOAK_ACCOUNTS:-3}
ADMIN_TASKS=${ADMIN_TASKS:-2}
ADMIN_RATE=${ADMIN_RATE:-20}
VERIFY_TASKS=${VERIFY_TASKS:-12}
VERIFY_RATE=${VERIFY_RATE:-2000}
MAX_ERRORS=${MAX_ERRORS:-}
PORT=${PORT:-27160}
postgres_node vk_soak
KEYS=
for i in $(seq 1 "$SOAK_ACCOUNTS"); do KEYS+="${KEYS:+,}$(management_key "SOAK$i")"; done
export SOAK_MANAGEMENT_KEYS=$KEYS
"$BIN/vilvik-keys" serve >"$TMP/server.log" 2>&1 &
SERVER=$!
for port in "$PORT" $((PORT + 1)); do wait_grpc "127.0.0.1:$port" "$SERVER"; done
RESULT=$(result_file "soak-$(date -u +%Y-%m-%d-%H%M).txt")
{
    echo "soak: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), $PROFILE build, $(nproc) cores, load $(cut -d" " -f1-3 /proc/loadavg)," \
        "Postgres $(psql -tAq "$PG_URL/postgres" -c 'SHOW server_version')"
    timeout $((SOAK_SECONDS + 120)) "$BIN/vilvik-keys-bench" soak \
        --admin "127.0.0.1:$PORT" --verify "127.0.0.1:$((PORT + 1))" \
        --server-pid "$SERVER" --seconds "$SOAK_SECONDS" --sample-seconds "$SAMPLE_SECONDS" \
        --admin-tasks "$ADMIN_TASKS" --admin-rate "$ADMIN_RATE" \
        --verify-tasks "$VERIFY_TASKS" --verify-rate "$VERIFY_RATE" 2>&1
} | tee "$TMP/soak.txt"
[[ -n "$RESULT" ]] && cp "$TMP/soak.txt" "$RESULT"
# The last line is the soak's JSON, unless it failed before printing it.
SUMMARY=$(tail -1 "$TMP/soak.txt")
jq -e .rpcs >/dev/null 2>&1 <<<"$SUMMARY" || die "the soak printed no summary"
NEVER=$(jq -r '[.rpcs | to_entries[] | select(.value.succeeded == 0) | .key] | join(", ")' <<<"$SUMMARY")
[[ -z "$NEVER" ]] || die "these RPCs never succeeded: $NEVER"
ERRORS=$(jq -r .errors <<<"$SUMMARY")
if [[ -n "$MAX_ERRORS" ]] && (( ERRORS > MAX_ERRORS )); then
    die "$ERRORS calls failed (MAX_ERRORS=$MAX_ERRORS): see the table above"
fi
# The server must also stop cleanly after the soak (exit 0: nothing abandoned).
kill -TERM "$SERVER"
for _ in $(seq 300); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$SERVER" 2>/dev/null || true
STATUS=0
wait "$SERVER" || STATUS=$?
SERVER=
if [ "$STATUS" -ne 0 ]; then
    echo "the server exited with status $STATUS after the soak; its log:" >&2
    tail -20 "$TMP/server.log" >&2
    exit 1
fi
echo "server stopped cleanly; $(wc -l <"$TMP/server.log") warning or error lines in its log"
grep -i -E 'warn|error' "$TMP/server.log" | tail -5 || true
if [[ -n "$RESULT" ]]; then echo "written to $RESULT"; fi
