"""Console scripts and entry points (pyproject.toml declares them dynamic).

A script is declared for each of the packages this build holds: a build from the whole
repository has all four commands; one from ``agent/`` alone (the container image) has
``byoc-agent`` only, instead of commands whose code is not there. Everything else is in
pyproject.toml.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "agent": "byoc-agent = agent.cli:main",
    "control_plane_stub": "cp-stub = control_plane_stub.cli:main",
    "certs": "byoc-certs = certs.cli:main",
    "byoc_demo": "byoc-demo-workload = byoc_demo.workload:main",
}
# Drivers are plug-ins: a package registers a factory under this group and the agent finds it
# by the `driver.kind` named in its configuration.
DRIVERS = [
    "process = agent.drivers.process:ProcessDriver",
    "journal = agent.drivers.journal:JournalDriver",
    "systemd = agent.drivers.systemd:SystemdDriver",
    "kubernetes = agent.drivers.kubernetes:KubernetesDriver",
]

setup(
    entry_points={
        "console_scripts": [
            script for package, script in SCRIPTS.items() if (HERE / package).is_dir()
        ],
        "byoc_agent.drivers": DRIVERS,
    }
)
