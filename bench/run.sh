#!/usr/bin/env bash
# The verify path against the gRPC framework's own no-op (the health
# check), start-up, memory, the miss path, timing and revocation
# propagation; see BENCHMARKS.md for what each figure means.
#
#   bash bench/run.sh            # Postgres at postgres://postgres@127.0.0.1:5432, N=1,000,000
#   N=100000 bash bench/run.sh   # a quicker run
#   bash bench/run.sh --sqlite   # the embedded store instead of Postgres
#   SIZE=tiny PROFILE=debug bash bench/run.sh   # every step in seconds (CI)
#
# Every load targets 127.0.0.1 only. Every step is bounded by `timeout`; the
# servers it starts are stopped and the database it created is dropped on
# exit, also on failure or Ctrl-C. The summary is printed and written to
# bench/results/<date>.md. The admin node runs with the admin rate limit
# lifted: the propagation step creates and revokes keys as fast as the
# node answers.
#
# Knobs (environment), with their SIZE=tiny values in brackets; SIZE,
# PROFILE, RESULTS_DIR and PG_URL as bench/lib.sh says:
#   N=1000000            keys to seed [2000]
#   PAIRS=5              interleaved health/verify pairs [1]
#   DURATION=10          seconds per h2load run (split into slices) [1]
#   SLICE=2              seconds per slice: each slice starts fresh h2load
#                        processes with other keys' bodies [1]
#   PARALLEL=4           h2load processes in parallel per slice
#   CONNS=1              connections per h2load process (PARALLEL*CONNS >= 4)
#   STREAMS=4            concurrent streams per connection (h2load -m)
#   HALF_STREAMS=1       streams per connection for the half-peak run: h2load
#                        --rps with -m > 1 adds about 10 ms of its own queueing
#   PROP_COUNT=1000      revocations for the propagation figure [20]
#   MISS_SECONDS=10      seconds per miss-path phase [1]
#   MISS_CONCURRENCY=16  requests in flight for the miss path
#   TIMING_SAMPLES=5000  requests of each kind for unknown prefix vs wrong secret [200]
#   BASE_PORT=27150      first of six consecutive ports on 127.0.0.1 (below
#                        the ephemeral range 32768-60999: a client socket
#                        given one of them as its source port would block
#                        a server from listening on it)
#   KEEP=1               keep the work directory (secrets file, h2load logs)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BACKEND=postgres
for arg in "$@"; do
  case "$arg" in
    --sqlite) BACKEND=sqlite ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

if tiny; then
  : "${N:=2000}" "${PAIRS:=1}" "${DURATION:=1}" "${SLICE:=1}" "${PROP_COUNT:=20}"
  : "${MISS_SECONDS:=1}" "${TIMING_SAMPLES:=200}"
fi
N=${N:-1000000}
PAIRS=${PAIRS:-5}
DURATION=${DURATION:-10}
SLICE=${SLICE:-2}
PARALLEL=${PARALLEL:-4}
CONNS=${CONNS:-1}
STREAMS=${STREAMS:-4}
HALF_STREAMS=${HALF_STREAMS:-1}
PROP_COUNT=${PROP_COUNT:-1000}
MISS_SECONDS=${MISS_SECONDS:-10}
MISS_CONCURRENCY=${MISS_CONCURRENCY:-16}
TIMING_SAMPLES=${TIMING_SAMPLES:-5000}
BASE_PORT=${BASE_PORT:-27150}
KEEP=${KEEP:-0}

ROOT=$BENCH_ROOT
SLICES=$(( (DURATION + SLICE - 1) / SLICE ))
CLIENTS=$(( PARALLEL * CONNS ))
CLK_TCK=$(getconf CLK_TCK)
if (( CLIENTS < 4 )); then
  echo "PARALLEL*CONNS is $CLIENTS: use at least 4 connections" >&2; exit 2
fi

# ---------------------------------------------------------------- cleanup --
WORK=$(mktemp -d /tmp/vilvik-bench.XXXXXX)
chmod 700 "$WORK"
SERVER_PIDS=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # h2load and probe processes run in subshells: they leave their pids here.
  if [[ -f "$WORK/client.pids" ]]; then
    while read -r pid; do
      # Only if the pid is still ours (not reused by another program).
      if grep -qa -e h2load -e vilvik-keys-bench "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
      fi
    done <"$WORK/client.pids"
  fi
  for pid in "${SERVER_PIDS[@]}"; do stop_pid "$pid"; done
  drop_db
  if [[ "$KEEP" == 1 ]]; then
    log "work directory kept: $WORK (holds secrets of a throw-away database)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools ----
need h2load jq awk grpcurl ss
[[ $BACKEND == postgres ]] && need psql
build
VK="$BIN/vilvik-keys"
BENCH="$BIN/vilvik-keys-bench"

ports_free BASE_PORT $(seq "$BASE_PORT" $((BASE_PORT + 5)))
P_MAIN=$BASE_PORT P_MAIN_ADMIN=$((BASE_PORT + 1))
P_ADMIN=$((BASE_PORT + 2)) P_ADMIN_VERIFY=$((BASE_PORT + 3))
P_V1=$((BASE_PORT + 4)) P_V2=$((BASE_PORT + 5))

