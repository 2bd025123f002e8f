"""A third-party view of the stub's TLS: nmap's ``ssl-enum-ciphers`` through scripts/tls_scan.py.

The stub requires a client certificate, and nmap presents none; the scan still enumerates every
protocol and cipher suite, because ``ssl-enum-ciphers`` only needs the ServerHello, which the
server sends before it asks for (and then refuses) a certificate.

The scanner is checked in both directions: against the real stub it must find TLS 1.2/1.3 with
AEAD suites only, and against a deliberately weak TLS server (TLS 1.0/1.1, CBC) it must fail.
Its judgement of rarer weaknesses (SSLv3, RC4, NULL, EXPORT, static RSA, compression) is checked
on hand-made nmap reports, which needs no nmap.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certs.pki import PKIPaths
from control_plane_stub.server import StubServer
from tests.conftest import scaled

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tls_scan.py"
NMAP = shutil.which("nmap")
needs_nmap = pytest.mark.skipif(
    NMAP is None, reason="nmap is not installed (CI installs it: apt-get install nmap)"
)
# Substrings that mark a suite as not AEAD or otherwise broken; checked here independently of
# the script's own classification.
WEAK_MARKERS = ("CBC", "RC4", "3DES", "DES_", "NULL", "EXPORT", "anon", "MD5")


@dataclass(frozen=True)
class ScanRun:
    returncode: int
    report: dict[str, Any] | None
    stdout: str
    stderr: str


async def run_scan(*args: str) -> ScanRun:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), scaled(120))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    stdout, stderr = out.decode(), err.decode()
    report = json.loads(stdout) if "--json" in args and process.returncode in (0, 1) else None
    return ScanRun(process.returncode, report, stdout, stderr)


def cipher_names(report: dict[str, Any]) -> dict[str, list[str]]:
    return {
        name: [cipher["name"] for cipher in offer["ciphers"]]
        for name, offer in report["protocols"].items()
    }


# --------------------------------------------------------------------------------------------
# The real stub


@needs_nmap
async def test_stub_offers_only_tls12_and_tls13_with_aead_suites(stub: StubServer) -> None:
    scan = await run_scan("--json", "127.0.0.1", str(stub.agent_port))
    print(scan.stdout)
    assert scan.returncode == 0, scan.stderr
    assert scan.report is not None
    assert scan.report["ok"] is True
    assert scan.report["findings"] == []
    offered = cipher_names(scan.report)
    # Enumerated despite the required client certificate: the ServerHello is enough.
    assert offered, "ssl-enum-ciphers found no protocol at all"
    assert set(offered) <= {"TLSv1.2", "TLSv1.3"}, offered
    assert "TLSv1.3" in offered  # preferred, docs/PROTOCOL.md §2
    for protocol, names in offered.items():
        assert names, f"{protocol} offered without any cipher suite"
        for name in names:
            assert "GCM" in name or "CHACHA20_POLY1305" in name, (protocol, name)
            assert not any(marker in name for marker in WEAK_MARKERS), (protocol, name)
            if protocol == "TLSv1.2":
                assert name.startswith("TLS_ECDHE_"), name
    for offer in scan.report["protocols"].values():
        assert offer["compressors"] in ([], ["NULL"])
        assert all(cipher["aead"] for cipher in offer["ciphers"])


@needs_nmap
async def test_scan_keeps_nmaps_xml_report(stub: StubServer, tmp_path: Path) -> None:
    xml = tmp_path / "scan.xml"
    scan = await run_scan("--xml-out", str(xml), "127.0.0.1", str(stub.agent_port))
    assert scan.returncode == 0, scan.stderr
    assert "result: OK" in scan.stdout
    assert "ssl-enum-ciphers" in xml.read_text()
    again = await run_scan("--json", "--from-xml", str(xml))
    assert again.returncode == 0
    assert again.report is not None
    assert set(cipher_names(again.report)) <= {"TLSv1.2", "TLSv1.3"}


@needs_nmap
async def test_scan_of_a_closed_port_is_an_error_not_a_pass() -> None:
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # the port is free again: nothing listens there
    scan = await run_scan("127.0.0.1", str(port))
    assert scan.returncode == 2
    assert "port is closed" in scan.stderr


@needs_nmap
async def test_scan_of_a_plain_tcp_port_is_an_error_not_a_pass() -> None:
    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        scan = await run_scan("127.0.0.1", str(server.sockets[0].getsockname()[1]))
    finally:
        server.close()
        await server.wait_closed()
    assert scan.returncode == 2, scan.stdout
    assert "error" in scan.stderr


# --------------------------------------------------------------------------------------------
# A deliberately weak TLS server: the scan must fail


@pytest.fixture
async def weak_tls_port(pki: PKIPaths) -> AsyncIterator[int]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 is deprecated: the point
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+AES:@SECLEVEL=0")  # GCM and CBC suites
    context.load_cert_chain(pki.server_cert, pki.server_key)

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@needs_nmap
async def test_scan_fails_on_cbc_suites_and_old_protocols(weak_tls_port: int) -> None:
    scan = await run_scan("--json", "127.0.0.1", str(weak_tls_port))
    print(scan.stdout, scan.stderr)
    assert scan.returncode == 1
    assert scan.report is not None
    assert scan.report["ok"] is False
    offered = cipher_names(scan.report)
    findings = scan.report["findings"]
    cbc = [name for name in offered["TLSv1.2"] if "CBC" in name]
    assert cbc, offered
    for name in cbc:
        assert f"TLSv1.2: {name} is not an AEAD cipher suite" in findings
    # Whether the local OpenSSL still speaks TLS 1.0/1.1 depends on its build; what it offers
    # must be reported.
    for old in set(offered) - {"TLSv1.2", "TLSv1.3"}:
        assert f"{old} is offered (minimum is TLS 1.2)" in findings
    assert "FAIL" in scan.stderr


# --------------------------------------------------------------------------------------------
# The judgement, on hand-made nmap reports (no nmap needed)


def nmap_report(protocols: dict[str, list[str]], *, compressors: tuple[str, ...] = ()) -> str:
    tables = []
    for protocol, names in protocols.items():
        ciphers = "".join(
            f'<table><elem key="name">{name}</elem><elem key="strength">A</elem>'
            f'<elem key="kex_info">ecdh_x25519</elem></table>'
            for name in names
        )
        comp = "".join(f"<elem>{c}</elem>" for c in compressors)
        tables.append(
            f'<table key="{protocol}"><table key="ciphers">{ciphers}</table>'
            f'<table key="compressors">{comp}</table></table>'
        )
    return (
        '<?xml version="1.0"?><nmaprun><host><address addr="192.0.2.1" addrtype="ipv4"/>'
        '<ports><port protocol="tcp" portid="443"><state state="open"/>'
        f'<script id="ssl-enum-ciphers" output="">{"".join(tables)}</script>'
        "</port></ports></host></nmaprun>"
    )


async def judge(tmp_path: Path, xml: str) -> ScanRun:
    path = tmp_path / "report.xml"
    path.write_text(xml)
    return await run_scan("--json", "--from-xml", str(path))


GOOD = {
    "TLSv1.2": [
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CCM",
    ],
    "TLSv1.3": ["TLS_AES_256_GCM_SHA384", "TLS_AKE_WITH_CHACHA20_POLY1305_SHA256"],
}


async def test_a_good_offer_passes(tmp_path: Path) -> None:
    scan = await judge(tmp_path, nmap_report(GOOD, compressors=("NULL",)))
    assert scan.returncode == 0, scan.stderr
    assert scan.report is not None
    assert scan.report["findings"] == []
    assert scan.report["target"] == "192.0.2.1:443"


@pytest.mark.parametrize(
    ("protocols", "finding"),
    [
        ({"SSLv3": ["TLS_RSA_WITH_RC4_128_SHA"]}, "SSLv3 is offered (minimum is TLS 1.2)"),
        (
            {"TLSv1.1": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]},
            "TLSv1.1 is offered (minimum is TLS 1.2)",
        ),
        (
            {"TLSv1.2": ["TLS_RSA_WITH_RC4_128_MD5"]},
            "TLSv1.2: TLS_RSA_WITH_RC4_128_MD5 is not an AEAD cipher suite",
        ),
        (
            {"TLSv1.2": ["TLS_RSA_WITH_3DES_EDE_CBC_SHA"]},
            "TLSv1.2: TLS_RSA_WITH_3DES_EDE_CBC_SHA is not an AEAD cipher suite",
        ),
        (
            {"TLSv1.2": ["TLS_ECDHE_RSA_WITH_NULL_SHA"]},
            "TLSv1.2: TLS_ECDHE_RSA_WITH_NULL_SHA is not an AEAD cipher suite",
        ),
        (
            {"TLSv1.2": ["TLS_RSA_EXPORT_WITH_DES40_CBC_SHA"]},
            "TLSv1.2: TLS_RSA_EXPORT_WITH_DES40_CBC_SHA is not an AEAD cipher suite",
        ),
        (
            {"TLSv1.2": ["TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384"]},
            "TLSv1.2: TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384 is not an AEAD cipher suite",
        ),
        (
            {"TLSv1.2": ["TLS_RSA_WITH_AES_128_GCM_SHA256"]},
            "TLSv1.2: TLS_RSA_WITH_AES_128_GCM_SHA256 does not use ECDHE key exchange",
        ),
        (
            {"TLSv1.2": ["TLS_DHE_RSA_WITH_AES_128_GCM_SHA256"]},
            "TLSv1.2: TLS_DHE_RSA_WITH_AES_128_GCM_SHA256 does not use ECDHE key exchange",
        ),
    ],
    ids=["sslv3", "tls11", "rc4", "3des", "null", "export", "cbc", "static-rsa", "dhe"],
)
async def test_a_weak_offer_fails_with_a_clear_finding(
    tmp_path: Path, protocols: dict[str, list[str]], finding: str
) -> None:
    scan = await judge(tmp_path, nmap_report({**GOOD, **protocols}))
    assert scan.returncode == 1
    assert scan.report is not None
    assert finding in scan.report["findings"]
    assert f"tls-scan: FAIL: {finding}" in scan.stderr


async def test_compression_fails(tmp_path: Path) -> None:
    scan = await judge(tmp_path, nmap_report(GOOD, compressors=("NULL", "DEFLATE")))
    assert scan.returncode == 1
    assert scan.report is not None
    assert "TLSv1.2: TLS compression offered (DEFLATE)" in scan.report["findings"]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("not xml at all", "not an nmap XML report"),
        ("<nmaprun><host/></nmaprun>", "no port"),
        (
            '<nmaprun><host><ports><port portid="443"><state state="open"/></port></ports>'
            "</host></nmaprun>",
            "ssl-enum-ciphers produced nothing",
        ),
        (
            '<nmaprun><host><ports><port portid="443"><state state="open"/>'
            '<script id="ssl-enum-ciphers" output=""/></port></ports></host></nmaprun>',
            "no protocol was negotiated",
        ),
    ],
    ids=["not-xml", "no-port", "no-script-output", "no-protocol"],
)
async def test_nothing_to_judge_is_an_error(tmp_path: Path, xml: str, message: str) -> None:
    path = tmp_path / "report.xml"
    path.write_text(xml)
    scan = await run_scan("--from-xml", str(path))
    assert scan.returncode == 2
    assert message in scan.stderr


async def test_missing_nmap_is_an_error(stub: StubServer, tmp_path: Path) -> None:
    scan = await run_scan("--nmap", str(tmp_path / "no-nmap"), "127.0.0.1", str(stub.agent_port))
    assert scan.returncode == 2
    assert "tls-scan: error: nmap not found at" in scan.stderr
