#!/usr/bin/env bash
# Set up this machine for catena-ingest: start PostgreSQL and RabbitMQ when they are not up,
# and install the test tools (Alertmanager for the alerting tests). Idempotent; the README's
# first command and the first step of .ci/run.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

"$(dirname "${BASH_SOURCE[0]}")/services.sh"

if ! command -v prometheus-alertmanager >/dev/null 2>&1; then
  echo "installing prometheus-alertmanager (tests start their own instances)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus-alertmanager >/dev/null
  # The package may start a system instance on :9093; the tests use their own ports.
fi
echo "prometheus-alertmanager: $(prometheus-alertmanager --version 2>&1 | head -n1)"
