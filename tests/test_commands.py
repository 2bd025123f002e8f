"""Tests of command parsing (agent.core.commands): typed commands out, strict parameters."""

from __future__ import annotations

from typing import Any

import pytest

from agent.core.commands import (
    COMMAND_TYPES,
    DEFAULT_METRICS_TARGETS,
    MAX_REPLICAS,
    CollectMetrics,
    Command,
    OpenStream,
    Scale,
    UpdateAgent,
    Upgrade,
    parse_command,
)
from agent.core.errors import CommandRejected


def rejection(cmd: object) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        parse_command(cmd)
    return info.value


# -- each type ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        ({"type": "scale", "params": {"replicas": 3}}, Scale(replicas=3)),
        ({"type": "scale", "params": {"replicas": 0}}, Scale(replicas=0)),
        ({"type": "scale", "params": {"replicas": MAX_REPLICAS}}, Scale(replicas=MAX_REPLICAS)),
        ({"type": "upgrade", "params": {"version": "2.0.0"}}, Upgrade(version="2.0.0")),
        (
            {"type": "upgrade", "params": {"version": "1.2.3-rc.1+build_7"}},
            Upgrade(version="1.2.3-rc.1+build_7"),
        ),
        (
            {"type": "upgrade", "params": {"version": "v" + "1" * 63}},
            Upgrade(version="v" + "1" * 63),
        ),
        (
            {"type": "collect_metrics", "params": {"targets": ["host"]}},
            CollectMetrics(targets=("host",)),
        ),
        (
            {"type": "collect_metrics", "params": {"targets": ["workload", "host", "db_2"]}},
            CollectMetrics(targets=("workload", "host", "db_2")),
        ),
    ],
)
def test_parse_each_type(cmd: dict[str, Any], expected: Command) -> None:
    command = parse_command(cmd)
    assert command == expected
    assert type(command) is type(expected)
    assert cmd["params"] == command.params()


def test_command_type_names_and_mutating_flags() -> None:
    assert COMMAND_TYPES == ("scale", "upgrade", "collect_metrics", "open_stream", "update_agent")
    assert (
        Scale.type,
        Upgrade.type,
        CollectMetrics.type,
        OpenStream.type,
        UpdateAgent.type,
    ) == COMMAND_TYPES
    assert UpdateAgent.mutating is True
    assert OpenStream.mutating is False
    assert Scale.mutating is True
    assert Upgrade.mutating is True
    assert CollectMetrics.mutating is False


def test_collect_metrics_default_targets_without_params() -> None:
    command = parse_command({"type": "collect_metrics"})
    assert command == CollectMetrics(targets=("workload", "host"))
    assert DEFAULT_METRICS_TARGETS == ("workload", "host")


def test_collect_metrics_default_targets_with_empty_params() -> None:
    command = parse_command({"type": "collect_metrics", "params": {}})
    assert command == CollectMetrics(targets=DEFAULT_METRICS_TARGETS)
    assert command.params() == {"targets": ["workload", "host"]}


def test_collect_metrics_target_order_kept() -> None:
    command = parse_command(
        {"type": "collect_metrics", "params": {"targets": ["host", "workload"]}}
    )
    assert command == CollectMetrics(targets=("host", "workload"))


def test_collect_metrics_eight_targets_accepted() -> None:
    targets = [f"t{i}" for i in range(8)]
    command = parse_command({"type": "collect_metrics", "params": {"targets": targets}})
    assert command == CollectMetrics(targets=tuple(targets))


# -- strictness -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cmd",
    [
        {"type": "scale", "params": {"replicas": 1, "force": True}},
        {"type": "upgrade", "params": {"version": "1.0.0", "rollback": False}},
        {"type": "collect_metrics", "params": {"targets": ["host"], "extra": 1}},
        {"type": "collect_metrics", "params": {"target": ["host"]}},
    ],
)
def test_unknown_parameter_keys(cmd: dict[str, Any]) -> None:
    error = rejection(cmd)
    assert error.code == "invalid_params"
    assert "unknown parameter" in error.detail


@pytest.mark.parametrize("replicas", [True, False, 1.0, 3.5, "3", None, [3], {"n": 3}])
def test_scale_replicas_must_be_an_integer(replicas: object) -> None:
    error = rejection({"type": "scale", "params": {"replicas": replicas}})
    assert error.code == "invalid_params"
    assert "integer" in error.detail


