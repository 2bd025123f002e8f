"""The ``kubernetes`` driver: the agent in EKS (its own Deployment, or a sidecar), driving the
workload through the Kubernetes API with its pod's service account.

The API is reached with lightkube (async, typed models, the patch types, watches; README
"Dependencies"), configured for the pod: ``KUBERNETES_SERVICE_HOST``/``_PORT``, the service
account's token, CA and namespace under ``/var/run/secrets/kubernetes.io/serviceaccount/``
(each overridable in ``[driver.kubernetes]``). TLS is the agent's own context (>= 1.2, AEAD
only) verified against that CA. The token is the projected one the kubelet rewrites about
hourly: it is read from the file, and read again whenever the API server answers 401, so a
rotated token is picked up without a restart (lightkube's ``BearerTokenFileAuth``, as
client-go does).

- ``scale``: a merge patch of the ``/scale`` subresource of the Deployment or StatefulSet (the
  Scale object has no lists, so merge and strategic merge are the same there); or, for a Milvus
  custom resource (``milvus.io/v1beta1``, kind ``Milvus``), a merge patch of
  ``spec.components.<component>.replicas`` (custom resources take no strategic merge patch).
- ``upgrade``: a *strategic merge patch* of the one container, by name, with the object's
  ``resourceVersion`` as a precondition (a 409 Conflict is read again and retried). Not a JSON
  merge patch: RFC 7386 replaces a list whole, so a one-item ``containers`` list would delete
  every other container of the pod, the agent's own sidecar included. Then the rollout is
  watched (from the patch's ``resourceVersion``: ``observedGeneration``, updated and available
  replicas, ``Progressing``) until ``rollout_timeout``; one that does not complete, or whose
  deadline the controller reports exceeded, is undone the same way and reported
  ``rollout_failed_rolled_back``. Milvus: a merge patch of ``spec.components.image``, watched
  until the resource is ``Healthy`` for its new generation.
- ``collect_metrics``: scrape ``http://<pod IP>:<metrics_port><metrics_path>`` of the running
  pods selected by the workload's label selector.

Requests, for the Role (deploy/kubernetes/*/role.yaml): get and patch the workload and its
``/scale``; watch it with a ``metadata.name`` field selector (so ``resourceNames`` applies);
list pods (by label: no ``resourceNames`` possible); create Events about the agent's own pod
(:class:`PodEvents`, used while enrolling).

Settings::

    kind = "Deployment"           # or "StatefulSet", "Milvus"
    name = "milvus-querynode"
    container = "querynode"       # Deployment/StatefulSet: the container whose image changes
    image = "milvusdb/milvus"     # upgrade to V sets "<image>:V"
    component = "queryNode"       # Milvus only
    metrics_port = 9091
    metrics_path = "/metrics"
    rollout_timeout = 300.0
    api_url, token_file, ca_file, namespace   # in-cluster defaults
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment, StatefulSet
from lightkube.resources.core_v1 import Event, Pod
from lightkube.types import OnErrorAction, OnErrorResult, PatchType

from agent.core.errors import ConfigError, DriverError
from agent.core.toml_tables import Table
from agent.drivers import metrics
from agent.drivers.base import DriverEnvironment, ExecContext
from agent.io.tls import verify_context

SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TARGETS: Final = ("workload", "host")
CONFLICT_RETRIES: Final = 5
API_TIMEOUT: Final = 15.0
Milvus = create_namespaced_resource("milvus.io", "v1beta1", "Milvus", "milvuses")
KINDS: Final[Mapping[str, Any]] = {"Deployment": Deployment, "StatefulSet": StatefulSet,
                                   "Milvus": Milvus}  # fmt: skip


@dataclass(frozen=True)
class ApiSettings:
    """Where the API server is and who we are to it (the pod's service account)."""

    api_url: str
    token_file: Path
    ca_file: Path
    namespace: str

    @classmethod
    def from_table(cls, t: Table) -> ApiSettings:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        default_url = (
            f"https://{f'[{host}]' if host and ':' in host else host}:{port}" if host else ""
        )
        api_url = t.string("api_url", default_url)
        if not api_url.startswith("https://"):
            raise ConfigError(
                "driver.kubernetes.api_url must be https:// (or run in a pod: "
                "KUBERNETES_SERVICE_HOST)"
            )
        namespace = t.optional_string("namespace")
        if namespace is None:
            try:
                namespace = (SERVICE_ACCOUNT / "namespace").read_text().strip()
            except OSError as exc:
                raise ConfigError("driver.kubernetes.namespace: not set and not in a pod") from exc
        return cls(
            api_url=api_url.rstrip("/"),
            token_file=Path(t.string("token_file", str(SERVICE_ACCOUNT / "token"))),
            ca_file=Path(t.string("ca_file", str(SERVICE_ACCOUNT / "ca.crt"))),
            namespace=namespace,
        )

    def client(self) -> AsyncClient:
        """A lightkube client: our TLS context, the token file re-read on a 401, no proxy or
        kubeconfig from the environment."""
        try:
            context = verify_context(self.ca_file)  # TLS >= 1.2, AEAD only
        except ConfigError as exc:
            raise DriverError("kubernetes_unreachable", f"cannot set up the client: {exc}") from exc
        config = KubeConfig.from_one(
            cluster=Cluster(server=self.api_url, certificate_auth=str(self.ca_file)),
            user=User(token_file=str(self.token_file)),
            namespace=self.namespace,
        )
        return AsyncClient(
            config,
            namespace=self.namespace,
            timeout=httpx2.Timeout(API_TIMEOUT),
            lazy=False,
            trust_env=False,
            field_manager="byoc-agent",
            transport=httpx2.AsyncHTTPTransport(verify=context, trust_env=False),
        )


TABLE_KEYS: Final = {
    "kind", "name", "container", "image", "component", "metrics_port", "metrics_path",
    "rollout_timeout", "api_url", "token_file", "ca_file", "namespace",
}  # fmt: skip


@dataclass(frozen=True)
class KubernetesSettings:
    kind: str
    name: str
    image: str
    api: ApiSettings
    container: str | None = None
    component: str | None = None
    metrics_port: int = 9091
    metrics_path: str = "/metrics"
    rollout_timeout: float = 300.0

    @property
    def namespace(self) -> str:
        return self.api.namespace

    @classmethod
    def from_table(cls, settings: Mapping[str, object]) -> KubernetesSettings:
        t = Table("driver.kubernetes", dict(settings), TABLE_KEYS, ConfigError)
        kind = t.string("kind", "Deployment")
        if kind not in KINDS:
            raise ConfigError(f"driver.kubernetes.kind must be one of {sorted(KINDS)}")
        container = t.optional_string("container")
        component = t.optional_string("component")
        if kind == "Milvus" and not component:
            raise ConfigError("driver.kubernetes.component is required for kind Milvus")
        if kind != "Milvus" and not container:
            raise ConfigError(f"driver.kubernetes.container is required for kind {kind}")
        return cls(
            kind=kind,
            name=t.string("name"),
            image=t.string("image"),
            api=ApiSettings.from_table(t),
            container=container,
            component=component,
            metrics_port=t.integer("metrics_port", 9091, low=1, high=65535),
            metrics_path=t.string("metrics_path", "/metrics"),
            rollout_timeout=t.number("rollout_timeout", 300.0, low=0.01, high=86_400.0),
        )


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """lightkube's and httpx2's errors as the driver's codes (docs/PROTOCOL.md)."""
    try:
        yield
    except ApiError as exc:
        code, message = exc.status.code, exc.status.message or exc.status.reason or ""
        if code == 409:
            raise _Conflict(message) from exc
        if code == 403:
            raise DriverError(
                "forbidden", f"{what}: {message} (the agent's Role does not allow it)"
            ) from exc
        if code == 404:
            raise DriverError("not_found", f"{what}: {message}") from exc
        raise DriverError("kubernetes_error", f"{what}: HTTP {code} {message}") from exc
    except LightkubeConfigError as exc:  # the token file is gone
        raise DriverError("kubernetes_unreachable", f"{what}: {exc}") from exc
    except httpx2.HTTPStatusError as exc:  # an answer that is not a Status object
        code = exc.response.status_code
        raise DriverError("kubernetes_error", f"{what}: HTTP {code}") from exc
    except httpx2.HTTPError as exc:
        raise DriverError("kubernetes_unreachable", f"{what}: {exc!r}") from exc


class KubernetesDriver:
    kind = "kubernetes"

    def __init__(self, settings: Mapping[str, object], env: DriverEnvironment) -> None:
        self.settings = KubernetesSettings.from_table(settings)
        self._env = env
        self._client: AsyncClient | None = None
        self._scraper = httpx.AsyncClient(timeout=5.0, trust_env=False)
        self._described: dict[str, object] = {}

    async def start(self) -> None:
        metrics.start_cpu_measurement()
        self._client = self.settings.api.client()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        await self._scraper.aclose()

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "object": f"{self.settings.kind}/{self.settings.name}",
                **self._described}  # fmt: skip

    @property
    def _api(self) -> AsyncClient:
        if self._client is None:
            raise DriverError("kubernetes_unreachable", "the driver was not started")
        return self._client

    @property
    def _resource(self) -> Any:
        return KINDS[self.settings.kind]

    async def _read(self) -> dict[str, Any]:
        with api_errors(f"get {self._object()}"):
            found = await self._api.get(self._resource, self.settings.name)
        return dict(found.to_dict())

    async def _patch(
        self, body: dict[str, Any], patch_type: PatchType, *, scale: bool = False
    ) -> dict[str, Any]:
        res = self._resource.Scale if scale else self._resource
        with api_errors(f"patch {self._object()}{'/scale' if scale else ''}"):
            done = await self._api.patch(res, self.settings.name, body, patch_type=patch_type)
        return dict(done.to_dict())

    # -- commands -------------------------------------------------------------------------

    async def scale(self, replicas: int, ctx: ExecContext) -> dict[str, object]:
        s = self.settings
        if s.kind == "Milvus":
            current = await self._read()
            previous = _milvus_component(current, s.component).get("replicas")
            await ctx.audit("workload_scaling", object=self._object(), replicas=replicas)
            patch = {"spec": {"components": {s.component: {"replicas": replicas}}}}
            await self._patch(patch, PatchType.MERGE)
        else:
            with api_errors(f"get {self._object()}/scale"):
                scale = await self._api.get(self._resource.Scale, s.name)
            previous = scale.spec.replicas if scale.spec is not None else None
            await ctx.audit("workload_scaling", object=self._object(), replicas=replicas)
            await self._patch({"spec": {"replicas": replicas}}, PatchType.MERGE, scale=True)
        self._described["replicas"] = replicas
        return {"replicas": replicas, "previous_replicas": previous}

    async def upgrade(self, version: str, ctx: ExecContext) -> dict[str, object]:
        image = f"{self.settings.image}:{version}"
        previous, since = await self._set_image(image, ctx, reason="upgrade")
        if previous == image:
            return {"version": version, "image": image, "changed": False}
        try:
            await self._wait_rollout(since)
        except _RolloutStuck as stuck:
            await ctx.audit(
                "rollback_started", object=self._object(), image=previous, why=str(stuck)
            )
            _, since = await self._set_image(previous, ctx, reason="rollback")
            try:
                await self._wait_rollout(since)
            except _RolloutStuck as again:
                raise DriverError(
                    "rollback_failed", f"{again}; back on {previous} but not ready"
                ) from again
            raise DriverError(
                "rollout_failed_rolled_back",
                f"{image}: {stuck}; back on {previous}",
                result={"rolled_back": True, "image": previous},
            ) from stuck
        self._described["image"] = image
        return {"version": version, "image": image, "previous_image": previous, "changed": True}

    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise DriverError("unknown_target", f"{', '.join(unknown)} (known: {TARGETS})")
        samples: list[metrics.Sample] = []
        errors: list[dict[str, object]] = []
        if "workload" in targets:
            for name, ip in await self._pods():
                host = f"[{ip}]" if ":" in ip else ip
                url = f"http://{host}:{self.settings.metrics_port}{self.settings.metrics_path}"
                try:
                    samples.extend(
                        await metrics.scrape(
                            self._scraper, url, target="workload", extra_labels={"pod": name}
                        )
                    )
                except DriverError as exc:
                    errors.append({"pod": name, "code": exc.code, "error": exc.detail})
        if "host" in targets:
            samples.extend(await asyncio.to_thread(metrics.host_metrics, self._env.state_dir))
        return {"samples": [s.to_json() for s in samples], "errors": errors}

    # -- helpers --------------------------------------------------------------------------

    def _object(self) -> str:
        return f"{self.settings.kind}/{self.settings.namespace}/{self.settings.name}"

    async def _set_image(self, image: str, ctx: ExecContext, *, reason: str) -> tuple[str, str]:
        """Set the image (resourceVersion precondition, retried on conflict); returns the image
        it replaced and the resourceVersion the change was written at."""
        s = self.settings
        for _ in range(CONFLICT_RETRIES):
            current = await self._read()
            previous = _current_image(current, s)
            version = str(current.get("metadata", {}).get("resourceVersion", ""))
            if previous == image:
                return previous, version
            if s.kind == "Milvus":
                patch_type = PatchType.MERGE  # a custom resource: no strategic merge
                spec: dict[str, object] = {"components": {"image": image}}
            else:
                patch_type = PatchType.STRATEGIC  # containers merge by name: others untouched
                spec = {
                    "template": {"spec": {"containers": [{"name": s.container, "image": image}]}}
                }
            patch = {"metadata": {"resourceVersion": version}, "spec": spec}
            await ctx.audit("image_setting", object=self._object(), image=image, reason=reason)
            try:
                done = await self._patch(patch, patch_type)
            except _Conflict:
                ctx.log.info("kubernetes_conflict_retry", object=self._object())
                continue
            return previous, str(done.get("metadata", {}).get("resourceVersion", ""))
        raise DriverError("conflict", f"{self._object()} kept changing under us; gave up")

    async def _wait_rollout(self, since: str) -> None:
        """Watch the object from ``since`` until the rollout is done, failed, or out of time."""
        last = "no status yet"
        try:
            async with (
                asyncio.timeout(self.settings.rollout_timeout),
                contextlib.aclosing(self._watch(since)) as events,
            ):
                async for obj in events:
                    done, failed, last = _rollout_state(obj, self.settings.kind)
                    if failed:
                        raise _RolloutStuck(last)
                    if done:
                        return
        except TimeoutError:
            pass
        raise _RolloutStuck(
            f"rollout not complete after {self.settings.rollout_timeout:g}s: {last}"
        )

    async def _watch(self, since: str) -> AsyncGenerator[dict[str, Any], None]:
        watch = self._api.watch(
            self._resource,
            fields={"metadata.name": self.settings.name},
            resource_version=since or None,
            on_error=_retry_expired,
        )
        with api_errors(f"watch {self._object()}"):
            async with contextlib.aclosing(watch) as changes:  # type: ignore[type-var]
                async for kind, obj in changes:
                    if kind == "DELETED":
                        raise DriverError("not_found", f"{self._object()} was deleted")
                    yield dict(obj.to_dict())

    async def _pods(self) -> list[tuple[str, str]]:
        s = self.settings
        if s.kind == "Milvus":
            labels: dict[str, Any] = {"app.kubernetes.io/instance": s.name}
        else:
            found = await self._read()
            labels = dict(found.get("spec", {}).get("selector", {}).get("matchLabels", {}))
        running: list[tuple[str, str]] = []
        with api_errors(f"list pods of {self._object()}"):
            async for pod in self._api.list(Pod, namespace=s.namespace, labels=labels):
                name = pod.metadata.name if pod.metadata is not None else None
                phase = pod.status.phase if pod.status is not None else None
                ip = pod.status.podIP if pod.status is not None else None
                if name and ip and phase == "Running":
                    running.append((name, ip))
        return running


