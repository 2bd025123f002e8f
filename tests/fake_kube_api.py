"""A stand-in Kubernetes API server for the kubernetes driver's and the pod's tests.

No kube-apiserver runs on these machines (no container runtime, no etcd). This one serves, over
real HTTPS with bearer tokens, what the agent uses, in the API's wire format and semantics:

- Deployments (``apps/v1``) with their ``/scale`` subresource (``autoscaling/v1`` Scale), a
  Milvus custom resource (``milvus.io/v1beta1``), pods (list by label selector) and core/v1
  Events (create, list): JSON objects, ``Status`` objects for every error, with the reason and
  code the real server gives (401 Unauthorized, 403 Forbidden with the RBAC message, 404
  NotFound, 409 Conflict, 410 Expired, 415 UnsupportedMediaType, 422 Invalid).
- PATCH applies each content type exactly as the API server does (tests/kube_patch.py, itself
  tested against RFC 7386 and RFC 6902's examples): a JSON merge patch *replaces* lists, a
  strategic merge patch merges ``containers`` by name, a JSON patch is all or nothing; a
  strategic merge patch of a custom resource is refused with 415, as the real server does.
- ``resourceVersion``: one counter for all objects; a patch whose result carries another
  ``resourceVersion`` than the stored object is a 409 Conflict (optimistic concurrency);
  ``conflicts = N`` makes someone else write just before each of the next N patches.
  ``status`` cannot be changed through the main resource; a change of ``spec`` bumps
  ``metadata.generation``.
- Watches (``?watch=true``): newline-delimited ``{"type", "object"}`` events over a chunked
  response, filtered by ``fieldSelector=metadata.name=...``; without ``resourceVersion`` the
  current objects come first as ADDED; with one, the recorded changes after it; one older than
  the retained history (``compact()``) gets an ``ERROR`` event with a 410 Expired Status.
- A controller: after a Deployment's spec changes it brings one replica up to date per step
  (``observedGeneration``, ``updatedReplicas``, ``availableReplicas``, the ``Progressing`` and
  ``Available`` conditions), each step a MODIFIED event; an image in ``never_ready`` stops
  with one replica not available; one in ``deadline_exceeded`` reports ``Progressing=False``
  with reason ``ProgressDeadlineExceeded``. The Milvus resource goes Unhealthy then Healthy.
- Authentication: only tokens in ``tokens`` are accepted (so a rotated-out one gets 401).
  Authorization: with ``rules`` (a Role's rules, e.g. from deploy/kubernetes/), each request is
  judged like the RBAC authorizer (verb from method and ``watch``, resource/subresource, API
  group, ``resourceNames`` - for list and watch only through a ``metadata.name`` field
  selector); ``used_rules`` records which rules allowed something.

Not modelled: server-side apply (``application/apply-patch+yaml`` is answered 415 here; the real
server accepts it), admission (defaults, quotas, webhooks, Pod Security), the rest of
validation (only what is checked in ``_validate``), set-based label selectors, field selectors
other than ``metadata.name``, pagination (``limit``/``continue``), bookmarks, protobuf, HTTP/2,
watch-cache timing (events are delivered at once), real scheduling (pods are derived from the
Deployment's replicas, all Running at 127.0.0.1), and Event series/aggregation.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from tests.kube_patch import BadPatch, PatchFailed, json_patch, merge_patch, strategic_merge_patch

NS: Final = "db"
DEPLOYMENT: Final = "milvus-querynode"
MILVUS: Final = "my-milvus"
SERVICE_ACCOUNT: Final = "byoc-agent"
MERGE: Final = "application/merge-patch+json"
JSON_PATCH: Final = "application/json-patch+json"
STRATEGIC: Final = "application/strategic-merge-patch+json"
APPLY: Final = "application/apply-patch+yaml"
HISTORY: Final = 1000

# resource -> (API group, kind, namespaced list path prefix)
RESOURCES: Final = {
    "deployments": ("apps", "Deployment"),
    "milvuses": ("milvus.io", "Milvus"),
    "pods": ("", "Pod"),
    "events": ("", "Event"),
}
BUILT_IN: Final = {"deployments", "pods", "events"}


def _json(body: object, status: int = 200) -> web.Response:
    """JSON as kube-apiserver sends it: ``Content-Type: application/json``, no charset (clients
    such as lightkube compare the header exactly)."""
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def status(code: int, reason: str, message: str, **details: object) -> web.Response:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": message, "reason": reason,
                            "code": code}  # fmt: skip
    if details:
        body["details"] = details
    return _json(body, status=code)


def _qualified(resource: str) -> str:
    group = RESOURCES[resource][0]
    return f"{resource}.{group}" if group else resource


@dataclass(frozen=True)
class Request:
    """What the RBAC authorizer sees of a request (k8s.io/apiserver RequestInfo)."""

    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str


def parse_path(method: str, path: str, query: dict[str, str]) -> Request | None:
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if len(rest) < 3 or rest[0] != "namespaces":
        return None
    namespace, resource = rest[1], rest[2]
    name = rest[3] if len(rest) > 3 else ""
    subresource = rest[4] if len(rest) > 4 else ""
    verbs = {"GET": "get", "PATCH": "patch", "POST": "create", "PUT": "update", "DELETE": "delete"}
    verb = verbs.get(method, method.lower())
    if method == "GET" and not name:
        verb = "watch" if query.get("watch") in ("true", "1") else "list"
        selector = query.get("fieldSelector", "")
        if selector.startswith("metadata.name=") and "," not in selector:
            name = selector.removeprefix("metadata.name=")
    return Request(verb, group, resource, subresource, namespace, name)


def rule_allows(rule: dict[str, Any], req: Request) -> bool:
    resource = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
    names = rule.get("resourceNames") or []
    return (
        any(g in ("*", req.group) for g in rule.get("apiGroups", []))
        and any(r in ("*", resource) for r in rule.get("resources", []))
        and any(v in ("*", req.verb) for v in rule.get("verbs", []))
        and (not names or req.name in names)
    )


@dataclass
class Watcher:
    resource: str
    namespace: str
    name: str | None
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


@dataclass
class FakeKubeApi:
    tokens: set[str]
    metrics_port: int = 9091
    rules: list[dict[str, Any]] | None = None
    conflicts: int = 0
    forbidden: set[str] = field(default_factory=set)
    never_ready: set[str] = field(default_factory=set)
    deadline_exceeded: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    auth_seen: list[tuple[str, str, int]] = field(default_factory=list)
    used_rules: set[int] = field(default_factory=set)
    version: int = 100
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    compacted: int = 0
    expire_next_watches: int = 0
    watchers: list[Watcher] = field(default_factory=list)
    namespace: str = NS
    _rolled_out: dict[str, Any] = field(default_factory=dict)
    _waiters: list[asyncio.Queue[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.put("deployments", {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": DEPLOYMENT, "namespace": self.namespace, "generation": 1,
                         "labels": {"app": "querynode"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "querynode"}},
                     "template": {"metadata": {"labels": {"app": "querynode"}},
                                  "spec": {"containers": [
                         {"name": "querynode", "image": "milvusdb/milvus:2.3.0",
                          "ports": [{"containerPort": 9091, "name": "metrics"}]},
                         {"name": "byoc-agent", "image": "byoc-agent:0.1.0"}]}}},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                       "readyReplicas": 2, "availableReplicas": 2},
        })  # fmt: skip
        self._rolled_out[DEPLOYMENT] = copy.deepcopy(
            self.get("deployments", DEPLOYMENT)["spec"]["template"]
        )
        self.put("milvuses", {
            "apiVersion": "milvus.io/v1beta1", "kind": "Milvus",
            "metadata": {"name": MILVUS, "namespace": self.namespace, "generation": 1},
            "spec": {"components": {"image": "milvusdb/milvus:2.3.0",
                                    "queryNode": {"replicas": 1}}},
            "status": {"status": "Healthy", "observedGeneration": 1},
        })  # fmt: skip

    # -- storage ----------------------------------------------------------------------------

    def get(self, resource: str, name: str) -> dict[str, Any]:
        return self.objects[(resource, self.namespace, name)]

    def put(self, resource: str, obj: dict[str, Any], *, event: str = "ADDED") -> dict[str, Any]:
        """Store ``obj`` with a new resourceVersion and tell the watchers."""
        self.version += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.version)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta.setdefault("namespace", self.namespace)
        key = (resource, meta["namespace"], meta["name"])
        self.objects[key] = obj
        snapshot = copy.deepcopy(obj)
        self.history.append((self.version, resource, {"type": event, "object": snapshot}))
        del self.history[:-HISTORY]
        for watcher in self.watchers:
            if watcher.resource == resource and watcher.name in (None, meta["name"]):
                watcher.queue.put_nowait({"type": event, "object": snapshot})
        for waiter in self._waiters:
            waiter.put_nowait(None)
        return obj

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds, checked after every write (bound it with
        ``asyncio.timeout``)."""
        waiter: asyncio.Queue[None] = asyncio.Queue()
        self._waiters.append(waiter)
        try:
            while not predicate():
                await waiter.get()
        finally:
            self._waiters.remove(waiter)

    def compact(self) -> None:
        """Forget the history up to now, like etcd compaction: older versions get 410."""
        self.compacted = self.version
        self.history.clear()

    def events(self) -> list[dict[str, Any]]:
        return [o for (r, _, _), o in self.objects.items() if r == "events"]

    def add_pod(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
               "status": {"phase": "Running", "podIP": "127.0.0.1"}}  # fmt: skip
        return self.put("pods", pod)

    # -- the application --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate])
        ns = "/namespaces/{ns}"
        deployments = f"/apis/apps/v1{ns}/deployments"
        milvuses = f"/apis/milvus.io/v1beta1{ns}/milvuses"
        app.add_routes([
            web.get(deployments, self._collection("deployments")),
            web.get(deployments + "/{name}", self._read("deployments")),
            web.patch(deployments + "/{name}", self._patch("deployments")),
            web.get(deployments + "/{name}/scale", self._get_scale),
            web.patch(deployments + "/{name}/scale", self._patch_scale),
            web.get(milvuses, self._collection("milvuses")),
            web.get(milvuses + "/{name}", self._read("milvuses")),
            web.patch(milvuses + "/{name}", self._patch("milvuses")),
            web.get(f"/api/v1{ns}/pods", self._collection("pods")),
            web.get(f"/api/v1{ns}/events", self._collection("events")),
            web.post(f"/api/v1{ns}/events", self._create_event),
        ])  # fmt: skip
        return app

    async def stop(self) -> None:
        """End every open watch (before the server shuts down)."""
        for watcher in self.watchers:
            watcher.queue.put_nowait(None)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.text() if request.can_read_body else None
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body
        self.requests.append((request.method, request.path_qs, parsed))
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if presented not in self.tokens:
            self.auth_seen.append((request.method, presented, 401))
            return status(401, "Unauthorized", "Unauthorized")
        self.auth_seen.append((request.method, presented, 200))
        info = parse_path(request.method, request.path, dict(request.query))
        if info is None or info.resource not in RESOURCES:
            return status(404, "NotFound", "the server could not find the requested resource")
        denied = self._authorize(info)
        if denied is not None:
            return denied
        if info.namespace != self.namespace:
            return status(404, "NotFound", f'namespaces "{info.namespace}" not found')
        response: web.StreamResponse = await handler(request)
        return response

    def _authorize(self, req: Request) -> web.Response | None:
        resource = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
        manual = f"{req.verb} {resource}"
        if self.rules is None and manual not in self.forbidden:
            return None
        if manual not in self.forbidden and self.rules is not None:
            allowed = [i for i, rule in enumerate(self.rules) if rule_allows(rule, req)]
            if allowed:
                self.used_rules.update(allowed)
                return None
        group = f' in API group "{req.group}"'
        user = f"system:serviceaccount:{self.namespace}:{SERVICE_ACCOUNT}"
        what = f'{_qualified(req.resource)} "{req.name}"' if req.name else _qualified(req.resource)
        message = (
            f'{what} is forbidden: User "{user}" cannot {req.verb} resource "{resource}"'
            f'{group} in the namespace "{req.namespace}"'
        )
        return status(403, "Forbidden", message, name=req.name, group=req.group, kind=req.resource)

    def _not_found(self, resource: str, name: str) -> web.Response:
        group, _ = RESOURCES[resource]
        return status(404, "NotFound", f'{_qualified(resource)} "{name}" not found',
                      name=name, group=group, kind=resource)  # fmt: skip

    def _find(self, resource: str, request: web.Request) -> dict[str, Any] | None:
        return self.objects.get((resource, self.namespace, request.match_info["name"]))

    # -- reads ------------------------------------------------------------------------------

    def _read(self, resource: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            obj = self._find(resource, request)
            if obj is None:
                return self._not_found(resource, request.match_info["name"])
            return _json(obj)

        return handler

    def _collection(self, resource: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            query = request.query
            name = None
            selector = query.get("fieldSelector")
            if selector:
                if not selector.startswith("metadata.name=") or "," in selector:
                    return status(400, "BadRequest", f"field selector not modelled: {selector}")
                name = selector.removeprefix("metadata.name=")
            try:
                labels = _label_selector(query.get("labelSelector", ""))
            except ValueError as exc:
                return status(400, "BadRequest", str(exc))
            if query.get("watch") in ("true", "1"):
                return await self._watch(request, resource, name, query.get("resourceVersion"))
            items = [
                o for o in self._items(resource)
                if name in (None, o["metadata"]["name"]) and _matches(o, labels)
            ]  # fmt: skip
            kind = RESOURCES[resource][1]
            group = RESOURCES[resource][0]
            return _json({
                "kind": f"{kind}List", "apiVersion": f"{group}/v1" if group else "v1",
                "metadata": {"resourceVersion": str(self.version)}, "items": items,
            })  # fmt: skip

        return handler

    async def _watch(
        self, request: web.Request, resource: str, name: str | None, since: str | None
    ) -> web.StreamResponse:
        watcher = Watcher(resource, self.namespace, name)
        backlog: list[dict[str, Any]] = []
        if since in (None, "", "0"):
            backlog = [
                {"type": "ADDED", "object": copy.deepcopy(o)}
                for (r, _, n), o in self.objects.items() if r == resource and name in (None, n)
            ]  # fmt: skip
        elif int(since) < self.compacted or self.expire_next_watches > 0:
            self.expire_next_watches = max(0, self.expire_next_watches - 1)
            message = f"too old resource version: {since} ({self.compacted})"
            expired = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "reason": "Expired", "code": 410,
                       "message": message}  # fmt: skip
            backlog = [{"type": "ERROR", "object": expired}]
        else:
            backlog = [
                event for rv, r, event in self.history
                if rv > int(since) and r == resource
                and name in (None, event["object"]["metadata"]["name"])
            ]  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for event in backlog:
            await response.write(json.dumps(event).encode() + b"\n")
        if backlog and backlog[0]["type"] == "ERROR":
            await response.write_eof()
            return response
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        self.watchers.append(watcher)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    change = await watcher.queue.get()
                    if change is None:
                        break
                    await response.write(json.dumps(change).encode() + b"\n")
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.watchers.remove(watcher)
        await response.write_eof()
        return response

    # -- writes -----------------------------------------------------------------------------

    def _patch(self, resource: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            obj = self._find(resource, request)
            if obj is None:
                return self._not_found(resource, request.match_info["name"])
            if self.conflicts > 0:  # someone else wrote just before us
                self.conflicts -= 1
                obj = self.put(resource, obj, event="MODIFIED")
            patched = await self._apply_patch(request, resource, obj)
            if isinstance(patched, web.Response):
                return patched
            patched["status"] = copy.deepcopy(obj.get("status"))  # the status subresource's
            for immutable in ("uid", "creationTimestamp", "name", "namespace", "generation"):
                patched["metadata"][immutable] = obj["metadata"][immutable]
            invalid = _validate(resource, patched)
            if invalid:
                kind = RESOURCES[resource][1]
                group = RESOURCES[resource][0]
                return status(422, "Invalid", f'{kind}.{group} "{obj["metadata"]["name"]}" is '
                              f"invalid: {invalid}")  # fmt: skip
            if patched.get("spec") != obj.get("spec"):
                patched["metadata"]["generation"] += 1
            if patched == obj:
                return _json(obj)  # a no-op patch writes nothing
            stored = self.put(resource, patched, event="MODIFIED")
            if patched.get("spec") != obj.get("spec"):
                self._reconcile_soon(resource, stored["metadata"]["name"])
            return _json(stored)

        return handler

    async def _apply_patch(
        self, request: web.Request, resource: str, obj: dict[str, Any]
    ) -> dict[str, Any] | web.Response:
        kind = request.content_type
        try:
            body = json.loads(await request.text())
        except ValueError:
            return status(400, "BadRequest", "the request body is not JSON")
        try:
            if kind == MERGE:
                patched = merge_patch(obj, body)
            elif kind == JSON_PATCH:
                patched = json_patch(obj, body)
            elif kind == STRATEGIC and resource in BUILT_IN:
                patched = strategic_merge_patch(obj, body)
            else:
                accepted = [JSON_PATCH, MERGE, APPLY] if resource not in BUILT_IN else [
                    JSON_PATCH, MERGE, STRATEGIC, APPLY]  # fmt: skip
                if kind == APPLY:
                    return status(415, "UnsupportedMediaType",
                                  "server-side apply is not modelled by the stand-in")  # fmt: skip
                return status(415, "UnsupportedMediaType",
                              "the body of the request was in an unknown format - accepted "
                              f"media types include: {', '.join(accepted)}")  # fmt: skip
        except BadPatch as exc:
            return status(400, "BadRequest", str(exc))
        except PatchFailed as exc:
            return status(422, "Invalid", str(exc))
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            return status(422, "Invalid", "the patched object has no metadata")
        wanted = patched["metadata"].get("resourceVersion")
        if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:
            name = obj["metadata"]["name"]
            return status(409, "Conflict", f'Operation cannot be fulfilled on '
                          f'{_qualified(resource)} "{name}": the object has been modified; '
                          "please apply your changes to the latest version and try again",
                          name=name, group=RESOURCES[resource][0], kind=resource)  # fmt: skip
        return patched

    def _scale(self, deployment: dict[str, Any]) -> dict[str, Any]:
        meta = deployment["metadata"]
        labels = deployment["spec"]["selector"]["matchLabels"]
        return {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                              "creationTimestamp")},
            "spec": {"replicas": deployment["spec"]["replicas"]},
            "status": {"replicas": deployment["status"].get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))},
        }  # fmt: skip

    async def _get_scale(self, request: web.Request) -> web.Response:
        obj = self._find("deployments", request)
        if obj is None:
            return self._not_found("deployments", request.match_info["name"])
        return _json(self._scale(obj))

    async def _patch_scale(self, request: web.Request) -> web.Response:
        obj = self._find("deployments", request)
        if obj is None:
            return self._not_found("deployments", request.match_info["name"])
        patched = await self._apply_patch(request, "deployments", self._scale(obj))
        if isinstance(patched, web.Response):
            return patched
        replicas = patched.get("spec", {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            return status(422, "Invalid", f'Scale.autoscaling "{obj["metadata"]["name"]}" is '
                          "invalid: spec.replicas: Invalid value: must be greater than or "
                          "equal to 0")  # fmt: skip
        if replicas != obj["spec"]["replicas"]:
            updated = copy.deepcopy(obj)
            updated["spec"]["replicas"] = replicas
            updated["metadata"]["generation"] += 1
            obj = self.put("deployments", updated, event="MODIFIED")
            self._reconcile_soon("deployments", obj["metadata"]["name"])
        return _json(self._scale(obj))

    async def _create_event(self, request: web.Request) -> web.Response:
        try:
            event = json.loads(await request.text())
        except ValueError:
            return status(400, "BadRequest", "the request body is not JSON")
        meta = event.get("metadata", {}) if isinstance(event, dict) else {}
        name = meta.get("name") or (
            f"{meta['generateName']}{uuid.uuid4().hex[:5]}" if meta.get("generateName") else None
        )
        involved = event.get("involvedObject", {})
        problems = []
        if not name:
            problems.append("metadata.name: Required value: name or generateName is required")
        if involved.get("namespace", self.namespace) != meta.get("namespace", self.namespace):
            problems.append(
                "involvedObject.namespace: Invalid value: does not match event.namespace"
            )
        if event.get("type") not in ("Normal", "Warning"):
            problems.append("type: Unsupported value: supported values: Normal, Warning")
        if not event.get("reason") or len(event.get("reason", "")) > 128:
            problems.append("reason: Required value: at most 128 characters")
        if len(event.get("message", "").encode()) > 1024:
            problems.append("message: Too long: must have at most 1024 bytes")
        if problems:
            return status(422, "Invalid", f'Event "{name}" is invalid: {"; ".join(problems)}')
        event.setdefault("metadata", {})["name"] = name
        event["metadata"].pop("generateName", None)
        stored = self.put("events", event)
        return _json(stored, status=201)

    # -- the controller ---------------------------------------------------------------------

    def _reconcile_soon(self, resource: str, name: str) -> None:
        asyncio.get_running_loop().call_soon(self._reconcile_step, resource, name)

    def _reconcile_step(self, resource: str, name: str) -> None:
        """One step of a controller: one more replica up to date; again until converged."""
        obj = copy.deepcopy(self.objects[(resource, self.namespace, name)])
        meta, spec, st = obj["metadata"], obj["spec"], obj.setdefault("status", {})
        if resource == "milvuses":
            updated = st.get("observedGeneration") == meta["generation"]
            st["observedGeneration"] = meta["generation"]
            st["status"] = "Healthy" if updated else "Unhealthy"
            self.put(resource, obj, event="MODIFIED")
            if not updated:
                self._reconcile_soon(resource, name)
            return
        image = spec["template"]["spec"]["containers"][0]["image"]
        wanted = spec["replicas"]
        if self._rolled_out.get(name) != spec["template"]:  # a new ReplicaSet: start over
            self._rolled_out[name] = copy.deepcopy(spec["template"])
            st["updatedReplicas"] = 0
        st["observedGeneration"] = meta["generation"]
        progress = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
        if image in self.deadline_exceeded:
            progress = {"type": "Progressing", "status": "False",
                        "reason": "ProgressDeadlineExceeded"}  # fmt: skip
            st.update(updatedReplicas=1, availableReplicas=max(0, wanted - 1), replicas=wanted)
        elif image in self.never_ready:
            st.update(updatedReplicas=1, availableReplicas=max(0, wanted - 1), replicas=wanted)
        else:
            st["updatedReplicas"] = min(wanted, st.get("updatedReplicas", 0) + 1)
            st.update(availableReplicas=st["updatedReplicas"],
                      readyReplicas=st["updatedReplicas"], replicas=wanted)  # fmt: skip
            if st["updatedReplicas"] == wanted:
                progress["reason"] = "NewReplicaSetAvailable"
        available = st.get("availableReplicas", 0) >= wanted
        st["conditions"] = [
            {"type": "Available", "status": "True" if available else "False"},
            progress,
        ]
        self.put(resource, obj, event="MODIFIED")
        if (
            st["updatedReplicas"] < wanted
            and image not in self.never_ready | self.deadline_exceeded
        ):
            self._reconcile_soon(resource, name)

    def _items(self, resource: str) -> list[dict[str, Any]]:
        stored = [o for (r, _, _), o in self.objects.items() if r == resource]
        if resource != "pods":
            return stored
        # The Deployment's pods, as the scheduler and kubelet would have them (all Running).
        obj = self.get("deployments", DEPLOYMENT)
        labels = obj["spec"]["template"]["metadata"]["labels"]
        derived = [
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{DEPLOYMENT}-{i}", "namespace": self.namespace,
                          "labels": labels, "resourceVersion": obj["metadata"]["resourceVersion"]},
             "status": {"phase": "Running", "podIP": "127.0.0.1"}}
            for i in range(obj["spec"]["replicas"])
        ]  # fmt: skip
        return stored + derived


