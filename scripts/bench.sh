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
  rabbitmqctl -q list_queues name 2>/dev/null | grep "^$RUN\." | while read -r q; do rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true; done
  # rabbitmqctl has no delete_exchange command; eval does it.
  rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$RUN.events\">>), false, <<\"bench\">>)." >/dev/null 2>&1 || true
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS catena_$RUN WITH (FORCE)" postgres >/dev/null 2>&1 || true
}
trap cleanup EXIT

hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
cpu_s() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$1/stat" 2>/dev/null || echo 0; }
wait_http() { for _ in $(seq 1 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; return 1; }
queue_len() { rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$RUN.events" '$1 == q {print $2}'; }
field() { grep -o "\"$2\": [0-9.]*" "$1" | head -n1 | awk '{print $2}'; }
num() { printf '%.0f' "${1:-0}"; }

start_relay() { $BIN relay >"$OUT/relay.log" 2>&1 & RELAY=$!; pids+=("$RELAY"); wait_http "http://127.0.0.1:$RELAY_PORT/readyz"; }
start_worker() { $BIN worker --no-migrate >"$OUT/worker.log" 2>&1 & WORKER=$!; pids+=("$WORKER"); wait_http "http://127.0.0.1:$METRICS_PORT/readyz"; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# corpus NAME COUNT: signed requests for one phase (signatures are valid for 5 minutes).
corpus() { $BIN send --url "http://127.0.0.1:$RELAY_PORT" --count "$2" --wrk-corpus "$OUT/$1.corpus" 2>/dev/null; }
# load NAME [RATE]: replay the corpus with wrk; JSON summary to $OUT/NAME.wrk.json.
load() {
  SINCE=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
  CORPUS="$OUT/$1.corpus" RATE="${2:-0}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" \
    -s scripts/wrk-corpus.lua "http://127.0.0.1:$RELAY_PORT" >"$OUT/$1.wrk.txt" 2>&1
  tail -n1 "$OUT/$1.wrk.txt" >"$OUT/$1.wrk.json"
  rm -f "$OUT/$1.corpus"
}
report() { $BIN send --report-db "$DB" --report-since "$SINCE" --count "$(field "$OUT/$1.wrk.json" requests)" --json >"$OUT/$1.e2e.json"; }
row() { # phase label
  printf '| %s | %s | %.1f | %.1f | %.1f | %.1f |\n' "$2" \
    "$(num "$(field "$OUT/$1.e2e.json" events_per_second)")" \
    "$(field "$OUT/$1.wrk.json" p50_ms)" "$(field "$OUT/$1.wrk.json" p99_ms)" \
    "$(field "$OUT/$1.e2e.json" lag_ms_p50)" "$(field "$OUT/$1.e2e.json" lag_ms_p99)" >>"$OUT/table.md"
}
has() { [[ " $PHASES " == *" $1 "* ]]; }
# Drain the queue, then do the vacuum, statistics and checkpoint work a run leaves behind, so
# the next phase measures steady state rather than the previous one's cleanup.
settle() {
  while [ "$(queue_len)" != "0" ]; do sleep 1; done
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
# CPU seconds per process name (all processes of that name), for the A/B breakdown.
cpu_by_name() { for p in /proc/[0-9]*; do c=$(cat "$p/comm" 2>/dev/null) && s=$(awk '{print $14+$15}' "$p/stat" 2>/dev/null) && echo "$c $s"; done | awk '{a[$1]+=$2} END {for (k in a) print k, a[k]/100}' | sort; }
# cpu_per_event BEFORE AFTER EVENTS: "name us/event" for every process that used >1% of it.
cpu_per_event() { join "$1" "$2" | awk -v n="$3" '{d=($3-$2)*1e6/n; if (d > 1) printf "%s %.0f us, ", $1, d}'; }

echo "run $RUN: ${DURATION}s per phase, wrk -c$CONNECTIONS, backlog $BACKLOG, phases: $PHASES" | tee "$OUT/summary.txt"
printf '| phase | events/s | HTTP p50 ms | HTTP p99 ms | receive->commit p50 ms | p99 ms |\n|---|---|---|---|---|---|\n' >"$OUT/table.md"
RELAY_RSS=- WORKER_RSS=- RELAY_CPU_US=- WORKER_CPU_US=- RELAY_ALONE_RSS=- RELAY_ALONE_CPU_US=- SAT=0

if has relay; then
  corpus relay $((22000 * DURATION))
  start_relay
  c0=$(cpu_s "$RELAY"); load relay; c1=$(cpu_s "$RELAY")
  RELAY_ALONE_RSS=$(hwm "$RELAY"); stop "$RELAY"
  rabbitmqctl -q purge_queue "$RUN.events" >/dev/null
  n=$(field "$OUT/relay.wrk.json" requests)
  RELAY_ALONE_CPU_US=$(echo "($c1 - $c0) * 1000000 / $n" | bc)
  printf '| relay alone (HTTP, gunzip, HMAC, publish+confirm) | %s | %.1f | %.1f | - | - |\n' \
    "$(num "$(field "$OUT/relay.wrk.json" requests_per_second)")" "$(field "$OUT/relay.wrk.json" p50_ms)" "$(field "$OUT/relay.wrk.json" p99_ms)" >>"$OUT/table.md"
fi

if has sat || has half; then
  start_relay; start_worker
  [ "$WARMED" = 1 ] || { warmup; WARMED=1; }
  if has sat || [ -z "${HALF_RATE:-}" ]; then
    corpus sat $((15000 * DURATION))
    r0=$(cpu_s "$RELAY"); w0=$(cpu_s "$WORKER")
    load sat; report sat
    r1=$(cpu_s "$RELAY"); w1=$(cpu_s "$WORKER")
    n=$(field "$OUT/sat.e2e.json" events)
    RELAY_CPU_US=$(echo "($r1 - $r0) * 1000000 / $n" | bc); WORKER_CPU_US=$(echo "($w1 - $w0) * 1000000 / $n" | bc)
    row sat "end to end at saturation (wrk -c$CONNECTIONS)"
    SAT=$(num "$(field "$OUT/sat.e2e.json" events_per_second)")
    settle # saturation leaves a backlog, dirty buffers and autovacuum work behind
  fi
  if has half; then
    HALF=${HALF_RATE:-$((SAT / 2))} # HALF_RATE=n: a fixed rate, without a saturation run first
    corpus half $((HALF * DURATION + 1000))
    load half "$HALF"; report half
    row half "end to end at half of saturation ($HALF/s, paced)"
  fi
  RELAY_RSS=$(hwm "$RELAY"); WORKER_RSS=$(hwm "$WORKER")
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
  # ceiling VARIANT PAIR: run one ceiling binary behind wrk; prints its events/s and leaves the
  # CPU samples of its measuring window in $OUT/cpu.VARIANT0 and .VARIANT1.
  ceiling() {
    AMQP_ADDR=amqp://guest:guest@127.0.0.1:5672/%2f PG_DSN=postgres://postgres@127.0.0.1:5432/ceiling \
      "$CEILING_BUILD/ceiling-$1" pipeline --queue quorum --workers 2 --batch 500 --http 127.0.0.1:18088 \
      --warmup 3 --duration "$DURATION" >"$OUT/ceiling-$1.$2.txt" 2>&1 &
    CEIL=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18088/ && break; sleep 0.1; done
    wrk -t1 -c"$CONNECTIONS" -d"$((DURATION + 5))s" -s "$CEILING_DIR/scripts/hook.lua" http://127.0.0.1:18088/hook >/dev/null 2>&1 &
    WRK=$!
    # Sample inside the ceiling's own measuring window (it exits when that ends).
    sleep 4; cpu_by_name >"$OUT/cpu.$1.0"; sleep "$WINDOW"; cpu_by_name >"$OUT/cpu.$1.1"
    wait "$WRK" || true; wait "$CEIL" || true
    grep -o 'committed+acked events/s=[0-9]*' "$OUT/ceiling-$1.$2.txt" | cut -d= -f2
  }
  WINDOW=$((DURATION - 4))
  printf '\n| pair | ceiling events/s | ceiling, contract-shaped publish | catena-ingest events/s | ratio to ceiling | ratio to contract-shaped |\n|---|---|---|---|---|---|\n' >"$OUT/pairs.md"
  for pair in $(seq 1 "$CEILING_PAIRS"); do
    A=$(ceiling minimal "$pair")
    echo "pair $pair CPU per event, ceiling:                  $(cpu_per_event "$OUT/cpu.minimal.0" "$OUT/cpu.minimal.1" "$((A * WINDOW))")" >>"$OUT/cpu.md"
    C=-
    if [ -x "$CEILING_BUILD/ceiling-contract" ]; then
      C=$(ceiling contract "$pair")
      echo "pair $pair CPU per event, ceiling, contract-shaped: $(cpu_per_event "$OUT/cpu.contract.0" "$OUT/cpu.contract.1" "$((C * WINDOW))")" >>"$OUT/cpu.md"
    fi
    corpus "pair$pair" $((15000 * DURATION))
    start_relay; start_worker
    [ "$WARMED" = 1 ] || { warmup; WARMED=1; }
    cpu_by_name >"$OUT/cpu.b0"; load "pair$pair"; cpu_by_name >"$OUT/cpu.b1"; report "pair$pair"
    stop "$RELAY"; stop "$WORKER"
    B=$(num "$(field "$OUT/pair$pair.e2e.json" events_per_second)")
    RC=-; [ "$C" != - ] && RC=$(printf '%.2f' "$(echo "$B / $C" | bc -l)")
    printf '| %s | %s | %s | %s | %.2f | %s |\n' "$pair" "$A" "$C" "$B" "$(echo "$B / $A" | bc -l)" "$RC" >>"$OUT/pairs.md"
    echo "pair $pair CPU per event, ours:                     $(cpu_per_event "$OUT/cpu.b0" "$OUT/cpu.b1" "$(field "$OUT/pair$pair.e2e.json" events)")" >>"$OUT/cpu.md"
  done
fi

# The drain runs last: its million rows leave vacuum and checkpoint work in PostgreSQL that
# would otherwise land in the phases after it.
if has drain; then
  $BIN send --target amqp --count "$BACKLOG" --concurrency 512 --json >"$OUT/backlog_publish.json"
  DRAIN_START=$(date +%s.%N)
  start_worker
  extra=()
  for i in $(seq 2 "${WORKERS:-1}"); do # scale-out: more worker processes on the same queue
    METRICS_LISTEN=127.0.0.1:$((METRICS_PORT + i)) $BIN worker --no-migrate >"$OUT/worker$i.log" 2>&1 &
    extra+=("$!"); pids+=("$!")
  done
  while [ "$(queue_len)" != "0" ]; do sleep 1; done
  DRAIN_END=$(date +%s.%N)
  WORKER_DRAIN_RSS=$(hwm "$WORKER")
  stop "$WORKER"
  for p in "${extra[@]:-}"; do [ -n "$p" ] && stop "$p"; done
  DRAIN_RATE=$(psql -At -h 127.0.0.1 -U postgres "catena_$RUN" -c \
    "SELECT round(count(*) / extract(epoch FROM max(processed_at) - min(processed_at))) FROM webhook_events
     WHERE processed_at >= to_timestamp($DRAIN_START)")
  printf '| backlog publish, broker only (send --target amqp, confirm) | %s | - | - | - | - |\n' "$(num "$(field "$OUT/backlog_publish.json" accepted_per_second)")" >>"$OUT/table.md"
  printf '| backlog drain of %s events, %s worker process(es) (%.0f s) | %s | - | - | - | - |\n' "$BACKLOG" "${WORKERS:-1}" "$(echo "$DRAIN_END - $DRAIN_START" | bc)" "$DRAIN_RATE" >>"$OUT/table.md"
  WORKER_RSS="$WORKER_RSS (drain: $WORKER_DRAIN_RSS)"
fi

{
  cat "$OUT/table.md"
  [ -f "$OUT/pairs.md" ] && cat "$OUT/pairs.md"
  [ -f "$OUT/cpu.md" ] && { echo; cat "$OUT/cpu.md"; }
  printf '\npeak RSS MiB: relay %s (alone: %s), worker %s\n' "$RELAY_RSS" "$RELAY_ALONE_RSS" "$WORKER_RSS"
  printf 'CPU per event: relay alone %s us; at saturation relay %s us, worker %s us\n' "$RELAY_ALONE_CPU_US" "$RELAY_CPU_US" "$WORKER_CPU_US"
} | tee -a "$OUT/summary.txt"
