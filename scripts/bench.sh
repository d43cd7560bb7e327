#!/usr/bin/env bash
# Rerunnable benchmark of catena-ingest on this machine, against local RabbitMQ and PostgreSQL.
#
#   scripts/bench.sh                # all phases
#   BACKLOG=200000 DURATION=20 scripts/bench.sh
#
# Requests are prepared (gzip + signature) before each timed phase, so the load generator's CPU
# goes into sending. Everything shares the machine's cores, as the ceiling tool's runs do.
# Phases: relay alone (no workers: HTTP -> verify -> publish+confirm), end to end at saturation,
# end to end at half that rate, and a backlog drain (publish BACKLOG events straight to the
# broker, then start the worker). Prints one table; raw output goes to target/bench/.
# Memory is the peak RSS (VmHWM) of the relay and worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-30}
COUNT=${COUNT:-150000}
CONCURRENCY=${CONCURRENCY:-256}
BACKLOG=${BACKLOG:-1000000}
RELAY_PORT=${RELAY_PORT:-18180}
METRICS_PORT=${METRICS_PORT:-19190}
RUN=bench$(date +%s)
DB=postgres://postgres@127.0.0.1:5432/catena_$RUN
OUT=target/bench/$RUN
mkdir -p "$OUT"
export CATENA_NAME_PREFIX=$RUN CATENA_WEBHOOK_SECRETS="*=bench-secret-0123456789" SEND_SECRET=bench-secret-0123456789
export DATABASE_URL=$DB RELAY_LISTEN=127.0.0.1:$RELAY_PORT METRICS_LISTEN=127.0.0.1:$METRICS_PORT RUST_LOG=warn

scripts/setup.sh >/dev/null
cargo build --release -q
BIN=target/release/catena-ingest
$BIN migrate >/dev/null
$BIN topology >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rabbitmqctl -q list_queues name 2>/dev/null | grep "^$RUN\." | while read -r q; do rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true; done
  rabbitmqctl -q delete_exchange "$RUN.events" >/dev/null 2>&1 || true 2>/dev/null
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS catena_$RUN WITH (FORCE)" postgres >/dev/null 2>&1 || true
}
trap cleanup EXIT

hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
wait_http() { for _ in $(seq 1 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; return 1; }
purge_events() { rabbitmqctl -q purge_queue "$RUN.events" >/dev/null; }
field() { grep -o "\"$2\": [0-9.]*" "$1" | head -n1 | awk '{print $2}'; }

start_relay() { $BIN relay >"$OUT/relay.log" 2>&1 & RELAY=$!; pids+=("$RELAY"); wait_http "http://127.0.0.1:$RELAY_PORT/readyz"; }
start_worker() { $BIN worker --no-migrate >"$OUT/worker.log" 2>&1 & WORKER=$!; pids+=("$WORKER"); wait_http "http://127.0.0.1:$METRICS_PORT/readyz"; }
send() { $BIN send --url "http://127.0.0.1:$RELAY_PORT" --json "$@"; }

echo "run $RUN: duration ${DURATION}s, concurrency $CONCURRENCY, backlog $BACKLOG" | tee "$OUT/summary.txt"

# 1. Relay alone: nothing consumes, the queue just fills.
start_relay
send --count "$COUNT" --concurrency "$CONCURRENCY" >"$OUT/relay_alone.json"
purge_events

# 2. End to end at saturation.
start_worker
send --count "$COUNT" --concurrency "$CONCURRENCY" --report-db "$DB" >"$OUT/e2e_sat.json"
SAT=$(grep -o '"events_per_second": [0-9.]*' "$OUT/e2e_sat.json" | awk '{print int($2)}')

# 3. End to end at half that rate.
HALF=$((SAT / 2))
send --count $((HALF * DURATION)) --concurrency "$CONCURRENCY" --rate "$HALF" --report-db "$DB" >"$OUT/e2e_half.json"
RELAY_RSS=$(hwm "$RELAY"); WORKER_RSS=$(hwm "$WORKER")

# 4. Backlog drain: publish straight to the broker with no worker, then start one.
kill "$WORKER"; wait "$WORKER" 2>/dev/null || true
$BIN send --target amqp --count "$BACKLOG" --concurrency 512 --json >"$OUT/backlog_publish.json"
DRAIN_START=$(date +%s.%N)
start_worker
while :; do
  left=$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$RUN.events" '$1 == q {print $2}')
  [ "${left:-1}" = "0" ] && break
  sleep 1
done
DRAIN_END=$(date +%s.%N)
WORKER_DRAIN_RSS=$(hwm "$WORKER")
DRAIN_RATE=$(psql -At -h 127.0.0.1 -U postgres "catena_$RUN" -c \
  "SELECT round(count(*) / extract(epoch FROM max(processed_at) - min(processed_at))) FROM webhook_events
   WHERE processed_at >= to_timestamp($DRAIN_START)")

{
printf '\n| phase | events/s | HTTP p50 ms | HTTP p99 ms | receive->commit p50 ms | p99 ms |\n|---|---|---|---|---|---|\n'
printf '| relay alone (HTTP, verify, publish+confirm) | %s | %s | %s | - | - |\n' \
  "$(field "$OUT/relay_alone.json" accepted_per_second | cut -d. -f1)" "$(field "$OUT/relay_alone.json" latency_ms_p50)" "$(field "$OUT/relay_alone.json" latency_ms_p99)"
for phase in e2e_sat e2e_half; do
  printf '| %s | %s | %s | %s | %s | %s |\n' "$phase" \
    "$(field "$OUT/$phase.json" events_per_second | cut -d. -f1)" "$(field "$OUT/$phase.json" latency_ms_p50)" "$(field "$OUT/$phase.json" latency_ms_p99)" \
    "$(field "$OUT/$phase.json" lag_ms_p50)" "$(field "$OUT/$phase.json" lag_ms_p99)"
done
printf '| backlog publish (broker only, confirm) | %s | - | - | - | - |\n' "$(field "$OUT/backlog_publish.json" accepted_per_second | cut -d. -f1)"
printf '| backlog drain of %s events | %s | - | - | - | - |\n' "$BACKLOG" "$DRAIN_RATE"
printf '\npeak RSS MiB: relay %s, worker %s (during drain %s); drain wall time %.1fs\n' "$RELAY_RSS" "$WORKER_RSS" "$WORKER_DRAIN_RSS" "$(echo "$DRAIN_END - $DRAIN_START" | bc)"
} | tee -a "$OUT/summary.txt"
