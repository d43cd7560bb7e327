#!/usr/bin/env bash
# A real RabbitMQ 4.x broker beside the system's RabbitMQ 3.10, for testing catena-ingest against
# both. Debian 12 only packages 3.10, Debian 13 (trixie) packages 4.0 on Erlang 27, so this builds
# a minimal trixie chroot once (cached under /var/lib/catena-rabbitmq4/) and runs the broker in it.
#
#   scripts/rabbitmq4.sh [start]        build the chroot if needed, start the node, wait, print version
#   scripts/rabbitmq4.sh stop           stop the node, kill what is left of the chroot, unmount
#   scripts/rabbitmq4.sh status         running or not, version, listeners, mounts
#   scripts/rabbitmq4.sh ctl ARGS...    rabbitmqctl inside the chroot (e.g. `ctl list_queues`)
#   scripts/rabbitmq4.sh queues ARGS... rabbitmq-queues inside the chroot
#   scripts/rabbitmq4.sh diag ARGS...   rabbitmq-diagnostics inside the chroot
#   scripts/rabbitmq4.sh url            the AMQP URL of the 4.x broker
#
# Node rabbit4@localhost: AMQP 127.0.0.1:5673, management 15673, prometheus 15683, distribution
# 25673, epmd 4370, guest/guest from loopback. The host broker (rabbit@localhost on 5672, epmd 4369)
# is never touched: the chroot shares the host's network, so every port below is chosen not to
# collide with it, and the node registers with its own epmd instead of the host's.
set -euo pipefail

BASE=/var/lib/catena-rabbitmq4
ROOT=$BASE/root              # the finished chroot; a build happens in $ROOT.partial first
SUITE=trixie
MIRROR=http://deb.debian.org/debian

# Ports: none may collide with the host broker (5672, 15672, its prometheus 15692, 25672, epmd
# 4369) nor with scripts/rabbitmq-cluster.sh's nodes (5691-5693, 15691-15693, 25691-25693); that
# is why prometheus is on 15683 and not on the "management + 20" 15693 (cluster node 3's
# management port). Each can be moved with CATENA_RMQ4_* (use the same values for every call).
NODENAME=rabbit4@localhost                    # short name; the host's node is rabbit@localhost
AMQP_PORT=${CATENA_RMQ4_AMQP_PORT:-5673}
MGMT_PORT=${CATENA_RMQ4_MGMT_PORT:-15673}
PROM_PORT=${CATENA_RMQ4_PROM_PORT:-15683}
DIST_PORT=${CATENA_RMQ4_DIST_PORT:-25673}
EPMD_PORT=${CATENA_RMQ4_EPMD_PORT:-4370}      # its own epmd: never registers with the host's
CTL_DIST_MIN=$((DIST_PORT + 20000))           # the CLI tools' distribution ports (the host's CLI
CTL_DIST_MAX=$((DIST_PORT + 20010))           # uses 35672-35682, our default would be 35673-35683)
OWN_PORTS="$AMQP_PORT $MGMT_PORT $PROM_PORT $DIST_PORT $EPMD_PORT"

log() { echo "rabbitmq4: $*" >&2; }
die() { log "$*"; exit 1; }

# --- chroot plumbing ---------------------------------------------------------------------------

# The environment every command in the chroot gets: a clean one (env -i), so nothing of the
# host's RABBITMQ_*/ERL_* settings leaks in and points the tools at the host node. The same values
# are in the chroot's rabbitmq-env.conf; passing them here too makes the CLI's target explicit.
chroot_env() {
  echo PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8 \
    ERL_EPMD_PORT="$EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_NODENAME=$NODENAME RABBITMQ_USE_LONGNAME=false
}

# Run a command in the chroot as root (package installation).
in_chroot_root() {
  local dir=$1; shift
  # shellcheck disable=SC2046
  chroot "$dir" /usr/bin/env -i $(chroot_env) HOME=/root DEBIAN_FRONTEND=noninteractive "$@"
}

