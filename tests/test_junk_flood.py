"""A flood of junk frames does not grow the agent's memory (or its audit log) without bound.

The agent runs as a real process (``python -m agent.cli run``, the ``journal`` driver, so no
workload processes) against :class:`tests.hostile_cp.HostileControlPlane` over real mutual TLS
on loopback. The control plane floods it with tens of thousands of messages: malformed JSON,
frames over the agent's 64 KiB frame limit but under the WebSocket layer's 1 MiB hard limit,
binary messages, unknown and mistyped frames, ``command`` frames with garbage tokens and with
well-formed tokens signed by an untrusted key, acks for nothing, and a ping storm (valid, so
never refused: it makes the agent work through far more frames per connection). The agent may
close a connection that causes too many refusals (docs/PROTOCOL.md §3, close code 4005); the
flood goes on over the next connection. Meanwhile the agent's RSS is sampled every 0.2 s.

Afterwards the agent must still be alive, still execute a validly signed command, and its audit
log must verify and have grown in proportion to the connections the peer got (bounded by the
per-connection error budget), not to the number of junk frames it sent.

``BYOC_FLOOD_SECONDS`` / ``BYOC_FLOOD_FRAMES`` change the size of the flood; the random choices
are seeded (``BYOC_FLOOD_SEED``). Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.exceptions import ConnectionClosed

from agent.core.frames import (
    FINAL_STATES,
    MAX_FRAME_TO_AGENT,
    PROTOCOL_VERSION,
    Ack,
    CommandFrame,
    DeliveryRejected,
    ErrorFrame,
    Frame,
    Ping,
    Pong,
    Status,
    Welcome,
    encode,
)
from agent.core.verifier import COMMAND_TYP, jwk_thumbprint
from agent.io.audit_file import verify_file
from agent.io.tunnel import WEBSOCKET_MAX_SIZE
from byoc_demo.layout import DEMO_ISSUER, DemoPaths, write_agent_files
from certs.pki import PKIPaths
from control_plane_stub.signer import CommandSigner
from tests.conftest import scaled
from tests.hostile_cp import Connection, HostileControlPlane

AGENT_ID: Final = "agent-1"
SEED: Final = int(os.environ.get("BYOC_FLOOD_SEED", "4005"))
FLOOD_SECONDS: Final = float(os.environ.get("BYOC_FLOOD_SECONDS", "30"))
FLOOD_FRAMES: Final = int(os.environ.get("BYOC_FLOOD_FRAMES", "100000"))
SAMPLE_INTERVAL: Final = 0.2
MB: Final = 1024 * 1024

# Thresholds, from the first measurements (2 cores, other test suites running; every run prints
# its figures): the agent's RSS right after connecting is ~43 MB; under the flood its peak was
# +11..+24 MB, reached during the blast of ~1 MiB frames: once the agent stops reading a
# connection it is closing, its WebSocket layer still holds up to 16 received messages of up to
# 1 MiB each (max_queue x max_size), plus the one being read and the TLS buffers. Afterwards it
# stays flat. 40 MB leaves room for that worst case and allocator noise.
RSS_BUDGET: Final = 40 * MB
# The last quarter of the samples is printed with its trend (a least-squares slope; measured
# -50..+60 kB/s) and how far it rose over the earlier peak (at most +0.1 MB): figures of the
# machine, for a person reading the output, not asserted.
# docs/PROTOCOL.md §3 and §10: a connection may cause at most this many refused frames and
# deliveries per window before the agent closes it (4005). Each refusal writes at most three
# audit records (command_received, command_verification, result_delivered; a refused frame
# writes one; a ping none), plus connection_up/connection_down per connection.
MAX_PEER_ERRORS: Final = 100
AUDIT_RECORDS_PER_CONNECTION: Final = 3 * (MAX_PEER_ERRORS + 1) + 4


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------------------------
# The agent process


@dataclass
class AgentProcess:
    paths: DemoPaths
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.paths.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.popen is not None, "the agent was not started"
        return self.popen

    def alive(self) -> bool:
        return self.process.poll() is None

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, scaled(60))

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(scaled(30))


def journal_config(paths: DemoPaths) -> None:
    """Switch the demo configuration to the ``journal`` driver: no workload processes."""
    text = paths.config.read_text()
    start = text.index("[driver]")
    paths.config.write_text(text[:start] + '[driver]\nkind = "journal"\n')


class FloodingControlPlane(HostileControlPlane):
    """The hostile control plane, with two changes for flooding:

    - its read loop never waits on its own sends (acks, pongs): while a connection is flooded,
      the agent's answers must keep being read, or both sides end up blocked writing to a peer
      that is not reading (the agent then gives up after its 10 s send timeout: correct, but a
      poor flood);
    - it counts the agent's answers (``error``, ``delivery_rejected``, ``pong``) per connection,
      so the flood can keep a bounded number of junk frames in flight. Bounded because once the
      agent closes a connection it no longer reads what is queued for it (its WebSocket layer
      holds at most 16 unread messages, then stops reading the socket), so more in flight would
      keep the closing handshake from completing until its 5 s close timeout.
    """

    def __init__(self, pki: PKIPaths, **kwargs: Any) -> None:
        super().__init__(pki, **kwargs)
        self._replies: set[asyncio.Task[None]] = set()
        self.answers: Counter[int] = Counter()
        self._answered = asyncio.Event()
        self._rejected_refs: set[str] = set()

    async def _receive(self, connection: Connection, message: str | bytes) -> None:
        body = json.loads(message) if isinstance(message, str) else {}
        kind, ref = body.get("type"), body.get("ref")
        # An answer to a junk frame sent on this connection; not a delivery_rejected the agent
        # sends again from its outbox (same ref) because its ack did not arrive before a close.
        fresh = kind == DeliveryRejected.type and ref not in self._rejected_refs
        if fresh:
            self._rejected_refs.add(str(ref))
        if kind in (ErrorFrame.type, Pong.type) or fresh:
            self.answers[connection.number] += 1
            self._answered.set()
        # Tasks run in the order they were made: the frames are still recorded in order.
        task = asyncio.create_task(super()._receive(connection, message))
        self._replies.add(task)
        task.add_done_callback(self._reply_done)

    def _reply_done(self, task: asyncio.Task[None]) -> None:
        self._replies.discard(task)
        if not task.cancelled():
            task.exception()  # a reply to a connection that closed meanwhile: nothing to do

    async def wait_answers(self, connection: Connection, count: int) -> None:
        """Until the agent answered ``count`` frames on ``connection``, or closed it."""
        closed = asyncio.ensure_future(connection.closed.wait())
        try:
            async with asyncio.timeout(scaled(20)):
                while self.answers[connection.number] < count and not closed.done():
                    self._answered.clear()
                    answered = asyncio.ensure_future(self._answered.wait())
                    await asyncio.wait({answered, closed}, return_when=asyncio.FIRST_COMPLETED)
                    answered.cancel()
        finally:
            closed.cancel()

    async def close(self) -> None:
        for task in list(self._replies):
            task.cancel()
        await asyncio.gather(*self._replies, return_exceptions=True)
        await super().close()


@pytest.fixture
async def hostile(pki: PKIPaths) -> AsyncIterator[FloodingControlPlane]:
    async with FloodingControlPlane(pki, heartbeat_interval=1.0, timeout=scaled(15)) as cp:
        yield cp


@pytest.fixture
def agent_process(
    tmp_path: Path, pki: PKIPaths, hostile: FloodingControlPlane, short_tmp: Path
) -> Iterator[AgentProcess]:
    paths = write_agent_files(
        tmp_path / "agent",
        pki=pki.root,
        control_plane_port=hostile.port,
        run_dir=short_tmp,
        heartbeat_interval=1.0,
        heartbeat_timeout=5.0,
        backoff_base=0.05,
        backoff_cap=0.5,
        log_level="warning",
    )
    journal_config(paths)
    process = AgentProcess(paths, tmp_path / "agent.log")
    yield process
    process.kill()


# --------------------------------------------------------------------------------------------
# Junk


@dataclass
class Junk:
    """Makes junk messages of several kinds, each one different (fresh refs and jtis, so that
    anything the agent kept per delivery would show as growth)."""

    rng: random.Random
    trusted_kid: str
    foreign: Ed25519PrivateKey
    kinds: Counter[str] = field(default_factory=Counter)
    _n: int = 0

    KINDS: ClassVar[dict[str, int]] = {  # kind: weight
        # Refused: each one spends the connection's error budget (docs/PROTOCOL.md §3).
        "malformed_json": 20,
        "oversize": 2,
        "binary": 10,
        "unknown_type": 12,
        "mistyped": 10,
        "garbage_token": 14,
        "untrusted_signature": 14,
        "unknown_kid": 8,
        "unexpected": 5,
        # Pointless but valid, so not refused: a ping storm (each ping costs the agent a pong).
        "ping": 600,
    }

    def next(self, mode: str = "window") -> tuple[str | bytes, bool]:
        """One junk message, and whether the agent answers it (an ``error`` frame, a
        ``delivery_rejected`` or a ``pong``; an ack for nothing is ignored). Mode ``big``: only
        frames of about 1 MiB, just under the WebSocket layer's hard limit; ``blast``: no
        oversize frames (as many frames as possible through the pipe); else all kinds."""
        self._n += 1
        if mode == "big":
            self.kinds["oversize_1mib"] += 1
            return self._oversize(near_hard_limit=True), True
        weights = {**self.KINDS, "oversize": 0} if mode == "blast" else self.KINDS
        kind = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        if kind == "unexpected" and self.rng.random() < 0.5:
            self.kinds["ack_for_nothing"] += 1
            return encode(Ack(seq=10**12 + self._n)), False  # ignored, not answered
        self.kinds[kind] += 1
        make: Callable[[], str | bytes] = getattr(self, f"_{kind}")
        return make(), True

    def _ping(self) -> str:
        return encode(Ping(id=self._n))

    def _ref(self) -> str:
        return f"junk-{self._n}-{self.rng.getrandbits(32):08x}"

    def _command(self) -> str:
        return encode(CommandFrame(ref=self._ref(), token="a.b.c"))

    def _malformed_json(self) -> str:
        text = self._command()
        cut = self.rng.randrange(1, len(text))
        return self.rng.choice(
            (
                text[:cut],
                text[:cut] + "}" + text[cut:],
                text.replace('"ref"', "ref", 1),
                text + text,
                '{"type":"command","ref":"' + "\\ud800" * 20 + '",',
                "[" * 40 + "]" * 40,
                "".join(chr(self.rng.randrange(32, 0x2FF)) for _ in range(64)),
            )
        )

    def _oversize(self, *, near_hard_limit: bool = False) -> str:
        # Over the agent's frame limit (refused, connection kept), under the WebSocket layer's
        # hard limit (which would close with 1009). Mostly ~64-130 kB, now and then ~1 MiB.
        if near_hard_limit or self.rng.random() < 0.05:
            size = WEBSOCKET_MAX_SIZE - self.rng.randint(1024, 4096)
        else:
            size = MAX_FRAME_TO_AGENT + self.rng.randint(1, MAX_FRAME_TO_AGENT)
        head = self._command()[:-1] + ',"pad":"'
        return head + "x" * (size - len(head) - 2) + '"}'

    def _binary(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, 512))

    def _unknown_type(self) -> str:
        kind = self.rng.choice(("execute", "hello", "status", "Command", "x" * 60, ""))
        return json.dumps({"type": kind, "ref": self._ref(), "n": self._n})

    def _mistyped(self) -> str:
        return self.rng.choice(
            (
                json.dumps({"type": "command", "ref": self._ref(), "token": 7}),
                json.dumps({"type": "command", "ref": "not a valid ref", "token": "x"}),
                json.dumps({"type": "ack", "seq": -self._n}),
                json.dumps({"type": "ping", "id": "one"}),
                '{"type":"ping","id":1,"x":' + "[" * 40 + "]" * 40 + "}",  # too deep
                '{"type":"ping","id":1,"id":2}',
                '{"type":"pong","id":NaN}',
            )
        )

    def _garbage_token(self) -> str:
        token = ".".join(b64url(self.rng.randbytes(self.rng.randint(0, 300))) for _ in range(3))
        return encode(CommandFrame(ref=self._ref(), token=token))

    def _signed_token(self, kid: str) -> str:
        now = int(time.time())
        header = b64url(json.dumps({"alg": "EdDSA", "typ": COMMAND_TYP, "kid": kid}).encode())
        claims = {
            "iss": DEMO_ISSUER,
            "aud": AGENT_ID,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": uuid.UUID(int=self.rng.getrandbits(128)).hex,
            "cmd": {"type": "scale", "params": {"replicas": self.rng.randint(1, 6)}},
        }
        payload = b64url(json.dumps(claims).encode())
        signature = b64url(self.foreign.sign(f"{header}.{payload}".encode()))
        return encode(CommandFrame(ref=self._ref(), token=f"{header}.{payload}.{signature}"))

    def _untrusted_signature(self) -> str:
        # Names the trusted key, signed by another: bad_signature.
        return self._signed_token(self.trusted_kid)

    def _unknown_kid(self) -> str:
        return self._signed_token(jwk_thumbprint(self.foreign.public_key()))

    def _unexpected(self) -> str:  # a second welcome: unexpected_frame
        return encode(
            Welcome(
                protocol=PROTOCOL_VERSION,
                agent_id="agent-9",
                server_time=time.time(),
                heartbeat_interval=1.0,
            )
        )


# --------------------------------------------------------------------------------------------
# Measurement


class RssSampler:
    """Samples a process's RSS every SAMPLE_INTERVAL from a thread of its own, so that a busy
    event loop (the flood) does not thin out the samples."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        rss = self.process.memory_info().rss
        self.samples.append((time.monotonic(), rss))
        return rss

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            with contextlib.suppress(psutil.Error):  # the agent died: the test says so
                self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def trend(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, bytes per second."""
    times = [t for t, _ in samples]
    values = [float(v) for _, v in samples]
    return statistics.linear_regression(times, values).slope


@dataclass
class FloodResult:
    sent: int = 0
    bytes_sent: int = 0
    lost_to_close: int = 0
    seconds: float = 0.0
    first_connection: int = 0
    last_connection: int = 0
    modes: Counter[str] = field(default_factory=Counter)

    @property
    def connections(self) -> int:
        return self.last_connection - self.first_connection + 1


async def live_connection(cp: HostileControlPlane, after: int = 0) -> Connection:
    """The agent's current connection (welcomed, not closed), numbered above ``after``;
    waits for the agent to reconnect if needed."""
    while True:
        number = max(after + 1, cp.connection_count)
        connection = await cp.connection(number, within=scaled(30))
        if not connection.closed.is_set():
            return connection
        after = number


def flood_mode(index: int) -> str:
    """How the ``index``-th flooded connection (from 0) is flooded.

    ``window``: at most WINDOW answerable junk frames in flight: the agent works through junk as
    fast as it can, and its close (4005) finds little in the pipe, so connections turn over
    quickly. ``blast``: no window, the pipe stays full (the agent's receive queue, TCP buffers).
    ``big``: a blast of ~1 MiB frames, the worst case for what the agent buffers. A blasted
    connection takes the agent's close timeout (5 s) to end: the closing handshake cannot get
    through the junk queued for it (see FloodingControlPlane); so there are only two, early,
    and the last quarter of the RSS samples is a steady windowed flood."""
    return {2: "blast", 4: "big"}.get(index, "window")


WINDOW: Final = 10


async def flood(
    cp: FloodingControlPlane, junk: Junk, *, seconds: float, frames: int
) -> FloodResult:
    loop = asyncio.get_running_loop()
    result = FloodResult()
    connection = await live_connection(cp)
    result.first_connection = result.last_connection = connection.number
    mode, expected = flood_mode(0), 0
    result.modes[mode] += 1
    started = loop.time()
    while result.sent < frames and loop.time() - started < seconds:
        if connection.closed.is_set():
            connection = await live_connection(cp, after=connection.number)
            result.last_connection = connection.number
            mode, expected = flood_mode(connection.number - result.first_connection), 0
            result.modes[mode] += 1
        if mode == "window" and expected - cp.answers[connection.number] >= WINDOW:
            await cp.wait_answers(connection, expected - WINDOW + 1)
            continue
        message, answered = junk.next(mode)
        try:
            # Bounded: an agent that stopped reading without closing would hang here.
            async with asyncio.timeout(scaled(20)):
                await connection.websocket.send(message)
        except ConnectionClosed:
            result.lost_to_close += 1
            await cp.wait_closed(connection, within=scaled(30))  # the handler has seen it too
            continue
        result.sent += 1
        result.bytes_sent += len(message)
        expected += answered
        if result.sent % 32 == 0:
            # send() returns without yielding while the transport takes more: let the rest of
            # the control plane run now and then (read the agent's answers, notice a closed
            # connection, accept the next one), or a blast starves it.
            await asyncio.sleep(0)
    result.seconds = loop.time() - started
    return result


async def run_valid_command(cp: FloodingControlPlane, signer: CommandSigner) -> Status:
    """Deliver a validly signed command until the agent runs it. A delivery can be lost with
    its connection (the last flooded one may still hold junk that makes the agent close it) or
    be refused as ``rate_limited`` (the flood used up the delivery rate): then a fresh command
    (new jti, new ref) is delivered again."""
    for attempt in range(30):
        connection = await live_connection(cp)
        signed = signer.sign(
            agent_id=AGENT_ID, command_type="scale", params={"replicas": 3}, now=time.time()
        )
        ref = f"valid-{attempt}"

        def concerns_ref(frame: Frame, ref: str = ref) -> bool:
            if isinstance(frame, DeliveryRejected):
                return frame.ref == ref
            return isinstance(frame, Status) and frame.ref == ref and frame.state in FINAL_STATES

        if not await cp.send_command(ref, signed.token, to=connection):
            continue
        answer = asyncio.ensure_future(
            cp.next_frame(type=Frame, where=concerns_ref, within=scaled(30))
        )
        closed = asyncio.ensure_future(connection.closed.wait())
        await asyncio.wait({answer, closed}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if not answer.done():  # the connection ended first: deliver again on the next one
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)
            continue
        result = answer.result()
        if isinstance(result, Status):
            return result
        assert isinstance(result, DeliveryRejected)
        assert result.reason in {"rate_limited", "busy"}, result
        await asyncio.sleep(0.5)  # a retry delay (the refusal says: deliver again later)
    pytest.fail("the agent never took the valid command")


# --------------------------------------------------------------------------------------------
# The test


async def test_a_junk_flood_does_not_grow_the_agent_without_bound(
    agent_process: AgentProcess, hostile: FloodingControlPlane, pki: PKIPaths
) -> None:
    rng = random.Random(SEED)
    signer = CommandSigner.from_file(pki.signing_key, issuer=DEMO_ISSUER)
    junk = Junk(
        rng=rng,
        trusted_kid=signer.kid,
        foreign=Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"untrusted").digest()),
    )
    agent_process.start()
    await hostile.connection(1, within=scaled(30))
    sampler = RssSampler(psutil.Process(agent_process.process.pid))
    baseline = sampler.sample()  # right after connecting
    audit_before = verify_file(agent_process.paths.audit_log).summary.records

    with sampler:
        result = await flood(hostile, junk, seconds=scaled(FLOOD_SECONDS), frames=FLOOD_FRAMES)
    samples = sampler.samples
    assert agent_process.alive(), "the agent died under the flood"

    rss = [value for _, value in samples]
    peak = max(rss)
    quarter = max(4, len(samples) // 4)
    last_quarter, earlier = samples[-quarter:], samples[:-quarter] or samples[:1]
    slope = trend(last_quarter)
    new_high = max(v for _, v in last_quarter) - max(v for _, v in earlier)
    answered = sum(hostile.answers.values())
    close_codes = Counter(c.close_code for c in hostile.connections if c.closed.is_set())
    print(
        f"\njunk flood (seed {SEED}): {result.sent} frames, {result.bytes_sent / MB:.1f} MB sent "
        f"in {result.seconds:.1f}s = {result.sent / result.seconds:,.0f} frames/s "
        f"({result.lost_to_close} more hit a closing connection); the agent answered {answered} "
        f"of them ({answered / result.seconds:,.0f}/s); it ignores acks for nothing and drops "
        f"what is still queued when it closes a connection\n"
        f"kinds: {dict(junk.kinds)}\n"
        f"connections: {result.connections} flooded {dict(result.modes)}, "
        f"close codes {dict(close_codes)}\n"
        f"agent RSS: baseline {baseline / MB:.1f} MB, peak {peak / MB:.1f} MB "
        f"(+{(peak - baseline) / MB:.1f} MB), last {rss[-1] / MB:.1f} MB, {len(samples)} samples; "
        f"last quarter: trend {slope / 1024:+.0f} kB/s, its peak {new_high / MB:+.1f} MB over "
        f"the earlier peak"
    )
    assert result.sent >= min(FLOOD_FRAMES, 5_000), "the flood was too small to mean anything"
    assert answered > 0, "the agent answered none of it"
    # Bounded memory is the behaviour under test; how fast it settles (the trend printed
    # above) is a figure of the machine, not asserted here.
    assert peak - baseline < RSS_BUDGET, f"RSS grew by {(peak - baseline) / MB:.1f} MB"

    # Still alive and useful: a validly signed command runs (the journal records it).
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = await run_valid_command(hostile, signer)
    took = loop.time() - started
    assert status.state == "succeeded", status
    journal = agent_process.paths.state_dir / "driver" / "journal.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [e["event"] for e in entries if e.get("jti") == status.jti] == ["start", "end"]

    started = loop.time()
    assert await agent_process.stop() == 0
    stopped = loop.time() - started
    summary = verify_file(agent_process.paths.audit_log).summary  # the chain is intact
    size = agent_process.paths.audit_log.stat().st_size
    added = summary.records - audit_before
    connections = hostile.connection_count
    events = dict(summary.events.most_common(8))
    log_size = agent_process.log.stat().st_size
    print(
        f"audit log: {summary.records} records ({added} during the run), {size / 1024:.0f} kB, "
        f"{added / max(1, result.sent):.3f} records per junk frame sent; "
        f"{connections} connections in all; top events {events}; "
        f"operational log {log_size / 1024:.0f} kB; the valid command took {took:.1f}s, "
        f"stopping the agent {stopped:.1f}s"
    )
    bound = connections * AUDIT_RECORDS_PER_CONNECTION + 50
    assert added <= bound, f"{added} audit records for {connections} connections (bound {bound})"
