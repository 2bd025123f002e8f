"""A real systemd as PID 1, in a systemd-nspawn container, for the tests of the EC2 host path.

systemd is not PID 1 on the machines the tests run on, but it can be inside ``systemd-nspawn``
(/work/shared/recipes/systemd-nspawn.sh was the reference):

- **build**: a minimal Debian bookworm root file system made with ``mmdebstrap`` from the Debian
  mirror apt already uses, with systemd, D-Bus, polkit, Python 3.11, make and sudo. Kept as a
  directory in :data:`CACHE` (outside the repository), named after everything that goes into
  it, so it is built once (25-50 s) and rebuilt only when the package list changes;
- **boot**: ``systemd-nspawn -b --volatile=overlay --register=no --keep-unit``: the cached tree
  is the read-only lower layer of an overlay whose writable layer is a tmpfs, so every session
  starts from the same clean system and the cache is never modified (machinectl needs the
  host's systemd, which does not run here). Without ``--private-network`` the container shares
  the host's network, so the agent inside reaches a stub control plane on the host's loopback;
- **run**: ``nsenter -t <container PID 1> -a`` with a clean environment (the host's does not
  leak in), as root or, through ``runuser``, as another user;
- **stop**: ``systemctl poweroff``, then SIGKILL if that does not end it; what the session
  wrote goes with the tmpfs. Also when a test fails (a session fixture's finalizer), and when
  the test process dies (nspawn gets SIGTERM from ``PR_SET_PDEATHSIG`` and powers off).

Enforced inside (what the tests rely on): the unit sandboxing directives (ProtectSystem,
ProtectHome, NoNewPrivileges, CapabilityBoundingSet, SystemCallFilter, ...), polkit rules,
Type=notify and the watchdog. Not enforced in this VM (no cgroup controllers): MemoryMax,
TasksMax, CPUQuota.

The harness changes nothing on the host but :data:`CACHE` (and the empty directories nspawn
leaves under /run/systemd/nspawn, which it removes); its tools come from Debian packages that
``.ci/run`` installs (mmdebstrap, systemd-container). Where they or root are missing, the tests
skip with the reason; under ``CI=true`` that is a failure instead (:func:`unavailable`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn

from tests import ci

CACHE: Final = Path(os.environ.get("BYOC_NSPAWN_CACHE", "/var/cache/byoc-agent-tests"))
SUITE: Final = "bookworm"
PACKAGES: Final = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "polkitd",
    "procps",
    "python3",
    "python3-venv",
    "make",
    "sudo",
)
ROOTFS_VERSION: Final = 1
"""Bump to rebuild every cached root file system (a change of how it is made)."""
PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PR_SET_PDEATHSIG: Final = 1


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail under ``CI=true``: ``.ci/run`` provides everything these tests need."""
    ci.unavailable(f"systemd-nspawn harness unavailable: {reason}")


def check_host() -> None:
    """Skip (fail in CI) with the precise reason when a container cannot run here."""
    if os.geteuid() != 0:
        unavailable("systemd-nspawn needs root")
    for tool, package in (
        ("mmdebstrap", "mmdebstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (apt-get install {package}; .ci/run does)")
    if not Path("/proc/self/ns/pid").exists():
        unavailable("no PID namespaces on this kernel")


def debian_mirror() -> str:
    """The Debian mirror that apt on this machine uses (deb822 ``URIs:`` or sources.list)."""
    pattern = re.compile(r"^\s*(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?(?:\s|$)", re.M)
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in [*sources, Path("/etc/apt/sources.list")]:
        with contextlib.suppress(OSError):
            match = pattern.search(path.read_text())
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """An exclusive lock in :data:`CACHE`, so that two sessions never build the same thing."""
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o755)
    with (CACHE / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class Timing:
    """Seconds each harness step took, for the report (and the closing note of issue 10)."""

    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = round(time.monotonic() - started, 2)


def rootfs(timing: Timing) -> Path:
    """The cached root file system (a directory), built first if it is not there yet."""
    mirror = debian_mirror()
    key = hashlib.sha256(repr((ROOTFS_VERSION, SUITE, PACKAGES, mirror)).encode()).hexdigest()[:16]
    tree = CACHE / f"rootfs-{SUITE}-{key}"
    with cache_lock("rootfs"):
        if (tree / "usr").is_dir() and (CACHE / f"{tree.name}.complete").exists():
            timing.steps["rootfs build"] = 0.0
            return tree
        shutil.rmtree(tree, ignore_errors=True)
        with timing.step("rootfs build"):
            done = subprocess.run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    "--format=directory",
                    '--customize-hook=echo byoc-ec2 > "$1/etc/hostname"',
                    SUITE,
                    str(tree),
                    f"deb {mirror} {SUITE} main",
                    f"deb {mirror} {SUITE}-updates main",
                    f"deb {mirror}-security {SUITE}-security main",
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
            )
        if done.returncode != 0:
            shutil.rmtree(tree, ignore_errors=True)
            raise RuntimeError(f"mmdebstrap failed:\n{done.stderr[-3000:]}")
        (CACHE / f"{tree.name}.complete").write_text("")
        return tree