# Run a command in the chroot as its rabbitmq user (server and CLI tools). Numeric ids from the
# chroot's own passwd, because the host has a rabbitmq user too, possibly with other ids. Running as
# that user directly (not via Debian's root->su wrapper) keeps arguments quoted as given and makes
# HOME, hence the Erlang cookie, the chroot's /var/lib/rabbitmq/.erlang.cookie.
in_chroot_rabbit() {
  local uid gid
  uid=$(awk -F: '$1=="rabbitmq"{print $3}' "$ROOT/etc/passwd")
  gid=$(awk -F: '$1=="rabbitmq"{print $4}' "$ROOT/etc/passwd")
  [ -n "$uid" ] || die "no rabbitmq user in $ROOT/etc/passwd (broken build? rm -rf $ROOT)"
  # shellcheck disable=SC2046
  chroot --userspec="$uid:$gid" --groups="$gid" "$ROOT" \
    /usr/bin/env -i $(chroot_env) HOME=/var/lib/rabbitmq "$@"
}

# Mount what apt and the Erlang VM need (/proc for memory and CPU detection, /dev for /dev/null and
# /dev/urandom, /dev/pts for dpkg's pty, /sys for CPU topology). Plain (non-recursive) binds made
# slaves, so nothing mounted or unmounted under the chroot can propagate back to the host's mounts.
ensure_mounts() {
  local dir=$1
  mountpoint -q "$dir/proc" || mount -t proc proc "$dir/proc"
  mountpoint -q "$dir/sys" || { mount --bind /sys "$dir/sys" && mount --make-slave "$dir/sys"; }
  mountpoint -q "$dir/dev" || { mount --bind /dev "$dir/dev" && mount --make-slave "$dir/dev"; }
  mountpoint -q "$dir/dev/pts" || { mount --bind /dev/pts "$dir/dev/pts" && mount --make-slave "$dir/dev/pts"; }
}

mounts_under() { findmnt -rn -o TARGET | awk -v d="$1/" 'index($0, d) == 1'; }

# Unmount everything under a chroot dir, deepest first (so /dev/pts goes before /dev).
unmount_all() {
  local dir=$1 m
  for m in $(mounts_under "$dir" | sort -r); do
    umount "$m" || umount -l "$m"
  done
}

# PIDs of processes whose root directory is the chroot: the node, its epmd, erl_child_setup,
# inet_gethost, a hung CLI. This is what "the chroot's processes" means; nothing on the host matches.
chroot_pids() {
  local p r
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    [ "$r" = "$ROOT" ] && echo "${p#/proc/}"
  done
  return 0
}

node_beam_pid() {
  local p
  for p in $(chroot_pids); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = beam.smp ] && { echo "$p"; return 0; }
  done
  return 1
}

# Does a TCP port accept connections on 127.0.0.1?
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# --- build -------------------------------------------------------------------------------------

# shellcheck disable=SC2016 # ${Status} is dpkg-query's format, not a shell expansion
is_built() {
  [ -x "$ROOT/usr/bin/dpkg-query" ] &&
    [ "$(chroot "$ROOT" dpkg-query -W -f='${Status}' rabbitmq-server 2>/dev/null)" = "install ok installed" ]
}

