"""Every event the agent logs is named in one list, :data:`agent.log_events.EVENTS`.

The code is read, not run: every call ``<logger>.<level>("event", ...)`` in ``agent/`` (a
receiver whose name says it is a logger: ``log``, ``self._log``, ``ctx.log``, ``logger`` ...),
including ``"a" if x else "b"``, must name a listed event; a name built at run time
(``f"command_{op}d"``, which wrote ``command_denyd``) is an error, since no list can check it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.log_events import EVENTS

AGENT: Final = Path(__file__).resolve().parent.parent / "agent"
LEVELS: Final = frozenset(
    {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "msg"}
)
AWAITING_THE_LEAD: Final = {
    "agent/daemon.py": ("f'command_{op}d'", ("command_approved", "command_denied"))
}
"""Call sites known to be wrong, in files the lead is rewriting (issue 12): the name is built
at run time and one of the two is misspelt (``command_denyd``). Listed so that ``make test``
stays green meanwhile; the test fails once the site is fixed, so that this entry goes too."""


@dataclass(frozen=True)
class Call:
    where: str
    names: tuple[str, ...]
    """The literal names it can log; empty when the name is computed."""
    source: str


def _receiver(node: ast.expr) -> str:
    while isinstance(node, ast.Attribute):
        if "log" in node.attr.lower():
            return node.attr
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _literals(node: ast.expr) -> tuple[str, ...]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,)
    if isinstance(node, ast.IfExp):
        body, orelse = _literals(node.body), _literals(node.orelse)
        return (*body, *orelse) if body and orelse else ()
    return ()


def logging_calls(root: Path = AGENT) -> Iterator[Call]:
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and node.args
                and "log" in _receiver(node.func.value).lower()
            ):
                continue
            yield Call(
                f"{relative}:{node.lineno}", _literals(node.args[0]), ast.unparse(node.args[0])
            )


def test_the_reader_finds_literal_conditional_and_computed_names(tmp_path: Path) -> None:
    """The checker itself, on a sample: what it must find, and what it must leave alone."""
    package = tmp_path / "agent"
    package.mkdir()
    (package / "sample.py").write_text(
        "def f(log, self, ctx, op, ok):\n"
        "    log.info('connected', url=1)\n"
        "    self._log.warning('a' if ok else 'b')\n"
        "    ctx.log.error(f'command_{op}d')\n"
        "    self.error('not a logger')\n"
        "    parser.error('neither')\n"
    )
    found = [(call.where, call.names, call.source) for call in logging_calls(package)]
    assert found == [
        ("agent/sample.py:2", ("connected",), "'connected'"),
        ("agent/sample.py:3", ("a", "b"), "'a' if ok else 'b'"),
        ("agent/sample.py:4", (), "f'command_{op}d'"),
    ]


def problems(calls: list[Call]) -> list[str]:
    """What is wrong with these logging calls: unlisted names, computed names (except the
    ones awaiting the lead), and awaited sites that were fixed meanwhile."""
    awaited = {(where, source) for where, (source, _) in AWAITING_THE_LEAD.items()}
    found = [
        f"{call.where}: {name!r} is not in agent/log_events.py"
        for call in calls
        for name in call.names
        if name not in EVENTS
    ]
    computed = {(call.where.rsplit(":", 1)[0], call.source) for call in calls if not call.names}
    found += [
        f"{call.where}: {call.source} is computed (log a literal name, listed)"
        for call in calls
        if not call.names and (call.where.rsplit(":", 1)[0], call.source) not in awaited
    ]
    found += [f"{site}: fixed, remove it from AWAITING_THE_LEAD" for site in awaited - computed]
    return found


def test_a_misspelt_or_computed_name_is_reported() -> None:
    calls = [
        Call("agent/io/tunnel.py:1", ("connected",), "'connected'"),
        Call("agent/x.py:2", ("command_denyd",), "'command_denyd'"),
        Call("agent/x.py:3", (), "f'event_{n}'"),
    ]
    assert problems(calls) == [
        "agent/x.py:2: 'command_denyd' is not in agent/log_events.py",
        "agent/x.py:3: f'event_{n}' is computed (log a literal name, listed)",
        # the awaited site is not among these calls: as if it had been fixed
        "('agent/daemon.py', \"f'command_{op}d'\"): fixed, remove it from AWAITING_THE_LEAD",
    ]


def test_every_logged_event_is_in_the_list() -> None:
    calls = list(logging_calls())
    assert len(calls) > 50  # the reader sees the agent's logging (a guard against a blind spot)
    assert problems(calls) == []


def test_every_listed_event_is_logged_somewhere() -> None:
    logged = {name for call in logging_calls() for name in call.names}
    expected = {name for _, names in AWAITING_THE_LEAD.values() for name in names}
    assert sorted(set(EVENTS) - logged - expected) == []
    assert all(meaning and not meaning.endswith(".") for meaning in EVENTS.values())
