"""Hostile input from the control plane side of the tunnel.

Every case is refused with a precise reason the control plane can read, leaves its trace in the
hash-chained audit log, runs nothing, and leaves the agent running and usable: a validly signed
command sent right afterwards still succeeds. Neither the operational log nor the audit log ever
contains a token (the audit log records its SHA-256).

Most cases go through :class:`tests.hostile_cp.HostileControlPlane` (real mutual TLS, real wire
format, but it sends whatever the test says); the token cases also go through the real stub's
relay API in one batch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
)

from agent.core.frames import (
    FINAL_STATES,
    MAX_FRAME_TO_AGENT,
    PROTOCOL_VERSION,
    CommandFrame,
    DeliveryRejected,
    ErrorFrame,
    Status,
    Welcome,
    encode,
)
from agent.core.verifier import COMMAND_TYP, jwk_thumbprint
from agent.io.audit_file import verify_file
from agent.io.tunnel import WEBSOCKET_MAX_SIZE
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.server import StubServer
from control_plane_stub.signer import CommandSigner
from tests.conftest import AgentStarter, RunningAgent, scaled
from tests.fakes import RecordingDriver
from tests.hostile_cp import HostileControlPlane

AGENT_ID = "agent-1"
ISSUER = "cp-stub"
LogEntries = list[MutableMapping[str, Any]]
Record = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Keys and tokens


@dataclass(frozen=True)
class Keys:
    trusted: Ed25519PrivateKey
    trusted_kid: str
    trusted_public_pem: bytes
    foreign: Ed25519PrivateKey
    signer: CommandSigner


@pytest.fixture(scope="module")
def keys(pki: PKIPaths) -> Keys:
    trusted = load_pem_private_key(pki.signing_key.read_bytes(), password=None)
    assert isinstance(trusted, Ed25519PrivateKey)
    return Keys(
        trusted=trusted,
        trusted_kid=jwk_thumbprint(trusted.public_key()),
        trusted_public_pem=pki.signing_pub.read_bytes(),
        foreign=Ed25519PrivateKey.generate(),
        signer=CommandSigner.from_file(pki.signing_key, issuer=ISSUER),
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims(
    *,
    now: float | None = None,
    ttl: int = 300,
    aud: str = AGENT_ID,
    command: str = "scale",
    params: dict[str, object] | None = None,
    **overrides: object,
) -> dict[str, object]:
    issued = int(time.time() if now is None else now)
    body: dict[str, object] = {
        "iss": ISSUER,
        "aud": aud,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
        "cmd": {"type": command, "params": {"replicas": 2} if params is None else params},
    }
    body.update(overrides)
    return body


def eddsa(
    key: Ed25519PrivateKey, payload: dict[str, object], *, kid: str, typ: str = COMMAND_TYP
) -> str:
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"typ": typ, "kid": kid})


def compact(header: dict[str, object], payload: dict[str, object], signature: bytes) -> str:
    return f"{b64url_json(header)}.{b64url_json(payload)}.{b64url(signature)}"


def claimed_jti(token: str) -> str | None:
    """The jti a JWS compact token claims, read without any product code; None if unreadable."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1]
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    jti = body.get("jti") if isinstance(body, dict) else None
    return jti if isinstance(jti, str) else None


def _bad_signature(k: Keys) -> str:
    one = eddsa(k.trusted, claims(), kid=k.trusted_kid)
    other = eddsa(k.trusted, claims(params={"replicas": 3}), kid=k.trusted_kid)
    return one.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]


def _untrusted_key_own_kid(k: Keys) -> str:
    return eddsa(k.foreign, claims(), kid=jwk_thumbprint(k.foreign.public_key()))


def _untrusted_key_trusted_kid(k: Keys) -> str:
    return eddsa(k.foreign, claims(), kid=k.trusted_kid)


def _alg_none(k: Keys, signature: bytes) -> str:
    return compact({"alg": "none", "typ": COMMAND_TYP, "kid": k.trusted_kid}, claims(), signature)


