#!/usr/bin/env bash
# Haven's benchmark: builds the server and the load generator, then runs
# every scenario of `haven-load` against fresh servers on fresh SQLite files
# (default limits, durable writes), several runs each, and records the
# results and their medians. See docs/benchmarks.md.
#
#   scripts/bench.sh                 # the full run (about an hour on 2 cores)
#   scripts/bench.sh --quick         # every scenario once, briefly, at small scale
#   scripts/bench.sh --runs 5        # more runs per figure
#   scripts/bench.sh --only "direct idle"   # some groups only:
#                                    #   baseline direct idle bot takeover postgres scaling
#
# Environment:
#   HAVEN_BIN, HAVEN_LOAD_BIN   use these binaries instead of building them
#   BENCH_OUT                   where results go (default target/bench/DATE)
#   BENCH_RUST_LOG              RUST_LOG for the servers (default: Haven's own)
#   BENCH_RATE                  the rate of the `baseline` and `direct` groups' runs
#                               below saturation, in msg/s (default 10000)
#   BENCH_POSTGRES_URL          the PostgreSQL server for the `postgres` group, as a
#                               superuser (default postgres://postgres@127.0.0.1:5432)
#   BENCH_POSTGRES_SOCKET       its Unix socket directory (default /var/run/postgresql)
#
# It starts only loopback servers, and stops only the processes it started.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
RUNS=3
ONLY="baseline direct idle bot takeover postgres scaling"
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1; RUNS=1 ;;
        --runs) RUNS=$2; shift ;;
        --only) ONLY=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

OUT=${BENCH_OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)$([[ $QUICK == 1 ]] && echo -quick)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

if [[ -z ${HAVEN_BIN:-} || -z ${HAVEN_LOAD_BIN:-} ]]; then
    echo "== building (release)"
    (cd "$ROOT" && cargo build --release -p haven -p haven-load)
fi
HAVEN_BIN=${HAVEN_BIN:-$ROOT/target/release/haven}
LOAD=${HAVEN_LOAD_BIN:-$ROOT/target/release/haven-load}

# Every socket is a file: raise the limit as far as this machine allows.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FILES=$(ulimit -n)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/haven-bench.XXXXXX")
STARTED=()   # pids of the processes this script started, and only those
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PASSWORD="bench-password-$RANDOM$RANDOM"
export HAVEN_LOAD_PASSWORD=$PASSWORD
ACCOUNTS=4
NET=0          # second octet of the load generator's source addresses
SERVER_PID=""
SERVER_ADDR=""

log() { echo "== $*" | tee -a "$OUT/bench.log" >&2; }

# Waits for `PATTERN` in FILE and prints the first http://… address after it.
wait_for_address() {
    local file=$1 pattern=$2 pid=$3 line
    for _ in $(seq 1 300); do
        line=$(grep -m1 "$pattern" "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then
            sed -E 's#.*http://([^/ ]+).*#\1#' <<<"$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "no address in $file" >&2
    tail -20 "$file" "${file%.out}.err" >&2 2>/dev/null || true
    return 1
}

stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!STARTED[@]}"; do
        [[ ${STARTED[$i]} == "$pid" ]] && unset 'STARTED[i]'
    done
    STARTED=("${STARTED[@]}")
}

# start_server NAME [serve flags…]: a fresh database with $ACCOUNTS therapist
# accounts, and Haven on a free loopback port. Sets SERVER_PID and SERVER_ADDR.
start_server() {
    local name=$1; shift
    local dir=$WORK/$name
    rm -rf "$dir"; mkdir -p "$dir"
    # $DATABASE, when set, is a fresh PostgreSQL database to use instead.
    local db=${DATABASE:-"sqlite://$dir/haven.db"}
    local n
    for n in $(seq 1 "$ACCOUNTS"); do
        printf '%s\n' "$PASSWORD" |
            "$HAVEN_BIN" --database "$db" therapist add --email "bench-$n@load.test" --name "Bench $n" >/dev/null
    done
    if [[ -n ${BENCH_RUST_LOG:-} ]]; then
        RUST_LOG=$BENCH_RUST_LOG "$HAVEN_BIN" --database "$db" serve --bind 127.0.0.1:0 "$@" \
            >"$dir/server.out" 2>"$dir/server.err" &
    else
        "$HAVEN_BIN" --database "$db" serve --bind 127.0.0.1:0 "$@" >"$dir/server.out" 2>"$dir/server.err" &
    fi
    SERVER_PID=$!
    STARTED+=("$SERVER_PID")
    SERVER_ADDR=$(wait_for_address "$dir/server.out" "Haven is listening on" "$SERVER_PID")
}

