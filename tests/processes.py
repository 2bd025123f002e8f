"""Helpers for the crash and network-fault tests: real child processes (the stub control plane and
the agent), an agent installation that uses the ``journal`` driver, and the invariants a stream
of commands must satisfy however often things broke underneath it.

The invariants are checked from three independent records: the stub's database (through its
operator API: final states and status history), the journal driver's own fsync'd file (what was
actually executed: a ``start`` line before a command does anything, an ``end`` line after) and
the agent's audit log (hash chain, and an audit record before every action).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agent.io.audit_file import verify_file
from agent.io.store import Store
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from tests.conftest import scaled

REPO: Final = Path(__file__).resolve().parent.parent
FINAL_STATES: Final = frozenset({"succeeded", "failed", "rejected", "interrupted"})
STATE_ORDER: Final = {
    "received": 1,
    "pending_approval": 2,
    "running": 3,
    **dict.fromkeys(FINAL_STATES, 4),
}

JOURNAL_POLICY: Final = """\
version = 1

[scale]
allow = true
min_replicas = 1
max_replicas = 4

[upgrade]
allow = true
versions = ["1.0.0", "2.0.0"]

[collect_metrics]
allow = true
targets = ["workload", "host"]
"""
"""Everything the tests send is allowed and nothing needs approval: a command that does not
succeed can only have been hit by a fault."""


@dataclass(frozen=True)
class Planned:
    """A command to submit: type and params."""

    type: str
    params: dict[str, object]


def plan_commands(rng: random.Random, count: int) -> list[Planned]:
    """A mix of every command type, all within :data:`JOURNAL_POLICY`."""
    plan = []
    for _ in range(count):
        kind = rng.choices(["scale", "collect_metrics", "upgrade"], weights=[4, 3, 3])[0]
        if kind == "scale":
            plan.append(Planned("scale", {"replicas": rng.randint(1, 4)}))
        elif kind == "upgrade":
            plan.append(Planned("upgrade", {"version": rng.choice(["1.0.0", "2.0.0"])}))
        else:
            targets = rng.choice([["workload"], ["host"], ["workload", "host"]])
            plan.append(Planned("collect_metrics", {"targets": targets}))
    return plan


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers restarted on the same port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- child processes ---------------------------------------------------------------------------


class ChildProcess:
    """One program, started (and restarted) by the test, its output appended to ``log``."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- {self.name}: start #{self.starts} ---\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ)
            )

    async def wait(self, seconds: float) -> int:
        popen = self.popen
        assert popen is not None
        return await asyncio.to_thread(popen.wait, seconds)

    async def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        popen = self.popen
        assert popen is not None
        assert popen.poll() is None, f"{self.name} is not running"
        popen.send_signal(signal.SIGKILL)
        assert await self.wait(scaled(30)) == -signal.SIGKILL
        self.kills += 1

    async def stop(self) -> int:
        """SIGTERM and wait for a clean exit; returns the exit status."""
        popen = self.popen
        assert popen is not None
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
        return await self.wait(scaled(60))

    def ensure_dead(self) -> None:
        """Cleanup: never leave the child behind, whatever happened."""
        popen = self.popen
        if popen is not None and popen.poll() is None:
            popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(scaled(30))

    def tail(self, lines: int = 80) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"({self.log}: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def stub_process(
    pki: PKIPaths, *, agent_port: int, api_port: int, db: Path, log: Path
) -> ChildProcess:
    return ChildProcess(
        "cp-stub",
        [
            sys.executable,
            "-m",
            "control_plane_stub.cli",
            "serve",
            "--pki",
            str(pki.root),
            "--agents",
            f"127.0.0.1:{agent_port}",
            "--api",
            f"127.0.0.1:{api_port}",
            "--db",
            str(db),
            "--heartbeat-interval",
            "1",
        ],
        log,
    )


def agent_process(config: Path, *, log: Path) -> ChildProcess:
    return ChildProcess(
        "byoc-agent", [sys.executable, "-m", "agent.cli", "run", "--config", str(config)], log
    )


# -- an agent installation with the journal driver ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JournalAgentFiles:
    root: Path
    config: Path
    policy: Path
    audit_log: Path
    state_dir: Path
    journal: Path


