#!/usr/bin/env python3
"""Third-party TLS scan of a control plane's agent port, with nmap's ``ssl-enum-ciphers``.

Usage::

    scripts/tls_scan.py HOST PORT                 # scan, print what is offered, judge it
    scripts/tls_scan.py --json HOST PORT          # the same, as one JSON document on stdout
    scripts/tls_scan.py --xml-out scan.xml HOST PORT   # also keep nmap's XML report
    scripts/tls_scan.py --from-xml scan.xml       # judge an earlier nmap XML report

It runs ``nmap -Pn -p PORT --script +ssl-enum-ciphers -oX - HOST`` (the ``+`` forces the script
on a port nmap does not know as a TLS port, e.g. an ephemeral test port; without it nmap skips
the script silently) and fails when the server offers anything docs/PROTOCOL.md §2 does not
allow:

- a protocol below TLS 1.2 (SSLv2, SSLv3, TLS 1.0, TLS 1.1);
- a cipher suite that is not AEAD (anything but AES-GCM, AES-CCM, ChaCha20-Poly1305: CBC, RC4,
  3DES, NULL, EXPORT, ... are all refused);
- with TLS 1.2, a key exchange other than ECDHE (static RSA, DHE, anonymous ECDH);
- TLS compression.

A control plane that requires client certificates (the stub does) is still enumerated:
``ssl-enum-ciphers`` only needs the ServerHello, which comes before the server asks for a
certificate.

Exit status: 0 the offer is acceptable; 1 at least one finding (each printed on stderr);
2 the scan itself failed (nmap missing, port closed, no TLS handshake at all).
Needs only the Python standard library and nmap (Debian/Ubuntu: ``apt-get install nmap``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET  # parses nmap's own report, not a peer's data
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

ALLOWED_PROTOCOLS: Final = ("TLSv1.2", "TLSv1.3")
KNOWN_PROTOCOLS: Final = ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")
# AEAD constructions in IANA suite names (TLS 1.3 names are TLS_AES_..._GCM_..., or
# TLS_AKE_WITH_... in nmap 7.9x). Everything else is MAC-then-encrypt CBC, a stream cipher or
# no encryption at all.
_AEAD: Final = re.compile(r"_GCM_|_GCM$|_CCM(_8)?$|_CCM_|CHACHA20_POLY1305")
_ECDHE: Final = re.compile(r"^TLS_ECDHE_(RSA|ECDSA)_WITH_")
SCAN_TIMEOUT: Final = 300.0


class ScanError(Exception):
    """The scan could not be made or gave nothing to judge."""


@dataclass(frozen=True)
class Cipher:
    name: str
    kex: str | None
    strength: str | None
    aead: bool


@dataclass
class ProtocolOffer:
    ciphers: list[Cipher] = field(default_factory=list)
    compressors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ScanResult:
    target: str
    protocols: dict[str, ProtocolOffer]
    findings: list[str]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "ok": self.ok,
            "protocols": {name: asdict(offer) for name, offer in self.protocols.items()},
            "findings": self.findings,
        }


def is_aead(name: str) -> bool:
    return bool(_AEAD.search(name))


def run_nmap(host: str, port: int, *, nmap: str | None = None) -> str:
    """Run the scan; return nmap's XML report."""
    binary = nmap or shutil.which("nmap")
    if binary is None:
        raise ScanError("nmap is not installed (Debian/Ubuntu: apt-get install nmap)")
    argv = [binary, "-Pn", "-p", str(port), "--script", "+ssl-enum-ciphers", "-oX", "-", host]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=SCAN_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise ScanError(f"nmap not found at {binary}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ScanError(f"nmap did not finish within {SCAN_TIMEOUT:.0f}s") from exc
    if done.returncode != 0:
        raise ScanError(f"nmap failed (exit {done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


def _elem(table: ET.Element, key: str) -> str | None:
    found = table.find(f"elem[@key='{key}']")
    return found.text if found is not None else None


def parse_report(xml_text: str, *, target: str | None = None) -> ScanResult:
    """Read ``ssl-enum-ciphers`` results out of an nmap XML report and judge them."""
    try:
        root = ET.fromstring(xml_text)  # noqa: S314  # nmap's own output
    except ET.ParseError as exc:
        raise ScanError(f"not an nmap XML report: {exc}") from exc
    port = root.find("host/ports/port")
    if port is None:
        raise ScanError("the report has no port: was the host up?")
    state = port.find("state")
    port_state = state.get("state") if state is not None else None
    address = root.find("host/address")
    where = target or f"{address.get('addr') if address is not None else '?'}:{port.get('portid')}"
    if port_state != "open":
        raise ScanError(f"{where}: port is {port_state}")
    script = port.find("script[@id='ssl-enum-ciphers']")
    if script is None:
        raise ScanError(f"{where}: ssl-enum-ciphers produced nothing (no TLS handshake?)")
    protocols: dict[str, ProtocolOffer] = {}
    for table in script.findall("table"):
        name = table.get("key") or "?"
        offer = ProtocolOffer()
        for entry in table.findall("table[@key='ciphers']/table"):
            suite = _elem(entry, "name") or "?"
            offer.ciphers.append(
                Cipher(
                    name=suite,
                    kex=_elem(entry, "kex_info"),
                    strength=_elem(entry, "strength"),
                    aead=is_aead(suite),
                )
            )
        offer.compressors = [e.text or "" for e in table.findall("table[@key='compressors']/elem")]
        offer.warnings = [e.text or "" for e in table.findall("table[@key='warnings']/elem")]
        protocols[name] = offer
    if not protocols:
        raise ScanError(f"{where}: no protocol was negotiated (is this a TLS port?)")
    return ScanResult(target=where, protocols=protocols, findings=judge(protocols))


def judge(protocols: dict[str, ProtocolOffer]) -> list[str]:
    """Everything offered that docs/PROTOCOL.md §2 does not allow."""
    findings: list[str] = []
    for name, offer in protocols.items():
        if name not in ALLOWED_PROTOCOLS:
            findings.append(f"{name} is offered (minimum is TLS 1.2)")
        for cipher in offer.ciphers:
            if not cipher.aead:
                findings.append(f"{name}: {cipher.name} is not an AEAD cipher suite")
            elif name != "TLSv1.3" and not _ECDHE.match(cipher.name):
                findings.append(f"{name}: {cipher.name} does not use ECDHE key exchange")
        compression = [c for c in offer.compressors if c.upper() != "NULL"]
        if compression:
            findings.append(f"{name}: TLS compression offered ({', '.join(compression)})")
    return findings


def render(result: ScanResult) -> str:
    lines = [f"TLS offer of {result.target} (nmap ssl-enum-ciphers):"]
    for name, offer in result.protocols.items():
        lines.append(f"  {name}")
        for cipher in offer.ciphers:
            kind = "AEAD" if cipher.aead else "NOT AEAD"
            lines.append(f"    {cipher.name}  [{cipher.kex or '?'}, {kind}, {cipher.strength}]")
        if offer.compressors:
            lines.append(f"    compressors: {', '.join(offer.compressors)}")
        lines.extend(f"    nmap warning: {text}" for text in offer.warnings)
    lines.append("result: OK" if result.ok else f"result: FAIL ({len(result.findings)} finding(s))")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Scan a TLS port with nmap's ssl-enum-ciphers and fail on anything below "
        "TLS 1.2, any non-AEAD cipher, non-ECDHE key exchange (TLS 1.2) or compression."
    )
    parser.add_argument("host", nargs="?", help="host to scan, e.g. 127.0.0.1")
    parser.add_argument("port", nargs="?", type=int, help="TCP port of the TLS server")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--xml-out", type=Path, help="also write nmap's XML report here")
    parser.add_argument("--from-xml", type=Path, help="judge this nmap XML report, do not scan")
    parser.add_argument("--nmap", help="path of the nmap binary (default: from PATH)")
    args = parser.parse_args(argv)
    try:
        if args.from_xml is not None:
            xml_text = args.from_xml.read_text()
            target = None
        else:
            if args.host is None or args.port is None:
                parser.error("HOST and PORT are required unless --from-xml is given")
            xml_text = run_nmap(args.host, args.port, nmap=args.nmap)
            target = f"{args.host}:{args.port}"
            if args.xml_out is not None:
                args.xml_out.write_text(xml_text)
        result = parse_report(xml_text, target=target)
    except (ScanError, OSError) as exc:
        print(f"tls-scan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
    for finding in result.findings:
        print(f"tls-scan: FAIL: {finding}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
