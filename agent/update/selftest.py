"""``byoc-agent self-test``: can this release run here, on the live configuration and state?

Run by the agent that installs a release, with the *new* release's own code
(``/opt/byoc-agent/releases/<version>/bin/byoc-agent self-test --config ... --json``), before
anything is switched. It changes nothing: it parses the configuration and the policy, opens the
state database read-only (its schema must be one this release reads: its own, or an older one it
would migrate), verifies the audit log's chain (the complete
records: the running agent may be writing the next one), and loads the key, certificate and CA
bundle the way a connection would. The JSON report names the release's version and the state
schema it writes, which the running agent compares with its own before it switches.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent import __version__
from agent.config import AgentConfig, load_config
from agent.core.audit_chain import verify_lines
from agent.core.errors import AgentError
from agent.io.audit_file import iter_lines
from agent.io.policy_file import read_policy
from agent.io.store import SCHEMA_VERSION
from agent.io.tls import client_context


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class SelfTestReport:
    version: str = __version__
    state_schema: int = SCHEMA_VERSION
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "version": self.version,
            "state_schema": self.state_schema,
            "checks": [check.to_json() for check in self.checks],
        }


def self_test(config_path: Path) -> SelfTestReport:
    report = SelfTestReport()

    def check(name: str, probe: Callable[[], str]) -> bool:
        try:
            detail = probe()
        except (AgentError, OSError, ValueError, sqlite3.Error) as exc:
            report.checks.append(Check(name, False, f"{type(exc).__name__}: {exc}"[:500]))
            return False
        report.checks.append(Check(name, True, detail))
        return True

    loaded: list[AgentConfig] = []

    def config() -> str:
        loaded.append(load_config(config_path))
        return f"{config_path} parses"

    if not check("config", config):
        return report
    cfg = loaded[0]
    check("policy", lambda: f"{cfg.policy}: {len(read_policy(cfg.policy).summary())} section(s)")
    check("state", lambda: _state(cfg.state_dir / "agent.db"))
    check("audit_chain", lambda: _audit(cfg.audit_log))
    check("credentials", lambda: _credentials(cfg))
    return report


def _state(path: Path) -> str:
    if not path.exists():
        raise OSError(f"{path} does not exist")
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        stored = int(row[0]) if row is not None else None
        if stored is None or stored > SCHEMA_VERSION:
            raise ValueError(
                f"{path} has schema {stored}; this release reads up to {SCHEMA_VERSION}"
            )
        (quick,) = db.execute("PRAGMA quick_check").fetchone()
        if quick != "ok":
            raise ValueError(f"{path}: quick_check says {quick}")
        (commands,) = db.execute("SELECT count(*) FROM commands").fetchone()
        (unsent,) = db.execute("SELECT count(*) FROM outbox").fetchone()
    finally:
        db.close()
    return (
        f"{path} read-only: schema {stored} (this release writes {SCHEMA_VERSION}), "
        f"{commands} command(s), {unsent} unacknowledged frame(s)"
    )


def _audit(path: Path) -> str:
    # the running agent may be writing the next line: a last line without its newline is not
    # a record yet (streamed, not read whole: a log can be large)
    summary = verify_lines(line for line in iter_lines(path) if line.endswith(b"\n"))
    return f"{path}: {summary.records} records verify"


def _credentials(cfg: AgentConfig) -> str:
    cp = cfg.control_plane
    client_context(ca_bundle=cp.ca_bundle, cert=cp.client_cert, key=cp.client_key)
    return f"{cp.client_cert}, its key and {cp.ca_bundle} load"