def write_journal_agent(
    root: Path,
    *,
    pki: PKIPaths,
    port: int,
    run_dir: Path,
    delay: float,
    agent_id: str = "agent-1",
    heartbeat_interval: float = 1.0,
    heartbeat_timeout: float = 5.0,
    backoff_base: float = 0.05,
    backoff_cap: float = 0.5,
    send_timeout: float = 10.0,
    max_pending: int = 256,
    shutdown_grace: float = 5.0,
) -> JournalAgentFiles:
    """Write an agent configuration (journal driver) and :data:`JOURNAL_POLICY` under ``root``.

    ``run_dir`` holds the control socket: Unix socket paths are limited to 107 bytes."""
    root.mkdir(parents=True, exist_ok=True)
    files = JournalAgentFiles(
        root=root,
        config=root / "agent.toml",
        policy=root / "policy.toml",
        audit_log=root / "audit" / "audit.jsonl",
        state_dir=root / "state",
        journal=root / "journal.jsonl",
    )
    files.policy.write_text(JOURNAL_POLICY)

    def q(value: object) -> str:
        return json.dumps(str(value) if isinstance(value, Path) else value)

    files.config.write_text(
        f"""\
[agent]
id = {q(agent_id)}
state_dir = {q(files.state_dir)}
audit_log = {q(files.audit_log)}
policy = {q(files.policy)}
control_socket = {q(run_dir / "control.sock")}
shutdown_grace = {shutdown_grace}

[control_plane]
url = "wss://localhost:{port}/v1/agent"
ca_bundle = {q(pki.server_ca_cert)}
client_cert = {q(pki.agent_cert(agent_id))}
client_key = {q(pki.agent_key(agent_id))}

[tunnel]
heartbeat_interval = {heartbeat_interval}
heartbeat_timeout = {heartbeat_timeout}
backoff_base = {backoff_base}
backoff_cap = {backoff_cap}
send_timeout = {send_timeout}

[health]
listen = "127.0.0.1:0"

[commands]
trusted_keys = [{q(pki.signing_pub)}]
issuers = ["cp-stub"]
max_pending = {max_pending}

[driver]
kind = "journal"

[driver.journal]
path = {q(files.journal)}
delay = {delay}
"""
    )
    return files


# -- invariants --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalEntries:
    starts: Counter[str]
    ends: Counter[str]
    torn_lines: int


def read_journal(path: Path) -> JournalEntries:
    """``start``/``end`` lines per jti in the journal driver's file (a torn last line, from a
    kill in the middle of a write, is counted apart: that write never completed)."""
    starts: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    torn = 0
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if entry.get("event") == "start":
            starts[str(entry["jti"])] += 1
        elif entry.get("event") == "end":
            ends[str(entry["jti"])] += 1
    return JournalEntries(starts, ends, torn)


@dataclass
class InvariantReport:
    commands: int
    final_states: dict[str, int]
    max_start_lines_per_jti: int
    duplicate_executions: int
    """Commands with more than one ``start`` line in the journal: must be 0."""
    interrupted_started_no_end: int
    """Killed while the driver ran: a ``start`` line, no ``end`` line."""
    interrupted_after_end: int
    """The driver's ``end`` line was written, the agent was killed before it committed the
    final state: the agent cannot know the outcome, so ``interrupted`` is the truth."""
    interrupted_before_start_line: int
    """Killed between committing ``running`` and the driver's ``start`` line."""
    delivery_refusals: dict[str, int]
    """``delivery_rejected`` reports in the stubs' histories, by reason (redeliveries)."""
    audit_records: int
    audit_tail_repairs: int
    """Records cut off by a kill in the middle of a write, repaired at the next start."""
    journal_torn_lines: int
    problems: list[str] = field(default_factory=list)


