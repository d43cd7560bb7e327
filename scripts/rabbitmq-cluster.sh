#!/usr/bin/env bash
# A throwaway 3-node RabbitMQ cluster for the failover tests, made only of EXTRA nodes of the
# locally installed RabbitMQ (3.10): catena1..3@localhost. The machine's own broker
# (rabbit@localhost on 5672/15672/25672) is never touched and never joins: every node gets its own
# config, env file, plugins file, data, log and pid file under /var/lib/catena-rabbitmq-cluster.
#
#   up                 start all three, cluster 2 and 3 with 1, print cluster_status (idempotent)
#   down               stop all three and delete /var/lib/catena-rabbitmq-cluster (next up is fresh)
#   stop-node N        graceful stop of node N
#   kill-node N        SIGKILL node N's beam.smp (only ever a catenaN node's)
#   start-node N       start node N again, wait until it is back in the cluster
#   leader QUEUE [VH]  node name of the quorum queue's leader (vhost default /)
#   ports              AMQP URLs of the three nodes, comma separated
#   ctl N ARGS...      rabbitmqctl against node N
#   status             cluster_status as seen by the first node that answers
#   partition N        (needs iptables) cut node N's distribution traffic to/from its peers;
#                      clients and CLI tools still reach it. Detected after net_ticktime (60s)
#   heal               remove every partition rule
#
#   mgmt-urls          management API base URLs of the three nodes, comma separated
#
# Ports of node N (1..3): AMQP 5690+N, management 15790+N, Erlang distribution 25690+N. The bases
# can be moved with CATENA_RMQ_AMQP_BASE / CATENA_RMQ_MGMT_BASE / CATENA_RMQ_DIST_BASE (use the
# same values for every call). Management is NOT on 15691-15693: the host broker's
# rabbitmq_prometheus plugin (enabled by scripts/setup.sh) listens on 0.0.0.0:15692, and whichever
# of the two binds second fails (the host's plugin, or node 2's boot); 1568x is taken too (another
# broker's prometheus on 15683). `launch` refuses to start a node whose ports are already taken.
set -euo pipefail

# Everything below needs root (runuser, the data dir, reading /proc/PID/environ of rabbitmq's
# processes): re-run ourselves under sudo instead of sprinkling sudo over every command.
if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=CATENA_RMQ_AMQP_BASE,CATENA_RMQ_MGMT_BASE,CATENA_RMQ_DIST_BASE "$0" "$@"
fi

BASE=/var/lib/catena-rabbitmq-cluster
RMQ_BIN=/usr/lib/rabbitmq/bin
# The nodes run as the rabbitmq user with HOME=/var/lib/rabbitmq, so they read the same Erlang
# cookie (/var/lib/rabbitmq/.erlang.cookie) that the system's /usr/sbin/rabbitmqctl uses (it
# su's to rabbitmq, whose home that is; root has no ~/.erlang.cookie here). Same cookie means
# both our `ctl N` and a plain `rabbitmqctl -n catenaN@localhost` can talk to the nodes.
RUN_USER=rabbitmq
COOKIE_HOME=/var/lib/rabbitmq
AMQP_BASE=${CATENA_RMQ_AMQP_BASE:-5690}
MGMT_BASE=${CATENA_RMQ_MGMT_BASE:-15790}
DIST_BASE=${CATENA_RMQ_DIST_BASE:-25690}
NODES=(1 2 3)
BOOT_TIMEOUT=${CATENA_RMQ_BOOT_TIMEOUT:-180}

log() { printf '[rabbitmq-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

node_name() { echo "catena$1@localhost"; }
node_dir() { echo "$BASE/catena$1"; }
check_n() { case "${1:-}" in 1 | 2 | 3) ;; *) die "node number must be 1, 2 or 3 (got '${1:-}')" ;; esac; }

