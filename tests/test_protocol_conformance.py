"""Conformance of the real agent against docs/PROTOCOL.md, driven by an independent control plane.

The control plane in tests/independent_cp.py was written from the specification alone. Every
assertion here is about what crosses the wire, and names the section it comes from.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from certs.pki import PKIPaths
from tests.conftest import AgentStarter, RunningAgent, scaled
from tests.fakes import RecordingDriver
from tests.independent_cp import (
    CODE,
    IDENTIFIER,
    MAX_FRAME_TO_AGENT,
    AgentConnection,
    IndependentControlPlane,
)

AGENT_ID = "agent-1"
WAIT = 10.0


@pytest.fixture
async def cp(pki: PKIPaths, tmp_path: Path) -> AsyncIterator[IndependentControlPlane]:
    plane = IndependentControlPlane(
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        agent_ca=pki.agent_ca_cert,
        signing_key=pki.signing_key,
        issuer="cp-stub",
        journal=tmp_path / "cp-journal.jsonl",
        heartbeat_interval=1.0,
    )
    await plane.start()
    yield plane
    await plane.close()


async def _connect(
    cp: IndependentControlPlane, start_agent: AgentStarter, driver: RecordingDriver | None = None
) -> tuple[RunningAgent, AgentConnection, RecordingDriver]:
    recording = driver or RecordingDriver()
    agent = await start_agent(port=cp.port, driver=recording)
    conn = await cp.wait_connection(AGENT_ID, within=scaled(WAIT))
    return agent, conn, recording


def _assert_status_frame(frame: dict[str, Any], ref: str, jti: str) -> None:
    """§7.6 member types."""
    assert frame["type"] == "status"
    assert type(frame["seq"]) is int
    assert frame["seq"] >= 1
    assert frame["ref"] == ref
    assert IDENTIFIER.fullmatch(frame["ref"])
    assert frame["jti"] == jti
    assert type(frame["at"]) in (int, float)
    if frame.get("reason") is not None:
        assert CODE.fullmatch(frame["reason"])


def _assert_rejection_frame(frame: dict[str, Any], ref: str) -> None:
    """§7.7 member types."""
    assert frame["type"] == "delivery_rejected"
    assert type(frame["seq"]) is int
    assert frame["seq"] >= 1
    assert frame["ref"] == ref
    assert CODE.fullmatch(frame["reason"])
    assert isinstance(frame["detail"], str)
    assert type(frame["at"]) in (int, float)


# 1 -------------------------------------------------------------------------------------------


async def test_handshake_and_hello(cp: IndependentControlPlane, start_agent: AgentStarter) -> None:
    _, conn, _ = await _connect(cp, start_agent)

    # §2: identity is the client certificate CN; TLS 1.2/1.3; no extensions; User-Agent.
    assert conn.agent_id == AGENT_ID
    assert conn.tls_version in ("TLSv1.2", "TLSv1.3")
    assert "Sec-WebSocket-Extensions" not in conn.request_headers
    user_agent = conn.request_headers.get("User-Agent", "")
    assert re.fullmatch(r"byoc-agent/\S+", user_agent), user_agent

    # §7.1: hello
    hello = conn.hello
    assert hello is not None
    assert hello["type"] == "hello"
    assert type(hello["protocol"]) is int
    assert hello["protocol"] == 1
    assert isinstance(hello["agent_version"], str)
    assert hello["agent_version"]
    assert user_agent == f"byoc-agent/{hello['agent_version']}"
    caps = hello.get("capabilities")
    if caps is not None:
        assert isinstance(caps, dict)
        assert set(caps["commands"]) <= {"scale", "upgrade", "collect_metrics", "open_stream"}
        assert isinstance(caps["driver"], str)
        assert type(caps["max_frame_bytes"]) is int
        assert caps["max_frame_bytes"] == 65_536
    # the only thing received before READY is hello (§4.1.1)
    assert conn.raw_received[0]
    assert json.loads(conn.raw_received[0])["type"] == "hello"

    # §4.1.5 READY: the agent keeps the connection and answers the control plane's pings.
    pong = await cp.wait_frame(conn, lambda f: f["type"] == "pong", within=scaled(WAIT))
    assert any(f["type"] == "ping" and f["id"] == pong["id"] for f in conn.sent)
    assert not conn.closed.is_set()


async def test_agent_pings_every_heartbeat_interval(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§4.3: each side sends ``ping`` every heartbeat interval (the agent's is 1 s here)."""
    _, conn, _ = await _connect(cp, start_agent)
    ping = await cp.wait_frame(conn, lambda f: f["type"] == "ping", within=scaled(3.0))
    assert type(ping["id"]) is int
    assert 0 <= ping["id"] < 2**63
    assert any(f["type"] == "pong" and f["id"] == ping["id"] for f in conn.sent)


