"""Fetch a release bundle: httpx, one GET, no redirects, a size cap, hashed as it streams.

The URL was allowed by the customer's policy (``update_agent.sources``) before this runs; a
redirect would let whoever answers send the agent anywhere, so a 3xx is a failure of its own
(``redirect_refused``), never followed. A ``Content-Length`` above the cap is refused before
the body is read; a body that grows past it (no or a lying length) is cut off there.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

from agent.update.errors import BundleRejected, UpdateError

CHUNK: Final = 256 * 1024


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    size: int


async def download(
    client: httpx.AsyncClient, url: str, dest: Path, *, max_bytes: int
) -> Downloaded:
    """GET ``url`` into ``dest`` (created 0600). Raises UpdateError: ``redirect_refused``,
    ``download_failed`` or ``bundle_too_large``."""
    digest = hashlib.sha256()
    size = 0
    try:
        async with client.stream("GET", url, follow_redirects=False) as response:
            if response.is_redirect or 300 <= response.status_code < 400:
                location = response.headers.get("location", "")
                raise UpdateError(
                    "redirect_refused",
                    f"{url}: HTTP {response.status_code} redirect to {location[:200]!r}; "
                    "bundles are fetched from the allowed URL itself, redirects are never "
                    "followed",
                )
            if response.status_code != httpx.codes.OK:
                raise UpdateError("download_failed", f"{url}: HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise BundleRejected(
                    "bundle_too_large",
                    f"{url}: Content-Length {declared} is over the cap of {max_bytes} bytes "
                    "(update.max_bundle_bytes)",
                )
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                async for chunk in response.aiter_bytes(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise BundleRejected(
                            "bundle_too_large",
                            f"{url}: more than {max_bytes} bytes (update.max_bundle_bytes); "
                            "cut off",
                        )
                    digest.update(chunk)
                    out.write(chunk)
    except httpx.HTTPError as exc:
        raise UpdateError("download_failed", f"{url}: {type(exc).__name__}: {exc}") from exc
    return Downloaded(dest, digest.hexdigest(), size)
