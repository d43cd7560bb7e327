#!/usr/bin/env bash
# Rerunnable benchmark of catena-ingest on this machine, against local RabbitMQ and PostgreSQL.
#
#   scripts/bench.sh                            # all phases
#   PHASES="sat half" DURATION=20 scripts/bench.sh
#   CEILING_PAIRS=2 scripts/bench.sh            # also A/B against ../shared/tools/ceiling
#
# The HTTP load generator is wrk (Debian package `wrk`, installed if missing), the same one the
# ceiling tool uses, replaying a corpus of signed, gzipped Catena webhooks that
# `catena-ingest send --wrk-corpus` writes before each phase (scripts/wrk-corpus.lua). Relay
# and worker run as separate processes, as in production; everything shares the machine's cores.
#
# Phases (PHASES, default all of them):
#   relay  relay alone (HTTP -> gunzip -> HMAC -> publish+confirm; nothing consumes)
#   sat    end to end at saturation (wrk -c256, closed loop)
#   half   end to end at a fixed half of the saturation rate (wrk paced by RATE), or at
#          HALF_RATE events/s (then without a saturation run first unless PHASES has sat)
#   drain  backlog drain: BACKLOG events published straight to the broker, then WORKERS
#          worker processes (default 1)
#   ceiling  CEILING_PAIRS A/A'/B rounds: the ceiling tool's minimal pipeline (A), the same
#            patched to publish with our broker contract (A', scripts/ceiling-contract.patch),
#            then ours (B). `PHASES= CEILING_PAIRS=3` runs only these rounds.
# Before the first end-to-end phase, 100k events warm the tables up and get analysed
# (WARMUP=0 skips that). Phases run in the order relay, sat, half, ceiling, drain. Prints one
# table; raw output goes to target/bench/<run>/.
#
# The script only starts, waits and prints: `catena-ingest bench` does the measuring. After each
# phase `bench measure` writes <phase>.phase.json (events, events/s, wrk's HTTP p50/p99,
# receive->commit p50/p99, CPU per event by pid and by process name between two `bench
# snapshot`s of /proc, peak RSS), and `bench table` renders the summary from those files.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-20}
CONNECTIONS=${CONNECTIONS:-256}
BACKLOG=${BACKLOG:-1000000}
CEILING_PAIRS=${CEILING_PAIRS:-0}
PHASES=${PHASES-relay sat half drain}
[ "$CEILING_PAIRS" -gt 0 ] && PHASES="$PHASES ceiling"
RELAY_PORT=${RELAY_PORT:-18180}
METRICS_PORT=${METRICS_PORT:-19190}
CEILING_DIR=${CEILING_DIR:-../shared/tools/ceiling}
RUN=bench$(date +%s)
DB=postgres://postgres@127.0.0.1:5432/catena_$RUN
OUT=target/bench/$RUN
mkdir -p "$OUT"
export CATENA_NAME_PREFIX=$RUN CATENA_WEBHOOK_SECRETS="*=bench-secret-0123456789" SEND_SECRET=bench-secret-0123456789
export DATABASE_URL=$DB RELAY_LISTEN=127.0.0.1:$RELAY_PORT METRICS_LISTEN=127.0.0.1:$METRICS_PORT RUST_LOG=warn

scripts/setup.sh >/dev/null
command -v wrk >/dev/null || { apt-get install -y -q wrk >/dev/null 2>&1 || sudo apt-get install -y -q wrk >/dev/null; }
cargo build --release -q
BIN=target/release/catena-ingest
$BIN migrate >/dev/null
$BIN topology >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$OUT"/*.corpus
  rabbitmqctl -q list_queues name 2>/dev/null | while read -r q; do
    if [[ $q == "$RUN".* ]]; then rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true; fi
  done
  # rabbitmqctl has no delete_exchange command; eval does it.
  rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$RUN.events\">>), false, <<\"bench\">>)." >/dev/null 2>&1 || true
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS catena_$RUN WITH (FORCE)" postgres >/dev/null 2>&1 || true
}
trap cleanup EXIT

