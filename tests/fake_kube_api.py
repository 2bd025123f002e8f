"""A stand-in Kubernetes API server for the kubernetes driver's tests.

No kube-apiserver runs on these machines. This one serves, over real HTTPS with a bearer
token, the endpoints the driver uses, with the real wire format (JSON objects, ``Status``
errors, ``application/merge-patch+json``): a Deployment and its ``/scale`` subresource, a
Milvus custom resource, and pods by label selector. It can answer 409 Conflict (someone else
wrote: ``conflicts``), 403 Forbidden (``forbidden``), and run rollouts that complete a replica
per GET or never (``never_ready`` images).
"""

from __future__ import annotations

import copy
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

NS = "db"
DEPLOYMENT = "milvus-querynode"
MILVUS = "my-milvus"


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip
    return web.json_response(body, status=code)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch, except that a list of containers is merged by name (as the
    real API server's strategic merge does for this field)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif key == "containers" and isinstance(value, list):
            by_name = {c["name"]: c for c in target.get("containers", [])}
            for item in value:
                by_name.setdefault(item["name"], {}).update(item)
            target["containers"] = list(by_name.values())
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass
class FakeKubeApi:
    token: str
    metrics_port: int
    conflicts: int = 0
    forbidden: set[str] = field(default_factory=set)
    never_ready: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    version: int = 100
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.objects["deployment"] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": DEPLOYMENT, "namespace": NS, "generation": 1,
                         "resourceVersion": str(self.version)},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "querynode"}},
                     "template": {"spec": {"containers": [
                         {"name": "querynode", "image": "milvusdb/milvus:2.3.0"},
                         {"name": "byoc-agent", "image": "byoc-agent:0.1.0"}]}}},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                       "availableReplicas": 2},
        }  # fmt: skip
        self.objects["milvus"] = {
            "apiVersion": "milvus.io/v1beta1", "kind": "Milvus",
            "metadata": {"name": MILVUS, "namespace": NS, "generation": 1,
                         "resourceVersion": str(self.version)},
            "spec": {"components": {"image": "milvusdb/milvus:2.3.0",
                                    "queryNode": {"replicas": 1}}},
            "status": {"status": "Healthy"},
        }  # fmt: skip

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        base = f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}"
        milvus = f"/apis/milvus.io/v1beta1/namespaces/{NS}/milvuses/{MILVUS}"
        app.add_routes([
            web.get(base, self._get_deployment),
            web.patch(base, self._patch_deployment),
            web.get(base + "/scale", self._get_scale),
            web.patch(base + "/scale", self._patch_scale),
            web.get(milvus, self._get_milvus),
            web.patch(milvus, self._patch_milvus),
            web.get(f"/api/v1/namespaces/{NS}/pods", self._pods),
        ])  # fmt: skip
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.text() if request.can_read_body else None
        self.requests.append((request.method, request.path_qs, json.loads(body) if body else None))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        if f"{request.method} {request.path}" in self.forbidden:
            return _status(403, "Forbidden", f"{request.method.lower()} is forbidden here")
        if request.method == "PATCH" and request.content_type != "application/merge-patch+json":
            return _status(415, "UnsupportedMediaType", "send application/merge-patch+json")
        response: web.StreamResponse = await handler(request)
        return response

    async def _get_deployment(self, request: web.Request) -> web.Response:
        return await self._get("deployment")

    async def _patch_deployment(self, request: web.Request) -> web.Response:
        return await self._patch(request, "deployment")

    async def _get_milvus(self, request: web.Request) -> web.Response:
        return await self._get("milvus")

    async def _patch_milvus(self, request: web.Request) -> web.Response:
        return await self._patch(request, "milvus")

    def _bump(self, obj: dict[str, Any], *, spec_changed: bool) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        if spec_changed:
            obj["metadata"]["generation"] += 1

    async def _get(self, name: str) -> web.Response:
        obj = self.objects[name]
        if name == "deployment":
            self._progress(obj)
        return web.json_response(obj)

    def _progress(self, obj: dict[str, Any]) -> None:
        """A controller at work: one more replica updated and available per read."""
        status, spec = obj["status"], obj["spec"]
        image = spec["template"]["spec"]["containers"][0]["image"]
        status["observedGeneration"] = obj["metadata"]["generation"]
        if image in self.never_ready:
            status["availableReplicas"] = max(0, spec["replicas"] - 1)
            status["updatedReplicas"] = 1
            return
        status["updatedReplicas"] = min(spec["replicas"], status["updatedReplicas"] + 1)
        status["availableReplicas"] = status["updatedReplicas"]

    async def _patch(self, request: web.Request, name: str) -> web.Response:
        obj = self.objects[name]
        patch = await request.json()
        wanted = patch.get("metadata", {}).get("resourceVersion")
        if self.conflicts > 0:  # someone else wrote just before us
            self.conflicts -= 1
            self._bump(obj, spec_changed=False)
        if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", "the object has been modified; please apply your "
                           "changes to the latest version and try again")  # fmt: skip
        patch.get("metadata", {}).pop("resourceVersion", None)
        _merge(obj, patch)
        self._bump(obj, spec_changed="spec" in patch)
        if name == "deployment" and "spec" in patch:
            obj["status"]["updatedReplicas"] = 0
        return web.json_response(obj)

    async def _get_scale(self, request: web.Request) -> web.Response:
        replicas = self.objects["deployment"]["spec"]["replicas"]
        scale = {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas},
        }
        return web.json_response(scale)

    async def _patch_scale(self, request: web.Request) -> web.Response:
        patch = await request.json()
        obj = self.objects["deployment"]
        obj["spec"]["replicas"] = int(patch["spec"]["replicas"])
        self._bump(obj, spec_changed=True)
        return await self._get_scale(request)

    async def _pods(self, request: web.Request) -> web.Response:
        if request.query.get("labelSelector") != "app=querynode":
            return web.json_response({"kind": "PodList", "items": []})
        obj = self.objects["deployment"]
        items = [
            {"metadata": {"name": f"{DEPLOYMENT}-{i}", "labels": {"app": "querynode"}},
             "status": {"phase": "Running", "podIP": "127.0.0.1"}}
            for i in range(obj["spec"]["replicas"])
        ]  # fmt: skip
        return web.json_response({"kind": "PodList", "items": items})


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context
