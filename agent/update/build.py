"""``make bundle``: build and sign an agent release bundle from this tree.

    python -m agent.update.build --version 0.1.1 --key release.key [--out dist] \\
        [--source .] [--wheels DIR]

1. the tree is copied with ``agent/__init__.py``'s ``__version__`` set to ``--version`` (the
   package's version comes from it), and its wheel built (``pip wheel``, isolated build);
2. the wheels of its dependencies (``[project] dependencies`` and the ``fast`` extra), pinned by
   ``constraints.txt``, binary only, for the interpreter and platform running this (the target
   host's: Python 3.11 on x86_64 Linux for the reference hosts);
3. all of them go into the payload, a tar of ``wheels/<name>.whl``, and the header is signed
   with the release key (``byoc-certs release-key DIR`` makes one): agent/update/bundle.py.

pip's own settings apply (``PIP_INDEX_URL``, a mirror); ``--wheels DIR`` builds offline from
the wheels in DIR instead. Prints the bundle's path, size and SHA-256: what an ``update_agent``
command names.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.core.commands import VERSION_PATTERN
from agent.update.bundle import MAX_WHEELS, make_header

SOURCES: Final = ("agent", "control_plane_stub", "certs", "byoc_demo")
FILES: Final = ("pyproject.toml", "setup.py", "README.md", "constraints.txt")
RELEASE_VERSION: Final = re.compile(
    r"[0-9]+(?:\.[0-9]+)*(?:(?:a|b|rc)[0-9]+)?(?:\.post[0-9]+)?(?:\.dev[0-9]+)?"
)
"""Normalized PEP 440 public versions: what pip installs under the very same name."""
_VERSION_LINE: Final = re.compile(r'^__version__ = "[^"]*"$', re.MULTILINE)


class BuildError(Exception):
    """The bundle could not be built; the message says why."""


def build_bundle(
    *,
    source: Path,
    version: str,
    key: Ed25519PrivateKey,
    out: Path,
    wheels: Path | None = None,
    extra: str = "fast",
) -> Path:
    """Build ``out/byoc-agent-<version>.bundle`` from the tree at ``source``."""
    if not (VERSION_PATTERN.fullmatch(version) and RELEASE_VERSION.fullmatch(version)):
        raise BuildError(f"{version!r} is not a release version like 0.1.1 or 1.2.0rc1")
    with tempfile.TemporaryDirectory(prefix="byoc-bundle-") as tmp:
        tree, wheel_dir = Path(tmp) / "src", Path(tmp) / "wheels"
        _copy_tree(source, tree, version)
        wheel_dir.mkdir()
        offline = ["--no-index", "--find-links", str(wheels)] if wheels is not None else []
        _pip("wheel", "--no-deps", "--wheel-dir", str(wheel_dir), *offline, str(tree))
        project = tomllib.loads((tree / "pyproject.toml").read_text())["project"]
        requirements = [*project["dependencies"], *project["optional-dependencies"][extra]]
        _pip(
            "download",
            "--only-binary=:all:",
            "--dest",
            str(wheel_dir),
            "--constraint",
            str(tree / "constraints.txt"),
            *offline,
            *requirements,
        )
        names = sorted(path.name for path in wheel_dir.glob("*.whl"))
        ours = [name for name in names if name.startswith(f"byoc_agent-{version}-")]
        if not ours:
            raise BuildError(f"pip built no byoc_agent {version} wheel: {names}")
        _check_commands(wheel_dir / ours[0])
        if len(names) > MAX_WHEELS:
            raise BuildError(f"{len(names)} wheels; a bundle holds at most {MAX_WHEELS}")
        payload = _tar(wheel_dir, names)
    head = make_header(
        key,
        version=version,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_bytes=len(payload),
        requirement=f"byoc-agent[{extra}]=={version}",
        python=f"cp{sys.version_info.major}{sys.version_info.minor}",
        platform=sysconfig.get_platform(),
        issued_at=int(time.time()),
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"byoc-agent-{version}.bundle"
    path.write_bytes(head + payload)
    return path


def _copy_tree(source: Path, tree: Path, version: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        shutil.copytree(source / name, tree / name, ignore=ignore)
    for name in FILES:
        shutil.copyfile(source / name, tree / name)
    init = tree / "agent" / "__init__.py"
    text, count = _VERSION_LINE.subn(f'__version__ = "{version}"', init.read_text())
    if count != 1:
        raise BuildError(f"{init}: no single __version__ line to set")
    init.write_text(text)


def _check_commands(wheel: Path) -> None:
    """The release must install the ``byoc-agent`` command (the unit runs it); a tree copied
    without setup.py, which declares it, would build a wheel without it."""
    with zipfile.ZipFile(wheel) as archive:
        found = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(found[0]).decode() if found else ""
    if "byoc-agent = agent.cli:main" not in text:
        raise BuildError(f"{wheel.name} does not install the byoc-agent command")


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if done.returncode != 0:
        raise BuildError(f"pip {args[0]} failed:\n{done.stderr.strip()[-3000:]}")


def _tar(directory: Path, names: Sequence[str]) -> bytes:
    """A reproducible tar of ``wheels/<name>`` (fixed order, owners, modes and times)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in names:
            data = (directory / name).read_bytes()
            info = tarfile.TarInfo(f"wheels/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BuildError(f"cannot load the release key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BuildError(f"{path} is not an Ed25519 private key")
    return key


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", required=True, help="the release's version, e.g. 0.1.1")
    parser.add_argument("--key", type=Path, required=True, help="the release key (PEM, Ed25519)")
    parser.add_argument("--out", type=Path, default=Path("dist"))
    parser.add_argument("--source", type=Path, default=Path())
    parser.add_argument("--wheels", type=Path, help="build offline from the wheels in DIR")
    args = parser.parse_args(argv)
    try:
        path = build_bundle(
            source=args.source,
            version=args.version,
            key=load_key(args.key),
            out=args.out,
            wheels=args.wheels,
        )
    except BuildError as exc:
        print(f"make bundle: error: {exc}", file=sys.stderr)
        return 1
    data = path.read_bytes()
    print(f"{path}  {len(data)} bytes  sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
