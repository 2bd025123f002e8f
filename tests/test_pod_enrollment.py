"""A fresh pod of the standalone shape, as far as these machines can make one: the real agent
process, started with the manifest's arguments and environment, as its ``runAsUser`` 10001, with
a read-only root filesystem and only the manifest's volumes writable (tests/pod_sandbox.py: a
mount namespace with read-only binds, the stand-in for a container runtime), against the real
stub control plane ("the vendor", reached by the names in the shipped agent.toml through the
pod's /etc/hosts) and the stand-in Kubernetes API server (tests/fake_kube_api.py, enforcing the
shipped Role), with the ConfigMap made exactly as README "In EKS" makes it.

The path walked: the Secret holds a token that is already spent -> the agent does not exit, says
so once (log, a Warning Event about its pod, /readyz 503, ``byoc-agent status``) and keeps
/livez at 200 -> the operator replaces the Secret -> the agent makes its key in the pod (0600,
on the state volume), enrolls, connects, and carries out a signed command through the
Kubernetes API. Nothing was written outside the volumes (the root is read-only; any attempt
would have failed the run).

What this cannot show (a real cluster would): the kubelet's own handling (Secret volume updates
through its atomic symlink swap, fsGroup ownership changes, probe timing, restart back-off),
the container's network namespace and NetworkPolicy enforcement, image contents.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.io.renewal import new_key_and_csr
from certs.pki import PKIPaths, init_pki
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.ci import unavailable
from tests.conftest import scaled, stub_config
from tests.fake_kube_api import DEPLOYMENT, FakeKubeApi, serve
from tests.processes import REPO, free_port

DEPLOY = REPO / "deploy" / "kubernetes" / "standalone"
NAMESPACE = "milvus"
POD = "byoc-agent-5d8f7c9b6-x7k2p"
AGENT_ID = "milvus-prod-1"
UID = 10001


def _require_namespaces() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "needs root to make a mount namespace (unshare -m)"
    elif not shutil.which("unshare") or not shutil.which("mount"):
        reason = "needs util-linux (unshare, mount)"
    if reason:
        unavailable(reason)


def _manifest() -> dict[str, Any]:
    (deployment,) = [d for d in yaml.safe_load_all((DEPLOY / "deployment.yaml").read_text()) if d]
    return dict(deployment)


def _loopback() -> str:
    """A loopback address of our own, so that port 443 (the URLs' port) is free on it."""
    octets = (random.randint(100, 250), random.randint(1, 250), random.randint(2, 250))
    return "127.{}.{}.{}".format(*octets)


@dataclasses.dataclass
class Pod:
    root: Path
    process: subprocess.Popen[bytes]
    health: str
    volumes: dict[str, Path]
    log: Path

    def token(self, value: str) -> None:
        """What the kubelet does when the Secret changes: the file's content is replaced."""
        staged = self.volumes["enroll-token"] / ".token.new"
        staged.write_text(value)
        staged.replace(self.volumes["enroll-token"] / "token")

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await client.get(self.health + path)

    def status(self) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--socket",
             str(self.volumes["run"] / "control.sock")],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def vendor_pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    return init_pki(
        tmp_path_factory.mktemp("vendor-pki"),
        agent_ids=(),
        server_dns=("cp.vendor.example", "enroll.vendor.example", "localhost"),
    )


@pytest.fixture
async def vendor(
    tmp_path: Path, vendor_pki: PKIPaths
) -> AsyncIterator[tuple[StubServer, str, str]]:
    """The stub as the vendor: its tunnel and enrollment listeners on port 443, as the URLs say."""
    _require_namespaces()
    cp, enroll_at = _loopback(), _loopback()
    config = dataclasses.replace(
        stub_config(vendor_pki, tmp_path / "stub.db"),
        agent_host=cp, agent_port=443, enroll_host=enroll_at, enroll_port=443,
        pki=vendor_pki.root, issuer="vendor-control-plane",
    )  # fmt: skip
    server = StubServer(config)
    await server.start()
    try:
        yield server, cp, enroll_at
    finally:
        await server.close()


@pytest.fixture
async def cluster(vendor_pki: PKIPaths) -> AsyncIterator[tuple[FakeKubeApi, str]]:
    rbac = yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text())
    (role,) = [d for d in rbac if d and d["kind"] == "Role"]
    api = FakeKubeApi(tokens={"projected-token-1"}, rules=role["rules"], namespace=NAMESPACE)
    async with serve(api, str(vendor_pki.server_cert), str(vendor_pki.server_key)) as url:
        yield api, url


