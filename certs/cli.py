"""``byoc-certs``: create and inspect a development PKI.

    byoc-certs init DIR [--agent ID]... [--dns NAME]... [--ip ADDR]... [--force]
    byoc-certs agent DIR ID [--days N]
    byoc-certs show DIR
    byoc-certs root-key DIR
    byoc-certs release-key DIR
    byoc-certs keyset DIR --version N --key PUB... [--release-key PUB]... --out FILE

Errors are reported as one ``byoc-certs: error: ...`` line on stderr with exit status 1.
Private key material is never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from certs.errors import PKIError
from certs.keyset import load_ed25519_private, load_ed25519_public, make_root_key, sign_keyset
from certs.pki import PKIPaths, init_pki, issue_agent_cert, load_certificate, load_pki

PROG = "byoc-certs"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    root: Path = args.dir
    try:
        if args.command == "init":
            return _init(root, args.agent, args.dns, args.ip, force=args.force)
        if args.command == "agent":
            return _agent(root, args.id, days=args.days)
        if args.command in ("root-key", "release-key"):
            for path in make_root_key(root, name=args.command.removesuffix("-key")):
                print(f"created {path}")
            return 0
        if args.command == "keyset":
            return _keyset(root, args)
        return _show(root)
    except PKIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Development PKI for BYOC mTLS.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create a PKI, or add missing agents to an existing one")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--agent", action="append", metavar="ID", help='default: "agent-1"')
    init.add_argument("--dns", action="append", metavar="NAME", help='default: "localhost"')
    init.add_argument("--ip", action="append", metavar="ADDR", help="default: 127.0.0.1 and ::1")
    init.add_argument("--force", action="store_true", help="replace an existing PKI")

    agent = sub.add_parser("agent", help="issue or replace one agent certificate")
    agent.add_argument("dir", type=Path, metavar="DIR")
    agent.add_argument("id", metavar="ID")
    agent.add_argument("--days", type=int, default=365, metavar="N", help="default: 365")

    show = sub.add_parser("show", help="list the certificates of a PKI")
    show.add_argument("dir", type=Path, metavar="DIR")

    root_key = sub.add_parser("root-key", help="make the offline root key that signs key sets")
    root_key.add_argument("dir", type=Path, metavar="DIR")

    release_key = sub.add_parser(
        "release-key", help="make the key that signs agent release bundles (make bundle)"
    )
    release_key.add_argument("dir", type=Path, metavar="DIR")

    keyset = sub.add_parser("keyset", help="sign a key set: the command keys agents trust")
    keyset.add_argument("dir", type=Path, metavar="DIR", help="where root.key is")
    keyset.add_argument("--version", type=int, required=True, help="strictly increasing")
    keyset.add_argument(
        "--key", type=Path, action="append", required=True, metavar="PUB", help="repeatable"
    )
    keyset.add_argument("--days", type=float, default=90.0, help="lifetime (default 90)")
    keyset.add_argument("--root-key", type=Path, help="default: DIR/root.key")
    keyset.add_argument("--next-root", type=Path, metavar="PUB", help="rotate the root to this key")
    keyset.add_argument(
        "--release-key",
        type=Path,
        action="append",
        metavar="PUB",
        help="a key that signs agent release bundles (repeatable; README 'Updating the agent')",
    )
    keyset.add_argument("--out", type=Path, required=True)
    return parser


def _keyset(root: Path, args: argparse.Namespace) -> int:
    token = sign_keyset(
        root=load_ed25519_private(args.root_key or root / "root.key"),
        version=args.version,
        keys=[load_ed25519_public(path) for path in args.key],
        lifetime=args.days * 86400,
        next_root=load_ed25519_public(args.next_root) if args.next_root else None,
        release_keys=[load_ed25519_public(path) for path in args.release_key or ()],
    )
    args.out.write_text(token + "\n")
    print(f"signed key set version {args.version} ({len(args.key)} key(s)) -> {args.out}")
    return 0


def _init(
    root: Path,
    agents: list[str] | None,
    dns: list[str] | None,
    ips: list[str] | None,
    *,
    force: bool,
) -> int:
    agent_ids = agents or ["agent-1"]
    planned = PKIPaths.at(root)
    files = [*planned.core_files()]
    for agent_id in agent_ids:
        files += [planned.agent_cert(agent_id), planned.agent_key(agent_id)]
    before = {f: _stamp(f) for f in files}
    init_pki(
        root,
        agent_ids=agent_ids,
        server_dns=dns or ["localhost"],
        server_ips=ips or ["127.0.0.1", "::1"],
        overwrite=force,
    )
    for f in files:
        old = before[f]
        status = "created" if old is None else "kept" if old == _stamp(f) else "replaced"
        print(_describe(status, f))
    return 0


def _agent(root: Path, agent_id: str, *, days: int) -> int:
    paths = load_pki(root)
    for f in issue_agent_cert(paths, agent_id, valid_for=timedelta(days=days)):
        print(_describe("issued", f))
    return 0


def _show(root: Path) -> int:
    paths = load_pki(root)
    certs = [paths.server_ca_cert, paths.agent_ca_cert, paths.server_cert]
    certs += sorted(paths.agents_dir.glob("*.pem"))
    for path in certs:
        cert = load_certificate(path)
        print(path)
        print(f"  subject:   {cert.subject.rfc4514_string()}")
        print(f"  issuer:    {cert.issuer.rfc4514_string()}")
        print(f"  not after: {cert.not_valid_after_utc.isoformat()}")
        print(f"  sha256:    {cert.fingerprint(hashes.SHA256()).hex()}")
    return 0


def _stamp(path: Path) -> tuple[int, int] | None:
    """Identity of the file at ``path`` (a replaced file gets a new inode), None if absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _describe(status: str, path: Path) -> str:
    """One output line; certificates also show their CN and expiry date."""
    line = f"{status:<8} {path}"
    if path.suffix == ".pem":
        cert = load_certificate(path)
        line += f"  CN={_common_name(cert)}, expires {cert.not_valid_after_utc.date()}"
    return line


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return ""
    value = names[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


if __name__ == "__main__":
    raise SystemExit(main())
