"""Two network namespaces joined by a veth pair, an inbound firewall for one of them, and a
TCP probe to run inside either.

Everything is configured inside namespaces made here (unique names per run): the host's own
interfaces, routes and firewall are never touched. The veth pair is created directly in the
namespaces (``ip -n CP link add ... peer ... netns AG``), so it never exists on the host.

``python -m tests.netns probe HOST PORT TIMEOUT`` (run under ``ip netns exec``) tries one TCP
connection and prints ``connected``, ``refused``, ``timeout`` or ``error: ...``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

FIREWALL_TABLE: Final = "byoc_outbound_only"
AGENT_FIREWALL: Final = f"""\
table inet {FIREWALL_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
    }}
}}
"""
"""No new connection in, from anywhere but loopback; replies to what the host opened come back.
Output is not filtered."""

CP_VETH: Final = "veth-cp"
AGENT_VETH: Final = "veth-ag"
COMMAND_TIMEOUT: Final = 20.0

# What `ip` and `nft` say when the kernel or a container's seccomp profile does not allow them.
_NOT_ALLOWED: Final = (
    "Operation not permitted",
    "Permission denied",
    "Operation not supported",
    "Protocol not supported",
)


class Unavailable(Exception):
    """This machine does not allow what is needed here; the message says why."""


@dataclass(frozen=True)
class NetnsPair:
    cp: str
    """The control plane's namespace."""
    agent: str
    """The agent's namespace."""
    cp_addr: str
    agent_addr: str
    prefix_len: int = 30


def unavailable_reason() -> str | None:
    """Why namespaces with a firewall cannot be made here, or None if they presumably can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "creating network namespaces (ip netns add) needs root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (package {package})"
    return None


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )


def _check(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run a command; a refusal by the system raises Unavailable, any other failure fails."""
    result = _run(argv, stdin)
    if result.returncode != 0:
        message = f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}"
        if any(text in result.stderr for text in _NOT_ALLOWED):
            raise Unavailable(message)
        raise RuntimeError(message)
    return result.stdout


def create_pair() -> NetnsPair:
    """Two fresh namespaces, ``byoc-cp-<hex>`` and ``byoc-ag-<hex>``, with loopback up and a
    veth pair between them addressed from a /30 in 10.213.0.0/16 picked for this run. On
    failure, whatever was made is removed again."""
    tag = secrets.token_hex(4)
    subnet = ipaddress.ip_network(f"10.213.{secrets.randbelow(256)}.{secrets.randbelow(64) * 4}/30")
    cp_addr, agent_addr = (str(host) for host in subnet.hosts())
    pair = NetnsPair(f"byoc-cp-{tag}", f"byoc-ag-{tag}", cp_addr, agent_addr, subnet.prefixlen)
    made: list[str] = []
    try:
        for name in (pair.cp, pair.agent):
            _check(["ip", "netns", "add", name])
            made.append(name)
        peer = ["type", "veth", "peer", "name", AGENT_VETH, "netns", pair.agent]
        _check(["ip", "-n", pair.cp, "link", "add", CP_VETH, *peer])
        for name, veth, addr in ((pair.cp, CP_VETH, cp_addr), (pair.agent, AGENT_VETH, agent_addr)):
            _check(["ip", "-n", name, "addr", "add", f"{addr}/{pair.prefix_len}", "dev", veth])
            _check(["ip", "-n", name, "link", "set", "lo", "up"])
            _check(["ip", "-n", name, "link", "set", veth, "up"])
    except BaseException:
        remove_namespaces(made)
        raise
    return pair


def apply_agent_firewall(namespace: str) -> str:
    """Load AGENT_FIREWALL in ``namespace``; return the ruleset as nft then lists it."""
    _check(["ip", "netns", "exec", namespace, "nft", "-f", "-"], stdin=AGENT_FIREWALL)
    return ruleset(namespace)


def ruleset(namespace: str) -> str:
    return _check(["ip", "netns", "exec", namespace, "nft", "list", "ruleset"])


def namespace_pids(namespace: str) -> list[int]:
    result = _run(["ip", "netns", "pids", namespace])
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def remove_namespaces(names: Sequence[str], within: float = 20.0) -> None:
    """Kill every process still running in each namespace (all started by the test that made
    it), wait until they are gone, then delete the namespace (and with it the veth pair)."""
    problems: list[str] = []
    for name in names:
        deadline = time.monotonic() + within
        while pids := namespace_pids(name):
            if time.monotonic() > deadline:
                problems.append(f"{name}: processes {pids} did not go away")
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)  # bounded poll: SIGKILLed processes leave the namespace promptly
        result = _run(["ip", "netns", "del", name])
        if result.returncode != 0:
            problems.append(f"{name}: {result.stderr.strip()}")
    if problems:
        raise RuntimeError("could not clean up: " + "; ".join(problems))


def probe(host: str, port: int, timeout: float) -> str:
    """One TCP connection attempt: ``connected``, ``refused``, ``timeout`` or ``error: ...``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error: {exc}"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 4 or argv[0] != "probe":
        print("usage: python -m tests.netns probe HOST PORT TIMEOUT", file=sys.stderr)
        return 2
    print(probe(argv[1], int(argv[2]), float(argv[3])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