# 2 -------------------------------------------------------------------------------------------


async def _assert_ordered_statuses(
    cp: IndependentControlPlane, conn: AgentConnection, ref: str, jti: str, states: list[str]
) -> list[dict[str, Any]]:
    frames = [f for f in conn.frames("status") if f["ref"] == ref]
    assert [f["state"] for f in frames] == states
    seqs = [f["seq"] for f in frames]
    await cp.wait_until(lambda: set(seqs) <= set(conn.acked), within=scaled(WAIT))
    for frame in frames:
        _assert_status_frame(frame, ref, jti)
        assert cp.ack_counts[(AGENT_ID, frame["seq"])] == 1  # §6.3: stored, then acked
    assert seqs == sorted(set(seqs))  # §6.3: strictly increasing
    assert [f["at"] for f in frames] == sorted(f["at"] for f in frames)
    return frames


async def test_scale_within_policy_succeeds(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    _, conn, driver = await _connect(cp, start_agent)
    delivery = await cp.command(AGENT_ID, "scale", {"replicas": 3})
    assert delivery.ref == delivery.jti
    done = await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))

    assert done.states == ["received", "running", "succeeded"]  # §6.2
    assert delivery.jti is not None
    frames = await _assert_ordered_statuses(
        cp, conn, delivery.ref, delivery.jti, ["received", "running", "succeeded"]
    )
    result = frames[-1]["result"]
    # §5.3 scale result: {"replicas": n, "previous_replicas": n, "version": str, "ports": [int]}
    # ("ports" is given for the reference process driver; this agent runs an in-memory one).
    assert isinstance(result, dict)
    assert result["replicas"] == 3
    assert type(result["replicas"]) is int
    assert result["previous_replicas"] == 1
    assert type(result["previous_replicas"]) is int
    assert isinstance(result["version"], str)
    assert not conn.frames("delivery_rejected")
    assert driver.executed(delivery.jti) == 1


