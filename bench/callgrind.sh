#!/usr/bin/env bash
# Instructions per request, VerifyKey against the health check, counted by
# valgrind's callgrind: unlike CPU time, instruction counts do not depend on
# what else this shared machine is doing. Bounded in time; load goes to
# 127.0.0.1 only; everything it starts is stopped on exit.
#
#   bash bench/callgrind.sh            # 20,000 requests of each kind, twice
#   REQUESTS=5000 bash bench/callgrind.sh
#   SIZE=tiny PROFILE=debug bash bench/callgrind.sh   # every step in seconds (CI)
#
# Knobs (environment), with their SIZE=tiny values in brackets; SIZE and
# PROFILE as bench/lib.sh says:
#   REQUESTS=20000   requests of each kind per round [50]
#   ROUNDS=2         rounds of health then verify [1]
#   WARMUP=2000      requests of each kind before counting starts [50]
#   PORT=27180       the verify listener, on 127.0.0.1
set -euo pipefail
source "$(dirname "$0")/lib.sh"
if tiny; then : "${REQUESTS:=50}" "${ROUNDS:=1}" "${WARMUP:=50}"; fi
REQUESTS=${REQUESTS:-20000}
ROUNDS=${ROUNDS:-2}
WARMUP=${WARMUP:-2000}
PORT=${PORT:-27180}
WORK=$(mktemp -d)
SERVER=""
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

need h2load valgrind callgrind_control bc ss
build
ports_free PORT "$PORT"

export VILVIK_KEYS_SQLITE_PATH=$WORK/keys.db
"$BIN/vilvik-keys-bench" seed --keys 1000 --out "$WORK/keys.txt" >/dev/null
"$BIN/vilvik-keys-bench" bodies --keys "$WORK/keys.txt" --count "$ROUNDS" --out "$WORK/bodies" >/dev/null

VILVIK_KEYS_VERIFY_ADDR=127.0.0.1:$PORT valgrind --tool=callgrind \
    --callgrind-out-file="$WORK/cg.out" "$BIN/vilvik-keys" serve --role verify --preload \
    >"$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 300); do
    grep -q listening "$WORK/serve.log" && break
    kill -0 "$SERVER" 2>/dev/null || break
    sleep 1
done
grep -q listening "$WORK/serve.log" || { tail -5 "$WORK/serve.log" >&2; die "the server did not start"; }

H=(-H content-type:application/grpc -H te:trailers -c 4 -m 4)
HEALTH=http://127.0.0.1:$PORT/grpc.health.v1.Health/Check
VERIFY=http://127.0.0.1:$PORT/vilvik.keys.v1.KeyVerify/VerifyKey
load() { # body url count
    local out
    out=$(timeout 600 h2load "${H[@]}" -n "$3" -d "$1" "$2" 2>&1)
    grep -q "$3 succeeded, 0 failed, 0 errored, 0 timeout" <<<"$out" || { echo "$out" >&2; die "h2load: not every request succeeded"; }
}
instructions() { # dump name -> instructions in that dump
    callgrind_control -d "$1" "$SERVER" >/dev/null 2>&1
    local file
    file=$(ls -t "$WORK"/cg.out.* | head -1)
    awk '/^summary:/ {print $2}' "$file"
}
load "$WORK/bodies/health.bin" "$HEALTH" "$WARMUP"
load "$WORK/bodies/verify-00000.bin" "$VERIFY" "$WARMUP"
callgrind_control -z "$SERVER" >/dev/null 2>&1

echo "| batch | requests | instructions | per request |"
echo "|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    body=$(printf '%s/bodies/verify-%05d.bin' "$WORK" $((round - 1)))
    load "$WORK/bodies/health.bin" "$HEALTH" "$REQUESTS"
    h=$(instructions "health$round"); callgrind_control -z "$SERVER" >/dev/null 2>&1
    load "$body" "$VERIFY" "$REQUESTS"
    v=$(instructions "verify$round"); callgrind_control -z "$SERVER" >/dev/null 2>&1
    [[ $h =~ ^[0-9]+$ && $v =~ ^[0-9]+$ ]] || die "callgrind dumped no instruction counts (health '$h', verify '$v')"
    echo "| health $round | $REQUESTS | $h | $((h / REQUESTS)) |"
    echo "| verify $round | $REQUESTS | $v | $((v / REQUESTS)) |"
    echo "| ratio $round | | | $(echo "scale=3; $v / $h" | bc) |"
done
if [[ $PROFILE != release ]]; then
    echo "(a $PROFILE build: instruction counts are not comparable with release figures)"
fi
