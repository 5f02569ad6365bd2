"""The Kubernetes manifests (k8s/): every overlay renders with kustomize, validates against a
pinned Kubernetes version's schemas, and agrees with the code: ports, health service names,
CLI flags, the headless Service and the gRPC target, NetworkPolicy/PDB/HPA selectors,
Prometheus annotations, drain vs. grace period, security context. The add-on components
(KEDA's ScaledObject, the inference gateway's InferencePool and Endpoint Picker, cert-manager's
Issuers and Certificates) are checked against their own schemas and against the tiers they
scale, route to or secure; the documented overlay + component combinations (COMBOS) are
rendered and checked like the overlays: mutual TLS flags against the mounted Secrets, probes
on the plaintext health port where the tier's port serves TLS, tracing's resource attributes.

Needs `kubectl` (client with kustomize) on PATH and the project installed in the running
interpreter's environment (the generated kimivl.v1 stubs and the `kimivl` CLI). No cluster.
"""
from __future__ import annotations

import atexit
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("cpu-dev", "gpu", "gpu-keda", "gpu-gateway")
# The overlay + component combinations docs/kubernetes.md documents: rendered from a kustomization
# made for the test (namespace kimivl, like the overlays), checked like the overlays.
COMBOS = {
    "cpu-dev+mtls": ("cpu-dev", ("mtls",)),
    "cpu-dev+mtls+mtls-cert-manager": ("cpu-dev", ("mtls", "mtls-cert-manager")),
    "cpu-dev+tracing": ("cpu-dev", ("tracing",)),
    "gpu+mtls-cert-manager": ("gpu", ("mtls-cert-manager",)),
    "gpu+tracing": ("gpu", ("tracing",)),
    "gpu+mtls-cert-manager+tracing": ("gpu", ("mtls-cert-manager", "tracing")),
    "gpu-keda+mtls-cert-manager+tracing": ("gpu-keda", ("mtls-cert-manager", "tracing")),
    "gpu-gateway+tracing": ("gpu-gateway", ("tracing",)),
}
DEPLOYABLE = (*OVERLAYS, *COMBOS)
# Which of them have mutual TLS between the tiers (gpu and what is built on it: on by default).
MTLS = tuple(o for o in DEPLOYABLE if o.startswith("gpu") or "mtls" in o.split("+"))
TRACED = tuple(o for o in DEPLOYABLE if "tracing" in o.split("+"))
# Schemas of this Kubernetes version (kubernetes-validate ships them; works offline). The
# oldest minor release the manifests support: HPA autoscaling/v2, PDB
# unhealthyPodEvictionPolicy and native gRPC probes are all GA by 1.30.
KUBERNETES_VERSION = "1.30.0"

PREPROCESS = "kimivl-preprocess"
INFERENCE = "kimivl-inference"
TIERS = {PREPROCESS: "preprocess", INFERENCE: "inference"}  # Deployment -> CLI subcommand
CONTAINER = {PREPROCESS: "preprocess", INFERENCE: "inference"}  # Deployment -> container


# --------------------------------------------------------------------------- helpers
def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not on PATH: install a kubectl client (1.27+, it bundles "
                    "kustomize) to render k8s/ overlays", pytrace=False)
    return path


@functools.cache
def _combos_dir() -> Path:
    where = tempfile.mkdtemp(prefix="kimivl-k8s-combos-")
    atexit.register(shutil.rmtree, where, True)
    return Path(where)


def _source(directory: str) -> Path:
    """k8s/<directory>, or for overlays/<combo> a kustomization of that combination."""
    name = directory.removeprefix("overlays/")
    if name not in COMBOS:
        return K8S / directory
    overlay, components = COMBOS[name]
    where = _combos_dir() / name
    where.mkdir(exist_ok=True)
    rel = lambda p: os.path.relpath(p, where)  # noqa: E731 - kustomize takes no absolute paths
    (where / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "kimivl",
        "resources": [rel(K8S / "overlays" / overlay)],
        "components": [rel(K8S / "components" / c) for c in components]}))
    return where


@functools.cache
def _render(directory: str) -> str:
    proc = subprocess.run([_kubectl(), "kustomize", str(_source(directory))],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"`kubectl kustomize k8s/{directory}` failed (rc {proc.returncode}):\n"
                    f"{proc.stderr}", pytrace=False)
    return proc.stdout