async def test_scale_result_shape_with_process_driver(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§5.3 with the reference ``process`` driver: the full result shape, including ports."""
    await start_agent(port=cp.port)  # the configured driver: process
    conn = await cp.wait_connection(AGENT_ID, within=scaled(WAIT))
    delivery = await cp.command(AGENT_ID, "scale", {"replicas": 2})
    done = await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(30))
    assert done.states == ["received", "running", "succeeded"], done.last_status
    result = done.status_frames[-1]["result"]
    assert set(result) >= {"replicas", "previous_replicas", "version", "ports"}
    assert result["replicas"] == 2
    assert type(result["previous_replicas"]) is int
    assert isinstance(result["version"], str)
    assert isinstance(result["ports"], list)
    assert len(result["ports"]) == 2
    assert all(type(p) is int for p in result["ports"])
    assert conn.hello is not None
    assert conn.hello["capabilities"]["driver"] == "process"


# 3 -------------------------------------------------------------------------------------------


async def test_policy_denied_and_pending_approval(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    _, conn, driver = await _connect(cp, start_agent)

    denied = await cp.command(AGENT_ID, "scale", {"replicas": 7})  # max_replicas = 6
    done = await cp.wait_final(AGENT_ID, denied.ref, within=scaled(WAIT))
    assert done.states == ["received", "rejected"]
    final = done.status_frames[-1]
    assert final["reason"] == "policy_denied"
    assert isinstance(final["detail"], str)
    assert final["detail"]
    assert final.get("result") is None

    held = await cp.command(AGENT_ID, "scale", {"replicas": 5})  # approval_above = 4
    waiting = await cp.wait_state(AGENT_ID, held.ref, ["pending_approval"], within=scaled(WAIT))
    assert waiting.states == ["received", "pending_approval"]
    assert denied.jti is not None
    assert held.jti is not None
    await _assert_ordered_statuses(cp, conn, held.ref, held.jti, ["received", "pending_approval"])
    assert driver.calls == []


# 4 -------------------------------------------------------------------------------------------


async def test_replay_and_duplicate_delivery(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    _, conn, driver = await _connect(cp, start_agent)
    token, jti = cp.signer.mint(AGENT_ID, "scale", {"replicas": 2})
    original = await cp.deliver(AGENT_ID, token, ref=jti)
    await cp.wait_final(AGENT_ID, original.ref, within=scaled(WAIT))
    assert original.states == ["received", "running", "succeeded"]

    # §6.4: the same token under a different ref is a replay.
    replay = await cp.deliver(AGENT_ID, token, ref=f"replay-{jti}")
    rejected = await cp.wait_rejection(AGENT_ID, replay.ref, within=scaled(WAIT))
    _assert_rejection_frame(rejected, replay.ref)
    assert rejected["reason"] == "replayed"
    assert rejected.get("jti") in (None, jti)
    assert replay.states == []
    assert replay.refused == "replayed"
    await cp.wait_until(lambda: rejected["seq"] in conn.acked, within=scaled(WAIT))
    assert cp.ack_counts[(AGENT_ID, rejected["seq"])] == 1

    # §6.4: the same ref with the same token again is a duplicate delivery, which must not
    # override the status the control plane already has.
    await cp.redeliver(AGENT_ID, original.ref)
    duplicate = await cp.wait_rejection(AGENT_ID, original.ref, within=scaled(WAIT))
    _assert_rejection_frame(duplicate, original.ref)
    assert duplicate["reason"] == "duplicate_delivery"
    assert duplicate["seq"] > rejected["seq"]
    assert original.states == ["received", "running", "succeeded"]
    assert original.refused is None

    assert [f["ref"] for f in conn.frames("status")] == [original.ref] * 3
    assert driver.executed(jti) == 1


# 5 -------------------------------------------------------------------------------------------


async def test_hs256_and_wrong_audience_refused(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    _, conn, driver = await _connect(cp, start_agent)

    claims = cp.signer.claims(AGENT_ID, "scale", {"replicas": 2})
    hs256 = jwt.encode(
        claims,
        "a shared secret that is long enough for HS256 " * 2,
        algorithm="HS256",
        headers={"typ": "byoc-command+jwt", "kid": cp.signer.kid},
    )
    forged = await cp.deliver(AGENT_ID, hs256)
    refused = await cp.wait_rejection(AGENT_ID, forged.ref, within=scaled(WAIT))
    _assert_rejection_frame(refused, forged.ref)
    assert refused["reason"] == "unsupported_alg"  # §5.2 check 2
    assert refused.get("jti") in (None, claims["jti"])

    token, other_jti = cp.signer.mint("agent-2", "scale", {"replicas": 2})
    misaddressed = await cp.deliver(AGENT_ID, token)
    refused = await cp.wait_rejection(AGENT_ID, misaddressed.ref, within=scaled(WAIT))
    _assert_rejection_frame(refused, misaddressed.ref)
    assert refused["reason"] == "wrong_audience"  # §5.2 check 8
    assert refused.get("jti") in (None, other_jti)

    assert conn.frames("status") == []
    assert driver.calls == []


@pytest.mark.parametrize(
    "cmd",
    [
        {"type": "collect_metrics", "params": "junk"},
        {"type": "collect_metrics", "params": ["workload"]},
        {"type": "collect_metrics", "params": None},
        {"type": 7, "params": {}},
        {"type": "scale", "params": {"replicas": 2}, "extra": True},
        "scale",
    ],
    ids=repr,
)
async def test_wrongly_typed_cmd_is_invalid_claims_and_never_runs(
    cp: IndependentControlPlane, start_agent: AgentStarter, cmd: object
) -> None:
    """§5.1/§5.2 check 6: the command is fully typed before anything is decided; a signed
    ``cmd`` of the wrong shape is refused on delivery (its jti never stored), never run with
    default parameters and never coerced (a ``type`` of 7 is not ``"7"``)."""
    _, conn, driver = await _connect(cp, start_agent)
    claims = cp.signer.claims(AGENT_ID, "collect_metrics", {})
    claims["cmd"] = cmd
    delivery = await cp.deliver(AGENT_ID, cp.signer.sign(claims))
    refused = await cp.wait_rejection(AGENT_ID, delivery.ref, within=scaled(WAIT))
    _assert_rejection_frame(refused, delivery.ref)
    assert refused["reason"] == "invalid_claims"
    assert conn.frames("status") == []
    assert driver.calls == []


# 6 -------------------------------------------------------------------------------------------


async def test_unacknowledged_status_resent_after_reconnect(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    _, first, driver = await _connect(cp, start_agent)
    cp.ack_enabled = False
    delivery = await cp.command(AGENT_ID, "scale", {"replicas": 2})
    await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
    original = [f for f in first.frames("status") if f["ref"] == delivery.ref]
    seqs = [f["seq"] for f in original]
    assert [f["state"] for f in original] == ["received", "running", "succeeded"]
    assert first.acked == []

    cp.ack_enabled = True
    await cp.drop(first)
    second = await cp.wait_connection(AGENT_ID, after=first, within=scaled(WAIT))

    def resent() -> list[dict[str, Any]] | None:
        frames = [f for f in second.received if f["type"] == "status"]
        return frames if {f["seq"] for f in frames} >= set(seqs) else None

    frames = await cp.wait_until(resent, within=scaled(WAIT))
    assert second.received[0]["type"] == "status"  # right after welcome (§4.1.5)
    # §6.3: every unacknowledged frame again, oldest first, unchanged.
    assert frames[: len(original)] == original
    # §6.3: applied once, acknowledged every time it arrived (here: on the second connection).
    await cp.wait_until(lambda: set(seqs) <= set(second.acked), within=scaled(WAIT))
    assert delivery.states == ["received", "running", "succeeded"]
    assert delivery.status_frames == original
    assert all(cp.ack_counts[(AGENT_ID, seq)] == 1 for seq in seqs)
    # §6.4: the control plane has a status, so it did not deliver the command again.
    assert delivery.sent_count == 1
    assert not [f for f in second.sent if f["type"] == "command"]
    assert delivery.jti is not None
    assert driver.executed(delivery.jti) == 1

    # Once acknowledged, frames are gone: after another reconnection, the next frames the agent
    # sends (in seq order, §6.3) are those of a new command.
    await cp.drop(second)
    third = await cp.wait_connection(AGENT_ID, after=second, within=scaled(WAIT))
    follow_up = await cp.command(AGENT_ID, "scale", {"replicas": 3})
    await cp.wait_final(AGENT_ID, follow_up.ref, within=scaled(WAIT))
    assert {f["ref"] for f in third.frames("status")} == {follow_up.ref}
    assert min(f["seq"] for f in third.frames("status")) > max(seqs)


@pytest.mark.parametrize("when", ["live", "resent"])
async def test_ack_just_before_close_is_honoured(
    cp: IndependentControlPlane, start_agent: AgentStarter, when: str
) -> None:
    """§6.3: "The agent deletes a frame when its ack arrives": an ack that arrives before the
    control plane's close frame (same TCP stream, RFC 6455 order) has arrived.

    ``live``: frames acknowledged on the connection that first carried them.
    ``resent``: frames acknowledged as the agent resends them at the start of a new connection.
    (The control plane records an ack only once its frame is written, so the close follows it.)
    """
    _, conn, _ = await _connect(cp, start_agent)
    cp.ack_enabled = False
    delivery = await cp.command(AGENT_ID, "scale", {"replicas": 2})
    await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
    seqs = [f["seq"] for f in conn.frames("status")]
    if when == "live":
        for seq in seqs:
            await cp.send(conn, {"type": "ack", "seq": seq})
    else:
        await cp.drop(conn)
        cp.ack_enabled = True
        conn = await cp.wait_connection(AGENT_ID, after=conn, within=scaled(WAIT))
        await cp.wait_until(lambda: set(seqs) <= set(conn.acked), within=scaled(WAIT))
    cp.ack_enabled = True
    await cp.drop(conn)  # right after the last ack

    after = await cp.wait_connection(AGENT_ID, after=conn, within=scaled(WAIT))
    follow_up = await cp.command(AGENT_ID, "scale", {"replicas": 3})
    await cp.wait_final(AGENT_ID, follow_up.ref, within=scaled(WAIT))
    resent = [f["seq"] for f in after.frames("status") if f["seq"] in seqs]
    assert resent == [], f"acknowledged frames {resent} were sent again"


# 7 -------------------------------------------------------------------------------------------

_DEEP = "[" * 40 + "]" * 40

MALFORMED: list[tuple[str, str]] = [
    ("not-json", "this is not JSON"),
    ("truncated", '{"type":"ping","id":1'),
    ("duplicate-keys", '{"type":"ping","id":1,"id":2}'),
    ("nan", '{"type":"ping","id":NaN}'),
    ("infinity", '{"type":"ping","id":1,"extra":Infinity}'),
    ("too-deep", '{"type":"ping","id":1,"extra":' + _DEEP + "}"),
    ("top-level-array", '[{"type":"ping","id":1}]'),
    ("no-type", '{"id":1}'),
    ("type-not-string", '{"type":1,"id":1}'),
    ("id-boolean", '{"type":"ping","id":true}'),
    ("id-string", '{"type":"ping","id":"1"}'),
    ("id-missing", '{"type":"ping"}'),
    ("ack-seq-string", '{"type":"ack","seq":"1"}'),
    ("command-token-number", '{"type":"command","ref":"r-1","token":5}'),
]


async def _assert_error_then_alive(
    cp: IndependentControlPlane, conn: AgentConnection, data: str | bytes, code: str, probe: int
) -> dict[str, Any]:
    start = len(conn.received)
    await cp.send_raw(conn, data)
    error = await cp.wait_frame(
        conn, lambda f: f["type"] == "error", within=scaled(WAIT), start=start
    )
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    # §3: the connection stays up and keeps working.
    await cp.send(conn, {"type": "ping", "id": probe})
    await cp.wait_frame(
        conn, lambda f: f["type"] == "pong" and f["id"] == probe, within=scaled(WAIT), start=start
    )
    assert not conn.closed.is_set()
    assert cp.active[AGENT_ID] is conn
    return error


@pytest.mark.parametrize(("label", "text"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_frame_gets_error_and_connection_stays(
    cp: IndependentControlPlane, start_agent: AgentStarter, label: str, text: str
) -> None:
    _, conn, _ = await _connect(cp, start_agent)
    await _assert_error_then_alive(cp, conn, text, "malformed_frame", probe=9_000_001)


async def test_other_frame_errors_keep_the_connection(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§3 / §8.1: binary, unknown type, second welcome, oversized frame."""
    _, conn, _ = await _connect(cp, start_agent)
    await _assert_error_then_alive(cp, conn, b"\x00binary", "unsupported_frame", probe=9_000_002)
    await _assert_error_then_alive(
        cp, conn, '{"type":"gossip","id":1}', "unknown_frame_type", probe=9_000_003
    )
    second_welcome = json.dumps(
        {
            "type": "welcome",
            "protocol": 1,
            "agent_id": AGENT_ID,
            "server_time": 0,
            "heartbeat_interval": 1.0,
        }
    )
    await _assert_error_then_alive(cp, conn, second_welcome, "unexpected_frame", probe=9_000_004)
    big = json.dumps({"type": "ping", "id": 1, "pad": "x" * MAX_FRAME_TO_AGENT})
    await _assert_error_then_alive(cp, conn, big, "frame_too_large", probe=9_000_005)


# 8 -------------------------------------------------------------------------------------------


async def test_pings_answered_with_same_id(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    _, conn, _ = await _connect(cp, start_agent)
    ids = [0, 8_000_000_001, 2**53 + 1, 2**63 - 1]
    start = len(conn.received)
    for ping_id in ids:
        await cp.send(conn, {"type": "ping", "id": ping_id})
    for ping_id in ids:
        pong = await cp.wait_frame(
            conn,
            lambda f, i=ping_id: f["type"] == "pong" and f["id"] == i,  # type: ignore[misc]
            within=scaled(WAIT),
            start=start,
        )
        assert type(pong["id"]) is int
    answered = [f["id"] for f in conn.received[start:] if f["type"] == "pong" and f["id"] in ids]
    assert answered == ids  # one pong each, in order


# handshake, agent side (§4.1.3-4) --------------------------------------------------------------


async def test_agent_closes_4000_when_welcome_is_not_first(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    cp.before_welcome = [{"type": "error", "code": "protocol_error", "message": "test"}]
    await start_agent(port=cp.port, driver=RecordingDriver(), wait=False)
    conn = await cp.wait_connection(AGENT_ID, within=scaled(WAIT))
    await cp.wait_until(conn.closed.is_set, within=scaled(WAIT))
    assert conn.close_code_received == 4000


async def test_agent_closes_4002_on_other_protocol_version(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    cp.welcome_overrides = {"protocol": 2}
    await start_agent(port=cp.port, driver=RecordingDriver(), wait=False)
    conn = await cp.wait_connection(AGENT_ID, within=scaled(WAIT))
    await cp.wait_until(conn.closed.is_set, within=scaled(WAIT))
    assert conn.close_code_received == 4002


async def test_agent_keeps_connection_when_welcome_names_another_id(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§4.1.3: a different ``agent_id`` in welcome is logged; ``aud`` stays the agent's own."""
    cp.welcome_overrides = {"agent_id": "agent-2"}
    _, conn, _ = await _connect(cp, start_agent)
    delivery = await cp.command(AGENT_ID, "scale", {"replicas": 2})
    done = await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
    assert done.states[-1] == "succeeded"
    assert not conn.closed.is_set()


async def test_agent_closes_4003_without_welcome(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§4.1.4: no welcome within ``handshake_timeout`` (here 2 s; default 10 s) closes with
    4003. (When, exactly, is the session's rule, tested with explicit times in
    tests/test_session.py::test_handshake_timeout.)"""
    cp.withhold_welcome = True
    await start_agent(port=cp.port, driver=RecordingDriver(), wait=False, handshake_timeout=2.0)
    conn = await cp.wait_until(
        lambda: next((c for c in cp.connections if c.hello is not None), None),
        within=scaled(WAIT),
    )
    await cp.wait_until(conn.closed.is_set, within=scaled(15))
    assert conn.close_code_received == 4003


async def test_agent_heartbeat_timeout_raised_to_three_intervals(
    pki: PKIPaths, tmp_path: Path, start_agent: AgentStarter
) -> None:
    """§4.3: when nothing arrives for its heartbeat timeout, the agent aborts the connection
    and dials again. (The timeout's length, at least 3 x the control plane's announced
    interval, is the session's rule, tested with explicit times in tests/test_session.py.)"""
    async with IndependentControlPlane(
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        agent_ca=pki.agent_ca_cert,
        signing_key=pki.signing_key,
        heartbeat_interval=2.0,
    ) as plane:
        plane.silent = True
        await start_agent(port=plane.port, driver=RecordingDriver(), wait=False)
        conn = await plane.wait_connection(AGENT_ID, within=scaled(WAIT))
        await plane.wait_until(conn.closed.is_set, within=scaled(15))
        assert conn.close_code_received in (None, 4004)  # aborted: the code may never arrive
        plane.silent = False
        await plane.wait_connection(AGENT_ID, after=conn, within=scaled(WAIT))


# Issue 9: rules the document now states exactly ---------------------------------------------------


async def test_token_header_limit_and_kid_typ_types(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§5.1/§5.2: a header over 4,096 bytes is ``malformed_token`` (extra members are otherwise
    ignored); a missing or non-string ``typ`` is ``bad_typ``; a missing, empty or non-string
    ``kid`` is ``unknown_kid``."""
    _, conn, driver = await _connect(cp, start_agent)
    claims = cp.signer.claims(AGENT_ID, "scale", {"replicas": 2})
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"x5c": ["A" * 3000]}, None),  # an ignored member, within the limit: accepted
        ({"x5c": ["A" * 4200]}, "malformed_token"),
        ({"typ": None}, "bad_typ"),
        ({"typ": 7}, "bad_typ"),
        ({"kid": ""}, "unknown_kid"),
        ({"kid": 7}, "unknown_kid"),
    ]
    for headers, code in cases:
        claims["jti"] = f"hdr-{len(conn.received)}-{code}"
        header = {"alg": "EdDSA", "typ": "byoc-command+jwt", "kid": cp.signer.kid, **headers}
        token = _raw_token(cp, header, json.dumps(claims))
        delivery = await cp.deliver(AGENT_ID, token)
        if code is None:
            final = await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
            assert final.state == "succeeded"
        else:
            refused = await cp.wait_rejection(AGENT_ID, delivery.ref, within=scaled(WAIT))
            assert refused["reason"] == code, headers
    assert len(driver.calls) == 1


async def test_token_payload_follows_the_json_rules(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§3 applied to the payload: a duplicate key is ``invalid_claims``, even signed."""
    _, _, driver = await _connect(cp, start_agent)
    header = {"alg": "EdDSA", "typ": "byoc-command+jwt", "kid": cp.signer.kid}
    claims = cp.signer.claims(AGENT_ID, "scale", {"replicas": 2})
    body = json.dumps(claims)[:-1] + ', "iss": "someone-else"}'  # "iss" twice
    token = _raw_token(cp, header, body)
    delivery = await cp.deliver(AGENT_ID, token)
    refused = await cp.wait_rejection(AGENT_ID, delivery.ref, within=scaled(WAIT))
    assert refused["reason"] == "invalid_claims"
    assert driver.calls == []


def _raw_token(cp: IndependentControlPlane, header: dict[str, Any], payload: str) -> str:
    """A JWS signed by the control plane's key over exactly this header and payload text
    (libraries refuse to produce some of the headers these tests need)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload.encode())}"
    signature = cp.signer.private_key.sign(signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


async def test_params_may_be_absent(cp: IndependentControlPlane, start_agent: AgentStarter) -> None:
    """§5.1: an absent ``params`` is ``{}``: collect_metrics then uses its default targets."""
    _, _, driver = await _connect(cp, start_agent)
    claims = cp.signer.claims(AGENT_ID, "collect_metrics", {})
    claims["cmd"] = {"type": "collect_metrics"}
    delivery = await cp.deliver(AGENT_ID, cp.signer.sign(claims))
    final = await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
    assert final.state == "succeeded"
    assert driver.calls == [("collect_metrics", ("workload", "host"), claims["jti"])]


@pytest.mark.parametrize("host", ["2852039166", "0xa9.0xfe.0xa9.0xfe", "169.254.43518"])
async def test_numeric_host_targets_are_invalid_params(
    cp: IndependentControlPlane, start_agent: AgentStarter, host: str
) -> None:
    """§13.1: a numeric form of an IPv4 address is not a host name (2852039166 is
    169.254.169.254): the grant is accepted, then rejected before anything is resolved."""
    _, _, driver = await _connect(cp, start_agent)
    delivery = await cp.command(
        AGENT_ID, "open_stream", {"target": f"{host}:80", "max_duration": 60}
    )
    final = await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
    last = final.last_status
    assert last is not None
    assert (last["state"], last["reason"]) == ("rejected", "invalid_params")
    assert driver.calls == []


async def test_invalid_utf8_text_closes_with_1007(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§3/§4.2: invalid UTF-8 in a text message fails the WebSocket connection (1007); the
    agent dials again."""
    _, conn, _ = await _connect(cp, start_agent)
    await conn.ws.send(b'{"type":"ping","id":1,"x":"\xff"}', text=True)
    await cp.wait_until(conn.closed.is_set, within=scaled(WAIT))
    assert conn.close_code_received == 1007
    await cp.wait_until(
        lambda: len([c for c in cp.connections if c.agent_id == AGENT_ID]) >= 2,
        within=scaled(WAIT),
    )


async def test_rate_limit_is_per_agent_across_connections(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§5.2 check 0a: the token bucket belongs to the agent process, not to a connection:
    reconnecting does not refill it."""
    driver = RecordingDriver()
    await start_agent(port=cp.port, driver=driver, command_rate=0.01, command_burst=2)
    first = await cp.wait_connection(AGENT_ID, within=scaled(WAIT))
    for _ in range(2):
        delivery = await cp.command(AGENT_ID, "collect_metrics", {"targets": ["host"]})
        await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
    await cp.drop(first)
    second = await cp.wait_until(
        lambda: next(
            (c for c in cp.connections if c is not first and c.ready and not c.closed.is_set()),
            None,
        ),
        within=scaled(WAIT),
    )
    assert second is not first
    delivery = await cp.command(AGENT_ID, "collect_metrics", {"targets": ["host"]})
    refused = await cp.wait_rejection(AGENT_ID, delivery.ref, within=scaled(WAIT))
    assert refused["reason"] == "rate_limited"
    assert len(driver.calls) == 2


async def test_forbidden_ip_literal_under_a_broad_rule_is_refused_on_arrival(
    cp: IndependentControlPlane, start_agent: AgentStarter
) -> None:
    """§13.2: an IP-literal target that is forbidden (the metadata service) and covered only by
    a broad rule is ``rejected`` / ``policy_denied`` when the grant arrives: nothing is dialed."""
    policy = (
        "version = 1\n[open_stream]\nallow = true\n"
        'targets = ["0.0.0.0/0:1-65535", "[::/0]:1-65535"]\nmax_duration = 600\n'
    )
    driver = RecordingDriver()
    await start_agent(port=cp.port, driver=driver, policy=policy)
    await cp.wait_connection(AGENT_ID, within=scaled(WAIT))
    for target in ("169.254.169.254:80", "[64:ff9b::a9fe:a9fe]:80", "[fe80::1]:80"):
        delivery = await cp.command(AGENT_ID, "open_stream", {"target": target, "max_duration": 60})
        final = await cp.wait_final(AGENT_ID, delivery.ref, within=scaled(WAIT))
        assert final.states == ["received", "rejected"], target
        last = final.last_status
        assert last is not None
        assert last["reason"] == "policy_denied", target