def _hs256_public_key_as_secret(k: Keys) -> str:
    header = b64url_json({"alg": "HS256", "typ": COMMAND_TYP, "kid": k.trusted_kid})
    signing_input = f"{header}.{b64url_json(claims())}"
    mac = hmac.new(k.trusted_public_pem, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _rs256(k: Keys) -> str:
    rsa_key = generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(
        claims(), rsa_key, algorithm="RS256", headers={"typ": COMMAND_TYP, "kid": k.trusted_kid}
    )


def _signed(k: Keys, payload: dict[str, object], *, typ: str = COMMAND_TYP) -> str:
    return eddsa(k.trusted, payload, kid=k.trusted_kid, typ=typ)


@dataclass(frozen=True)
class TokenCase:
    name: str
    make: Callable[[Keys], str]
    reason: str


TOKEN_CASES: tuple[TokenCase, ...] = (
    TokenCase("bad_signature", _bad_signature, "bad_signature"),
    TokenCase("untrusted_key_own_kid", _untrusted_key_own_kid, "unknown_kid"),
    TokenCase("untrusted_key_trusted_kid", _untrusted_key_trusted_kid, "bad_signature"),
    # PROTOCOL.md §5.2 check 1 (three non-empty segments) comes before the alg check, so the
    # classic unsigned token is malformed; with any signature bytes it is an unsupported alg.
    TokenCase("alg_none_empty_signature", lambda k: _alg_none(k, b""), "unsupported_alg"),
    TokenCase("alg_none_with_signature", lambda k: _alg_none(k, b"\x00" * 64), "unsupported_alg"),
    TokenCase("hs256_public_key_as_secret", _hs256_public_key_as_secret, "unsupported_alg"),
    TokenCase("rs256", _rs256, "unsupported_alg"),
    TokenCase("wrong_audience", lambda k: _signed(k, claims(aud="agent-2")), "wrong_audience"),
    TokenCase("expired", lambda k: _signed(k, claims(now=time.time() - 1000)), "expired"),
    TokenCase(
        "nbf_in_future",
        lambda k: _signed(k, claims(nbf=int(time.time()) + 120)),
        "not_yet_valid",
    ),
    TokenCase("lifetime_too_long", lambda k: _signed(k, claims(ttl=3600)), "lifetime_too_long"),
    TokenCase(
        "unknown_kid",
        lambda k: eddsa(k.trusted, claims(), kid="kid-that-nobody-trusts"),
        "unknown_kid",
    ),
    TokenCase("bad_typ", lambda k: _signed(k, claims(), typ="JWT"), "bad_typ"),
    TokenCase("bad_issuer", lambda k: _signed(k, claims(iss="evil-cp")), "bad_issuer"),
    TokenCase(
        "not_three_segments",
        lambda k: ".".join(_signed(k, claims()).split(".")[:2]),
        "malformed_token",
    ),
    TokenCase(
        "garbage_characters", lambda _k: "%%not*base64%%.~~garbage~~.!!!!!!!!", "malformed_token"
    ),
    TokenCase(
        "base64_of_garbage",
        lambda _k: f"{b64url(b'not json at all')}.{b64url(b'{}')}.{b64url(b'sig' * 20)}",
        "malformed_token",
    ),
)


# --------------------------------------------------------------------------------------------
# The agent under attack


@dataclass
class World:
    cp: HostileControlPlane
    running: RunningAgent
    driver: RecordingDriver
    keys: Keys
    logs: LogEntries

    def audit(self) -> list[Record]:
        return audit_records(self.running.paths.audit_log)


def audit_records(path: Path) -> list[Record]:
    """Every record of the agent's audit log, after checking the whole hash chain."""
    verify_file(path)  # raises AuditIntegrityError at the first bad record
    return [json.loads(line) for line in path.read_text().splitlines()]


def find(records: list[Record], event: str, **fields: object) -> list[Record]:
    return [
        r
        for r in records
        if r["event"] == event and all(r.get(key) == value for key, value in fields.items())
    ]


@pytest.fixture
def op_logs() -> Iterator[LogEntries]:
    """Everything the agent logs (operational log, structlog) during the test, unredacted."""
    with structlog.testing.capture_logs() as entries:
        yield entries


@pytest.fixture
async def world(
    pki: PKIPaths, keys: Keys, start_agent: AgentStarter, op_logs: LogEntries
) -> AsyncIterator[World]:
    async with HostileControlPlane(pki, timeout=scaled(10)) as cp:
        driver = RecordingDriver()
        running = await start_agent(port=cp.port, driver=driver)
        try:
            await cp.connection(1)
            yield World(cp=cp, running=running, driver=driver, keys=keys, logs=op_logs)
        finally:
            if not running.task.done():
                await running.stop()


async def send_valid(world: World, *, replicas: int = 2) -> str:
    """Deliver a validly signed, allowed command; wait until it succeeded; return its jti."""
    signed = world.keys.signer.sign(
        agent_id=AGENT_ID, command_type="scale", params={"replicas": replicas}, now=time.time()
    )
    ref = f"valid-{signed.jti}"
    assert await world.cp.send_command(ref, signed.token)
    final = await world.cp.next_frame(
        type=Status,
        where=lambda f: f.jti == signed.jti and f.state in FINAL_STATES,
    )
    assert (final.ref, final.state, final.reason) == (ref, "succeeded", None), final
    return signed.jti


async def assert_still_usable(world: World, *, earlier_calls: int = 0) -> str:
    """The agent still runs and a valid command afterwards executes (and nothing else did)."""
    assert not world.running.task.done(), "the agent task ended"
    assert world.driver.calls[earlier_calls:] == [], "the driver ran something it must not"
    jti = await send_valid(world)
    assert world.driver.calls[earlier_calls:] == [("scale", 2, jti)]
    assert not world.running.task.done(), "the agent task ended"
    return jti


def assert_no_leak(logs: LogEntries, audit_log: Path, *tokens: str) -> None:
    """No token (nor its signature segment) in the operational log or in the audit log."""
    logged = json.dumps(logs, default=str)
    audited = audit_log.read_text()
    assert logs, "nothing was captured from the operational log"
    for token in tokens:
        secrets = [token, *(s for s in token.split(".")[2:] if len(s) >= 16)]
        for secret in secrets:
            assert secret not in logged, "a token leaked into the operational log"
            assert secret not in audited, "a token leaked into the audit log"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Tokens that must not verify


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda case: case.name)
async def test_hostile_token_is_refused(case: TokenCase, world: World) -> None:
    token = case.make(world.keys)
    ref = f"hostile-{case.name}"
    assert await world.cp.send_command(ref, token)

    rejected = await world.cp.next_frame(type=DeliveryRejected, where=lambda f: f.ref == ref)
    assert rejected.reason == case.reason, rejected
    assert rejected.detail
    assert rejected.jti == claimed_jti(token)
    assert not [s for s in world.cp.frames(Status) if s.ref == ref], "a status for a refusal"

    valid_jti = await assert_still_usable(world)

    records = world.audit()
    received = find(records, "command_received", ref=ref)
    assert len(received) == 1, received
    assert received[0]["token_sha256"] == token_hash(token)
    verification = find(records, "command_verification", ref=ref)
    assert len(verification) == 1, verification
    assert verification[0]["result"] == "rejected"
    assert verification[0]["reason"] == case.reason
    assert verification[0]["detail"]
    executed = {r["jti"] for r in find(records, "execution_started")}
    assert executed == {valid_jti}
    assert_no_leak(world.logs, world.running.paths.audit_log, token)


