#!/usr/bin/env bash
# Set up this machine for catena-ingest: start PostgreSQL and RabbitMQ when they are not up,
# enable RabbitMQ's Prometheus plugin, and install the test tools (Prometheus and Alertmanager
# for the alerting tests). Idempotent; the README's first command and the first step of .ci/run.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

"$(dirname "${BASH_SOURCE[0]}")/services.sh"

# RabbitMQ's own metrics on :15692 (as deploy/rabbitmq/enabled_plugins has it): the rules and the
# dashboard query its per-object series, and tests/it/sre.rs scrapes them. Enabling an enabled
# plugin changes nothing.
if ! rabbitmq-plugins -q is_enabled rabbitmq_prometheus >/dev/null 2>&1; then
  echo "enabling rabbitmq_prometheus"
  as_root rabbitmq-plugins -q enable rabbitmq_prometheus >/dev/null
fi

missing=()
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (tests start their own instances)"
  before="$(pgrep -x 'prometheus|prometheus-aler.*' 2>/dev/null | sort || true)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  # The packages' postinst may start system instances on :9090 and :9093, where `dev` serves the
  # worker's metrics: stop exactly the processes the install started (the tests use own ports).
  after="$(pgrep -x 'prometheus|prometheus-aler.*' 2>/dev/null | sort || true)"
  for pid in $(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after")); do
    as_root kill "$pid" 2>/dev/null || true
  done
fi
echo "prometheus-alertmanager: $(prometheus-alertmanager --version 2>&1 | head -n1)"
echo "prometheus: $(prometheus --version 2>&1 | head -n1)"