# start_helper NAME PATTERN COMMAND…: a relay or mock provider; prints its address.
HELPER_PID=""
HELPER_ADDR=""
start_helper() {
    local name=$1 pattern=$2; shift 2
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    HELPER_PID=$!
    STARTED+=("$HELPER_PID")
    HELPER_ADDR=$(wait_for_address "$WORK/$name.out" "$pattern" "$HELPER_PID")
}

next_net() { NET=$((NET % 250 + 1)); }

# fresh_postgres NAME: an empty database NAME on the PostgreSQL server.
PG_URL=${BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}
PG_SOCKET=${BENCH_POSTGRES_SOCKET:-/var/run/postgresql}
fresh_postgres() {
    psql "$PG_URL/postgres" -qAt -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
}

# load LABEL SCENARIO ARGS…: one run; its JSON line goes to the results.
load() {
    local label=$1 scenario=$2; shift 2
    next_net
    log "$scenario $label (run $RUN/$RUNS)"
    if ! "$LOAD" "$scenario" --label "$label" --source-net "$NET" "$@" >>"$RESULTS" 2> >(tee -a "$OUT/bench.log" >&2); then
        log "FAILED: $scenario $label"
    fi
}

# haven_run LABEL SERVE_FLAGS -- SCENARIO ARGS…: a fresh server for one run.
haven_run() {
    local label=$1; shift
    local serve=()
    while [[ $1 != -- ]]; do serve+=("$1"); shift; done
    shift
    local scenario=$1; shift
    start_server "$label" "${serve[@]}"
    local accounts=()
    [[ $scenario == direct || $scenario == takeover ]] && accounts=(--therapist-accounts "$ACCOUNTS")
    load "$label" "$scenario" --target "$SERVER_ADDR" --server-pid "$SERVER_PID" "${accounts[@]}" "$@"
    stop "$SERVER_PID"
    rm -rf "${WORK:?}/$label"
}

# relay_run LABEL ARGS…: `direct --bare` against a fresh relay.
relay_run() {
    local label=$1; shift
    start_helper relay "relay listening on" "$LOAD" relay --bind 127.0.0.1:0
    load "$label" direct --bare --target "$HELPER_ADDR" --server-pid "$HELPER_PID" "$@"
    stop "$HELPER_PID"
}

with_mock() {
    local delay=$1 chunks=$2
    start_helper "mock-$delay" "mock-llm listening on" "$LOAD" mock-llm --bind 127.0.0.1:0 \
        --delay-ms "$delay" --chunks "$chunks"
    MOCK_PID=$HELPER_PID
    MOCK_FLAGS=(--ai-provider openai --ai-base-url "http://$HELPER_ADDR/v1" --ai-model mock --ai-api-key x)
}

machine() {
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)"
        echo "server: $HAVEN_BIN ($("$HAVEN_BIN" --version))"
        echo "nproc: $(nproc)"
        echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
        echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
        echo "kernel: $(uname -r)"
        echo "open files: $FILES"
        # Synchronous 4 KiB writes: what an fsync-per-commit database can do at most.
        local start end
        start=$(date +%s.%N)
        dd if=/dev/zero of="$WORK/dsync" bs=4k count=500 oflag=dsync 2>/dev/null
        end=$(date +%s.%N)
        echo "dsync 4 KiB writes/s: $(echo "500 / ($end - $start)" | bc)"
        rm -f "$WORK/dsync"
    } | tee "$OUT/machine.txt" >&2
}

want() { [[ " $ONLY " == *" $1 "* ]]; }

machine

# Scales. --quick: seconds per scenario, a few dozen sockets.
if [[ $QUICK == 1 ]]; then
    D=(--duration 3 --warmup 1 --drain 5)
    SAT_SESSIONS=100; RATE_SESSIONS=50; RATE=200
    IDLE=(200); HOLD=5
    BOT_SMALL=10; BOT_LARGE=40
    TAKEOVER=(--sessions 20 --join-after-min 0.5 --join-after-max 1.5 --after-join 1)
    SCALE_SESSIONS=(); SIZES=()
else
    D=(--duration 10 --warmup 3 --drain 15)
    SAT_SESSIONS=4000; RATE_SESSIONS=2000; RATE=${BENCH_RATE:-10000}
    # The largest idle test both processes' open-file limits allow.
    MAX_IDLE=$(( (FILES - 1000) / 1000 * 1000 ))
    IDLE=($(( MAX_IDLE < 50000 ? MAX_IDLE : 50000 )))
    HOLD=45
    BOT_SMALL=50; BOT_LARGE=2000
    TAKEOVER=(--sessions 200)
    SCALE_SESSIONS=(500 1000 2000)
    SIZES=(1000 4000)
fi

