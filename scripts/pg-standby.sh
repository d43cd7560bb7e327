#!/usr/bin/env bash
# A throwaway PostgreSQL 15 primary + streaming standby for the failover tests, made of two NEW
# clusters beside the machine's own 15/main (5432, never touched):
#   15/catena_primary  127.0.0.1:5440
#   15/catena_standby  127.0.0.1:5441  (pg_basebackup -R of the primary, physical slot, hot standby)
# Synchronous replication (the primary's commits wait for the standby's flush; the standby, once
# promoted, has no standby and commits alone), trust auth on 127.0.0.1 only.
#
#   up             create/start both; wait until the primary's pg_stat_replication shows the
#                  standby streaming. Recreates both when they are not primary/standby-shaped
#                  (e.g. after a failover), so it is always safe to run
#   down           stop and pg_dropcluster both
#   stop-primary   fast shutdown of the primary
#   kill-primary   SIGKILL the primary's postmaster (pid from its postmaster.pid)
#   promote        promote the standby, wait until pg_is_in_recovery() is false
#   status         both clusters' state, recovery mode and replication
#   url [DB]       postgres://postgres@127.0.0.1:5440,127.0.0.1:5441/DB?target_session_attrs=read-write
set -euo pipefail

# pg_createcluster/pg_ctlcluster/pg_dropcluster and reading postmaster.pid need root (or the
# postgres user): re-run ourselves under sudo rather than prefix every command.
if [ "$(id -u)" -ne 0 ]; then
  exec sudo "$0" "$@"
fi

VER=15
PRIMARY=catena_primary
STANDBY=catena_standby
PRIMARY_PORT=5440
STANDBY_PORT=5441
SLOT=catena_standby
HOST=127.0.0.1
WAIT=${CATENA_PG_WAIT:-60}

log() { printf '[pg-standby] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --skip-systemctl-redirect: there is no systemd here, and even where there is, these test
# clusters must not become systemd units.
ctlcluster() { pg_ctlcluster --skip-systemctl-redirect "$@"; }
as_pg() { runuser -u postgres -- "$@"; }
exists() { [ -d "/etc/postgresql/$VER/$1" ]; }
datadir() { echo "/var/lib/postgresql/$VER/$1"; }
# Status is "online", or "online,recovery" for a standby.
online() { pg_lsclusters -h "$VER" "$1" 2>/dev/null | awk '{print $4}' | grep -q '^online'; }
# -X: never read a ~/.psqlrc; -At: bare values. Connect over TCP like the tests do.
q() { local port=$1; shift; psql -X -At -h "$HOST" -p "$port" -U postgres -d postgres -c "$@"; }
in_recovery() { q "$1" 'select pg_is_in_recovery()' 2>/dev/null; }
# Streaming as the synchronous standby: a pair left by an older version of this script
# (asynchronous) is not the shape the tests need and gets rebuilt.
streaming() { q "$PRIMARY_PORT" "select count(*) from pg_stat_replication where state = 'streaming' and sync_state = 'sync'" 2>/dev/null; }

# Settings of both clusters (the standby keeps its own after a promotion). conf.d is included
# at the end of Debian's postgresql.conf, so these win over its defaults; postgresql.auto.conf
# (primary_conninfo, primary_slot_name, written by pg_basebackup -R) is read after them.
write_conf() {
  local name=$1 port=$2 sync_names=$3 etc="/etc/postgresql/$VER/$1"
  mkdir -p "$etc/conf.d"
  cat >"$etc/conf.d/90-catena.conf" <<EOF
# written by scripts/pg-standby.sh
listen_addresses = '$HOST'
port = $port
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
# The primary: '*', a commit is acknowledged once the standby has flushed it, so a SIGKILLed
# primary takes no acknowledged commit with it (with asynchronous replication one took an
# acked event along in CI). The standby: '', once promoted it has no standby to wait for.
synchronous_standby_names = '$sync_names'
# the standby retries a lost primary every second instead of every 5
wal_retrieve_retry_interval = 1s
EOF
  # Trust on loopback, including replication connections (pg_basebackup, the walreceiver).
  # Test clusters only: nothing listens beyond 127.0.0.1.
  cat >"$etc/pg_hba.conf" <<EOF
# written by scripts/pg-standby.sh
local   all          all                 trust
local   replication  all                 trust
host    all          all   127.0.0.1/32  trust
host    replication  all   127.0.0.1/32  trust
host    all          all   ::1/128       trust
host    replication  all   ::1/128       trust
EOF
  chown -R postgres:postgres "$etc"
}

wait_ready() {
  local port=$1 deadline=$((SECONDS + WAIT))
  until pg_isready -q -h "$HOST" -p "$port"; do
    ((SECONDS < deadline)) || die "nothing answers on $HOST:$port after ${WAIT}s"
    sleep 0.2
  done
}

wait_streaming() {
  local deadline=$((SECONDS + WAIT))
  until [ "$(streaming || echo 0)" -ge 1 ]; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

drop() {
  local name=$1
  case "$name" in "$PRIMARY" | "$STANDBY") ;; *) die "refusing to drop $VER/$name" ;; esac
  exists "$name" || [ -d "$(datadir "$name")" ] || return 0
  log "dropping $VER/$name"
  # immediate: the data is thrown away anyway, and a killed cluster has nothing to flush
  online "$name" && { ctlcluster "$VER" "$name" stop -m immediate || true; }
  pg_dropcluster "$VER" "$name" --stop 2>/dev/null || log "pg_dropcluster $VER $name failed; removing its directories"
  # pg_dropcluster leaves files it did not create (our conf.d/90-catena.conf), and a left-over
  # /etc/postgresql/15/NAME makes the next pg_createcluster refuse: remove both trees.
  rm -rf "/etc/postgresql/$VER/$name" "$(datadir "$name")"
}

