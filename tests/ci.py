"""What a test does when a tool or kernel feature it needs is missing: skip on a developer's
machine, fail under ``CI=true`` (``.ci/run`` installs everything the tests need)."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail under ``CI=true``."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (.ci/run provides it)", pytrace=False)
    pytest.skip(reason)


def tool(name: str, install: str) -> str:
    """The path of a program, or :func:`unavailable` saying how to install it."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed ({install})")
    return path
