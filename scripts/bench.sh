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
#   relay  relay alone (HTTP -> gunzip -> HMAC -> publish+confirm; nothing consumes), then the
#          ceiling tool's HTTP front alone (`ceiling http`, 202 without a broker) behind the same wrk
#   sat    end to end at saturation (wrk -c256, closed loop)
#   half   end to end at a fixed rate: half of the ceiling's saturation rate of round 1 when
#          CEILING_PAIRS > 0, and the ceiling at that same rate right before ours (so the
#          broker's confirm stalls can hit both); else half of our saturation rate, or HALF_RATE
#   drain  backlog drain: BACKLOG events published straight to the broker (grouped as the relay
#          groups them), then WORKERS worker processes (default 1)
#   ceiling  CEILING_PAIRS A/B rounds: the ceiling tool's minimal pipeline as shipped (A), then
#            ours (B), same wrk, same connections, same duration. `PHASES= CEILING_PAIRS=3`
#            runs only these rounds.
# Before the first end-to-end phase, 100k events warm the tables up and get analysed
# (WARMUP=0 skips that). Phases run in the order relay, sat, ceiling, half, drain. Prints one
# table; raw output goes to target/bench/<run>/. AMQP_URL and RABBITMQCTL point it at another
# broker (scripts/rabbitmq4.sh: AMQP_URL=$(scripts/rabbitmq4.sh url)
# RABBITMQCTL="scripts/rabbitmq4.sh ctl").
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
# The spec checkout's ceiling tool: beside the repository, as in the work tree; a clone made
# elsewhere sets CEILING_DIR (e.g. CEILING_DIR=/work/shared/tools/ceiling).
CEILING_DIR=${CEILING_DIR:-../shared/tools/ceiling}
RUN=bench$(date +%s)
DB=postgres://postgres@127.0.0.1:5432/catena_$RUN
OUT=target/bench/$RUN
mkdir -p "$OUT"
export CATENA_NAME_PREFIX=$RUN CATENA_WEBHOOK_SECRETS="*=bench-secret-0123456789" SEND_SECRET=bench-secret-0123456789
export DATABASE_URL=$DB RELAY_LISTEN=127.0.0.1:$RELAY_PORT METRICS_LISTEN=127.0.0.1:$METRICS_PORT RUST_LOG=warn
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
# The broker's CLI: `bench wait-empty` and the cleanup list queues through it.
export RABBITMQCTL=${RABBITMQCTL:-rabbitmqctl}

# Fail before the first phase, not after it, when a phase needs the ceiling tool and it is not there.
if [[ " $PHASES " == *" relay "* || "$CEILING_PAIRS" -gt 0 ]] && [ ! -d "$CEILING_DIR" ]; then
  echo "no ceiling tool at $CEILING_DIR (the relay phase and CEILING_PAIRS need it): set CEILING_DIR" >&2
  exit 1
fi
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
  $RABBITMQCTL -q list_queues name 2>/dev/null | while read -r q; do
    if [[ $q == "$RUN".* ]]; then $RABBITMQCTL -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true; fi
  done
  # rabbitmqctl has no delete_exchange command; eval does it.
  $RABBITMQCTL -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$RUN.events\">>), false, <<\"bench\">>)." >/dev/null 2>&1 || true
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS catena_$RUN WITH (FORCE)" postgres >/dev/null 2>&1 || true
}
trap cleanup EXIT

