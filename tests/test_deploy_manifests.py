"""deploy/kubernetes/{standalone,sidecar}/ and the Dockerfile.

Every manifest of both shapes is validated by ``kubernetes-validate --strict`` against the two
newest Kubernetes minor versions it knows and scanned by ``checkov`` (both from ``make tools``);
a checkov finding passes only when the manifest justifies it next to the line
(``# checkov:skip=<ID>: why``) or in a ``checkov.io/skipN`` annotation. Then the promises of each
shape are checked on the parsed manifests: what the NetworkPolicy selects, which probes touch
whose readiness, where the token is mounted, that every file the configuration reads is mounted
and every directory it writes is a writable volume, and that the configuration and policy are
ones the agent accepts. No cluster runs here; the Role is exercised against the stand-in API
server in tests/test_kubernetes_driver.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from agent.config import parse_config
from agent.core.policy import Policy
from agent.drivers.kubernetes import KubernetesSettings
from tests.processes import REPO

DEPLOY = REPO / "deploy" / "kubernetes"
SHAPES = ("standalone", "sidecar")
TOOLS = REPO / ".tools" / "bin"
VENDOR_FILES = ("ca.pem", "command-signing.pub")
"""The ConfigMap's keys that come from the vendor (README: `kubectl create configmap`)."""


def manifests(shape: str) -> list[Path]:
    return sorted((DEPLOY / shape).glob("*.yaml"))


def documents(shape: str) -> list[dict[str, Any]]:
    return [d for p in manifests(shape) for d in yaml.safe_load_all(p.read_text()) if d]


def one(shape: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(shape) if d["kind"] == kind]
    return doc