def _docs(directory: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render(directory)) if d]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _all(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _container(deploy: dict) -> dict:
    name = CONTAINER[deploy["metadata"]["name"]]
    found = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{deploy['metadata']['name']}: no container named {name!r}"
    return found[0]


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _cpu_cores(quantity: str | int | float) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _env(docs: list[dict], container: dict, fields: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env, each $(VAR)
    expanded from the entries before it. ``fields``: the downward API's values by fieldPath
    (unknown ones become ``<fieldRef:PATH>``)."""
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in _all(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        assert ref, f"{container['name']}: only configMapRef envFrom is understood here"
        assert ref["name"] in configmaps, f"envFrom ConfigMap {ref['name']} is not rendered"
        prefix = source.get("prefix", "")
        env.update({prefix + k: str(v) for k, v in configmaps[ref["name"]].items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var:
            env[name] = _expand(str(var["value"]), env)
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            assert ref["name"] in configmaps, f"{name}: ConfigMap {ref['name']} is not rendered"
            env[name] = str(configmaps[ref["name"]][ref["key"]])
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref.get("containerName", container["name"]) == container["name"]
            kind, resource = ref["resource"].split(".", 1)
            value = (container.get("resources") or {}).get(kind, {}).get(resource)
            assert value is not None, f"{name}: {ref['resource']} is not set on the container"
            assert resource == "cpu", f"{name}: only cpu resourceFieldRefs are understood here"
            divisor = _cpu_cores(ref.get("divisor", "1"))
            env[name] = str(math.ceil(_cpu_cores(value) / divisor))
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            env[name] = (fields or {}).get(path, f"<fieldRef:{path}>")
        else:
            env[name] = f"<{next(iter(source))}>"
    return env


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion in command/args/env: $$ escapes, unknown stays literal."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


def _args(docs: list[dict], deploy: dict) -> tuple[list[str], dict[str, str | None]]:
    """(positional words, {--flag: value or None}) of the main container, $(VAR)s expanded."""
    container = _container(deploy)
    env = _env(docs, container)
    words = [_expand(str(a), env) for a in (container.get("command") or []) + container["args"]]
    unresolved = [w for w in words if _VAR.search(w)]
    assert not unresolved, f"{deploy['metadata']['name']}: unresolved $(VAR)s in args: {unresolved}"
    positional: list[str] = []
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            if "=" in word:
                name, value = word.split("=", 1)
                flags[name] = value
            elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                flags[word] = words[i + 1]
                i += 1
            else:
                flags[word] = None
        else:
            positional.append(word)
        i += 1
    return positional, flags


def _port(container: dict, name: str) -> int:
    found = [p["containerPort"] for p in container.get("ports") or [] if p.get("name") == name]
    assert len(found) == 1, f"{container['name']}: expected one containerPort named {name!r}"
    return found[0]


def _kimivl() -> str:
    exe = Path(sys.executable).with_name("kimivl")
    path = str(exe) if exe.exists() else shutil.which("kimivl")
    if path is None:
        pytest.fail("the `kimivl` CLI is not installed (pip install -e '.[preprocess]')",
                    pytrace=False)
    return path


@functools.cache
def _cli_flags(*command: str) -> frozenset[str]:
    proc = subprocess.run([_kimivl(), *command, "--help"], capture_output=True, text=True,
                          timeout=60)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`kimivl {' '.join(command)} --help` failed:\n{text}"
    flags = frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text)) - {"--help"}
    assert flags, f"`kimivl {' '.join(command)} --help` lists no flags:\n{text!r}"
    return flags


@functools.cache
def _health_services() -> dict[str, frozenset[str]]:
    """The grpc.health.v1 service names each tier registers ("" is the overall status)."""
    from kimivl.v1 import chat_pb2, inference_pb2, preprocess_pb2

    def full(module, service: str) -> str:
        return module.DESCRIPTOR.services_by_name[service].full_name

    return {
        PREPROCESS: frozenset({"", full(chat_pb2, "ChatService"),
                               full(preprocess_pb2, "PreprocessService")}),
        INFERENCE: frozenset({"", full(inference_pb2, "InferenceService")}),
    }


def _deployments(overlay: str) -> tuple[list[dict], dict[str, dict]]:
    docs = _docs(f"overlays/{overlay}")
    return docs, {name: _one(docs, "Deployment", name) for name in TIERS}


def _pod_labels(deploy: dict) -> dict:
    return deploy["spec"]["template"]["metadata"]["labels"]


def _mounts(deploy: dict, container: dict) -> list[tuple[str, dict, bool]]:
    """(mountPath, volume, readOnly) for each of the container's volumeMounts."""
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"].get("volumes") or []}
    out = []
    for m in container.get("volumeMounts") or []:
        assert m["name"] in volumes, f"{container['name']}: no volume {m['name']!r}"
        out.append((m["mountPath"], volumes[m["name"]], bool(m.get("readOnly"))))
    return out


def _under(path: str, mount_path: str) -> bool:
    return path == mount_path or path.startswith(mount_path.rstrip("/") + "/")


def _mount_for(deploy: dict, container: dict, path: str) -> tuple[str, dict, bool] | None:
    """The most specific mount that contains `path`."""
    hits = [m for m in _mounts(deploy, container) if _under(path, m[0])]
    return max(hits, key=lambda m: len(m[0])) if hits else None


# --------------------------------------------------------------------------- add-on schemas
def _validate_scaled_object(doc: dict) -> list[str]:
    """KEDA's ScaledObject against the models that cloudcoil-models-keda generates from KEDA's
    released CRD YAML (keda-2.16.1-crds.yaml; no registry package ships the CRD file itself).
    The models ignore unknown fields, so a field that does not survive the round trip is one
    the CRD does not have."""
    try:
        from cloudcoil.models.keda.v1alpha1 import ScaledObject
    except ImportError:
        pytest.fail("cloudcoil-models-keda is not installed: pip install 'cloudcoil-models-keda==2.16.1.0' "
                    "(KEDA's CRD schema for the ScaledObject)", pytrace=False)
    from pydantic import ValidationError

    try:
        back = ScaledObject.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    except ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return [f"{path}: not in KEDA's ScaledObject schema (or not of its type)" for path in _diff(doc, back)]


def _validate_cert_manager(doc: dict) -> list[str]:
    """cert-manager's Issuer and Certificate against the models that cloudcoil-models-cert-manager
    generates from cert-manager 1.17.1's CRDs (the newest release of it for Python below 3.14),
    with the same round trip as the ScaledObject's: a field the CRD lacks does not survive it."""
    try:
        from cloudcoil.models.cert_manager import v1
    except ImportError:
        pytest.fail("cloudcoil-models-cert-manager is not installed: pip install "
                    "'cloudcoil-models-cert-manager==1.17.1.0' (cert-manager's CRD schemas)", pytrace=False)
    from pydantic import ValidationError

    model = {"Issuer": v1.Issuer, "Certificate": v1.Certificate}[doc["kind"]]
    try:
        back = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    except ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return [f"{path}: not in cert-manager's {doc['kind']} schema (or not of its type)" for path in _diff(doc, back)]


def _diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in a.keys() | b.keys() for p in _diff(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


# No registry package (PyPI, npm, Debian) carries the Gateway API Inference Extension's CRDs, so
# this is the InferencePool v1 schema written out from its Go API types
# (sigs.k8s.io/gateway-api-inference-extension api/v1/inferencepool_types.go, shared_types.go,
# v1.5.0): fields, required, enums, ranges, unknown fields rejected. The CEL rules (unique port
# numbers; port required for a Service) are checked in test_inference_pool.
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_PORT = {"type": "object", "additionalProperties": False, "required": ["number"],
         "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}}
INFERENCE_POOL_V1_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "targetPorts"],
            "properties": {
                "selector": {
                    "type": "object", "additionalProperties": False, "required": ["matchLabels"],
                    "properties": {"matchLabels": {
                        "type": "object", "minProperties": 1,
                        "additionalProperties": {"type": "string", "maxLength": 63,
                                                 "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}}}},
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": _PORT},
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "endpointPickerRef": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"group": {"type": "string", "maxLength": 253},
                                   "kind": {"type": "string", "minLength": 1, "maxLength": 63},
                                   "name": _NAME, "port": _PORT,
                                   "failureMode": {"enum": ["FailOpen", "FailClose"]}}},
            },
        },
        "status": {"type": "object"},
    },
}


def _validate_inference_pool(doc: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(INFERENCE_POOL_V1_SCHEMA)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


CUSTOM_RESOURCES = {
    ("keda.sh/v1alpha1", "ScaledObject"): _validate_scaled_object,
    ("inference.networking.k8s.io/v1", "InferencePool"): _validate_inference_pool,
    ("cert-manager.io/v1", "Issuer"): _validate_cert_manager,
    ("cert-manager.io/v1", "Certificate"): _validate_cert_manager,
}


# --------------------------------------------------------------------------- render + schema
@pytest.mark.parametrize("directory", ["base", *(f"overlays/{o}" for o in DEPLOYABLE)])
def test_kustomize_builds(directory):
    docs = _docs(directory)
    assert _all(docs, "Deployment"), f"k8s/{directory} renders no Deployment"


@pytest.mark.parametrize("directory", ["base", *(f"overlays/{o}" for o in DEPLOYABLE)])
def test_validates_against_kubernetes_schemas(directory):
    import kubernetes_validate

    errors = []
    for doc in _docs(directory):
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        custom = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
        if custom is not None:  # an add-on's CRD: not in Kubernetes' own schemas
            errors += [f"{what}: {e}" for e in custom(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{what}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{what}: {e.message}")
    assert not errors, (f"k8s/{directory} does not validate against Kubernetes "
                        f"{KUBERNETES_VERSION} (strict):\n" + "\n".join(errors))


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_namespace(overlay):
    docs = _docs(f"overlays/{overlay}")
    namespaces = {d["metadata"]["name"] for d in _all(docs, "Namespace")}
    used = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(used) == 1 and None not in used, f"objects are spread over namespaces {used}"
    assert used <= namespaces, f"namespace {used} is not created by the overlay"


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_ports_match_cli_args(overlay):
    docs, deploys = _deployments(overlay)
    for name, deploy in deploys.items():
        positional, flags = _args(docs, deploy)
        assert positional[:2] == ["serve", TIERS[name]], f"{name}: args start {positional[:2]}"
        container = _container(deploy)
        for flag, port_name in (("--port", "grpc"), ("--metrics-port", "metrics")):
            assert flag in flags, f"{name}: {flag} is not passed"
            assert int(flags[flag]) == _port(container, port_name), (
                f"{name}: {flag} {flags[flag]} != containerPort {port_name} "
                f"{_port(container, port_name)}")
        # Services forward to the named ports, so they follow the args too.
        service = _one(docs, "Service", name)
        assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(deploy))
        for sp in service["spec"]["ports"]:
            target = sp.get("targetPort", sp["port"])
            if isinstance(target, str):
                target = _port(container, target)
            assert target in {p["containerPort"] for p in container["ports"]}, (
                f"Service {name} port {sp['name']} targets {target}, not a containerPort")


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_probes_use_registered_health_services(overlay):
    docs, deploys = _deployments(overlay)
    registered = _health_services()
    for name, deploy in deploys.items():
        container = _container(deploy)
        _, flags = _args(docs, deploy)
        # The kubelet's gRPC probe is plaintext with no client certificate: against a TLS port it
        # fails, so a tier serving TLS is probed on its plaintext --health-port.
        probed = int(flags["--health-port"]) if "--tls-cert-file" in flags else int(flags["--port"])
        if "--health-port" in flags:
            assert int(flags["--health-port"]) == _port(container, "health") != int(flags["--port"])
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            assert probe and "grpc" in probe, f"{name}: no native gRPC {kind}"
            grpc = probe["grpc"]
            assert grpc["port"] == probed, (
                f"{name}: {kind} probes {grpc['port']}, not {probed} "
                f"({'the plaintext --health-port: --port serves TLS' if '--tls-cert-file' in flags else '--port'})")
            service = grpc.get("service", "")
            assert service in registered[name], (
                f"{name}: {kind} asks health for {service!r}; the server registers "
                f"{sorted(registered[name])}")
    # Model loading: the inference startupProbe must allow many minutes.
    startup = _container(deploys[INFERENCE])["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 600, f"inference startupProbe allows only {budget} s for model loading"


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_cli_flags_exist(overlay):
    """Every --flag the containers pass is one `kimivl serve <tier> --help` lists."""
    docs, deploys = _deployments(overlay)
    for name, deploy in deploys.items():
        _, flags = _args(docs, deploy)
        known = _cli_flags("serve", TIERS[name])
        unknown = sorted(set(flags) - known)
        assert not unknown, (f"{name} passes flags that `kimivl serve {TIERS[name]} --help` "
                             f"does not list: {unknown}")
        for init in deploy["spec"]["template"]["spec"].get("initContainers") or []:
            script = " ".join(init.get("command", []) + init.get("args", []))
            m = re.search(r"kimivl make-tiny-model((?:\s+--?[\w-]+(?:\s+\w+)?)*)", script)
            if "make-tiny-model" in script:
                assert m, f"{name}/{init['name']}: cannot parse {script!r}"
                used = set(re.findall(r"--[a-z0-9-]+", m.group(1)))
                unknown = sorted(used - _cli_flags("make-tiny-model"))
                assert not unknown, f"make-tiny-model has no {unknown}"


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_inference_target_is_headless_service(overlay):
    docs, deploys = _deployments(overlay)
    service = _one(docs, "Service", INFERENCE)
    assert service["spec"].get("clusterIP") == "None", (
        "the inference Service must be headless (clusterIP: None) so round_robin over DNS "
        "sees every pod")
    _, inf_flags = _args(docs, deploys[INFERENCE])
    _, pre_flags = _args(docs, deploys[PREPROCESS])
    target = pre_flags.get("--inference-target")
    assert target and target.startswith("dns:///"), f"--inference-target {target!r} is not dns:///"
    hostport = urlsplit(target).path.lstrip("/")
    host, _, port = hostport.rpartition(":")
    ns = service["metadata"]["namespace"]
    svc = service["metadata"]["name"]
    assert host in {f"{svc}.{ns}.svc.cluster.local", f"{svc}.{ns}.svc"}, (
        f"--inference-target host {host!r} is not the inference Service {svc} in {ns}")
    # Clients dial pod IPs: the port must be the container's, and the Service's must match.
    assert int(port) == int(inf_flags["--port"]), (
        f"--inference-target port {port} != inference --port {inf_flags['--port']}")
    grpc_ports = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_ports == [int(port)], f"headless Service grpc port {grpc_ports} != {port}"
    # The same model directory (tokenizer) on both tiers.
    assert pre_flags["--model"] == inf_flags["--model"]


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_tier_limits_agree(overlay):
    """The front door must not accept what the engine will refuse (server defaults where unset)."""
    docs, deploys = _deployments(overlay)
    _, pre = _args(docs, deploys[PREPROCESS])
    _, inf = _args(docs, deploys[INFERENCE])
    assert int(pre.get("--max-images") or 256) <= int(inf.get("--limit-mm-per-prompt") or 256), (
        "preprocess --max-images exceeds inference --limit-mm-per-prompt")
    if "--max-model-len" in inf:
        assert pre.get("--max-model-len") == inf["--max-model-len"], (
            "inference sets --max-model-len; the preprocessing tier must check prompts against it")
    assert pre.get("--max-message-mb") == inf.get("--max-message-mb")


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_network_policy(overlay):
    docs, deploys = _deployments(overlay)
    inf_labels, pre_labels = _pod_labels(deploys[INFERENCE]), _pod_labels(deploys[PREPROCESS])
    inf_c, pre_c = _container(deploys[INFERENCE]), _container(deploys[PREPROCESS])

    def allows(rule: dict, container: dict, port_name: str) -> bool:
        ports = rule.get("ports")
        if not ports:
            return True
        number = _port(container, port_name)
        return any(p.get("port") in (number, port_name) or
                   (isinstance(p.get("port"), int) and p["port"] <= number <= p.get("endPort", -1))
                   for p in ports)

    policies = [p for p in _all(docs, "NetworkPolicy")
                if _selects(p["spec"]["podSelector"], inf_labels)]
    assert policies, "no NetworkPolicy selects the inference pods"
    for p in policies:
        assert "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    rules = [r for p in policies for r in p["spec"].get("ingress") or []]

    grpc_rules = [r for r in rules if allows(r, inf_c, "grpc")]
    assert grpc_rules, "no ingress rule lets the preprocessing pods reach the inference gRPC port"
    for rule in grpc_rules:
        peers = rule.get("from")
        assert peers, "an ingress rule opens the inference gRPC port to every source"
        for peer in peers:
            assert set(peer) == {"podSelector"}, (
                f"inference gRPC port reachable from a non-pod or other-namespace peer: {peer}")
            assert _selects(peer["podSelector"], pre_labels), (
                f"from-podSelector {peer['podSelector']} does not match the preprocessing pods")
            assert not _selects(peer["podSelector"], inf_labels), (
                f"from-podSelector {peer['podSelector']} also matches the inference pods")

    for rule in (r for r in rules if allows(r, inf_c, "metrics")):
        assert rule.get("from"), "the inference metrics port is open to every source"
    assert any(allows(r, inf_c, "metrics") for r in rules), "Prometheus cannot scrape inference"

    # The front door must stay reachable if a policy selects the preprocessing pods.
    pre_policies = [p for p in _all(docs, "NetworkPolicy")
                    if _selects(p["spec"]["podSelector"], pre_labels)]
    if pre_policies:
        pre_rules = [r for p in pre_policies for r in p["spec"].get("ingress") or []]
        assert any(allows(r, pre_c, "grpc") for r in pre_rules), "preprocess gRPC port blocked"
        assert any(allows(r, pre_c, "metrics") for r in pre_rules), "Prometheus cannot scrape"


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_prometheus_annotations(overlay):
    docs, deploys = _deployments(overlay)
    for name, deploy in deploys.items():
        annotations = deploy["spec"]["template"]["metadata"].get("annotations") or {}
        _, flags = _args(docs, deploy)
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/path") == "/metrics", name
        assert annotations.get("prometheus.io/port") == flags["--metrics-port"], (
            f"{name}: prometheus.io/port {annotations.get('prometheus.io/port')} != "
            f"--metrics-port {flags['--metrics-port']}")


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_hpa_targets_preprocess(overlay):
    docs, deploys = _deployments(overlay)
    hpas = _all(docs, "HorizontalPodAutoscaler")
    assert len(hpas) == 1, f"expected one HPA, found {len(hpas)}"
    hpa = hpas[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": PREPROCESS}
    assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"]
           if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    # Utilisation is relative to the request, which must therefore be set.
    assert _container(deploys[PREPROCESS])["resources"]["requests"]["cpu"]
    # The HPA owns the replica count; a fixed one would reset it on every apply.
    assert "replicas" not in deploys[PREPROCESS]["spec"]


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_pdb_selectors(overlay):
    docs, deploys = _deployments(overlay)
    covered = set()
    for pdb in _all(docs, "PodDisruptionBudget"):
        hits = [n for n, d in deploys.items() if _selects(pdb["spec"]["selector"], _pod_labels(d))]
        assert len(hits) == 1, f"PDB {pdb['metadata']['name']} selects {hits}"
        assert pdb["spec"]["selector"] == deploys[hits[0]]["spec"]["selector"]
        covered.update(hits)
    assert covered == set(deploys), f"Deployments without a PDB: {set(deploys) - covered}"
    for name, deploy in deploys.items():
        assert _selects(deploy["spec"]["selector"], _pod_labels(deploy))
        labels = _pod_labels(deploy)
        assert labels.get("app.kubernetes.io/component") == TIERS[name]
        assert labels.get("app.kubernetes.io/part-of") == "kimivl"
        assert "app.kubernetes.io/name" in labels


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_drain_fits_grace_period(overlay):
    docs, deploys = _deployments(overlay)
    for name, deploy in deploys.items():
        container = _container(deploy)
        _, flags = _args(docs, deploy)
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        m = re.search(r"\bsleep\s+(\d+)", " ".join(pre_stop))
        assert m, f"{name}: preStop {pre_stop} is not a sleep"
        grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        drain = float(flags["--drain-timeout-s"])
        assert grace > drain + int(m.group(1)), (
            f"{name}: terminationGracePeriodSeconds {grace} <= drain {drain} + preStop {m.group(1)}")


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_security_context(overlay):
    _, deploys = _deployments(overlay)
    for name, deploy in deploys.items():
        pod = deploy["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, name
        assert (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for c in pod["containers"] + (pod.get("initContainers") or []):
            sc = c.get("securityContext") or {}
            what = f"{name}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("readOnlyRootFilesystem") is True, what
            assert (sc.get("capabilities") or {}).get("drop") == ["ALL"], what
            assert sc.get("runAsUser", 10001) == 10001, what
            assert sc.get("runAsNonRoot", True) is True, what
            assert (sc.get("seccompProfile") or {"type": "RuntimeDefault"})["type"] == "RuntimeDefault"


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_writable_dirs_and_model(overlay):
    """Read-only root FS: caches on an emptyDir; the model dir on the model volume."""
    docs, deploys = _deployments(overlay)
    cache_vars = {PREPROCESS: ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TMPDIR"),
                  INFERENCE: ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TMPDIR", "VLLM_CACHE_ROOT",
                              "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    for name, deploy in deploys.items():
        container = _container(deploy)
        env = _env(docs, container)
        for var in cache_vars[name]:
            assert var in env, f"{name}: {var} is not set"
            mount = _mount_for(deploy, container, env[var])
            assert mount and "emptyDir" in mount[1] and not mount[2], (
                f"{name}: {var}={env[var]} is not on a writable emptyDir")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            assert env.get(var) == "1", f"{name}: {var} != 1"
        _, flags = _args(docs, deploy)
        model = _mount_for(deploy, container, flags["--model"])
        assert model, f"{name}: --model {flags['--model']} is on no volume"
        assert model[2], f"{name}: the model volume should be mounted readOnly"
    inference = _container(deploys[INFERENCE])
    assert _env(docs, inference).get("VLLM_NO_USAGE_STATS") == "1"
    shm = _mount_for(deploys[INFERENCE], inference, "/dev/shm")
    assert shm and shm[0] == "/dev/shm" and shm[1].get("emptyDir", {}).get("medium") == "Memory", (
        "inference needs /dev/shm as an emptyDir with medium: Memory")


def test_cpu_dev_overlay():
    docs, deploys = _deployments("cpu-dev")
    assert "nvidia.com/gpu" not in _render("overlays/cpu-dev"), "cpu-dev still mentions GPUs"
    _, flags = _args(docs, deploys[INFERENCE])
    assert flags.get("--device") == "cpu" and "--enforce-eager" in flags
    assert flags["--enforce-eager"] is None, "--enforce-eager is a switch"
    assert float(_env(docs, _container(deploys[INFERENCE]))["VLLM_CPU_KVCACHE_SPACE"]) > 0
    assert deploys[INFERENCE]["spec"].get("replicas", 1) == 1
    hpa = _one(docs, "HorizontalPodAutoscaler", PREPROCESS)
    assert hpa["spec"]["minReplicas"] == 1
    for name, deploy in deploys.items():
        pod = deploy["spec"]["template"]["spec"]
        assert not pod.get("nodeSelector") and not pod.get("tolerations"), name
        # The tiny model: made by an initContainer into the emptyDir the server reads.
        _, flags = _args(docs, deploy)
        _, volume, _ = _mount_for(deploy, _container(deploy), flags["--model"])
        assert "emptyDir" in volume, f"{name}: cpu-dev model volume is not an emptyDir"
        makers = [c for c in pod.get("initContainers") or []
                  if "make-tiny-model" in " ".join(c.get("command", []) + c.get("args", []))]
        assert len(makers) == 1, f"{name}: no make-tiny-model initContainer"
        init = makers[0]
        init_env = _env(docs, init)
        script = _expand(" ".join(init.get("command", []) + init.get("args", [])), init_env)
        script = script.replace('"$MODEL_DIR"', init_env.get("MODEL_DIR", "$MODEL_DIR"))
        assert flags["--model"] in script, f"{name}: initContainer makes another directory"
        mount = _mount_for(deploy, init, flags["--model"])
        assert mount and mount[1]["name"] == volume["name"] and not mount[2], (
            f"{name}: the initContainer does not write the model volume")


def test_gpu_overlay():
    docs, deploys = _deployments("gpu")
    inference = _container(deploys[INFERENCE])
    assert str(inference["resources"]["limits"].get("nvidia.com/gpu")) == "1"
    assert "nvidia.com/gpu" not in str(_container(deploys[PREPROCESS])["resources"])
    _, flags = _args(docs, deploys[INFERENCE])
    assert flags.get("--preset") == "auto"
    assert "--enforce-eager" not in flags
    pod = deploys[INFERENCE]["spec"]["template"]["spec"]
    assert pod.get("nodeSelector"), "GPU pods need a nodeSelector"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or [])
    for name, deploy in deploys.items():
        _, flags = _args(docs, deploy)
        assert flags["--model"] == "/models/Kimi-VL-A3B-Thinking-2506"
        mount_path, volume, read_only = _mount_for(deploy, _container(deploy), flags["--model"])
        assert mount_path == flags["--model"] and read_only
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        assert claim, f"{name}: the model is not on a PersistentVolumeClaim"
        pvc = _one(docs, "PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
        image = _container(deploy)["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


# --------------------------------------------------------------------------- autoscaling, routing
# The engine's own gauges that KEDA (k8s/components/keda) and an inference gateway's endpoint
# picker (k8s/components/inference-pool) read from the inference pods' --metrics-port.
VLLM_SIGNALS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                "vllm:lora_requests_info", "vllm:cache_config_info")


def test_vllm_registers_the_signals():
    """The names are the installed vLLM's (read from its stat logger, no engine started);
    `make image-inference` scrapes them from a running engine."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vLLM is not installed here (make install-engine)")
    loggers = Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"
    assert loggers.is_file(), f"vLLM's Prometheus stat logger moved from {loggers}: find the metric names anew"
    names = set(re.findall(r'name\s*=\s*"(vllm:[a-z_]+)"', loggers.read_text()))
    missing = sorted(set(VLLM_SIGNALS) - names)
    assert not missing, f"vLLM {spec.origin} no longer registers {missing}"


def test_keda_scales_inference_on_vllm_queue():
    docs, deploys = _deployments("gpu-keda")
    inference = deploys[INFERENCE]
    scaled = _all(docs, "ScaledObject")
    assert len(scaled) == 1, f"expected one ScaledObject, found {len(scaled)}"
    so = scaled[0]
    spec = so["spec"]
    assert so["metadata"]["namespace"] == inference["metadata"]["namespace"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": INFERENCE}
    # KEDA's HPA owns the replica count: no fixed one, no second HPA on the same Deployment.
    assert "replicas" not in inference["spec"], "KEDA scales kimivl-inference: drop its fixed replicas"
    assert not [h for h in _all(docs, "HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"]["name"] == INFERENCE], "an HPA already scales the inference tier"
    # Never to zero: a pod needs minutes to load the model.
    low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
    assert 1 <= low <= high
    assert low <= spec["fallback"]["replicas"] <= high
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    # KEDA accepts a fallback only for AverageValue triggers; AverageValue divides the query's
    # value by the replica count, so the query must be the sum over pods.
    assert trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    query = meta["query"]
    m = re.fullmatch(r'\s*sum\s*\(\s*(vllm:[a-z_]+)\{([^}]*)\}\s*\)\s*', query)
    assert m, f"query {query!r} is not sum(vllm:...{{...}})"
    assert m.group(1) == "vllm:num_requests_waiting", query
    matchers = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2)))
    assert matchers.get("namespace") == inference["metadata"]["namespace"], (
        f"query selects namespace {matchers.get('namespace')!r}, the inference tier is in "
        f"{inference['metadata']['namespace']!r}")
    assert float(meta["threshold"]) > 0
    assert urlsplit(meta["serverAddress"]).scheme in ("http", "https")
    # Scale-in drains streams; it must not undo a scale-out before a new pod could even start.
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    startup = _container(inference)["startupProbe"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    for overlay in ("cpu-dev", "gpu"):
        assert not _all(_docs(f"overlays/{overlay}"), "ScaledObject"), f"{overlay}: KEDA is an add-on"


def test_inference_pool():
    docs, deploys = _deployments("gpu-gateway")
    inference = deploys[INFERENCE]
    _, inf_flags = _args(docs, inference)
    (pool,) = _all(docs, "InferencePool")
    spec = pool["spec"]
    assert pool["metadata"]["namespace"] == inference["metadata"]["namespace"]
    # The pool is exactly the inference pods, addressed on their gRPC port.
    selector = {"matchLabels": spec["selector"]["matchLabels"]}
    assert spec["selector"]["matchLabels"] == inference["spec"]["selector"]["matchLabels"]
    others = [d for d in _all(docs, "Deployment") if d is not inference]
    assert all(not _selects(selector, _pod_labels(d)) for d in others), "the pool selects non-inference pods"
    numbers = [p["number"] for p in spec["targetPorts"]]
    assert numbers == [int(inf_flags["--port"])], f"targetPorts {numbers} != inference --port"
    assert len(set(numbers)) == len(numbers)
    assert spec["appProtocol"] == "kubernetes.io/h2c", "kimivl.v1.InferenceService is gRPC (HTTP/2)"

    # The endpoint picker: its Service's port reaches the EPP's ext-proc port.
    ref = spec["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref.get("port"), "a Service ref needs a port"
    service = _one(docs, "Service", ref["name"])
    (sp,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    epps = [d for d in _all(docs, "Deployment")
            if _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(d))]
    assert len(epps) == 1, f"Service {ref['name']} selects {len(epps)} Deployments"
    epp = epps[0]
    (container,) = epp["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = sp.get("targetPort", sp["port"])
    assert (ports[target] if isinstance(target, str) else target) == ports["grpc"]
    args = container["args"]
    flags = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--") and not args[i + 1].startswith("--")}
    assert flags["--pool-name"] == pool["metadata"]["name"]
    assert flags.get("--pool-group", "inference.networking.k8s.io") == "inference.networking.k8s.io"
    assert int(flags["--grpc-port"]) == ports["grpc"]
    for kind in ("livenessProbe", "readinessProbe"):
        assert container[kind]["grpc"]["port"] == int(flags["--grpc-health-port"]) == ports["grpc-health"]
    # vLLM's gauges are on the metrics port, not the pool's target port (the EPP's default).
    assert int(flags["--model-server-metrics-port"]) == int(inf_flags["--metrics-port"])
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert "--pool-namespace" in flags or env.get("NAMESPACE") == "metadata.namespace"

    # Its config: mounted from the generated ConfigMap; every plugin it refers to is defined.
    config_path = flags["--config-file"]
    mount_path, volume, _ = _mount_for(epp, container, config_path)
    configmap = _one(docs, "ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(configmap["data"][config_path[len(mount_path):].lstrip("/")])
    assert config["kind"] == "EndpointPickerConfig"
    defined = {p.get("name", p["type"]): p for p in config["plugins"]}
    refs = [r["pluginRef"] for prof in config["schedulingProfiles"] for r in prof["plugins"]]
    refs.append(config["parser"]["pluginRef"])
    assert set(refs) <= set(defined), f"undefined plugins {set(refs) - set(defined)}"
    # Our requests are kimivl.v1 protobuf, which only the passthrough parser accepts.
    assert defined[config["parser"]["pluginRef"]]["type"] == "passthrough-parser"
    source = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    annotations = inference["spec"]["template"]["metadata"]["annotations"]
    assert source and source[0].get("parameters", {}).get("path", "/metrics") == annotations["prometheus.io/path"]

    # It may read those metrics (NetworkPolicies add up), and it may watch the pool and the pods.
    rules = [r for p in _all(docs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], _pod_labels(inference))
             for r in p["spec"].get("ingress") or []]
    metrics_port = _port(_container(inference), "metrics")
    assert any(any(_selects(peer.get("podSelector", {"matchLabels": {"-": "-"}}), _pod_labels(epp))
                   for peer in r.get("from") or [])
               and any(p.get("port") in ("metrics", metrics_port) for p in r.get("ports") or [])
               for r in rules), "no NetworkPolicy lets the EPP read the inference metrics port"
    account = epp["spec"]["template"]["spec"]["serviceAccountName"]
    bound = [b["roleRef"]["name"] for b in _all(docs, "RoleBinding")
             if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])]
    granted = {(g, r) for role in _all(docs, "Role") if role["metadata"]["name"] in bound
               for rule in role["rules"] if {"get", "list", "watch"} <= set(rule["verbs"])
               for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted, granted

    # The namespace enforces the restricted Pod Security Standard; the EPP pod meets it too.
    pod = epp["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert not _all(_docs("overlays/gpu"), "InferencePool"), "the inference gateway is an add-on"


# Which image each container runs (docs/kubernetes.md, "Which image runs where"): the
# preprocessing image has no torch, so everything that writes weights runs the inference one.
IMAGES = {
    "cpu-dev": {"kimivl-preprocess/preprocess": "kimivl-preprocess:dev",
                "kimivl-preprocess/make-tiny-model": "kimivl-inference:dev-cpu",
                "kimivl-inference/inference": "kimivl-inference:dev-cpu",
                "kimivl-inference/make-tiny-model": "kimivl-inference:dev-cpu"},
    "gpu": {"kimivl-preprocess/preprocess": "ghcr.io/kimivl/kimivl-preprocess:0.1.0",
            "kimivl-inference/inference": "ghcr.io/kimivl/kimivl-inference:0.1.0-cuda"},
}
IMAGES["gpu-keda"] = IMAGES["gpu"]
IMAGES["gpu-gateway"] = {**IMAGES["gpu"], "kimivl-inference-epp/epp":
                         "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"}


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_images_per_overlay(overlay):
    found = {}
    for deploy in _all(_docs(f"overlays/{overlay}"), "Deployment"):
        pod = deploy["spec"]["template"]["spec"]
        for c in pod["containers"] + (pod.get("initContainers") or []):
            found[f"{deploy['metadata']['name']}/{c['name']}"] = c["image"]
    assert found == IMAGES[COMBOS[overlay][0] if overlay in COMBOS else overlay]


# --------------------------------------------------------------------------- the OpenAI port and API keys
@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_http_port_is_served_exposed_and_reachable(overlay):
    """--http-port is the containerPort named http, the front door's Service forwards to it, and
    the NetworkPolicy leaves it open like the gRPC port (it is the front door too)."""
    docs, deploys = _deployments(overlay)
    deploy = deploys[PREPROCESS]
    container = _container(deploy)
    _, flags = _args(docs, deploy)
    assert "--http-port" in _cli_flags("serve", "preprocess")
    assert int(flags["--http-port"]) == _port(container, "http") > 0
    service = _one(docs, "Service", PREPROCESS)
    http = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert len(http) == 1 and http[0]["targetPort"] in ("http", _port(container, "http"))
    assert http[0].get("appProtocol") == "http"
    labels = _pod_labels(deploy)
    rules = [r for p in _all(docs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)
             for r in p["spec"].get("ingress") or []]
    open_rules = [r for r in rules if not r.get("from")]
    assert any(p.get("port") in (_port(container, "http"), "http") for r in open_rules for p in r.get("ports") or []), (
        "the NetworkPolicy does not open the http port")
    # The probes stay on gRPC health, which the http port's /ready mirrors.
    assert "--http-port" in flags and container["readinessProbe"]["grpc"]["port"] == int(flags["--port"])


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_api_keys_come_from_an_optional_secret(overlay):
    """The kimivl-api-keys Secret is mounted read-only (optional, so an overlay without keys needs
    none); --api-keys-file is empty (off) or a file inside that mount. gpu (production) requires
    keys, and so do the overlays built on it (gpu-keda, gpu-gateway); cpu-dev does not."""
    docs, deploys = _deployments(overlay)
    deploy = deploys[PREPROCESS]
    container = _container(deploy)
    _, flags = _args(docs, deploy)
    assert "--api-keys-file" in flags and "--api-keys-file" in _cli_flags("serve", "preprocess")
    secrets = [(path, vol, ro) for path, vol, ro in _mounts(deploy, container)
               if (vol.get("secret") or {}).get("secretName") == "kimivl-api-keys"]
    assert len(secrets) == 1, "the kimivl-api-keys Secret is not mounted"
    path, volume, read_only = secrets[0]
    assert read_only and volume["secret"].get("optional") is True
    keys_file = flags["--api-keys-file"] or ""
    if keys_file:
        assert _mount_for(deploy, container, keys_file)[0] == path, f"{keys_file} is not in the Secret's mount"
        assert keys_file.rsplit("/", 1)[1] == "keys", "the Secret's entry is named keys (--from-file=keys=...)"
    assert bool(keys_file) == overlay.startswith("gpu"), f"{overlay}: --api-keys-file {keys_file!r}"


# --------------------------------------------------------------------------- mutual TLS, tracing
# The Secrets of k8s/components/mtls (cert-manager's key names) and the flags that read them:
# tier -> (Secret, {flag: key}).
MTLS_FILES = {
    INFERENCE: ("kimivl-inference-tls", {"--tls-cert-file": "tls.crt", "--tls-key-file": "tls.key",
                                         "--tls-client-ca-file": "ca.crt"}),
    PREPROCESS: ("kimivl-preprocess-client-tls", {"--inference-tls-cert-file": "tls.crt",
                                                  "--inference-tls-key-file": "tls.key",
                                                  "--inference-tls-ca-file": "ca.crt"}),
}


def _secret_file(deploy: dict, path: str) -> tuple[str, str, dict]:
    """(Secret name, key, volumeMount) of the Secret entry the container reads at ``path``."""
    container = _container(deploy)
    mount_path, volume, read_only = _mount_for(deploy, container, path) or (None, {}, False)
    secret = volume.get("secret")
    assert secret, f"{deploy['metadata']['name']}: {path} is on no Secret volume"
    assert read_only, f"{deploy['metadata']['name']}: the Secret at {mount_path} is mounted writable"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    # subPath mounts are never refreshed by the kubelet: a renewed Secret would not reach the pod.
    assert "subPath" not in mount and "subPathExpr" not in mount, f"{path}: a subPath mount does not rotate"
    name = path[len(mount_path):].lstrip("/")
    items = {i["path"]: i["key"] for i in secret.get("items") or []}
    return secret["secretName"], items.get(name, name), secret


@pytest.mark.parametrize("overlay", MTLS)
def test_mtls_flags_read_the_mounted_secrets(overlay):
    """The inference tier requires client certificates of the CA; the front door presents its own
    and verifies the inference tier's; every file a flag names is in its tier's Secret, under
    cert-manager's key names, mounted read-only as a directory; the pods wait for the Secrets."""
    docs, deploys = _deployments(overlay)
    for name, (secret_name, files) in MTLS_FILES.items():
        _, flags = _args(docs, deploys[name])
        for flag, key in files.items():
            assert flags.get(flag), f"{name}: {flag} is not passed"
            assert flag in _cli_flags("serve", TIERS[name])
            found, found_key, secret = _secret_file(deploys[name], flags[flag])
            assert (found, found_key) == (secret_name, key), (
                f"{name}: {flag} {flags[flag]} reads {found}/{found_key}, not {secret_name}/{key}")
            assert not secret.get("optional"), f"{name}: {secret_name} is optional: the pod would start without TLS"
            assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{secret_name}: the key is world-readable"
    _, inference = _args(docs, deploys[INFERENCE])
    _, front = _args(docs, deploys[PREPROCESS])
    assert "--tls-cert-file" not in front, "the front door's own port stays plaintext here (probes on --port)"
    # The Service no longer claims cleartext HTTP/2 for a TLS port.
    (grpc_port,) = [p for p in _one(docs, "Service", INFERENCE)["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port.get("appProtocol") != "kubernetes.io/h2c"
    assert int(inference["--health-port"]) != int(inference["--port"])


@pytest.mark.parametrize("overlay", MTLS)
def test_health_port_is_closed_to_other_pods(overlay):
    """The plaintext health port is for the kubelet (from the node): no NetworkPolicy rule opens it."""
    docs, deploys = _deployments(overlay)
    _, flags = _args(docs, deploys[INFERENCE])
    health = int(flags["--health-port"])
    rules = [r for p in _all(docs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], _pod_labels(deploys[INFERENCE]))
             for r in p["spec"].get("ingress") or []]
    assert rules
    for rule in rules:
        ports = rule.get("ports")
        assert ports, "an ingress rule opens every port of the inference pods"
        assert not any(p.get("port") in (health, "health") or
                       (isinstance(p.get("port"), int) and p["port"] <= health <= p.get("endPort", -1))
                       for p in ports), f"a NetworkPolicy opens the plaintext health port {health}"


def test_mtls_is_on_in_production_and_off_in_cpu_dev():
    for overlay in ("gpu", "gpu-keda", "gpu-gateway"):
        docs, deploys = _deployments(overlay)
        assert _args(docs, deploys[INFERENCE])[1].get("--tls-client-ca-file"), f"{overlay}: mutual TLS is off"
        assert _args(docs, deploys[PREPROCESS])[1].get("--inference-tls-cert-file"), f"{overlay}: no client cert"
    docs, deploys = _deployments("cpu-dev")
    for name, deploy in deploys.items():
        _, flags = _args(docs, deploy)
        assert not set(flags) & {"--tls-cert-file", "--inference-tls-ca-file", "--health-port"}, name


CERT_MANAGED = tuple(o for o in DEPLOYABLE if "mtls-cert-manager" in o.split("+"))


@pytest.mark.parametrize("overlay", CERT_MANAGED)
def test_cert_manager_issues_the_mounted_secrets(overlay):
    """Each Secret the tiers mount is a Certificate's, issued by this deployment's CA (an Issuer
    in the namespace, chained to a self-signed one); the inference certificate names what the
    front door dials; server and client usages where each side needs them."""
    docs, deploys = _deployments(overlay)
    ns = deploys[INFERENCE]["metadata"]["namespace"]
    issuers = {d["metadata"]["name"]: d for d in _all(docs, "Issuer")}
    certs = {d["spec"]["secretName"]: d for d in _all(docs, "Certificate")}
    for d in [*issuers.values(), *certs.values()]:
        assert d["metadata"]["namespace"] == ns, f"{d['kind']}/{d['metadata']['name']} is not in {ns}"

    def issuer(cert: dict) -> dict:
        ref = cert["spec"]["issuerRef"]
        assert ref.get("kind", "Issuer") == "Issuer" and ref.get("group", "cert-manager.io") == "cert-manager.io"
        assert ref["name"] in issuers, f"{cert['metadata']['name']}: no Issuer {ref['name']}"
        return issuers[ref["name"]]

    leaves = {}
    for name, (secret_name, _) in MTLS_FILES.items():
        assert secret_name in certs, f"no Certificate makes the Secret {secret_name}"
        cert = leaves[name] = certs[secret_name]
        ca_issuer = issuer(cert)
        assert "ca" in ca_issuer["spec"], f"{secret_name} is not signed by a CA Issuer"
        ca_cert = certs[ca_issuer["spec"]["ca"]["secretName"]]
        assert ca_cert["spec"].get("isCA") is True
        assert "selfSigned" in issuer(ca_cert)["spec"]
        # The CA keeps its key across renewals, so what it signed before still verifies.
        assert ca_cert["spec"]["privateKey"]["rotationPolicy"] == "Never"
        assert not cert["spec"].get("isCA")
    # Both tiers trust the same CA (the ca.crt each Secret carries is the issuer's).
    assert issuer(leaves[INFERENCE]) is issuer(leaves[PREPROCESS])
    assert "server auth" in leaves[INFERENCE]["spec"]["usages"]
    assert "client auth" in leaves[PREPROCESS]["spec"]["usages"]
    # What the front door checks the inference tier's certificate against: the target's host.
    _, front = _args(docs, deploys[PREPROCESS])
    host = front.get("--inference-tls-server-name") or urlsplit(front["--inference-target"]).path.lstrip("/").rsplit(":", 1)[0]
    assert host in leaves[INFERENCE]["spec"]["dnsNames"], (
        f"the front door dials {host}; the inference certificate names {leaves[INFERENCE]['spec']['dnsNames']}")
    for cert in leaves.values():  # renewed well before expiry
        assert _hours(cert["spec"]["renewBefore"]) * 2 <= _hours(cert["spec"]["duration"])


def _hours(duration: str) -> float:
    m = re.fullmatch(r"(\d+)h", duration)
    assert m, f"duration {duration!r}: write it in hours"
    return float(m.group(1))


POD_FIELDS = {"metadata.name": "kimivl-inference-7d4b9c6f5-x2x8q", "metadata.namespace": "kimivl",
              "spec.nodeName": "gpu-node-3"}


def _resource_attributes(env: dict[str, str]) -> dict[str, str]:
    pairs = [kv.split("=", 1) for kv in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",") if kv]
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.mark.parametrize("overlay", TRACED)
def test_tracing_component_names_service_and_pod(overlay):
    docs, deploys = _deployments(overlay)
    for name, deploy in deploys.items():
        container = _container(deploy)
        _, flags = _args(docs, deploy)
        assert "--otlp-traces-endpoint" in _cli_flags("serve", TIERS[name])
        endpoint = urlsplit(flags.get("--otlp-traces-endpoint") or "")
        # http:// = plaintext OTLP/gRPC, the one vLLM's exporter speaks.
        assert endpoint.scheme == "http" and endpoint.hostname and endpoint.port, flags.get("--otlp-traces-endpoint")
        env = _env(docs, container, POD_FIELDS)
        assert env["OTEL_SERVICE_NAME"] == name
        attrs = _resource_attributes(env)
        unresolved = {k: v for k, v in attrs.items() if "$(" in v or "<" in v}
        assert not unresolved, f"{name}: OTEL_RESOURCE_ATTRIBUTES refers to variables not defined before it: {unresolved}"
        assert attrs["k8s.pod.name"] == POD_FIELDS["metadata.name"]
        assert attrs["k8s.namespace.name"] == POD_FIELDS["metadata.namespace"]
        assert attrs["k8s.deployment.name"] == name and attrs["k8s.container.name"] == container["name"]
    for overlay in OVERLAYS:
        docs, deploys = _deployments(overlay)
        for deploy in deploys.values():
            assert "--otlp-traces-endpoint" not in _args(docs, deploy)[1], f"{overlay}: tracing is an add-on"
