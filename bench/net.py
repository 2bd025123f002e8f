"""TCP peers for the benchmarks, each run as its own process (``python -m bench.net ...``) so
that they never share an interpreter with what they measure; and an ``ssh -R`` peer.

    python -m bench.net sink PORT             count bytes until EOF, answer the count
    python -m bench.net echo PORT             echo until EOF
    python -m bench.net source PORT BYTES     send BYTES, half-close, print {"seconds", "answer"}
    python -m bench.net rtt PORT COUNT SIZE   COUNT round trips of SIZE bytes, print the RTTs (µs)
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

CHUNK: Final = 1 << 20
SSHD: Final = "/usr/sbin/sshd"


def _serve(port: int, handle: object) -> None:
    server = socket.create_server(("127.0.0.1", port), backlog=128)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(conn,), daemon=True).start()  # type: ignore[arg-type]


def _sink(conn: socket.socket) -> None:
    total = 0
    buffer = bytearray(CHUNK)
    with conn:
        while n := conn.recv_into(buffer):
            total += n
        conn.sendall(str(total).encode())


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(CHUNK):
            conn.sendall(data)


def source(port: int, size: int) -> dict[str, object]:
    payload = b"\x5a" * CHUNK
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = time.perf_counter()
        left = size
        while left > 0:
            view = payload if left >= CHUNK else payload[:left]
            conn.sendall(view)
            left -= len(view)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while data := conn.recv(64):
            answer += data
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "answer": answer.decode() or None}


def rtt(port: int, count: int, size: int) -> list[float]:
    message = b"r" * size
    out: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter()
            conn.sendall(message)
            got = 0
            while got < size:
                data = conn.recv(size - got)
                if not data:
                    raise ConnectionError("the echo closed early")
                got += len(data)
            out.append((time.perf_counter() - started) * 1e6)
    return out


SSH_AES: Final = "aes128-gcm@openssh.com"
"""The second ssh peer's cipher: AES-GCM, as TLS uses (OpenSSH's default is
chacha20-poly1305@openssh.com)."""


@contextlib.contextmanager
def ssh_reverse_forward(
    workdir: Path, target_port: int, cipher: str | None = None
) -> Iterator[int]:
    """``ssh -N -R`` through an sshd of our own on a loopback port with throwaway keys; yields
    the remote listening port whose connections reach ``target_port``. OpenSSH's default
    cipher unless ``cipher`` (``ssh -c``)."""
    if not Path(SSHD).exists() or shutil.which("ssh") is None:
        raise RuntimeError("sshd/ssh not installed (make bench installs openssh-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        key = workdir / name
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
            )
    authorized = workdir / "authorized_keys"
    authorized.write_text((workdir / "client_key.pub").read_text())
    authorized.chmod(0o600)
    sshd_port, remote_port = free_port(), free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"""Port {sshd_port}
ListenAddress 127.0.0.1
HostKey {workdir / "host_key"}
AuthorizedKeysFile {authorized}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
PermitRootLogin prohibit-password
PidFile {workdir / "sshd.pid"}
"""
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    log = (workdir / "ssh.log").open("ab")
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    ssh = None
    try:
        wait_port(sshd_port)
        ssh = subprocess.Popen(
            [
                "ssh",
                "-N",
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ExitOnForwardFailure=yes",
                "-o", "BatchMode=yes",
                "-i", str(workdir / "client_key"),
                *(["-c", cipher] if cipher else []),
                "-p", str(sshd_port),
                "-R", f"127.0.0.1:{remote_port}:127.0.0.1:{target_port}",
                f"{getpass.getuser()}@127.0.0.1",
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        wait_port(remote_port)
        yield remote_port
    finally:
        for process in (ssh, sshd):
            if process is not None:
                process.terminate()
                process.wait(10)
        log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    kind, port = argv[0], int(argv[1])
    if kind == "sink":
        _serve(port, _sink)
    elif kind == "echo":
        _serve(port, _echo)
    elif kind == "source":
        print(json.dumps(source(port, int(argv[2]))), flush=True)
    elif kind == "rtt":
        print(json.dumps(rtt(port, int(argv[2]), int(argv[3]))), flush=True)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
