#!/usr/bin/env bash
# Validate every deployment / operations artifact without a cluster, a Docker daemon or a
# Rust build:
#   docker-compose.yml           compose-spec JSON schema (check-jsonschema)
#   deploy/k8s/*.yaml            Kubernetes OpenAPI schemas, strict (kubernetes-validate);
#                                CRD documents (KEDA, Prometheus Operator) are skipped
#   deploy/k8s/prometheusrule.yaml  up to date with scripts/gen-prometheusrule.py
#   deploy/prometheus            promtool check config / check rules / test rules
#   deploy/alertmanager          amtool check-config
#   deploy/grafana               dashboard JSON parses, its PromQL parses (with its variables,
#                                e.g. $prefix, at their defaults), every queue selector uses
#                                $prefix, and it (like the rules) uses only catena_* metrics
#                                the binary exports
#   deploy/RUNBOOK.md            one section per alert, matching the runbook_url annotations
#   rule names                   none is the alertname of a notification the worker posts itself
#
# Missing tools are installed quietly (Debian packages prometheus + prometheus-alertmanager
# for promtool/amtool; PyPI packages check-jsonschema, kubernetes-validate, PyYAML).
# Prints one PASS/FAIL line per check and exits non-zero if any check failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

log() { printf '%s\n' "$*" >&2; }

# --------------------------------------------------------------------------- tool install
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    log "need root (or sudo) to run: $*"; return 1
  fi
}

