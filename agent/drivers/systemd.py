"""The ``systemd`` driver: the workload as instances of a templated unit on an EC2 host.

Replica ``i`` is the unit ``unit.format(index=i)`` (e.g. ``milvus-querynode@0.service``),
listening on ``base_port + i``. The driver changes the host only through ``systemctl`` and the
releases directory:

- ``scale``: ``systemctl start`` new instances (each must become healthy) or ``systemctl stop``
  the highest ones. Instances are not ``enable``d: the agent is what keeps them at the count it
  was given (its state file), and starts any that are down when it starts, e.g. after a
  reboot. So the agent needs only start/stop/restart on these units (the polkit rule in
  systemd/ec2/), not the right to change unit files;
- ``upgrade``: download the release's artifact with httpx from an allow-listed URL (no
  redirects, size-capped), verify its SHA-256 (pinned in this configuration) and, when
  ``signing_key`` is set, its detached Ed25519 signature (``<url>.sig``, base64), unpack it
  into ``releases_dir/<version>`` (tar, ``data`` filter: no links out, no devices), switch the
  ``current`` symlink atomically, then ``systemctl restart`` the instances one by one, each
  health-checked; an unhealthy one switches ``current`` back and restarts the instances already
  moved (``unhealthy_rolled_back``);
- ``collect_metrics``: scrape each instance's metrics URL, and host metrics.

Settings (``[driver.systemd]``)::

    unit = "milvus-querynode@{index}.service"
    systemctl = "/usr/bin/systemctl"
    releases_dir = "/opt/milvus/releases"
    current = "/opt/milvus/current"
    allowed_urls = ["https://artifacts.vendor.example/milvus/"]   # URL prefixes
    base_port = 19530
    health_url = "http://127.0.0.1:{port}/healthz"
    metrics_url = "http://127.0.0.1:{port}/metrics"
    start_timeout = 60.0
    max_artifact_bytes = 2147483648
    signing_key = "/etc/byoc-agent/keys/artifacts.pub"          # optional (Ed25519, PEM)
    [driver.systemd.releases."2.0.0"]
    url = "https://artifacts.vendor.example/milvus/2.0.0.tar.gz"
    sha256 = "..."

The replica count is kept in ``<state_dir>/systemd-driver.json``; the version is where
``current`` points. Every action is audited before it is taken.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.core.commands import MAX_REPLICAS, VERSION_PATTERN
from agent.core.errors import ConfigError, DriverError
from agent.core.toml_tables import Table
from agent.drivers import metrics
from agent.drivers.base import DriverEnvironment, ExecContext
from agent.io.files import write_atomic

STATE_FILE: Final = "systemd-driver.json"
TARGETS: Final = ("workload", "host")
_HTTP_TIMEOUT: Final = 5.0
_SYSTEMCTL_TIMEOUT: Final = 120.0


@dataclass(frozen=True)
class Release:
    url: str
    sha256: str


@dataclass(frozen=True)
class SystemdSettings:
    unit: str
    systemctl: str
    releases_dir: Path
    current: Path
    allowed_urls: tuple[str, ...]
    releases: Mapping[str, Release]
    base_port: int = 19530
    health_url: str = "http://127.0.0.1:{port}/healthz"
    metrics_url: str = "http://127.0.0.1:{port}/metrics"
    start_timeout: float = 60.0
    health_poll_interval: float = 0.2
    max_artifact_bytes: int = 2 * 1024**3
    signing_key: Path | None = None

    @classmethod
    def from_table(cls, settings: Mapping[str, object]) -> SystemdSettings:
        t = Table(
            "driver.systemd",
            dict(settings),
            {
                "unit", "systemctl", "releases_dir", "current", "allowed_urls", "releases",
                "base_port", "health_url", "metrics_url", "start_timeout",
                "health_poll_interval", "max_artifact_bytes", "signing_key",
            },
            ConfigError,
        )  # fmt: skip
        unit = t.string("unit")
        if "{index}" not in unit or not unit.endswith(".service"):
            raise ConfigError("driver.systemd.unit must be a template like 'name@{index}.service'")
        allowed = t.strings("allowed_urls")
        if not allowed or not all(u.startswith(("https://", "http://")) for u in allowed):
            raise ConfigError("driver.systemd.allowed_urls must list http(s) URL prefixes")
        releases: dict[str, Release] = {}
        for version, spec in t.mapping("releases").items():
            if not VERSION_PATTERN.fullmatch(version):
                raise ConfigError(f"driver.systemd.releases: {version!r} is not a version")
            r = Table(f"driver.systemd.releases.{version}", spec, {"url", "sha256"}, ConfigError)
            digest = r.string("sha256").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"driver.systemd.releases.{version}.sha256 must be 64 hex")
            releases[version] = Release(url=r.string("url"), sha256=digest)
        key = t.optional_string("signing_key")
        return cls(
            unit=unit,
            systemctl=t.string("systemctl", "systemctl"),
            releases_dir=Path(t.string("releases_dir")),
            current=Path(t.string("current")),
            allowed_urls=tuple(allowed),
            releases=releases,
            base_port=t.integer("base_port", 19530, low=1, high=65535 - MAX_REPLICAS),
            health_url=t.string("health_url", "http://127.0.0.1:{port}/healthz"),
            metrics_url=t.string("metrics_url", "http://127.0.0.1:{port}/metrics"),
            start_timeout=t.number("start_timeout", 60.0, low=0.1, high=3600.0),
            health_poll_interval=t.number("health_poll_interval", 0.2, low=0.01, high=60.0),
            max_artifact_bytes=t.integer(
                "max_artifact_bytes", 2 * 1024**3, low=1, high=64 * 1024**3
            ),
            signing_key=Path(key) if key else None,
        )


class SystemdDriver:
    kind = "systemd"

    def __init__(self, settings: Mapping[str, object], env: DriverEnvironment) -> None:
        self.settings = SystemdSettings.from_table(settings)
        self._env = env
        self._state_path = env.state_dir / STATE_FILE
        self._replicas = 0
        self._lock = asyncio.Lock()
        self._client = httpx.AsyncClient(timeout=_HTTP_TIMEOUT, trust_env=False)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the replica count and start any instance that is down (e.g. after a reboot)."""
        metrics.start_cpu_measurement()
        try:
            self._replicas = int(json.loads(self._state_path.read_text())["replicas"])
        except FileNotFoundError:
            self._replicas = 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DriverError("state_unreadable", f"{self._state_path}: {exc}") from exc
        for index in range(self._replicas):
            if not await self._active(index):
                self._env.audit("unit_starting", unit=self._unit(index), reason="reconcile")
                await self._systemctl("start", self._unit(index))

    async def close(self) -> None:
        await self._client.aclose()  # the units keep running: systemd owns them

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "replicas": self._replicas, "version": self.version}

    @property
    def version(self) -> str | None:
        try:
            return Path(os.readlink(self.settings.current)).name
        except OSError:
            return None

    # -- commands -------------------------------------------------------------------------

    async def scale(self, replicas: int, ctx: ExecContext) -> dict[str, object]:
        async with self._lock:
            previous = self._replicas
            started: list[int] = []
            for index in range(previous, replicas):
                ctx.audit("unit_starting", unit=self._unit(index), port=self._port(index))
                await self._systemctl("start", self._unit(index))
                started.append(index)
                if not await self._healthy(index):
                    for undo in reversed(started):
                        ctx.audit("unit_stopping", unit=self._unit(undo), reason="scale undone")
                        await self._systemctl("stop", self._unit(undo))
                    raise DriverError(
                        "unhealthy",
                        f"{self._unit(index)} did not become healthy in "
                        f"{self.settings.start_timeout:g}s; scale-up undone",
                        result={"replicas": previous},
                    )
            for index in reversed(range(replicas, previous)):
                ctx.audit("unit_stopping", unit=self._unit(index), reason="scale down")
                await self._systemctl("stop", self._unit(index))
            self._replicas = replicas
            self._persist()
        return {"replicas": replicas, "previous_replicas": previous, "version": self.version}

    async def upgrade(self, version: str, ctx: ExecContext) -> dict[str, object]:
        release = self.settings.releases.get(version)
        if release is None:
            raise DriverError("unknown_version", f"no release {version!r} is configured")
        async with self._lock:
            previous = self.version
            if previous == version:
                return {"version": version, "previous_version": previous, "changed": False}
            target = self.settings.releases_dir / version
            if not target.is_dir():
                await self._install(version, release, target, ctx)
            self._switch(target, ctx, reason="upgrade")
            moved: list[int] = []
            for index in range(self._replicas):
                ctx.audit("unit_restarting", unit=self._unit(index), version=version)
                await self._systemctl("restart", self._unit(index))
                moved.append(index)
                if not await self._healthy(index):
                    await self._roll_back(previous, moved, ctx)
                    raise DriverError(
                        "unhealthy_rolled_back",
                        f"{self._unit(index)} was unhealthy on {version}; back on {previous}",
                        result={"rolled_back": True, "version": previous, "failed_replica": index},
                    )
        return {
            "version": version,
            "previous_version": previous,
            "replicas": self._replicas,
            "changed": True,
        }

    async def collect_metrics(self, targets: Sequence[str], ctx: ExecContext) -> dict[str, object]:
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise DriverError("unknown_target", f"{', '.join(unknown)} (known: {TARGETS})")
        samples: list[metrics.Sample] = []
        errors: list[dict[str, object]] = []
        if "workload" in targets:
            for index in range(self._replicas):
                url = self.settings.metrics_url.format(port=self._port(index))
                labels = {"replica": str(index), "unit": self._unit(index)}
                try:
                    samples.extend(
                        await metrics.scrape(
                            self._client, url, target="workload", extra_labels=labels
                        )
                    )
                except DriverError as exc:
                    errors.append({"replica": index, "code": exc.code, "error": exc.detail})
        if "host" in targets:
            samples.extend(await asyncio.to_thread(metrics.host_metrics, self._env.state_dir))
        return {
            "samples": [s.to_json() for s in samples],
            "errors": errors,
            "replicas": self._replicas,
            "version": self.version,
        }

    # -- releases -------------------------------------------------------------------------

    async def _install(
        self, version: str, release: Release, target: Path, ctx: ExecContext
    ) -> None:
        if not any(release.url.startswith(prefix) for prefix in self.settings.allowed_urls):
            raise DriverError("url_not_allowed", f"{release.url} is not under allowed_urls")
        self.settings.releases_dir.mkdir(parents=True, exist_ok=True)
        ctx.audit("artifact_downloading", version=version, url=release.url)
        with tempfile.TemporaryDirectory(dir=self.settings.releases_dir, prefix=".get-") as tmp:
            artifact = Path(tmp) / "artifact"
            digest = await self._download(release.url, artifact)
            if digest != release.sha256:
                raise DriverError(
                    "checksum_mismatch",
                    f"{release.url}: SHA-256 {digest}, expected {release.sha256}",
                )
            if self.settings.signing_key is not None:
                await self._check_signature(release.url, artifact)
            ctx.audit("artifact_verified", version=version, sha256=digest)
            unpacked = Path(tmp) / "release"
            try:
                with tarfile.open(artifact) as archive:
                    archive.extractall(unpacked, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise DriverError("bad_artifact", f"{release.url}: {exc}") from exc
            ctx.audit("release_installing", version=version, path=str(target))
            os.replace(unpacked, target)

    async def _download(self, url: str, path: Path) -> str:
        digest = hashlib.sha256()
        size = 0
        try:
            async with self._client.stream("GET", url, follow_redirects=False) as response:
                if response.status_code != httpx.codes.OK:
                    raise DriverError("download_failed", f"{url}: HTTP {response.status_code}")
                with path.open("wb") as out:
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.settings.max_artifact_bytes:
                            raise DriverError("artifact_too_large", f"{url}: over the size cap")
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.HTTPError as exc:
            raise DriverError("download_failed", f"{url}: {type(exc).__name__}: {exc}") from exc
        return digest.hexdigest()

    async def _check_signature(self, url: str, artifact: Path) -> None:
        assert self.settings.signing_key is not None  # noqa: S101  # the caller checked
        try:
            key = load_pem_public_key(self.settings.signing_key.read_bytes())
            response = await self._client.get(url + ".sig", follow_redirects=False)
            signature = base64.b64decode(response.text.strip(), validate=True)
        except (OSError, ValueError, binascii.Error, httpx.HTTPError) as exc:
            raise DriverError("signature_invalid", f"{url}.sig: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey) or response.status_code != httpx.codes.OK:
            raise DriverError("signature_invalid", f"{url}.sig: no Ed25519 signature to check")
        data = await asyncio.to_thread(artifact.read_bytes)
        try:
            key.verify(signature, data)
        except InvalidSignature as exc:
            raise DriverError("signature_invalid", f"{url}: it does not verify") from exc

    def _switch(self, target: Path, ctx: ExecContext, *, reason: str) -> None:
        ctx.audit("release_switching", to=target.name, previous=self.version, reason=reason)
        link = self.settings.current
        temporary = link.with_name(f".{link.name}.new")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, link)  # atomic: readers see the old or the new release

    async def _roll_back(self, previous: str | None, moved: list[int], ctx: ExecContext) -> None:
        ctx.audit("rollback_started", to=previous, units=[self._unit(i) for i in moved])
        if previous is None:
            raise DriverError("rollback_failed", "there was no previous release to go back to")
        self._switch(self.settings.releases_dir / previous, ctx, reason="rollback")
        for index in moved:
            ctx.audit("unit_restarting", unit=self._unit(index), version=previous)
            await self._systemctl("restart", self._unit(index))
            if not await self._healthy(index):
                raise DriverError(
                    "rollback_failed",
                    f"{self._unit(index)} is unhealthy on {previous} too",
                    result={"version": previous, "failed_replica": index},
                )

    # -- helpers --------------------------------------------------------------------------

    def _unit(self, index: int) -> str:
        return self.settings.unit.format(index=index)

    def _port(self, index: int) -> int:
        return self.settings.base_port + index

    async def _systemctl(self, *args: str) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                self.settings.systemctl,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(_SYSTEMCTL_TIMEOUT):
                out, _ = await process.communicate()
        except (OSError, TimeoutError) as exc:
            raise DriverError("systemctl_failed", f"systemctl {' '.join(args)}: {exc}") from exc
        if process.returncode != 0:
            text = out.decode(errors="replace").strip()[-300:]
            raise DriverError(
                "systemctl_failed", f"systemctl {' '.join(args)}: exit {process.returncode}: {text}"
            )

    async def _active(self, index: int) -> bool:
        try:
            await self._systemctl("is-active", "--quiet", self._unit(index))
        except DriverError:
            return False
        return True

    async def _healthy(self, index: int) -> bool:
        url = self.settings.health_url.format(port=self._port(index))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout
        while loop.time() < deadline:
            try:
                if (await self._client.get(url)).status_code == httpx.codes.OK:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(self.settings.health_poll_interval)
        return False

    def _persist(self) -> None:
        write_atomic(self._state_path, json.dumps({"replicas": self._replicas}).encode())


__all__ = ["SystemdDriver", "SystemdSettings"]