def _retry_expired(exc: Exception, count: int) -> OnErrorResult:
    """Watch errors: a 410 Expired (our resourceVersion was compacted away) restarts the watch
    from the current state, a few times; anything else is raised."""
    if isinstance(exc, ApiError) and exc.status.code == 410 and count <= 3:
        return OnErrorResult(OnErrorAction.RETRY)
    return OnErrorResult(OnErrorAction.RAISE)


class _Conflict(Exception):
    pass


class _RolloutStuck(Exception):
    pass


def _milvus_component(obj: Mapping[str, Any], component: str | None) -> dict[str, Any]:
    return dict(obj.get("spec", {}).get("components", {}).get(component or "", {}))


def _current_image(obj: Mapping[str, Any], s: KubernetesSettings) -> str:
    if s.kind == "Milvus":
        return str(obj.get("spec", {}).get("components", {}).get("image", ""))
    containers = obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    for container in containers:
        if container.get("name") == s.container:
            return str(container.get("image", ""))
    raise DriverError("not_found", f"no container {s.container!r} in {s.kind}/{s.name}")


def _rollout_state(obj: Mapping[str, Any], kind: str) -> tuple[bool, bool, str]:
    """(done, failed, why), like ``kubectl rollout status``: the controller saw this generation,
    every replica is updated and available and no old one is left; failed when the controller
    reports the progress deadline exceeded."""
    status = obj.get("status") or {}
    generation = obj.get("metadata", {}).get("generation", 0)
    observed = status.get("observedGeneration", 0)
    if kind == "Milvus":
        healthy = status.get("status") == "Healthy" and observed >= generation
        return healthy, False, f"Milvus status {status.get('status')!r}"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == (
            "ProgressDeadlineExceeded"
        ):
            return False, True, "the controller reports ProgressDeadlineExceeded"
    wanted = obj.get("spec", {}).get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    done = (
        observed >= generation and updated == wanted and total == updated and available == updated
    )
    return done, False, f"{updated}/{wanted} updated, {available} available"


