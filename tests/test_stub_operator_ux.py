"""``cp-stub`` as an operator meets it (issue 13): options in either order, a wait that says
when it gives up, a forward that says why a connection got no stream, a listener whose port is
taken, refused client certificates in the stub's log, and an Idempotency-Key that makes a
retried ``send`` return the command stored the first time (also across a stub killed and
started again).

Real parts throughout: the stub and the agent with mutual TLS on loopback, the CLI as a child
process where it handles signals (``forward``) or must show that no traceback escapes
(``serve``), a stub process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
import pytest
import structlog

from certs.pki import PKIPaths
from control_plane_stub.cli import EXIT_TIMEOUT
from control_plane_stub.cli import main as stub_cli
from control_plane_stub.server import StubServer
from tests.conftest import AgentStarter, scaled, stub_config
from tests.fakes import RecordingDriver
from tests.processes import REPO, free_port, stub_process
from tests.test_stub_cli import cp_stub


async def test_send_takes_its_options_before_or_after_the_type(
    stub: StubServer, start_agent: AgentStarter, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = RecordingDriver()
    await start_agent(port=stub.agent_port, driver=driver)
    # As README.md used to write it (it failed: --wait after the type was unknown).
    assert await cp_stub(stub, "send", "agent-1", "scale", "--replicas", "3", "--wait") == 0
    assert "-> succeeded" in capsys.readouterr().out
    assert driver.replicas == 3
    code = await cp_stub(
        stub, "send", "--wait", "agent-1", "scale", "--replicas", "2", "--json", "--ttl", "60"
    )
    assert code == 0
    out = capsys.readouterr().out  # after the in-process stub's and agent's log lines
    answer, _ = json.JSONDecoder().raw_decode(out, out.index('{\n  "command"'))
    assert answer["command"]["state"] == "succeeded"
    assert driver.replicas == 2


async def test_a_wait_that_gives_up_says_so(
    stub: StubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # agent-2 never connects: its command stays queued.
    code = await cp_stub(stub, "send", "agent-2", "collect-metrics", "--wait", "--timeout", "0.2")
    assert code == EXIT_TIMEOUT
    captured = capsys.readouterr()
    (line,) = [line for line in captured.out.splitlines() if "-> queued" in line]
    ref = line.split()[0]
    assert captured.err.strip() == (
        f"cp-stub: gave up waiting after 0.2 s: {ref} is still queued; `cp-stub wait {ref}` "
        "waits again (--timeout sets how long)"
    )
    assert await cp_stub(stub, "wait", ref, "--timeout", "0.1") == EXIT_TIMEOUT
    assert "gave up waiting after 0.1 s" in capsys.readouterr().err


def test_the_default_wait_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["send", "--help"], ["send", "a", "scale", "--help"], ["wait", "--help"]):
        with pytest.raises(SystemExit):
            stub_cli(argv)
        assert "(default 120)" in " ".join(capsys.readouterr().out.split()), argv


def test_serve_on_a_port_in_use_says_so_in_one_line(pki: PKIPaths, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = stub_process(
            pki, agent_port=port, api_port=0, db=tmp_path / "stub.db", log=tmp_path / "log"
        )
        done = subprocess.run(
            serve.argv,
            capture_output=True,
            text=True,
            timeout=scaled(60),
            check=False,
            cwd=REPO,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"cp-stub: error: cannot listen for agents on 127.0.0.1:{port}: Address already in use"
    ]


async def test_refused_client_certificates_are_logged(
    tmp_path: Path, pki: PKIPaths, foreign_pki: PKIPaths
) -> None:
    with structlog.testing.capture_logs() as logs:
        server = StubServer(stub_config(pki, tmp_path / "stub.db"))
        await server.start()
        try:
            for cert in (foreign_pki.agent_cert("agent-1"), None):
                context = ssl.create_default_context(cafile=str(pki.server_ca_cert))
                if cert is not None:
                    context.load_cert_chain(cert, foreign_pki.agent_key("agent-1"))
                # TLS 1.3: the client's side completes; the refusal arrives on the first read.
                with contextlib.suppress(ssl.SSLError, ConnectionError):
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", server.agent_port, ssl=context, server_hostname="localhost"
                    )
                    await reader.read()
                    writer.close()
        finally:
            await server.close()
    refused = [entry for entry in logs if entry["event"] == "client_certificate_refused"]
    assert [(entry["log_level"], entry["reason"]) for entry in refused] == [
        ("warning", "unable to get local issuer certificate"),
        ("warning", "no client certificate"),
    ]


# -- forward ----------------------------------------------------------------------------------


async def test_forward_says_why_a_connection_got_no_stream(
    stub: StubServer, start_agent: AgentStarter, port_range: tuple[int, int]
) -> None:
    await start_agent(port=stub.agent_port)
    closed = port_range[0] + 7  # allowed by the demo policy's stream targets, nothing listens
    for target, why in (
        ("127.0.0.1:9", "policy_denied: "),
        (f"127.0.0.1:{closed}", f"target_unreachable: cannot connect to 127.0.0.1:{closed}"),
    ):
        listen = free_port()
        forward = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "control_plane_stub.cli",
            "forward",
            "agent-1",
            "--target",
            target,
            "--listen",
            f"127.0.0.1:{listen}",
            "--api",
            f"http://127.0.0.1:{stub.api_port}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        try:
            assert forward.stdout is not None
            assert forward.stderr is not None
            started = await asyncio.wait_for(forward.stdout.readline(), scaled(30))
            assert started.startswith(b"forwarding 127.0.0.1:"), started
            reader, writer = await asyncio.open_connection("127.0.0.1", listen)
            assert await asyncio.wait_for(reader.read(), scaled(30)) == b""  # no stream
            writer.close()
            said = await asyncio.wait_for(forward.stderr.readline(), scaled(30))
            assert said.decode().startswith(f"cp-stub: connection 1 got no stream: {why}"), said
            forward.send_signal(signal.SIGINT)  # Ctrl-C
            out, _ = await asyncio.wait_for(forward.communicate(), scaled(30))
            assert forward.returncode == 0
            assert out.decode().startswith("stopped: 1 connection(s)")
        finally:
            if forward.returncode is None:
                forward.kill()
                await forward.wait()


# -- Idempotency-Key --------------------------------------------------------------------------


class LoseFirstAnswer:
    """A loopback hop in front of the operator API that passes the first request on, waits for
    the stub's whole answer (so the command is committed), then cuts the client's connection
    without a byte of it: the answer to a POST lost after the commit. Later connections are
    carried both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.lost = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        if self.lost == 0:
            self.lost += 1
            head = await client_r.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            up_w.write(head + await client_r.readexactly(length))
            await up_w.drain()
            answer = await up_r.readuntil(b"\r\n\r\n")  # the stub answered: it has committed
            assert answer.startswith(b"HTTP/1.1 201"), answer
            client_w.transport.abort()
            up_w.close()
            return

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def lossy_api(stub: StubServer) -> AsyncIterator[int]:
    hop = LoseFirstAnswer(stub.api_port)
    port = await hop.start()
    yield port
    await hop.close()