async def test_replayed_command_is_refused(world: World) -> None:
    signed = world.keys.signer.sign(
        agent_id=AGENT_ID, command_type="scale", params={"replicas": 3}, now=time.time()
    )
    assert await world.cp.send_command("first-delivery", signed.token)
    final = await world.cp.next_frame(
        type=Status, where=lambda f: f.jti == signed.jti and f.state in FINAL_STATES
    )
    assert final.state == "succeeded", final
    assert world.driver.calls == [("scale", 3, signed.jti)]

    # The same token under a new delivery ref: a replay.
    assert await world.cp.send_command("second-delivery", signed.token)
    replayed = await world.cp.next_frame(
        type=DeliveryRejected, where=lambda f: f.ref == "second-delivery"
    )
    assert (replayed.reason, replayed.jti) == ("replayed", signed.jti)
    # The same token under the same ref again: a duplicate delivery, also not run again.
    assert await world.cp.send_command("first-delivery", signed.token)
    duplicate = await world.cp.next_frame(
        type=DeliveryRejected, where=lambda f: f.ref == "first-delivery"
    )
    assert duplicate.reason == "duplicate_delivery", duplicate

    await assert_still_usable(world, earlier_calls=1)
    assert world.driver.executed(signed.jti) == 1

    records = world.audit()
    verification = find(records, "command_verification", jti=signed.jti)
    assert [(r["ref"], r["result"], r.get("reason")) for r in verification] == [
        ("first-delivery", "verified", None),
        ("second-delivery", "rejected", "replayed"),
        ("first-delivery", "rejected", "duplicate_delivery"),
    ]
    assert len(find(records, "execution_started", jti=signed.jti)) == 1
    assert_no_leak(world.logs, world.running.paths.audit_log, signed.token)


