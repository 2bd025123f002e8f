"""``byoc-agent``: run the daemon, approve or deny commands, inspect status, verify the audit log.

    byoc-agent run [--config PATH]
    byoc-agent enroll --control-plane URL --token TOKEN [--ca-bundle PEM] [--force]
    byoc-agent doctor [--json] [--timeout S] [--vpc-cidr CIDR ...]   every check, one line each
    byoc-agent status [--json]                    (local commands: [--config PATH] [--socket PATH])
    byoc-agent pending [--json | -q]
    byoc-agent approve JTI [--note TEXT]
    byoc-agent deny JTI [--note TEXT]
    byoc-agent audit show [PATH] [--jti JTI] [--event NAME ...] [--since T] [--until T]
                          [--last N] [-f] [--json]   read the log, verifying its chain
    byoc-agent audit tail [PATH] [-n N] [-f]      the latest records (audit show --last N)
    byoc-agent audit verify [PATH] [--anchor SEQ:HASH ...] [--anchors-file FILE]
    byoc-agent policy check [PATH]
    byoc-agent keys kid [PUBLIC_KEY_PEM]
    byoc-agent self-test [--config PATH] [--json]
    byoc-agent vpc check --vpc-id ID [--security-group ID] [--endpoint ID] [--region R]
                         [--vendor-tag V] [--domain HOST] [--config AGENT_TOML] [--json]
    byoc-agent vpc template [--output FILE] [--azs A,B,C] [--endpoint-service NAME] ...
    byoc-agent vpc policy

The configuration path defaults to ``$BYOC_AGENT_CONFIG`` or /etc/byoc-agent/agent.toml; the
local commands only need it to find the control socket (or take ``--socket``), and the files
that ``audit``, ``policy check`` and ``keys kid`` read when none is named.
Exit status: 0 success, 1 failure (e.g. a broken audit chain, a VPC rule not met), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from agent.core.errors import AgentError, AuditIntegrityError, ConfigError, PolicyError
from agent.core.verifier import jwk_thumbprint
from agent.daemon import Agent
from agent.io import event_loop
from agent.io.audit_file import verify_file
from agent.io.control_socket import request
from agent.io.policy_file import read_policy
from agent.logs import configure_logging, effective_level

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    return Path(os.environ.get("BYOC_AGENT_CONFIG", str(DEFAULT_CONFIG_PATH)))


def _socket_path(args: argparse.Namespace) -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    return load_config(_config_path(args)).control_socket


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- subcommands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args))
    configure_logging(effective_level(config.log_level))
    return event_loop.run(_run(config), config.event_loop)


async def _run(config: AgentConfig) -> int:
    # No certificate yet and [enroll] set (a fresh pod): enroll first, waiting as long as it
    # takes; the agent's id comes from the certificate (agent/bootstrap.py, loaded only then).
    if not config.control_plane.client_cert.exists():
        from agent.bootstrap import ensure_enrolled  # noqa: PLC0415  # not needed once enrolled

        if not await ensure_enrolled(config):
            return 0  # stopped while waiting to enroll
    agent = Agent(config, freeze_gc=True)
    await agent.run()
    return agent.exit_code


def cmd_self_test(args: argparse.Namespace) -> int:
    from agent.update.selftest import self_test  # noqa: PLC0415  # not on the agent's run path

    report = self_test(_config_path(args))
    if args.json:
        _print_json(report.to_json())
    else:
        print(f"byoc-agent {report.version} (state schema {report.state_schema})")
        for check in report.checks:
            print(f"  {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    return 0 if report.ok else EXIT_FAILURE


def _control(args: argparse.Namespace, payload: dict[str, object]) -> dict[str, Any]:
    answer = request(_socket_path(args), payload)
    if not answer.get("ok"):
        raise AgentError(f"{answer.get('error')}: {answer.get('message')}")
    return answer


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent import doctor  # noqa: PLC0415  # its probes only for this command

    started = time.monotonic()
    path = _config_path(args)
    checks = doctor.examine(
        path, doctor.Options(timeout=args.timeout, vpc_cidrs=tuple(args.vpc_cidr))
    )
    print(doctor.report(path, checks, time.monotonic() - started, as_json=args.json))
    return EXIT_FAILURE if any(check.status == "fail" for check in checks) else 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _control(args, {"op": "status"})["status"]
    if args.json:
        _print_json(status)
        return 0
    if status.get("phase") == "enrolling":  # agent/bootstrap.py: no certificate yet
        enrollment = status["enrollment"]
        print(f"agent:        not enrolled yet (version {status['version']})")
        print(f"enrollment:   {enrollment['state']}: {enrollment['message']}")
        if enrollment.get("action"):
            print(f"  what to do: {enrollment['action']}")
        print(f"  attempts:   {enrollment['attempts']}")
        return 0
    connection = status.get("connection") or {}
    print(f"agent:        {status['agent_id']} (version {status['version']})")
    print(
        f"control plane:{' connected' if status['connected'] else ' DISCONNECTED'} "
        f"{status['control_plane']}"
    )
    if connection:
        print(f"  peer cert:  sha256 {connection['peer_cert_sha256']}")
        print(f"  tls:        {connection['tls_version']} {connection['cipher']}")
    if status.get("last_error"):
        print(f"  last error: {status['last_error']}")
    diagnosis = status.get("diagnosis")
    if diagnosis:
        print(f"  cause:      {diagnosis['cause']}")
        print(f"  what to do: {diagnosis['action']}")
    next_at = status.get("next_attempt_at")
    if isinstance(next_at, int | float) and not status["connected"]:
        wait = max(0.0, next_at - float(status.get("time") or time.time()))
        at = datetime.fromtimestamp(next_at, UTC).strftime("%H:%M:%S UTC")
        print(f"  next try:   in {wait:.0f}s ({at}; SIGHUP tries at once)")
    print(f"certificate:  expires {status['client_certificate_expires']}")
    print(
        f"pending:      {status['pending_approvals']} awaiting approval, "
        f"{status['running_commands']} running, {status['queued_commands']} queued, "
        f"{status['unsent_frames']} results unsent"
    )
    last = status.get("last_command")
    print(f"last command: {last['type'] + ' ' + last['jti'] if last else '-'}")
    head = status["audit_head"]
    print(f"audit head:   seq {head['seq']} {head['hash']}")
    print(f"workload:     {json.dumps(status['workload'], sort_keys=True)}")
    return 0


def cmd_pending(args: argparse.Namespace) -> int:
    commands = _control(args, {"op": "pending"})["commands"]
    if args.json:
        _print_json(commands)
        return 0
    if args.quiet:  # for scripts: JTI=$(byoc-agent pending -q | head -n 1)
        for row in commands:
            print(row["jti"])
        return 0
    if not commands:
        print("no commands awaiting approval")
    for row in commands:
        params = json.dumps(row["params"], sort_keys=True)
        print(f"{row['jti']}  {row['type']} {params}  from {row['iss']}  {row.get('detail') or ''}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    answer = _control(args, {"op": args.command, "jti": args.jti, "note": args.note})
    command = answer["command"]
    verb = "approved" if args.command == "approve" else "denied"
    print(f"{verb} {command['jti']} ({command['type']}); state: {command['state']}")
    return 0


def _anchor(value: str) -> tuple[int, str]:
    seq, sep, digest = value.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise argparse.ArgumentTypeError(
            f"expected SEQ:HASH (from `cp-stub anchor`), got {value!r}"
        )
    return int(seq), digest.lower()


def _anchors_file(value: str) -> list[tuple[int, str]]:
    """``SEQ:HASH`` lines (``cp-stub anchor AGENT --all``); blank lines and ``#`` comments are
    skipped; ``-`` reads standard input."""
    try:
        text = sys.stdin.read() if value == "-" else Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read anchors from {value}: {exc}") from exc
    lines = (line.strip() for line in text.splitlines())
    return [_anchor(line) for line in lines if line and not line.startswith("#")]


def _audit_path(args: argparse.Namespace) -> Path:
    """The log named on the command line, else the configuration's ``[agent] audit_log``."""
    if args.path:
        return Path(args.path)
    return load_config(_config_path(args)).audit_log