def pod_spec(shape: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(shape, "Deployment")["spec"]["template"]["spec"]
    return spec


def agent_container(shape: str) -> dict[str, Any]:
    pod = pod_spec(shape)
    found = [c for c in pod.get("containers", []) + pod.get("initContainers", [])
             if c["name"] == "byoc-agent"]  # fmt: skip
    (container,) = found
    return dict(container)


def agent_toml(shape: str) -> dict[str, Any]:
    return tomllib.loads((DEPLOY / shape / "config" / "agent.toml").read_text())


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make tools`")
    return str(path)


def kubernetes_versions() -> list[str]:
    """The two newest minor versions whose strict schemas kubernetes-validate ships."""
    code = (
        "import importlib.resources as r, re;"
        "d = r.files('kubernetes_validate') / 'kubernetes-json-schema';"
        "print(' '.join(p.name for p in d.iterdir()))"
    )
    names = subprocess.run(
        [str(TOOLS / "python"), "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    versions = {
        m.group(1) for n in names if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", n))
    }
    newest = sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))[-2:]
    assert len(newest) == 2, names
    return newest


def configmap(shape: str, vendor: dict[str, str] | None = None) -> dict[str, Any]:
    """The ConfigMap `kubectl create configmap byoc-agent-config --from-file=...` makes from the
    shape's config/ files and the vendor's two files (README), as kubectl writes it."""
    data = {p.name: p.read_text() for p in sorted((DEPLOY / shape / "config").iterdir())}
    data.update(vendor or {name: f"(the vendor's {name})\n" for name in VENDOR_FILES})
    meta = {"name": "byoc-agent-config", "namespace": "milvus"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_manifest_validates_strictly_against_the_newest_kubernetes(
    shape: str, tmp_path: Path
) -> None:
    generated = tmp_path / "configmap.yaml"
    generated.write_text(yaml.safe_dump(configmap(shape)))
    files = [str(p) for p in manifests(shape)] + [str(generated)]
    for version in kubernetes_versions():
        done = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "-k", version, "--quiet", *files],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"Kubernetes {version}:\n{done.stdout}{done.stderr}"


def test_checkov_finds_nothing_unjustified(tmp_path: Path) -> None:
    done = subprocess.run(
        [tool("checkov"), "-d", str(DEPLOY), "--framework", "kubernetes", "--skip-download",
         "-o", "json"],
        capture_output=True, text=True, check=False, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100  # it really looked: ~200 checks over both shapes
    unjustified = []
    for report in reports:
        for finding in report["results"]["failed_checks"]:
            text = (DEPLOY / finding["file_path"].lstrip("/")).read_text()
            if f"checkov:skip={finding['check_id']}:" not in text:
                unjustified.append(f"{finding['check_id']} {finding['file_path']} "
                                   f"{finding['resource']}: {finding['check_name']}")  # fmt: skip
        for skipped in report["results"].get("skipped_checks", []):
            reason = skipped["check_result"]["suppress_comment"]
            assert len(reason) > 40, skipped  # a reason, not a shrug
    assert {s["check_id"] for r in reports for s in r["results"].get("skipped_checks", [])} == {
        "CKV_K8S_43"
    }
    assert not unjustified, "\n".join(unjustified)


@pytest.mark.parametrize("shape", SHAPES)
def test_one_agent_identity_locked_down(shape: str) -> None:
    deployment = one(shape, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = pod_spec(shape)
    assert pod["serviceAccountName"] == "byoc-agent"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"  # key stays 0600
    agent = agent_container(shape)
    security = agent["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(agent["resources"]) == {"requests", "limits"}
    assert agent["livenessProbe"]["httpGet"]["path"] == "/livez"
    # The token, the projected volume the kubelet rotates, is mounted in the agent only.
    token_volumes = {v["name"] for v in pod["volumes"] if "projected" in v}
    for container in pod["containers"] + pod.get("initContainers", []):
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        assert bool(mounted & token_volumes) == (container["name"] == "byoc-agent")
    projected = next(v["projected"] for v in pod["volumes"] if "projected" in v)
    token = next(
        s["serviceAccountToken"] for s in projected["sources"] if "serviceAccountToken" in s
    )
    assert token["expirationSeconds"] <= 3600
    secret = next(v["secret"] for v in pod["volumes"] if "secret" in v)
    assert secret == {"secretName": "byoc-agent-enroll", "optional": True, "defaultMode": 0o440}


def test_standalone_policy_selects_only_the_agent() -> None:
    policy = one("standalone", "NetworkPolicy")["spec"]
    labels = one("standalone", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert (
        policy["podSelector"]["matchLabels"] == labels == {"app.kubernetes.io/name": "byoc-agent"}
    )
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy  # nothing in; the node (kubelet probes) is always admitted
    ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {("TCP", 443), ("UDP", 53), ("TCP", 53), ("TCP", 9091)}
    dns, metrics = policy["egress"][1]["to"], policy["egress"][2]["to"]
    assert dns[0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert metrics == [{"podSelector": {"matchLabels": {"app": "querynode"}}}]
    assert agent_container("standalone")["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_sidecar_can_never_change_the_databases_readiness_or_network() -> None:
    assert not [d for d in documents("sidecar") if d["kind"] == "NetworkPolicy"]
    pod = pod_spec("sidecar")
    (agent,) = pod["initContainers"]
    assert agent["name"] == "byoc-agent"
    assert agent["restartPolicy"] == "Always"  # a native sidecar (Kubernetes 1.29+)
    assert "readinessProbe" not in agent  # a sidecar's readiness counts in the pod's Ready
    assert "startupProbe" not in agent  # would hold the database back at start
    (database,) = pod["containers"]
    assert not any(m["name"].startswith("agent-") for m in database.get("volumeMounts", []))


@pytest.mark.parametrize("shape", SHAPES)
def test_every_file_is_mounted_and_every_write_goes_to_a_volume(shape: str) -> None:
    """The root filesystem is read-only: every path the configuration writes must be on a
    writable volume, every file it reads on a mount, and /etc/byoc-agent complete."""
    agent = agent_container(shape)
    volumes = {v["name"]: v for v in pod_spec(shape)["volumes"]}
    mounts = {PurePosixPath(m["mountPath"]): m for m in agent["volumeMounts"]}

    def mount_of(path: str) -> dict[str, Any]:
        found = [m for p, m in mounts.items() if PurePosixPath(path).is_relative_to(p)]
        assert found, f"{path} is on no volume: the root filesystem is read-only"
        return max(found, key=lambda m: len(m["mountPath"]))

    config = agent_toml(shape)
    writes = [config["agent"]["state_dir"], config["agent"]["audit_log"],
              config["agent"]["control_socket"], config["control_plane"]["ca_bundle"],
              config["control_plane"]["client_cert"], config["control_plane"]["client_key"],
              "/tmp/sqlite-temp"]  # fmt: skip
    for path in writes:
        mount = mount_of(path)
        assert not mount.get("readOnly"), path
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume, path
    key_volume = volumes[mount_of(config["control_plane"]["client_key"])["name"]]
    assert "persistentVolumeClaim" in key_volume  # the key survives a new pod, never a Secret
    enrolling = config["enroll"]
    reads = [config["agent"]["policy"], enrolling["ca_bundle"], enrolling["token_file"],
             *config["commands"]["trusted_keys"]]  # fmt: skip
    keys = {p.name for p in (DEPLOY / shape / "config").iterdir()} | set(VENDOR_FILES)
    for path in reads:
        mount_of(path)
        if path.startswith("/etc/byoc-agent/"):
            assert PurePosixPath(path).name in keys, f"{path} is not in the ConfigMap"
    assert args_config(agent) == "/etc/byoc-agent/agent.toml"
    assert "agent.toml" in keys


def args_config(container: dict[str, Any]) -> str:
    args: list[str] = container["args"]
    return args[args.index("--config") + 1]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_shipped_configuration_and_policy_are_accepted(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = configmap(shape)["data"]
    config = parse_config(data["agent.toml"].encode(), source=Path("/etc/byoc-agent/agent.toml"))
    assert config.driver_kind == "kubernetes"
    assert config.health_listen == ("0.0.0.0", 9464)  # noqa: S104  # the pod IP, for probes
    assert config.enroll is not None
    assert config.enroll.token_file == Path("/var/run/secrets/byoc-agent/enroll/token")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.100.0.1")
    settings = KubernetesSettings.from_table({**config.driver_settings, "namespace": "milvus"})
    assert settings.api.api_url == "https://10.100.0.1:443"
    role = one(shape, "Role")
    assert all(settings.name in r.get("resourceNames", [settings.name]) for r in role["rules"])
    Policy.from_toml(data["policy.toml"].encode())


def test_the_dockerfile_runs_as_a_pinned_non_root_image() -> None:
    text = (REPO / "Dockerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms
    assert all("@sha256:" in image or (":" in image and "latest" not in image) for image in froms)
    assert "USER 10001:10001" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text  # nothing written under the read-only root
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