async def test_replay_after_restart_is_refused(
    pki: PKIPaths, keys: Keys, start_agent: AgentStarter, op_logs: LogEntries
) -> None:
    async with HostileControlPlane(pki, timeout=scaled(10)) as cp:
        first_driver = RecordingDriver()
        first = await start_agent(port=cp.port, driver=first_driver, name="restarted")
        await cp.connection(1)
        world = World(cp=cp, running=first, driver=first_driver, keys=keys, logs=op_logs)
        signed = keys.signer.sign(
            agent_id=AGENT_ID, command_type="scale", params={"replicas": 3}, now=time.time()
        )
        assert await cp.send_command("before-restart", signed.token)
        final = await cp.next_frame(
            type=Status, where=lambda f: f.jti == signed.jti and f.state in FINAL_STATES
        )
        assert final.state == "succeeded", final
        assert first_driver.executed(signed.jti) == 1
        await first.stop()
        assert await cp.wait_closed(cp.connections[0]) == 1001  # "agent stopping"

        second_driver = RecordingDriver()
        second = await start_agent(port=cp.port, driver=second_driver, name="restarted")
        assert second.paths.state_dir == first.paths.state_dir
        try:
            await cp.connection(2)
            world = World(cp=cp, running=second, driver=second_driver, keys=keys, logs=op_logs)
            assert await cp.send_command("after-restart", signed.token)
            replayed = await cp.next_frame(
                type=DeliveryRejected, where=lambda f: f.ref == "after-restart"
            )
            assert (replayed.reason, replayed.jti) == ("replayed", signed.jti)
            await assert_still_usable(world)
            assert second_driver.executed(signed.jti) == 0
        finally:
            if not second.task.done():
                await second.stop()

    records = audit_records(second.paths.audit_log)  # one log across both runs
    assert len(find(records, "agent_started")) == 2
    rejected = find(records, "command_verification", ref="after-restart")
    assert [(r["result"], r["reason"]) for r in rejected] == [("rejected", "replayed")]
    assert len(find(records, "execution_started", jti=signed.jti)) == 1
    assert_no_leak(world.logs, world.running.paths.audit_log, signed.token)


# --------------------------------------------------------------------------------------------
# Validly signed commands that must not run


@dataclass(frozen=True)
class CommandCase:
    name: str
    command: str
    params: dict[str, object]
    reason: str
    policy_deny: bool


COMMAND_CASES: tuple[CommandCase, ...] = (
    CommandCase("unknown_command_type", "reboot_host", {}, "unknown_command_type", False),
    CommandCase("scale_above_policy", "scale", {"replicas": 10}, "policy_denied", True),
    CommandCase("upgrade_not_allowed", "upgrade", {"version": "9.9.9"}, "policy_denied", True),
    CommandCase(
        "metrics_target_not_allowed",
        "collect_metrics",
        {"targets": ["database"]},
        "policy_denied",
        True,
    ),
    CommandCase("scale_replicas_string", "scale", {"replicas": "3"}, "invalid_params", False),
    CommandCase("upgrade_version_number", "upgrade", {"version": 2}, "invalid_params", False),
    CommandCase(
        "scale_extra_param", "scale", {"replicas": 2, "cmd": "rm"}, "invalid_params", False
    ),
)


