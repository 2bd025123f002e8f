"""From a delivered token to a final result: verification, replay check, policy, approval,
execution, and the audit record before every step.

Life of a command (docs/PROTOCOL.md §6)::

    delivery --verify--> (refused: delivery_rejected)
             --claim jti--> received --parse+policy--> rejected
                                     |--> pending_approval --approve--> running
                                     |                     --deny/expire--> rejected
                                     '--> running --> succeeded | failed
                                   (agent stopped while running: interrupted)

Mutating commands (scale, upgrade) run one at a time in arrival order; read-only ones
(collect_metrics) run beside them. The policy is asked again right before a command starts, so
a policy tightened meanwhile (denied, or now needing approval) is obeyed. Each state change is
committed to SQLite together with the status frame that reports it; each action is preceded by
an fsync'd audit record. Once stopping, nothing new starts: commands that have not started stay
``received`` (or approved) in the database and resume on the next start.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog

from agent.core.commands import (
    CollectMetrics,
    Command,
    OpenStream,
    Scale,
    UpdateAgent,
    Upgrade,
    parse_command,
)
from agent.core.errors import AuditError, CommandRejected, DriverError, StateError
from agent.core.frames import FINAL_STATES
from agent.core.limits import TokenBucket
from agent.core.policy import Decision, Policy, Verdict
from agent.core.receipts import ReceiptInvalid, ReceiptSigner
from agent.core.results import fit_result, well_formed
from agent.core.verifier import CommandVerifier, TrustedKeys, peek, token_sha256
from agent.drivers.base import Driver, ExecContext
from agent.io.audit_file import AuditLog
from agent.io.store import AgentState, CommandRow
from agent.io.streams import StreamManager
from agent.update import bridge as update_bridge  # update bridge (issue 15)
from agent.update.errors import Handover

DeliveryOutcome = Literal["accepted", "deferred", "refused"]
BENIGN_REFUSALS: Final = frozenset({"shutting_down", "busy", "rate_limited", "duplicate_delivery"})
"""Refusals that are no fault of the peer's: they do not spend its error budget, only the much
larger deferral budget (``tunnel.max_peer_deferrals``), which bounds the audit records they
write."""

MAX_AUDITED_PARAMS: Final = 1024
"""Claimed parameters larger than this (bytes of JSON) are audited as a hash and a size only:
an unauthenticated peer must not be able to write much into the audit log."""


@dataclass(frozen=True, kw_only=True)
class Operator:
    """Who approved or denied a command, as the kernel reported it on the control socket."""

    user: str
    uid: int
    pid: int
    via: str
    groups: tuple[str, ...] = ()

    def audit_fields(self) -> dict[str, object]:
        return {"by": self.user, "uid": self.uid, "pid": self.pid, "via": self.via}


def _audit_safe(value: object) -> object:
    """Make an untrusted JSON value safe for an audit record (floats become strings)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _audit_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_audit_safe(v) for v in value]
    return value


def _bounded(fields: Mapping[str, object]) -> dict[str, object]:
    """Audit fields of an unverified token: clipped, with large params reduced to a digest."""
    out = {key: _audit_safe(value) for key, value in fields.items()}
    params = out.get("params")
    if params is not None:
        encoded = json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
        if len(encoded) > MAX_AUDITED_PARAMS:
            out["params"] = {
                "sha256": hashlib.sha256(encoded).hexdigest(),
                "bytes": len(encoded),
            }
    return out


@dataclass(frozen=True, kw_only=True)
class CommandLimits:
    """Bounds on what the control plane can make the agent do (docs/PROTOCOL.md §10)."""

    rate: float = 10.0
    """Deliveries per second, sustained; more are refused as ``rate_limited``."""
    burst: int = 50
    timeout: float = 900.0
    """Seconds a driver may take for one command before it is cancelled (``failed``,
    ``timeout``)."""
    max_outbox: int = 10_000
    """Unacknowledged frames beyond which refused deliveries are audited but not queued."""


