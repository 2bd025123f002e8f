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
AWAITING_THE_LEAD: Final[dict[str, tuple[str, tuple[str, ...]]]] = {}
"""Call sites known to be wrong that are being rewritten (``{file: (source, names)}``), so that
``make test`` stays green meanwhile; the test fails once such a site is fixed, so that its
entry goes too. Empty: nothing is awaited."""


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


def _tables(tree: ast.Module) -> dict[str, tuple[str, ...]]:
    """Module-level dicts whose values are all literal strings (``EVENTS_OF = {...}``): a name
    looked up in one is still a name the checker can read."""
    found: dict[str, tuple[str, ...]] = {}
    for node in tree.body:
        target: ast.expr | None = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if isinstance(target, ast.Name) and isinstance(value, ast.Dict) and value.values:
            names = [v.value for v in value.values if isinstance(v, ast.Constant)]
            if len(names) == len(value.values) and all(isinstance(n, str) for n in names):
                found[target.id] = tuple(str(n) for n in names)
    return found


def _literals(node: ast.expr, tables: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,)
    if isinstance(node, ast.IfExp):
        body, orelse = _literals(node.body, tables), _literals(node.orelse, tables)
        return (*body, *orelse) if body and orelse else ()
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        return tables.get(node.value.id, ())
    if (  # TABLE.get(key, "literal")
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in tables
        and len(node.args) == 2
    ):
        default = _literals(node.args[1], tables)
        return (*tables[node.func.value.id], *default) if default else ()
    return ()


def logging_calls(root: Path = AGENT) -> Iterator[Call]:
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        tables = _tables(tree)
        for node in ast.walk(tree):
            name = _event_argument(node)
            if name is not None:
                yield Call(f"{relative}:{name.lineno}", _literals(name, tables), ast.unparse(name))


def _event_argument(node: ast.AST) -> ast.expr | None:
    """The event-name argument of a logging call: ``log.<level>(name, ...)``, or of the sans-I/O
    core's log lines that the I/O layer writes: ``fx.note(level, name, ...)`` and
    ``TrustRecord(name, ...)``."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Name) and func.id == "TrustRecord" and node.args:
        return node.args[0]
    if not isinstance(func, ast.Attribute):
        return None
    if func.attr == "note" and len(node.args) >= 2:
        return node.args[1]
    if func.attr in LEVELS and node.args and "log" in _receiver(func.value).lower():
        return node.args[0]
    return None


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
        "    log.error(EVENT_OF.get(op, 'c'))\n"
        "    log.error(EVENT_OF[op])\n"
        "    log.error(MIXED.get(op, 'c'))\n"
        "EVENT_OF: Final = {'x': 'd', 'y': 'e'}\n"
        "MIXED = {'x': 'f', 'y': op}\n"
        "def g(fx):\n"
        "    fx.note('info', 'noted', jti=1)\n"
        "    return TrustRecord('trusted', {}, level='warning')\n"
    )
    found = [(call.where, call.names, call.source) for call in logging_calls(package)]
    assert found == [
        ("agent/sample.py:2", ("connected",), "'connected'"),
        ("agent/sample.py:3", ("a", "b"), "'a' if ok else 'b'"),
        ("agent/sample.py:4", (), "f'command_{op}d'"),
        ("agent/sample.py:7", ("d", "e", "c"), "EVENT_OF.get(op, 'c')"),
        ("agent/sample.py:8", ("d", "e"), "EVENT_OF[op]"),
        ("agent/sample.py:9", (), "MIXED.get(op, 'c')"),
        ("agent/sample.py:13", ("noted",), "'noted'"),
        ("agent/sample.py:14", ("trusted",), "'trusted'"),
    ]


def problems(
    calls: list[Call],
    awaiting: dict[str, tuple[str, tuple[str, ...]]] = AWAITING_THE_LEAD,
) -> list[str]:
    """What is wrong with these logging calls: unlisted names, computed names (except the
    ones awaited), and awaited sites that were fixed meanwhile."""
    awaited = {(where, source) for where, (source, _) in awaiting.items()}
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
        Call("agent/y.py:4", (), "f'other_{n}'"),
    ]
    awaiting = {
        "agent/daemon.py": ("f'command_{op}d'", ("command_approved", "command_denied")),
        "agent/y.py": ("f'other_{n}'", ("other_a",)),
    }
    assert problems(calls, awaiting) == [
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
