"""deploy/k8s/: every object valid against the Kubernetes API schema (kubernetes-validate, strict: an unknown
field fails), and the wiring between them and the code: the routing header the client sends, the gRPC
readiness probe on the server's port, the store URL on the Redis Service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serving.client.core import ROUTE_HEADER

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def _objects() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{document['kind']}/{document['metadata']['name']}", document)
        for path in sorted(K8S.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _find(kind: str, name: str) -> dict[str, Any]:
    return next(doc for _, doc in _objects() if doc["kind"] == kind and doc["metadata"]["name"] == name)


@pytest.mark.parametrize(("where", "document"), _objects(), ids=[where for where, _ in _objects()])
def test_every_object_is_valid_kubernetes(where: str, document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_misspelled_field() -> None:
    broken = _find("Deployment", "conveyor-server")
    broken = {**broken, "spec": {**broken["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_replicas_are_ready_by_grpc_health_and_share_the_redis_service() -> None:
    server = _find("Deployment", "conveyor-server")["spec"]["template"]["spec"]
    container = server["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert container["readinessProbe"]["grpc"]["port"] == int(env["CONVEYOR_PORT"])
    redis = _find("Service", "conveyor-redis")["spec"]["ports"][0]["port"]
    assert env["CONVEYOR_STORE"] == f"redis://conveyor-redis:{redis}/0"
    assert server["terminationGracePeriodSeconds"] > float(env["CONVEYOR_GRACE_S"])


def test_both_proxies_hash_the_header_the_client_sends() -> None:
    annotations = _find("Ingress", "conveyor")["metadata"]["annotations"]
    assert (
        annotations["nginx.ingress.kubernetes.io/upstream-hash-by"]
        == f"$http_{ROUTE_HEADER.replace('-', '_')}"
    )
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    envoy = yaml.safe_load(_find("ConfigMap", "conveyor-envoy")["data"]["envoy.yaml"])
    cluster = envoy["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "RING_HASH" and "grpc_health_check" in cluster["health_checks"][0]
    routes = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = routes["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["hash_policy"] == [{"header": {"header_name": ROUTE_HEADER}}]


KSERVE = K8S.parent / "kserve" / "conveyor.yaml"


def _kserve(kind: str) -> dict[str, Any]:
    return next(doc for doc in yaml.safe_load_all(KSERVE.read_text()) if doc and doc["kind"] == kind)


def test_the_kserve_runtime_serves_v2_grpc_from_a_valid_container() -> None:
    """KServe's CRDs are not in the Kubernetes schema: the runtime's containers are validated as a Pod's, and
    its wiring checked against KServe's conventions and the server's settings."""
    runtime = _kserve("ServingRuntime")["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runtime"},
        "spec": {"containers": runtime["containers"]},
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    (container,) = runtime["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    (port,) = container["ports"]
    assert runtime["protocolVersions"] == ["grpc-v2"] and port["name"] == "h2c"
    assert port["containerPort"] == container["readinessProbe"]["grpc"]["port"] == int(env["CONVEYOR_PORT"])
    assert env["CONVEYOR_MODEL_DIR"] == "/mnt/models"  # where KServe's storage initializer puts the model
    service = _kserve("InferenceService")["spec"]["predictor"]["model"]
    assert service["runtime"] == _kserve("ServingRuntime")["metadata"]["name"]
    assert service["modelFormat"]["name"] in [entry["name"] for entry in runtime["supportedModelFormats"]]
    assert service["protocolVersion"] in runtime["protocolVersions"]