for RUN in $(seq 1 "$RUNS"); do
    if want baseline; then
        relay_run "baseline saturation" --sessions "$SAT_SESSIONS" "${D[@]}"
        relay_run "baseline ${RATE}/s" --sessions "$RATE_SESSIONS" --rate "$RATE" "${D[@]}"
    fi
    if want direct; then
        haven_run "direct saturation" -- direct --sessions "$SAT_SESSIONS" "${D[@]}"
        # One client in 20 also sends one message the crisis detector flags:
        # how long its crisis message takes under this load.
        haven_run "direct ${RATE}/s" -- direct --sessions "$RATE_SESSIONS" --rate "$RATE" --crisis-every 20 "${D[@]}"
    fi
    if want idle; then
        haven_run "idle ${IDLE[0]}" -- idle --connections "${IDLE[0]}" --hold "$HOLD"
    fi
    if want bot; then
        haven_run "bot companion ${BOT_SMALL}" -- bot --responder companion --sessions "$BOT_SMALL" "${D[@]:0:4}"
        haven_run "bot companion ${BOT_LARGE}" -- bot --responder companion --sessions "$BOT_LARGE" "${D[@]:0:4}"
        with_mock 0 3
        haven_run "bot mock-0ms ${BOT_SMALL}" "${MOCK_FLAGS[@]}" -- bot --responder mock-0ms \
            --sessions "$BOT_SMALL" "${D[@]:0:4}"
        haven_run "bot mock-0ms ${BOT_LARGE}" "${MOCK_FLAGS[@]}" -- bot --responder mock-0ms \
            --sessions "$BOT_LARGE" "${D[@]:0:4}"
        stop "$MOCK_PID"
    fi
    if want postgres; then
        # The same direct load, stored in PostgreSQL over TCP and over its Unix socket.
        fresh_postgres haven_bench_tcp
        DATABASE="$PG_URL/haven_bench_tcp" haven_run "postgres tcp saturation" -- direct \
            --sessions "$RATE_SESSIONS" "${D[@]}"
        fresh_postgres haven_bench_unix
        DATABASE="postgres://postgres@${PG_SOCKET//\//%2F}/haven_bench_unix" haven_run "postgres unix saturation" \
            -- direct --sessions "$RATE_SESSIONS" "${D[@]}"
    fi
    if want takeover; then
        with_mock 200 10
        haven_run "takeover mock-200ms" "${MOCK_FLAGS[@]}" -- takeover "${TAKEOVER[@]}"
        stop "$MOCK_PID"
    fi
done

# How figures change with sessions, connections and message size: one run each.
if want scaling && [[ $QUICK == 0 ]]; then
    RUN=1
    for sessions in "${SCALE_SESSIONS[@]}"; do
        haven_run "scaling direct saturation ${sessions}" -- direct --sessions "$sessions" "${D[@]}"
        relay_run "scaling baseline saturation ${sessions}" --sessions "$sessions" "${D[@]}"
    done
    # Latency below Haven's saturation point.
    for rate in 1000 3000; do
        haven_run "scaling direct ${rate}/s" -- direct --sessions "$RATE_SESSIONS" --rate "$rate" "${D[@]}"
        relay_run "scaling baseline ${rate}/s" --sessions "$RATE_SESSIONS" --rate "$rate" "${D[@]}"
    done
    # The relay with more sessions than the main figure: where the machine saturates.
    relay_run "scaling baseline saturation 8000" --sessions 8000 "${D[@]}"
    for size in "${SIZES[@]}"; do
        haven_run "scaling direct saturation 2000 ${size}B" -- direct --sessions 2000 --size "$size" "${D[@]}"
        relay_run "scaling baseline saturation 2000 ${size}B" --sessions 2000 --size "$size" "${D[@]}"
    done
    # Memory per socket against sockets per session (rooms are per session).
    haven_run "scaling idle 1000" -- idle --connections 1000 --hold "$HOLD"
    haven_run "scaling idle 5000" -- idle --connections 5000 --hold "$HOLD"
    haven_run "scaling idle 10000 tabs 1" -- idle --connections 10000 --tabs 1 --hold "$HOLD"
    haven_run "scaling idle 10000 tabs 10" -- idle --connections 10000 --tabs 10 --hold "$HOLD"
    # What Haven's default logging (info, a line per message) costs.
    BENCH_RUST_LOG=warn haven_run "scaling direct saturation ${SAT_SESSIONS} RUST_LOG=warn" -- direct \
        --sessions "$SAT_SESSIONS" "${D[@]}"
fi

log "results: $RESULTS"
"$LOAD" summarize "$RESULTS" >"$OUT/summary.jsonl" 2> >(tee "$OUT/summary.txt" >&2)
wait
log "medians: $OUT/summary.jsonl ($OUT/summary.txt)"