class CommandProcessor:
    def __init__(
        self,
        *,
        verifier: CommandVerifier,
        policy: Callable[[], Policy],
        state: AgentState,
        audit: AuditLog,
        driver: Driver,
        max_pending: int,
        on_outbox: Callable[[], None],
        log: structlog.typing.FilteringBoundLogger,
        agent_uid: int,
        limits: CommandLimits | None = None,
        receipt_signer: Callable[[], ReceiptSigner | None] = lambda: None,
        streams: StreamManager | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self._policy = policy
        self._state = state
        self._audit = audit
        self._driver = driver
        self._max_pending = max_pending
        self._on_outbox = on_outbox
        self._log = log
        self._agent_uid = agent_uid
        self._limits = limits or CommandLimits()
        self._receipt_signer = receipt_signer
        self._streams = streams
        self._rate = TokenBucket(rate=self._limits.rate, burst=self._limits.burst)
        self._clock = clock
        self._mutations = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._decided_with: dict[str, str] = {}
        self._stopping = False
        self.last_command: dict[str, object] | None = None
        self.outcomes: Counter[tuple[str, str]] = Counter()
        """(command type, final state) -> commands that got there since start (metrics)."""
        self.refusals: Counter[str] = Counter()
        """Refused deliveries by reason since start (metrics)."""

    def set_keys(self, keys: TrustedKeys) -> None:
        """Trust these command-signing keys from now on (a new key set was accepted)."""
        self._verifier = self._verifier.with_keys(keys)

    # -- intake ---------------------------------------------------------------------------

    def handle_delivery(self, ref: str, token: str) -> DeliveryOutcome:
        """Process one ``command`` frame: ``accepted``, ``deferred`` (refused for now, or a
        redelivery: no fault of the peer's) or ``refused`` (a bad delivery: spends the peer's
        error budget).

        Never raises, except AuditError: every outcome is audited and reported, and without an
        audit log nothing may happen at all."""
        now = self._clock()
        claimed = peek(token)
        self._audit.append(
            "command_received",
            ref=ref,
            token_sha256=token_sha256(token),
            **_bounded(claimed.audit_fields()),
        )
        try:
            row = self._verify_and_claim(ref, token, now)
        except CommandRejected as exc:
            self._audit.append(
                "command_verification",
                ref=ref,
                jti=claimed.jti,
                result="rejected",
                reason=exc.code,
                detail=exc.detail,
            )
            self._log.warning(
                "delivery_rejected", ref=ref, jti=claimed.jti, reason=exc.code, detail=exc.detail
            )
            self.refusals[exc.code] += 1
            if self._state.outbox_size() < self._limits.max_outbox:
                self._state.reject_delivery(
                    ref=ref, reason=exc.code, detail=exc.detail, jti=claimed.jti, now=now
                )
                self._on_outbox()
            else:  # a peer that never acknowledges cannot make the outbox grow without bound
                self._log.warning("refusal_not_queued", ref=ref, reason="outbox full")
            return "deferred" if exc.code in BENIGN_REFUSALS else "refused"
        self._audit.append(
            "command_verification",
            ref=ref,
            jti=row.jti,
            result="verified",
            iss=row.iss,
            kid=row.kid,
            exp=int(row.exp),
        )
        self._on_outbox()
        self._log.info("command_accepted", jti=row.jti, ref=ref, type=row.type)
        self.last_command = {"jti": row.jti, "type": row.type, "received_at": now}
        self._decide(row)
        return "accepted"

    def _verify_and_claim(self, ref: str, token: str, now: float) -> CommandRow:
        if self._stopping:
            raise CommandRejected("shutting_down", "the agent is stopping; deliver again later")
        if not self._rate.take(time.monotonic()):
            raise CommandRejected(
                "rate_limited",
                f"more than {self._limits.rate:g} commands/s (burst {self._limits.burst}); "
                "deliver again later",
            )
        verified = self._verifier.verify(token, now=now)
        if verified.exp <= self._state.purged_until():
            # Older than anything the replay cache can still vouch for (e.g. the clock stepped
            # back after its jti was forgotten).
            raise CommandRejected("expired", "the token is older than the replay cache horizon")
        if len(self._tasks) + len(self._expiry) >= self._max_pending:
            raise CommandRejected(
                "busy", f"{self._max_pending} commands are already pending; deliver again later"
            )
        if (
            verified.command_type == OpenStream.type
            and self._streams is not None
            and not self._streams.has_room()
        ):
            raise CommandRejected(
                "busy",
                f"{self._streams.settings.max_streams} streams are already open; "
                "deliver again later",
            )
        earlier = self._state.by_ref(ref)
        if earlier is not None and earlier.token_sha256 != verified.token_sha256:
            # A control plane tracks a command by its delivery ref: a second command under the
            # same ref would run without its statuses being recognised.
            raise CommandRejected(
                "ref_reused", f"ref {ref} already delivered another command ({earlier.jti})"
            )
        row = self._state.claim(verified, ref=ref, now=now)
        if row is not None:
            return row
        # The jti was claimed before: the claim in the database is the one arbiter of replays.
        existing = self._state.get(verified.jti)
        if existing is not None and (existing.ref, existing.token_sha256) == (
            ref,
            verified.token_sha256,
        ):
            raise CommandRejected(
                "duplicate_delivery",
                f"delivery {ref} was received before and is {existing.state}; not run again",
            )
        raise CommandRejected("replayed", f"jti {verified.jti} was already used")

    def _decide(self, row: CommandRow) -> None:
        """Parse and check a ``received`` command against the policy, then act on the verdict."""
        try:
            command = parse_command({"type": row.type, "params": row.params})
        except CommandRejected as exc:
            self._finish_rejected(row.jti, exc.code, exc.detail)
            return
        policy = self._policy()
        decision = policy.decide(command)
        self._audit_decision(row.jti, decision, policy, stage="received")
        if decision.verdict is Verdict.DENY:
            self._finish_rejected(row.jti, "policy_denied", decision.reason)
        elif decision.verdict is Verdict.REQUIRE_APPROVAL:
            self._await_approval(row, decision)
        else:
            self._schedule(row.jti, command, row.exp)

    def _audit_decision(self, jti: str, decision: Decision, policy: Policy, *, stage: str) -> None:
        self._audit.append(
            "policy_decision",
            jti=jti,
            stage=stage,
            verdict=decision.verdict.value,
            rule=decision.rule,
            reason=decision.reason,
            policy_sha256=policy.sha256,
        )
        self._decided_with[jti] = policy.sha256

    # -- approval -------------------------------------------------------------------------

    def _await_approval(self, row: CommandRow, decision: Decision) -> None:
        if row.state != "pending_approval":
            self._transition(row.jti, "pending_approval", detail=decision.reason)
        loop = asyncio.get_running_loop()
        delay = max(0.0, row.exp - self._clock())
        self._expiry[row.jti] = loop.call_later(delay, self._expire_approval, row.jti)

    def _expire_approval(self, jti: str) -> None:
        self._expiry.pop(jti, None)
        row = self._state.get(jti)
        if row is None or row.state != "pending_approval" or row.approved_by:
            return
        self._audit.append("approval_expired", jti=jti, exp=int(row.exp))
        self._finish_rejected(
            jti, "approval_expired", "nobody approved the command before it expired"
        )

    def pending_approvals(self) -> list[CommandRow]:
        return [r for r in self._state.in_states("pending_approval") if not r.approved_by]

    def _authorize(self, jti: str, operator: Operator, action: str) -> None:
        allowed, why = self._policy().may_approve(
            user=operator.user, uid=operator.uid, groups=operator.groups, agent_uid=self._agent_uid
        )
        if not allowed:
            self._audit.append(
                "approval_refused", jti=jti, action=action, reason=why, **operator.audit_fields()
            )
            self._log.warning("approval_refused", jti=jti, by=operator.user, reason=why)
            raise CommandRejected("not_authorized", why)

    def approve(self, jti: str, operator: Operator, note: str | None = None) -> CommandRow:
        row = self._pending_row(jti)
        self._authorize(jti, operator, "approve")
        if self._clock() >= row.exp:
            raise CommandRejected(
                "approval_expired", f"command {jti} expired; it cannot be approved"
            )
        command = parse_command({"type": row.type, "params": row.params})
        self._audit.append("approval_granted", jti=jti, note=note, **operator.audit_fields())
        handle = self._expiry.pop(jti, None)
        if handle is not None:
            handle.cancel()
        self._state.mark_approved(jti, operator.user, now=self._clock())
        if not self._stopping:  # when stopping, the approval is kept and runs after restart
            self._schedule(jti, command, row.exp)
        return self._state.get(jti) or row

    def deny(self, jti: str, operator: Operator, note: str | None = None) -> CommandRow:
        self._pending_row(jti)
        self._authorize(jti, operator, "deny")
        self._audit.append("approval_denied", jti=jti, note=note, **operator.audit_fields())
        handle = self._expiry.pop(jti, None)
        if handle is not None:
            handle.cancel()
        detail = f"denied on the host by {operator.user}" + (f": {note}" if note else "")
        return self._finish_rejected(jti, "denied_by_operator", detail)

    def _pending_row(self, jti: str) -> CommandRow:
        row = self._state.get(jti)
        if row is None:
            raise CommandRejected("unknown_command", f"no command with jti {jti!r}")
        if row.state != "pending_approval" or row.approved_by:
            raise CommandRejected(
                "not_pending", f"command {jti} is {row.state}, not pending approval"
            )
        return row

    # -- execution ------------------------------------------------------------------------

    def _schedule(self, jti: str, command: Command, exp: float) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(jti, command, exp))
        self._tasks[jti] = task
        task.add_done_callback(lambda _t: self._tasks.pop(jti, None))

    async def _execute(self, jti: str, command: Command, exp: float) -> None:
        if command.mutating:
            async with self._mutations:
                await self._run(jti, command, exp)
        else:
            await self._run(jti, command, exp)

    async def _run(self, jti: str, command: Command, exp: float) -> None:
        if self._stopping:
            return  # never started: stays received (or approved) and resumes on the next start
        row = self._state.get(jti)
        if row is None or row.final:
            return
        now = self._clock()
        if now - self._verifier.settings.clock_skew >= exp:
            self._finish_rejected(
                jti, "expired_before_start", "the command expired while waiting to run"
            )
            return
        policy = self._policy()
        decision = policy.decide(command)
        if self._decided_with.get(jti) != policy.sha256:  # changed, or decided before a restart
            self._audit_decision(jti, decision, policy, stage="before_start")
        if decision.verdict is Verdict.DENY:  # the customer tightened the policy meanwhile
            self._finish_rejected(jti, "policy_denied", decision.reason)
            return
        if decision.verdict is Verdict.REQUIRE_APPROVAL and not row.approved_by:
            self._await_approval(row, decision)
            return
        task = asyncio.current_task()
        assert task is not None  # noqa: S101  # always inside the task made by _schedule
        self._running[jti] = task
        try:
            await self._execute_now(jti, command)
        finally:
            self._running.pop(jti, None)
            self._decided_with.pop(jti, None)

    async def _execute_now(self, jti: str, command: Command, *, resumed: bool = False) -> None:
        if not resumed:  # update bridge (issue 15): a resumed command is running already
            self._transition(jti, "running")
        self._audit.append(
            "execution_started", jti=jti, command_type=command.type, params=command.params()
        )
        started = time.monotonic()

        def audit(event: str, /, **fields: object) -> None:
            self._audit.append(event, jti=jti, **fields)

        ctx = ExecContext(jti=jti, audit=audit, log=self._log.bind(jti=jti))
        limit = self._limits.timeout
        if isinstance(command, OpenStream) and self._streams is not None:
            # A stream ends itself at max_duration; this only backs that up.
            limit = command.max_duration + 3 * self._streams.settings.connect_timeout + 5
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                result = await self._call_driver(command, ctx)
        except TimeoutError as exc:
            if not deadline.expired():  # the driver's own timeout, not the command's
                self._driver_crashed(jti, started, exc)
                return
            self._finish_execution(
                jti,
                started,
                "failed",
                reason="timeout",
                detail=f"the command did not finish within {limit:g}s",
                result={},
            )
        except DriverError as exc:
            self._finish_execution(
                jti, started, "failed", reason=exc.code, detail=exc.detail, result=exc.result
            )
        except Handover as exc:  # update bridge (issue 15): the next release reports it
            self._log.info("command_handed_over", jti=jti, detail=exc.detail)
        except asyncio.CancelledError:
            self._audit.append(
                "execution_interrupted", jti=jti, detail="cancelled: the agent is stopping"
            )
            self._transition(
                jti, "interrupted", reason="agent_stopped", detail="cancelled at shutdown"
            )
            raise
        except Exception as exc:  # a driver bug must not take the agent down
            if self._audit.failed:
                raise
            self._driver_crashed(jti, started, exc)
        else:
            self._finish_execution(
                jti, started, "succeeded", reason=None, detail=None, result=result
            )

    def _driver_crashed(self, jti: str, started: float, exc: BaseException) -> None:
        self._log.error("driver_crashed", jti=jti, error=repr(exc), exc_info=exc)
        self._finish_execution(
            jti,
            started,
            "failed",
            reason="internal_error",
            detail=f"{type(exc).__name__}: {exc}",
            result={},
        )

    async def _call_driver(self, command: Command, ctx: ExecContext) -> dict[str, object]:
        match command:
            case Scale(replicas=replicas):
                return await self._driver.scale(replicas, ctx)
            case Upgrade(version=version):
                return await self._driver.upgrade(version, ctx)
            case CollectMetrics(targets=targets):
                return await self._driver.collect_metrics(targets, ctx)
            case OpenStream():
                if self._streams is None:
                    raise DriverError("streams_unavailable", "this agent carries no streams")
                return await self._streams.run(ctx.jti, command, self._policy(), ctx)
            case UpdateAgent():  # update bridge (issue 15): the runner dispatches to Updater.run
                return await update_bridge.run(command, ctx)

    def _finish_execution(
        self,
        jti: str,
        started: float,
        state: str,
        *,
        reason: str | None,
        detail: str | None,
        result: Mapping[str, Any],
    ) -> None:
        """Record how the command ended. Never leaves it ``running``: if recording this outcome
        fails (a result that cannot be encoded, say), it is finished as ``failed``
        (``internal_error``) without a result instead; only an audit failure propagates."""
        try:
            self._record_finish(jti, started, state, reason=reason, detail=detail, result=result)
        except Exception as exc:
            if self._audit.failed or isinstance(exc, AuditError):
                raise
            self._log.error(
                "finish_failed", jti=jti, outcome=state, error=type(exc).__name__, exc_info=exc
            )
            self._record_finish(
                jti,
                started,
                "failed",
                reason="internal_error",
                detail=f"the outcome ({state}) could not be recorded: {type(exc).__name__}",
                result={},
            )

    def _record_finish(
        self,
        jti: str,
        started: float,
        state: str,
        *,
        reason: str | None,
        detail: str | None,
        result: Mapping[str, Any],
    ) -> None:
        wire_result = fit_result(result)  # strict JSON, within the frame limit
        if detail is not None:
            detail = well_formed(detail)
        self._audit.append(
            "execution_finished",
            jti=jti,
            outcome=state,
            reason=reason,
            detail=detail,
            duration_ms=int((time.monotonic() - started) * 1000),
            result_truncated=bool(wire_result.get("truncated", False)),
        )
        self._transition(jti, state, reason=reason, detail=detail, result=wire_result)
        self._log.info("command_finished", jti=jti, outcome=state, reason=reason)

    # -- state changes --------------------------------------------------------------------

    def _transition(self, jti: str, state: str, **fields: Any) -> CommandRow:
        now = self._clock()
        if state in FINAL_STATES:
            fields["receipt"] = self._receipt(jti, state, now, fields)
        row = self._state.transition(jti, state, now=now, **fields)
        if state in FINAL_STATES:
            self._decided_with.pop(jti, None)  # nothing is decided about it any more
            self.outcomes[(row.type, state)] += 1
            head = self._audit.head  # every record about this command is written by now
            self._state.queue_anchor(audit_seq=head.seq, audit_hash=head.hash, now=now)
        self._on_outbox()
        return row

    def _receipt(self, jti: str, state: str, now: float, fields: Mapping[str, Any]) -> str | None:
        """Sign the final report with the agent's own key; None (logged) if the key is not
        usable right now: the result still goes out, unsigned."""
        row = self._state.get(jti)
        try:
            signer = self._receipt_signer()
            if signer is None or row is None:
                return None
            return signer.sign(
                jti=jti,
                ref=row.ref,
                state=state,
                reason=fields.get("reason"),
                result=fields.get("result"),
                at=now,
            )
        except ReceiptInvalid as exc:
            self._log.error("receipt_not_signed", jti=jti, error=str(exc))
            return None

    def _finish_rejected(self, jti: str, reason: str, detail: str) -> CommandRow:
        self._log.info("command_rejected", jti=jti, reason=reason, detail=detail)
        self._audit.append("command_rejected", jti=jti, reason=reason, detail=detail)
        return self._transition(jti, "rejected", reason=reason, detail=detail)

    # -- lifecycle ------------------------------------------------------------------------

    def recover(self) -> None:
        """Pick up where a previous run stopped. Call once, before the tunnel starts."""
        for row in self._state.in_states("running"):
            if update_bridge.resumes(row.type):  # update bridge (issue 15)
                self._resume_update(row)
                continue
            self._audit.append(
                "command_interrupted",
                jti=row.jti,
                detail="the agent stopped while the command was running; outcome unknown",
            )
            self._transition(
                row.jti,
                "interrupted",
                reason="agent_restarted",
                detail="the agent stopped while the command was running; its outcome is unknown",
            )
        for row in self._state.in_states("received", "pending_approval"):
            self._audit.append("command_resumed", jti=row.jti, state=row.state)
            if row.state == "pending_approval" and row.approved_by:
                try:
                    command = parse_command({"type": row.type, "params": row.params})
                except CommandRejected as exc:  # pragma: no cover - parsed when it arrived
                    self._finish_rejected(row.jti, exc.code, exc.detail)
                    continue
                self._schedule(row.jti, command, row.exp)
            else:
                self._decide(row)

    def _resume_update(self, row: CommandRow) -> None:
        """update bridge (issue 15): the updater takes its command up from its journal."""
        command = parse_command({"type": row.type, "params": row.params})
        self._audit.append("command_resumed", jti=row.jti, state=row.state)

        async def resume() -> None:
            async with self._mutations:
                task = asyncio.current_task()
                assert task is not None  # noqa: S101  # inside the task made below
                self._running[row.jti] = task
                try:
                    await self._execute_now(row.jti, command, resumed=True)
                finally:
                    self._running.pop(row.jti, None)

        task = asyncio.get_running_loop().create_task(resume())
        self._tasks[row.jti] = task
        task.add_done_callback(lambda _t: self._tasks.pop(row.jti, None))

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop_accepting(self) -> None:
        """Refuse new deliveries and start nothing new (see the module docstring)."""
        self._stopping = True

    @property
    def running(self) -> int:
        """Commands the driver is executing right now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Commands accepted and waiting for their turn."""
        return len(self._tasks) - len(self._running)

    async def drain(self, grace: float) -> None:
        """Let running commands finish for up to ``grace`` seconds, then cancel them (they are
        reported ``interrupted``). Queued ones are cancelled at once: they never started, stay
        ``received`` in the database and resume on the next start; pending approvals stay
        pending."""
        self.stop_accepting()
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        for jti, task in list(self._tasks.items()):
            if jti not in self._running:
                task.cancel()
        running = list(self._running.values())
        if running:
            _, still_running = await asyncio.wait(running, timeout=grace)
            for task in still_running:
                task.cancel()
        leftovers = list(self._tasks.values())
        if leftovers:
            await asyncio.wait(leftovers)

    def purge(self) -> int:
        try:
            return self._state.purge(now=self._clock())
        except StateError:
            self._log.exception("purge_failed")
            return 0