create_primary() {
  log "creating $VER/$PRIMARY on $PRIMARY_PORT"
  # --start-conf=manual: never started at boot by the postgresql service, only by this script
  pg_createcluster "$VER" "$PRIMARY" -p "$PRIMARY_PORT" --start-conf=manual >/dev/null
  write_conf "$PRIMARY" "$PRIMARY_PORT" '*'
  ctlcluster "$VER" "$PRIMARY" start
  wait_ready "$PRIMARY_PORT"
  # The slot keeps the WAL the standby has not received yet, however long it is down.
  q "$PRIMARY_PORT" "select pg_create_physical_replication_slot('$SLOT')" >/dev/null
}

create_standby() {
  local dd
  dd=$(datadir "$STANDBY")
  log "creating $VER/$STANDBY on $STANDBY_PORT from a base backup of the primary"
  # pg_createcluster makes the config (/etc/postgresql/15/catena_standby) and an initdb'd data
  # dir; the data dir is then replaced by the base backup.
  pg_createcluster "$VER" "$STANDBY" -p "$STANDBY_PORT" --start-conf=manual >/dev/null
  write_conf "$STANDBY" "$STANDBY_PORT" ""
  find "$dd" -mindepth 1 -delete
  # -R: standby.signal + primary_conninfo/primary_slot_name in postgresql.auto.conf.
  # -X stream: the WAL written during the backup comes along. --checkpoint=fast: no 5 min wait.
  as_pg pg_basebackup -h "$HOST" -p "$PRIMARY_PORT" -U postgres -D "$dd" \
    -R -X stream -S "$SLOT" --checkpoint=fast
  ctlcluster "$VER" "$STANDBY" start
  wait_ready "$STANDBY_PORT"
}

# True when 5440 is a primary and 5441 a standby streaming from it.
shaped() {
  exists "$PRIMARY" && exists "$STANDBY" || return 1
  online "$PRIMARY" && online "$STANDBY" || return 1
  [ "$(in_recovery "$PRIMARY_PORT")" = f ] && [ "$(in_recovery "$STANDBY_PORT")" = t ] || return 1
  wait_streaming
}