def _audit_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def check_invariants(
    api: StubClient,
    submitted: Mapping[str, str],
    *,
    journal: Path,
    audit_log: Path,
    agent_db: Path,
) -> InvariantReport:
    """Check every command in ``submitted`` (ref -> jti) against the stub, the journal and the
    audit log; raise AssertionError listing every violation. Call it once every command has a
    final state and the agent has stopped (so that its audit log is complete).

    Checked:

    - at the stub: exactly one final state per command, no state twice in its history, states
      only moving forward, under the jti it was submitted with;
    - in the journal (what really executed): at most one ``start`` line per jti and nothing
      executed that was not submitted; ``succeeded`` means exactly one ``start`` and one ``end``;
      a command with a ``start`` line is succeeded, failed or interrupted, never rejected;
    - ``interrupted`` only for a command cut off mid-action: reported ``running`` and its driver
      had audited an action (``journal_entry``); one that never acted is started again after a
      restart (``command_resumed`` with ``never_acted``), so it has one more
      ``execution_started``, never a second ``start`` line;
    - what the stub was told agrees with the audit log: the outcome of ``execution_finished``
      is the final state reported, and a ``succeeded``/``failed`` has that record;
    - the agent's own database holds the same final state as the stub for every command;
    - the audit log verifies, has at most one ``execution_started`` and at most one final
      ``result_delivered`` per jti, and has ``execution_started`` (and the driver's
      ``journal_entry``) for every jti that has a ``start`` line: the audit record is written
      before the action.
    """
    problems: list[str] = []
    journal_entries = read_journal(journal)
    starts, ends = journal_entries.starts, journal_entries.ends
    finals: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    interrupted = Counter[str]()
    stub_finals: dict[str, str] = {}
    jtis = set(submitted.values())
    agent_state = Store(agent_db)
    try:
        agent_finals = {jti: row.state for jti in jtis if (row := agent_state.get(jti))}
    finally:
        agent_state.close()
    for ref, jti in submitted.items():
        answer = await api.command(ref)
        command = answer["command"]
        state = str(command["state"])
        history = answer["history"]
        states = [str(e["state"]) for e in history if e["state"] != "delivery_rejected"]
        for event in history:
            if event["state"] == "delivery_rejected":
                refusals[str(event["reason"])] += 1
        label = f"{ref} ({command['type']} {json.dumps(command['params'])})"
        if command["jti"] != jti:
            problems.append(f"{label}: stub has jti {command['jti']}, submitted {jti}")
        if state not in FINAL_STATES:
            problems.append(f"{label}: not final ({state})")
            continue
        finals[state] += 1
        stub_finals[ref] = state
        if agent_finals.get(jti) != state:
            problems.append(f"{label}: {state} at the stub, {agent_finals.get(jti)} at the agent")
        repeated = sorted(s for s, n in Counter(states).items() if n > 1)
        if repeated:
            problems.append(f"{label}: states {repeated} more than once in {states}")
        final_in_history = [s for s in states if s in FINAL_STATES]
        if final_in_history != [state]:
            problems.append(f"{label}: final states in history {final_in_history}, is {state}")
        ranks = [STATE_ORDER.get(s, 0) for s in states]
        if ranks != sorted(ranks):
            problems.append(f"{label}: history goes backwards: {states}")
        started, ended = starts[jti], ends[jti]
        if state == "succeeded" and (started, ended) != (1, 1):
            problems.append(f"{label}: succeeded with {started} start / {ended} end lines")
        if state == "failed" and started != 1:
            problems.append(f"{label}: failed with {started} start lines")
        if state == "rejected" and started:
            problems.append(f"{label}: rejected but the journal shows it ran")
        if state == "interrupted":
            if "running" not in states:
                problems.append(f"{label}: interrupted but never reported running: {states}")
            if started == 1 and ended == 0:
                interrupted["started_no_end"] += 1
            elif started == 1 and ended == 1:
                interrupted["after_end"] += 1
            elif started == 0:
                interrupted["before_start_line"] += 1
    for jti, count in sorted(starts.items()):
        if count > 1:
            problems.append(f"jti {jti} has {count} start lines: it ran {count} times")
        if jti not in jtis:
            problems.append(f"jti {jti} ran but was never submitted")
    for jti, count in sorted(ends.items()):
        if count > 1:
            problems.append(f"jti {jti} has {count} end lines")
    summary = verify_file(audit_log).summary
    records = _audit_events(audit_log)
    executions = Counter(str(r["jti"]) for r in records if r["event"] == "execution_started")
    entries = Counter(str(r["jti"]) for r in records if r["event"] == "journal_entry")
    resumed = Counter(
        str(r["jti"])
        for r in records
        if r["event"] == "command_resumed" and r.get("never_acted") is True
    )
    delivered = Counter(
        str(r["jti"]) for r in records if r["event"] == "result_delivered" and r.get("jti")
    )
    outcomes: dict[str, str] = {
        str(r["jti"]): str(r["outcome"]) for r in records if r["event"] == "execution_finished"
    }
    for jti in sorted(set(executions) | set(delivered)):
        # A command started again after a restart is one that had never acted.
        if executions[jti] > 1 + resumed[jti] or delivered[jti] > 1:
            problems.append(
                f"jti {jti}: {executions[jti]} execution_started ({resumed[jti]} resumed), "
                f"{delivered[jti]} result_delivered audit records"
            )
    # What the control plane was told agrees with the audit log.
    for ref, jti in submitted.items():
        told = stub_finals.get(ref)
        if jti in outcomes and told != outcomes[jti]:
            problems.append(f"{ref}: the audit log says {outcomes[jti]}, the stub was told {told}")
        if told in ("succeeded", "failed") and jti not in outcomes:
            problems.append(f"{ref}: {told} at the stub, no execution_finished in the audit log")
        if told == "interrupted" and not entries[jti]:
            problems.append(f"{ref}: interrupted, but it never acted (no journal_entry)")
        if told == "rejected" and entries[jti]:
            problems.append(f"{ref}: rejected, but it acted (journal_entry)")
    for jti in sorted(starts):
        if not executions[jti] or not entries[jti]:
            problems.append(f"jti {jti} ran without execution_started/journal_entry audited first")
    report = InvariantReport(
        commands=len(submitted),
        final_states=dict(sorted(finals.items())),
        max_start_lines_per_jti=max(starts.values(), default=0),
        duplicate_executions=sum(1 for n in starts.values() if n > 1),
        interrupted_started_no_end=interrupted["started_no_end"],
        interrupted_after_end=interrupted["after_end"],
        interrupted_before_start_line=interrupted["before_start_line"],
        delivery_refusals=dict(sorted(refusals.items())),
        audit_records=summary.records,
        audit_tail_repairs=sum(1 for r in records if r["event"] == "audit_tail_repaired"),
        journal_torn_lines=journal_entries.torn_lines,
        problems=problems,
    )
    assert not problems, "invariants violated:\n  " + "\n  ".join(problems[:50])
    return report