def _die_with_parent() -> None:
    """In the nspawn child: SIGTERM when the test process dies (nspawn then powers off)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Machine:
    """A booted container: run commands in it, read and write its files, stop it."""

    def __init__(self, name: str, nspawn: subprocess.Popen[bytes], leader: int) -> None:
        self.name = name
        self.nspawn = nspawn
        self.leader = leader
        """PID (in the host's namespace) of the container's PID 1, systemd."""

    def path(self, inside: str | Path) -> Path:
        """The host path of a path inside the container, as the container sees it (its own
        /proc, /tmp, /run: through ``/proc/<PID 1>/root``)."""
        return Path(f"/proc/{self.leader}/root") / str(inside).lstrip("/")

    def run(
        self,
        *argv: str,
        user: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str = "/",
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the container (as root, or as ``user``) with a clean environment."""
        environment = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})}
        command = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", "-C", cwd]
        command += [f"{k}={v}" for k, v in environment.items()]
        if user is not None:
            command += ["runuser", "-u", user, "--"]
        done = subprocess.run(
            [*command, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"in the container: {' '.join(argv)} exited {done.returncode}\n"
                f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
            )
        return done

    def sh(self, script: str, *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a shell script (``bash -euo pipefail``) as root in the container."""
        return self.run("bash", "-euo", "pipefail", "-c", script, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def stop(self, timeout: float = 30.0) -> None:
        """Power the container off (SIGKILL if it does not end in time)."""
        if self.nspawn.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout)
        nspawn_run = Path("/run/systemd/nspawn")
        if nspawn_run.is_dir():  # nspawn leaves empty directories behind
            for entry in [*nspawn_run.iterdir(), nspawn_run]:
                with contextlib.suppress(OSError):
                    entry.rmdir()


def boot(name: str, timing: Timing, *, ready_timeout: float = 60.0) -> Machine:
    """Boot the cached root file system under a fresh writable layer."""
    check_host()
    tree = rootfs(timing)
    log = CACHE / f"{name}.log"
    with timing.step("boot"), log.open("wb") as out:
        nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                f"--machine={name}",
                f"--directory={tree}",
                "--volatile=overlay",
                "--boot",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
            preexec_fn=_die_with_parent,  # noqa: PLW1509  # prctl only, before exec
            start_new_session=True,
        )
        machine: Machine | None = None
        try:
            machine = Machine(name, nspawn, _find_leader(nspawn, ready_timeout))
            _wait_booted(machine, ready_timeout)
        except BaseException as exc:
            if machine is None:
                nspawn.kill()
                nspawn.wait(30)
            else:
                machine.stop()
            if isinstance(exc, RuntimeError):  # this machine cannot boot a container
                said = log.read_text(errors="replace").strip().splitlines()[-5:]
                unavailable(f"{exc}; systemd-nspawn said: {' | '.join(said) or 'nothing'}")
            raise
    log.unlink(missing_ok=True)
    return machine


def _find_leader(nspawn: subprocess.Popen[bytes], timeout: float) -> int:
    """The container's PID 1 (systemd), a child of the nspawn process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {nspawn.returncode} while booting")
        for task in Path(f"/proc/{nspawn.pid}/task").glob("*/children"):
            for child in task.read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
        time.sleep(0.02)  # polling /proc: nothing else says when the child has exec'd
    raise RuntimeError(f"no systemd in the container after {timeout:g}s")


def _wait_booted(machine: Machine, timeout: float) -> None:
    """``systemctl is-system-running --wait`` blocks until boot is finished; before systemd
    listens on its private socket it fails at once, so it is tried until the deadline."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        done = machine.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
        state = done.stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the container did not finish booting in {timeout:g}s (state {state!r})")


__all__ = ["CACHE", "Machine", "Timing", "boot", "check_host", "unavailable"]
