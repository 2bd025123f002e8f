"""README "In EKS", run from the README itself: the blocks marked ``<!-- readme-test: eks -->``,
in order, by bash, as an operator would, from nothing to a connected agent.

There is no cluster and no Docker engine here, so ``kubectl`` and ``docker`` are
tests/fake_kubectl.py: what can be checked is (each manifest and the ConfigMap and Secret the
README makes are validated by ``kubernetes-validate --strict``; the Dockerfile by hadolint),
what cannot is refused. A simulated kubelet in this test starts the pod from what was applied
(the Deployment, the ConfigMap's files, the Secret's token) exactly as tests/test_pod_enrollment.py
does: the real agent, uid 10001, read-only root, only the volumes writable, against the stub
(the vendor) and the stand-in API server. ``kubectl wait`` returns when that pod is Ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from tests.conftest import scaled
from tests.fake_kube_api import FakeKubeApi
from tests.processes import REPO
from tests.test_pod_enrollment import (  # noqa: F401  # the fixtures, shared
    AGENT_ID,
    Pod,
    cluster,
    start_pod,
    vendor,
    vendor_pki,
)

BLOCK = re.compile(r"<!-- readme-test: eks -->\n```sh\n(.*?)```", re.DOTALL)


def readme_blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_marks_the_eks_walk() -> None:
    blocks = readme_blocks()
    assert len(blocks) == 3
    text = "".join(blocks)
    assert "kubectl exec" not in text
    assert "kubectl apply -f deploy/kubernetes/standalone/" in text


async def kubelet(sim: Path, root: Path, pki: PKIPaths, cp: str, enroll_at: str,
                  kube: str, api: FakeKubeApi) -> Pod:  # fmt: skip
    """Starts the applied Deployment's pod once its ConfigMap and Secret exist, and marks it
    ready (for ``kubectl wait``) when its readiness probe passes."""
    needed = (sim / "applied.done", sim / "configmap" / "byoc-agent-config",
              sim / "secret" / "byoc-agent-enroll")  # fmt: skip
    while not all(p.exists() for p in needed):  # noqa: ASYNC110  # a kubelet polls its work
        await asyncio.sleep(0.1)
    deployment = yaml.safe_load((sim / "applied" / "deployment.yaml").read_text())
    configmap = {p.name: p for p in (sim / "configmap" / "byoc-agent-config").iterdir()}
    token = (sim / "secret" / "byoc-agent-enroll" / "token").read_text()
    pod = start_pod(root, pki, cp, enroll_at, kube, configmap, deployment, token)
    path = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    while True:
        if pod.process.poll() is not None:
            return pod
        with contextlib.suppress(httpx.HTTPError):
            if (await pod.get(path["httpGet"]["path"])).status_code == 200:
                break
        await asyncio.sleep(0.2)  # the kubelet's probe period, shortened
    events = [f"{e['type']} {e['reason']} pod/{e['involvedObject']['name']} {e['message']}"
              for e in api.events()]  # fmt: skip
    (sim / "events.txt").write_text("\n".join(events) + "\n")
    (sim / "ready-byoc-agent").touch()
    return pod


@pytest.mark.slow
async def test_the_readme_walks_an_operator_to_a_connected_agent(
    tmp_path: Path,
    vendor_pki: PKIPaths,  # noqa: F811
    vendor: tuple[StubServer, str, str],  # noqa: F811
    cluster: tuple[FakeKubeApi, str],  # noqa: F811
) -> None:
    server, cp, enroll_at = vendor
    api, kube = cluster
    work, sim, root, bin_dir = (tmp_path / n for n in ("work", "sim", "pod", "bin"))
    for directory in (work, sim, root, bin_dir, work / "vendor"):
        directory.mkdir()
    root.chmod(0o755)
    (work / "deploy").symlink_to(REPO / "deploy")
    (work / "Dockerfile").symlink_to(REPO / "Dockerfile")
    shutil.copy(vendor_pki.server_ca_cert, work / "vendor" / "ca.pem")
    shutil.copy(vendor_pki.signing_pub, work / "vendor" / "command-signing.pub")
    async with StubClient(f"http://127.0.0.1:{server.api_port}", timeout=scaled(10)) as stub:
        token = (await stub.enroll_token(AGENT_ID, ttl=900))["token"]
        (work / "vendor" / "token.txt").write_text(token + "\n")
        for tool in ("kubectl", "docker"):
            wrapper = bin_dir / tool
            fake = REPO / "tests" / "fake_kubectl.py"
            wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {fake} {tool} "$@"\n')
            wrapper.chmod(0o755)
        hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "KUBECTL_SIM": str(sim),
            "KUBERNETES_VALIDATE": str(REPO / ".tools" / "bin" / "kubernetes-validate"),
            "HADOLINT": hadolint,
        }  # fmt: skip
        assert (REPO / ".tools" / "bin" / "kubernetes-validate").is_file(), "run `make tools`"
        script = "set -eu\n" + "\n".join(readme_blocks())
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", script, cwd=work, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        started = asyncio.create_task(kubelet(sim, root, vendor_pki, cp, enroll_at, kube, api))
        pod: Pod | None = None
        try:
            async with asyncio.timeout(scaled(120)):
                output, _ = await shell.communicate()
                pod = await started
            text = output.decode()
            assert shell.returncode == 0, text + (pod.log.read_text() if pod else "")
            assert "deployment.apps/byoc-agent condition met" in text
            assert "Normal Enrolled pod/byoc-agent-" in text
            assert f"enrolled as {AGENT_ID}" in text
            assert 'secret "byoc-agent-enroll" deleted' in text
            assert "not built (no engine)" in text
            assert (await stub.agent(AGENT_ID))["connected"] is True
            recorded = sorted(p.name for p in (sim / "configmap" / "byoc-agent-config").iterdir())
            assert recorded == ["agent.toml", "ca.pem", "command-signing.pub", "policy.toml"]
        finally:
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                pod = pod or await started
            if shell.returncode is None:
                shell.kill()
                await shell.wait()
            if pod is not None and pod.process.poll() is None:
                pod.process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(pod.process.wait, scaled(60))
    assert pod is not None
    assert pod.process.returncode == 0, pod.log.read_text()
    assert (pod.volumes["state"] / "tls" / "agent.key").is_file()
