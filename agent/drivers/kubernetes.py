"""The ``kubernetes`` driver: the agent as a sidecar in EKS, driving the workload through the
Kubernetes API with its pod's service account.

In-cluster configuration: ``KUBERNETES_SERVICE_HOST``/``_PORT``, the service account's token,
CA and namespace under ``/var/run/secrets/kubernetes.io/serviceaccount/`` (each overridable in
``[driver.kubernetes]``; the token is re-read for every request, since Kubernetes rotates it).
HTTPS with httpx, verified against that CA.

- ``scale``: a merge patch of the ``/scale`` subresource of the Deployment or StatefulSet; or,
  for a Milvus custom resource (``milvus.io/v1beta1``, kind ``Milvus``), of
  ``spec.components.<component>.replicas``.
- ``upgrade``: set the container's image to ``<image>:<version>`` with the object's
  ``resourceVersion`` as a precondition (a 409 Conflict is read again and retried), then wait
  for the rollout (``observedGeneration``, updated and available replicas) until
  ``rollout_timeout``; a rollout that does not complete is undone (the previous image, the same
  way) and reported ``rollout_failed_rolled_back``. Milvus: ``spec.components.image``.
- ``collect_metrics``: scrape ``http://<pod IP>:<metrics_port><metrics_path>`` of the running
  pods selected by the workload's label selector.

Settings::

    kind = "Deployment"           # or "StatefulSet", "Milvus"
    name = "milvus-querynode"
    container = "querynode"       # Deployment/StatefulSet: the container whose image changes
    image = "milvusdb/milvus"     # upgrade to V sets "<image>:V"
    component = "queryNode"       # Milvus only
    metrics_port = 9091
    metrics_path = "/metrics"
    rollout_timeout = 300.0
    poll_interval = 2.0
    api_url, token_file, ca_file, namespace   # in-cluster defaults
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from agent.core.errors import ConfigError, DriverError
from agent.core.toml_tables import Table
from agent.drivers import metrics
from agent.drivers.base import DriverEnvironment, ExecContext
from agent.io.tls import verify_context

SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
KINDS: Final = {"Deployment": "deployments", "StatefulSet": "statefulsets", "Milvus": "milvuses"}
TARGETS: Final = ("workload", "host")
MERGE_PATCH: Final = "application/merge-patch+json"
CONFLICT_RETRIES: Final = 5


@dataclass(frozen=True)
class KubernetesSettings:
    kind: str
    name: str
    image: str
    namespace: str
    api_url: str
    token_file: Path
    ca_file: Path
    container: str | None = None
    component: str | None = None
    metrics_port: int = 9091
    metrics_path: str = "/metrics"
    rollout_timeout: float = 300.0
    poll_interval: float = 2.0

    @classmethod
    def from_table(cls, settings: Mapping[str, object]) -> KubernetesSettings:
        t = Table(
            "driver.kubernetes",
            dict(settings),
            {
                "kind", "name", "container", "image", "component", "metrics_port",
                "metrics_path", "rollout_timeout", "poll_interval", "api_url", "token_file",
                "ca_file", "namespace",
            },
            ConfigError,
        )  # fmt: skip
        kind = t.string("kind", "Deployment")
        if kind not in KINDS:
            raise ConfigError(f"driver.kubernetes.kind must be one of {sorted(KINDS)}")
        container = t.optional_string("container")
        component = t.optional_string("component")
        if kind == "Milvus" and not component:
            raise ConfigError("driver.kubernetes.component is required for kind Milvus")
        if kind != "Milvus" and not container:
            raise ConfigError(f"driver.kubernetes.container is required for kind {kind}")
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
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
            kind=kind,
            name=t.string("name"),
            image=t.string("image"),
            namespace=namespace,
            api_url=api_url.rstrip("/"),
            token_file=Path(t.string("token_file", str(SERVICE_ACCOUNT / "token"))),
            ca_file=Path(t.string("ca_file", str(SERVICE_ACCOUNT / "ca.crt"))),
            container=container,
            component=component,
            metrics_port=t.integer("metrics_port", 9091, low=1, high=65535),
            metrics_path=t.string("metrics_path", "/metrics"),
            rollout_timeout=t.number("rollout_timeout", 300.0, low=1.0, high=86_400.0),
            poll_interval=t.number("poll_interval", 2.0, low=0.01, high=300.0),
        )


class KubernetesDriver:
    kind = "kubernetes"

    def __init__(self, settings: Mapping[str, object], env: DriverEnvironment) -> None:
        self.settings = KubernetesSettings.from_table(settings)
        self._env = env
        self._client: httpx.AsyncClient | None = None
        self._scraper = httpx.AsyncClient(timeout=5.0, trust_env=False)
        self._described: dict[str, object] = {}

    async def start(self) -> None:
        metrics.start_cpu_measurement()
        try:
            context = verify_context(self.settings.ca_file)  # TLS >= 1.2, AEAD only
        except ConfigError as exc:
            raise DriverError("kubernetes_unreachable", f"cannot set up the client: {exc}") from exc
        self._client = httpx.AsyncClient(
            base_url=self.settings.api_url, verify=context, timeout=15.0, trust_env=False
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        await self._scraper.aclose()

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "object": f"{self.settings.kind}/{self.settings.name}",
                **self._described}  # fmt: skip

    # -- API plumbing ---------------------------------------------------------------------

    @property
    def _path(self) -> str:
        s = self.settings
        group = "apis/milvus.io/v1beta1" if s.kind == "Milvus" else "apis/apps/v1"
        return f"/{group}/namespaces/{s.namespace}/{KINDS[s.kind]}/{s.name}"

    async def _request(
        self, method: str, path: str, *, body: object = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        assert self._client is not None  # noqa: S101  # start() made it
        try:
            token = self.settings.token_file.read_text().strip()  # rotated by the kubelet
        except OSError as exc:
            raise DriverError("kubernetes_unreachable", f"no service account token: {exc}") from exc
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = MERGE_PATCH
        try:
            response = await self._client.request(
                method, path, json=body, params=params, headers=headers
            )
        except httpx.HTTPError as exc:
            raise DriverError("kubernetes_unreachable", f"{method} {path}: {exc}") from exc
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code == httpx.codes.CONFLICT:
            raise _Conflict(str(payload.get("message", "conflict")))
        if response.status_code == httpx.codes.FORBIDDEN:
            raise DriverError(
                "forbidden",
                f"{method} {path}: {payload.get('message', 'forbidden')} "
                "(the agent's Role does not allow it)",
            )
        if response.status_code == httpx.codes.NOT_FOUND:
            raise DriverError("not_found", f"{method} {path}: {payload.get('message', '')}")
        if response.is_error or not isinstance(payload, dict):
            raise DriverError(
                "kubernetes_error",
                f"{method} {path}: HTTP {response.status_code} {payload.get('message', '')}",
            )
        return payload

    # -- commands -------------------------------------------------------------------------

    async def scale(self, replicas: int, ctx: ExecContext) -> dict[str, object]:
        s = self.settings
        if s.kind == "Milvus":
            current = await self._request("GET", self._path)
            previous = _milvus_component(current, s.component).get("replicas")
            ctx.audit("workload_scaling", object=self._object(), replicas=replicas)
            patch = {"spec": {"components": {s.component: {"replicas": replicas}}}}
            await self._request("PATCH", self._path, body=patch)
        else:
            current = await self._request("GET", self._path + "/scale")
            previous = current.get("spec", {}).get("replicas")
            ctx.audit("workload_scaling", object=self._object(), replicas=replicas)
            await self._request(
                "PATCH", self._path + "/scale", body={"spec": {"replicas": replicas}}
            )
        self._described["replicas"] = replicas
        return {"replicas": replicas, "previous_replicas": previous}

    async def upgrade(self, version: str, ctx: ExecContext) -> dict[str, object]:
        image = f"{self.settings.image}:{version}"
        previous = await self._set_image(image, ctx, reason="upgrade")
        if previous == image:
            return {"version": version, "image": image, "changed": False}
        try:
            await self._wait_rollout()
        except _RolloutStuck as stuck:
            ctx.audit("rollback_started", object=self._object(), image=previous, why=str(stuck))
            await self._set_image(previous, ctx, reason="rollback")
            try:
                await self._wait_rollout()
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
            for pod in await self._pods():
                name = str(pod.get("metadata", {}).get("name"))
                ip = pod.get("status", {}).get("podIP")
                if not ip:
                    continue
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

    async def _set_image(self, image: str, ctx: ExecContext, *, reason: str) -> str:
        """Set the image (resourceVersion precondition, retried on conflict); returns the
        image it replaced."""
        s = self.settings
        for _ in range(CONFLICT_RETRIES):
            current = await self._request("GET", self._path)
            previous = _current_image(current, s)
            if previous == image:
                return previous
            version = current.get("metadata", {}).get("resourceVersion")
            if s.kind == "Milvus":
                spec: dict[str, object] = {"components": {"image": image}}
            else:
                spec = {
                    "template": {"spec": {"containers": [{"name": s.container, "image": image}]}}
                }
            patch = {"metadata": {"resourceVersion": version}, "spec": spec}
            ctx.audit("image_setting", object=self._object(), image=image, reason=reason)
            try:
                await self._request("PATCH", self._path, body=patch)
            except _Conflict:
                ctx.log.info("kubernetes_conflict_retry", object=self._object())
                continue
            return previous
        raise DriverError("conflict", f"{self._object()} kept changing under us; gave up")

    async def _wait_rollout(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.rollout_timeout
        last = "no status yet"
        while loop.time() < deadline:
            current = await self._request("GET", self._path)
            done, last = _rollout_done(current, self.settings.kind)
            if done:
                return
            await asyncio.sleep(self.settings.poll_interval)
        raise _RolloutStuck(
            f"rollout not complete after {self.settings.rollout_timeout:g}s: {last}"
        )

    async def _pods(self) -> list[dict[str, Any]]:
        s = self.settings
        if s.kind == "Milvus":
            selector = f"app.kubernetes.io/instance={s.name}"
        else:
            found = await self._request("GET", self._path)
            labels = found.get("spec", {}).get("selector", {}).get("matchLabels", {})
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        answer = await self._request(
            "GET", f"/api/v1/namespaces/{s.namespace}/pods", params={"labelSelector": selector}
        )
        pods = answer.get("items", [])
        return [p for p in pods if p.get("status", {}).get("phase") == "Running"]


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


def _rollout_done(obj: Mapping[str, Any], kind: str) -> tuple[bool, str]:
    """Like ``kubectl rollout status``: the controller saw the change and every replica is
    updated and available."""
    status = obj.get("status", {})
    if kind == "Milvus":
        ready = status.get("status") == "Healthy"
        return ready, f"Milvus status {status.get('status')!r}"
    generation = obj.get("metadata", {}).get("generation", 0)
    wanted = obj.get("spec", {}).get("replicas", 1)
    observed = status.get("observedGeneration", 0)
    updated = status.get("updatedReplicas", 0)
    available = status.get("availableReplicas", status.get("readyReplicas", 0))
    done = observed >= generation and updated == wanted and available == wanted
    return done, f"{updated}/{wanted} updated, {available} available"


__all__ = ["KubernetesDriver", "KubernetesSettings"]
