"""The ``kubernetes`` driver (EKS sidecar).

No kube-apiserver runs on these machines: tests/fake_kube_api.py stands in for it, over real
HTTPS with a bearer token and the API's wire format, including resourceVersion conflicts,
403 Forbidden and a rollout that never becomes ready. Metrics are scraped over HTTP from a real
endpoint on loopback (the pods' IP in the stand-in).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from agent.core.errors import ConfigError, DriverError
from agent.drivers import load_driver_factory
from agent.drivers.base import DriverEnvironment, ExecContext
from agent.drivers.kubernetes import KubernetesDriver
from certs.pki import PKIPaths
from tests.fake_kube_api import DEPLOYMENT, MILVUS, NS, FakeKubeApi, tls_context

DEPLOYMENT_SETTINGS: dict[str, object] = {
    "kind": "Deployment",
    "name": DEPLOYMENT,
    "container": "querynode",
}
TOKEN = "service-account-token-1"  # a test token for the stand-in


class Cluster:
    def __init__(self, api: FakeKubeApi, url: str, root: Path, pki: PKIPaths) -> None:
        self.api = api
        self.url = url
        self.root = root
        self.records: list[tuple[str, dict[str, object]]] = []
        token = root / "token"
        token.write_text(TOKEN)
        self.base: dict[str, object] = {
            "api_url": url,
            "token_file": str(token),
            "ca_file": str(pki.server_ca_cert),
            "namespace": NS,
            "image": "milvusdb/milvus",
            "metrics_port": api.metrics_port,
            "rollout_timeout": 2.0,
            "poll_interval": 0.01,
        }

    def ctx(self) -> ExecContext:
        def audit(event: str, /, **fields: object) -> None:
            self.records.append((event, fields))

        return ExecContext(jti="test", audit=audit, log=structlog.get_logger())

    @contextlib.asynccontextmanager
    async def driver(self, **settings: object) -> AsyncIterator[KubernetesDriver]:
        env = DriverEnvironment(
            state_dir=self.root, audit=self.ctx().audit, log=structlog.get_logger()
        )
        made = KubernetesDriver({**self.base, **settings}, env)
        await made.start()
        try:
            yield made
        finally:
            await made.close()

    def patches(self) -> list[tuple[str, Any]]:
        return [(path, body) for method, path, body in self.api.requests if method == "PATCH"]


async def _metrics(request: web.Request) -> web.Response:
    text = 'milvus_querynode_info{version="2.3.0"} 1\n'
    return web.Response(text=text, content_type="text/plain")


@pytest.fixture
async def cluster(tmp_path: Path, pki: PKIPaths) -> AsyncIterator[Cluster]:
    metrics_app = web.Application()
    metrics_app.add_routes([web.get("/metrics", _metrics)])
    metrics_runner = web.AppRunner(metrics_app)
    await metrics_runner.setup()
    metrics_site = web.TCPSite(metrics_runner, "127.0.0.1", 0)
    await metrics_site.start()
    metrics_port = metrics_runner.addresses[0][1]
    api = FakeKubeApi(token=TOKEN, metrics_port=metrics_port)
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(
        runner,
        "127.0.0.1",
        0,
        ssl_context=tls_context(str(pki.server_cert), str(pki.server_key)),
    )
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Cluster(api, f"https://localhost:{port}", tmp_path, pki)
    finally:
        await runner.cleanup()
        await metrics_runner.cleanup()


def test_the_driver_is_registered() -> None:
    assert load_driver_factory("kubernetes") is KubernetesDriver


async def test_scale_patches_the_scale_subresource(cluster: Cluster) -> None:
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        result = await driver.scale(4, cluster.ctx())
    assert result == {"replicas": 4, "previous_replicas": 2}
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale"
    assert cluster.patches() == [(path, {"spec": {"replicas": 4}})]
    assert cluster.api.objects["deployment"]["spec"]["replicas"] == 4


async def test_scale_a_milvus_component(cluster: Cluster) -> None:
    async with cluster.driver(kind="Milvus", name=MILVUS, component="queryNode") as driver:
        result = await driver.scale(3, cluster.ctx())
    assert result == {"replicas": 3, "previous_replicas": 1}
    assert cluster.api.objects["milvus"]["spec"]["components"]["queryNode"]["replicas"] == 3


async def test_upgrade_sets_the_image_and_waits_for_the_rollout(cluster: Cluster) -> None:
    cluster.api.conflicts = 2  # someone else writes twice meanwhile: read again and retry
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        result = await driver.upgrade("2.4.0", cluster.ctx())
    assert result["image"] == "milvusdb/milvus:2.4.0"
    assert result["previous_image"] == "milvusdb/milvus:2.3.0"
    containers = cluster.api.objects["deployment"]["spec"]["template"]["spec"]["containers"]
    assert {c["name"]: c["image"] for c in containers} == {
        "querynode": "milvusdb/milvus:2.4.0",
        "byoc-agent": "byoc-agent:0.1.0",  # the sidecar itself is left alone
    }
    patches = cluster.patches()
    assert len(patches) == 3  # two conflicts, then success
    assert all("resourceVersion" in body["metadata"] for _, body in patches)
    status = cluster.api.objects["deployment"]["status"]
    assert status["updatedReplicas"] == status["availableReplicas"] == 2


async def test_a_rollout_that_never_completes_is_rolled_back(cluster: Cluster) -> None:
    cluster.api.never_ready.add("milvusdb/milvus:2.5.0-broken")
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        with pytest.raises(DriverError) as failed:
            await driver.upgrade("2.5.0-broken", cluster.ctx())
    assert failed.value.code == "rollout_failed_rolled_back"
    assert failed.value.result == {"rolled_back": True, "image": "milvusdb/milvus:2.3.0"}
    containers = cluster.api.objects["deployment"]["spec"]["template"]["spec"]["containers"]
    assert containers[0]["image"] == "milvusdb/milvus:2.3.0"
    assert [e for e, _ in cluster.records if e == "rollback_started"] == ["rollback_started"]


async def test_forbidden_is_reported_with_the_reason(cluster: Cluster) -> None:
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale"
    cluster.api.forbidden.add(f"PATCH {path}")
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        with pytest.raises(DriverError) as failed:
            await driver.scale(3, cluster.ctx())
    assert failed.value.code == "forbidden"
    assert "Role" in failed.value.detail


async def test_a_bad_token_is_refused(cluster: Cluster) -> None:
    (cluster.root / "token").write_text("stolen-or-stale")
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        with pytest.raises(DriverError) as failed:
            await driver.scale(3, cluster.ctx())
    assert failed.value.code == "kubernetes_error"
    assert "401" in failed.value.detail


async def test_collect_metrics_scrapes_the_selected_pods(cluster: Cluster) -> None:
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        result = await driver.collect_metrics(["workload"], cluster.ctx())
    samples: list[dict[str, Any]] = result["samples"]  # type: ignore[assignment]
    assert sorted(s["labels"]["pod"] for s in samples) == [f"{DEPLOYMENT}-0", f"{DEPLOYMENT}-1"]
    assert result["errors"] == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "DaemonSet", "name": "x", "container": "c"}, "kind"),
        ({"kind": "Milvus", "name": "x"}, "component"),
        ({"kind": "Deployment", "name": "x"}, "container"),
        ({"kind": "Deployment", "name": "x", "container": "c", "api_url": "http://x"}, "https"),
        ({"kind": "Deployment", "name": "x", "container": "c", "surprise": 1}, "surprise"),
    ],
)
async def test_bad_settings_are_refused(
    cluster: Cluster, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        async with cluster.driver(**settings):
            pass


async def test_upgrade_a_milvus_custom_resource(cluster: Cluster) -> None:
    async with cluster.driver(kind="Milvus", name=MILVUS, component="queryNode") as driver:
        result = await driver.upgrade("2.4.0", cluster.ctx())
    assert result["previous_image"] == "milvusdb/milvus:2.3.0"
    assert cluster.api.objects["milvus"]["spec"]["components"]["image"] == "milvusdb/milvus:2.4.0"
    path = f"/apis/milvus.io/v1beta1/namespaces/{NS}/milvuses/{MILVUS}"
    assert [p for p, _ in cluster.patches()] == [path]
