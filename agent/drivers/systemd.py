"""The ``systemd`` driver: the workload as instances of a templated unit on an EC2 host.

Replica ``i`` is the unit ``unit.format(index=i)`` (e.g. ``milvus-querynode@0.service``),
listening on ``base_port + i``. The driver changes the host only through systemd's D-Bus API
(agent/drivers/systemd_bus.py: each start, stop or restart waits for systemd's job to finish,
and polkit decides what the agent's user may do) and the releases directory:

- ``scale``: start new instances (each must become healthy) or stop the highest ones.
  Instances are not enabled: the agent is what keeps them at the count it was given (its state
  file), and starts any that are down when it starts, e.g. after a reboot, and stops any above
  the count (left by a scale the agent did not finish). So the agent needs only
  start/stop/restart on these units (the polkit rule in systemd/ec2/), not the right to change
  unit files;
- ``upgrade``: download the release's artifact with httpx from an allow-listed URL (no
  redirects, size-capped), verify its SHA-256 (pinned in this configuration) and, when
  ``signing_key`` is set, its detached Ed25519 signature (``<url>.sig``, base64), unpack it
  into ``releases_dir/<version>`` (tar, ``data`` filter: no links out, no devices), switch the
  ``current`` symlink atomically, then restart the instances one by one, each health-checked;
  an unhealthy one switches ``current`` back and restarts the instances already moved
  (``unhealthy_rolled_back``). The upgrade in progress (from, to, which instances may have
  moved) is in the state file before ``current`` changes, so an agent killed half way through
  finds it at its next start and goes back to the previous release (its command is reported
  ``interrupted``): one consistent version, and the audit log says what happened;
- ``collect_metrics``: scrape each instance's metrics URL, and host metrics.

Settings (``[driver.systemd]``)::

    unit = "milvus-querynode@{index}.service"
    releases_dir = "/opt/milvus/releases"
    current = "/opt/milvus/current"
    allowed_urls = ["https://artifacts.vendor.example/milvus/"]   # URL prefixes
    base_port = 19530
    health_url = "http://127.0.0.1:{port}/healthz"
    metrics_url = "http://127.0.0.1:{port}/metrics"
    start_timeout = 60.0              # seconds an instance has to become healthy
    job_timeout = 120.0               # seconds systemd has to finish a start/stop/restart
    max_artifact_bytes = 2147483648
    signing_key = "/etc/byoc-agent/keys/artifacts.pub"          # optional (Ed25519, PEM)
    bus = "unix:path=/run/dbus/system_bus_socket"               # optional: the system bus
    [driver.systemd.releases."2.0.0"]
    url = "https://artifacts.vendor.example/milvus/2.0.0.tar.gz"
    sha256 = "..."

The replica count (and an upgrade in progress) is kept in ``<state_dir>/systemd-driver.json``;
the version is where ``current`` points. Every action is audited before it is taken.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from agent.drivers.base import AuditSink, DriverEnvironment, ExecContext
from agent.drivers.systemd_bus import SystemdBus
from agent.io.files import write_atomic

STATE_FILE: Final = "systemd-driver.json"
TARGETS: Final = ("workload", "host")
_HTTP_TIMEOUT: Final = 5.0


@dataclass(frozen=True)
class Release:
    url: str
    sha256: str


@dataclass(frozen=True)
class SystemdSettings:
    unit: str
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
    job_timeout: float = 120.0
    bus: str | None = None

    @classmethod
    def from_table(cls, settings: Mapping[str, object]) -> SystemdSettings:
        t = Table(
            "driver.systemd",
            dict(settings),
            {
                "unit", "releases_dir", "current", "allowed_urls", "releases",
                "base_port", "health_url", "metrics_url", "start_timeout", "job_timeout",
                "health_poll_interval", "max_artifact_bytes", "signing_key", "bus",
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
            job_timeout=t.number("job_timeout", 120.0, low=0.1, high=3600.0),
            bus=t.optional_string("bus"),
        )


@dataclass
class _Upgrade:
    """An upgrade in progress, as the state file keeps it: ``moved`` are the instances that
    may already run ``to`` (each is added before its restart)."""

    previous: str | None
    to: str
    moved: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"from": self.previous, "to": self.to, "moved": self.moved}


def extract_release(archive: tarfile.TarFile, dest: Path) -> None:
    """Unpack with tarfile's ``data`` filter: regular files, directories and links that stay
    inside ``dest``; no devices, no setuid bits, no group/other write. Python before 3.11.4
    (Debian 12 ships 3.11.2) has no filters, so there the same rules are applied here."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(dest, filter="data")
    else:
        _extract_checked(archive, dest)
    # The workload runs as another user (DynamicUser=) and the agent's umask is 0077: a release
    # is readable by everyone, writable by the agent only, executable where the archive says.
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            executable = path.is_dir() or path.stat().st_mode & 0o100
            path.chmod(0o755 if executable else 0o644)