cmd_up() {
  local name
  # A stopped pair (e.g. after a reboot) is started again as it is; only when that does not
  # give primary + streaming standby (after a failover, the old primary would come back as a
  # second primary) are both thrown away and rebuilt.
  if exists "$PRIMARY" && exists "$STANDBY" && online "$STANDBY" &&
    [ "$(in_recovery "$STANDBY_PORT")" = f ]; then
    # Promoted standby: rebuild right away, starting the old primary (crash recovery) is wasted.
    log "$VER/$STANDBY was promoted: rebuilding the pair"
  elif exists "$PRIMARY" && exists "$STANDBY"; then
    for name in "$PRIMARY" "$STANDBY"; do
      online "$name" || ctlcluster "$VER" "$name" start 2>/dev/null || log "$VER/$name does not start"
    done
    pg_isready -q -h "$HOST" -p "$PRIMARY_PORT" -t 10 || true
    pg_isready -q -h "$HOST" -p "$STANDBY_PORT" -t 10 || true
  fi
  if shaped; then
    log "primary on $PRIMARY_PORT, standby streaming on $STANDBY_PORT (already up)"
    return
  fi
  drop "$STANDBY"
  drop "$PRIMARY"
  create_primary
  create_standby
  wait_streaming || die "the standby does not stream after ${WAIT}s; see /var/log/postgresql/postgresql-$VER-$STANDBY.log"
  log "primary on $PRIMARY_PORT, standby streaming on $STANDBY_PORT"
  q "$PRIMARY_PORT" 'select application_name, client_addr, state, sync_state from pg_stat_replication'
}

cmd_down() {
  drop "$STANDBY"
  drop "$PRIMARY"
  log "both clusters dropped"
}

cmd_stop_primary() {
  online "$PRIMARY" || { log "$VER/$PRIMARY is not running"; return; }
  ctlcluster "$VER" "$PRIMARY" stop -m fast
}

cmd_kill_primary() {
  local dd pid kids
  dd=$(datadir "$PRIMARY")
  pid=$(head -n1 "$dd/postmaster.pid" 2>/dev/null || true)
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || die "$VER/$PRIMARY has no running postmaster"
  # Never anything but this cluster's postmaster: its command line names its data directory.
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-D $dd " || die "pid $pid is not $VER/$PRIMARY's postmaster"
  kids=$(pgrep -P "$pid" || true)
  log "SIGKILL postmaster $pid of $VER/$PRIMARY"
  kill -KILL "$pid"
  # The backends notice their postmaster's death and exit within a moment (Linux parent-death
  # signal); wait for that so the port is really free, as after a crash.
  local deadline=$((SECONDS + 10)) k
  for k in $kids; do
    while [ -d "/proc/$k" ] && ((SECONDS < deadline)); do sleep 0.1; done
  done
  while [ -d "/proc/$pid" ]; do sleep 0.1; done
}

cmd_promote() {
  online "$STANDBY" || die "$VER/$STANDBY is not running"
  [ "$(in_recovery "$STANDBY_PORT")" = t ] || { log "$VER/$STANDBY is already a primary"; return; }
  ctlcluster "$VER" "$STANDBY" promote
  local deadline=$((SECONDS + WAIT))
  until [ "$(in_recovery "$STANDBY_PORT")" = f ]; do
    ((SECONDS < deadline)) || die "$VER/$STANDBY still in recovery after ${WAIT}s"
    sleep 0.1
  done
  log "$VER/$STANDBY on $STANDBY_PORT is now a primary"
}

cmd_status() {
  local name port r
  pg_lsclusters "$VER" | awk -v a="$PRIMARY" -v b="$STANDBY" 'NR == 1 || $2 == a || $2 == b'
  for name in "$PRIMARY" "$STANDBY"; do
    port=$PRIMARY_PORT; [ "$name" = "$STANDBY" ] && port=$STANDBY_PORT
    r=$(in_recovery "$port" || true)
    case "$r" in t) r="standby (in recovery)" ;; f) r="primary (read-write)" ;; *) r="not answering" ;; esac
    echo "$VER/$name $HOST:$port: $r"
  done
  if [ "$(in_recovery "$PRIMARY_PORT" || true)" = f ]; then
    echo "replication from $PRIMARY_PORT:"
    q "$PRIMARY_PORT" 'select application_name, state, sync_state, replay_lag from pg_stat_replication' || true
  fi
}

cmd_url() {
  echo "postgres://postgres@$HOST:$PRIMARY_PORT,$HOST:$STANDBY_PORT/${1:-postgres}?target_session_attrs=read-write"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  stop-primary) cmd_stop_primary ;;
  kill-primary) cmd_kill_primary ;;
  promote) cmd_promote ;;
  status) cmd_status ;;
  url) cmd_url "${2:-}" ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
