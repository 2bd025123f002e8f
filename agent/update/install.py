"""Releases side by side: ``<root>/releases/<version>/`` (a virtual environment each) and the
``<root>/current`` link that the unit runs, plus the steps that fill a release directory.

Installing never touches the running release: the wheels are unpacked into the update's work
directory, a new venv is made at ``releases/<version>`` with the host's Python (a venv cannot
be moved, so it is made where it will live) and pip installs the bundle's requirement from the
wheels alone (``--no-index``, no configuration file, no cache). The marker file
``.byoc-release.json`` is written last: a directory without it is an install that did not
finish, and is removed. ``make install`` puts its own release (root's) next to them; the agent
never removes one it does not own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from agent.update import guard
from agent.update.bundle import wheel_member
from agent.update.errors import BundleRejected, UpdateError

MARKER: Final = ".byoc-release.json"
OUTPUT_TAIL: Final = 1500
"""Characters of a failed subprocess's output kept in the command's detail."""


@dataclass(frozen=True)
class Finished:
    """A program that ran to its end."""

    returncode: int
    out: str
    err: str

    def said(self) -> str:
        return (self.err or self.out).strip()[-OUTPUT_TAIL:]


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def current(self) -> Path:
        return self.root / "current"

    def release(self, version: str) -> Path:
        return self.releases / version

    def current_version(self) -> str | None:
        return guard.current_version(self.root)

    def switch(self, version: str) -> None:
        try:
            guard.switch_current(self.root, version)
        except (OSError, guard.JournalError) as exc:
            raise UpdateError(
                "switch_failed", f"cannot point {self.current} at {version}: {exc}"
            ) from exc

    def installed(self, version: str) -> Mapping[str, object] | None:
        """The marker of a finished install by the agent, or None."""
        try:
            marker = json.loads((self.release(version) / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None

    def remove(self, version: str) -> bool:
        """Remove a release the agent installed (never the current one, never root's)."""
        path = self.release(version)
        if version == self.current_version() or not path.is_dir() or path.is_symlink():
            return False
        if path.stat().st_uid != os.geteuid():
            return False
        shutil.rmtree(path, ignore_errors=True)
        return not path.exists()

    def prune(self, keep: set[str]) -> list[str]:
        """Remove the agent's releases other than ``keep`` and the current one (unfinished
        installs included); returns the versions removed."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.releases.iterdir()):
                if (
                    path.name not in keep
                    and guard.VERSION.fullmatch(path.name)
                    and self.remove(path.name)
                ):
                    removed.append(path.name)
        return removed


def unpack_wheels(bundle: Path, offset: int, size: int, dest: Path) -> list[str]:
    """Write the payload's wheels into ``dest`` (a new directory); each member is checked
    before it is written, and nothing but ``wheels/<name>.whl`` regular files is accepted."""
    dest.mkdir(mode=0o700)
    names: list[str] = []
    try:
        with bundle.open("rb") as raw:
            raw.seek(offset)
            with tarfile.open(fileobj=raw, mode="r|") as archive:
                for member in archive:
                    name = wheel_member(
                        member.name,
                        regular=member.isreg(),
                        size=member.size,
                        count=len(names),
                        limit=size,
                    )
                    source = archive.extractfile(member)
                    if source is None:  # pragma: no cover - isreg() was checked
                        raise BundleRejected("malformed_bundle", f"{member.name}: no data")
                    _copy(source, dest / name, member.size)
                    names.append(name)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleRejected(
            "malformed_bundle", f"the payload is not a tar archive: {exc}"
        ) from exc
    if not names:
        raise BundleRejected("malformed_bundle", "the payload holds no wheels")
    return names


def _copy(source: IO[bytes], target: Path, size: int) -> None:
    with target.open("xb") as out:
        shutil.copyfileobj(source, out)
        if out.tell() != size:
            raise BundleRejected("malformed_bundle", f"{target.name}: truncated")


def base_python() -> Path:
    """The host's interpreter that the running venv was made from (``/usr/bin/python3.11``)."""
    import sys  # noqa: PLC0415  # only here: the interpreter the agent runs on

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return Path(sys.base_prefix) / "bin" / version


def clean_environment(home: Path) -> dict[str, str]:
    """For pip and the self-test: no inherited pip configuration, index or proxy settings."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


async def run_program(
    argv: list[str], *, env: Mapping[str, str], limit: float, code: str, check: bool = True
) -> Finished:
    """Run ``argv`` to its end; UpdateError(``code``) with the end of its output if it does not
    finish within ``timeout``, or exits non-zero and ``check`` is set.
    Files it makes are readable by all (umask 022: a release is no secret, and the workload's
    own user may run programs from it); the agent's own umask is 077."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        umask=0o022,
    )
    try:
        async with asyncio.timeout(limit):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise UpdateError(code, f"{Path(argv[0]).name} did not finish in {limit:g}s") from None
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    finished = Finished(
        process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and finished.returncode != 0:
        raise UpdateError(
            code, f"{' '.join(argv[:3])} exited {finished.returncode}: {finished.said()}"
        )
    return finished


async def install_release(
    target: Path,
    *,
    python: Path,
    wheels: Path,
    requirement: str,
    env: Mapping[str, str],
    limit: float,
) -> None:
    """A venv at ``target`` with ``requirement`` installed from ``wheels`` only."""
    await run_program(
        [str(python), "-m", "venv", str(target)], env=env, limit=limit, code="install_failed"
    )
    await run_program(
        [
            str(target / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-cache-dir",
            "--find-links",
            str(wheels),
            requirement,
        ],
        env=env,
        limit=limit,
        code="install_failed",
    )


def write_marker(target: Path, marker: Mapping[str, object]) -> None:
    """The release is complete: written last, atomically."""
    guard.write_json(target / MARKER, dict(marker), 0o644)