def cmd_audit_verify(args: argparse.Namespace) -> int:
    path = _audit_path(args)
    anchors: dict[int, str] = {}
    for seq, digest in [*(args.anchor or []), *(args.anchors_file or [])]:
        if anchors.setdefault(seq, digest) != digest:
            # The control plane was given two chain heads for one seq: whichever the log has
            # now, it was rewritten after one of them was taken.
            print(
                f"{path}: FAILED: the anchors disagree: seq {seq} has two hashes "
                "(the log was rewritten after one of them was taken)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    try:
        summary = verify_file(path, anchors).summary
    except AuditIntegrityError as exc:
        print(f"{path}: FAILED at line {exc.line}: {exc.reason}", file=sys.stderr)
        return EXIT_FAILURE
    if summary.records == 0:
        print(f"{path}: empty log (0 records)")
        return 0
    events = ", ".join(f"{name}={count}" for name, count in sorted(summary.events.items()))
    print(
        f"{path}: OK, {summary.records} records, seq 1..{summary.head.seq}, "
        f"{summary.first_ts} .. {summary.last_ts}"
    )
    print(f"head: {summary.head.hash}")
    if anchors:
        print(f"anchors: {len(anchors)} checked, the log reaches and matches each")
    print(f"events: {events}")
    return 0


def _moment(value: str) -> datetime:
    from agent.core import audit_view  # noqa: PLC0415  # audit show's, not the agent's

    try:
        return audit_view.parse_moment(value, now=datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _audit_show_options(p: argparse.ArgumentParser, *, tail: bool) -> None:
    p.add_argument("path", nargs="?", help="default: [agent] audit_log of the configuration")
    p.add_argument("--jti", help="only the records of this command (its jti, or its ref)")
    p.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="NAME",
        help="only records of this event (command_received, connection_up, ...); repeatable",
    )
    p.add_argument(
        "--since", type=_moment, metavar="T", help="from this time (2026-11-23T10:00Z) or 2h ago"
    )
    p.add_argument("--until", type=_moment, metavar="T", help="up to this time, or 15m ago")
    p.add_argument(
        "-n",
        "--last",
        type=_count,
        default=20 if tail else 0,
        metavar="N",
        help="only the last N records shown" + (" (default 20)" if tail else ""),
    )
    p.add_argument(
        "-f", "--follow", action="store_true", help="then show records as they are written"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='the records as JSON lines, unchanged; a break is a line {"audit_chain_break": …}',
    )


def cmd_audit_show(args: argparse.Namespace) -> int:
    """Read the log, verifying every record as it comes; print what the filter keeps (only
    the last N with --last); with --follow go on as the agent appends, until Ctrl-C. Exit 1 if
    the chain breaks anywhere."""
    from agent.core import audit_view  # noqa: PLC0415  # audit show's, not the agent's
    from agent.io.audit_reader import FOLLOW_POLL, LineReader  # noqa: PLC0415

    path = _audit_path(args)
    wanted = audit_view.AuditFilter(
        jti=args.jti, events=frozenset(args.event), since=args.since, until=args.until
    )
    walk = audit_view.ChainWalk()
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    shown = 0

    def render(entry: audit_view.Entry) -> list[str]:
        out: list[str] = []
        if entry.broken is not None:  # marked whatever the filter says
            mark = audit_view.break_json(entry)
            out.append(audit_view.render_json(mark) if args.json else audit_view.break_line(entry))
        if entry.record is not None and wanted.matches(entry):
            shown_as = (
                audit_view.render_json(entry.record)
                if args.json
                else audit_view.table_row(entry, width=width)
            )
            out.append(shown_as)
        return out

    def emit(rendered: list[str]) -> None:
        nonlocal shown  # counted before printing: a Ctrl-C may come at any moment after
        shown += sum(1 for text in rendered if not text.startswith(("!!", '{"audit_chain_')))
        for text in rendered:
            print(text, flush=args.follow)

    if not args.json:
        print(audit_view.TABLE_HEADER)
    with LineReader(path) as reader:
        held: deque[list[str]] = deque(maxlen=args.last or None)
        for line in reader.lines():
            held.append(render(walk.feed(line)))
        if reader.pending and not args.follow:  # a torn last record: verification says so
            held.append(render(walk.feed(reader.pending)))
        for rendered in held:
            emit(rendered)
        if args.follow:
            try:
                while True:
                    for line in reader.lines():
                        emit(render(walk.feed(line)))
                    time.sleep(FOLLOW_POLL)
            except KeyboardInterrupt:
                pass
    if not args.json:
        print(audit_view.summary_line(walk, shown))
    elif not walk.intact:
        print(f"{path}: the chain breaks at {len(walk.breaks)} place(s)", file=sys.stderr)
    return 0 if walk.intact else EXIT_FAILURE


def cmd_policy_check(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else load_config(_config_path(args)).policy
    policy = read_policy(path)
    print(f"{path}: OK (sha256 {policy.sha256})")
    _print_json(policy.summary())
    return 0


def _kid(path: Path) -> str:
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return jwk_thumbprint(key)


def cmd_keys_kid(args: argparse.Namespace) -> int:
    if args.path:
        print(_kid(Path(args.path)))
        return 0
    commands = load_config(_config_path(args)).commands
    keys = [*commands.trusted_keys, *([commands.root_key] if commands.root_key else [])]
    for path in keys:  # each trusted key (or the root), with the kid a signer must use
        print(f"{_kid(path)}  {path}")
    return 0


def cmd_vpc_check(args: argparse.Namespace) -> int:
    # boto3 (the aws extra) is imported by agent.vpc.aws only when a check runs
    from agent.vpc import aws, report, rules  # noqa: PLC0415
    from agent.vpc.private_link import DialTarget, dial_target  # noqa: PLC0415
    from agent.vpc.requirements import HTTPS_PORT  # noqa: PLC0415

    targets = [DialTarget(host=name, port=HTTPS_PORT, source="--domain") for name in args.domain]
    if args.config:
        targets.append(dial_target(load_config(Path(args.config)).control_plane))
    request = rules.CheckRequest(
        vpc_id=args.vpc_id,
        security_group_ids=tuple(args.security_group),
        endpoint_id=args.endpoint,
        vendor=args.vendor_tag,
        targets=tuple(targets),
    )
    facts = aws.fetch_facts(aws.session(args.region), request)
    findings = rules.check(facts, request)
    if args.json:
        _print_json(report.as_json(facts.vpc.id, facts.region, findings))
    else:
        print("\n".join(report.lines(facts.vpc.id, facts.region, findings)))
    return EXIT_FAILURE if any(finding.failed for finding in findings) else 0


def cmd_vpc_template(args: argparse.Namespace) -> int:
    from agent.vpc import template  # noqa: PLC0415
    from agent.vpc.errors import TemplateError  # noqa: PLC0415

    try:
        options = template.TemplateOptions(
            name=args.name,
            availability_zones=tuple(args.azs.split(",")) if args.azs else (),
            cidr=args.cidr,
            vendor=args.vendor_tag,
            https_ingress_cidr=args.https_ingress_cidr,
            endpoint_service=args.endpoint_service,
            private_zone=args.private_zone,
        )
    except TemplateError as exc:
        print(f"byoc-agent vpc template: {exc}", file=sys.stderr)
        return EXIT_USAGE
    text = template.render(template.build(options))
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(
                f"byoc-agent vpc template: cannot write {args.output}: {exc.strerror}",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    return 0


def cmd_vpc_policy(args: argparse.Namespace) -> int:
    from agent.vpc.aws import policy_document  # noqa: PLC0415  # does not import boto3

    _print_json(policy_document())
    return 0


def _cidr(value: str) -> str:
    try:
        ipaddress.IPv4Network(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected an IPv4 network such as 10.0.0.0/16: {exc}"
        ) from exc
    return value


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number of records (0 or more), got {value!r}")
    return number


def _aws_id(prefix: str) -> Callable[[str], str]:
    pattern = re.compile(rf"{prefix}-[0-9a-f]{{8,17}}")

    def parse(value: str) -> str:
        if not pattern.fullmatch(value):
            raise argparse.ArgumentTypeError(f"expected {prefix}-<hex id>, got {value!r}")
        return value

    return parse


def _add_vpc_commands(sub: Any) -> None:
    from agent.vpc.requirements import DEFAULT_VENDOR, VENDOR_TAG_KEY  # noqa: PLC0415

    vpc = sub.add_parser(
        "vpc", help="prepare the AWS VPC (template) and check it (the aws extra: boto3)"
    ).add_subparsers(dest="vpc_command", required=True, metavar="ACTION")
    vendor_help = f"the {VENDOR_TAG_KEY} tag's value (default {DEFAULT_VENDOR})"
    p = vpc.add_parser(
        "check",
        help="check a VPC against every requirement (read-only AWS calls; one line per rule)",
    )
    p.add_argument("--vpc-id", required=True, type=_aws_id("vpc"))
    p.add_argument(
        "--security-group",
        type=_aws_id("sg"),
        action="append",
        default=[],
        metavar="SG_ID",
        help=f"the agent's security group (default: the endpoint's, else those tagged "
        f"{VENDOR_TAG_KEY}=VENDOR); may be repeated",
    )
    p.add_argument(
        "--endpoint",
        type=_aws_id("vpce"),
        metavar="VPCE_ID",
        help="the interface endpoint to the vendor's service",
    )
    p.add_argument("--region", help="AWS region (default: AWS_REGION or the profile's)")
    p.add_argument("--vendor-tag", default=DEFAULT_VENDOR, metavar="VENDOR", help=vendor_help)
    p.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="HOST",
        help="a control plane host name that must resolve to the private link inside the VPC",
    )
    p.add_argument(
        "--config",
        metavar="AGENT_TOML",
        help="the agent's configuration: check the host it dials (connect_to, else the URL's)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vpc_check)

    p = vpc.add_parser(
        "template", help="write a CloudFormation template that builds a VPC meeting every rule"
    )
    p.add_argument("--output", "-o", metavar="FILE", help="default: standard output")
    p.add_argument("--name", default="byoc", help="prefix of the Name tags (default byoc)")
    p.add_argument("--azs", metavar="A,B,C", help="three availability zones of the region")
    p.add_argument("--cidr", default="10.0.0.0/16", help="the VPC's /16 (default 10.0.0.0/16)")
    p.add_argument("--vendor-tag", default=DEFAULT_VENDOR, metavar="VENDOR", help=vendor_help)
    p.add_argument(
        "--https-ingress-cidr",
        default="",
        metavar="CIDR",
        help="where inbound 443 may come from (default: the VPC's CIDR; 0.0.0.0/0: anywhere)",
    )
    p.add_argument(
        "--endpoint-service",
        default="",
        metavar="NAME",
        help="the vendor's endpoint service (com.amazonaws.vpce.REGION.vpce-svc-ID)",
    )
    p.add_argument(
        "--private-zone",
        default="",
        metavar="ZONE",
        help="a private hosted zone whose names resolve to the endpoint (needs --endpoint-service)",
    )
    p.set_defaults(func=cmd_vpc_template)

    p = vpc.add_parser("policy", help="print the least-privilege IAM policy `vpc check` needs")
    p.set_defaults(func=cmd_vpc_policy)


# -- parser --------------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.enroll import enroll  # noqa: PLC0415  # the HTTP client only for this command

    config = load_config(_config_path(args))
    from_stdin = args.token == "-"  # noqa: S105  # "-" means read it from stdin
    token = sys.stdin.readline().strip() if from_stdin else args.token
    if not token:
        raise AgentError(
            "no enrollment token given (--token TOKEN, or --token - and the token on stdin)"
        )
    cp = config.control_plane
    done = enroll(
        control_plane=args.control_plane,
        token=token,
        trust=Path(args.ca_bundle) if args.ca_bundle else cp.ca_bundle,
        client_key=cp.client_key,
        client_cert=cp.client_cert,
        ca_bundle=cp.ca_bundle,
        expected_id=config.agent_id,
        force=args.force,
    )
    if done.replaced is not None and done.replaced != done.agent_id:
        print(
            f"byoc-agent: this host was {done.replaced} and is now {done.agent_id}: "
            f"{done.replaced}'s key and certificate were replaced (--force)",
            file=sys.stderr,
        )
    elif done.replaced is not None:
        print(f"replaced the earlier key and certificate of {done.agent_id} (--force)")
    print(
        f"enrolled as {done.agent_id}; certificate {cp.client_cert} valid until "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(done.not_after))}, key {cp.client_key}"
        " (0600, made here); renewed automatically over the tunnel"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byoc-agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"byoc-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, *, socket: bool = False) -> None:
        p.add_argument(
            "--config",
            help=f"agent configuration (default: $BYOC_AGENT_CONFIG or {DEFAULT_CONFIG_PATH})",
        )
        if socket:
            p.add_argument("--socket", help="control socket path (overrides the configuration)")

    p = sub.add_parser("run", help="run the agent daemon")
    with_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "enroll", help="get a first client certificate with a one-time token (key made here)"
    )
    with_config(p)
    p.add_argument("--token", required=True, help="from cp-stub enroll-token ('-': read stdin)")
    p.add_argument("--control-plane", required=True, help="enrollment URL, https://host:port")
    p.add_argument(
        "--ca-bundle",
        help="CA to verify the enrollment endpoint (default: control_plane.ca_bundle)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a key and certificate already there (the identity they hold is lost; "
        "said aloud when it is another agent id)",
    )
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser(
        "doctor",
        help="check everything the agent needs, one line each with the fix (exit 1 on a failure)",
        description="Check the configuration, the policy, the key, certificate and state files, "
        "the route (proxy, private endpoint), DNS, TCP, the proxy's CONNECT, the TLS handshake, "
        "the control plane's acceptance of the certificate, the clock and the running agent. "
        "Run it as the agent's user or root.",
    )
    with_config(p)
    p.add_argument("--json", action="store_true", help="one JSON object: ok, checks[]")
    p.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds for each network step (default 3)",
    )
    p.add_argument(
        "--vpc-cidr",
        action="append",
        type=_cidr,
        default=[],
        metavar="CIDR",
        help="the VPC's CIDR, to judge a private endpoint (default: from the EC2 instance "
        "metadata); repeatable",
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("status", help="connection, certificate, pending approvals, audit head")
    with_config(p, socket=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("pending", help="list commands awaiting local approval")
    with_config(p, socket=True)
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true")
    shown.add_argument("-q", "--quiet", action="store_true", help="only the JTIs, one a line")
    p.set_defaults(func=cmd_pending)

    for name, text in (
        ("approve", "approve a pending command"),
        ("deny", "deny a pending command"),
    ):
        p = sub.add_parser(name, help=text)
        with_config(p, socket=True)
        p.add_argument("jti", help="the command's jti (see `byoc-agent pending`)")
        p.add_argument("--note", help="a note for the audit record (ticket, reason)")
        p.set_defaults(func=cmd_decide)

    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    for name, text in (
        ("show", "read the audit log as a table (or JSON lines), verifying its chain"),
        ("tail", "the latest records of the audit log (audit show --last 20); -f follows it"),
    ):
        p = audit.add_parser(name, help=text, description=text)
        with_config(p)
        _audit_show_options(p, tail=name == "tail")
        p.set_defaults(func=cmd_audit_show)
    p = audit.add_parser("verify", help="verify the hash chain of an audit log")
    with_config(p)
    p.add_argument("path", nargs="?", help="default: [agent] audit_log of the configuration")
    p.add_argument(
        "--anchor",
        type=_anchor,
        action="append",
        metavar="SEQ:HASH",
        help="a chain head held by the control plane (`cp-stub anchor AGENT`); detects a "
        "truncated or rewritten tail; may be repeated",
    )
    p.add_argument(
        "--anchors-file",
        type=_anchors_file,
        action="extend",
        metavar="FILE",
        help="SEQ:HASH lines, e.g. every anchor the control plane holds (`cp-stub anchor AGENT "
        "--all > FILE`; - for standard input): also detects a log cut and grown again past "
        "the latest anchor",
    )
    p.set_defaults(func=cmd_audit_verify)

    policy = sub.add_parser("policy", help="policy tools").add_subparsers(
        dest="policy_command", required=True, metavar="ACTION"
    )
    p = policy.add_parser("check", help="validate a policy file and show what it allows")
    with_config(p)
    p.add_argument("path", nargs="?", help="default: [agent] policy of the configuration")
    p.set_defaults(func=cmd_policy_check)

    keys = sub.add_parser("keys", help="key tools").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    p = keys.add_parser("kid", help="print the kid (RFC 7638 thumbprint) of an Ed25519 public key")
    with_config(p)
    p.add_argument(
        "path", nargs="?", help="default: each key the configuration trusts (or its root key)"
    )
    p.set_defaults(func=cmd_keys_kid)

    p = sub.add_parser(
        "self-test",
        help="check that this release can run here (configuration, policy, state, audit log, "
        "key and certificate); changes nothing",
    )
    with_config(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_self_test)

    _add_vpc_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except (ConfigError, PolicyError) as exc:
        print(f"byoc-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as exc:
        print(f"byoc-agent: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `byoc-agent audit show | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return result


if __name__ == "__main__":
    raise SystemExit(main())
