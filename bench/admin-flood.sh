#!/usr/bin/env bash
# Issue 10's finding, measured: one account floods ListAuditEvents while
# another account's GetKey latency is sampled (crates/bench admin-flood),
# once with the admin rate limit lifted and once with its defaults.
# Postgres at PG_URL (default postgres://postgres@127.0.0.1:5432); a fresh
# database vk_flood_<pid>, dropped at the end. Load goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
SECONDS_EACH=${SECONDS_EACH:-10}
CONCURRENCY=${CONCURRENCY:-32}
PORT=${PORT:-55051}
DB=vk_flood_$$
TMP=$(mktemp -d)
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
    psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
timeout 1200 cargo build --release -q -p vilvik-keys -p vilvik-keys-bench
BIN=target/release
psql -q "$PG_URL/postgres" -c "CREATE DATABASE $DB" >/dev/null
export DATABASE_URL=$PG_URL/$DB VILVIK_KEYS_PEPPER_FILE=$TMP/pepper
export VILVIK_KEYS_ADMIN_ADDR=127.0.0.1:$PORT VILVIK_KEYS_VERIFY_ADDR=127.0.0.1:$((PORT + 1))
export RUST_LOG=warn
timeout 60 $BIN/vilvik-keys pepper new "$TMP/pepper" >/dev/null 2>&1
timeout 60 $BIN/vilvik-keys migrate >/dev/null
FLOOD_KEY=$(timeout 60 $BIN/vilvik-keys bootstrap --account FLOOD 2>/dev/null)
VICTIM_KEY=$(timeout 60 $BIN/vilvik-keys bootstrap --account VICTIM 2>/dev/null)
export FLOOD_KEY VICTIM_KEY
for mode in off on; do
    if [ "$mode" = off ]; then
        export VILVIK_KEYS_ADMIN_RATE_PER_SECOND=1000000 VILVIK_KEYS_ADMIN_RATE_BURST=1000000
    else
        unset VILVIK_KEYS_ADMIN_RATE_PER_SECOND VILVIK_KEYS_ADMIN_RATE_BURST
    fi
    $BIN/vilvik-keys serve --role admin &
    SERVER=$!
    timeout 30 bash -c "until grpcurl -plaintext 127.0.0.1:$PORT list >/dev/null 2>&1; do sleep 0.2; done"
    echo "== admin rate limit $mode"
    timeout $((SECONDS_EACH * 2 + 60)) $BIN/vilvik-keys-bench admin-flood \
        --admin "127.0.0.1:$PORT" --seconds "$SECONDS_EACH" --concurrency "$CONCURRENCY"
    kill "$SERVER"; wait "$SERVER" || true
    SERVER=
done
