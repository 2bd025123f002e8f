"""The life of a command, from a delivered token to a final state. Sans-I/O.

Every input (a delivery, the turn to start, a driver's outcome, an approval, a timer, a restart)
goes to :class:`Lifecycle`, which decides and answers with *effects*: the audit records to write,
the rows to save, the reports for the control plane, the commands to queue or to execute, the
timers to set. The I/O layer (``agent.io.runner``) carries them out, and nothing that an effect
describes happens before the audit records and rows of the same batch are durable. Time is an
argument; so is the policy in force and what the state store knows about a token.

States (docs/PROTOCOL.md §6.1) and the one table that moves between them::

    delivery --verify--> refused (a RefusalReport; no state)
             --claim jti--> RECEIVED --invalid, or the policy denies--------> REJECTED
                              |-- a person must approve --> PENDING_APPROVAL -deny,expiry-> REJECTED
                              |                              '--approve--.
                              '-- allowed: queued -----------------------+--(its turn)--> RUNNING
                                   (checked again at its turn: expired or denied --> REJECTED)
             RUNNING --> SUCCEEDED | FAILED          the driver's outcome
                     --> INTERRUPTED                 cut off mid-action (stopped, restarted)

A command found RUNNING after a restart is INTERRUPTED only if it had *acted*: the driver
audits every action before it takes it, so a command with no such record never touched the
workload, and it is started again (``command_resumed``, ``never_acted``). The CP saw ``running``
once; it sees one final state. A command whose restart is part of it (``update_agent``: the
agent exits so that the new release starts; the ``continues`` types) is taken up again acted or
not, without a second check of its expiry or the policy once it has acted: the executor goes on
from its own journal.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from agent.core.commands import Command, OpenStream, parse_command
from agent.core.errors import CommandRejected
from agent.core.limits import TokenBucket
from agent.core.policy import Decision, Policy, Verdict
from agent.core.results import fit_result, well_formed
from agent.core.verifier import CommandVerifier, TrustedKeys, VerifiedToken, peek, token_sha256

MAX_AUDITED_PARAMS: Final = 1024
"""Claimed parameters larger than this (bytes of JSON) are audited as a hash and a size only:
an unauthenticated peer must not be able to write much into the audit log."""


class CommandState(StrEnum):
    RECEIVED = "received"
    PENDING_APPROVAL = "pending_approval"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES: Final = frozenset(
    {CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.INTERRUPTED}
)


class Step(StrEnum):
    """What happens to a command: the inputs of the transition table."""

    ACCEPTED = "accepted"
    INVALID = "invalid"
    DENIED = "denied"
    NEEDS_APPROVAL = "needs_approval"
    EXPIRED = "expired"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CUT_OFF = "cut_off"


_S = CommandState
TRANSITIONS: Final[Mapping[tuple[CommandState | None, Step], CommandState]] = {
    (None, Step.ACCEPTED): _S.RECEIVED,
    (_S.RECEIVED, Step.INVALID): _S.REJECTED,
    (_S.RECEIVED, Step.DENIED): _S.REJECTED,
    (_S.RECEIVED, Step.EXPIRED): _S.REJECTED,
    (_S.RECEIVED, Step.NEEDS_APPROVAL): _S.PENDING_APPROVAL,
    (_S.RECEIVED, Step.STARTED): _S.RUNNING,
    (_S.PENDING_APPROVAL, Step.INVALID): _S.REJECTED,
    (_S.PENDING_APPROVAL, Step.DENIED): _S.REJECTED,
    (_S.PENDING_APPROVAL, Step.EXPIRED): _S.REJECTED,
    (_S.PENDING_APPROVAL, Step.STARTED): _S.RUNNING,
    # A command resumed after a restart that never acted may still be refused at its turn.
    (_S.RUNNING, Step.INVALID): _S.REJECTED,
    (_S.RUNNING, Step.DENIED): _S.REJECTED,
    (_S.RUNNING, Step.EXPIRED): _S.REJECTED,
    (_S.RUNNING, Step.SUCCEEDED): _S.SUCCEEDED,
    (_S.RUNNING, Step.FAILED): _S.FAILED,
    (_S.RUNNING, Step.CUT_OFF): _S.INTERRUPTED,
}
"""The only moves a command makes. Nothing leaves a final state; RUNNING is left for
REJECTED only by a command that never acted (checked where it happens)."""


class LifecycleError(Exception):
    """An input that the state machine cannot take (a bug in the caller, never the peer's)."""


# -- what the store keeps, and what it knows ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CommandRow:
    """A command as the state store keeps it."""

    jti: str
    ref: str
    iss: str
    kid: str
    type: str
    params: Mapping[str, Any]
    iat: float
    exp: float
    token_sha256: str
    state: CommandState
    received_at: float
    updated_at: float
    reason: str | None = None
    detail: str | None = None
    result: Mapping[str, Any] | None = None
    approved_by: str | None = None
    acted: bool = False
    """A driver wrote an audit record for it: it may have changed the workload."""

    def to_json(self) -> dict[str, object]:
        return {
            "jti": self.jti,
            "ref": self.ref,
            "iss": self.iss,
            "kid": self.kid,
            "type": self.type,
            "params": dict(self.params),
            "exp": self.exp,
            "state": self.state.value,
            "reason": self.reason,
            "detail": self.detail,
            "approved_by": self.approved_by,
            "received_at": self.received_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Known:
    """What the state store knows about a delivery before it is judged: the command already
    claimed under its token's ``jti`` and under its ``ref`` (if any), and the replay cache's
    horizon (every token expiring at or before it may have been forgotten)."""

    by_jti: CommandRow | None = None
    by_ref: CommandRow | None = None
    horizon: float = 0.0


# -- effects -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """Append an audit record."""

    event: str
    fields: Mapping[str, object]


@dataclass(frozen=True)
class Save:
    """Store this row (insert or replace)."""

    row: CommandRow


@dataclass(frozen=True, kw_only=True)
class StatusReport:
    """A ``status`` frame to queue in the outbox (its ``seq`` is the outbox's to give)."""

    jti: str
    ref: str
    state: CommandState
    at: float
    reason: str | None = None
    detail: str | None = None
    result: Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class RefusalReport:
    """A ``delivery_rejected`` frame to queue in the outbox."""

    ref: str
    reason: str
    detail: str
    at: float
    jti: str | None = None


@dataclass(frozen=True)
class Report:
    report: StatusReport | RefusalReport


@dataclass(frozen=True)
class Enqueue:
    """The command may start when its turn comes (mutating ones one at a time, in order)."""

    jti: str
    mutating: bool


@dataclass(frozen=True)
class Execute:
    """Call the driver, once this batch is durable."""

    jti: str
    command: Command


@dataclass(frozen=True)
class Arm:
    """Call :meth:`Lifecycle.expire` at wall-clock time ``at``."""

    jti: str
    at: float


@dataclass(frozen=True)
class Disarm:
    jti: str


@dataclass(frozen=True)
class Note:
    """An operational log line (not an audit record)."""

    level: str
    event: str
    fields: Mapping[str, object]


Effect = Audit | Save | Report | Enqueue | Execute | Arm | Disarm | Note


@dataclass
class Effects:
    """Effects in the order they were decided."""

    items: list[Effect] = field(default_factory=list)

    def add(self, effect: Effect) -> None:
        self.items.append(effect)

    def audit(self, event: str, /, **fields: object) -> None:
        self.items.append(Audit(event, fields))

    def note(self, level: str, event: str, /, **fields: object) -> None:
        self.items.append(Note(level, event, fields))

    def of(self, kind: type[Any]) -> list[Any]:
        return [item for item in self.items if isinstance(item, kind)]


@dataclass(frozen=True)
class Delivered:
    """How a delivery ended: ``refusal`` is None when it was accepted."""

    refusal: str | None
    effects: Effects

    @property
    def accepted(self) -> bool:
        return self.refusal is None


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


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on what the control plane can make the agent do (docs/PROTOCOL.md §10)."""

    max_pending: int = 64
    """Commands accepted and not final (queued, awaiting approval, running)."""
    rate: float = 10.0
    """Deliveries per second, sustained; more are refused as ``rate_limited``."""
    burst: int = 50


# -- the state machine ----------------------------------------------------------------------------


@dataclass
class _Live:
    """A command that is not final, as the lifecycle holds it."""

    row: CommandRow
    command: Command | None = None
    decided_with: str | None = None
    """The policy (its hash) the last decision was made with."""


class Lifecycle:
    """The commands that are not final yet, and every rule about them."""

    def __init__(
        self,
        verifier: CommandVerifier,
        *,
        limits: Limits,
        agent_uid: int,
        continues: frozenset[str] = frozenset(),
    ) -> None:
        """``continues``: the command types whose restart is part of them (``update_agent``
        when the agent updates itself): found RUNNING at start, they are taken up again."""
        self._verifier = verifier
        self._continues = continues
        self._limits = limits
        self._agent_uid = agent_uid
        self._rate = TokenBucket(rate=limits.rate, burst=limits.burst)
        self._live: dict[str, _Live] = {}
        self.stopping = False
        self.outcomes: Counter[tuple[str, str]] = Counter()
        """(command type, final state) -> commands that got there since start (metrics)."""
        self.refusals: Counter[str] = Counter()
        """Refused deliveries by reason since start (metrics)."""
        self.last_command: dict[str, object] | None = None

    @property
    def clock_skew(self) -> float:
        return self._verifier.settings.clock_skew

    def set_keys(self, keys: TrustedKeys) -> None:
        """Trust these command-signing keys from now on (a key set was accepted)."""
        self._verifier = self._verifier.with_keys(keys)

    # -- queries ---------------------------------------------------------------------------

    def get(self, jti: str) -> CommandRow | None:
        live = self._live.get(jti)
        return live.row if live is not None else None

    def pending_approvals(self) -> list[CommandRow]:
        return [
            live.row
            for live in self._live.values()
            if live.row.state is CommandState.PENDING_APPROVAL and not live.row.approved_by
        ]

    def __len__(self) -> int:
        return len(self._live)

    # -- intake ----------------------------------------------------------------------------

    def deliver(
        self,
        ref: str,
        token: str,
        *,
        now: float,
        mono: float,
        policy: Policy,
        known: Known,
        stream_room: bool = True,
    ) -> Delivered:
        """One ``command`` frame: verify, claim its ``jti``, decide. Every outcome is audited
        and reported; ``refusal`` is the delivery_rejected reason, if it was refused."""
        fx = Effects()
        claimed = peek(token)
        fx.audit(
            "command_received",
            ref=ref,
            token_sha256=token_sha256(token),
            **_bounded(claimed.audit_fields()),
        )
        try:
            verified = self._admit(ref, token, now=now, mono=mono, known=known, room=stream_room)
        except CommandRejected as exc:
            fx.audit(
                "command_verification",
                ref=ref,
                jti=claimed.jti,
                result="rejected",
                reason=exc.code,
                detail=exc.detail,
            )
            fx.note("warning", "delivery_rejected", ref=ref, jti=claimed.jti, reason=exc.code)
            self.refusals[exc.code] += 1
            fx.add(
                Report(
                    RefusalReport(
                        ref=ref, reason=exc.code, detail=exc.detail, at=now, jti=claimed.jti
                    )
                )
            )
            return Delivered(exc.code, fx)
        fx.audit(
            "command_verification",
            ref=ref,
            jti=verified.jti,
            result="verified",
            iss=verified.iss,
            kid=verified.kid,
            exp=int(verified.exp),
        )
        row = CommandRow(
            jti=verified.jti,
            ref=ref,
            iss=verified.iss,
            kid=verified.kid,
            type=verified.command_type,
            params=verified.params,
            iat=verified.iat,
            exp=verified.exp,
            token_sha256=verified.token_sha256,
            state=self._next(None, Step.ACCEPTED),
            received_at=now,
            updated_at=now,
        )
        self._live[row.jti] = _Live(row)
        fx.add(Save(row))
        fx.add(Report(StatusReport(jti=row.jti, ref=ref, state=row.state, at=now)))
        fx.note("info", "command_accepted", jti=row.jti, ref=ref, type=row.type)
        self.last_command = {"jti": row.jti, "type": row.type, "received_at": now}
        self._decide(row.jti, now=now, policy=policy, fx=fx)
        return Delivered(None, fx)

    def _admit(
        self, ref: str, token: str, *, now: float, mono: float, known: Known, room: bool
    ) -> VerifiedToken:
        """§5.2 in order; raises CommandRejected with the first failed check's code."""
        if self.stopping:
            raise CommandRejected("shutting_down", "the agent is stopping; deliver again later")
        if not self._rate.take(mono):
            raise CommandRejected(
                "rate_limited",
                f"more than {self._limits.rate:g} commands/s (burst {self._limits.burst}); "
                "deliver again later",
            )
        verified = self._verifier.verify(token, now=now)
        if verified.exp <= known.horizon:
            # Older than anything the replay cache can still vouch for (e.g. the clock stepped
            # back after its jti was forgotten).
            raise CommandRejected("expired", "the token is older than the replay cache horizon")
        if len(self._live) >= self._limits.max_pending:
            raise CommandRejected(
                "busy",
                f"{self._limits.max_pending} commands are already pending; deliver again later",
            )
        if verified.command_type == OpenStream.type and not room:
            raise CommandRejected("busy", "the stream limit is reached; deliver again later")
        earlier = known.by_ref
        if earlier is not None and earlier.token_sha256 != verified.token_sha256:
            # A control plane tracks a command by its delivery ref: a second command under the
            # same ref would run without its statuses being recognised.
            raise CommandRejected(
                "ref_reused", f"ref {ref} already delivered another command ({earlier.jti})"
            )
        existing = known.by_jti
        if existing is not None:  # the claim in the store is the one arbiter of replays
            if (existing.ref, existing.token_sha256) == (ref, verified.token_sha256):
                raise CommandRejected(
                    "duplicate_delivery",
                    f"delivery {ref} was received before and is {existing.state}; not run again",
                )
            raise CommandRejected("replayed", f"jti {verified.jti} was already used")
        return verified

    def _decide(self, jti: str, *, now: float, policy: Policy, fx: Effects) -> None:
        """Parse and judge a RECEIVED command, then act on the verdict."""
        live = self._live[jti]
        try:
            live.command = parse_command({"type": live.row.type, "params": live.row.params})
        except CommandRejected as exc:
            self._reject(jti, Step.INVALID, exc.code, exc.detail, now=now, fx=fx)
            return
        decision = policy.decide(live.command)
        self._audit_decision(live, decision, policy, stage="received", fx=fx)
        self._act_on(live, decision, now=now, fx=fx)

    def _act_on(self, live: _Live, decision: Decision, *, now: float, fx: Effects) -> None:
        assert live.command is not None  # noqa: S101  # parsed before any decision
        if decision.verdict is Verdict.DENY:
            self._reject(
                live.row.jti, Step.DENIED, "policy_denied", decision.reason, now=now, fx=fx
            )
        elif decision.verdict is Verdict.REQUIRE_APPROVAL and not live.row.approved_by:
            self._move(live, Step.NEEDS_APPROVAL, now=now, fx=fx, detail=decision.reason)
            fx.add(Arm(live.row.jti, live.row.exp))
        else:
            fx.add(Enqueue(live.row.jti, live.command.mutating))

    @staticmethod
    def _audit_decision(
        live: _Live, decision: Decision, policy: Policy, *, stage: str, fx: Effects
    ) -> None:
        fx.audit(
            "policy_decision",
            jti=live.row.jti,
            stage=stage,
            verdict=decision.verdict.value,
            rule=decision.rule,
            reason=decision.reason,
            policy_sha256=policy.sha256,
        )
        live.decided_with = policy.sha256

    # -- execution -------------------------------------------------------------------------

    def begin(self, jti: str, *, now: float, policy: Policy) -> Effects:
        """The command's turn has come: check it again and start it (``Execute``), or refuse
        it. A command already final or unknown (denied meanwhile) gives no effect."""
        fx = Effects()
        live = self._live.get(jti)
        if live is None or self.stopping:
            return fx  # stopping: it never started, it stays as it is and resumes next time
        row = live.row
        if row.state is CommandState.PENDING_APPROVAL and not row.approved_by:
            return fx  # not approved (yet): nothing to start
        if row.state is CommandState.RUNNING and row.acted and row.type in self._continues:
            # resumed after a restart that is part of it: it is under way, no second check
            return self._start(live, now=now, fx=fx)
        if now - self.clock_skew >= row.exp:
            self._reject(
                jti,
                Step.EXPIRED,
                "expired_before_start",
                "the command expired while waiting to run",
                now=now,
                fx=fx,
            )
            return fx
        assert live.command is not None  # noqa: S101  # parsed when it was decided
        decision = policy.decide(live.command)
        if live.decided_with != policy.sha256:  # changed meanwhile, or decided before a restart
            self._audit_decision(live, decision, policy, stage="before_start", fx=fx)
        if decision.verdict is Verdict.REQUIRE_APPROVAL and not row.approved_by:
            if row.state is CommandState.RUNNING:  # resumed: it cannot go back to waiting
                decision = Decision(
                    Verdict.DENY, decision.rule, f"{decision.reason} (it needs approval now)"
                )
            elif row.state is CommandState.RECEIVED:
                self._act_on(live, decision, now=now, fx=fx)
                return fx
        if decision.verdict is Verdict.DENY:  # the customer tightened the policy meanwhile
            self._reject(jti, Step.DENIED, "policy_denied", decision.reason, now=now, fx=fx)
            return fx
        return self._start(live, now=now, fx=fx)

    def _start(self, live: _Live, *, now: float, fx: Effects) -> Effects:
        command = live.command
        assert command is not None  # noqa: S101  # parsed when it was decided
        jti = live.row.jti
        fx.audit("execution_started", jti=jti, command_type=command.type, params=command.params())
        if live.row.state is CommandState.RUNNING:  # resumed: no second ``running`` report
            live.row = replace(live.row, updated_at=now)
            fx.add(Save(live.row))
        else:
            self._move(live, Step.STARTED, now=now, fx=fx)
        fx.add(Execute(jti, command))
        return fx

    def acted(self, jti: str, event: str, fields: Mapping[str, object]) -> Effects:
        """A driver audits an action it is about to take for ``jti``: record it, and remember
        that the command may have changed the workload."""
        fx = Effects()
        fx.audit(event, jti=jti, **fields)
        live = self._live.get(jti)
        if live is not None and not live.row.acted:
            live.row = replace(live.row, acted=True)
            fx.add(Save(live.row))
        return fx

    def finish(
        self,
        jti: str,
        *,
        succeeded: bool,
        now: float,
        duration_ms: int,
        reason: str | None = None,
        detail: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> Effects:
        """The driver returned (``succeeded``) or failed with ``reason``. The result is made
        to fit the wire first; if even that fails, the command fails as ``internal_error``."""
        fx = Effects()
        try:
            wire_result = fit_result(result or {})
        except Exception as exc:  # whatever a driver returned, the command must not stay RUNNING
            succeeded, reason = False, "internal_error"
            detail = f"the outcome could not be recorded: {type(exc).__name__}"
            wire_result = {}
        state_step = Step.SUCCEEDED if succeeded else Step.FAILED
        if detail is not None:
            detail = well_formed(detail)
        fx.audit(
            "execution_finished",
            jti=jti,
            outcome=self._next(CommandState.RUNNING, state_step).value,
            reason=reason,
            detail=detail,
            duration_ms=duration_ms,
            result_truncated=bool(wire_result.get("truncated", False)),
        )
        live = self._live[jti]
        self._move(
            live, state_step, now=now, fx=fx, reason=reason, detail=detail, result=wire_result
        )
        fx.note("info", "command_finished", jti=jti, outcome=live.row.state.value, reason=reason)
        return fx

    def cut_off(self, jti: str, *, now: float, reason: str, detail: str) -> Effects:
        """The agent stopped while the command was running (its outcome is unknown)."""
        fx = Effects()
        live = self._live.get(jti)
        if live is None:
            return fx
        fx.audit("execution_interrupted", jti=jti, detail=detail)
        self._move(live, Step.CUT_OFF, now=now, fx=fx, reason=reason, detail=detail)
        return fx

    # -- approvals -------------------------------------------------------------------------

    def approve(
        self,
        jti: str,
        operator: Operator,
        *,
        note: str | None,
        now: float,
        policy: Policy,
        fx: Effects,
    ) -> CommandRow:
        """Approve a pending command (raises CommandRejected with why not; the effects of a
        refused attempt, its audit record, are in ``fx`` all the same)."""
        live = self._pending(jti)
        self._authorize(jti, operator, "approve", policy, fx)
        if now >= live.row.exp:
            raise CommandRejected(
                "approval_expired", f"command {jti} expired; it cannot be approved"
            )
        fx.audit("approval_granted", jti=jti, note=note, **operator.audit_fields())
        fx.add(Disarm(jti))
        live.row = replace(live.row, approved_by=operator.user, updated_at=now)
        fx.add(Save(live.row))
        if not self.stopping:  # when stopping, the approval is kept and runs after restart
            assert live.command is not None  # noqa: S101  # parsed when it was decided
            fx.add(Enqueue(jti, live.command.mutating))
        return live.row

    def deny(
        self,
        jti: str,
        operator: Operator,
        *,
        note: str | None,
        now: float,
        policy: Policy,
        fx: Effects,
    ) -> CommandRow:
        self._pending(jti)
        self._authorize(jti, operator, "deny", policy, fx)
        fx.audit("approval_denied", jti=jti, note=note, **operator.audit_fields())
        fx.add(Disarm(jti))
        detail = f"denied on the host by {operator.user}" + (f": {note}" if note else "")
        return self._reject(jti, Step.DENIED, "denied_by_operator", detail, now=now, fx=fx)

    def expire(self, jti: str, *, now: float) -> Effects:
        """The approval timer of ``jti`` fired."""
        fx = Effects()
        live = self._live.get(jti)
        if (
            live is None
            or live.row.state is not CommandState.PENDING_APPROVAL
            or live.row.approved_by
        ):
            return fx
        fx.audit("approval_expired", jti=jti, exp=int(live.row.exp))
        self._reject(
            jti,
            Step.EXPIRED,
            "approval_expired",
            "nobody approved the command before it expired",
            now=now,
            fx=fx,
        )
        return fx

    def _pending(self, jti: str) -> _Live:
        live = self._live.get(jti)
        if live is None:
            raise CommandRejected("unknown_command", f"no pending command with jti {jti!r}")
        if live.row.state is not CommandState.PENDING_APPROVAL or live.row.approved_by:
            raise CommandRejected(
                "not_pending", f"command {jti} is {live.row.state}, not pending approval"
            )
        return live

    def _authorize(
        self, jti: str, operator: Operator, action: str, policy: Policy, fx: Effects
    ) -> None:
        allowed, why = policy.may_approve(
            user=operator.user, uid=operator.uid, groups=operator.groups, agent_uid=self._agent_uid
        )
        if not allowed:
            fx.audit(
                "approval_refused", jti=jti, action=action, reason=why, **operator.audit_fields()
            )
            fx.note("warning", "approval_refused", jti=jti, by=operator.user, reason=why)
            raise CommandRejected("not_authorized", why)

    # -- restart ---------------------------------------------------------------------------

    def recover(self, rows: list[CommandRow], *, now: float, policy: Policy) -> Effects:
        """Pick up the commands a previous run left unfinished (``rows``, oldest first)."""
        fx = Effects()
        for row in rows:
            self._live[row.jti] = live = _Live(row)
            running = row.state is CommandState.RUNNING
            if running and row.acted and row.type not in self._continues:
                detail = "the agent stopped while the command was running; its outcome is unknown"
                self._cut_off_at_start(live, "agent_restarted", detail, now=now, fx=fx)
                continue
            fx.audit(
                "command_resumed",
                jti=row.jti,
                state=row.state.value,
                never_acted=running and not row.acted,
            )
            try:
                live.command = parse_command({"type": row.type, "params": row.params})
            except CommandRejected as exc:  # parsed when it arrived; only a corrupt store
                if running and row.acted:
                    self._cut_off_at_start(live, exc.code, exc.detail, now=now, fx=fx)
                else:
                    self._reject(row.jti, Step.INVALID, exc.code, exc.detail, now=now, fx=fx)
                continue
            if running or (row.state is CommandState.PENDING_APPROVAL and row.approved_by):
                # RUNNING: never acted, or a ``continues`` type that goes on after the restart
                fx.add(Enqueue(row.jti, live.command.mutating))
            elif row.state is CommandState.PENDING_APPROVAL:
                fx.add(Arm(row.jti, row.exp))
            else:
                live.command = None
                self._decide(row.jti, now=now, policy=policy, fx=fx)
        return fx

    def _cut_off_at_start(
        self, live: _Live, reason: str, detail: str, *, now: float, fx: Effects
    ) -> None:
        fx.audit("command_interrupted", jti=live.row.jti, detail=detail)
        self._move(live, Step.CUT_OFF, now=now, fx=fx, reason=reason, detail=detail)

    # -- moves -----------------------------------------------------------------------------

    @staticmethod
    def _next(state: CommandState | None, step: Step) -> CommandState:
        try:
            return TRANSITIONS[(state, step)]
        except KeyError:
            raise LifecycleError(f"no move from {state} on {step}") from None

    def _move(
        self,
        live: _Live,
        step: Step,
        *,
        now: float,
        fx: Effects,
        reason: str | None = None,
        detail: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> CommandRow:
        """Apply one transition: save the row, report the new state; a final one leaves the
        live set (the store keeps it for the replay cache)."""
        old = live.row
        if (
            old.state is CommandState.RUNNING
            and step in (Step.INVALID, Step.DENIED, Step.EXPIRED)
            and old.acted
        ):
            raise LifecycleError(f"{old.jti} acted: it cannot be refused any more")
        state = self._next(old.state, step)
        row = replace(old, state=state, updated_at=now, reason=reason, detail=detail, result=result)
        live.row = row
        fx.add(Save(row))
        fx.add(
            Report(
                StatusReport(
                    jti=row.jti,
                    ref=row.ref,
                    state=state,
                    at=now,
                    reason=reason,
                    detail=detail,
                    result=result,
                )
            )
        )
        if state.final:
            del self._live[row.jti]
            self.outcomes[(row.type, state.value)] += 1
        return row

    def _reject(
        self, jti: str, step: Step, reason: str, detail: str, *, now: float, fx: Effects
    ) -> CommandRow:
        fx.audit("command_rejected", jti=jti, reason=reason, detail=detail)
        fx.note("info", "command_rejected", jti=jti, reason=reason, detail=detail)
        return self._move(self._live[jti], step, now=now, fx=fx, reason=reason, detail=detail)


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
