#!/usr/bin/env bash
# Start the local PostgreSQL and RabbitMQ when they are installed but not running (idempotent).
# Run by scripts/setup.sh, by `catena-ingest dev` on local defaults and by the test harness when
# a service does not answer. Where one is not installed it says, in one line, what to install.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  echo "PostgreSQL is not installed: apt-get install postgresql (15 or newer), then rerun" >&2
  exit 1
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not installed: apt-get install rabbitmq-server (3.10 or newer), then rerun" >&2
  exit 1
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "starting RabbitMQ"
  as_root rabbitmq-server -detached
fi
# await_startup waits for the boot, but fails at once while the node's Erlang VM is not up yet
# (a loaded machine takes more than a moment): retry until the CLI reaches the node.
for _ in $(seq 1 60); do
  rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 && break
  sleep 1
done
rabbitmqctl -q await_startup --timeout 120
echo "RabbitMQ up: $(rabbitmqctl -q version 2>/dev/null || echo '?')"