build() {
  local dir=$ROOT.partial t0=$SECONDS
  command -v debootstrap >/dev/null 2>&1 || {
    log "installing debootstrap"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  # A leftover partial build (interrupted run) is thrown away rather than trusted. Unmount first
  # and stay on this filesystem, so rm can never reach the host's /proc, /sys or /dev.
  if [ -e "$dir" ]; then
    unmount_all "$dir"
    rm -rf --one-file-system "$dir"
  fi
  mkdir -p "$dir"
  log "debootstrap $SUITE into $dir (takes a few minutes)"
  debootstrap --variant=minbase "$SUITE" "$dir" "$MIRROR" >"$BASE/debootstrap.log" 2>&1 ||
    die "debootstrap failed, see $BASE/debootstrap.log"

  # There is no init in the chroot: tell package scripts not to start services, so installing
  # rabbitmq-server (or erlang's epmd) never tries to start anything, least of all on 5672/4369.
  printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
  chmod 755 "$dir/usr/sbin/policy-rc.d"
  # Point updates at trixie-updates/-security too, so the chroot gets the current 4.0.x patch.
  cat >"$dir/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
  # Node name rabbit4@localhost needs localhost to resolve inside the chroot.
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$dir/etc/hosts"
  cp /etc/resolv.conf "$dir/etc/resolv.conf"

  ensure_mounts "$dir"
  log "apt-get install rabbitmq-server in the chroot"
  {
    in_chroot_root "$dir" apt-get update &&
      in_chroot_root "$dir" apt-get install -y --no-install-recommends rabbitmq-server &&
      in_chroot_root "$dir" apt-get clean
  } >"$BASE/apt.log" 2>&1 || { unmount_all "$dir"; die "apt-get in the chroot failed, see $BASE/apt.log"; }
  unmount_all "$dir"
  # Only a complete build gets the final name, so is_built never sees a half-made chroot.
  mv "$dir" "$ROOT"
  log "chroot built in $((SECONDS - t0))s"
}

# --- configuration (rewritten on every start, so edits to this script take effect) --------------

configure() {
  local etc=$ROOT/etc/rabbitmq
  mkdir -p "$etc"
  # Read by every RabbitMQ script in the chroot (server and CLI alike). ERL_EPMD_* are exported
  # because the Erlang VM itself reads them: the node starts/uses an epmd on 4370, loopback only.
  cat >"$etc/rabbitmq-env.conf" <<EOF
# Written by catena-ingest scripts/rabbitmq4.sh; rewritten on every start.
NODENAME=$NODENAME
USE_LONGNAME=false
DIST_PORT=$DIST_PORT
CTL_DIST_PORT_MIN=$CTL_DIST_MIN
CTL_DIST_PORT_MAX=$CTL_DIST_MAX
MNESIA_BASE=/var/lib/rabbitmq/mnesia
LOG_BASE=/var/log/rabbitmq
CONFIG_FILE=/etc/rabbitmq/rabbitmq.conf
ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export ERL_EPMD_PORT=$EPMD_PORT
export ERL_EPMD_ADDRESS=127.0.0.1
EOF
  cat >"$etc/rabbitmq.conf" <<EOF
# Written by catena-ingest scripts/rabbitmq4.sh; rewritten on every start.
# Everything on loopback and on ports the host's 3.10 broker does not use.
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $PROM_PORT
# The default, spelled out: guest/guest may log in, from loopback only.
loopback_users.guest = true
EOF
  # The plugins file is what `rabbitmq-plugins enable --offline` writes; writing it directly avoids
  # a CLI round trip on each start.
  echo '[rabbitmq_management,rabbitmq_prometheus].' >"$etc/enabled_plugins"

  # Its own cookie, made once: the CLI tools and the node read it from the rabbitmq user's HOME.
  local cookie=$ROOT/var/lib/rabbitmq/.erlang.cookie
  if [ ! -s "$cookie" ]; then
    # (no `tr </dev/urandom | head`: under pipefail tr's SIGPIPE would abort the script)
    head -c 48 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$cookie"
  fi
  chroot "$ROOT" chown rabbitmq:rabbitmq /var/lib/rabbitmq/.erlang.cookie /etc/rabbitmq/enabled_plugins
  chmod 400 "$cookie"
}

# --- subcommands ---------------------------------------------------------------------------------

node_answers() { in_chroot_rabbit rabbitmqctl -q status >/dev/null 2>&1; }

server_version() { in_chroot_rabbit rabbitmq-diagnostics -q server_version 2>/dev/null; }

cmd_start() {
  local t0=$SECONDS p owner
  is_built || build

  if node_beam_pid >/dev/null; then
    log "node already running (pid $(node_beam_pid)); waiting for it to be up"
  else
    # Refuse to start on a port something else holds: better a clear message than a node that
    # dies at boot or, worse, a CLI that finds the wrong epmd.
    for p in $OWN_PORTS; do
      owner=$(ss -Hltnp "sport = :$p" 2>/dev/null | head -n1)
      [ -z "$owner" ] || die "port $p already in use outside the chroot: $owner"
    done
    configure
    ensure_mounts "$ROOT"
    log "starting $NODENAME"
    # setsid + nohup: the node outlives this shell and its session; console output goes to a
    # file in the chroot's log dir, next to the node's own log.
    # shellcheck disable=SC2046
    setsid nohup chroot --userspec="$(awk -F: '$1=="rabbitmq"{print $3":"$4}' "$ROOT/etc/passwd")" \
      "$ROOT" /usr/bin/env -i $(chroot_env) HOME=/var/lib/rabbitmq rabbitmq-server \
      >>"$ROOT/var/log/rabbitmq/console.log" 2>&1 </dev/null 9>&- &
    # (9>&-: the node must not inherit the lock below, or every later run would wait on it)
  fi

  local deadline=$((SECONDS + 180))
  until in_chroot_rabbit rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1 && port_open "$AMQP_PORT"; do
    if ! node_beam_pid >/dev/null; then
      tail -n 30 "$ROOT/var/log/rabbitmq/console.log" >&2 || true
      die "node exited during start; logs in $ROOT/var/log/rabbitmq/"
    fi
    [ $SECONDS -lt $deadline ] || die "node not up after 180s; logs in $ROOT/var/log/rabbitmq/"
    sleep 1
  done
  log "up in $((SECONDS - t0))s: RabbitMQ $(server_version) at $(cmd_url)," \
    "management http://127.0.0.1:$MGMT_PORT, prometheus http://127.0.0.1:$PROM_PORT/metrics"
}

cmd_stop() {
  local pids
  [ -d "$ROOT" ] || { log "no chroot at $ROOT, nothing to stop"; return 0; }
  if node_beam_pid >/dev/null; then
    log "stopping $NODENAME"
    # shutdown waits for the node's OS process to exit, unlike a bare signal.
    in_chroot_rabbit rabbitmqctl -q shutdown --timeout 60 >/dev/null 2>&1 || true
  fi
  # Whatever is left (the chroot's epmd on 4370, a hung CLI): TERM, then KILL after 10s.
  pids=$(chroot_pids)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 10); do
      pids=$(chroot_pids); [ -z "$pids" ] && break; sleep 1
    done
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  fi
  unmount_all "$ROOT"
  log "stopped"
}

