"""The agent's receipt signer, read from its client certificate and key files (I/O around
:class:`agent.core.receipts.ReceiptSigner`)."""

from __future__ import annotations

from pathlib import Path

from agent.core.receipts import ReceiptInvalid, ReceiptSigner


def signer_from_files(agent_id: str, cert: Path, key: Path) -> ReceiptSigner:
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except OSError as exc:
        raise ReceiptInvalid(f"cannot load the receipt key: {exc}") from exc
    return ReceiptSigner.from_pem(agent_id, cert_pem, key_pem)


class ReceiptKeyFiles:
    """The agent's receipt signer, loaded from its client certificate and key files, reloaded
    when they change (a renewed certificate signs the receipts after the renewal)."""

    def __init__(self, agent_id: str, cert: Path, key: Path) -> None:
        self._agent_id = agent_id
        self._cert = cert
        self._key = key
        self._stamp: tuple[int, int] | None = None
        self._signer: ReceiptSigner | None = None

    def __call__(self) -> ReceiptSigner | None:
        try:
            stamp = (self._cert.stat().st_mtime_ns, self._key.stat().st_mtime_ns)
        except OSError as exc:
            raise ReceiptInvalid(f"cannot read the receipt key files: {exc}") from exc
        if stamp != self._stamp:
            self._signer = signer_from_files(self._agent_id, self._cert, self._key)
            self._stamp = stamp
        return self._signer
