"""The agent installs without the stub's dependencies (issue 13).

One distribution, ``byoc-agent``: the agent's dependencies are the distribution's; the stub
control plane's server and console (aiohttp, Jinja2) are the ``stub`` extra. A wheel is built
here from the source tree, installed with pip into a fresh virtual environment (the wheel from
disk; its dependencies from the configured index, pinned by constraints.txt, as
``make install`` does), and the agent is used there: it runs, imports no stub dependency, and
``cp-stub serve`` says which extra it needs instead of a traceback. The image's build (the
``agent/`` directory alone, Dockerfile) is built too: its only command is ``byoc-agent``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import scaled

REPO = Path(__file__).resolve().parent.parent
STUB_ONLY = ("aiohttp", "jinja2", "markupsafe", "aiosignal", "multidict", "yarl", "frozenlist")
"""What the stub extra brings (with its own dependencies) and the agent must not need."""


def run(
    *argv: str | Path, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=scaled(300),
        check=False,
        cwd=cwd or REPO,
        env=env,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def build_wheel(source: Path, out: Path) -> Path:
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, source)
    (wheel,) = out.glob("byoc_agent-*.whl")
    return wheel


def entry_points(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        return archive.read(name).decode()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent alone, built as the Dockerfile builds it: the agent's package and the build
    files, nothing else (the stub, the PKI tool and the demo workload are not copied)."""
    source = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "constraints.txt", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "agent", source / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY pyproject.toml setup.py constraints.txt README.md LICENSE ./" in dockerfile
    assert "\nCOPY agent ./agent\n" in dockerfile
    assert [line for line in dockerfile.splitlines() if line.startswith("COPY ")] == [
        "COPY pyproject.toml setup.py constraints.txt README.md LICENSE ./",
        "COPY agent ./agent",
        "COPY --from=build /opt/byoc-agent /opt/byoc-agent",
    ]
    return build_wheel(source, tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_the_agent_its_license_and_the_stub_as_an_extra(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
        (license_file,) = [n for n in names if ".dist-info/" in n and n.endswith("/LICENSE")]
        license_text = archive.read(license_file).decode()
    assert {name.split("/")[0] for name in names} == {"agent", "byoc_agent-0.1.0.dist-info"}
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
    unconditional = {
        re.split(r"[<>=\[ ;]", line, maxsplit=1)[0].lower() for line in requires if ";" not in line
    }
    assert "websockets" in unconditional
    assert unconditional.isdisjoint(STUB_ONLY), unconditional
    assert 'aiohttp>=3.10; extra == "stub"' in requires
    assert 'jinja2>=3.1; extra == "stub"' in requires
    points = entry_points(wheel)
    assert "[console_scripts]\nbyoc-agent = agent.cli:main\n" in points  # and no other command
    assert "cp-stub" not in points
    assert "byoc-certs" not in points
    assert "process = agent.drivers.process:ProcessDriver" in points


def test_pip_installs_the_agent_without_the_stubs_dependencies(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)  # pip is run from outside it (--python)
    python = target / "bin" / "python"
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile",
        "--disable-pip-version-check", "-c", REPO / "constraints.txt", wheel,
    )  # fmt: skip
    listed = run(sys.executable, "-m", "pip", "--python", python, "list", "--format=freeze")
    installed = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "byoc-agent" in installed
    assert installed.isdisjoint(STUB_ONLY), installed & set(STUB_ONLY)
    assert sorted(path.name for path in (target / "bin").glob("byoc-*")) == ["byoc-agent"]
    assert not (target / "bin" / "cp-stub").exists()

    elsewhere = tmp_path / "elsewhere"  # not the checkout: what is imported is what was installed
    elsewhere.mkdir()
    imports = run(
        python,
        "-c",
        "import agent, agent.daemon, agent.doctor, agent.drivers.kubernetes, "
        "agent.drivers.systemd, sys; print(agent.__file__); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'jinja2')))",
        cwd=elsewhere,
    )
    site = target / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert imports.stdout.splitlines() == [
        str(site / "site-packages" / "agent" / "__init__.py"),
        "[]",
    ]
    version = run(target / "bin" / "byoc-agent", "--version", cwd=elsewhere)
    assert version.stdout.strip() == "byoc-agent 0.1.0"
    policy = run(target / "bin" / "byoc-agent", "policy", "check", REPO / "systemd" / "policy.toml")
    assert ": OK (sha256 " in policy.stdout


def test_cp_stub_serve_without_the_stub_extra_says_which(tmp_path: Path) -> None:
    """Where the repository's code is installed without the extra (make install on a host):
    the client commands work, and ``serve`` names the extra. aiohttp is made unimportable in
    a child process (``sys.modules["aiohttp"] = None``), as if it had never been installed."""
    code = (
        "import sys; sys.modules['aiohttp'] = None; "
        "from control_plane_stub.cli import main; raise SystemExit(main(sys.argv[1:]))"
    )
    serve = run(sys.executable, "-c", code, "serve", "--pki", tmp_path, check=False)
    assert (serve.returncode, serve.stderr) == (
        1,
        "cp-stub: error: cp-stub serve needs the stub's dependencies, which the agent does not "
        "(missing: aiohttp): pip install 'byoc-agent[stub]'\n",
    )
    client = run(sys.executable, "-c", code, "agents", "--api", "http://127.0.0.1:9", check=False)
    assert client.returncode == 1
    assert "unreachable" in client.stderr  # the client went as far as the network