def _validate(resource: str, obj: dict[str, Any]) -> str | None:
    if resource != "deployments":
        return None
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    containers = pod.get("containers")
    if not isinstance(containers, list) or not containers:
        return "spec.template.spec.containers: Required value"
    names = [c.get("name") for c in containers if isinstance(c, dict)]
    if len(names) != len(set(names)) or not all(names):
        return "spec.template.spec.containers: Duplicate or missing name"
    if not all(isinstance(c, dict) and c.get("image") for c in containers):
        return "spec.template.spec.containers.image: Required value"
    replicas = obj.get("spec", {}).get("replicas")
    if not isinstance(replicas, int) or replicas < 0:
        return "spec.replicas: Invalid value"
    return None


def _label_selector(text: str) -> list[tuple[str, str, str]]:
    """Equality-based selectors (``a=b``, ``a==b``, ``a!=b``, comma-separated)."""
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        for op in ("!=", "==", "="):
            if op in term:
                key, _, value = term.partition(op)
                terms.append((key.strip(), op, value.strip()))
                break
        else:
            raise ValueError(f"set-based label selectors are not modelled: {term!r}")
    return terms


def _matches(obj: dict[str, Any], terms: list[tuple[str, str, str]]) -> bool:
    labels = obj.get("metadata", {}).get("labels", {})
    return all((labels.get(k) == v) == (op != "!=") for k, op, v in terms)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@contextlib.asynccontextmanager
async def serve(api: FakeKubeApi, cert: str, key: str) -> AsyncIterator[str]:
    """Run ``api`` on 127.0.0.1 over HTTPS; yields its URL (``https://localhost:PORT``)."""
    runner = web.AppRunner(api.app(), shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_context(cert, key))
        await site.start()
        yield f"https://localhost:{runner.addresses[0][1]}"
    finally:
        await api.stop()
        await runner.cleanup()