install_prometheus_tools() {
  command -v promtool >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 && return 0
  log "installing promtool/amtool (Debian packages prometheus, prometheus-alertmanager) ..."
  # Remember which daemons already run, so only the ones the packages start get stopped.
  local before after pid
  before="$(pgrep -x 'prometheus|prometheus-aler.*' 2>/dev/null | sort || true)"
  if ! { as_root apt-get update -qq \
         && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
              prometheus prometheus-alertmanager; } >"$TMP/apt.log" 2>&1; then
    cat "$TMP/apt.log" >&2
    return 1
  fi
  # Where the packages' postinst started the services, stop exactly those processes (by pid)
  # so they do not hold ports 9090/9093.
  after="$(pgrep -x 'prometheus|prometheus-aler.*' 2>/dev/null | sort || true)"
  for pid in $(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after")); do
    as_root kill "$pid" 2>/dev/null || true
  done
}

pip_install() {
  log "installing $* (pip) ..."
  if ! python3 -m pip install -q "$@" >"$TMP/pip.log" 2>&1; then
    if grep -q externally-managed "$TMP/pip.log"; then
      python3 -m pip install -q --break-system-packages "$@" >"$TMP/pip.log" 2>&1 \
        || { cat "$TMP/pip.log" >&2; return 1; }
    else
      cat "$TMP/pip.log" >&2; return 1
    fi
  fi
  hash -r
}

install_python_tools() {
  local missing=()
  command -v check-jsonschema >/dev/null 2>&1 || missing+=(check-jsonschema)
  command -v kubernetes-validate >/dev/null 2>&1 || missing+=(kubernetes-validate)
  python3 -c 'import yaml' >/dev/null 2>&1 || missing+=(PyYAML)
  [ "${#missing[@]}" -eq 0 ] || pip_install "${missing[@]}"
}

install_prometheus_tools
install_python_tools

log "tools: $(promtool --version 2>&1 | head -n1); $(amtool --version 2>&1 | head -n1);" \
  "check-jsonschema $(check-jsonschema --version 2>&1 | awk '{print $NF}');" \
  "kubernetes-validate $(kubernetes-validate --version 2>&1 | tail -n1)"

# --------------------------------------------------------------------------- checks
FAILED=0
check() {
  local name="$1"; shift
  if "$@" >"$TMP/check.log" 2>&1; then
    printf 'PASS  %s\n' "$name"
  else
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$TMP/check.log"
    FAILED=$((FAILED + 1))
  fi
}

CRD_KINDS="ScaledObject TriggerAuthentication ServiceMonitor PodMonitor PrometheusRule"

# Split deploy/k8s into core documents (written to $TMP/k8s/<file>) and CRD documents (kinds in
# CRD_KINDS: only sanity-checked here, kubernetes-validate has no schema for them).
k8s_validate() {
  mkdir -p "$TMP/k8s"
  # (Inside `check`, `set -e` does not apply to this function: every step returns explicitly.)
  CRD_KINDS="$CRD_KINDS" python3 - "$TMP/k8s" deploy/k8s/*.yaml <<'PY' || return 1
import os, sys, yaml
out, files = sys.argv[1], sys.argv[2:]
crd = set(os.environ["CRD_KINDS"].split())
core = skipped = 0
for path in files:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    keep = []
    for d in docs:
        for key in ("apiVersion", "kind", "metadata"):
            if key not in d:
                sys.exit(f"{path}: a document has no {key}")
        if d["kind"] in crd:
            skipped += 1
        else:
            keep.append(d)
    if keep:
        with open(os.path.join(out, os.path.basename(path)), "w") as f:
            yaml.safe_dump_all(keep, f, sort_keys=False)
        core += len(keep)
print(f"{core} core documents to validate, {skipped} CRD documents skipped")
PY
  shopt -s nullglob
  local docs=("$TMP"/k8s/*.yaml)
  [ "${#docs[@]}" -gt 0 ] || { echo "no core manifests found"; return 1; }
  kubernetes-validate --strict --quiet "${docs[@]}"
}

prometheusrule_fresh() {
  python3 scripts/gen-prometheusrule.py -o "$TMP/prometheusrule.yaml" || return 1
  diff -u deploy/k8s/prometheusrule.yaml "$TMP/prometheusrule.yaml"
}

# The dashboard's queries must parse (promtool, via a throwaway recording-rule file), and the
# dashboard and the alert rules may only use catena_* metrics the binary exports.
metrics_contract() {
  python3 - "$TMP/dashboard-rules.yml" <<'PY' || return 1
import json, re, sys, yaml
HISTOGRAMS = {
    "catena_relay_request_duration_seconds", "catena_relay_publish_confirm_seconds",
    "catena_relay_group_events",
    "catena_worker_batch_seconds", "catena_worker_batch_size", "catena_worker_event_lag_seconds",
    "catena_retention_sweep_seconds", "catena_onboarding_duration_seconds",
}
PLAIN = {
    "catena_relay_requests_total", "catena_relay_broker_ready", "catena_relay_inflight_requests",
    "catena_worker_events_total", "catena_worker_inflight", "catena_worker_ready",
    "catena_worker_stage_seconds_total",
    "catena_db_pool_connections", "catena_db_pool_max_connections",
    "catena_alerts_open", "catena_connections", "catena_schedules", "catena_parked_messages",
    "catena_outbox_pending", "catena_alerts_raised_total", "catena_alert_notifications_total",
    "catena_fleets", "catena_invitations", "catena_invitations_stuck", "catena_fleets_without_active_connection",
    "catena_onboarding_unmeasured_total",
    "catena_retention_pruned_rows_total", "catena_retention_sweeps_total",
    "catena_retention_last_success_timestamp_seconds",
    # control plane: the reconciler (`catena-ingest reconcile`) ...
    "catena_control_subscriptions", "catena_control_dlq_messages",
    "catena_control_actions_total", "catena_control_api_requests_total",
    "catena_control_last_success_timestamp_seconds", "catena_control_leader",
    "catena_control_secret_refusals",
    # ... and the relay's secrets reloader (CATENA_WEBHOOK_SECRETS_FILE)
    "catena_relay_secrets_reloads_total", "catena_relay_secrets_entries",
}
KNOWN = PLAIN | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

def exprs_of(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield v
            else:
                yield from exprs_of(v)
    elif isinstance(node, list):
        for v in node:
            yield from exprs_of(v)

dash = json.load(open("deploy/grafana/dashboards/catena-ingest.json"))
dash_exprs = list(exprs_of(dash))
rules = yaml.safe_load(open("deploy/prometheus/rules/catena.yml"))
rule_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
if not dash_exprs:
    sys.exit("dashboard has no queries")

bad = []
for origin, exprs in (("dashboard", dash_exprs), ("rules", rule_exprs)):
    for e in exprs:
        for name in set(re.findall(r"\bcatena_[a-z0-9_]+", e)):
            if name not in KNOWN:
                bad.append(f"{origin}: unknown metric {name} in: {e.strip()}")
if bad:
    sys.exit("\n".join(bad))

# Queue names carry CATENA_NAME_PREFIX: every queue selector must use the dashboard's `prefix`
# variable, or the panel is empty under another prefix and charts other tenants' queues on a
# shared broker.
for e in dash_exprs:
    for sel in re.findall(r'\bqueue\s*(?:=~|!~|=|!=)\s*"([^"]*)"', e):
        if not sel.startswith("$prefix"):
            bad.append(f"dashboard: queue selector \"{sel}\" does not start with $prefix in: {e.strip()}")
if bad:
    sys.exit("\n".join(bad))

# Grafana's built-in interval variables, then the dashboard's own variables (textbox, custom,
# constant) at their default values; anything left that looks like a variable is undefined.
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
own = {}
for v in dash.get("templating", {}).get("list", []):
    if v.get("type") in ("textbox", "custom", "constant"):
        current = v.get("current", {}).get("value") or v.get("query", "")
        own[v["name"]] = current
if "prefix" not in own:
    sys.exit("dashboard: no templating variable `prefix` (CATENA_NAME_PREFIX)")
for name in sorted(own, key=len, reverse=True):
    subst["${" + name + "}"] = own[name]
    subst["$" + name] = own[name]
rec = []
for i, e in enumerate(dash_exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    left = re.findall(r"\$\{?\w+", e)
    if left:
        sys.exit(f"dashboard: undefined variable(s) {left} in: {dash_exprs[i].strip()}")
    rec.append({"record": f"dashboard:query_{i}", "expr": e})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rec}]}, open(sys.argv[1], "w"))
print(f"{len(dash_exprs)} dashboard queries, {len(rule_exprs)} rule expressions checked")
PY
  promtool check rules "$TMP/dashboard-rules.yml"
}

runbook_sections() {
  python3 - <<'PY'
import re, sys, yaml
rules = yaml.safe_load(open("deploy/prometheus/rules/catena.yml"))
runbook = open("deploy/RUNBOOK.md").read()
headings = set(re.findall(r"^## (\S+)\s*$", runbook, re.M))
errors = []
for g in rules["groups"]:
    for r in g["rules"]:
        name = r.get("alert")
        if not name:
            continue
        ann = r.get("annotations", {})
        if name not in headings:
            errors.append(f"{name}: no '## {name}' section in deploy/RUNBOOK.md")
        if "runbook" in ann:
            errors.append(f"{name}: use the runbook_url annotation (kube-prometheus), not runbook")
        if not ann.get("runbook_url", "").endswith("/deploy/RUNBOOK.md#" + name.lower()):
            errors.append(f"{name}: runbook_url annotation does not end with #{name.lower()}")
        for key in ("summary", "description"):
            if not ann.get(key):
                errors.append(f"{name}: missing {key} annotation")
        if r.get("labels", {}).get("severity") not in ("page", "warning"):
            errors.append(f"{name}: severity label must be page or warning")
if errors:
    sys.exit("\n".join(errors))
PY
}

# The worker posts per-entity alerts to Alertmanager itself (src/alerts: AlertKind::alertname,
# and the `"alertname": "..."` of its warnings). A rule with one of those names would merge
# with them into one alert of mixed labels: rules must use other names.
alertnames_distinct() {
  python3 - <<'PY'
import pathlib, re, sys, yaml
src = "\n".join(p.read_text() for p in pathlib.Path("src").rglob("*.rs"))
fn = re.search(r"fn alertname\(self\)[^{]*\{(.*?)\n    \}", src, re.S)
if not fn:
    sys.exit("src: AlertKind::alertname() not found")
worker = set(re.findall(r'=>\s*"(Catena\w+)"', fn.group(1)))
worker |= set(re.findall(r'"alertname":\s*"(Catena\w+)"', src))
if len(worker) < 5:
    sys.exit(f"src: found only {sorted(worker)} as the worker's alertnames")
rules = yaml.safe_load(open("deploy/prometheus/rules/catena.yml"))
names = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
errors = [f"rule {n} has the alertname of a worker notification" for n in names if n in worker]
errors += [f"rule {n} is defined more than once" for n in sorted(set(names)) if names.count(n) > 1]
if errors:
    sys.exit("\n".join(errors))
print(f"{len(names)} rules; worker notifications: {', '.join(sorted(worker))}")
PY
}

check "docker-compose.yml matches the compose spec" \
  check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
check "deploy/k8s core manifests (kubernetes-validate --strict)" k8s_validate
check "deploy/k8s/prometheusrule.yaml is generated from rules/catena.yml" prometheusrule_fresh
check "promtool check config deploy/prometheus/prometheus.yml" \
  promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules deploy/prometheus/rules/catena.yml" \
  promtool check rules deploy/prometheus/rules/catena.yml
check "promtool test rules deploy/prometheus/rules/catena_test.yml" \
  promtool test rules deploy/prometheus/rules/catena_test.yml
check "amtool check-config deploy/alertmanager/alertmanager.yml" \
  amtool check-config deploy/alertmanager/alertmanager.yml
check "dashboard JSON parses (python3 -m json.tool)" \
  python3 -m json.tool deploy/grafana/dashboards/catena-ingest.json /dev/null
check "dashboard PromQL parses; only contract catena_* metrics in dashboard and rules" \
  metrics_contract
check "RUNBOOK.md has a section per alert matching its runbook_url annotation" runbook_sections
check "rule alertnames differ from the worker's own notifications (src/alerts)" alertnames_distinct

if [ "$FAILED" -gt 0 ]; then
  printf '%d check(s) failed\n' "$FAILED"
  exit 1
fi
printf 'all deploy checks passed\n'
