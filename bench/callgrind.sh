#!/usr/bin/env bash
# Instructions per request, VerifyKey against the health check, counted by
# valgrind's callgrind: unlike CPU time, instruction counts do not depend on
# what else this shared machine is doing. Bounded in time; load goes to
# 127.0.0.1 only; everything it starts is stopped on exit.
#
#   bash bench/callgrind.sh            # 20,000 requests of each kind, twice
#   REQUESTS=5000 bash bench/callgrind.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQUESTS=${REQUESTS:-20000}
ROUNDS=${ROUNDS:-2}
PORT=${PORT:-47250}
WORK=$(mktemp -d)
SERVER=""
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null
command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
(cd "$ROOT" && cargo build --release -q -p vilvik-keys -p vilvik-keys-bench)
BIN=$ROOT/target/release

export VILVIK_KEYS_SQLITE_PATH=$WORK/keys.db
"$BIN/vilvik-keys-bench" seed --keys 1000 --out "$WORK/keys.txt" >/dev/null
"$BIN/vilvik-keys-bench" bodies --keys "$WORK/keys.txt" --count "$ROUNDS" --out "$WORK/bodies" >/dev/null

VILVIK_KEYS_VERIFY_ADDR=127.0.0.1:$PORT valgrind --tool=callgrind \
    --callgrind-out-file="$WORK/cg.out" "$BIN/vilvik-keys" serve --role verify --preload \
    >"$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 120); do grep -q listening "$WORK/serve.log" && break; sleep 1; done
grep -q listening "$WORK/serve.log" || { echo "server did not start" >&2; exit 1; }

H=(-H content-type:application/grpc -H te:trailers -c 4 -m 4)
HEALTH=http://127.0.0.1:$PORT/grpc.health.v1.Health/Check
VERIFY=http://127.0.0.1:$PORT/vilvik.keys.v1.KeyVerify/VerifyKey
load() { # body url count
    local out
    out=$(timeout 600 h2load "${H[@]}" -n "$3" -d "$1" "$2" 2>&1)
    grep -q "$3 succeeded, 0 failed, 0 errored, 0 timeout" <<<"$out" || { echo "$out" >&2; exit 1; }
}
instructions() { # dump name -> instructions in that dump
    callgrind_control -d "$1" "$SERVER" >/dev/null 2>&1
    local file
    file=$(ls -t "$WORK"/cg.out.* | head -1)
    awk '/^summary:/ {print $2}' "$file"
}
load "$WORK/bodies/health.bin" "$HEALTH" 2000
load "$WORK/bodies/verify-00000.bin" "$VERIFY" 2000
callgrind_control -z "$SERVER" >/dev/null 2>&1

echo "| batch | requests | instructions | per request |"
echo "|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    body=$(printf '%s/bodies/verify-%05d.bin' "$WORK" $((round - 1)))
    load "$WORK/bodies/health.bin" "$HEALTH" "$REQUESTS"
    h=$(instructions "health$round"); callgrind_control -z "$SERVER" >/dev/null 2>&1
    load "$body" "$VERIFY" "$REQUESTS"
    v=$(instructions "verify$round"); callgrind_control -z "$SERVER" >/dev/null 2>&1
    echo "| health $round | $REQUESTS | $h | $((h / REQUESTS)) |"
    echo "| verify $round | $REQUESTS | $v | $((v / REQUESTS)) |"
    echo "| ratio $round | | | $(echo "scale=3; $v / $h" | bc) |"
done