async def test_send_retries_a_lost_answer_with_the_same_key(
    stub: StubServer, lossy_api: int
) -> None:
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane_stub.cli",
        "send",
        "--json",
        "--api",
        f"http://127.0.0.1:{lossy_api}",
        "agent-2",
        "scale",
        "--replicas",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(done.communicate(), scaled(60))
    assert done.returncode == 0, err
    assert "sending again in 0.5 s with the same Idempotency-Key cp-stub-" in err.decode()
    sent = json.loads(out)
    stored = stub.store.commands(agent_id="agent-2")
    assert [record.ref for record in stored] == [sent["ref"]]  # signed once, returned twice


async def test_a_key_outlives_a_stub_killed_after_the_commit(pki: PKIPaths, tmp_path: Path) -> None:
    api_port = free_port()
    process = stub_process(
        pki,
        agent_port=free_port(),
        api_port=api_port,
        db=tmp_path / "stub.db",
        log=tmp_path / "log",
    )
    url = f"http://127.0.0.1:{api_port}/v1/agents/agent-2/commands"
    body = {"type": "scale", "params": {"replicas": 2}}
    headers = {"Idempotency-Key": "change-1234"}
    try:
        async with httpx.AsyncClient(timeout=scaled(10)) as http:

            async def post(payload: Mapping[str, object]) -> httpx.Response:
                async with asyncio.timeout(scaled(30)):
                    while True:  # the stub is starting
                        with contextlib.suppress(httpx.ConnectError):
                            return await http.post(url, json=payload, headers=headers)
                        await asyncio.sleep(0.05)

            process.start()
            first = await post(body)
            assert first.status_code == 201, first.text
            await process.kill()  # right after the commit, before anything else
            process.start()
            again = await post(body)
            assert again.status_code == 200, again.text
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.json()["command"]["jti"] == first.json()["command"]["jti"]
            other = await post({"type": "scale", "params": {"replicas": 3}})
            assert other.status_code == 422
            assert other.json()["error"] == "idempotency_key_reused"
            listed = await http.get(f"http://127.0.0.1:{api_port}/v1/commands")
            assert [c["ref"] for c in listed.json()["commands"]] == [first.json()["command"]["ref"]]
    finally:
        process.ensure_dead()