@pytest.mark.parametrize("case", COMMAND_CASES, ids=lambda case: case.name)
async def test_signed_command_outside_policy_or_schema_is_rejected(
    case: CommandCase, world: World
) -> None:
    signed = world.keys.signer.sign(
        agent_id=AGENT_ID, command_type=case.command, params=case.params, now=time.time()
    )
    ref = f"signed-{case.name}"
    assert await world.cp.send_command(ref, signed.token)
    final = await world.cp.next_frame(
        type=Status,
        where=lambda f: f.jti == signed.jti and f.state in FINAL_STATES,
    )
    assert (final.ref, final.state, final.reason) == (ref, "rejected", case.reason), final
    assert final.detail
    states = [s.state for s in world.cp.frames(Status) if s.jti == signed.jti]
    assert states == ["received", "rejected"]

    await assert_still_usable(world)

    records = world.audit()
    verification = find(records, "command_verification", jti=signed.jti)
    assert [r["result"] for r in verification] == ["verified"]
    decisions = find(records, "policy_decision", jti=signed.jti)
    if case.policy_deny:
        assert [d["verdict"] for d in decisions] == ["deny"], decisions
        assert decisions[0]["rule"].startswith(f"{case.command}"), decisions
        assert decisions[0]["policy_sha256"]
    else:
        assert decisions == []
    rejected = find(records, "command_rejected", jti=signed.jti)
    assert [r["reason"] for r in rejected] == [case.reason]
    assert find(records, "execution_started", jti=signed.jti) == []
    assert_no_leak(world.logs, world.running.paths.audit_log, signed.token)


# --------------------------------------------------------------------------------------------
# Frames that break the wire protocol


def _command_text(k: Keys, ref: str = "in-a-bad-frame") -> str:
    token = k.signer.sign(
        agent_id=AGENT_ID, command_type="scale", params={"replicas": 2}, now=time.time()
    ).token
    return encode(CommandFrame(ref=ref, token=token))


def _with_member(text: str, extra: str) -> str:
    return text[:-1] + "," + extra + "}"


@dataclass(frozen=True)
class FrameCase:
    name: str
    make: Callable[[Keys], str | bytes]
    code: str


FRAME_CASES: tuple[FrameCase, ...] = (
    FrameCase("malformed_json", lambda k: _command_text(k)[:-1], "malformed_frame"),
    FrameCase("binary_message", lambda k: _command_text(k).encode(), "unsupported_frame"),
    FrameCase(
        "unknown_frame_type",
        lambda k: _command_text(k).replace('"type":"command"', '"type":"execute"'),
        "unknown_frame_type",
    ),
    FrameCase(
        "oversize_frame",
        lambda k: _with_member(_command_text(k), f'"pad":"{"x" * MAX_FRAME_TO_AGENT}"'),
        "frame_too_large",
    ),
    FrameCase(
        "duplicate_keys",
        lambda k: _with_member(_command_text(k), '"ref":"other"'),
        "malformed_frame",
    ),
    FrameCase(
        "invalid_ref", lambda k: _command_text(k, ref="no spaces allowed"), "malformed_frame"
    ),
    FrameCase(
        "nan_constant",
        lambda k: _with_member(_command_text(k), '"n":NaN'),
        "malformed_frame",
    ),
    FrameCase(
        "second_welcome",
        lambda _k: encode(
            Welcome(
                protocol=PROTOCOL_VERSION, agent_id="agent-9", server_time=0, heartbeat_interval=1
            )
        ),
        "unexpected_frame",
    ),
)


