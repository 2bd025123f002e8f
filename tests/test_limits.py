"""Limits: the token bucket and error budget (sans-I/O), and the agent enforcing them for real:
a misbehaving peer is disconnected, a delivery flood is rate-limited, a stuck driver times out."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agent.core.frames import DeliveryRejected, Frame, Hello, Status, Welcome, encode
from agent.core.limits import ErrorBudget, TokenBucket
from agent.core.session import (
    BENIGN_REFUSALS,
    AgentSession,
    CloseCode,
    CloseRequested,
    FrameRefused,
    HeartbeatSettings,
)
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from control_plane_stub.signer import CommandSigner
from tests.conftest import AgentStarter, scaled
from tests.fakes import RecordingDriver
from tests.hostile_cp import HostileControlPlane


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 tokens refilled
    assert bucket.take(100.5) is True  # 1.0
    assert [bucket.take(110.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_error_budget_is_a_sliding_window() -> None:
    budget = ErrorBudget(limit=3, window=10.0)
    assert [budget.spend(t) for t in (0.0, 1.0, 2.0)] == [False, False, False]
    assert budget.spend(3.0) is True  # the fourth within 10 s
    assert budget.spend(12.5) is False  # 0, 1 and 2 have left the window
    assert budget.spent == 2


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (1.0, 0.5)])
def test_token_bucket_settings_are_checked(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate=rate, burst=burst)


def test_session_closes_a_peer_over_its_error_budget() -> None:
    settings = HeartbeatSettings(interval=10, timeout=30, max_peer_errors=5, peer_error_window=60)
    session = AgentSession(hello=Hello(protocol=1, agent_version="t"), heartbeat=settings, now=0.0)
    welcome = Welcome(protocol=1, agent_id="agent-1", server_time=0.0, heartbeat_interval=10.0)
    session.receive(encode(welcome), 0.1)
    for n in range(5):
        events = session.receive("{not json", 1.0 + n)
        assert [type(e) for e in events] == [FrameRefused]
    assert session.delivery_outcome("bad_signature", 7.0) == [
        CloseRequested(CloseCode.TOO_MANY_ERRORS, "more than 5 refused frames or deliveries in 60s")
    ]


def test_session_closes_a_peer_over_its_deferral_budget() -> None:
    """Refusals that are no fault of the peer's spend a budget of their own, not the error
    budget; over it, the peer is closed with the same code."""
    settings = HeartbeatSettings(
        interval=10, timeout=30, max_peer_errors=2, max_peer_deferrals=4, peer_error_window=60
    )
    session = AgentSession(hello=Hello(protocol=1, agent_version="t"), heartbeat=settings, now=0.0)
    welcome = Welcome(protocol=1, agent_id="agent-1", server_time=0.0, heartbeat_interval=10.0)
    session.receive(encode(welcome), 0.1)
    assert [session.delivery_outcome("busy", 1.0 + n) for n in range(4)] == [[], [], [], []]
    assert session.delivery_outcome("replayed", 5.0) == []  # the error budget is untouched
    assert session.delivery_outcome("rate_limited", 61.5) == []  # two have left the window
    assert session.delivery_outcome("duplicate_delivery", 62.0) == []
    assert session.delivery_outcome("shutting_down", 62.5) == [
        CloseRequested(
            CloseCode.TOO_MANY_ERRORS,
            "more than 4 deferred deliveries or re-offered key sets in 60s",
        )
    ]
    assert session.delivery_outcome("busy", 63.0) == []  # closed: asked once


def test_redeliveries_and_keyset_reoffers_are_bounded_per_connection() -> None:
    """/tmp/review3/audit_flood.py: a redelivery (``duplicate_delivery``), a ``rate_limited``
    refusal and a re-offer of the key set in force each write audit records but spent no
    budget at all, so one connection could write audit records without bound. The session is
    the one place that decides which refusal spends which budget."""

    def session() -> AgentSession:
        settings = HeartbeatSettings(interval=10, timeout=30, max_peer_deferrals=5)
        made = AgentSession(hello=Hello(protocol=1, agent_version="t"), heartbeat=settings, now=0)
        welcome = Welcome(protocol=1, agent_id="agent-1", server_time=0.0, heartbeat_interval=10)
        made.receive(encode(welcome), 0.0)
        return made

    over = CloseRequested(
        CloseCode.TOO_MANY_ERRORS, "more than 5 deferred deliveries or re-offered key sets in 60s"
    )
    for refusal in sorted(BENIGN_REFUSALS):
        deferred = session()
        closes = [deferred.delivery_outcome(refusal, 1.0) for _ in range(6)]
        assert closes == [[]] * 5 + [[over]], refusal  # the sixth is over the budget of five
    accepted = session()  # accepted deliveries spend nothing (the rate limit bounds them)
    assert [accepted.delivery_outcome(None, 1.0) for _ in range(6)] == [[]] * 6
    offered = session()
    closes = [offered.keyset_outcome(False, "already_current", 1.0) for _ in range(6)]
    assert closes == [[]] * 5 + [[over]]
    refused = session()  # any other key-set refusal spends the (larger here) error budget
    assert refused.keyset_outcome(False, "rollback", 1.0) == []


async def test_a_peer_redelivering_in_a_loop_is_disconnected(
    pki: PKIPaths, start_agent: AgentStarter
) -> None:
    signer = CommandSigner.from_file(pki.signing_key, issuer="cp-stub")
    token = signer.sign(
        agent_id="agent-1",
        command_type="collect_metrics",
        params={"targets": ["workload"]},
        now=time.time(),
    ).token
    async with HostileControlPlane(pki, timeout=scaled(10)) as cp:
        running = await start_agent(port=cp.port, driver=RecordingDriver(), max_peer_deferrals=20)
        first = await cp.connection(1)
        for _ in range(40):  # the same delivery again and again
            if not await cp.send_command("r-1", token, to=first):
                break
        assert await cp.wait_closed(first) == CloseCode.TOO_MANY_ERRORS
        down = await running.audit.wait_for("connection_down")
        assert "more than 20 deferred deliveries" in str(down["reason"])
        # audited up to the budget only: the first delivery, then 21 redeliveries
        assert running.audit.count("command_received") == 22
        assert running.audit.count("command_verification", reason="duplicate_delivery") == 21
        await cp.connection(2)  # and it dials again (with backoff)


async def test_a_peer_sending_junk_is_disconnected_and_the_agent_carries_on(
    pki: PKIPaths, start_agent: AgentStarter
) -> None:
    async with HostileControlPlane(pki, timeout=scaled(10)) as cp:
        running = await start_agent(port=cp.port, driver=RecordingDriver())
        first = await cp.connection(1)
        for n in range(150):
            if not await cp.send_raw(f'{{"type":"junk-{n}"', to=first):
                break
        assert await cp.wait_closed(first) == CloseCode.TOO_MANY_ERRORS
        down = await running.audit.wait_for("connection_down")
        assert "more than 100 refused frames" in str(down["reason"])
        assert running.audit.count("frame_rejected") == 101  # audited up to the budget only
        await cp.connection(2)  # and it dials again (with backoff)


async def test_a_delivery_flood_is_rate_limited(start_agent: AgentStarter, pki: PKIPaths) -> None:
    driver = RecordingDriver()
    signer = CommandSigner.from_file(pki.signing_key, issuer="cp-stub")
    tokens = [
        signer.sign(
            agent_id="agent-1",
            command_type="collect_metrics",
            params={"targets": ["workload"]},
            now=time.time(),
        ).token
        for _ in range(40)
    ]
    async with HostileControlPlane(pki, timeout=scaled(10)) as cp:
        running = await start_agent(port=cp.port, driver=driver, command_rate=2.0, command_burst=10)
        await cp.connection(1)
        started = time.monotonic()
        for n, token in enumerate(tokens):
            await cp.send_command(f"r-{n}", token)
        answered: dict[str, str] = {}

        def answer(frame: Frame) -> bool:  # each delivery gets exactly one of these
            return isinstance(frame, DeliveryRejected) or (
                isinstance(frame, Status) and frame.state == "received"
            )

        for _ in tokens:
            frame = await cp.next_frame(type=Frame, where=answer)
            if isinstance(frame, DeliveryRejected):
                answered[frame.ref] = frame.reason
            elif isinstance(frame, Status):
                answered[frame.ref] = "accepted"
        elapsed = time.monotonic() - started
        accepted = sum(1 for reason in answered.values() if reason == "accepted")
        limited = sum(1 for reason in answered.values() if reason == "rate_limited")
        assert accepted + limited == len(tokens)
        assert accepted <= 10 + 2.0 * elapsed + 1  # the burst, then the rate
        assert limited >= len(tokens) - (10 + 2.0 * elapsed + 1)
        assert running.audit.count("command_verification", reason="rate_limited") == limited


async def test_a_driver_that_never_finishes_times_out(
    stub: StubServer, api: StubClient, start_agent: AgentStarter
) -> None:
    driver = RecordingDriver(hold=asyncio.Event())  # never released
    restarted = await start_agent(port=stub.agent_port, driver=driver, command_timeout=0.5)
    assert restarted.config.commands.command_timeout == 0.5
    sent = await api.send("agent-1", "scale", {"replicas": 2})
    final = await api.command(sent["ref"], wait_for="final", wait_seconds=scaled(10))
    assert final["command"]["state"] == "failed"
    assert final["command"]["reason"] == "timeout"
    finished = restarted.audit.matching("execution_finished", jti=sent["jti"])[0]
    assert (finished["outcome"], finished["reason"]) == ("failed", "timeout")
    assert json.dumps(final["command"]["result"]) == "{}"