def configmap_files(vendor_pki: PKIPaths) -> dict[str, Path]:
    """The ConfigMap README's `kubectl create configmap ... --from-file` makes: key -> file."""
    files = {p.name: p for p in (DEPLOY / "config").iterdir()}
    return {**files, "ca.pem": vendor_pki.server_ca_cert,
            "command-signing.pub": vendor_pki.signing_pub}  # fmt: skip


def _volumes(root: Path, vendor_pki: PKIPaths, configmap: dict[str, Path]) -> dict[str, Path]:
    """The pod's volumes as directories, filled as the kubelet would fill them."""
    made = {
        name: root / name for name in ("config", "enroll-token", "kube-api", "state", "run", "tmp")
    }
    for path in made.values():
        path.mkdir()
    for key, source in configmap.items():
        shutil.copy(source, made["config"] / key)
    (made["kube-api"] / "token").write_text("projected-token-1")
    shutil.copy(vendor_pki.server_ca_cert, made["kube-api"] / "ca.crt")
    (made["kube-api"] / "namespace").write_text(NAMESPACE)
    for name in ("config", "enroll-token", "kube-api"):
        for path in [made[name], *made[name].iterdir()]:
            os.chown(path, 0, UID)  # root-owned, group-readable (defaultMode 0440 + fsGroup)
            path.chmod(0o750 if path.is_dir() else 0o440)
    for name in ("state", "run", "tmp"):  # fsGroup: the kubelet makes them group-writable
        os.chown(made[name], 0, UID)
        made[name].chmod(0o2770)
    return made