wait_http() { for _ in $(seq 1 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; return 1; }
start_relay() { $BIN relay >"$OUT/relay.log" 2>&1 & RELAY=$!; pids+=("$RELAY"); wait_http "http://127.0.0.1:$RELAY_PORT/readyz"; }
start_worker() { $BIN worker --no-migrate >"$OUT/worker.log" 2>&1 & WORKER=$!; pids+=("$WORKER"); wait_http "http://127.0.0.1:$METRICS_PORT/readyz"; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# scrape NAME: the worker's metrics now (its catena_worker_stage_seconds_total says where each
# event's time went), in $OUT/NAME.worker.metrics.
scrape() { curl -sf "http://127.0.0.1:${2:-$METRICS_PORT}/metrics" >"$OUT/$1.worker.metrics" || true; }

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

# The ceiling tool as shipped, built once into target/ceiling.
CEILING_BIN=$PWD/target/ceiling/release/ceiling
build_ceiling() {
  (cd "$CEILING_DIR" && CARGO_TARGET_DIR="$(dirname "$(dirname "$CEILING_BIN")")" cargo build --release -q)
  psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE ceiling" postgres >/dev/null 2>&1 || true
}
# ceiling NAME PHASE ROUND [RATE]: the ceiling's minimal pipeline behind wrk (hook.lua, or
# paced at RATE by scripts/ceiling-hook-paced.lua), CPU snapshots inside its own measuring
# window (it exits when that ends), measured as PHASE.
ceiling() {
  local name=$1 phase=$2 round=$3 rate=${4:-0} args=()
  AMQP_ADDR=$AMQP_URL PG_DSN=postgres://postgres@127.0.0.1:5432/ceiling \
    "$CEILING_BIN" pipeline --queue quorum --workers 2 --batch 500 --http 127.0.0.1:18088 \
    --warmup 3 --duration "$DURATION" >"$OUT/$name.txt" 2>&1 &
  CEIL=$!
  for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18088/ && break; sleep 0.1; done
  RATE=$rate wrk -t1 -c"$CONNECTIONS" -d"$((DURATION + 5))s" -s scripts/ceiling-hook-paced.lua \
    http://127.0.0.1:18088/hook >"$OUT/$name.wrk.txt" 2>&1 &
  WRK=$!
  sleep 4; snapshot "$name.start"; sleep "$((DURATION - 4))"; snapshot "$name.end"
  wait "$WRK" || true; wait "$CEIL" || true
  [ "$rate" != 0 ] && args=(--wrk "$OUT/$name.wrk.txt")
  measure "$name" --phase "$phase" ${round:+--round "$round"} "${args[@]}" --label "${LABEL:-$name}" \
    --ceiling-output "$OUT/$name.txt" --cpu-since "$OUT/$name.start.cpu.json" --cpu-until "$OUT/$name.end.cpu.json"
}

echo "run $RUN: ${DURATION}s per phase, wrk -c$CONNECTIONS, backlog $BACKLOG, phases: $PHASES" | tee "$OUT/summary.txt"

if has relay; then
  corpus relay $((22000 * DURATION))
  start_relay
  snapshot relay; load relay
  measure relay --phase relay --label "relay alone (HTTP, gunzip, HMAC, publish+confirm)" \
    --wrk "$OUT/relay.wrk.txt" --pid relay="$RELAY" --cpu-since "$OUT/relay.cpu.json"
  stop "$RELAY"
  $RABBITMQCTL -q purge_queue "$RUN.events" >/dev/null
  build_ceiling
  "$CEILING_BIN" http --http 127.0.0.1:18089 --warmup 3 --duration "$((DURATION - 4))" \
    >"$OUT/ceiling-http.txt" 2>&1 &
  CEIL=$!
  for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18089/ && break; sleep 0.1; done
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$CEILING_DIR/scripts/hook.lua" http://127.0.0.1:18089/hook >/dev/null 2>&1 &
  WRK=$!
  sleep 3; snapshot ceiling-http.start; wait "$CEIL" || true; snapshot ceiling-http.end; wait "$WRK" || true
  measure ceiling-http --phase ceiling-http --label "ceiling HTTP front alone (ceiling http, no broker)" \
    --ceiling-output "$OUT/ceiling-http.txt" --cpu-since "$OUT/ceiling-http.start.cpu.json" \
    --cpu-until "$OUT/ceiling-http.end.cpu.json"
fi

if has sat; then
  start_relay; start_worker
  [ "$WARMED" = 1 ] || { warmup; WARMED=1; }
  corpus sat $((15000 * DURATION))
  snapshot sat; load sat
  end_to_end sat --phase sat --label "end to end at saturation (wrk -c$CONNECTIONS)" --cpu-since "$OUT/sat.cpu.json"
  settle # saturation leaves a backlog, dirty buffers and autovacuum work behind
  scrape sat; stop "$RELAY"; stop "$WORKER"
fi

if [ "$CEILING_PAIRS" -gt 0 ]; then
  # A: the minimal pipeline as shipped (one process, HTTP -> confirm -> quorum queue -> batched
  # txn). B: ours, relay and worker as above. Same wrk, same connections, same duration.
  build_ceiling
  for pair in $(seq 1 "$CEILING_PAIRS"); do
    ceiling "ceiling.$pair" ceiling "$pair"
    corpus "pair$pair" $((15000 * DURATION))
    start_relay; start_worker
    [ "$WARMED" = 1 ] || { warmup; WARMED=1; }
    snapshot "pair$pair.start"; load "pair$pair"; snapshot "pair$pair.end"
    end_to_end "pair$pair" --phase pair --round "$pair" \
      --cpu-since "$OUT/pair$pair.start.cpu.json" --cpu-until "$OUT/pair$pair.end.cpu.json"
    settle
    scrape "pair$pair"; stop "$RELAY"; stop "$WORKER"
  done
fi

if has half; then
  if [ -n "${HALF_RATE:-}" ]; then
    HALF=$HALF_RATE
  elif [ "$CEILING_PAIRS" -gt 0 ]; then
    HALF=$($BIN bench rate --fraction 0.5 "$OUT/ceiling.1.phase.json")
  else
    HALF=$($BIN bench rate --fraction 0.5 "$OUT/sat.phase.json")
  fi
  if [ "$CEILING_PAIRS" -gt 0 ]; then
    LABEL="ceiling at the same rate ($HALF/s, paced)" ceiling ceiling-half ceiling-half "" "$HALF"
  fi
  start_relay; start_worker
  [ "$WARMED" = 1 ] || { warmup; WARMED=1; }
  corpus half $((HALF * DURATION + 1000))
  snapshot half; load half "$HALF"
  end_to_end half --phase half --label "end to end at a fixed $HALF/s (paced)" --cpu-since "$OUT/half.cpu.json"
  scrape half; stop "$RELAY"; stop "$WORKER"
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
  scrape drain; stop "$WORKER"
  for p in "${extra[@]:-}"; do [ -n "$p" ] && stop "$p"; done
fi

$BIN bench table "$OUT" | tee -a "$OUT/summary.txt"
