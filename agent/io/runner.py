"""Carries out what the lifecycle decides (agent/core/lifecycle.py).

Everything that changes a command or the outbox comes here as *work*: a delivery or an ack from
the tunnel, an approval from the control socket, a driver's audit record or outcome, a timer.
The runner takes all the work that is waiting, applies it in one journal batch (one SQLite
transaction, the audit records in order) and commits; the batch becomes durable when the
journal's syncer says so, and only then does the runner act on it: start the driver, let the
outbox's new frames go, answer whoever waited. A turn that found a hundred deliveries makes one
batch and one fsync for all of them (agent/io/journal.py).

Mutating commands (scale, upgrade) run one at a time, in the order they became ready; read-only
ones (collect_metrics, open_stream) run beside them. A command whose turn comes in the batch that
accepted it starts from that batch: its ``received``, ``running`` and ``execution_started``
reach the disk together.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from agent.core.commands import (
    CollectMetrics,
    Command,
    OpenStream,
    Scale,
    UpdateAgent,
    Upgrade,
)
from agent.core.errors import AuditError, CommandRejected, DriverError, Handover, StateError
from agent.core.frames import Anchor, DeliveryRejected, Frame, KeySetStatus, Status
from agent.core.lifecycle import (
    Arm,
    Audit,
    CommandRow,
    Disarm,
    Effects,
    Enqueue,
    Execute,
    Lifecycle,
    Note,
    Operator,
    RefusalReport,
    Report,
    Save,
    StatusReport,
)
from agent.core.receipts import ReceiptInvalid, ReceiptSigner
from agent.core.session import AgentSession, CloseRequested, Event, Outbox
from agent.core.trust import DiscardKeySets, SaveKeySet, Trust, TrustEffect, TrustRecord
from agent.core.verifier import peek
from agent.drivers.base import Driver, ExecContext
from agent.io import failpoints
from agent.io.clock import Clock
from agent.io.journal import Batch, Journal
from agent.io.policy_file import PolicyFile
from agent.io.streams import StreamManager

Work = Callable[[Batch], None]


class Peer(Protocol):
    """The connection a frame came in on, as the runner needs it (agent/io/tunnel.py)."""

    session: AgentSession

    def close(self, code: int, reason: str) -> None: ...

    def send(self, frame: Frame) -> None: ...


class UpdateRunner(Protocol):
    """What carries out ``update_agent`` (agent/update/updater.py)."""

    async def run(self, command: UpdateAgent, ctx: ExecContext) -> dict[str, object]: ...

    def time_limit(self, command_timeout: float) -> float:
        """Seconds the command may take (after a restart it waits for the trial's end)."""
        ...


UPDATE_NOT_CONFIGURED: Final = (
    "this agent does not update itself here (no [update] in its configuration); on Kubernetes "
    "its image is updated by a rollout of its Deployment (README 'Updating the agent')"
)


@dataclass(frozen=True, kw_only=True)
class RunnerSettings:
    command_timeout: float = 900.0
    """Seconds a driver may take for one command before it is cancelled (``failed``,
    ``timeout``)."""


class Runner:
    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        trust: Trust,
        outbox: Outbox,
        journal: Journal,
        driver: Driver,
        streams: StreamManager,
        policy: PolicyFile,
        receipts: Callable[[], ReceiptSigner | None],
        on_outbox: Callable[[], None],
        settings: RunnerSettings,
        clock: Clock,
        log: structlog.typing.FilteringBoundLogger,
        updater: UpdateRunner | None = None,
    ) -> None:
        """``updater``: carries out ``update_agent`` (None: the command fails
        ``not_supported``)."""
        self.lifecycle = lifecycle
        self.trust = trust
        self.outbox = outbox
        self._journal = journal
        self._store = journal.store
        self._driver = driver
        self._updater = updater
        self._streams = streams
        self._policy = policy
        self._receipts = receipts
        self._on_outbox = on_outbox
        self._settings = settings
        self._clock = clock
        self._log = log
        self._inbox: list[Work] = []
        self._wake = asyncio.Event()
        self._after: deque[tuple[int, Callable[[], None]]] = deque()
        self._waiters: set[asyncio.Future[Any]] = set()
        self._mutations: deque[str] = deque()
        self._mutating: str | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._anchor_due = False
        self._anchored = -1
        self._acked = asyncio.Event()
        journal.on_durable(self._durable)
        journal.on_failure(self._failed)

    # -- work in -------------------------------------------------------------------------------

    def submit(self, work: Work) -> None:
        self._inbox.append(work)
        self._wake.set()

    def deliver(self, peer: Peer, ref: str, token: str) -> None:
        """A ``command`` frame arrived on ``peer``'s session."""
        self.submit(lambda batch: self._deliver(batch, peer, ref, token))

    def ack(self, peer: Peer, seq: int) -> None:
        self.submit(lambda batch: self._ack(batch, peer, seq))

    def offer_keyset(self, peer: Peer, token: str) -> None:
        self.submit(lambda batch: self._offer_keyset(batch, peer, token))

    def record(self, event: str, /, **fields: object) -> None:
        """An audit record of something observed (not an action about to be taken)."""

        def work(batch: Batch) -> None:
            batch.record(event, **fields)

        self.submit(work)

    async def write(self, event: str, /, **fields: object) -> None:
        """An audit record that must be on disk before the caller goes on (it is about to act)."""

        def work(batch: Batch, done: Callable[[object], None]) -> None:
            batch.record(event, **fields)
            done(None)

        await self._ask(work)

    def anchor(self) -> None:
        """Send the audit head to the control plane if it moved since the last anchor."""
        self.submit(lambda batch: self._anchor(batch, only_if_moved=True))

    def purge(self) -> None:
        self.submit(self._purge)

    async def approve(self, jti: str, operator: Operator, note: str | None) -> CommandRow:
        return await self._by_person(self.lifecycle.approve, jti, operator, note)

    async def deny(self, jti: str, operator: Operator, note: str | None) -> CommandRow:
        return await self._by_person(self.lifecycle.deny, jti, operator, note)

    async def _by_person(
        self,
        decide: Callable[..., CommandRow],
        jti: str,
        operator: Operator,
        note: str | None,
    ) -> CommandRow:
        """A person's approval or denial (``Lifecycle.approve``/``deny``), answered once
        durable; a refused attempt is audited and raised (CommandRejected)."""

        def work(batch: Batch, done: Callable[[object], None]) -> None:
            fx = Effects()
            try:
                row = decide(
                    jti,
                    operator,
                    note=note,
                    now=self._clock.time(),
                    policy=self._policy.current,
                    fx=fx,
                )
            except CommandRejected as exc:
                done(exc)
                row = None
            self._apply(batch, fx)
            if row is not None:
                done(row)

        result = await self._ask(work)
        assert isinstance(result, CommandRow)  # noqa: S101  # _ask raised otherwise
        return result

    async def _ask(self, work: Callable[[Batch, Callable[[object], None]], None]) -> object:
        """Run ``work`` in the next batch; its answer (``done(value)``) is returned once that
        batch is durable (an exception passed to ``done`` is raised)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiters.add(future)

        def item(batch: Batch) -> None:
            answers: list[object] = []
            work(batch, answers.append)
            value = answers[0] if answers else None

            def resolve() -> None:
                if future.done():
                    return
                if isinstance(value, BaseException):
                    future.set_exception(value)
                else:
                    future.set_result(value)

            self._after.append((batch.commit, resolve))

        self.submit(item)
        try:
            return await future
        finally:
            self._waiters.discard(future)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply work in batches until cancelled. A journal failure ends it (raised)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.turn()

    def turn(self) -> None:
        """Apply everything waiting, in one batch."""
        work, self._inbox = self._inbox, []
        if not work:
            return
        next_seq = self.outbox.next_seq
        with self._journal.batch() as batch:
            for item in work:
                item(batch)
            if self._anchor_due:
                self._anchor(batch, only_if_moved=False)
            if self.outbox.next_seq != next_seq:
                self._store.set_next_seq(self.outbox.next_seq)

    async def settle(self) -> None:
        """Until every piece of work submitted so far is applied and durable."""
        while self._inbox:
            self.turn()
        await self._journal.settle()

    def _durable(self, commit: int) -> None:
        while self._after and self._after[0][0] <= commit:
            _, action = self._after.popleft()
            action()
        self._on_outbox()  # frames of this batch (or earlier ones) may go now

    def _failed(self, exc: BaseException) -> None:
        error = AuditError(f"the journal failed: {exc}")
        for future in list(self._waiters):
            if not future.done():
                future.set_exception(error)

    # -- applying the lifecycle's effects ------------------------------------------------------

    def _apply(self, batch: Batch, fx: Effects) -> None:
        now = self._clock.time()
        for effect in fx.items:
            match effect:
                case Audit(event=event, fields=fields):
                    batch.record(event, **fields)
                case Save(row=row):
                    self._store.save(row)
                case Report(report=report):
                    self._report(batch, report, now)
                case Enqueue(jti=jti, mutating=mutating):
                    self._enqueue(batch, jti, mutating)
                case Execute(jti=jti, command=command):
                    self._after.append((batch.commit, functools.partial(self._start, jti, command)))
                case Arm(jti=jti, at=at):
                    self._arm(jti, at)
                case Disarm(jti=jti):
                    handle = self._timers.pop(jti, None)
                    if handle is not None:
                        handle.cancel()
                case Note(level=level, event=event, fields=fields):
                    getattr(self._log, level)(event, **fields)

    def _report(self, batch: Batch, report: StatusReport | RefusalReport, now: float) -> None:
        if isinstance(report, RefusalReport):
            body: dict[str, object] = {
                "ref": report.ref,
                "reason": report.reason,
                "detail": report.detail,
                "at": report.at,
            }
            if report.jti is not None:
                body["jti"] = report.jti
            entry = self.outbox.add(
                DeliveryRejected.type, body, commit=batch.commit, state="rejected"
            )
            if entry is None:  # a peer that never acknowledges cannot make the outbox grow
                self._log.warning("refusal_not_queued", ref=report.ref, reason="outbox full")
                return
        else:
            body = {
                key: value
                for key, value in {
                    "ref": report.ref,
                    "jti": report.jti,
                    "state": report.state.value,
                    "at": report.at,
                    "reason": report.reason,
                    "detail": report.detail,
                    "result": report.result,
                }.items()
                if value is not None
            }
            if report.state.final:
                receipt = self._receipt(report)
                if receipt is not None:
                    body["receipt"] = receipt
                self._anchor_due = True
            entry = self.outbox.add(
                Status.type, body, commit=batch.commit, jti=report.jti, state=report.state.value
            )
            assert entry is not None  # noqa: S101  # statuses are always kept
        self._store.add_outbox(entry, now=now)

    def _receipt(self, report: StatusReport) -> str | None:
        """The agent's signature over a final report; None (logged) if its key is not usable
        right now: the result still goes out, unsigned."""
        try:
            signer = self._receipts()
            if signer is None:
                return None
            return signer.sign(
                jti=report.jti,
                ref=report.ref,
                state=report.state.value,
                reason=report.reason,
                result=report.result,
                at=report.at,
            )
        except ReceiptInvalid as exc:
            self._log.error("receipt_not_signed", jti=report.jti, error=str(exc))
            return None

    def _anchor(self, batch: Batch, *, only_if_moved: bool) -> None:
        self._anchor_due = False
        head = self._journal.head
        if head.seq == 0 or (only_if_moved and head.seq == self._anchored):
            return
        waiting = self.outbox.waiting_anchor()
        if waiting is not None:  # only the newest anchor matters
            self.outbox.remove(waiting.seq)
            self._store.delete_outbox(waiting.seq)
        now = self._clock.time()
        body = {"audit_seq": head.seq, "audit_hash": head.hash, "at": now}
        entry = self.outbox.add(Anchor.type, body, commit=batch.commit)
        assert entry is not None  # noqa: S101  # anchors are always kept
        self._store.add_outbox(entry, now=now)
        self._anchored = head.seq

    def _arm(self, jti: str, at: float) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, at - self._clock.time())
        previous = self._timers.pop(jti, None)
        if previous is not None:
            previous.cancel()

        def fire() -> None:
            self._timers.pop(jti, None)
            self.submit(
                lambda batch: self._apply(batch, self.lifecycle.expire(jti, now=self._clock.time()))
            )

        self._timers[jti] = loop.call_later(delay, fire)

    # -- intake ----------------------------------------------------------------------------------

    def _deliver(self, batch: Batch, peer: Peer, ref: str, token: str) -> None:
        known = self._store.known(jti=peek(token).jti, ref=ref)
        delivered = self.lifecycle.deliver(
            ref,
            token,
            now=self._clock.time(),
            mono=self._clock.monotonic(),
            policy=self._policy.current,
            known=known,
            stream_room=self._streams.has_room(),
        )
        self._apply(batch, delivered.effects)
        self._budget(
            peer, peer.session.delivery_outcome(delivered.refusal, self._clock.monotonic())
        )

    def _ack(self, batch: Batch, peer: Peer, seq: int) -> None:
        entry, events = peer.session.acknowledge(seq, self.outbox, self._clock.monotonic())
        if events:
            self._log.warning("ack_for_unsent_frame", seq=seq, last_sent=peer.session.last_sent)
            self._budget(peer, events)
            return
        if entry is None:
            return  # a repeated ack
        self._store.delete_outbox(seq)
        self._acked.set()
        if entry.kind == Anchor.type:
            return  # an anchor's: a record would move the head it reported
        if entry.reports_final:
            batch.record("result_delivered", jti=entry.jti, state=entry.state, frame_seq=seq)
        elif entry.kind == DeliveryRejected.type:
            batch.record(
                "result_delivered",
                ref=entry.body.get("ref"),
                state="delivery_rejected",
                reason=entry.body.get("reason"),
                frame_seq=seq,
            )

    def _offer_keyset(self, batch: Batch, peer: Peer, token: str) -> None:
        status, effects = self.trust.offer(
            token, now=self._clock.time(), clock_skew=self.lifecycle.clock_skew
        )
        apply_trust(batch, effects, self._clock, self._log)
        if status.accepted:
            self.lifecycle.set_keys(self.trust.keys())
        events = peer.session.keyset_outcome(
            status.accepted, status.reason, self._clock.monotonic()
        )

        def answer(frame: KeySetStatus = status) -> None:
            peer.send(frame)
            self._budget(peer, events)

        self._after.append((batch.commit, answer))

    @staticmethod
    def _budget(peer: Peer, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, CloseRequested):
                peer.close(event.code, event.reason)

    def _purge(self, batch: Batch) -> None:
        try:
            purged = self._store.purge(now=self._clock.time())
        except StateError:
            self._log.exception("purge_failed")
            return
        if purged.commands:
            self._log.info("replay_cache_purged", commands=purged.commands)

    # -- execution -----------------------------------------------------------------------------

    def recover(self) -> None:
        """Pick up where a previous run stopped (call once, before any other work)."""
        self.submit(
            lambda batch: self._apply(
                batch,
                self.lifecycle.recover(
                    self._store.unfinished(), now=self._clock.time(), policy=self._policy.current
                ),
            )
        )

    def _enqueue(self, batch: Batch, jti: str, mutating: bool) -> None:
        if not mutating:
            self._begin(batch, jti)
            return
        self._mutations.append(jti)
        self._next_mutation(batch)

    def _next_mutation(self, batch: Batch) -> None:
        while self._mutating is None and self._mutations and not self.lifecycle.stopping:
            jti = self._mutations.popleft()
            self._mutating = jti
            if not self._begin(batch, jti):
                self._mutating = None  # refused at its turn, or waits for approval again

    def _begin(self, batch: Batch, jti: str) -> bool:
        """The command's turn: True if it starts (once this batch is durable)."""
        fx = self.lifecycle.begin(jti, now=self._clock.time(), policy=self._policy.current)
        self._apply(batch, fx)
        return bool(fx.of(Execute))

    def _start(self, jti: str, command: Command) -> None:
        failpoints.reach("before_execute")
        task = asyncio.get_running_loop().create_task(self._execute(jti, command))
        self._running[jti] = task

    async def _execute(self, jti: str, command: Command) -> None:
        started = self._clock.monotonic()
        outcome: dict[str, Any] = {"succeeded": True}
        ctx = ExecContext(jti=jti, audit=self._driver_audit(jti), log=self._log.bind(jti=jti))
        limit = self._settings.command_timeout
        if isinstance(command, OpenStream):
            # A stream ends itself at max_duration; this only backs that up.
            limit = command.max_duration + 3 * self._streams.settings.connect_timeout + 5
        elif isinstance(command, UpdateAgent) and self._updater is not None:
            limit = self._updater.time_limit(limit)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                outcome["result"] = await self._call(command, ctx)
        except TimeoutError as exc:
            if deadline.expired():
                outcome = _failure("timeout", f"the command did not finish within {limit:g}s")
            else:  # the driver's own timeout, not the command's
                outcome = self._crashed(jti, exc)
        except DriverError as exc:
            outcome = _failure(exc.code, exc.detail, exc.result)
        except Handover as exc:  # the agent restarts; the next process carries it on
            self._log.info("command_handed_over", jti=jti, detail=exc.detail)
            return
        except asyncio.CancelledError:
            self.submit(
                lambda batch: self._apply(
                    batch,
                    self.lifecycle.cut_off(
                        jti,
                        now=self._clock.time(),
                        reason="agent_stopped",
                        detail="cancelled at shutdown",
                    ),
                )
            )
            raise
        except AuditError:
            raise  # the journal failed: the agent is stopping, nothing more is recorded
        except Exception as exc:  # a driver bug must not take the agent down
            outcome = self._crashed(jti, exc)
        finally:
            self._running.pop(jti, None)
        failpoints.reach("driver_returned")
        duration_ms = int((self._clock.monotonic() - started) * 1000)
        self.submit(lambda batch: self._finish(batch, jti, command, outcome, duration_ms))

    def _finish(
        self, batch: Batch, jti: str, command: Command, outcome: dict[str, Any], duration_ms: int
    ) -> None:
        fx = self.lifecycle.finish(jti, now=self._clock.time(), duration_ms=duration_ms, **outcome)
        self._apply(batch, fx)
        self._after.append((batch.commit, functools.partial(failpoints.reach, "finish_committed")))
        if command.mutating and self._mutating == jti:
            self._mutating = None
            self._next_mutation(batch)

    def _crashed(self, jti: str, exc: BaseException) -> dict[str, Any]:
        self._log.error("driver_crashed", jti=jti, error=repr(exc), exc_info=exc)
        return _failure("internal_error", f"{type(exc).__name__}: {exc}")

    def _driver_audit(self, jti: str) -> Callable[..., Any]:
        async def audit(event: str, /, **fields: object) -> None:
            def work(batch: Batch, done: Callable[[object], None]) -> None:
                self._apply(batch, self.lifecycle.acted(jti, event, fields))
                done(None)

            await self._ask(work)

        return audit

    async def _call(self, command: Command, ctx: ExecContext) -> Mapping[str, object]:
        match command:
            case Scale(replicas=replicas):
                return await self._driver.scale(replicas, ctx)
            case Upgrade(version=version):
                return await self._driver.upgrade(version, ctx)
            case CollectMetrics(targets=targets):
                return await self._driver.collect_metrics(targets, ctx)
            case OpenStream():
                return await self._streams.run(ctx.jti, command, self._policy.current, ctx)
            case UpdateAgent():
                if self._updater is None:
                    raise DriverError("not_supported", UPDATE_NOT_CONFIGURED)
                return await self._updater.run(command, ctx)

    # -- stopping --------------------------------------------------------------------------------

    async def wait_acked(self) -> None:
        """Until the next ack is applied (or :meth:`wake_acked`)."""
        self._acked.clear()
        await self._acked.wait()

    def wake_acked(self) -> None:
        """Wake :meth:`wait_acked` without an ack (the session ended: none will come)."""
        self._acked.set()

    @property
    def running(self) -> int:
        """Commands the driver is executing right now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Mutating commands waiting for their turn."""
        return len(self._mutations)

    def stop_accepting(self) -> None:
        """Refuse new deliveries and start nothing new; pending approvals stay pending (their
        timers stop: they expire at the next start)."""
        self.lifecycle.stopping = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._mutations.clear()  # never started: they stay received (or approved) and resume

    async def drain(self, grace: float) -> None:
        """Let running commands finish for up to ``grace`` seconds, then cancel them (they are
        reported ``interrupted``), and make everything durable."""
        self.stop_accepting()
        running = list(self._running.values())
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late, return_exceptions=True)
        await self.settle()


def apply_trust(
    batch: Batch,
    effects: list[TrustEffect],
    clock: Clock,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    """Carry out what :class:`~agent.core.trust.Trust` decided."""
    for effect in effects:
        match effect:
            case TrustRecord(event=event, fields=fields, level=level):
                batch.record(event, **fields)
                getattr(log, level)(event, **fields)
            case SaveKeySet(version=version, token=token, signer=signer):
                batch.store.save_keyset(
                    version=version, token=token, signer=signer, now=clock.time()
                )
            case DiscardKeySets():
                batch.store.discard_keysets()


def _failure(reason: str, detail: str, result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"succeeded": False, "reason": reason, "detail": detail, "result": result}
