"""``cp-stub``: run the stub control plane and drive agents through its operator API.

    cp-stub serve --pki DIR [--agents HOST:PORT] [--api HOST:PORT] [--db PATH]
                  [--enroll HOST:PORT] [--issuer NAME] [--cert-lifetime S]
                  [--console HOST:PORT [--console-token-file PATH] [--console-remote]]
    cp-stub agents
    cp-stub send [--wait | --wait-for STATE] [--timeout S] [--ttl S] [--idempotency-key KEY]
                 AGENT scale --replicas N          (options before or after the type)
    cp-stub send [--wait] AGENT upgrade --version V
    cp-stub send [--wait] AGENT collect-metrics [--target T ...]
    cp-stub send [--wait] AGENT update-agent --version V --url URL --sha256 HEX
    cp-stub send-signed AGENT TOKEN [--wait]      relay a token signed elsewhere (e.g. an HSM)
    cp-stub sign --key PEM [--issuer NAME] [--ttl S] AGENT TYPE [--param K=JSON ...]   sign
                                                  offline, print the token
    cp-stub results [--agent AGENT]
    cp-stub show REF [--token]
    cp-stub push-keyset AGENT FILE [--wait]       offer a signed key set (key rotation)
    cp-stub anchor AGENT [--all]                  latest audit head (for audit verify --anchor),
                                                  or every one held (for --anchors-file)
    cp-stub wait REF [--for final]
    cp-stub enroll-token --agent-id ID [--ttl S]   one-time token for `byoc-agent enroll`
    cp-stub revoke AGENT                          revoke its certificates, close its session
    cp-stub forward AGENT --target HOST:PORT [--listen 127.0.0.1:PORT]   carry local connections
                                                  to a target through the agent (streams)

Client commands talk to ``--api`` (default ``$CP_STUB_API`` or http://127.0.0.1:8080).
With ``--wait``, the exit status is 0 when the command succeeded, 3 when it ended otherwise
(rejected, failed, interrupted) and 4 when the wait timed out (said on stderr, with the command
to wait again). ``send`` sends an Idempotency-Key and, when an answer never comes (the stub
restarting, a connection cut), sends the command again with the same key: the stub then
returns the command it stored the first time instead of signing a second one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.core.errors import ConfigError
from agent.core.session import HeartbeatSettings
from agent.io import event_loop
from agent.io.event_loop import EVENT_LOOPS
from agent.logs import configure_logging
from certs.pki import PKIPaths
from control_plane_stub.client import StubClient, default_api_url, describe
from control_plane_stub.errors import ApiError, StubError
from control_plane_stub.operator_commands import operator_command
from control_plane_stub.signer import DEFAULT_TTL, CommandSigner

if TYPE_CHECKING:
    from control_plane_stub.server import StubServer

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_SUCCEEDED = 3
EXIT_TIMEOUT = 4
FORWARD_CHECK = 5.0
"""Seconds a forward's outcomes are waited for at a time (also notices a stub restart)."""
DEFAULT_WAIT = 120.0
"""Seconds ``--wait`` waits for a command by default."""
SEND_RETRIES: Final = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Delays before each new try of a ``send`` whose answer never came (same Idempotency-Key)."""


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _param(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    # The server (aiohttp, the console's templates) only for this command: the client commands
    # start faster without it, and run where only the agent's dependencies are installed.
    try:
        from control_plane_stub.server import StubConfig, StubServer  # noqa: PLC0415
    except ImportError as exc:
        raise StubError(
            f"cp-stub serve needs the stub's dependencies, which the agent does not (missing: "
            f"{exc.name}): pip install 'byoc-agent[stub]'"
        ) from exc

    pki = PKIPaths.at(Path(args.pki)) if args.pki else None

    def pick(explicit: str | None, from_pki: Path | None, flag: str) -> Path:
        if explicit:
            return Path(explicit)
        if from_pki is None:
            raise ConfigError(f"{flag} is required without --pki")
        return from_pki

    config = StubConfig(
        server_cert=pick(args.cert, pki.server_cert if pki else None, "--cert"),
        server_key=pick(args.key, pki.server_key if pki else None, "--key"),
        agent_ca=pick(args.agent_ca, pki.agent_ca_cert if pki else None, "--agent-ca"),
        signing_key=pick(args.signing_key, pki.signing_key if pki else None, "--signing-key"),
        db=Path(args.db),
        agent_host=args.agents[0],
        agent_port=args.agents[1],
        api_host=args.api_listen[0],
        api_port=args.api_listen[1],
        issuer=args.issuer,
        heartbeat=HeartbeatSettings(
            interval=args.heartbeat_interval, timeout=args.heartbeat_interval * 3
        ),
        pki=Path(args.pki) if args.pki else None,
        enroll_host=args.enroll[0] if args.enroll else "127.0.0.1",
        enroll_port=args.enroll[1] if args.enroll else None,
        cert_lifetime=args.cert_lifetime,
        console_host=args.console[0] if args.console else "127.0.0.1",
        console_port=args.console[1] if args.console else None,
        console_remote=args.console_remote,
        console_token_file=Path(args.console_token_file) if args.console_token_file else None,
    )
    configure_logging(args.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = StubServer(config)
        await server.start()
        try:
            _announce_console(server)
            await stop.wait()
        finally:
            await server.close()

    event_loop.run(main(), args.event_loop)
    return 0


def _announce_console(server: StubServer) -> None:
    """Say where the console is, and show its token once: printed here (not logged), or
    only named when it went to a file (e.g. when this process's output is a log file)."""
    if server.console is None:
        return
    token_file = server.config.console_token_file
    if token_file is not None:
        print(f"console: {server.console_url} (token in {token_file})", flush=True)
    else:
        print(f"console: {server.console_url} token: {server.console.token}", flush=True)


# -- operator commands ---------------------------------------------------------------------


async def _finish(client: StubClient, command: dict[str, Any], args: argparse.Namespace) -> int:
    if not (args.wait or args.wait_for):
        print(describe(command) if not args.json else json.dumps(command, indent=2))
        return 0
    answer = await client.command(
        command["ref"], wait_for=args.wait_for or "final", wait_seconds=args.timeout
    )
    final = answer["command"]
    print(describe(final) if not args.json else json.dumps(answer, indent=2))
    if answer["timed_out"]:
        _gave_up(final, args.timeout)
        return EXIT_TIMEOUT
    if args.wait_for and args.wait_for != "final":
        return 0
    return 0 if final["state"] == "succeeded" else EXIT_NOT_SUCCEEDED


def _gave_up(command: dict[str, Any], seconds: float) -> None:
    print(
        f"cp-stub: gave up waiting after {seconds:g} s: {command['ref']} is still "
        f"{command['state']}; `cp-stub wait {command['ref']}` waits again "
        "(--timeout sets how long)",
        file=sys.stderr,
    )


def _retryable(exc: ApiError) -> bool:
    """No answer (a connection refused, cut or timed out) or the stub failing: worth sending
    again with the same Idempotency-Key. A 4xx answer is final."""
    return exc.status == 0 or exc.status >= 500


async def send_with_retries(
    client: StubClient,
    agent_id: str,
    command_type: str,
    params: dict[str, object],
    *,
    ttl: int,
    key: str,
    delays: Sequence[float] = SEND_RETRIES,
) -> dict[str, Any]:
    """Send a command under ``key``; while no answer comes, send it again with the same key
    (saying so on stderr), so that a command stored before its answer was lost is returned,
    not signed a second time."""
    for delay in (*delays, None):
        try:
            return await client.send(agent_id, command_type, params, ttl=ttl, idempotency_key=key)
        except ApiError as exc:
            if delay is None or not _retryable(exc):
                raise
            print(
                f"cp-stub: no answer ({exc.code}: {exc.message}); sending again in {delay:g} s "
                f"with the same Idempotency-Key {key}",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover  # the loop returns or raises


async def cmd_send(args: argparse.Namespace, client: StubClient) -> int:
    command_type, params = operator_command(
        args.type.replace("-", "_"),
        replicas=getattr(args, "replicas", None),
        version=getattr(args, "version", None),
        targets=getattr(args, "target", None) or (),
        url=getattr(args, "url", None),
        sha256=getattr(args, "sha256", None),
    )
    command = await send_with_retries(
        client,
        args.agent,
        command_type,
        params,
        ttl=args.ttl,
        key=args.idempotency_key or f"cp-stub-{uuid.uuid4()}",
    )
    return await _finish(client, command, args)


def _report_outcome(outcome: dict[str, Any]) -> None:
    """One line per forwarded connection: how it ended, or on stderr why it got no stream."""
    if outcome["ok"]:
        print(f"connection {outcome['n']}: {outcome['outcome']}", flush=True)
        return
    why = outcome.get("reason") or "no stream"
    detail = outcome.get("detail")
    print(
        f"cp-stub: connection {outcome['n']} got no stream: {why}"
        + (f": {detail}" if detail else ""),
        file=sys.stderr,
        flush=True,
    )


async def cmd_forward(args: argparse.Namespace, client: StubClient) -> int:
    forward = await client.start_forward(
        args.agent, args.target, listen=args.listen, max_duration=args.max_duration
    )
    print(
        f"forwarding {forward['listen']} -> agent {args.agent} -> {forward['target']} "
        f"(forward {forward['id']}; Ctrl-C to stop)",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    seen = 0
    gone = False
    try:
        while not stop.is_set():
            # Wait for the next connection to end (or the forward to vanish: a stub restart).
            poll = asyncio.ensure_future(
                client.forward(forward["id"], after=seen, wait=FORWARD_CHECK)
            )
            await asyncio.wait([poll, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not poll.done():
                poll.cancel()
                await asyncio.gather(poll, return_exceptions=True)
                break
            try:
                current = poll.result()
            except ApiError as exc:
                if exc.status != 404:
                    raise
                gone = True
                break
            for outcome in current.get("outcomes", []):
                if outcome["n"] > seen:
                    _report_outcome(outcome)
                    seen = outcome["n"]
    finally:
        stopping.cancel()
    if gone:
        print("cp-stub: the forward is gone (the stub restarted?)", file=sys.stderr)
        return EXIT_FAILURE
    final = await client.stop_forward(forward["id"])
    print(
        f"stopped: {final['connections']} connection(s), {final['bytes_to_agent']} bytes to "
        f"the agent, {final['bytes_from_agent']} bytes back",
        flush=True,
    )
    return 0


async def cmd_enroll_token(args: argparse.Namespace, client: StubClient) -> int:
    answer = await client.enroll_token(args.agent_id, ttl=args.ttl)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(answer["token"])  # shown once: only its hash is kept
    return 0


async def cmd_revoke(args: argparse.Namespace, client: StubClient) -> int:
    answer = await client.revoke(args.agent)
    print(
        f"revoked {answer['revoked']} certificate(s) of {args.agent}"
        + ("; its session was closed" if answer["disconnected"] else "")
    )
    return 0


async def cmd_send_signed(args: argparse.Namespace, client: StubClient) -> int:
    from_stdin = args.token == "-"  # noqa: S105  # "-" means read the token from stdin
    token = sys.stdin.read().strip() if from_stdin else args.token
    command = await client.send_signed(args.agent, token)
    return await _finish(client, command, args)


async def cmd_agents(args: argparse.Namespace, client: StubClient) -> int:
    agents = await client.agents()
    if args.json:
        print(json.dumps(agents, indent=2))
        return 0
    if not agents:
        print("no agents have connected yet")
    for agent in agents:
        state = "connected" if agent["connected"] else "offline"
        print(
            f"{agent['agent_id']:<24} {state:<10} version {agent['agent_version']}  "
            f"cert sha256 {str(agent['cert_sha256'])[:16]}…  from {agent['peer']}"
        )
    return 0


async def cmd_results(args: argparse.Namespace, client: StubClient) -> int:
    commands = await client.commands(agent_id=args.agent, limit=args.limit)
    if args.json:
        print(json.dumps(commands, indent=2))
        return 0
    for command in commands:
        print(f"{command['agent_id']:<16} {describe(command)}")
    return 0


async def cmd_show(args: argparse.Namespace, client: StubClient) -> int:
    answer = await client.command(args.ref, with_token=args.token)
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.token:
        print(answer["command"]["token"])
    else:
        print(describe(answer["command"]))
        receipt = answer.get("receipt")
        if receipt:
            print(f"  receipt: {receipt['status']} (signed by the agent's certificate key)")
        for event in answer["history"]:
            print(f"  {event['state']:<17} {event.get('reason') or ''} {event.get('detail') or ''}")
    return 0


async def cmd_push_keyset(args: argparse.Namespace, client: StubClient) -> int:
    token = (await asyncio.to_thread(Path(args.file).read_text)).strip()
    pushed = await client.push_keyset(args.agent, token)
    state = "sent" if pushed["sent"] else "queued until the agent connects"
    print(f"key set version {pushed['version']} {state}")
    if not args.wait:
        return 0
    keyset = await client.keyset(args.agent, wait_answer=args.timeout)
    answer = keyset["last_result"]
    if answer is None:
        print("no answer from the agent yet", file=sys.stderr)
        return EXIT_TIMEOUT
    if answer["accepted"]:
        print(f"{args.agent} accepted: key set version {answer['version']} in force")
        return 0
    print(f"{args.agent} refused it: {answer['reason']}: {answer.get('detail')}")
    return EXIT_NOT_SUCCEEDED


ANCHOR_CONFLICTS: Final = {
    "hash_differs": "was reported with another hash than one held: the log was rewritten",
    "head_moved_back": "arrived after a higher seq: the log was cut and has grown again",
}


async def cmd_anchor(args: argparse.Namespace, client: StubClient) -> int:
    anchors = await client.anchors(args.agent, every=args.all)
    if args.json:
        print(json.dumps(anchors, indent=2))
        return 0
    if not anchors:
        print(f"cp-stub: no audit anchor from {args.agent} yet", file=sys.stderr)
        return EXIT_FAILURE
    conflicts = [a for a in anchors if a["conflict"]]
    for anchor in conflicts:
        why = ANCHOR_CONFLICTS.get(str(anchor.get("conflict_reason")), "conflicts")
        print(f"CONFLICT: seq {anchor['audit_seq']} {why}", file=sys.stderr)
    for anchor in reversed(anchors) if args.all else anchors[:1]:
        print(f"{anchor['audit_seq']}:{anchor['audit_hash']}")
    return EXIT_FAILURE if conflicts else 0


async def cmd_wait(args: argparse.Namespace, client: StubClient) -> int:
    answer = await client.command(args.ref, wait_for=args.wait_for, wait_seconds=args.timeout)
    print(describe(answer["command"]))
    if answer["timed_out"]:
        _gave_up(answer["command"], args.timeout)
        return EXIT_TIMEOUT
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    signer = CommandSigner.from_file(Path(args.key), issuer=args.issuer)
    signed = signer.sign(
        agent_id=args.agent,
        command_type=args.type,
        params=dict(args.param or []),
        now=time.time(),
        ttl=args.ttl,
    )
    print(signed.token)
    return 0


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cp-stub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the stub control plane")
    p.add_argument("--pki", help="a directory made by `byoc-certs init`")
    p.add_argument("--cert", help="server certificate (default: from --pki)")
    p.add_argument("--key", help="server private key (default: from --pki)")
    p.add_argument("--agent-ca", help="CA that issues agent certificates (default: from --pki)")
    p.add_argument("--signing-key", help="Ed25519 command-signing key (default: from --pki)")
    p.add_argument(
        "--agents",
        type=_host_port,
        default=("127.0.0.1", 8443),
        help="where agents connect (default 127.0.0.1:8443)",
    )
    p.add_argument(
        "--api",
        dest="api_listen",
        type=_host_port,
        default=("127.0.0.1", 8080),
        help="operator API, loopback only (default 127.0.0.1:8080)",
    )
    p.add_argument("--db", default="cp-stub.db", help="SQLite database (default ./cp-stub.db)")
    p.add_argument(
        "--enroll",
        type=_host_port,
        default=None,
        help="HOST:PORT of the enrollment listener (HTTPS; needs --pki for the agent CA key)",
    )
    p.add_argument("--cert-lifetime", type=float, default=86400.0, help="seconds (default 24 h)")
    p.add_argument(
        "--console",
        type=_host_port,
        default=None,
        metavar="HOST:PORT",
        help="serve the web console here (loopback; a token, shown once at start, is needed)",
    )
    p.add_argument(
        "--console-remote",
        action="store_true",
        help="allow --console on an address other than loopback (served over HTTPS with the "
        "server certificate; anyone who can reach it and holds the token can send commands)",
    )
    p.add_argument(
        "--console-token-file",
        metavar="PATH",
        help="write the console token to this file (mode 0600) instead of printing it",
    )
    p.add_argument("--issuer", default="cp-stub", help="iss claim of signed commands")
    p.add_argument("--heartbeat-interval", type=float, default=15.0)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--event-loop",
        default="asyncio",
        choices=EVENT_LOOPS,
        help="uvloop: faster, needs the 'fast' extra (agent/io/event_loop.py)",
    )
    p.set_defaults(func=cmd_serve, client=False)

    p = sub.add_parser("sign", help="sign a command offline and print the token")
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    p.add_argument("--issuer", default="cp-stub")
    p.add_argument("--ttl", type=int, default=DEFAULT_TTL)
    p.add_argument("--param", type=_param, action="append", metavar="KEY=JSON")
    p.add_argument("agent")
    p.add_argument("type")
    p.set_defaults(func=cmd_sign, client=False)

    def client_options(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
        # nested: the same options again on a sub-command (`send AGENT scale ... --wait`),
        # where they must not reset what was given before it (argparse.SUPPRESS).
        default: Any = argparse.SUPPRESS if nested else None
        p.add_argument(
            "--api", default=default, help=f"operator API URL (default {default_api_url()})"
        )
        p.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS if nested else False
        )

    def wait_options(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
        p.add_argument(
            "--wait",
            action="store_true",
            default=argparse.SUPPRESS if nested else False,
            help="wait for the final state (exit 0: succeeded, 3: ended otherwise, 4: gave up)",
        )
        p.add_argument(
            "--wait-for",
            choices=["received", "pending_approval", "running", "final"],
            default=argparse.SUPPRESS if nested else None,
            help="wait until the command got this far",
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=argparse.SUPPRESS if nested else DEFAULT_WAIT,
            help=f"seconds to wait before giving up (default {DEFAULT_WAIT:g})",
        )

    p = sub.add_parser("agents", help="list agents")
    client_options(p)
    p.set_defaults(func=cmd_agents, client=True)

    def send_options(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
        client_options(p, nested=nested)
        wait_options(p, nested=nested)
        p.add_argument(
            "--ttl",
            type=int,
            default=argparse.SUPPRESS if nested else DEFAULT_TTL,
            help=f"token lifetime in seconds (default {DEFAULT_TTL})",
        )
        p.add_argument(
            "--idempotency-key",
            default=argparse.SUPPRESS if nested else None,
            metavar="KEY",
            help="the key the command is stored under (default: a new one); the same key "
            "sent again returns the command stored the first time",
        )

    p = sub.add_parser(
        "send",
        help="sign and send a command",
        description="Sign a command and queue it for AGENT; the options may come before AGENT "
        "or after the command's own.",
    )
    send_options(p)
    p.add_argument("agent")
    kinds = p.add_subparsers(dest="type", required=True, metavar="TYPE")
    kind = kinds.add_parser("scale")
    kind.add_argument("--replicas", type=int, required=True)
    send_options(kind, nested=True)
    kind = kinds.add_parser("upgrade")
    kind.add_argument("--version", required=True)
    send_options(kind, nested=True)
    kind = kinds.add_parser("collect-metrics")
    kind.add_argument("--target", action="append")
    send_options(kind, nested=True)
    kind = kinds.add_parser("update-agent", help="the agent updates itself (a release bundle)")
    kind.add_argument("--version", required=True)
    kind.add_argument("--url", required=True, help="the bundle's URL (make bundle)")
    kind.add_argument("--sha256", required=True, help="the bundle's SHA-256, hex")
    send_options(kind, nested=True)
    p.set_defaults(func=cmd_send, client=True)

    p = sub.add_parser("send-signed", help="relay a token signed elsewhere ('-' reads stdin)")
    client_options(p)
    wait_options(p)
    p.add_argument("agent")
    p.add_argument("token")
    p.set_defaults(func=cmd_send_signed, client=True)

    p = sub.add_parser(
        "forward",
        help="carry connections to a local port to a target in the agent's network",
        description="Listen on a loopback port; each connection to it becomes one stream "
        "(a signed open_stream grant) carried by the agent to TARGET. Runs until Ctrl-C.",
    )
    client_options(p)
    p.add_argument("agent")
    p.add_argument("--target", required=True, help="HOST:PORT as seen from the agent")
    p.add_argument(
        "--listen", default="127.0.0.1:0", help="loopback HOST:PORT (port 0: pick a free one)"
    )
    p.add_argument("--max-duration", type=int, default=600, help="seconds per connection (600)")
    p.set_defaults(func=cmd_forward, client=True)

    p = sub.add_parser("enroll-token", help="a one-time bootstrap token for byoc-agent enroll")
    client_options(p)
    p.add_argument("--agent-id", required=True)
    p.add_argument("--ttl", type=int, default=900, help="seconds the token is valid (900)")
    p.set_defaults(func=cmd_enroll_token, client=True)

    p = sub.add_parser("revoke", help="revoke every certificate of an agent, close its session")
    client_options(p)
    p.add_argument("agent")
    p.set_defaults(func=cmd_revoke, client=True)

    p = sub.add_parser("results", help="recent commands and their results")
    client_options(p)
    p.add_argument("--agent")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_results, client=True)

    p = sub.add_parser("show", help="one command and its status history")
    client_options(p)
    p.add_argument("--token", action="store_true", help="print only the command's token")
    p.add_argument("ref")
    p.set_defaults(func=cmd_show, client=True)

    p = sub.add_parser("push-keyset", help="offer a signed key set (byoc-certs keyset) to an agent")
    client_options(p)
    p.add_argument("agent")
    p.add_argument("file")
    p.add_argument("--wait", action="store_true", help="wait for the agent's answer")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_push_keyset, client=True)

    p = sub.add_parser("anchor", help="the latest audit chain head an agent reported (SEQ:HASH)")
    client_options(p)
    p.add_argument("agent")
    p.add_argument(
        "--all",
        action="store_true",
        help="every anchor held, one SEQ:HASH a line, lowest first (for byoc-agent audit "
        "verify --anchors-file): a log cut and regrown passes against the latest alone",
    )
    p.set_defaults(func=cmd_anchor, client=True)

    p = sub.add_parser("wait", help="wait until a command gets to a state")
    client_options(p)
    p.add_argument("ref")
    p.add_argument(
        "--for",
        dest="wait_for",
        default="final",
        choices=["received", "pending_approval", "running", "final"],
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT,
        help=f"seconds to wait before giving up (default {DEFAULT_WAIT:g})",
    )
    p.set_defaults(func=cmd_wait, client=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.client:
            result: int = args.func(args)
            return result

        async def run() -> int:
            async with StubClient(args.api) as client:
                code: int = await args.func(args, client)
                return code

        return asyncio.run(run())
    except StubError as exc:
        if isinstance(exc, ValueError):  # bad flags, unusable key or certificate files
            print(f"cp-stub: configuration error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"cp-stub: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ConfigError, ValueError) as exc:
        print(f"cp-stub: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a file named on the command line, say
        print(f"cp-stub: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
