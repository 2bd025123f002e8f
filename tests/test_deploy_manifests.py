"""deploy/kubernetes/ and the Dockerfile: parsed and checked against the invariants the EKS
deployment promises (least privilege, egress to 443 only, probes, non-root, read-only root
filesystem, resource limits), and the configuration they ship is one the agent accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import parse_config
from agent.core.policy import Policy
from agent.drivers.kubernetes import KubernetesSettings
from tests.processes import REPO

DEPLOY = REPO / "deploy" / "kubernetes"


def documents() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents() if d["kind"] == kind]
    return doc


def agent_container() -> dict[str, Any]:
    pod = one("Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "byoc-agent"]
    return dict(container)


def test_every_manifest_is_namespaced_yaml() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {
        "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "Deployment", "ConfigMap",
        "PersistentVolumeClaim",
    }  # fmt: skip
    assert all(d["metadata"]["namespace"] == "milvus" for d in docs)


def test_the_role_grants_only_what_the_driver_uses() -> None:
    rules = one("Role")["rules"]
    verbs = {verb for rule in rules for verb in rule["verbs"]}
    resources = {res for rule in rules for res in rule["resources"]}
    assert verbs <= {"get", "patch", "list"}
    assert resources <= {"deployments", "deployments/scale", "pods"}
    assert "*" not in verbs | resources
    for rule in rules:
        if rule["resources"] != ["pods"]:  # workload objects: by name only
            assert rule["resourceNames"] == ["milvus-querynode"]
    binding = one("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "byoc-agent"}  # fmt: skip
    assert binding["subjects"][0]["name"] == one("ServiceAccount")["metadata"]["name"]


def test_egress_is_port_443_only_besides_dns() -> None:
    policy = one("NetworkPolicy")["spec"]
    assert "Egress" in policy["policyTypes"]
    ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {("TCP", 443), ("UDP", 53), ("TCP", 53)}
    assert all("to" not in rule or rule["to"] for rule in policy["egress"])
    inbound = {(p["protocol"], p["port"]) for rule in policy["ingress"] for p in rule["ports"]}
    assert inbound == {("TCP", 9464)}  # the kubelet's probes of the health endpoint
    selector = policy["podSelector"]["matchLabels"]
    assert selector == one("Deployment")["spec"]["template"]["metadata"]["labels"]


def test_the_agent_container_is_locked_down_and_probed() -> None:
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] == 1  # one pod, one agent identity
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "byoc-agent"
    assert pod["securityContext"]["runAsNonRoot"] is True
    agent = agent_container()
    security = agent["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(agent["resources"]) == {"requests", "limits"}
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    state = next(v for v in pod["volumes"] if v["name"] == "agent-state")
    assert "persistentVolumeClaim" in state  # the replay cache survives a new pod


def test_the_shipped_configuration_and_policy_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = one("ConfigMap")["data"]
    config = parse_config(data["agent.toml"].encode(), source=Path("/etc/byoc-agent/agent.toml"))
    assert config.driver_kind == "kubernetes"
    assert config.health_listen == ("0.0.0.0", 9464)  # noqa: S104  # the pod IP, for probes
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.100.0.1")
    settings = KubernetesSettings.from_table({**config.driver_settings, "namespace": "milvus"})
    assert settings.api_url == "https://10.100.0.1:443"
    assert settings.name in one("Role")["rules"][0]["resourceNames"]
    Policy.from_toml(data["policy.toml"].encode())


def test_the_dockerfile_runs_as_a_pinned_non_root_image() -> None:
    text = (REPO / "Dockerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms
    assert all(":" in image and "latest" not in image for image in froms)
    assert "USER 10001:10001" in text
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