# -- Events about the agent's own pod ------------------------------------------------------


@dataclass(frozen=True)
class PodRef:
    """The agent's pod, from the downward API (``POD_NAME``, ``POD_NAMESPACE``, ``POD_UID``)."""

    name: str
    namespace: str
    uid: str | None = None

    @classmethod
    def from_environment(cls) -> PodRef | None:
        name, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
        if not name or not namespace:
            return None
        return cls(name=name, namespace=namespace, uid=os.environ.get("POD_UID") or None)


class PodEvents:
    """Posts core/v1 Events about the agent's own pod, which ``kubectl describe pod`` and
    ``kubectl get events`` show: how the agent says what is wrong before it has a tunnel (or a
    control socket anyone can reach without ``kubectl exec``). Needs ``create`` on ``events``
    in the pod's namespace. Best effort: a failure to post is returned, never raised."""

    def __init__(self, api: ApiSettings, pod: PodRef) -> None:
        self._api = api
        self._pod = pod
        self._client: AsyncClient | None = None

    async def post(self, *, warning: bool, reason: str, message: str) -> str | None:
        """Post one Event; returns None, or why it could not be posted."""
        now = datetime.now(UTC).replace(microsecond=0)
        event = Event(
            metadata=ObjectMeta(generateName=f"{self._pod.name}.", namespace=self._pod.namespace),
            involvedObject=ObjectReference(
                apiVersion="v1",
                kind="Pod",
                name=self._pod.name,
                namespace=self._pod.namespace,
                uid=self._pod.uid,
                fieldPath="spec.containers{byoc-agent}",
            ),
            reason=reason,
            message=message[:1000],
            type="Warning" if warning else "Normal",
            source=EventSource(component="byoc-agent"),
            reportingComponent="byoc-agent",
            reportingInstance=self._pod.name,
            firstTimestamp=now,
            lastTimestamp=now,
            count=1,
        )
        try:
            if self._client is None:
                self._client = self._api.client()
            with api_errors(f"create an Event about pod {self._pod.name}"):
                await self._client.create(event)
        except DriverError as exc:
            return exc.detail
        return None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


__all__ = ["ApiSettings", "KubernetesDriver", "KubernetesSettings", "PodEvents", "PodRef"]
