#!/usr/bin/env bash
# Start PostgreSQL and RabbitMQ on this machine when they are not already up (the README's
# first setup command and the first step of .ci/run). Idempotent.
set -euo pipefail

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached
  sleep 2
fi
rabbitmqctl -q await_startup --timeout 120
echo "RabbitMQ up: $(rabbitmqctl -q version 2>/dev/null || echo '?')"
