"""The ``kubernetes`` driver (lightkube) against the stand-in API server.

No kube-apiserver runs on these machines: tests/fake_kube_api.py stands in for it, over real
HTTPS with bearer tokens, speaking the API's wire format and applying each patch type as the
real server does (itself tested against RFC 7386/6902 in tests/test_fake_kube_api.py), with
resourceVersion conflicts, watches (and 410 Expired), a controller that rolls replicas out step
by step, and RBAC judged from the Role shipped in deploy/kubernetes/. Metrics are scraped over
HTTP from a real endpoint on loopback (the pods' IP in the stand-in).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiohttp import web

from agent.core.errors import ConfigError, DriverError
from agent.drivers import load_driver_factory
from agent.drivers.base import DriverEnvironment, ExecContext
from agent.drivers.kubernetes import ApiSettings, KubernetesDriver, PodEvents, PodRef
from certs.pki import PKIPaths
from tests.fake_kube_api import DEPLOYMENT, MILVUS, NS, FakeKubeApi, serve
from tests.processes import REPO

DEPLOYMENT_SETTINGS: dict[str, object] = {
    "kind": "Deployment",
    "name": DEPLOYMENT,
    "container": "querynode",
}
MILVUS_SETTINGS: dict[str, object] = {"kind": "Milvus", "name": MILVUS, "component": "queryNode"}
TOKEN = "service-account-token-1"  # test tokens for the stand-in
ROTATED = "service-account-token-2"
SCALE = f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale"


class Cluster:
    def __init__(self, api: FakeKubeApi, url: str, root: Path, pki: PKIPaths) -> None:
        self.api = api
        self.url = url
        self.root = root
        self.records: list[tuple[str, dict[str, object]]] = []
        self.token = root / "token"
        self.token.write_text(TOKEN)
        self.base: dict[str, object] = {
            "api_url": url,
            "token_file": str(self.token),
            "ca_file": str(pki.server_ca_cert),
            "namespace": NS,
            "image": "milvusdb/milvus",
            "metrics_port": api.metrics_port,
            "rollout_timeout": 5.0,
        }

    def ctx(self) -> ExecContext:
        async def audit(event: str, /, **fields: object) -> None:
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

    def requests(self, method: str) -> list[tuple[str, Any]]:
        return [(path, body) for m, path, body in self.api.requests if m == method]


async def _metrics(request: web.Request) -> web.Response:
    text = 'milvus_querynode_info{version="2.3.0"} 1\n'
    return web.Response(text=text, content_type="text/plain")


@pytest.fixture
async def cluster(tmp_path: Path, pki: PKIPaths) -> AsyncIterator[Cluster]:
    metrics_app = web.Application()
    metrics_app.add_routes([web.get("/metrics", _metrics)])
    metrics_runner = web.AppRunner(metrics_app)
    await metrics_runner.setup()
    try:
        await web.TCPSite(metrics_runner, "127.0.0.1", 0).start()
        api = FakeKubeApi(tokens={TOKEN}, metrics_port=metrics_runner.addresses[0][1])
        async with serve(api, str(pki.server_cert), str(pki.server_key)) as url:
            yield Cluster(api, url, tmp_path, pki)
    finally:
        await metrics_runner.cleanup()


def shipped_role(shape: str) -> list[dict[str, Any]]:
    text = (REPO / "deploy" / "kubernetes" / shape / "rbac.yaml").read_text()
    (role,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "Role"]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def containers(cluster: Cluster) -> dict[str, str]:
    found = cluster.api.get("deployments", DEPLOYMENT)["spec"]["template"]["spec"]["containers"]
    return {c["name"]: c["image"] for c in found}


def test_the_driver_is_registered() -> None:
    assert load_driver_factory("kubernetes") is KubernetesDriver


async def test_scale_patches_the_scale_subresource(cluster: Cluster) -> None:
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        result = await driver.scale(4, cluster.ctx())
    assert result == {"replicas": 4, "previous_replicas": 2}
    assert cluster.requests("PATCH") == [
        (f"{SCALE}?fieldManager=byoc-agent", {"spec": {"replicas": 4}})
    ]
    assert cluster.api.get("deployments", DEPLOYMENT)["spec"]["replicas"] == 4


async def test_scale_a_milvus_component(cluster: Cluster) -> None:
    async with cluster.driver(**MILVUS_SETTINGS) as driver:
        result = await driver.scale(3, cluster.ctx())
    assert result == {"replicas": 3, "previous_replicas": 1}
    assert cluster.api.get("milvuses", MILVUS)["spec"]["components"]["queryNode"]["replicas"] == 3


async def test_upgrade_changes_one_container_and_watches_the_rollout(cluster: Cluster) -> None:
    cluster.api.conflicts = 2  # someone else writes twice meanwhile: read again and retry
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        result = await driver.upgrade("2.4.0", cluster.ctx())
    assert result["image"] == "milvusdb/milvus:2.4.0"
    assert result["previous_image"] == "milvusdb/milvus:2.3.0"
    # A strategic merge patch: the sidecar (and every other field) is left alone. The stand-in
    # applies a JSON merge patch as RFC 7386 says, so a merge patch would have deleted it.
    assert containers(cluster) == {"querynode": "milvusdb/milvus:2.4.0",
                                   "byoc-agent": "byoc-agent:0.1.0"}  # fmt: skip
    ports = cluster.api.get("deployments", DEPLOYMENT)["spec"]["template"]["spec"]
    assert ports["containers"][0]["ports"] == [{"containerPort": 9091, "name": "metrics"}]
    patches = cluster.requests("PATCH")
    assert len(patches) == 3  # two conflicts, then success
    assert all("resourceVersion" in body["metadata"] for _, body in patches)
    watches = [path for path, _ in cluster.requests("GET") if "watch=true" in path]
    assert len(watches) == 1
    assert f"fieldSelector=metadata.name%3D{DEPLOYMENT}" in watches[0]
    assert "resourceVersion=" in watches[0]  # from the patch on, not the whole history
    status = cluster.api.get("deployments", DEPLOYMENT)["status"]
    assert status["updatedReplicas"] == status["availableReplicas"] == 2


async def test_a_watch_whose_version_expired_starts_again(cluster: Cluster) -> None:
    cluster.api.expire_next_watches = 1  # 410 Expired: lightkube restarts without a version
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        result = await driver.upgrade("2.4.0", cluster.ctx())
    assert result["changed"] is True
    watches = [path for path, _ in cluster.requests("GET") if "watch=true" in path]
    assert len(watches) == 2
    assert "resourceVersion=" not in watches[1]


@pytest.mark.parametrize("failure", ["never_ready", "deadline_exceeded"])
async def test_a_rollout_that_does_not_complete_is_rolled_back(
    cluster: Cluster, failure: str
) -> None:
    getattr(cluster.api, failure).add("milvusdb/milvus:2.5.0-broken")
    timeout = 0.5 if failure == "never_ready" else 60.0  # the deadline needs no timeout
    async with cluster.driver(**DEPLOYMENT_SETTINGS, rollout_timeout=timeout) as driver:
        with pytest.raises(DriverError) as failed:
            await driver.upgrade("2.5.0-broken", cluster.ctx())
    assert failed.value.code == "rollout_failed_rolled_back"
    assert failed.value.result == {"rolled_back": True, "image": "milvusdb/milvus:2.3.0"}
    assert containers(cluster) == {"querynode": "milvusdb/milvus:2.3.0",
                                   "byoc-agent": "byoc-agent:0.1.0"}  # fmt: skip
    assert [e for e, _ in cluster.records if e == "rollback_started"] == ["rollback_started"]


async def test_forbidden_is_reported_with_the_reason(cluster: Cluster) -> None:
    cluster.api.forbidden.add("patch deployments/scale")
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        with pytest.raises(DriverError) as failed:
            await driver.scale(3, cluster.ctx())
    assert failed.value.code == "forbidden"
    assert 'cannot patch resource "deployments/scale"' in failed.value.detail
    assert "Role" in failed.value.detail


async def test_a_bad_token_is_refused(cluster: Cluster) -> None:
    cluster.token.write_text("stolen-or-stale")
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        with pytest.raises(DriverError) as failed:
            await driver.scale(3, cluster.ctx())
    assert failed.value.code == "kubernetes_error"
    assert "401" in failed.value.detail


async def test_a_rotated_token_is_read_again_when_the_old_one_is_refused(
    cluster: Cluster,
) -> None:
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        await driver.scale(3, cluster.ctx())
        # The kubelet writes a new projected token; the old one stops being accepted.
        cluster.token.write_text(ROTATED)
        cluster.api.tokens = {ROTATED}
        cluster.api.auth_seen.clear()
        result = await driver.scale(4, cluster.ctx())
    assert result == {"replicas": 4, "previous_replicas": 3}
    first, second, *rest = cluster.api.auth_seen
    assert first == ("GET", TOKEN, 401)  # the old token, refused
    assert second == ("GET", ROTATED, 200)  # read again from the file, accepted
    assert rest == [("PATCH", ROTATED, 200)]  # and kept


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
    async with cluster.driver(**MILVUS_SETTINGS) as driver:
        result = await driver.upgrade("2.4.0", cluster.ctx())
    assert result["previous_image"] == "milvusdb/milvus:2.3.0"
    milvus = cluster.api.get("milvuses", MILVUS)
    assert milvus["spec"]["components"]["image"] == "milvusdb/milvus:2.4.0"
    assert milvus["status"] == {"status": "Healthy", "observedGeneration": 2}
    path = f"/apis/milvus.io/v1beta1/namespaces/{NS}/milvuses/{MILVUS}"
    assert [p for p, _ in cluster.requests("PATCH")] == [f"{path}?fieldManager=byoc-agent"]


@pytest.mark.parametrize("shape", ["standalone", "sidecar"])
async def test_the_shipped_role_allows_exactly_what_the_agent_does(
    cluster: Cluster, shape: str
) -> None:
    """Every request of every command passes the shipped Role, and every rule is needed."""
    cluster.api.rules = shipped_role(shape)
    async with cluster.driver(**DEPLOYMENT_SETTINGS) as driver:
        await driver.scale(3, cluster.ctx())
        await driver.upgrade("2.4.0", cluster.ctx())
        await driver.collect_metrics(["workload"], cluster.ctx())
    settings = ApiSettings(cluster.url, cluster.token, Path(cluster.base["ca_file"]), NS)  # type: ignore[arg-type]
    events = PodEvents(settings, PodRef(name="byoc-agent-7d9f-x2x", namespace=NS, uid="u-1"))
    try:
        assert await events.post(warning=True, reason="EnrollmentRefused", message="m") is None
    finally:
        await events.close()
    assert cluster.api.used_rules == set(range(len(cluster.api.rules)))
    # And nothing beyond: a write to another workload is refused.
    async with cluster.driver(**{**DEPLOYMENT_SETTINGS, "name": "milvus-datanode"}) as other:
        with pytest.raises(DriverError) as refused:
            await other.scale(1, cluster.ctx())
    assert refused.value.code == "forbidden"


async def test_events_about_the_pod_are_what_kubectl_describe_shows(cluster: Cluster) -> None:
    settings = ApiSettings(cluster.url, cluster.token, Path(str(cluster.base["ca_file"])), NS)
    events = PodEvents(settings, PodRef(name="byoc-agent-0", namespace=NS, uid="u-1"))
    try:
        assert (
            await events.post(warning=True, reason="EnrollmentRefused", message="x" * 5000) is None
        )
        cluster.api.tokens = set()
        refused = await events.post(warning=False, reason="Enrolled", message="ok")
    finally:
        await events.close()
    assert refused is not None
    assert "401" in refused
    (event,) = cluster.api.events()
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": "byoc-agent-0",
                                       "namespace": NS, "uid": "u-1",
                                       "fieldPath": "spec.containers{byoc-agent}"}  # fmt: skip
    assert (event["type"], event["reason"]) == ("Warning", "EnrollmentRefused")
    assert event["metadata"]["name"].startswith("byoc-agent-0.")
    assert len(event["message"]) <= 1024
