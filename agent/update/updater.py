"""The ``update_agent`` command: download, verify, install side by side, self-test, switch, and
the trial that decides whether the new release stays.

One update, step by step (each step is an audit record of the command; the journal,
agent/update/guard.py, says where it is, so that whichever release runs next knows)::

    update_started -> update_downloading -> update_downloaded   (no redirects, size cap)
    -> update_verified      the file's SHA-256 is the command's; the header's signature is a
                            trusted release key's; the payload is the signed one
    -> update_unpacked      wheels/<name>.whl only, into the update's work directory
    -> update_installing -> update_installed      releases/<version>: a venv, pip --no-index
    -> update_self_tested   the new release's own `byoc-agent self-test` on the live
                            configuration and state; it must write the state schema this
                            release reads (so that a rollback can read what it wrote)
    -> update_switching -> update_switched        journal "trial", then `current` swapped
    -> update_restarting    the agent drains and exits with EXIT_RESTART; systemd starts
                            the unit again, i.e. the new release (:class:`Handover`)

    in the new release: update_trial_started -> update_confirmed (connected, and still
    connected trial_settle seconds later, before the deadline): the command succeeds
                     or: update_trial_failed -> update_rolling_back: `current` back, exit
    in the previous release, after a rollback (by the new one at its deadline, or by the
    guard after it crashed max_attempts times): update_rolled_back; the command fails
    (``rolled_back``)

A failure before the switch (any step, a failed self-test included) removes what was installed
and fails the command; nothing was switched. An agent killed before the switch finds the
journal at ``installing`` when it starts again: it cleans up and fails the command
(``update_interrupted``): the host runs the version it ran before.

The state database is **not** snapshotted: what a newer release writes must stay readable by
the previous one, so a release whose self-test reports another state schema than this
release's is refused before the switch (``state_incompatible``). A snapshot restored on
rollback would forget the commands (and their ``jti``: replay protection) that the new release
accepted during its trial.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import structlog

from agent import __version__
from agent.config import UpdateConfig
from agent.core.commands import UpdateAgent
from agent.core.verifier import TrustedKeys
from agent.drivers.base import AuditSink, ExecContext
from agent.io.store import SCHEMA_VERSION
from agent.update import bundle, guard
from agent.update.download import download
from agent.update.errors import Handover, UpdateError
from agent.update.install import (
    Layout,
    base_python,
    clean_environment,
    install_release,
    run_program,
    unpack_wheels,
    write_marker,
)

EXIT_RESTART: Final = 75
"""The agent's exit status when it stops so that systemd starts the release ``current`` now
names (the unit's ``RestartForceExitStatus=`` and ``SuccessExitStatus=``)."""
PAUSE_ENV: Final = "BYOC_AGENT_TEST_UPDATE_PAUSE"
"""Tests only (the crash tests of tests/test_update_agent.py): the update waits, audited
``update_paused``, after the step this names (``downloaded``, ``unpacked``, ``switched``) until
the agent is killed. Never set in production."""
_HASH_CHUNK: Final = 1024 * 1024


class Session(Protocol):
    """What the trial watches: the tunnel's session (agent/io/tunnel.py)."""

    ready: asyncio.Event
    """Set while a session is established (welcome received)."""
    reconnects: int
    """Connections that ended since start."""


class Updater:
    """Carries out ``update_agent`` (:meth:`run`) and, in the release that starts after a
    switch, decides its trial (:meth:`supervise`)."""

    def __init__(
        self,
        config: UpdateConfig,
        *,
        config_path: Path,
        state_dir: Path,
        release_keys: Callable[[], TrustedKeys],
        restart: Callable[[int, str], None],
        under_systemd: bool,
        log: structlog.typing.FilteringBoundLogger,
        clock: Callable[[], float] = time.time,
        python: Path | None = None,
    ) -> None:
        """``restart(exit_code, reason)`` makes the agent drain and exit with that status
        (systemd starts it again); ``release_keys()`` are the keys trusted to sign bundles
        right now."""
        self.config = config
        self.layout = Layout(config.root)
        self._config_path = config_path
        self._journal_path = guard.journal_path(state_dir)
        self._work = self._journal_path.parent / "work"
        self._release_keys = release_keys
        self._restart = restart
        self._under_systemd = under_systemd
        self._log = log
        self._clock = clock
        self._python = python or base_python()
        self._trial_decided = asyncio.Event()
        self._updating = False
        """An update is being carried out by this process (its work files are in use)."""

    # -- the command -----------------------------------------------------------------------

    def time_limit(self, command_timeout: float) -> float:
        """Seconds the command may take: its steps (``command_timeout``), and after the restart
        the trial, which may last ``trial_deadline``."""
        return command_timeout + self.config.trial_deadline

    async def run(self, command: UpdateAgent, ctx: ExecContext) -> dict[str, object]:
        """Carry out the command, or, if the journal says it was begun by an earlier run of
        the agent, take it up where that run left it. Raises UpdateError (the command fails)
        or Handover (the agent restarts; the next release reports)."""
        journal = self._read()
        if journal is not None and journal["jti"] == ctx.jti:
            return await self._resume(journal, ctx)
        if journal is not None and journal["stage"] == "trial":
            raise UpdateError(
                "update_in_progress",
                f"{journal['to']} is on trial (update {journal['jti']}); send it again later",
            )
        self._check_supported()
        running = __version__
        if command.version == running:
            await ctx.audit("update_not_needed", version=running)
            return {"version": running, "previous": running, "changed": False}
        journal = {
            "format": guard.JOURNAL_FORMAT,
            "jti": ctx.jti,
            "from": running,
            "to": command.version,
            "stage": "installing",
            "step": "started",
            "updated_at": self._clock(),
        }
        self._write(journal)
        self._updating = True
        try:
            return await self._update(command, ctx, journal)
        except UpdateError as exc:
            self._give_up(journal, exc.code, exc.detail)
            raise
        except OSError as exc:  # a full disk, a directory that cannot be written, ...
            failure = UpdateError("update_failed", f"{type(exc).__name__}: {exc}")
            self._give_up(journal, failure.code, failure.detail)
            raise failure from exc
        except asyncio.CancelledError:
            if journal["stage"] == "installing":  # stopping or timed out: nothing switched
                self._give_up(journal, "update_interrupted", "cancelled before the switch")
            raise
        finally:
            self._updating = False

    def _check_supported(self) -> None:
        if not self._under_systemd:
            raise UpdateError(
                "not_supported",
                "the agent is not run by systemd here, so nothing would start the new release "
                "(README 'Updating the agent')",
            )
        current = self.layout.current_version()
        if current is None:
            raise UpdateError(
                "not_supported",
                f"{self.layout.current} is not a link to {self.layout.releases}/<version> "
                "(install with make install)",
            )
        if current != __version__:
            raise UpdateError(
                "not_supported",
                f"this agent runs {__version__} but {self.layout.current} names {current}: "
                "restart it first",
            )

    async def _update(
        self, command: UpdateAgent, ctx: ExecContext, journal: dict[str, Any]
    ) -> dict[str, object]:
        running = journal["from"]
        await ctx.audit(
            "update_started",
            version=command.version,
            previous=running,
            url=command.url,
            sha256=command.sha256,
        )
        shutil.rmtree(self._work, ignore_errors=True)
        self._work.mkdir(parents=True, mode=0o700)
        path = self._work / "bundle"
        await ctx.audit(
            "update_downloading", url=command.url, max_bytes=self.config.max_bundle_bytes
        )
        verify: str | bool = str(self.config.ca_bundle) if self.config.ca_bundle else True
        async with httpx.AsyncClient(
            timeout=self.config.download_timeout, trust_env=False, verify=verify
        ) as client:
            got = await download(client, command.url, path, max_bytes=self.config.max_bundle_bytes)
        await self._step(ctx, journal, "downloaded", bytes=got.size, sha256=got.sha256)

        bundle.check_digest(got.sha256, command.sha256)
        with path.open("rb") as head:
            token, offset = bundle.split_header(head.read(bundle.MAX_HEADER_BYTES))
        release = bundle.verify_header(
            token, self._release_keys(), version=command.version, now=self._clock()
        )
        payload = await asyncio.to_thread(_sha256_from, path, offset)
        bundle.check_payload(release, sha256=payload, size=got.size - offset)
        bundle.check_target(release, python=_python_tag(), platform=sysconfig.get_platform())
        await self._step(ctx, journal, "verified", **release.audit_fields())

        wheels = self._work / "wheels"
        names = await asyncio.to_thread(unpack_wheels, path, offset, got.size - offset, wheels)
        await self._step(ctx, journal, "unpacked", wheels=len(names))

        target = self.layout.release(command.version)
        if target.exists() and not self.layout.remove(command.version):
            raise UpdateError(
                "release_exists",
                f"{target} exists and is not the agent's to replace (installed by make install?)",
            )
        self.layout.releases.mkdir(parents=True, exist_ok=True)
        await ctx.audit("update_installing", path=str(target), requirement=release.requirement)
        await install_release(
            target,
            python=self._python,
            wheels=wheels,
            requirement=release.requirement,
            env=clean_environment(self._work),
            limit=self.config.install_timeout,
        )
        await self._step(ctx, journal, "installed", path=str(target))

        report = await self._self_test(target, command.version)
        await self._step(
            ctx, journal, "self_tested", checks=[c["name"] for c in report.get("checks", [])]
        )
        write_marker(
            target,
            {"version": command.version, "bundle_sha256": got.sha256, "installed_by": ctx.jti},
        )
        shutil.rmtree(self._work, ignore_errors=True)

        now = self._clock()
        journal.update(
            stage="trial",
            step="switching",
            switched_at=now,
            deadline=now + self.config.trial_deadline,
            attempts=0,
            max_attempts=self.config.max_attempts,
        )
        await ctx.audit(
            "update_switching",
            previous=running,
            version=command.version,
            trial_deadline_s=int(self.config.trial_deadline),
            max_attempts=self.config.max_attempts,
        )
        self._write(journal)
        self.layout.switch(command.version)
        await self._step(ctx, journal, "switched", current=str(target))
        await ctx.audit("update_restarting", version=command.version, exit_code=EXIT_RESTART)
        self._restart(EXIT_RESTART, f"update_agent: switching to {command.version}")
        raise Handover(f"switched to {command.version}; that release reports the outcome")

    async def _step(
        self, ctx: ExecContext, journal: dict[str, Any], step: str, **fields: object
    ) -> None:
        """Audit a step done, note it in the journal, and (tests only) pause there."""
        await ctx.audit(f"update_{step}", **fields)
        journal["step"] = step
        journal["updated_at"] = self._clock()
        self._write(journal)
        if os.environ.get(PAUSE_ENV) == step:
            await ctx.audit("update_paused", step=step)
            self._log.warning("update_paused", step=step, env=PAUSE_ENV)
            await asyncio.Event().wait()  # until the test kills the agent

    async def _self_test(self, target: Path, version: str) -> dict[str, Any]:
        argv = [
            str(target / "bin" / "byoc-agent"),
            "self-test",
            "--config",
            str(self._config_path),
            "--json",
        ]
        env = clean_environment(self._work)
        finished = await run_program(
            argv, env=env, limit=self.config.install_timeout, code="self_test_failed", check=False
        )
        try:
            report = json.loads(finished.out)
        except ValueError as exc:
            raise UpdateError(
                "self_test_failed", f"exited {finished.returncode}: {finished.said()}"
            ) from exc
        if not isinstance(report, dict) or report.get("ok") is not True:
            raise UpdateError("self_test_failed", _failed_checks(finished.out))
        if report.get("version") != version:
            raise UpdateError(
                "self_test_failed", f"the release says it is {report.get('version')!r}"
            )
        if report.get("state_schema") != SCHEMA_VERSION:
            raise UpdateError(
                "state_incompatible",
                f"{version} writes state schema {report.get('state_schema')}; {__version__} "
                f"reads {SCHEMA_VERSION}, so after a rollback it could not read the state",
            )
        return report

    def _give_up(self, journal: dict[str, Any], reason: str, detail: str) -> None:
        """A failure before the switch: remove what was installed (never the running release,
        never root's); the journal says why."""
        shutil.rmtree(self._work, ignore_errors=True)
        self.layout.remove(journal["to"])
        journal.update(stage="failed", reason=reason, detail=detail, updated_at=self._clock())
        with contextlib.suppress(OSError, guard.JournalError):
            self._write(journal)

    # -- after a restart ---------------------------------------------------------------------

    async def _resume(self, journal: dict[str, Any], ctx: ExecContext) -> dict[str, object]:
        running = __version__
        old, new = journal["from"], journal["to"]
        stage = journal["stage"]
        if stage == "installing":
            step = journal.get("step")
            await ctx.audit("update_interrupted", version=new, step=step, running=running)
            detail = (
                f"the agent stopped during the update to {new} (after step {step!r}); nothing "
                f"was switched: {running} runs"
            )
            self._give_up(journal, "update_interrupted", detail)
            stage = "failed"
        if stage == "aborted":
            await ctx.audit("update_interrupted", version=new, step="switching", running=running)
            self.layout.remove(new)
            raise UpdateError("update_interrupted", str(journal.get("detail")), result=_on(running))
        if stage == "failed":
            raise UpdateError(
                str(journal.get("reason") or "update_interrupted"),
                str(journal.get("detail") or "the update failed before the switch"),
                result=_on(running),
            )
        if stage == "trial":
            if running == new:
                await self._trial_decided.wait()  # supervise() decides
                journal = self._read() or journal
            else:  # the previous release started while the trial was open (no guard?)
                journal = self._rolled_back(
                    journal,
                    reason="not_started",
                    detail=f"{running} was started instead of {new} during its trial",
                    by="agent",
                )
            stage = journal["stage"]
        if stage == "confirmed":
            return {
                "version": new,
                "previous": old,
                "changed": True,
                "connected_after_ms": journal.get("connected_after_ms"),
            }
        if stage == "rolled_back" and running != old:
            raise Handover(f"rolled back to {old}; that release reports the outcome")
        await ctx.audit(
            "update_rolled_back",
            version=new,
            running=running,
            reason=journal.get("reason"),
            by=journal.get("by"),
            attempts=journal.get("attempts"),
            detail=journal.get("detail"),
        )
        self.layout.remove(new)
        raise UpdateError(
            "rolled_back",
            str(journal.get("detail")),
            result={"rolled_back": True, "version": running, "failed_version": new},
        )

    # -- the trial -------------------------------------------------------------------------

    async def supervise(
        self, started: asyncio.Event, session: Callable[[], Session], audit: AuditSink
    ) -> None:
        """Once the agent has started: tidy up what an earlier run left, and if this release
        is on trial, decide it. Runs as a background task of the agent."""
        await started.wait()
        try:
            journal = self._read()
            self._tidy(journal)
            if journal is not None and journal["stage"] == "rolled_back":
                await self._finish_rollback(journal, audit)
            if journal is not None and journal["stage"] == "trial" and journal["to"] == __version__:
                await self._trial(journal, session, audit)
        except (OSError, guard.JournalError, UpdateError, KeyError, TypeError, ValueError) as exc:
            self._log.error("update_supervision_failed", error=repr(exc))
        finally:
            self._trial_decided.set()

    def _tidy(self, journal: dict[str, Any] | None) -> None:
        """Unfinished installs and work files of updates that are over."""
        if self._updating or (journal is not None and journal["stage"] == "installing"):
            return  # in use, or the command is resumed and cleans up itself
        shutil.rmtree(self._work, ignore_errors=True)
        keep = {__version__} | ({journal["from"], journal["to"]} if journal else set())
        for version in _unfinished(self.layout, keep):
            self.layout.remove(version)

    async def _finish_rollback(self, journal: dict[str, Any], audit: AuditSink) -> None:
        """Rolled back in the journal, but this is still the failed release: switch again."""
        if __version__ != journal["to"] or self.layout.current_version() != journal["to"]:
            return
        await audit(
            "update_rolling_back",
            jti=journal["jti"],
            version=journal["to"],
            to=journal["from"],
        )
        self.layout.switch(journal["from"])
        self._restart(EXIT_RESTART, f"update rolled back to {journal['from']}")

    async def _trial(
        self, journal: dict[str, Any], session: Callable[[], Session], audit: AuditSink
    ) -> None:
        jti, old, new = journal["jti"], journal["from"], journal["to"]
        deadline = float(journal["deadline"])
        await audit(
            "update_trial_started",
            jti=jti,
            version=new,
            previous=old,
            attempt=journal.get("attempts"),
            max_attempts=journal.get("max_attempts"),
            seconds_left=max(0, int(deadline - self._clock())),
        )
        began = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                await self._settled(session)
        except TimeoutError:
            window = int(deadline - float(journal.get("switched_at", deadline)))
            detail = (
                f"{new} did not reach a connected, healthy session within its {window}s trial; "
                f"back to {old}"
            )
            await audit(
                "update_trial_failed",
                jti=jti,
                version=new,
                reason="not_connected",
                detail=detail,
            )
            if not self.layout.release(old).is_dir():  # removed by hand: nowhere to go back to
                journal.update(
                    stage="failed",
                    reason="rollback_failed",
                    detail=f"{detail}: impossible, {self.layout.release(old)} does not exist",
                    updated_at=self._clock(),
                )
                self._write(journal)
                return
            self._rolled_back(journal, reason="not_connected", detail=detail, by="trial")
            await audit("update_rolling_back", jti=jti, version=new, to=old)
            self.layout.switch(old)
            self._restart(EXIT_RESTART, f"update trial of {new} failed")
            return
        elapsed = int((time.monotonic() - began) * 1000)
        journal.update(stage="confirmed", connected_after_ms=elapsed, updated_at=self._clock())
        await audit(
            "update_confirmed",
            jti=jti,
            version=new,
            previous=old,
            connected_after_ms=elapsed,
        )
        self._write(journal)
        removed = self.layout.prune(keep={new, old})
        if removed:
            await audit("update_releases_removed", jti=jti, versions=removed)

    async def _settled(self, session: Callable[[], Session]) -> None:
        """Connected, and still connected (no reconnect) ``trial_settle`` seconds later."""
        link = session()
        while True:
            await link.ready.wait()
            seen = link.reconnects
            await asyncio.sleep(self.config.trial_settle)
            if link.ready.is_set() and link.reconnects == seen:
                return

    def _rolled_back(
        self, journal: dict[str, Any], *, reason: str, detail: str, by: str
    ) -> dict[str, Any]:
        journal.update(
            stage="rolled_back", reason=reason, detail=detail, by=by, updated_at=self._clock()
        )
        self._write(journal)
        return journal

    # -- the journal -----------------------------------------------------------------------

    def _read(self) -> dict[str, Any] | None:
        try:
            return guard.read_journal(self._journal_path)
        except guard.JournalError as exc:
            raise UpdateError("journal_unreadable", str(exc)) from exc

    def _write(self, journal: dict[str, Any]) -> None:
        try:
            guard.write_journal(self._journal_path, journal)
        except OSError as exc:
            raise UpdateError("journal_unwritable", f"{self._journal_path}: {exc}") from exc


def _on(version: str) -> dict[str, object]:
    return {"version": version, "changed": False}


def _unfinished(layout: Layout, keep: set[str]) -> list[str]:
    """Releases the agent began to install and never finished (no marker), not in ``keep``."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for path in layout.releases.iterdir():
            name = path.name
            if (
                name not in keep
                and guard.VERSION.fullmatch(name)
                and path.is_dir()
                and not path.is_symlink()
                and path.stat().st_uid == os.geteuid()
                and layout.installed(name) is None
            ):
                found.append(name)
    return found


def _failed_checks(output: str) -> str:
    """The failing checks of a self-test report, or the end of what it said."""
    try:
        report = json.loads(output)
    except ValueError:
        report = None
    if isinstance(report, dict) and isinstance(report.get("checks"), list):
        failed = [
            f"{check.get('name')}: {check.get('detail')}"
            for check in report["checks"]
            if isinstance(check, dict) and not check.get("ok")
        ]
        if failed:
            return "; ".join(failed)[:1000]
    return output[-1000:]


def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def _sha256_from(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        data.seek(offset)
        while chunk := data.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
