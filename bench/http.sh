#!/usr/bin/env bash
# The HTTP face's cost: server CPU per request of `/v1/authorize` (a
# gateway's forward-auth check with a valid key) and of `POST
# /v1/keys:verify` (JSON), each against `GET /healthz` on the same server,
# with wrk over HTTP/1.1 keep-alive, in interleaved pairs so that both
# halves of a pair see the same machine. Server CPU is the server
# process's user + system time (/proc/PID/stat) over the requests wrk
# completed; the ratio of a pair is what BENCHMARKS.md reports (median of
# the rounds), with req/s and p99 latency. Bounded in time; load goes to
# 127.0.0.1 only; everything it starts is stopped on exit.
#
#   bash bench/http.sh                         # 5 rounds of 10 s per run
#   SIZE=tiny PROFILE=debug bash bench/http.sh # every step in seconds (CI)
#
# Knobs (environment), SIZE=tiny values in brackets; SIZE and PROFILE as
# bench/lib.sh says:
#   ROUNDS=5        pairs of each kind [1]
#   DURATION=10     seconds per wrk run [1]
#   CONNECTIONS=16  wrk's keep-alive connections [2]
#   PORT=27190      the verify listener, on 127.0.0.1
set -euo pipefail
source "$(dirname "$0")/lib.sh"
if tiny; then : "${ROUNDS:=1}" "${DURATION:=1}" "${CONNECTIONS:=2}"; fi
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
PORT=${PORT:-27190}
WORK=$(mktemp -d)
SERVER=""
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

need wrk bc
build
ports_free PORT "$PORT"

export VILVIK_KEYS_SQLITE_PATH=$WORK/keys.db
"$BIN/vilvik-keys-bench" seed --keys 1000 --out "$WORK/keys.txt" >/dev/null
KEY=$(head -1 "$WORK/keys.txt")

VILVIK_KEYS_VERIFY_ADDR=127.0.0.1:$PORT RUST_LOG=warn \
    "$BIN/vilvik-keys" serve --role verify --preload >"$WORK/serve.log" 2>&1 &
SERVER=$!
URL=http://127.0.0.1:$PORT
for _ in $(seq 1 100); do
    curl -fsS "$URL/readyz" >/dev/null 2>&1 && break
    kill -0 "$SERVER" 2>/dev/null || break
    sleep 0.2
done
curl -fsS "$URL/readyz" >/dev/null || { tail -5 "$WORK/serve.log" >&2; die "the server did not start"; }
# Each route answers as it should before it is timed.
curl -fsS -H "X-API-Key: $KEY" "$URL/v1/authorize" >/dev/null || die "/v1/authorize refused the key"
BODY="{\"key\":\"$KEY\"}"
curl -fsS -H 'content-type: application/json' -d "$BODY" "$URL/v1/keys:verify" | grep -q '"valid":true' \
    || die "/v1/keys:verify did not find the key valid"

cat >"$WORK/verify.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
EOF
TICKS=$(getconf CLK_TCK)

cpu() { # the server's user + system time, in clock ticks
    awk '{print $14 + $15}' "/proc/$SERVER/stat"
}

run() { # name path [wrk args...] -> "name requests cpu_ticks rps p99_ms"
    local name=$1 path=$2
    shift 2
    local before after out requests rps p99
    before=$(cpu)
    out=$(timeout $((DURATION + 60)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$@" "$URL$path")
    after=$(cpu)
    grep -q "Non-2xx" <<<"$out" && { echo "$out" >&2; die "$name: wrk saw answers other than 2xx"; }
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {v = $2; if (v ~ /us$/) {sub(/us$/, "", v); v /= 1000} else if (v ~ /ms$/) {sub(/ms$/, "", v)} else if (v ~ /s$/) {sub(/s$/, "", v); v *= 1000}; print v}' <<<"$out")
    [[ $requests =~ ^[0-9]+$ && $requests -gt 0 ]] || { echo "$out" >&2; die "$name: wrk completed no requests"; }
    echo "$name $requests $((after - before)) $rps $p99"
}

# Warm-up: connections, caches, the allocator.
run warm /healthz >/dev/null
run warm /v1/authorize -H "X-API-Key: $KEY" >/dev/null

echo "| round | route | requests | server CPU µs/request | req/s | p99 ms | CPU vs /healthz |"
echo "|---|---|---|---|---|---|---|"
declare -a AUTHORIZE_RATIOS VERIFY_RATIOS
per_request() { # requests ticks -> µs of server CPU per request
    echo "scale=2; $2 * 1000000 / $TICKS / $1" | bc
}
for round in $(seq 1 "$ROUNDS"); do
    for pair in authorize verify; do
        read -r _ hreq hcpu hrps hp99 < <(run healthz /healthz)
        if [[ $pair == authorize ]]; then
            read -r _ req cpu_ticks rps p99 < <(run authorize /v1/authorize -H "X-API-Key: $KEY" -H "X-Vilvik-Required-Scopes: datasets:read")
            route=/v1/authorize
        else
            read -r _ req cpu_ticks rps p99 < <(run verify /v1/keys:verify -s "$WORK/verify.lua")
            route=/v1/keys:verify
        fi
        h=$(per_request "$hreq" "$hcpu")
        r=$(per_request "$req" "$cpu_ticks")
        ratio=$(echo "scale=3; $r / $h" | bc)
        echo "| $round | /healthz | $hreq | $h | $hrps | $hp99 | |"
        echo "| $round | $route | $req | $r | $rps | $p99 | $ratio |"
        if [[ $pair == authorize ]]; then AUTHORIZE_RATIOS+=("$ratio"); else VERIFY_RATIOS+=("$ratio"); fi
    done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
echo
echo "Median server CPU per request vs /healthz over $ROUNDS pairs: /v1/authorize $(median "${AUTHORIZE_RATIOS[@]}")x, /v1/keys:verify $(median "${VERIFY_RATIOS[@]}")x"
if [[ $PROFILE != release ]]; then
    echo "(a $PROFILE build: figures are not comparable with release ones)"
fi