def start_pod(
    root: Path,
    vendor_pki: PKIPaths,
    cp: str,
    enroll_at: str,
    kube: str,
    configmap: dict[str, Path] | None = None,
    deployment: dict[str, Any] | None = None,
    token: str | None = None,
) -> Pod:
    """Start the agent as the standalone Deployment's pod would run (``deployment``: as
    applied; default: the shipped one)."""
    pod = (deployment or _manifest())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = _volumes(root, vendor_pki, configmap or configmap_files(vendor_pki))
    if token is not None:  # the Secret, when it exists before the pod starts
        (volumes["enroll-token"] / "token").write_text(token)
    # The one change to the shipped configuration: the pod has a network namespace of its own,
    # this machine does not, so the health port is a free loopback port instead of 0.0.0.0:9464.
    config = volumes["config"] / "agent.toml"
    health_port = free_port()
    shipped = config.read_text()
    config.chmod(0o640)
    config.write_text(
        shipped.replace('listen = "0.0.0.0:9464"', f'listen = "127.0.0.1:{health_port}"')
    )
    config.chmod(0o440)
    by_name = {v["name"]: v for v in pod["volumes"]}
    assert set(by_name) == set(volumes)
    binds = [
        {"source": str(volumes[m["name"]]), "target": m["mountPath"],
         "read_only": bool(m.get("readOnly"))}
        for m in container["volumeMounts"]
    ]  # fmt: skip
    host, port = kube.removeprefix("https://").rsplit(":", 1)
    env = {
        "PATH": "/usr/bin:/bin",
        "POD_NAME": POD, "POD_NAMESPACE": NAMESPACE, "POD_UID": "6f1c0d1e-uid",
        "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port,
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    assert {e["name"] for e in container["env"]} == {"POD_NAME", "POD_NAMESPACE", "POD_UID"}
    assert host == "localhost"
    argv = [str(Path(sys.executable).parent / "byoc-agent"), *container["args"]]
    hosts = Path("/etc/hosts").read_text() + (
        f"\n{cp} cp.vendor.example\n{enroll_at} enroll.vendor.example\n"
    )
    security = container["securityContext"]
    spec = {"volumes": binds, "hosts": hosts, "uid": security["runAsUser"],
            "gid": security["runAsGroup"], "argv": argv, "env": env}  # fmt: skip
    (root / "spec.json").write_text(json.dumps(spec))
    log = root / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--",
             sys.executable, str(REPO / "tests" / "pod_sandbox.py"), str(root / "spec.json")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return Pod(root, process, f"http://127.0.0.1:{health_port}", volumes, log)


async def _until(check: Any, seconds: float, pod: Pod) -> Any:
    """Poll ``check`` (an async callable returning a truthy value when done)."""
    async with asyncio.timeout(scaled(seconds)):
        while True:
            if pod.process.poll() is not None:
                pytest.fail(f"the agent exited ({pod.process.returncode}):\n{pod.log.read_text()}")
            with_result = await check()
            if with_result:
                return with_result
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_a_fresh_pod_enrolls_itself_without_exec(
    tmp_path: Path,
    vendor_pki: PKIPaths,
    vendor: tuple[StubServer, str, str],
    cluster: tuple[FakeKubeApi, str],
) -> None:
    server, cp, enroll_at = vendor
    api, kube = cluster
    async with StubClient(f"http://127.0.0.1:{server.api_port}", timeout=scaled(10)) as stub:
        spent = (await stub.enroll_token(AGENT_ID, ttl=600))["token"]
        assert server.ca is not None
        server.ca.enroll(spent, new_key_and_csr("someone-else")[1], now=time.time())  # used up
        root = tmp_path / "pod"
        root.mkdir()
        root.chmod(0o755)
        pod = start_pod(root, vendor_pki, cp, enroll_at, kube)
        try:
            pod.token(spent)

            def refused_event() -> bool:
                return any(e["reason"] == "EnrollmentTokenRefused" for e in api.events())

            async with asyncio.timeout(scaled(60)):
                await api.wait_for(refused_event)
            (event,) = api.events()
            assert event["type"] == "Warning"
            assert event["involvedObject"]["name"] == POD
            assert "used already" in event["message"]
            assert "kubectl -n milvus create secret generic byoc-agent-enroll" in event["message"]
            ready = await pod.get("/readyz")
            assert ready.status_code == 503
            assert "token_refused" in ready.text
            assert (await pod.get("/livez")).status_code == 200  # waiting is not a fault
            status = pod.status()
            assert "not enrolled yet" in status
            assert "what to do: get a new one-time token" in status
            assert pod.process.poll() is None  # no crash loop

            pod.token((await stub.enroll_token(AGENT_ID, ttl=600))["token"])

            async def connected() -> bool:
                try:  # the health port closes for a moment between enrolling and running
                    return (await pod.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await _until(connected, 60, pod)
            agent = await stub.agent(AGENT_ID)
            assert agent["connected"] is True
            key = pod.volumes["state"] / "tls" / "agent.key"
            info = key.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, UID)
            reasons = [e["reason"] for e in api.events()]
            assert reasons == ["EnrollmentTokenRefused", "Enrolled"]

            sent = await stub.send(AGENT_ID, "scale", {"replicas": 3})
            done = await stub.command(sent["ref"], wait_for="final", wait_seconds=scaled(60))
            assert done["command"]["state"] == "succeeded", done
            assert api.get("deployments", DEPLOYMENT)["spec"]["replicas"] == 3
        finally:
            if pod.process.poll() is None:
                pod.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(pod.process.wait, scaled(60))
        text = pod.log.read_text()
        assert code == 0, text
        assert "Read-only file system" not in text
        assert "Traceback" not in text
        audit = (pod.volumes["state"] / "audit" / "audit.jsonl").read_text().splitlines()
        assert json.loads(audit[-1])["event"] == "agent_stopped"


def test_the_sandbox_really_is_read_only(tmp_path: Path) -> None:
    """The stand-in for readOnlyRootFilesystem: outside the volumes nothing can be written,
    not even by root; inside them it can."""
    _require_namespaces()
    volume = tmp_path / "vol"
    volume.mkdir()
    volume.chmod(0o777)
    script = "import pathlib,sys;pathlib.Path(sys.argv[1]).write_text('x')"
    volumes = [{"source": str(volume), "target": "/var/lib/byoc-agent", "read_only": False}]
    argv = [sys.executable, "-c", script, "/var/lib/byoc-agent/ok"]
    spec = {"volumes": volumes, "hosts": "127.0.0.1 localhost\n", "uid": UID, "gid": UID,
            "argv": argv, "env": {}}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    sandbox = ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
               str(REPO / "tests" / "pod_sandbox.py"), str(tmp_path / "spec.json")]  # fmt: skip
    assert subprocess.run(sandbox, check=False, timeout=60).returncode == 0
    assert (volume / "ok").read_text() == "x"
    for target in ("/etc/x", str(tmp_path / "outside"), "/var/lib/x"):
        spec["argv"] = [sys.executable, "-c", script, target]
        spec["uid"] = spec["gid"] = 0
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        done = subprocess.run(sandbox, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "Read-only file system" in done.stderr, done.stderr
    assert not (tmp_path / "outside").exists()
    socket.gethostname()  # the host is untouched: nothing to clean up