# Run a RabbitMQ script for node N with a clean environment (-catena_cluster_node is only a
# marker for `ps`; the dist connect option makes node N open its connections to peers FROM
# 127.0.1.N, so that iptables can tell its outgoing distribution traffic apart, see
# `partition`): env -i so that nothing from the
# caller (a RABBITMQ_NODENAME exported by a test, say) leaks in, and every path pointed at the
# node's own directory. RABBITMQ_CONF_ENV_FILE is ours because /etc/rabbitmq/rabbitmq-env.conf
# sets NODENAME=rabbit@localhost, the host broker's name; RABBITMQ_CONFIG_FILE is ours because
# /etc/rabbitmq/rabbitmq.conf pins listeners.tcp to 5672.
as_node() {
  local n=$1
  shift
  local d
  d=$(node_dir "$n")
  (cd "$d" 2>/dev/null || cd /; exec runuser -u "$RUN_USER" -- env -i \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    HOME="$COOKIE_HOME" \
    LANG=C.UTF-8 LC_ALL=C.UTF-8 \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_USE_LONGNAME=false \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$d/catena$n.pid" \
    RABBITMQ_DIST_PORT="$((DIST_BASE + n))" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-catena_cluster_node catena$n -kernel inet_dist_connect_options [{ip,{127,0,1,$n}}]" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$@")
}

ctl() { local n=$1; shift; as_node "$n" "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"; }
diag() { local n=$1; shift; as_node "$n" "$RMQ_BIN/rabbitmq-diagnostics" -n "$(node_name "$n")" "$@"; }

# The pid of node N's beam.smp, or nothing. Identified by RABBITMQ_NODENAME in the process's
# environment (the node name is not on beam's command line: RabbitMQ sets it at runtime), so the
# host broker's beam can never match. The pid file is tried first, then every beam.smp.
node_pid() {
  local n=$1 want pid
  want="RABBITMQ_NODENAME=$(node_name "$n")"
  is_ours() { [ -r "/proc/$1/environ" ] && tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qxF "$want"; }
  pid=$(cat "$(node_dir "$n")/catena$n.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && is_ours "$pid"; then echo "$pid"; return; fi
  for pid in $(pgrep -x beam.smp || true); do
    if is_ours "$pid"; then echo "$pid"; return; fi
  done
}

running() { diag "$1" -q check_running >/dev/null 2>&1; }

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

write_node_files() {
  local n=$1 d
  d=$(node_dir "$n")
  mkdir -p "$d/mnesia" "$d/log"
  # Listeners on loopback only; guest may log in over loopback (the default loopback_users).
  # collect_statistics_interval 1s (default 5s) so the management API's per-queue data (leader,
  # members, online) catches up sooner after a failover. autoheal: after a distribution
  # partition heals, the losing side restarts by itself instead of staying split.
  cat >"$d/rabbitmq.conf" <<EOF
# written by scripts/rabbitmq-cluster.sh; rewritten on every start
listeners.tcp.local = 127.0.0.1:$((AMQP_BASE + n))
management.tcp.ip = 127.0.0.1
management.tcp.port = $((MGMT_BASE + n))
loopback_users.guest = true
collect_statistics_interval = 1000
cluster_partition_handling = autoheal
log.console = false
log.file.level = info
EOF
  echo '[rabbitmq_management].' >"$d/enabled_plugins"
  # Deliberately empty: stops the system rabbitmq-env.conf (NODENAME=rabbit@localhost) being read.
  echo '# written by scripts/rabbitmq-cluster.sh: replaces /etc/rabbitmq/rabbitmq-env.conf' >"$d/rabbitmq-env.conf"
  chown -R "$RUN_USER:$RUN_USER" "$BASE"
}

# Launch node N detached (daemonised by erl, so it survives this script and its process group).
launch() {
  local n=$1 d p
  d=$(node_dir "$n")
  if [ -n "$(node_pid "$n")" ]; then
    log "$(node_name "$n") already has a running VM (pid $(node_pid "$n"))"
    return
  fi
  for p in $((AMQP_BASE + n)) $((MGMT_BASE + n)) $((DIST_BASE + n)); do
    port_busy "$p" && die "port $p (for $(node_name "$n")) is taken by: $(ss -Hltnp "sport = :$p" | head -n1)"
  done
  write_node_files "$n"
  rm -f "$d/catena$n.pid" # stale after a kill-node; `node_pid` must not trust it
  log "starting $(node_name "$n") (amqp $((AMQP_BASE + n)), mgmt $((MGMT_BASE + n)), dist $((DIST_BASE + n)))"
  as_node "$n" "$RMQ_BIN/rabbitmq-server" -detached
}

# Wait until the rabbit application runs on node N. A clustered node that was not the last one
# to stop waits (up to 5 min) for its peers' Mnesia tables at boot: that is why `up` launches all
# three before waiting for any.
wait_booted() {
  local n=$1 deadline=$((SECONDS + BOOT_TIMEOUT)) seen_vm_at=$SECONDS
  while ! running "$n"; do
    if [ -n "$(node_pid "$n")" ]; then
      seen_vm_at=$SECONDS
    elif ((SECONDS - seen_vm_at > 20)); then
      # The VM is gone (bad config, port clash): show why instead of waiting out the timeout.
      tail -n 30 "$(node_dir "$n")/log/$(node_name "$n").log" 2>/dev/null >&2 || true
      die "$(node_name "$n") is not running; log: $(node_dir "$n")/log/"
    fi
    ((SECONDS < deadline)) || die "$(node_name "$n") did not boot within ${BOOT_TIMEOUT}s"
    sleep 1
  done
}

# JSON list field of node N's cluster_status (disk_nodes, running_nodes, ...).
cluster_field() { ctl "$1" -q cluster_status --formatter json 2>/dev/null | jq -r ".$2[]?"; }

join_if_needed() {
  local n=$1 seed
  seed=$(node_name 1)
  if cluster_field "$n" disk_nodes | grep -qxF "$seed"; then
    return
  fi
  log "joining $(node_name "$n") to $seed"
  # join_cluster resets the (fresh) node itself; stop_app first is required.
  ctl "$n" -q stop_app
  ctl "$n" -q join_cluster "$seed"
  ctl "$n" -q start_app
}

# Wait until node N sees all three nodes running, i.e. it is back in the cluster.
wait_in_cluster() {
  local n=$1 deadline=$((SECONDS + BOOT_TIMEOUT)) count
  while :; do
    count=$(cluster_field "$n" running_nodes | grep -c '^catena[123]@localhost$' || true)
    [ "$count" -eq 3 ] && return
    ((SECONDS < deadline)) || die "$(node_name "$n") sees $count of 3 nodes running after ${BOOT_TIMEOUT}s"
    sleep 1
  done
}

first_running() {
  local n
  for n in "${NODES[@]}"; do
    if running "$n"; then echo "$n"; return; fi
  done
  return 1
}

cmd_up() {
  local n
  for n in "${NODES[@]}"; do launch "$n"; done
  for n in "${NODES[@]}"; do wait_booted "$n"; done
  join_if_needed 2
  join_if_needed 3
  for n in "${NODES[@]}"; do wait_in_cluster "$n"; done
  ctl 1 cluster_status
}

stop_node() {
  local n=$1 pid
  pid=$(node_pid "$n")
  if [ -z "$pid" ]; then
    log "$(node_name "$n") is not running"
    return
  fi
  log "stopping $(node_name "$n") (pid $pid)"
  # With the pid file as argument, `stop` returns only once the OS process has exited.
  if ! ctl "$n" -q stop "$(node_dir "$n")/catena$n.pid" >&2; then
    log "graceful stop of $(node_name "$n") failed; killing pid $pid"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  for _ in $(seq 1 30); do [ -d "/proc/$pid" ] || return 0; sleep 1; done
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_down() {
  local n pids=()
  # In parallel (a graceful stop takes ~10s each); the order does not matter as the data goes.
  for n in "${NODES[@]}"; do stop_node "$n" & pids+=($!); done
  for n in "${pids[@]}"; do wait "$n" || true; done
  cmd_heal
  # No `reset` needed: deleting the data dirs is a harder reset, and the next `up` is fresh.
  rm -rf "$BASE"
  log "cluster down, $BASE removed"
}

cmd_kill_node() {
  local n=$1 pid
  pid=$(node_pid "$n")
  [ -n "$pid" ] || die "$(node_name "$n") has no running VM"
  log "SIGKILL $(node_name "$n") beam.smp pid $pid"
  kill -KILL "$pid"
  while [ -d "/proc/$pid" ]; do sleep 0.1; done
}

cmd_start_node() {
  local n=$1
  [ -d "$(node_dir "$n")/mnesia" ] || die "$(node_name "$n") has no data dir: run '$0 up' first"
  launch "$n"
  wait_booted "$n"
  wait_in_cluster "$n"
  log "$(node_name "$n") is back in the cluster"
}

# The leader as Ra itself reports it (quorum_status asks the members), from the first node that
# answers; the management API (GET /api/queues/VH/Q, field `leader`) is the fallback.
cmd_leader() {
  local q=$1 vh=${2:-/} n leader
  for n in "${NODES[@]}"; do
    # timeout: with a member cut off by a partition the query can hang until net_ticktime
    leader=$(as_node "$n" timeout 15 "$RMQ_BIN/rabbitmq-queues" -n "$(node_name "$n")" -q --vhost "$vh" \
      quorum_status "$q" --formatter json 2>/dev/null |
      jq -r '.[] | select(."Raft State" == "leader") | ."Node Name"' 2>/dev/null | head -n1) || true
    if [ -n "$leader" ]; then echo "$leader"; return; fi
  done
  local qe vhe
  qe=$(jq -rn --arg s "$q" '$s|@uri')
  vhe=$(jq -rn --arg s "$vh" '$s|@uri')
  for n in "${NODES[@]}"; do
    leader=$(curl -fsS -m 5 -u guest:guest "http://127.0.0.1:$((MGMT_BASE + n))/api/queues/$vhe/$qe" 2>/dev/null |
      jq -r '.leader // empty' 2>/dev/null) || true
    if [ -n "$leader" ]; then echo "$leader"; return; fi
  done
  die "no node knows a leader for queue '$q' in vhost '$vh'"
}

cmd_ports() {
  local n urls=()
  for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$((AMQP_BASE + n))/%2f"); done
  (IFS=,; echo "${urls[*]}")
}

# Partitions with iptables on loopback. Peers connect FROM 127.0.1.M (inet_dist_connect_options
# above) TO 127.0.0.1:<dist port>, while CLI tools and epmd use 127.0.0.1 on both ends, so these
# four rules drop exactly the peer<->N traffic, in both directions of both kinds of connection.
# Everything lives in one chain hooked into OUTPUT (loopback packets pass OUTPUT once), so
# `heal` / `down` remove it without touching anyone else's rules.
CHAIN=CATENA_RMQ_PARTITION
ipt() { iptables -w 10 "$@"; }
cmd_partition() {
  local n=$1 dport
  dport=$((DIST_BASE + n)) # not on the `local` line: there $n would still be unset
  command -v iptables >/dev/null || die "iptables is not installed (apt-get install -y iptables)"
  ipt -N "$CHAIN" 2>/dev/null || true
  ipt -C OUTPUT -j "$CHAIN" 2>/dev/null || ipt -I OUTPUT -j "$CHAIN"
  ipt -A "$CHAIN" -p tcp -s 127.0.1.0/24 -d 127.0.0.1 --dport "$dport" -j DROP
  ipt -A "$CHAIN" -p tcp -s 127.0.0.1 --sport "$dport" -d 127.0.1.0/24 -j DROP
  ipt -A "$CHAIN" -p tcp -s "127.0.1.$n" -j DROP
  ipt -A "$CHAIN" -p tcp -d "127.0.1.$n" -j DROP
  log "$(node_name "$n") cut off from its peers (heal with: $0 heal)"
}
cmd_heal() {
  command -v iptables >/dev/null || return 0
  ipt -D OUTPUT -j "$CHAIN" 2>/dev/null || true
  ipt -F "$CHAIN" 2>/dev/null || true
  ipt -X "$CHAIN" 2>/dev/null || true
}

cmd_mgmt_urls() {
  local n urls=()
  for n in "${NODES[@]}"; do urls+=("http://127.0.0.1:$((MGMT_BASE + n))"); done
  (IFS=,; echo "${urls[*]}")
}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  stop-node) check_n "${1:-}"; stop_node "$1" ;;
  kill-node) check_n "${1:-}"; cmd_kill_node "$1" ;;
  start-node) check_n "${1:-}"; cmd_start_node "$1" ;;
  leader) [ -n "${1:-}" ] || usage; cmd_leader "$@" ;;
  ports) cmd_ports ;;
  mgmt-urls) cmd_mgmt_urls ;;
  ctl) check_n "${1:-}"; n=$1; shift; ctl "$n" "$@" ;;
  partition) check_n "${1:-}"; cmd_partition "$1" ;;
  heal) cmd_heal; log "partition rules removed" ;;
  status) n=$(first_running) || die "no node is running"; ctl "$n" cluster_status ;;
  *) usage ;;
esac