@pytest.mark.parametrize("replicas", [-1, MAX_REPLICAS + 1, 2**63, -(2**63)])
def test_scale_replicas_out_of_range(replicas: int) -> None:
    error = rejection({"type": "scale", "params": {"replicas": replicas}})
    assert error.code == "invalid_params"
    assert f"0..{MAX_REPLICAS}" in error.detail


@pytest.mark.parametrize("params", [{}, None])
def test_scale_missing_replicas(params: dict[str, Any] | None) -> None:
    cmd: dict[str, Any] = {"type": "scale"}
    if params is not None:
        cmd["params"] = params
    error = rejection(cmd)
    assert error.code == "invalid_params"
    assert "replicas" in error.detail


@pytest.mark.parametrize(
    "version",
    [
        "",
        "-1.0",
        ".1",
        "+1",
        "1.0 ",
        " 1.0",
        "1/0",
        "1.0\n",
        "v" + "1" * 64,
        "é",
        1,
        None,
        True,
        ["1.0.0"],
    ],
)
def test_upgrade_bad_version(version: object) -> None:
    error = rejection({"type": "upgrade", "params": {"version": version}})
    assert error.code == "invalid_params"
    assert "version" in error.detail


def test_upgrade_missing_version() -> None:
    assert rejection({"type": "upgrade", "params": {}}).code == "invalid_params"
    assert rejection({"type": "upgrade"}).code == "invalid_params"


@pytest.mark.parametrize(
    "target",
    ["", "Host", "1host", "_host", "host-1", "host.x", "h" * 33, "host\n", 5, None, ["host"]],
)
def test_collect_metrics_bad_target(target: object) -> None:
    error = rejection({"type": "collect_metrics", "params": {"targets": [target]}})
    assert error.code == "invalid_params"
    assert "target must match" in error.detail


def test_collect_metrics_longest_target_accepted() -> None:
    target = "h" * 32
    assert parse_command(
        {"type": "collect_metrics", "params": {"targets": [target]}}
    ) == CollectMetrics(targets=(target,))


@pytest.mark.parametrize(
    "targets", [[], [f"t{i}" for i in range(9)], "host", {"host": True}, None, ("host",)]
)
def test_collect_metrics_targets_list_shape(targets: object) -> None:
    error = rejection({"type": "collect_metrics", "params": {"targets": targets}})
    assert error.code == "invalid_params"
    assert "list of 1..8" in error.detail


def test_collect_metrics_duplicate_target() -> None:
    error = rejection(
        {"type": "collect_metrics", "params": {"targets": ["host", "workload", "host"]}}
    )
    assert error.code == "invalid_params"
    assert "duplicate target 'host'" in error.detail


@pytest.mark.parametrize("kind", ["reboot", "Scale", "SCALE", "", "scale ", "exec"])
def test_unknown_command_type(kind: str) -> None:
    error = rejection({"type": kind, "params": {}})
    assert error.code == "unknown_command_type"


def test_unknown_command_type_detail_is_clipped() -> None:
    error = rejection({"type": "x" * 1000})
    assert error.code == "unknown_command_type"
    assert len(error.detail) < 200


@pytest.mark.parametrize("cmd", [None, "scale", 3, ["scale"], ("scale", {})])
def test_cmd_must_be_an_object(cmd: object) -> None:
    assert rejection(cmd).code == "invalid_params"


@pytest.mark.parametrize("kind", [None, 1, True, ["scale"], {"name": "scale"}])
def test_cmd_type_must_be_a_string(kind: object) -> None:
    error = rejection({"type": kind, "params": {"replicas": 1}})
    assert error.code == "invalid_params"
    assert "cmd.type" in error.detail


def test_missing_type() -> None:
    assert rejection({"params": {"replicas": 1}}).code == "invalid_params"


@pytest.mark.parametrize("params", [[], "replicas=1", 1, None, [("replicas", 1)]])
def test_params_must_be_an_object(params: object) -> None:
    error = rejection({"type": "scale", "params": params})
    assert error.code == "invalid_params"
    assert "cmd.params" in error.detail


def test_unknown_member_of_cmd_is_refused() -> None:
    with pytest.raises(CommandRejected) as info:
        parse_command({"type": "scale", "params": {"replicas": 1}, "force": True})
    assert info.value.code == "invalid_params"
    assert "force" in info.value.detail