# ------------------------------------------------------------- database ----
STORE_ENV=()
if [[ $BACKEND == postgres ]]; then
  create_db vk_bench
  STORE_ENV=(DATABASE_URL="$DATABASE_URL")
  log "fresh Postgres database $DB_NAME"
else
  STORE_ENV=(VILVIK_KEYS_SQLITE_PATH="$WORK/vilvik-keys.db")
  log "fresh SQLite file $WORK/vilvik-keys.db"
fi

# One pepper for every node and the seed, as in production.
"$VK" pepper new "$WORK/pepper" >/dev/null 2>&1 || die "cannot make a pepper file"
STORE_ENV+=(VILVIK_KEYS_PEPPER_FILE="$WORK/pepper")

KEYS="$WORK/keys.txt"

# -------------------------------------------------------------- servers ----
# start_server NAME ROLE VERIFY_PORT ADMIN_PORT [ARGS...]: sets SERVER_PID
# and START_MS (epoch ms just before exec).
start_server() {
  local name=$1 role=$2 vport=$3 aport=$4; shift 4
  START_MS=$(date +%s%3N)
  env "${STORE_ENV[@]}" \
    VILVIK_KEYS_VERIFY_ADDR="127.0.0.1:$vport" VILVIK_KEYS_ADMIN_ADDR="127.0.0.1:$aport" \
    VILVIK_KEYS_LOG_FORMAT=json RUST_LOG="${RUST_LOG:-info}" \
    "${EXTRA_ENV[@]}" \
    "$VK" serve --role "$role" "$@" >"$WORK/$name.log" 2>&1 &
  SERVER_PID=$!
  SERVER_PIDS+=("$SERVER_PID")
}
EXTRA_ENV=()

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# utime + stime of every thread, in clock ticks (fields 14 and 15; the
# command name has no spaces).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# probe PORT PID [ARGS...]: waits until the node answers the first seeded
# key VALID (or as ARGS say, e.g. --any-answer); fails at once if the
# node's process exits.
probe() {
  local port=$1 pid=$2 out="$WORK/probe.$1.json" prober
  shift 2
  local what=("$@")
  (( ${#what[@]} )) || what=(--keys "$KEYS")
  timeout 180 "$BENCH" probe --verify "127.0.0.1:$port" "${what[@]}" --timeout-s 170 >"$out" &
  prober=$!
  echo "$prober" >>"$WORK/client.pids"
  while kill -0 "$prober" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then kill "$prober" 2>/dev/null; wait "$prober" 2>/dev/null; return 1; fi
    sleep 0.05
  done
  wait "$prober" || return 1
  cat "$out"
}

# RSS of a verify node that holds nothing (the store is still empty: it
# also has no prefix to keep in its set of known prefixes), for comparison.
# It is stopped before seeding, or its change feed would learn every
# seeded prefix.
log "baseline: verify node on the empty store"
start_server empty verify "$P_MAIN" "$P_MAIN_ADMIN"
EMPTY_PID=$SERVER_PID
probe "$P_MAIN" "$EMPTY_PID" --any-answer >/dev/null \
  || { tail -5 "$WORK/empty.log" >&2; die "the node on the empty store never answered"; }
sleep 1
RSS_EMPTY_KB=$(rss_kb "$EMPTY_PID")
stop_pid "$EMPTY_PID"

log "seeding $N keys"
SEED_JSON=$(env "${STORE_ENV[@]}" timeout 3600 "$BENCH" seed --keys "$N" --accounts 100 \
  --out "$KEYS" --json 2>"$WORK/seed.log") || { tail -5 "$WORK/seed.log" >&2; die "seed"; }
log "seed: $(jq -r '"\(.keys) keys in \(.seconds|floor) s, \(.keys_per_s|floor) keys/s"' <<<"$SEED_JSON")"

# A node without --preload after seeding holds the set of every known
# prefix (and, after the probe, one cached key): the set's own cost.
log "verify node without --preload (set of known prefixes only)"
start_server prefixes verify "$P_MAIN" "$P_MAIN_ADMIN"
PREFIX_PID=$SERVER_PID
probe "$P_MAIN" "$PREFIX_PID" >/dev/null || { tail -5 "$WORK/prefixes.log" >&2; die "the node without --preload never answered VALID"; }
sleep 1
RSS_PREFIX_KB=$(rss_kb "$PREFIX_PID")
stop_pid "$PREFIX_PID"
KNOWN_LINE=$(grep -m1 'loaded the known key prefixes' "$WORK/prefixes.log" || true)
KNOWN_PREFIXES=$(jq -r '.fields.prefixes // .prefixes // empty' <<<"$KNOWN_LINE" 2>/dev/null || true)
KNOWN_MS=$(jq -r '.fields.duration_ms // .duration_ms // empty' <<<"$KNOWN_LINE" 2>/dev/null || true)
[[ "$KNOWN_PREFIXES" == "$N" ]] || die "the node without --preload loaded '${KNOWN_PREFIXES}' known prefixes, not $N"

log "starting the verify node with --preload"
start_server main verify "$P_MAIN" "$P_MAIN_ADMIN" --preload
MAIN_PID=$SERVER_PID
PROBE_JSON=$(probe "$P_MAIN" "$MAIN_PID") || { tail -5 "$WORK/main.log" >&2; die "preloaded node never answered VALID"; }
FIRST_VALID_MS=$(( $(jq -r .valid_at_epoch_ms <<<"$PROBE_JSON") - START_MS ))
PRELOAD_LINE=$(grep -m1 'preloaded keys' "$WORK/main.log" || true)
PRELOAD_KEYS=$(jq -r '.fields["keys.loaded"] // .["keys.loaded"] // empty' <<<"$PRELOAD_LINE" 2>/dev/null || true)
PRELOAD_MS=$(jq -r '.fields.duration_ms // .duration_ms // empty' <<<"$PRELOAD_LINE" 2>/dev/null || true)
sleep 2
RSS_MAIN_KB=$(rss_kb "$MAIN_PID")
per_key() { awk -v a="$1" -v b="$2" -v n="$N" 'BEGIN {printf "%.0f", (a - b) * 1024 / n}'; }
BYTES_PER_KEY=$(per_key "$RSS_MAIN_KB" "$RSS_EMPTY_KB")
PREFIX_BYTES_PER_KEY=$(per_key "$RSS_PREFIX_KB" "$RSS_EMPTY_KB")
log "first VALID ${FIRST_VALID_MS} ms after start; preload ${PRELOAD_KEYS:-?} keys in ${PRELOAD_MS:-?} ms"
log "RSS: empty store ${RSS_EMPTY_KB} kB; prefix set only ${RSS_PREFIX_KB} kB (${PREFIX_BYTES_PER_KEY} B/key, loaded in ${KNOWN_MS:-?} ms); preloaded ${RSS_MAIN_KB} kB (${BYTES_PER_KEY} B/key)"

# --------------------------------------------------------------- bodies ----
BODY_DIR="$WORK/bodies"
NBODIES=$(( (PAIRS + 2) * SLICES * PARALLEL ))
if (( NBODIES > N )); then NBODIES=$N; fi
"$BENCH" bodies --keys "$KEYS" --count "$NBODIES" --out "$BODY_DIR" >/dev/null
BODY_CURSOR=0

log "spot checks with grpcurl"
HEALTH=$(timeout 30 grpcurl -plaintext "127.0.0.1:$P_MAIN" grpc.health.v1.Health/Check | jq -r .status)
[[ "$HEALTH" == SERVING ]] || die "health check answered '$HEALTH', not SERVING"
SPOT_OK=0 SPOT_TOTAL=0
while read -r key; do
  code=$(timeout 30 grpcurl -plaintext -d "{\"key\":\"$key\",\"required_scopes\":[\"datasets:read\"]}" \
    "127.0.0.1:$P_MAIN" vilvik.keys.v1.KeyVerify/VerifyKey | jq -r .code)
  SPOT_TOTAL=$((SPOT_TOTAL + 1))
  if [[ "$code" == VERIFY_CODE_VALID ]]; then SPOT_OK=$((SPOT_OK + 1)); fi
done < <(awk -v step=$(( NBODIES / 10 > 0 ? NBODIES / 10 : 1 )) '(NR - 1) % step == 0' "$BODY_DIR/keys.txt")
(( SPOT_OK == SPOT_TOTAL )) || die "only $SPOT_OK of $SPOT_TOTAL sampled keys answered VALID"
log "health SERVING; $SPOT_OK/$SPOT_TOTAL sampled keys VALID"

# ---------------------------------------------------------------- h2load ---
RUNS="$WORK/runs"
mkdir -p "$RUNS"

# h2run KIND ID [RPS_PER_CLIENT]: DURATION seconds of load on the main node
# in SLICES consecutive slices of PARALLEL h2load processes, each process
# posting the body of another key (from BODY_CURSOR on); prints one JSON
# object with the rate, latency, CPU per request and error counts.
# Call as `x=$(h2run ...); advance` (the subshell cannot move the cursor).
advance() { BODY_CURSOR=$(( (BODY_CURSOR + SLICES * PARALLEL) % NBODIES )); }
h2run() {
  local kind=$1 id=$2 rps=${3:-} path body out s p cpu0 cpu1 t0 t1
  local next=$BODY_CURSOR streams=$STREAMS
  if [[ -n $rps ]]; then streams=$HALF_STREAMS; fi
  local pids=()
  cpu0=$(cpu_ticks "$MAIN_PID"); t0=$(date +%s%N)
  for ((s = 0; s < SLICES; s++)); do
    pids=()
    for ((p = 0; p < PARALLEL; p++)); do
      if [[ $kind == health ]]; then
        body="$BODY_DIR/health.bin"; path=/grpc.health.v1.Health/Check
      else
        body="$BODY_DIR/$(printf 'verify-%05d.bin' "$next")"; path=/vilvik.keys.v1.KeyVerify/VerifyKey
        next=$(( (next + 1) % NBODIES ))
      fi
      out="$RUNS/$id-s$s-p$p"
      timeout $((SLICE + 30)) h2load -c "$CONNS" -t 1 -m "$streams" -D "$SLICE" ${rps:+--rps="$rps"} \
        -d "$body" -H 'content-type: application/grpc' -H 'te: trailers' \
        --log-file="$out.log" "http://127.0.0.1:$P_MAIN$path" >"$out.txt" 2>&1 &
      pids+=($!)
      echo $! >>"$WORK/client.pids"
    done
    for pid in "${pids[@]}"; do wait "$pid" || die "h2load failed: $(cat "$RUNS/$id"-s"$s"-p*.txt | tail -3)"; done
  done
  t1=$(date +%s%N); cpu1=$(cpu_ticks "$MAIN_PID")
  local lat
  lat=$("$BENCH" h2log "$RUNS/$id"-s*-p*.log)
  cat "$RUNS/$id"-s*-p*.txt | awk -v slices="$SLICES" -v ticks=$((cpu1 - cpu0)) -v hz="$CLK_TCK" \
      -v wall_ns=$((t1 - t0)) -v kind="$kind" -v lat="$lat" '
    /^finished in/ { gsub(",", "", $4); rate += $4 }
    /^requests:/ { total += $2; done_ += $6; ok += $8; failed += $10; errored += $12; timeout_ += $14 }
    /^status codes:/ { s2xx += $3; sother += $5 + $7 + $9 }
    /^traffic:/ { for (i = 1; i <= NF; i++) if ($(i + 1) == "data") { d = $i; gsub(/[()]/, "", d); data += d } }
    END {
      cpu_us = ticks / hz * 1e6
      printf "{\"kind\":\"%s\",\"rate\":%.1f,\"done\":%d,\"succeeded\":%d,\"failed\":%d,\"errored\":%d,\"timeout\":%d,\"status_2xx\":%d,\"status_other\":%d,", kind, rate / slices, done_, ok, failed, errored, timeout_, s2xx, sother
      printf "\"data_bytes_per_response\":%.1f,\"cpu_s\":%.2f,\"cpu_us_per_req\":%.2f,\"wall_s\":%.2f,\"latency\":%s}\n", (done_ ? data / done_ : 0), cpu_us / 1e6, (done_ ? cpu_us / done_ : 0), wall_ns / 1e9, lat
    }'
}

check_run() {
  local j=$1
  # h2load may count the status of a request cut off at the end of -D
  # without counting it done: every counted status must be 2xx, and every
  # logged (finished) request must be HTTP 200.
  jq -e '.done > 0 and .failed == 0 and .errored == 0 and .timeout == 0 and .status_other == 0
         and .status_2xx >= .done and (.latency.statuses | keys) == ["200"]' \
    >/dev/null <<<"$j" || die "run had failures: $j"
  if [[ $(jq -r .kind <<<"$j") == verify ]]; then
    # A VALID answer carries the key id, account, name and scopes: tens of
    # bytes. MALFORMED or NOT_FOUND answers are a few bytes.
    jq -e '.data_bytes_per_response > 40' >/dev/null <<<"$j" \
      || die "verify responses are too small to be VALID answers: $j"
  fi
}

log "warm-up (discarded)"
check_run "$(h2run health warm-h)"
check_run "$(h2run verify warm-v)"; advance

PAIR_FILE="$WORK/pairs.jsonl"
: >"$PAIR_FILE"
for ((i = 1; i <= PAIRS; i++)); do
  h=$(h2run health "pair$i-h"); check_run "$h"
  v=$(h2run verify "pair$i-v"); advance; check_run "$v"
  jq -c -n --argjson h "$h" --argjson v "$v" --argjson i "$i" \
    '{pair: $i, health: $h, verify: $v, rate_ratio: ($v.rate / $h.rate), cpu_ratio: ($v.cpu_us_per_req / $h.cpu_us_per_req)}' \
    >>"$PAIR_FILE"
  log "pair $i: health $(jq -r .rate <<<"$h") req/s ($(jq -r .cpu_us_per_req <<<"$h") µs CPU/req), verify $(jq -r .rate <<<"$v") req/s ($(jq -r .cpu_us_per_req <<<"$v") µs CPU/req)"
done

median() { sort -g | awk '{a[NR] = $1} END {if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
MED_RATE_RATIO=$(jq -r .rate_ratio "$PAIR_FILE" | median)
MED_CPU_RATIO=$(jq -r .cpu_ratio "$PAIR_FILE" | median)
MED_V_RATE=$(jq -r .verify.rate "$PAIR_FILE" | median)
MED_H_RATE=$(jq -r .health.rate "$PAIR_FILE" | median)
MED_V_CPU=$(jq -r .verify.cpu_us_per_req "$PAIR_FILE" | median)
MED_H_CPU=$(jq -r .health.cpu_us_per_req "$PAIR_FILE" | median)
MED_V_P50=$(jq -r .verify.latency.p50_ms "$PAIR_FILE" | median)
MED_V_P99=$(jq -r .verify.latency.p99_ms "$PAIR_FILE" | median)
MED_H_P50=$(jq -r .health.latency.p50_ms "$PAIR_FILE" | median)
MED_H_P99=$(jq -r .health.latency.p99_ms "$PAIR_FILE" | median)

# Half the peak verify rate, spread over the same clients (h2load --rps is
# per client, i.e. per connection).
HALF_RPS_PER_CLIENT=$(awk -v r="$MED_V_RATE" -v c="$CLIENTS" 'BEGIN {printf "%d", r / 2 / c}')
log "verify at half the peak: $HALF_RPS_PER_CLIENT req/s per connection x $CLIENTS"
HALF=$(h2run verify half "$HALF_RPS_PER_CLIENT"); advance; check_run "$HALF"
log "half-peak: $(jq -r .rate <<<"$HALF") req/s, p99 $(jq -r .latency.p99_ms <<<"$HALF") ms"

# Re-check after the load: still SERVING, still VALID.
HEALTH=$(timeout 30 grpcurl -plaintext "127.0.0.1:$P_MAIN" grpc.health.v1.Health/Check | jq -r .status)
[[ "$HEALTH" == SERVING ]] || die "after the load, health answered '$HEALTH'"

log "unknown prefix against wrong secret: $TIMING_SAMPLES requests of each, one at a time"
TIMING_JSON=$(timeout $((TIMING_SAMPLES / 100 + 120)) "$BENCH" timing --verify "127.0.0.1:$P_MAIN" \
  --keys "$KEYS" --samples "$TIMING_SAMPLES" --timeout-s $((TIMING_SAMPLES / 100 + 110))) \
  || die "timing (both kinds must answer NOT_FOUND)"
log "timing: p50 unknown $(jq -r .unknown_prefix.p50_us <<<"$TIMING_JSON") µs, wrong secret $(jq -r .wrong_secret.p50_us <<<"$TIMING_JSON") µs (ratio $(jq -r '.p50_ratio*1000|round/1000' <<<"$TIMING_JSON"))"
stop_pid "$MAIN_PID"

# ------------------------------------------- miss path and propagation -----
# One admin node (role all: it also serves verify, in the same process) and
# two verify nodes, none preloaded, all on the same store.
TOKEN=$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 48)
log "starting admin node and two verify nodes"
EXTRA_ENV=(VILVIK_KEYS_OPERATOR_TOKEN="$TOKEN"
  VILVIK_KEYS_FREE_TIER_LIMIT=$((PROP_COUNT + 10)) VILVIK_KEYS_PREMIUM_TIER_LIMIT=$((PROP_COUNT + 10))
  VILVIK_KEYS_ADMIN_RATE_PER_SECOND=1000000 VILVIK_KEYS_ADMIN_RATE_BURST=1000000)
start_server admin all "$P_ADMIN_VERIFY" "$P_ADMIN"
ADMIN_PID=$SERVER_PID
EXTRA_ENV=()
start_server verify1 verify "$P_V1" "$((BASE_PORT + 1))"
V1_PID=$SERVER_PID
start_server verify2 verify "$P_V2" "$((BASE_PORT + 1))"
V2_PID=$SERVER_PID
for node in "admin $P_ADMIN_VERIFY $ADMIN_PID" "verify1 $P_V1 $V1_PID" "verify2 $P_V2 $V2_PID"; do
  read -r name port pid <<<"$node"
  probe "$port" "$pid" >/dev/null || { tail -3 "$WORK/$name.log" >&2; die "$name node never answered"; }
done

# Store transactions of the bench database (every node's, none of
# psql's: it reads from the database postgres). A backend reports its
# counters at the end of a transaction at most once a second, so each
# read waits 1.2 s first; xact_mark prints "<epoch ns> <count>".
xact_mark() {
  sleep 1.2
  local count
  count=$(timeout 30 psql -At "$PG_URL/postgres" \
    -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '$DB_NAME'") \
    || die "cannot read pg_stat_database"
  echo "$(date +%s%N) $count"
}
miss() {
  timeout $((MISS_SECONDS + 120)) "$BENCH" miss --concurrency "$MISS_CONCURRENCY" \
    --seconds "$MISS_SECONDS" "$@" || die "miss $*"
}

# The phases that must cost no store access run first, on nodes that have
# done nothing since their probe: a backend's unreported counts of earlier
# work (the real uncached keys) would otherwise land in their window.
log "miss path on a fresh verify node (${MISS_SECONDS} s per phase)"
[[ $BACKEND == postgres ]] && X0=$(xact_mark)
RANDOM_JSON=$(miss --phases random --verify "127.0.0.1:$P_V1")
[[ $BACKEND == postgres ]] && X1=$(xact_mark)
BEARER_JSON=$(miss --phases bearer --admin "127.0.0.1:$P_ADMIN")
if [[ $BACKEND == postgres ]]; then
  X2=$(xact_mark)
  # The nodes' background (consistency checks, listener heartbeats) over
  # an idle window as long as the longer of the two.
  read -r t0 _ <<<"$X0"; read -r t1 _ <<<"$X1"; read -r t2 _ <<<"$X2"
  IDLE_S=$(awk -v a=$((t1 - t0)) -v b=$((t2 - t1)) 'BEGIN {w = (a > b ? a : b) / 1e9 - 1.2; if (w < 0) w = 0; printf "%.3f", w}')
  log "idle window: $(awk -v w="$IDLE_S" 'BEGIN {printf "%.1f", w + 1.2}') s"
  sleep "$IDLE_S"
  X3=$(xact_mark)
fi
REAL_JSON=$(miss --phases real --verify "127.0.0.1:$P_V1" --keys "$KEYS" --skip 1)
MISS_JSON=$(jq -c -s add <<<"$REAL_JSON $RANDOM_JSON $BEARER_JSON")
for phase in real_uncached random_unknown random_bearer; do
  jq -e --arg p "$phase" '.[$p].unexpected == 0 and .[$p].errors == 0' >/dev/null <<<"$MISS_JSON" \
    || die "miss phase $phase had unexpected answers: $(jq -c --arg p "$phase" '.[$p].codes' <<<"$MISS_JSON")"
done
XACT_JSON=null
if [[ $BACKEND == postgres ]]; then
  # Per phase: its window's transactions less the idle rate times the
  # window, divided by its requests.
  XACT_JSON=$(awk -v x0="$X0" -v x1="$X1" -v x2="$X2" -v x3="$X3" \
      -v rr="$(jq -r .random_unknown.requests <<<"$MISS_JSON")" -v rb="$(jq -r .random_bearer.requests <<<"$MISS_JSON")" '
    BEGIN {
      split(x0, a, " "); split(x1, b, " "); split(x2, c, " "); split(x3, d, " ")
      idle_s = (d[1] - c[1]) / 1e9; idle_x = d[2] - c[2]; rate = idle_x / idle_s
      wr = (b[1] - a[1]) / 1e9; xr = b[2] - a[2]; nr = xr - rate * wr
      wb = (c[1] - b[1]) / 1e9; xb = c[2] - b[2]; nb = xb - rate * wb
      printf "{\"idle\":{\"seconds\":%.2f,\"xacts\":%d,\"per_s\":%.2f},", idle_s, idle_x, rate
      printf "\"random_unknown\":{\"seconds\":%.2f,\"xacts\":%d,\"net\":%.1f,\"requests\":%d,\"per_verify\":%.4f,\"per_verify_3\":\"%.3f\"},", wr, xr, nr, rr, nr / rr, nr / rr
      printf "\"random_bearer\":{\"seconds\":%.2f,\"xacts\":%d,\"net\":%.1f,\"requests\":%d,\"per_verify\":%.4f,\"per_verify_3\":\"%.3f\"}}\n", wb, xb, nb, rb, nb / rb, nb / rb
    }')
  log "store transactions per verify: random keys $(jq -r .random_unknown.per_verify_3 <<<"$XACT_JSON"), random bearer tokens $(jq -r .random_bearer.per_verify_3 <<<"$XACT_JSON") (idle $(jq -r .idle.per_s <<<"$XACT_JSON")/s subtracted)"
fi
log "miss: real $(jq -r '.real_uncached.rate_per_s|floor' <<<"$MISS_JSON") req/s p99 $(jq -r .real_uncached.p99_ms <<<"$MISS_JSON") ms; random $(jq -r '.random_unknown.rate_per_s|floor' <<<"$MISS_JSON") req/s p99 $(jq -r .random_unknown.p99_ms <<<"$MISS_JSON") ms; random bearer $(jq -r '.random_bearer.rate_per_s|floor' <<<"$MISS_JSON") req/s p99 $(jq -r .random_bearer.p99_ms <<<"$MISS_JSON") ms"

log "revocation propagation: $PROP_COUNT keys"
PROP_JSON=$(VILVIK_KEYS_OPERATOR_TOKEN="$TOKEN" timeout $((PROP_COUNT / 2 + 600)) "$BENCH" propagation \
  --admin "127.0.0.1:$P_ADMIN" --verify "127.0.0.1:$P_ADMIN_VERIFY,127.0.0.1:$P_V1,127.0.0.1:$P_V2" \
  --same-process "127.0.0.1:$P_ADMIN_VERIFY" --count "$PROP_COUNT" 2>"$WORK/propagation.log") \
  || { tail -5 "$WORK/propagation.log" >&2; die "propagation"; }
for pid in "${SERVER_PIDS[@]}"; do stop_pid "$pid"; done

# --------------------------------------------------------------- report ----
verdict() { if awk "BEGIN {exit !($1)}"; then echo "met"; else echo "**not met**"; fi; }
# Targets stated "at 1M keys" only count on a run with at least that many.
AT_1M=""
if (( N < 1000000 )); then AT_1M=" (this run has $N keys: not comparable)"; fi
node_row() {
  local addr=$1 label=$2
  jq -r --arg a "$addr" --arg l "$label" \
    '.nodes[$a] | "| \($l) | \(.p50_ms) | \(.p99_ms) | \(.max_ms) | \(.valid_after_revoke_returned) | \(.timeouts) |"' <<<"$PROP_JSON"
}
PROP_P99_WORST=$(jq -r '[.nodes | to_entries[] | select(.value.same_process_as_admin | not) | .value.p99_ms] | max' <<<"$PROP_JSON")
SAME_VALID=$(jq -r .same_process_valid_after_revoke <<<"$PROP_JSON")
HALF_P99=$(jq -r .latency.p99_ms <<<"$HALF")

REPORT="$WORK/report.md"
{
  echo "# vilvik-keys benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), shared and noisy."
  echo "Backend: $BACKEND. Build: $PROFILE.$(tiny && echo ' Size: tiny (a check that every step works; its figures mean nothing).') Commit: $(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')."
  echo "Load: h2load, $PARALLEL processes x $CONNS connection(s) x $STREAMS streams, $DURATION s per run in $SLICES slices of $SLICE s; $NBODIES distinct keys, each slice process a different one."
  echo
  echo "## Seeding and start-up"
  echo
  echo "| figure | value | target |"
  echo "|---|---|---|"
  echo "| keys seeded (\`Store::import_keys\`, chunks of 10,000) | $N at $(jq -r '.keys_per_s|floor' <<<"$SEED_JSON") keys/s | |"
  echo "| first VALID answer after process start, \`--preload\` | ${FIRST_VALID_MS} ms (preload itself: ${PRELOAD_MS:-?} ms, ${PRELOAD_KEYS:-?} secrets) | < 5000 ms at 1M keys: $(verdict "$FIRST_VALID_MS < 5000")$AT_1M |"
  echo "| RSS, verify node on the empty store / without preload after seeding (set of known prefixes) / with preload | ${RSS_EMPTY_KB} kB / ${RSS_PREFIX_KB} kB / ${RSS_MAIN_KB} kB | |"
  echo "| RSS growth per key with preload: cache and set of known prefixes, against the empty store | ${BYTES_PER_KEY} B | <= 250 B at 1M keys: $(verdict "$BYTES_PER_KEY <= 250")$AT_1M |"
  echo "| of which the set of known prefixes alone (node without preload) | ${PREFIX_BYTES_PER_KEY} B (${KNOWN_PREFIXES} prefixes loaded in ${KNOWN_MS:-?} ms) | |"
  echo
  echo "## VerifyKey against the health check ($PAIRS interleaved pairs)"
  echo
  echo "| pair | health req/s | verify req/s | verify/health rate | health CPU µs/req | verify CPU µs/req | verify/health CPU | health p50/p99 ms | verify p50/p99 ms |"
  echo "|---|---|---|---|---|---|---|---|---|"
  jq -r '"| \(.pair) | \(.health.rate|floor) | \(.verify.rate|floor) | \(.rate_ratio*1000|round/1000) | \(.health.cpu_us_per_req) | \(.verify.cpu_us_per_req) | \(.cpu_ratio*1000|round/1000) | \(.health.latency.p50_ms)/\(.health.latency.p99_ms) | \(.verify.latency.p50_ms)/\(.verify.latency.p99_ms) |"' "$PAIR_FILE"
  echo "| **median** | $(printf %.0f "$MED_H_RATE") | $(printf %.0f "$MED_V_RATE") | **$(printf %.3f "$MED_RATE_RATIO")** | $MED_H_CPU | $MED_V_CPU | **$(printf %.3f "$MED_CPU_RATIO")** | $MED_H_P50/$MED_H_P99 | $MED_V_P50/$MED_V_P99 |"
  echo
  echo "Target: verify >= 0.95 x health rate ($(verdict "$MED_RATE_RATIO >= 0.95")) or verify CPU per request <= 1.10 x health ($(verdict "$MED_CPU_RATIO <= 1.10"))."
  echo "Every run: all requests 2xx, none failed, errored or timed out; verify responses averaged $(jq -s '[.[].verify.data_bytes_per_response] | add / length | floor' "$PAIR_FILE") bytes of data (a VALID answer; checked > 40); grpcurl: health SERVING, $SPOT_OK/$SPOT_TOTAL sampled keys VALID."
  echo
  echo "## Latency at half the peak verify rate"
  echo
  echo "| offered | achieved req/s | p50 ms | p99 ms | target |"
  echo "|---|---|---|---|---|"
  echo "| $HALF_RPS_PER_CLIENT req/s x $CLIENTS connections | $(jq -r '.rate|floor' <<<"$HALF") | $(jq -r .latency.p50_ms <<<"$HALF") | $HALF_P99 | p99 <= 1 ms: $(verdict "$HALF_P99 <= 1") |"
  echo
  echo "## Miss path ($BACKEND, fresh verify node; random_bearer: the admin node's ListKeys; $MISS_CONCURRENCY in flight over 4 connections, ${MISS_SECONDS} s each)"
  echo
  echo "| case | requests | req/s | p50 ms | p99 ms | answers |"
  echo "|---|---|---|---|---|---|"
  jq -r 'to_entries[] | "| \(.key) | \(.value.requests) | \(.value.rate_per_s|floor) | \(.value.p50_ms) | \(.value.p99_ms) | \(.value.codes | to_entries | map("\(.key) \(.value)") | join(", "))\(if .value.errors > 0 then ", errors \(.value.errors)" else "" end) |"' <<<"$MISS_JSON"
  echo
  if [[ $BACKEND == postgres ]]; then
    echo "## Store transactions on the miss path (Postgres, \`pg_stat_database\` of the bench database)"
    echo
    echo "\`xact_commit + xact_rollback\` before and after each phase (each read 1.2 s after the last request), less the three nodes' background: $(jq -r .idle.xacts <<<"$XACT_JSON") transactions in an idle window of $(jq -r .idle.seconds <<<"$XACT_JSON") s ($(jq -r .idle.per_s <<<"$XACT_JSON")/s) times the phase's window."
    echo
    echo "| case | requests | window s | transactions in window | less background | per verify | target |"
    echo "|---|---|---|---|---|---|---|"
    for phase in random_unknown random_bearer; do
      label="random well-formed keys, VerifyKey"
      [[ $phase == random_bearer ]] && label="random \`vlk_\` bearer tokens, ListKeys on the admin node"
      jq -r --arg p "$phase" --arg l "$label" --arg v "$(verdict "$(jq -r --arg p "$phase" '.[$p].per_verify' <<<"$XACT_JSON") < 0.005")" --arg at "$AT_1M" \
        '.[$p] | "| \($l) | \(.requests) | \(.seconds) | \(.xacts) | \(.net) | **\(.per_verify_3)** | 0.00 at 1M keys: \($v)\($at) |"' <<<"$XACT_JSON"
    done
    echo
  fi
  TIMING_P50_RATIO=$(jq -r .p50_ratio <<<"$TIMING_JSON")
  echo "## Unknown prefix against a known prefix with a wrong secret (preloaded node, one connection, one request at a time)"
  echo
  echo "$(jq -r .samples_each <<<"$TIMING_JSON") requests of each kind, interleaved (a, b, b, a, ...); a: a random well-formed key (a fresh prefix each time); b: a seeded key's prefix with another secret and a valid checksum (another seeded key each time). Latency is the server's work plus the loopback round trip."
  echo
  echo "| case | p50 µs | p90 µs | p99 µs | mean µs | answers |"
  echo "|---|---|---|---|---|---|"
  for kind in unknown_prefix wrong_secret; do
    jq -r --arg k "$kind" '.[$k] | "| \($k | sub("_"; " ")) | \(.p50_us) | \(.p90_us) | \(.p99_us) | \(.mean_us) | \(.codes | to_entries | map("\(.key) \(.value)") | join(", ")) |"' <<<"$TIMING_JSON"
  done
  echo
  echo "Ratio unknown / wrong secret: p50 **$(printf %.3f "$TIMING_P50_RATIO")**, p90 $(jq -r '.p90_ratio' <<<"$TIMING_JSON" | xargs printf %.3f). Target: medians within 5 % ($(verdict "$TIMING_P50_RATIO >= 0.95 && $TIMING_P50_RATIO <= 1.05"))."
  echo
  echo "## Revocation propagation ($(jq -r .keys <<<"$PROP_JSON") revokes through the admin node)"
  echo
  echo "Time from the RevokeKey RPC's return until the node first answers not-valid (each node held the key as VALID before)."
  echo "RevokeKey RPC itself: p50 $(jq -r .revoke_rpc.p50_ms <<<"$PROP_JSON") ms, p99 $(jq -r .revoke_rpc.p99_ms <<<"$PROP_JSON") ms."
  echo
  echo "| node | p50 ms | p99 ms | max ms | VALID answers after revoke returned | never rejected (5 s) |"
  echo "|---|---|---|---|---|---|"
  node_row "127.0.0.1:$P_ADMIN_VERIFY" "admin's own process"
  node_row "127.0.0.1:$P_V1" "verify node 1"
  node_row "127.0.0.1:$P_V2" "verify node 2"
  echo
  echo "Targets: p99 <= 100 ms on the other nodes ($(verdict "$PROP_P99_WORST <= 100")); 0 VALID answers after the revoke returned on the admin's own process ($(verdict "$SAME_VALID == 0"))."
  echo
  echo "Before that, from each CreateKey's return until the node first answered VALID (a node learns a new prefix from the change feed; until then it answers NOT_FOUND): $(jq -r --arg a "127.0.0.1:$P_ADMIN_VERIFY" --arg b "127.0.0.1:$P_V1" --arg c "127.0.0.1:$P_V2" \
    '.created_until_valid as $w | [["admin'"'"'s own process", $a], ["verify node 1", $b], ["verify node 2", $c]] | map("\(.[0]) p50 \($w[.[1]].p50_ms) / p99 \($w[.[1]].p99_ms) / max \($w[.[1]].max_ms) ms") | join("; ")' <<<"$PROP_JSON")."
} >"$REPORT"

RESULT=$(result_file "$(date -u +%Y-%m-%d).md")
[[ -n "$RESULT" && -e "$RESULT" ]] && RESULT=$(result_file "$(date -u +%Y-%m-%d-%H%M).md")
[[ -n "$RESULT" ]] && cp "$REPORT" "$RESULT"
echo
cat "$REPORT"
echo
if [[ -n "$RESULT" ]]; then log "written to ${RESULT#"$ROOT"/}"; fi
