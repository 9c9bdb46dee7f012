"""The deployment examples (deploy/) stay consistent with the gateway they deploy.

No cluster here: the manifests are parsed, the ConfigMap's configuration
is validated by the gateway's own loader, and every path, port and health
service name they mention is checked against the gateway and each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from server.app import GENERATION_SERVICE
from server.config import load_config
from tests.conftest import REPO_ROOT

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes" / "base"
ENVOY = REPO_ROOT / "deploy" / "envoy"


def manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def gateway_container() -> dict[str, Any]:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "gateway")


def test_kustomization_lists_the_manifests() -> None:
    kustomization = manifests()["Kustomization"]
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).exists(), resource
    assert "secret.example.yaml" not in kustomization["resources"]  # created with kubectl


def test_the_configmap_is_a_valid_gateway_config(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(manifests()["ConfigMap"]["data"]["config.yaml"])
    config = load_config(config_file, environ={})
    assert config.server.host == "0.0.0.0" and config.server.port == 50051
    assert config.auth.enabled
    mounts = {m["mountPath"] for m in gateway_container()["volumeMounts"]}
    for path in (
        config.auth.key_store.parent,
        config.auth.secret_file.parent,
        config.auth.signing_keys_dir,
        Path(config.providers["anthropic"].api_key_file),  # type: ignore[attr-defined]
    ):
        assert any(path.is_relative_to(mount) for mount in mounts), f"{path} is not mounted"
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_grace_s


def test_the_deployment_never_multiplies_a_key_s_limits(tmp_path: Path) -> None:
    # Each gateway process counts limits and budgets on its own unless they
    # live in Redis, so workers or replicas beyond one would multiply them (keys
    # can carry limits from the key store, which no manifest shows).
    config_file = tmp_path / "config.yaml"
    config_file.write_text(manifests()["ConfigMap"]["data"]["config.yaml"])
    container = gateway_container()
    environ = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    environ.pop("LLMGW_CONFIG")
    arguments = [*container.get("command", []), *container.get("args", [])]
    overrides = {}
    if "--workers" in arguments:
        overrides["server.workers"] = int(arguments[arguments.index("--workers") + 1])
    config = load_config(config_file, environ=environ, overrides=overrides)
    replicas = manifests()["Deployment"]["spec"]["replicas"]
    processes = config.server.workers * replicas
    assert processes == 1 or config.limits.backend == "redis", (
        f"{replicas} replica(s) x {config.server.workers} worker(s) with limits.backend:"
        f" {config.limits.backend}: every key would get {processes} times its limits"
    )


def test_probes_speak_grpc_health_to_the_gateway_port() -> None:
    container = gateway_container()
    port = container["ports"][0]["containerPort"]
    assert port == 50051
    assert container["readinessProbe"]["grpc"] == {"port": port, "service": GENERATION_SERVICE}
    assert container["livenessProbe"]["grpc"] == {"port": port}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LLMGW_CONFIG"].startswith("/etc/llm-gateway/config/")
    service = manifests()["Service"]["spec"]["ports"][0]
    assert service["targetPort"] == container["ports"][0]["name"]
    # The HTTP front door: probed at /readyz, and published by the Service.
    assert container["ports"][1] == {"name": "http", "containerPort": 8080}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert manifests()["Service"]["spec"]["ports"][1]["targetPort"] == "http"


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
    assert front["health_checks"][0]["http_health_check"]["path"] == "/readyz"
    front_endpoint = front["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert front_endpoint["address"]["socket_address"]["port_value"] == 8080
    ingress_ports = {
        listener["address"]["socket_address"]["port_value"]
        for listener in config["static_resources"]["listeners"]
    }
    assert ingress_ports.isdisjoint({50051, 8080})  # the sidecar shares the pod's ports
    sidecar = yaml.safe_load((ENVOY / "sidecar.yaml").read_text())
    assert sidecar["spec"]["template"]["spec"]["containers"][0]["name"] == "envoy"
