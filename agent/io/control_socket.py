"""The local control socket: how a person on the host approves, denies and inspects commands.

A Unix stream socket (never a network port), mode 0660, in a directory only the agent's user and
group can enter. One request per connection: a JSON object on one line, answered by one JSON
object on one line::

    {"op": "approve", "jti": "…", "note": "ticket OPS-12"}  ->  {"ok": true, "command": {…}}
    {"op": "deny", "jti": "…", "note": "not in the window"} ->  {"ok": true, "command": {…}}
    {"op": "pending"}                                       ->  {"ok": true, "commands": […]}
    {"op": "status"}                                        ->  {"ok": true, "status": {…}}
    on error: {"ok": false, "error": "<code>", "message": "…"}

Who asked is taken from the kernel (``SO_PEERCRED``: uid and pid of the connecting process), not
from anything the client says, and goes into the audit record of an approval or denial.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from agent.core.errors import ControlSocketError
from agent.core.lifecycle import Operator

MAX_REQUEST_BYTES: Final = 64 * 1024
Handler = Callable[[Mapping[str, Any], Operator], Awaitable[dict[str, object]]]


def peer_operator(sock: socket.socket, path: Path) -> Operator:
    """The connecting process's user, as the kernel reports it, with its group names."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return Operator(user=f"uid:{uid}", uid=uid, pid=pid, via=f"unix:{path}")
    names = []
    for group_id in os.getgrouplist(user, gid):
        try:
            names.append(grp.getgrgid(group_id).gr_name)
        except KeyError:
            continue
    return Operator(user=user, uid=uid, pid=pid, via=f"unix:{path}", groups=tuple(names))


class ControlSocketServer:
    def __init__(
        self, path: Path, handler: Handler, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        self.path = path
        self._handler = handler
        self._log = log
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlSocketError(f"{self.path} exists and is not a socket")
            if _is_listening(self.path):
                raise ControlSocketError(
                    f"another agent is already listening on {self.path}; refusing to start twice"
                )
            self.path.unlink()
        old_umask = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            operator = peer_operator(writer.get_extra_info("socket"), self.path)
            response = await self._answer(reader, operator)
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            self._log.warning("control_socket_client_error", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, operator: Operator) -> dict[str, object]:
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
        except (TimeoutError, ValueError, asyncio.LimitOverrunError):
            return {"ok": False, "error": "bad_request", "message": "no request line"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "bad_request", "message": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "bad_request", "message": "request needs an 'op'"}
        return await self._handler(request, operator)


def _is_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def request(path: Path, payload: Mapping[str, object], *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to a running agent and return its answer (used by the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(payload).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except FileNotFoundError as exc:
            raise ControlSocketError(
                f"no agent control socket at {path} (is the agent running?)"
            ) from exc
        except PermissionError as exc:
            raise ControlSocketError(
                f"permission denied on {path}: run as the agent's user or a member of its group"
            ) from exc
        except OSError as exc:
            raise ControlSocketError(f"cannot talk to the agent at {path}: {exc}") from exc
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ControlSocketError("the agent sent an unreadable answer") from exc
    if not isinstance(answer, dict):
        raise ControlSocketError("the agent sent an unreadable answer")
    return answer
