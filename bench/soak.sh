#!/usr/bin/env bash
# Issue 11's soak: one `vilvik-keys serve` (both roles) on Postgres under
# mixed admin and verify traffic for SOAK_SECONDS (default 600), driven by
# crates/bench soak. Prints a table per RPC (calls, rate, p50, p99, errors
# by status), the server's RSS and the database's size every
# SAMPLE_SECONDS, and a final JSON line; the output is also written to
# bench/results/soak-<date>-<HHMM>.txt.
# Postgres at PG_URL (default postgres://postgres@127.0.0.1:5432); a fresh
# database vk_soak_<pid>, dropped at the end. Load goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
SOAK_SECONDS=${SOAK_SECONDS:-600}
SAMPLE_SECONDS=${SAMPLE_SECONDS:-60}
SOAK_ACCOUNTS=${SOAK_ACCOUNTS:-3}
ADMIN_TASKS=${ADMIN_TASKS:-2}
ADMIN_RATE=${ADMIN_RATE:-20}      # admin calls a second per admin task
VERIFY_TASKS=${VERIFY_TASKS:-12}
VERIFY_RATE=${VERIFY_RATE:-2000}  # verify calls a second in all; 0: full speed
PORT=${PORT:-55061}               # admin; verify on PORT+1
DB=vk_soak_$$
TMP=$(mktemp -d)
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
    psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
timeout 1800 cargo build --release -q -p vilvik-keys -p vilvik-keys-bench
BIN=target/release
psql -q "$PG_URL/postgres" -c "CREATE DATABASE $DB" >/dev/null
export DATABASE_URL=$PG_URL/$DB VILVIK_KEYS_PEPPER_FILE=$TMP/pepper
export VILVIK_KEYS_ADMIN_ADDR=127.0.0.1:$PORT VILVIK_KEYS_VERIFY_ADDR=127.0.0.1:$((PORT + 1))
export RUST_LOG=warn
timeout 60 $BIN/vilvik-keys pepper new "$TMP/pepper" >/dev/null 2>&1
timeout 60 $BIN/vilvik-keys migrate >/dev/null
KEYS=
for i in $(seq 1 "$SOAK_ACCOUNTS"); do
    KEYS+="${KEYS:+,}$(timeout 60 $BIN/vilvik-keys bootstrap --account "SOAK$i" 2>/dev/null)"
done
export SOAK_MANAGEMENT_KEYS=$KEYS
$BIN/vilvik-keys serve >"$TMP/server.log" 2>&1 &
SERVER=$!
for port in "$PORT" $((PORT + 1)); do
    timeout 30 bash -c "until grpcurl -plaintext 127.0.0.1:$port list >/dev/null 2>&1; do sleep 0.2; done"
done
mkdir -p bench/results
RESULT=bench/results/soak-$(date -u +%Y-%m-%d-%H%M).txt
{
    echo "soak: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), $(nproc) cores, load $(cut -d" " -f1-3 /proc/loadavg)," \
        "Postgres $(psql -tAq "$PG_URL/postgres" -c 'SHOW server_version')"
    timeout $((SOAK_SECONDS + 120)) $BIN/vilvik-keys-bench soak \
        --admin "127.0.0.1:$PORT" --verify "127.0.0.1:$((PORT + 1))" \
        --server-pid "$SERVER" --seconds "$SOAK_SECONDS" --sample-seconds "$SAMPLE_SECONDS" \
        --admin-tasks "$ADMIN_TASKS" --admin-rate "$ADMIN_RATE" \
        --verify-tasks "$VERIFY_TASKS" --verify-rate "$VERIFY_RATE" 2>&1
} | tee "$RESULT"
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
echo "written to $RESULT"
