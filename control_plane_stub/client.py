"""An httpx client for the stub's operator API (used by ``cp-stub``, the demo and the tests)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from types import TracebackType
from typing import Any, Final, Self

import httpx

from control_plane_stub.errors import ApiError

DEFAULT_API: Final = "http://127.0.0.1:8080"


def default_api_url() -> str:
    return os.environ.get("CP_STUB_API", DEFAULT_API)


class StubClient:
    def __init__(self, base_url: str | None = None, *, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._http = httpx.AsyncClient(base_url=base_url or default_api_url(), timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, object] | None = None,
        wait: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(
                method,
                path,
                params=params,
                json=body,
                headers=headers,
                timeout=self._timeout + wait,
            )
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"{self._http.base_url}: {exc}") from exc
        try:
            payload = response.json()
        except json.JSONDecodeError as exc:
            raise ApiError(response.status_code, "bad_response", response.text[:200]) from exc
        if response.is_error:
            raise ApiError(
                response.status_code,
                str(payload.get("error", "error")),
                str(payload.get("message", "")),
            )
        if not isinstance(payload, dict):
            raise ApiError(response.status_code, "bad_response", "not a JSON object")
        return payload

    async def healthz(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/healthz")

    async def wait_ready(self, seconds: float, *, interval: float = 0.1) -> None:
        """Probe /v1/healthz until the API answers (a freshly started stub), or give up."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                await self.healthz()
            except ApiError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(interval)
            else:
                return

    async def agents(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/v1/agents"))["agents"])

    async def agent(self, agent_id: str, *, wait_connected: float = 0.0) -> dict[str, Any]:
        payload = await self._call(
            "GET",
            f"/v1/agents/{agent_id}",
            params={"wait_connected": str(wait_connected)},
            wait=wait_connected,
        )
        return dict(payload["agent"])

    async def push_keyset(self, agent_id: str, token: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/agents/{agent_id}/keyset", body={"token": token})

    async def keyset(self, agent_id: str, *, wait_answer: float = 0.0) -> dict[str, Any]:
        payload = await self._call(
            "GET",
            f"/v1/agents/{agent_id}/keyset",
            params={"wait_answer": str(wait_answer)},
            wait=wait_answer,
        )
        return dict(payload["keyset"])

    async def anchors(self, agent_id: str, *, every: bool = False) -> list[dict[str, Any]]:
        """The anchors held for an agent, highest ``audit_seq`` first: the latest 100, or
        ``every`` one (fetched page by page)."""
        path = f"/v1/agents/{agent_id}/anchors"
        if not every:
            return list((await self._call("GET", path))["anchors"])
        anchors: list[dict[str, Any]] = []
        params = {"limit": "1000"}
        while True:
            page = await self._call("GET", path, params=params)
            anchors.extend(page["anchors"])
            if page.get("next") is None:
                return anchors
            params["before"] = str(page["next"])

    async def send(
        self,
        agent_id: str,
        command_type: str,
        params: dict[str, object],
        *,
        ttl: int = 300,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Sign and queue a command. With ``idempotency_key``, sending it again (after an
        answer that never came) returns the command stored the first time."""
        payload = await self._call(
            "POST",
            f"/v1/agents/{agent_id}/commands",
            body={"type": command_type, "params": params, "ttl": ttl},
            headers={"Idempotency-Key": idempotency_key} if idempotency_key else None,
        )
        return dict(payload["command"])

    async def send_signed(self, agent_id: str, token: str) -> dict[str, Any]:
        payload = await self._call(
            "POST", f"/v1/agents/{agent_id}/commands/signed", body={"token": token}
        )
        return dict(payload["command"])

    async def commands(
        self, *, agent_id: str | None = None, final: bool = False, limit: int = 50
    ) -> list[dict[str, Any]]:
        params = {"limit": str(limit), "final": "1" if final else "0"}
        if agent_id:
            params["agent_id"] = agent_id
        return list((await self._call("GET", "/v1/commands", params=params))["commands"])

    async def command(
        self,
        ref: str,
        *,
        wait_for: str | None = None,
        wait_seconds: float = 30.0,
        with_token: bool = False,
    ) -> dict[str, Any]:
        """The command, its ``history`` and ``timed_out``; waits when ``wait_for`` is given."""
        params = {"timeout": str(wait_seconds)}
        if wait_for:
            params["wait_for"] = wait_for
        if with_token:
            params["include_token"] = "1"  # noqa: S105  # a flag, not a secret
        return await self._call(
            "GET", f"/v1/commands/{ref}", params=params, wait=wait_seconds if wait_for else 0.0
        )

    async def start_forward(
        self, agent_id: str, target: str, *, listen: str, max_duration: int
    ) -> dict[str, Any]:
        body: dict[str, object] = {"target": target, "listen": listen, "max_duration": max_duration}
        payload = await self._call("POST", f"/v1/agents/{agent_id}/forwards", body=body)
        return dict(payload["forward"])

    async def enroll_token(self, agent_id: str, *, ttl: int) -> dict[str, Any]:
        return await self._call("POST", f"/v1/agents/{agent_id}/enroll-token", body={"ttl": ttl})

    async def revoke(self, agent_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/agents/{agent_id}/revoke", body={})

    async def forwards(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/v1/forwards"))["forwards"])

    async def forward(
        self, forward_id: str, *, after: int = 0, wait: float = 0.0
    ) -> dict[str, Any]:
        """One forward; with ``wait``, once a connection numbered above ``after`` has ended."""
        payload = await self._call(
            "GET",
            f"/v1/forwards/{forward_id}",
            params={"after": str(after), "wait": str(wait)},
            wait=wait,
        )
        return dict(payload["forward"])

    async def stop_forward(self, forward_id: str) -> dict[str, Any]:
        return dict((await self._call("DELETE", f"/v1/forwards/{forward_id}", body={}))["forward"])


def describe(command: dict[str, Any], *, samples: int = 3) -> str:
    """One readable line for a command record."""
    params = json.dumps(command.get("params"), sort_keys=True, separators=(",", ":"))
    head = f"{command['ref']}  {command.get('type')} {params}  -> {command['state']}"
    if command.get("reason"):
        head += f" ({command['reason']}: {command.get('detail')})"
    result = command.get("result") or {}
    if command["state"] == "succeeded" and isinstance(result, dict):
        if "samples" in result:
            found = result["samples"]
            head += f"; {len(found)} samples"
            shown = [
                f"{s['name']}{_labels(s.get('labels'))}={s['value']}"
                for s in found
                if s.get("name", "").startswith(("demo_workload_info", "host_cpu", "host_memory"))
            ][:samples]
            if shown:
                head += ", e.g. " + ", ".join(shown)
        elif result:
            head += "; " + json.dumps(result, sort_keys=True, separators=(",", ":"))
    return head


def _labels(labels: object) -> str:
    if not isinstance(labels, dict) or not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