@pytest.mark.parametrize("case", FRAME_CASES, ids=lambda case: case.name)
async def test_hostile_frame_is_refused_and_connection_stays(case: FrameCase, world: World) -> None:
    message = case.make(world.keys)
    if case.name == "oversize_frame":
        assert MAX_FRAME_TO_AGENT < len(message) < WEBSOCKET_MAX_SIZE
    connection = world.cp.current
    assert await world.cp.send_raw(message)

    error = await world.cp.next_frame(type=ErrorFrame)
    assert error.code == case.code, error
    assert error.message

    await assert_still_usable(world)
    assert world.cp.connection_count == 1, "the agent dropped the connection"
    assert not connection.closed.is_set()

    records = world.audit()
    refused = find(records, "frame_rejected")
    assert [r["reason"] for r in refused] == [case.code], refused
    assert refused[0]["detail"]
    if case.name == "oversize_frame":
        assert refused[0]["size"] == len(message)
    # The command inside the bad frame never became a delivery.
    assert [r["ref"] for r in find(records, "command_received")] == [
        f"valid-{r['jti']}" for r in find(records, "execution_started")
    ]
    assert find(records, "connection_down") == []
    assert_no_leak(world.logs, world.running.paths.audit_log, *_tokens_in(message))


def _tokens_in(message: str | bytes) -> list[str]:
    text = message.decode() if isinstance(message, bytes) else message
    start = text.find('"token":"')
    if start < 0:
        return []
    start += len('"token":"')
    return [text[start : text.index('"', start)]]


async def test_message_over_websocket_limit_closes_and_agent_reconnects(world: World) -> None:
    first = world.cp.current
    message = _with_member(_command_text(world.keys, "huge"), f'"pad":"{"x" * WEBSOCKET_MAX_SIZE}"')
    assert len(message) > WEBSOCKET_MAX_SIZE
    await world.cp.send_raw(message)  # the agent may close before it was all written

    assert await world.cp.wait_closed(first) == 1009
    await world.cp.connection(2)
    await assert_still_usable(world)
    assert world.running.agent.parts.link.reconnects >= 1

    records = world.audit()
    down = find(records, "connection_down")
    assert len(down) == 1, down
    assert "1009" in down[0]["reason"], down
    assert len(find(records, "connection_up")) == 2
    assert find(records, "frame_rejected") == []
    assert find(records, "command_received", ref="huge") == []
    assert_no_leak(world.logs, world.running.paths.audit_log, *_tokens_in(message))


# --------------------------------------------------------------------------------------------
# The same hostile tokens through the real stub's relay, in one agent run


async def test_hostile_tokens_relayed_by_the_stub(
    stub: StubServer,
    api: StubClient,
    keys: Keys,
    start_agent: AgentStarter,
    op_logs: LogEntries,
) -> None:
    driver = RecordingDriver()
    running = await start_agent(port=stub.agent_port, driver=driver)
    tokens: list[str] = []
    refs: dict[str, str] = {}
    for case in TOKEN_CASES:
        token = case.make(keys)
        tokens.append(token)
        record = await api.send_signed(AGENT_ID, token)
        answer = await api.command(record["ref"], wait_for="final", wait_seconds=scaled(10))
        command = answer["command"]
        assert not answer["timed_out"], case.name
        assert (command["state"], command["reason"]) == ("rejected", case.reason), case.name
        refs[record["ref"]] = case.reason
    assert driver.calls == []

    sent = await api.send(AGENT_ID, "scale", {"replicas": 2})
    answer = await api.command(
        sent["ref"], wait_for="final", wait_seconds=scaled(10), with_token=True
    )
    assert answer["command"]["state"] == "succeeded", answer
    token = answer["command"]["token"]
    tokens.append(token)
    replay = await api.send_signed(AGENT_ID, token)
    answer = await api.command(replay["ref"], wait_for="final", wait_seconds=scaled(10))
    assert (answer["command"]["state"], answer["command"]["reason"]) == ("rejected", "replayed")
    refs[replay["ref"]] = "replayed"
    assert driver.calls == [("scale", 2, sent["jti"])]
    assert not running.task.done()

    records = audit_records(running.paths.audit_log)
    for ref, reason in refs.items():
        verification = find(records, "command_verification", ref=ref)
        assert [(r["result"], r["reason"]) for r in verification] == [("rejected", reason)], ref
    assert_no_leak(op_logs, running.paths.audit_log, *tokens)