wait_http() { for _ in $(seq 1 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; return 1; }
start_relay() { $BIN relay >"$OUT/relay.log" 2>&1 & RELAY=$!; pids+=("$RELAY"); wait_http "http://127.0.0.1:$RELAY_PORT/readyz"; }
start_worker() { $BIN worker --no-migrate >"$OUT/worker.log" 2>&1 & WORKER=$!; pids+=("$WORKER"); wait_http "http://127.0.0.1:$METRICS_PORT/readyz"; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# corpus NAME COUNT: signed requests for one phase (signatures are valid for 5 minutes).
corpus() { $BIN send --url "http://127.0.0.1:$RELAY_PORT" --count "$2" --wrk-corpus "$OUT/$1.corpus" 2>/dev/null; }
# load NAME [RATE]: replay the corpus with wrk into $OUT/NAME.wrk.txt; SINCE is when it started.
load() {
  SINCE=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
  CORPUS="$OUT/$1.corpus" RATE="${2:-0}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" \
    -s scripts/wrk-corpus.lua "http://127.0.0.1:$RELAY_PORT" >"$OUT/$1.wrk.txt" 2>&1
  rm -f "$OUT/$1.corpus"
}
# snapshot NAME: the CPU time of every process now, in $OUT/NAME.cpu.json.
snapshot() { $BIN bench snapshot >"$OUT/$1.cpu.json"; }
# measure NAME ARGS...: the phase's report in $OUT/NAME.phase.json (`catena-ingest bench measure --help`).
measure() { local name=$1; shift; $BIN bench measure "$@" >"$OUT/$name.phase.json"; }
# end_to_end NAME ARGS...: measure a wrk run of relay and worker, the events committed end to end.
end_to_end() {
  local name=$1; shift
  measure "$name" --wrk "$OUT/$name.wrk.txt" --received-since "$SINCE" --pid relay="$RELAY" --pid worker="$WORKER" "$@"
}
has() { [[ " $PHASES " == *" $1 "* ]]; }
# Drain the queue, then do the vacuum, statistics and checkpoint work a run leaves behind, so
# the next phase measures steady state rather than the previous one's cleanup.
settle() {
  $BIN bench wait-empty
  psql -q -h 127.0.0.1 -U postgres -c "VACUUM ANALYZE" "catena_$RUN" >/dev/null
  psql -q -h 127.0.0.1 -U postgres -c "CHECKPOINT" "catena_$RUN" >/dev/null
  sleep 5
}
# A fresh database has no statistics, so the worker's first prepared plans scan the growing
# tables sequentially until autovacuum analyses them (a minute or more). The ceiling starts
# from 100k analysed rows; start ours from ~100k events' worth of analysed tables too.
warmup() {
  $BIN send --url "http://127.0.0.1:$RELAY_PORT" --count 100000 --wrk-corpus "$OUT/warmup.corpus" 2>/dev/null
  CORPUS="$OUT/warmup.corpus" wrk -t1 -c"$CONNECTIONS" -d12s -s scripts/wrk-corpus.lua \
    "http://127.0.0.1:$RELAY_PORT" >"$OUT/warmup.wrk.txt" 2>&1 || true
  rm -f "$OUT/warmup.corpus"
  settle
}
WARMED=0; [ "${WARMUP:-1}" = 0 ] && WARMED=1 # WARMUP=0 skips the warm-up

echo "run $RUN: ${DURATION}s per phase, wrk -c$CONNECTIONS, backlog $BACKLOG, phases: $PHASES" | tee "$OUT/summary.txt"

if has relay; then
  corpus relay $((22000 * DURATION))
  start_relay
  snapshot relay; load relay
  measure relay --phase relay --label "relay alone (HTTP, gunzip, HMAC, publish+confirm)" \
    --wrk "$OUT/relay.wrk.txt" --pid relay="$RELAY" --cpu-since "$OUT/relay.cpu.json"
  stop "$RELAY"
  rabbitmqctl -q purge_queue "$RUN.events" >/dev/null
fi

if has sat || has half; then
  start_relay; start_worker
  [ "$WARMED" = 1 ] || { warmup; WARMED=1; }
  if has sat || [ -z "${HALF_RATE:-}" ]; then
    corpus sat $((15000 * DURATION))
    snapshot sat; load sat
    end_to_end sat --phase sat --label "end to end at saturation (wrk -c$CONNECTIONS)" --cpu-since "$OUT/sat.cpu.json"
    settle # saturation leaves a backlog, dirty buffers and autovacuum work behind
  fi
  if has half; then
    # HALF_RATE=n: a fixed rate, without a saturation run first
    HALF=${HALF_RATE:-$($BIN bench rate --fraction 0.5 "$OUT/sat.phase.json")}
    corpus half $((HALF * DURATION + 1000))
    snapshot half; load half "$HALF"
    end_to_end half --phase half --label "end to end at half of saturation ($HALF/s, paced)" --cpu-since "$OUT/half.cpu.json"
  fi
  stop "$RELAY"; stop "$WORKER"
fi

if has ceiling; then
  # A: the minimal pipeline (one process, HTTP -> confirm -> quorum queue -> batched txn).
  # B: ours, relay and worker as above. Same wrk, same connections, same duration.
  [ -d "$CEILING_DIR" ] || { echo "no ceiling tool at $CEILING_DIR" >&2; exit 1; }
  # A': the same minimal pipeline, patched (scripts/ceiling-contract.patch) to publish the way
  # architecture.md requires of the relay: through a topic exchange bound `#`, `mandatory`, with
  # the Catena headers, received_at and three properties, into a queue with a delivery limit and
  # at-least-once dead-lettering. It isolates what that broker contract costs from our own work.
  CEILING_BUILD=$PWD/target/ceiling
  (cd "$CEILING_DIR" && CARGO_TARGET_DIR="$CEILING_BUILD" cargo build --release -q)
  cp "$CEILING_BUILD/release/ceiling" "$CEILING_BUILD/ceiling-minimal"
  # Its own target directory: in a shared one, cargo sees the original's sources as older than
  # the patched binary and does not relink, so both copies would be the patched build.
  CONTRACT_SRC=$PWD/target/ceiling-contract/src-patched
  rm -rf "$CONTRACT_SRC" && mkdir -p "$CONTRACT_SRC"
  cp -r "$CEILING_DIR/Cargo.toml" "$CEILING_DIR/Cargo.lock" "$CEILING_DIR/src" "$CONTRACT_SRC/"
  if patch -s -p1 -d "$CONTRACT_SRC" <scripts/ceiling-contract.patch &&
    (cd "$CONTRACT_SRC" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release -q); then
    cp "$CONTRACT_SRC/../target/release/ceiling" "$CEILING_BUILD/ceiling-contract"
    if cmp -s "$CEILING_BUILD/ceiling-minimal" "$CEILING_BUILD/ceiling-contract"; then
      echo "the minimal and the contract-shaped ceiling are the same binary; rm -rf target/ceiling*" >&2
      exit 1
    fi
  else
    echo "SKIPPED contract-shaped ceiling: scripts/ceiling-contract.patch does not apply to $CEILING_DIR" >&2
    rm -f "$CEILING_BUILD/ceiling-contract"
  fi
  psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE ceiling" postgres >/dev/null 2>&1 || true
  # ceiling VARIANT PAIR PHASE: run one ceiling binary behind wrk, with CPU snapshots inside its
  # own measuring window (it exits when that ends), and measure it.
  ceiling() {
    local name=ceiling-$1.$2
    AMQP_ADDR=amqp://guest:guest@127.0.0.1:5672/%2f PG_DSN=postgres://postgres@127.0.0.1:5432/ceiling \
      "$CEILING_BUILD/ceiling-$1" pipeline --queue quorum --workers 2 --batch 500 --http 127.0.0.1:18088 \
      --warmup 3 --duration "$DURATION" >"$OUT/$name.txt" 2>&1 &
    CEIL=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18088/ && break; sleep 0.1; done
    wrk -t1 -c"$CONNECTIONS" -d"$((DURATION + 5))s" -s "$CEILING_DIR/scripts/hook.lua" http://127.0.0.1:18088/hook >/dev/null 2>&1 &
    WRK=$!
    sleep 4; snapshot "$name.start"; sleep "$WINDOW"; snapshot "$name.end"
    wait "$WRK" || true; wait "$CEIL" || true
    measure "$name" --phase "$3" --round "$2" --ceiling-output "$OUT/$name.txt" \
      --cpu-since "$OUT/$name.start.cpu.json" --cpu-until "$OUT/$name.end.cpu.json"
  }
  WINDOW=$((DURATION - 4))
  for pair in $(seq 1 "$CEILING_PAIRS"); do
    ceiling minimal "$pair" ceiling
    if [ -x "$CEILING_BUILD/ceiling-contract" ]; then ceiling contract "$pair" ceiling-contract; fi
    corpus "pair$pair" $((15000 * DURATION))
    start_relay; start_worker
    [ "$WARMED" = 1 ] || { warmup; WARMED=1; }
    snapshot "pair$pair.start"; load "pair$pair"; snapshot "pair$pair.end"
    end_to_end "pair$pair" --phase pair --round "$pair" \
      --cpu-since "$OUT/pair$pair.start.cpu.json" --cpu-until "$OUT/pair$pair.end.cpu.json"
    stop "$RELAY"; stop "$WORKER"
  done
fi

# The drain runs last: its million rows leave vacuum and checkpoint work in PostgreSQL that
# would otherwise land in the phases after it.
if has drain; then
  $BIN send --target amqp --count "$BACKLOG" --concurrency 512 --json >"$OUT/backlog_publish.json"
  measure publish --phase publish --label "backlog publish, broker only (send --target amqp, confirm)" \
    --send-report "$OUT/backlog_publish.json"
  DRAIN_START=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
  snapshot drain
  start_worker
  extra=() workers=(--pid worker="$WORKER")
  for i in $(seq 2 "${WORKERS:-1}"); do # scale-out: more worker processes on the same queue
    METRICS_LISTEN=127.0.0.1:$((METRICS_PORT + i)) $BIN worker --no-migrate >"$OUT/worker$i.log" 2>&1 &
    extra+=("$!"); pids+=("$!"); workers+=(--pid "worker$i=$!")
  done
  $BIN bench wait-empty
  measure drain --phase drain --label "backlog drain of $BACKLOG events, ${WORKERS:-1} worker process(es) ({seconds} s)" \
    --processed-since "$DRAIN_START" "${workers[@]}" --cpu-since "$OUT/drain.cpu.json"
  stop "$WORKER"
  for p in "${extra[@]:-}"; do [ -n "$p" ] && stop "$p"; done
fi

$BIN bench table "$OUT" | tee -a "$OUT/summary.txt"