cmd_status() {
  local pid
  if ! is_built; then echo "not built ($ROOT)"; return 1; fi
  local rc=3 # the LSB status convention: 0 running, 3 not
  if pid=$(node_beam_pid) && node_answers; then
    echo "running: $NODENAME pid $pid, RabbitMQ $(server_version), $(cmd_url)"
    in_chroot_rabbit rabbitmq-diagnostics -q listeners
    rc=0
  else
    echo "not running${pid:+ (beam pid $pid does not answer)}"
  fi
  echo "chroot: $ROOT; mounts: $(mounts_under "$ROOT" | tr '\n' ' ')"
  return $rc
}

# For ctl/queues/diag: mount if needed, and if the node is not running, unmount again afterwards
# so a one-off command does not leave mounts behind.
cmd_tool() {
  local tool=$1; shift
  is_built || die "not built: run '$0 start' first"
  ensure_mounts "$ROOT"
  local rc=0
  in_chroot_rabbit "$tool" "$@" || rc=$?
  node_beam_pid >/dev/null || unmount_all "$ROOT"
  return $rc
}

cmd_url() { echo "amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"; }

main() {
  local cmd=${1:-start}
  [ $# -eq 0 ] || shift
  case $cmd in
    url) cmd_url; return ;;
    start | stop | status | ctl | queues | diag) ;;
    -h | --help | help) sed -n '2,17p' "$0"; return ;;
    *) die "unknown command '$cmd' (start|stop|status|ctl|queues|diag|url)" ;;
  esac
  # Root for chroot/mount; re-run under sudo otherwise.
  [ "$(id -u)" -eq 0 ] || exec sudo --preserve-env=CATENA_RMQ4_AMQP_PORT,CATENA_RMQ4_MGMT_PORT,CATENA_RMQ4_PROM_PORT,CATENA_RMQ4_DIST_PORT,CATENA_RMQ4_EPMD_PORT -- "$0" "$cmd" "$@"
  mkdir -p "$BASE"
  # One at a time: two concurrent starts must not race the build or launch two nodes.
  exec 9>"$BASE/.lock"
  flock 9
  case $cmd in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    ctl) cmd_tool rabbitmqctl "$@" ;;
    queues) cmd_tool rabbitmq-queues "$@" ;;
    diag) cmd_tool rabbitmq-diagnostics "$@" ;;
  esac
}

main "$@"
