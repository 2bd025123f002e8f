"""TLS contexts and certificate helpers (agent.io.tls), with real handshakes on loopback."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import shutil
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.core.errors import ConfigError, TLSRejected
from agent.core.session import CloseCode
from agent.io.tls import (
    PeerCertificate,
    certificate_common_name,
    check_private_key_file,
    classify_tls_failure,
    client_context,
    server_context,
)
from certs.pki import PKIPaths
from control_plane_stub.server import StubServer

TIMEOUT = 10.0


def agent_client(pki: PKIPaths, *, ca_bundle: Path | None = None) -> ssl.SSLContext:
    return client_context(
        ca_bundle=ca_bundle or pki.server_ca_cert,
        cert=pki.agent_cert("agent-1"),
        key=pki.agent_key("agent-1"),
    )


def control_plane_server(pki: PKIPaths, *, client_ca: Path | None = None) -> ssl.SSLContext:
    return server_context(
        cert=pki.server_cert, key=pki.server_key, client_ca=client_ca or pki.agent_ca_cert
    )


@dataclass
class HandshakeResult:
    client_error: BaseException | None
    server_error: BaseException | None
    client_peer_der: bytes | None
    server_peer_der: bytes | None


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> HandshakeResult:
    """Run a real TLS handshake over a connected loopback socket pair (server in a thread)."""
    left, right = socket.socketpair()
    left.settimeout(TIMEOUT)
    right.settimeout(TIMEOUT)

    def serve() -> tuple[BaseException | None, bytes | None]:
        try:
            with server.wrap_socket(right, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
                return None, peer
        except (ssl.SSLError, OSError) as exc:
            return exc, None

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(serve)
        client_error: BaseException | None = None
        client_peer: bytes | None = None
        try:
            with client.wrap_socket(left, server_hostname="localhost") as tls:
                client_peer = tls.getpeercert(binary_form=True)
                assert tls.recv(2) == b"ok"
        except (ssl.SSLError, OSError) as exc:
            client_error = exc
        finally:
            left.close()
        server_error, server_peer = future.result(timeout=TIMEOUT)
    right.close()
    return HandshakeResult(client_error, server_error, client_peer, server_peer)


# -- contexts -------------------------------------------------------------------------------------


def _assert_aead_only(context: ssl.SSLContext) -> None:
    ciphers = context.get_ciphers()
    assert ciphers
    for cipher in ciphers:
        name = cipher["name"]
        protocol = cipher["protocol"]
        aead = protocol == "TLSv1.3" or any(m in name for m in ("GCM", "CHACHA20", "CCM"))
        assert aead, name
        assert "CBC" not in name
        assert "RC4" not in name
        assert "NULL" not in name
        assert cipher["aead"] is True, name
        if protocol != "TLSv1.3":
            assert name.startswith("ECDHE-"), name  # forward secret


def test_client_context(pki: PKIPaths) -> None:
    context = agent_client(pki)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    _assert_aead_only(context)


def test_server_context(pki: PKIPaths) -> None:
    context = control_plane_server(pki)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_COMPRESSION
    _assert_aead_only(context)


def test_mutual_tls_handshake_succeeds(pki: PKIPaths) -> None:
    result = handshake(agent_client(pki), control_plane_server(pki))
    assert result.client_error is None
    assert result.server_error is None
    assert result.client_peer_der == x509.load_pem_x509_certificate(
        pki.server_cert.read_bytes()
    ).public_bytes(serialization.Encoding.DER)
    assert result.server_peer_der is not None
    assert PeerCertificate.from_der(result.server_peer_der).subject_cn == "agent-1"


def test_tls12_client_is_still_accepted(pki: PKIPaths) -> None:
    client = agent_client(pki)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(client, control_plane_server(pki))
    assert result.client_error is None
    assert result.server_error is None


def test_cbc_only_tls12_client_refused(pki: PKIPaths) -> None:
    client = agent_client(pki)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        client.set_ciphers("ECDHE+AES128+SHA256:ECDHE+AES256+SHA384:!AESGCM:!CHACHA20")
    except ssl.SSLError:
        pytest.skip("no CBC suites available in this OpenSSL")
    result = handshake(client, control_plane_server(pki))
    assert isinstance(result.client_error, ssl.SSLError)
    assert isinstance(result.server_error, ssl.SSLError)
    assert "NO_SHARED_CIPHER" in str(result.server_error.reason)
    assert classify_tls_failure(result.client_error) is None


# -- private key permissions ----------------------------------------------------------------------


@pytest.fixture
def loose_key(pki: PKIPaths, tmp_path: Path) -> Path:
    key = tmp_path / "agent.key"
    shutil.copyfile(pki.agent_key("agent-1"), key)
    key.chmod(0o644)
    return key


def test_group_readable_key_refused_by_client_context(pki: PKIPaths, loose_key: Path) -> None:
    with pytest.raises(ConfigError, match="chmod 600") as info:
        client_context(ca_bundle=pki.server_ca_cert, cert=pki.agent_cert("agent-1"), key=loose_key)
    assert "0644" in str(info.value)
    assert str(loose_key) in str(info.value)


def test_group_readable_key_refused_by_server_context(pki: PKIPaths, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    shutil.copyfile(pki.server_key, key)
    key.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod"):
        server_context(cert=pki.server_cert, key=key, client_ca=pki.agent_ca_cert)


@pytest.mark.parametrize("mode", [0o604, 0o660, 0o700 | 0o001, 0o620])
def test_any_group_or_other_bit_refused(loose_key: Path, mode: int) -> None:
    loose_key.chmod(mode)
    with pytest.raises(ConfigError, match="chmod"):
        check_private_key_file(loose_key)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_key_accepted(loose_key: Path, mode: int) -> None:
    loose_key.chmod(mode)
    check_private_key_file(loose_key)


def test_missing_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read private key"):
        check_private_key_file(tmp_path / "missing.key")


def test_mismatched_key_and_certificate(pki: PKIPaths) -> None:
    with pytest.raises(ConfigError, match=r"cannot be used together \(not PEM, or not a pair\)"):
        client_context(
            ca_bundle=pki.server_ca_cert,
            cert=pki.agent_cert("agent-1"),
            key=pki.agent_key("agent-2"),
        )


def test_missing_ca_bundle(pki: PKIPaths, tmp_path: Path) -> None:
    """The message names the one file that is missing (it once named two, without saying
    which)."""
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as refused:
        agent_client(pki, ca_bundle=missing)
    assert str(refused.value) == (
        f"cannot read the CA bundle (control_plane.ca_bundle) {missing}: No such file or directory"
    )
    with pytest.raises(ConfigError, match=r"cannot read the client certificate \(control_plane"):
        client_context(ca_bundle=pki.server_ca_cert, cert=missing, key=pki.agent_key("agent-1"))


# -- certificates ---------------------------------------------------------------------------------


def test_peer_certificate_from_der(pki: PKIPaths) -> None:
    cert = x509.load_pem_x509_certificate(pki.agent_cert("agent-2").read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    peer = PeerCertificate.from_der(der)
    assert peer.sha256 == hashlib.sha256(der).hexdigest()
    assert len(peer.sha256) == 64
    assert peer.sha256 == peer.sha256.lower()
    assert peer.subject_cn == "agent-2"
    assert peer.issuer_cn == "BYOC dev agent CA"
    assert peer.serial == cert.serial_number
    assert peer.not_after == cert.not_valid_after_utc


def test_peer_certificate_from_ssl_object_without_peer() -> None:
    with pytest.raises(TLSRejected) as info:
        PeerCertificate.from_ssl_object(None)
    assert info.value.by_peer is False


def test_certificate_common_name(pki: PKIPaths) -> None:
    assert certificate_common_name(pki.agent_cert("agent-3")) == "agent-3"
    assert certificate_common_name(pki.server_ca_cert) == "BYOC dev server CA"


def test_certificate_common_name_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read certificate"):
        certificate_common_name(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot read certificate"):
        certificate_common_name(garbage)


def two_cn_agent_cert(pki: PKIPaths, tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate from the real agent CA whose subject has two CNs (agent-1 and
    agent-2): whichever a control plane took, it would be guessing the identity."""
    ca_cert = x509.load_pem_x509_certificate(pki.agent_ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.agent_ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "agent-1"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "agent-2"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "two-cn.pem", tmp_path / "two-cn.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_a_subject_with_two_cns_has_no_common_name(pki: PKIPaths, tmp_path: Path) -> None:
    """/tmp/review3/two_cn.py: the first CN was taken as the identity."""
    cert_path, _ = two_cn_agent_cert(pki, tmp_path)
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert PeerCertificate.from_der(der).subject_cn is None
    with pytest.raises(ConfigError, match="2 subject common names; exactly one is required"):
        certificate_common_name(cert_path)


async def test_the_stub_refuses_a_client_certificate_with_two_cns(
    pki: PKIPaths, stub: StubServer, tmp_path: Path
) -> None:
    cert_path, key_path = two_cn_agent_cert(pki, tmp_path)
    context = client_context(ca_bundle=pki.server_ca_cert, cert=cert_path, key=key_path)
    url = f"wss://localhost:{stub.agent_port}/v1/agent"
    async with connect(url, ssl=context, open_timeout=TIMEOUT) as websocket:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(websocket.recv(), TIMEOUT)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CloseCode.PROTOCOL_ERROR
    assert closed.value.rcvd.reason == "certificate must have exactly one CN, an agent id"
    assert stub.hub.links == {}


# -- classifying failures -------------------------------------------------------------------------


def test_classify_real_server_certificate_refusal(pki: PKIPaths, foreign_pki: PKIPaths) -> None:
    # The agent trusts the foreign server CA, so it refuses the real server's certificate.
    result = handshake(
        agent_client(pki, ca_bundle=foreign_pki.server_ca_cert), control_plane_server(pki)
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    rejected = classify_tls_failure(result.client_error)
    assert isinstance(rejected, TLSRejected)
    assert rejected.by_peer is False
    assert "control plane certificate refused" in str(rejected)
    assert result.client_error.verify_message in str(rejected)
    # The server saw the agent's alert: from its side the peer refused its certificate.
    assert isinstance(result.server_error, ssl.SSLError)
    assert "ALERT_UNKNOWN_CA" in str(result.server_error.reason)
    from_server = classify_tls_failure(result.server_error)
    assert from_server is not None
    assert from_server.by_peer is True


def test_classify_real_client_certificate_refusal(pki: PKIPaths, foreign_pki: PKIPaths) -> None:
    # The control plane only trusts the foreign agent CA and refuses our client certificate.
    result = handshake(
        agent_client(pki), control_plane_server(pki, client_ca=foreign_pki.agent_ca_cert)
    )
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert result.client_error is not None
    rejected = classify_tls_failure(result.client_error)
    assert rejected is not None
    assert rejected.by_peer is True


def openssl_error(reason: str) -> ssl.SSLError:
    """An SSLError as the ssl module raises it from OpenSSL: with ``library`` and ``reason``."""
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()} (_ssl.c:1000)")
    error.library = "SSL"
    error.reason = reason
    return error


def test_classify_alert_unknown_ca() -> None:
    rejected = classify_tls_failure(openssl_error("TLSV1_ALERT_UNKNOWN_CA"))
    assert isinstance(rejected, TLSRejected)
    assert rejected.by_peer is True
    assert "refused our client certificate" in str(rejected)
    assert "TLSV1_ALERT_UNKNOWN_CA" in str(rejected)


def test_classify_ssl_error_without_reason_attribute() -> None:
    # SSLErrors made in Python code (ssl.py itself does so) have no `reason` attribute; the
    # message is then all there is to go by, and classifying must not crash.
    error = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    rejected = classify_tls_failure(error)
    assert rejected is not None
    assert rejected.by_peer is True
    assert classify_tls_failure(ssl.SSLError("ALPN protocols must be 1 to 255 in length")) is None


@pytest.mark.parametrize(
    "reason",
    [
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "TLSV1_ALERT_ACCESS_DENIED",
    ],
)
def test_classify_other_peer_alerts(reason: str) -> None:
    rejected = classify_tls_failure(openssl_error(reason))
    assert rejected is not None
    assert rejected.by_peer is True


def test_classify_through_exception_chain(pki: PKIPaths, foreign_pki: PKIPaths) -> None:
    result = handshake(
        agent_client(pki, ca_bundle=foreign_pki.server_ca_cert), control_plane_server(pki)
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    wrapper = ConnectionError("connect failed")
    wrapper.__cause__ = result.client_error
    outer = RuntimeError("tunnel down")
    outer.__context__ = wrapper
    rejected = classify_tls_failure(outer)
    assert rejected is not None
    assert rejected.by_peer is False

    peer_alert = OSError("handshake failed")
    peer_alert.__cause__ = openssl_error("TLSV1_ALERT_UNKNOWN_CA")
    chained = classify_tls_failure(peer_alert)
    assert chained is not None
    assert chained.by_peer is True


def test_classify_unrelated_errors() -> None:
    assert classify_tls_failure(OSError("connection refused")) is None
    assert classify_tls_failure(ConnectionRefusedError(111, "Connection refused")) is None
    assert classify_tls_failure(openssl_error("WRONG_VERSION_NUMBER")) is None
    assert classify_tls_failure(TimeoutError()) is None


def test_classify_cycle_terminates() -> None:
    first = OSError("a")
    second = OSError("b")
    first.__cause__ = second
    second.__cause__ = first
    assert classify_tls_failure(first) is None