def _extract_checked(archive: tarfile.TarFile, dest: Path) -> None:
    root = dest.resolve()
    members = []
    for member in archive.getmembers():
        member.name = member.name.lstrip("/")  # as the data filter does
        path = (root / member.name).resolve()
        target = (path.parent / member.linkname).resolve() if member.issym() else None
        if member.islnk():
            target = (root / member.linkname).resolve()
        inside = path == root or root in path.parents
        if (
            not (member.isfile() or member.isdir() or member.issym() or member.islnk())
            or not inside
            or (
                target is not None
                and (Path(member.linkname).is_absolute() or root not in target.parents)
            )
        ):
            raise tarfile.TarError(f"{member.name!r} is not allowed in a release (data filter)")
        member.mode &= 0o755
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        members.append(member)
    archive.extractall(dest, members=members)  # noqa: S202  # checked above


class SystemdDriver:
    kind = "systemd"

    def __init__(self, settings: Mapping[str, object], env: DriverEnvironment) -> None:
        self.settings = SystemdSettings.from_table(settings)
        self._env = env
        self._state_path = env.state_dir / STATE_FILE
        self._replicas = 0
        self._upgrade: _Upgrade | None = None
        self._lock = asyncio.Lock()
        self._client = httpx.AsyncClient(timeout=_HTTP_TIMEOUT, trust_env=False)
        self._systemd: SystemdBus | None = None
        prefix, _, suffix = self.settings.unit.partition("{index}")
        self._instance = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the state file, finish what a killed agent left half done (an upgrade: back
        to the previous release; instances above the count: stopped), and start any instance
        that is down (e.g. after a reboot)."""
        metrics.start_cpu_measurement()
        try:
            state = json.loads(self._state_path.read_text())
            self._replicas = int(state["replicas"])
            upgrade = state.get("upgrade")
            if upgrade is not None:
                self._upgrade = _Upgrade(
                    upgrade["from"], str(upgrade["to"]), [int(i) for i in upgrade["moved"]]
                )
        except FileNotFoundError:
            self._replicas = 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DriverError("state_unreadable", f"{self._state_path}: {exc}") from exc
        await self._bus()
        if self._upgrade is not None:
            await self._recover_upgrade(self._upgrade)
        pattern = self.settings.unit.replace("{index}", "*")
        for unit in await (await self._bus()).units_matching(pattern, ["active", "activating"]):
            match = self._instance.fullmatch(unit)
            if match and int(match.group(1)) >= self._replicas:
                await self._env.audit("unit_stopping", unit=unit, reason="above the replica count")
                await self._job("stop", int(match.group(1)))
        for index in range(self._replicas):
            if await (await self._bus()).active_state(self._unit(index)) != "active":
                await self._env.audit("unit_starting", unit=self._unit(index), reason="reconcile")
                await self._job("start", index)

    async def close(self) -> None:
        await self._client.aclose()  # the units keep running: systemd owns them
        if self._systemd is not None:
            self._systemd.close()
            self._systemd = None

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
                await ctx.audit("unit_starting", unit=self._unit(index), port=self._port(index))
                started.append(index)
                problem = await self._start_healthy(index, "start")
                if problem is not None:
                    for undo in reversed(started):
                        await ctx.audit(
                            "unit_stopping", unit=self._unit(undo), reason="scale undone"
                        )
                        await self._job("stop", undo)
                    raise DriverError(
                        "unhealthy",
                        f"{self._unit(index)}: {problem}; scale-up undone",
                        result={"replicas": previous},
                    )
            for index in reversed(range(replicas, previous)):
                await ctx.audit("unit_stopping", unit=self._unit(index), reason="scale down")
                await self._job("stop", index)
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
            self._upgrade = _Upgrade(previous, version)
            self._persist()  # before `current` moves: a killed agent finds it at its next start
            await self._switch(target, ctx.audit, reason="upgrade")
            for index in range(self._replicas):
                await ctx.audit("unit_restarting", unit=self._unit(index), version=version)
                self._upgrade.moved.append(index)
                self._persist()
                try:
                    problem = await self._start_healthy(index, "restart")
                except DriverError:
                    # systemd refused or went away: go back as far as it lets us now; what is
                    # left stays in the state file, and the next start finishes going back.
                    with contextlib.suppress(DriverError):
                        await self._roll_back(previous, self._upgrade.moved, ctx.audit)
                        self._upgrade = None
                        self._persist()
                    raise
                if problem is not None:
                    await self._roll_back(previous, self._upgrade.moved, ctx.audit)
                    self._upgrade = None
                    self._persist()
                    raise DriverError(
                        "unhealthy_rolled_back",
                        f"{self._unit(index)} {problem} on {version}; back on {previous}",
                        result={"rolled_back": True, "version": previous, "failed_replica": index},
                    )
            self._upgrade = None
            self._persist()
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
        await ctx.audit("artifact_downloading", version=version, url=release.url)
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
            await ctx.audit("artifact_verified", version=version, sha256=digest)
            unpacked = Path(tmp) / "release"
            try:
                with tarfile.open(artifact) as archive:
                    extract_release(archive, unpacked)
            except (tarfile.TarError, OSError) as exc:
                raise DriverError("bad_artifact", f"{release.url}: {exc}") from exc
            await ctx.audit("release_installing", version=version, path=str(target))
            os.replace(unpacked, target)

    async def _download(self, url: str, path: Path) -> str:
        digest = hashlib.sha256()
        size = 0
        try:
            async with self._client.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect or 300 <= response.status_code < 400:
                    raise DriverError(
                        "redirect_refused",
                        f"{url}: HTTP {response.status_code} redirect; redirects are never "
                        "followed (point the release URL at the artifact itself)",
                    )
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

    async def _switch(self, target: Path, audit: AuditSink, *, reason: str) -> None:
        await audit("release_switching", to=target.name, previous=self.version, reason=reason)
        link = self.settings.current
        temporary = link.with_name(f".{link.name}.new")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, link)  # atomic: readers see the old or the new release

    async def _roll_back(self, previous: str | None, moved: list[int], audit: AuditSink) -> None:
        await audit("rollback_started", to=previous, units=[self._unit(i) for i in moved])
        if previous is None:
            raise DriverError("rollback_failed", "there was no previous release to go back to")
        await self._switch(self.settings.releases_dir / previous, audit, reason="rollback")
        for index in moved:
            await audit("unit_restarting", unit=self._unit(index), version=previous)
            problem = await self._start_healthy(index, "restart")
            if problem is not None:
                raise DriverError(
                    "rollback_failed",
                    f"{self._unit(index)} {problem} on {previous} too",
                    result={"version": previous, "failed_replica": index},
                )

    async def _recover_upgrade(self, upgrade: _Upgrade) -> None:
        """The agent stopped half way through an upgrade (killed, or the host rebooted): its
        command is reported interrupted, so go back to where it started."""
        audit = self._env.audit
        await audit(
            "upgrade_interrupted",
            previous=upgrade.previous,
            to=upgrade.to,
            units=[self._unit(i) for i in upgrade.moved],
        )
        try:
            if upgrade.previous is not None:  # else the first release: nothing to go back to
                await self._roll_back(upgrade.previous, upgrade.moved, audit)
        except DriverError as exc:
            # Keep going: the agent must come up to report; the control plane sees the state.
            await audit("upgrade_recovery_failed", code=exc.code, detail=exc.detail)
            self._env.log.error("upgrade_recovery_failed", code=exc.code, detail=exc.detail)
        else:
            await audit("upgrade_recovered", version=self.version)
        self._upgrade = None
        self._persist()

    # -- helpers --------------------------------------------------------------------------

    def _unit(self, index: int) -> str:
        return self.settings.unit.format(index=index)

    def _port(self, index: int) -> int:
        return self.settings.base_port + index

    async def _bus(self) -> SystemdBus:
        """The D-Bus connection to systemd, made again if it dropped (systemd re-executed)."""
        if self._systemd is None or not self._systemd.connected:
            self._systemd = await SystemdBus.connect(
                self.settings.bus, job_timeout=self.settings.job_timeout
            )
        return self._systemd

    async def _job(self, verb: str, index: int) -> None:
        await (await self._bus()).run_job(verb, self._unit(index))

    async def _start_healthy(self, index: int, verb: str) -> str | None:
        """Start or restart instance ``index``; None once healthy, else what went wrong."""
        try:
            await self._job(verb, index)
        except DriverError as exc:
            if exc.code in ("access_denied", "systemd_unreachable"):
                raise
            return f"did not {verb} ({exc.code}: {exc.detail})"
        if not await self._healthy(index):
            return f"was not healthy within {self.settings.start_timeout:g}s"
        return None

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
        state: dict[str, object] = {"replicas": self._replicas}
        if self._upgrade is not None:
            state["upgrade"] = self._upgrade.to_json()
        write_atomic(self._state_path, json.dumps(state).encode())


__all__ = ["SystemdDriver", "SystemdSettings"]
