"""The command lifecycle as a state machine (agent/core/lifecycle.py), driven with tokens, times
and policies as arguments: no event loop, no disk. Each test reads the effects it gets back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.commands import Scale
from agent.core.errors import CommandRejected
from agent.core.lifecycle import (
    TRANSITIONS,
    Arm,
    Audit,
    CommandRow,
    CommandState,
    Delivered,
    Disarm,
    Effects,
    Enqueue,
    Execute,
    Known,
    Lifecycle,
    LifecycleError,
    Limits,
    Operator,
    Report,
    Save,
    StatusReport,
    Step,
)
from agent.core.policy import Policy
from agent.core.verifier import (
    COMMAND_TYP,
    CommandVerifier,
    TrustedKeys,
    VerifierSettings,
    jwk_thumbprint,
)

NOW = 1_800_000_000.0
AGENT = "agent-1"
KEY = Ed25519PrivateKey.generate()
ALLOW = Policy.from_toml(
    b"version = 1\n[scale]\nmax_replicas = 6\napproval_above = 4\n"
    b"[collect_metrics]\n[approvals]\nusers = ['alice']\n"
)
DENY_ALL = Policy.from_toml(b"version = 1\n")
ALICE = Operator(user="alice", uid=1001, pid=42, via="unix:/run/x")
MALLORY = Operator(user="mallory", uid=1002, pid=43, via="unix:/run/x")


def token(jti: str, cmd: Mapping[str, Any], *, lifetime: float = 300, now: float = NOW) -> str:
    claims = {
        "iss": "cp",
        "aud": AGENT,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "jti": jti,
        "cmd": dict(cmd),
    }
    headers = {"typ": COMMAND_TYP, "kid": jwk_thumbprint(KEY.public_key())}
    return jwt.encode(claims, KEY, algorithm="EdDSA", headers=headers)


def scale(n: int) -> dict[str, object]:
    return {"type": "scale", "params": {"replicas": n}}


def lifecycle(*, continues: frozenset[str] = frozenset(), **limits: Any) -> Lifecycle:
    verifier = CommandVerifier(
        TrustedKeys.of([KEY.public_key()]),
        VerifierSettings(audience=AGENT, issuers=frozenset({"cp"})),
    )
    return Lifecycle(verifier, limits=Limits(**limits), agent_uid=999, continues=continues)


def deliver(
    machine: Lifecycle,
    jti: str,
    cmd: Mapping[str, Any],
    *,
    policy: Policy = ALLOW,
    known: Known | None = None,
    now: float = NOW,
    ref: str | None = None,
) -> Delivered:
    return machine.deliver(
        ref or jti,
        token(jti, cmd, now=now),
        now=now,
        mono=now,
        policy=policy,
        known=known or Known(),
    )


def events(fx: Effects) -> list[str]:
    return [effect.event for effect in fx.of(Audit)]


def reported(fx: Effects) -> list[str]:
    out = []
    for effect in fx.of(Report):
        report = effect.report
        out.append(
            report.state.value if isinstance(report, StatusReport) else f"refused:{report.reason}"
        )
    return out


# -- the table ------------------------------------------------------------------------------------


def test_nothing_leaves_a_final_state() -> None:
    for (state, _step), _target in TRANSITIONS.items():
        assert state is None or not state.final
    machine = lifecycle()
    with pytest.raises(LifecycleError):
        machine._next(CommandState.SUCCEEDED, Step.STARTED)


def test_every_state_is_reachable_and_every_final_state_is_reached() -> None:
    reached = {target for target in TRANSITIONS.values()}
    assert reached == set(CommandState)


# -- delivery -------------------------------------------------------------------------------------


def test_an_allowed_command_is_accepted_saved_reported_and_queued() -> None:
    machine = lifecycle()
    delivered = deliver(machine, "j-1", scale(3))
    fx = delivered.effects
    assert delivered.accepted
    assert events(fx) == ["command_received", "command_verification", "policy_decision"]
    assert reported(fx) == ["received"]
    assert fx.of(Enqueue) == [Enqueue("j-1", mutating=True)]
    (save,) = fx.of(Save)
    assert save.row.state is CommandState.RECEIVED
    assert machine.get("j-1") == save.row


def test_begin_starts_it_and_finish_ends_it() -> None:
    machine = lifecycle()
    deliver(machine, "j-1", scale(3))
    started = machine.begin("j-1", now=NOW + 1, policy=ALLOW)
    assert events(started) == ["execution_started"]  # same policy: no second decision
    assert reported(started) == ["running"]
    assert started.of(Execute) == [Execute("j-1", Scale(replicas=3))]
    done = machine.finish("j-1", succeeded=True, now=NOW + 2, duration_ms=5, result={"replicas": 3})
    assert events(done) == ["execution_finished"]
    assert reported(done) == ["succeeded"]
    assert machine.get("j-1") is None  # final: out of memory (the store keeps it)
    assert len(machine) == 0
    assert machine.outcomes[("scale", "succeeded")] == 1


def test_a_refused_delivery_reports_its_reason_and_no_state() -> None:
    machine = lifecycle()
    forged = Ed25519PrivateKey.generate()
    bad = jwt.encode(
        {"iss": "cp", "aud": AGENT, "iat": NOW, "nbf": NOW, "exp": NOW + 300, "jti": "j-x",
         "cmd": scale(1)},
        forged,
        algorithm="EdDSA",
        headers={"typ": COMMAND_TYP, "kid": jwk_thumbprint(KEY.public_key())},
    )  # fmt: skip
    delivered = machine.deliver("r-x", bad, now=NOW, mono=NOW, policy=ALLOW, known=Known())
    assert delivered.refusal == "bad_signature"
    assert reported(delivered.effects) == ["refused:bad_signature"]
    assert delivered.effects.of(Save) == []
    assert machine.refusals["bad_signature"] == 1


@pytest.mark.parametrize(
    ("known", "refusal"),
    [
        (Known(by_jti=None, by_ref=None, horizon=NOW + 301), "expired"),
        (Known(by_ref=None), None),
    ],
)
def test_the_replay_cache_horizon(known: Known, refusal: str | None) -> None:
    assert deliver(lifecycle(), "j-1", scale(1), known=known).refusal == refusal


def test_replays_and_redeliveries_are_told_apart() -> None:
    machine = lifecycle()
    first = deliver(machine, "j-1", scale(1), ref="r-1")
    (saved,) = first.effects.of(Save)
    again = deliver(
        machine, "j-1", scale(1), ref="r-1", known=Known(by_jti=saved.row, by_ref=saved.row)
    )
    assert again.refusal == "duplicate_delivery"
    replay = deliver(machine, "j-1", scale(1), ref="r-2", known=Known(by_jti=saved.row))
    assert replay.refusal == "replayed"
    other = deliver(machine, "j-2", scale(2), ref="r-1", known=Known(by_ref=saved.row))
    assert other.refusal == "ref_reused"


def test_busy_and_stopping_and_rate() -> None:
    machine = lifecycle(max_pending=1, rate=1.0, burst=2)
    assert deliver(machine, "j-1", scale(1)).accepted
    assert deliver(machine, "j-2", scale(1)).refusal == "busy"
    assert deliver(machine, "j-3", scale(1)).refusal == "rate_limited"  # the burst is spent
    machine.stopping = True
    assert deliver(machine, "j-4", scale(1), now=NOW + 60).refusal == "shutting_down"


def test_unknown_type_and_invalid_params_are_rejected_after_acceptance() -> None:
    machine = lifecycle()
    unknown = deliver(machine, "j-1", {"type": "reboot", "params": {}})
    assert reported(unknown.effects) == ["received", "rejected"]
    invalid = deliver(machine, "j-2", {"type": "scale", "params": {"replicas": -1}})
    assert reported(invalid.effects) == ["received", "rejected"]
    assert len(machine) == 0


def test_policy_denial_at_arrival_and_before_start() -> None:
    machine = lifecycle()
    denied = deliver(machine, "j-1", scale(9))  # above max_replicas
    assert reported(denied.effects) == ["received", "rejected"]
    assert deliver(machine, "j-2", scale(3)).accepted
    tightened = machine.begin("j-2", now=NOW + 1, policy=DENY_ALL)
    assert events(tightened) == ["policy_decision", "command_rejected"]
    assert reported(tightened) == ["rejected"]
    assert tightened.of(Execute) == []


def test_expired_before_start() -> None:
    machine = lifecycle()
    deliver(machine, "j-1", scale(3))
    late = machine.begin("j-1", now=NOW + 300 + 61, policy=ALLOW)
    assert reported(late) == ["rejected"]
    assert [a.fields.get("reason") for a in late.of(Audit)] == ["expired_before_start"]


# -- approvals ------------------------------------------------------------------------------------


def test_approval_required_then_granted_then_started() -> None:
    machine = lifecycle()
    delivered = deliver(machine, "j-1", scale(5))  # above approval_above
    assert reported(delivered.effects) == ["received", "pending_approval"]
    assert delivered.effects.of(Arm) == [Arm("j-1", NOW + 300)]
    assert [row.jti for row in machine.pending_approvals()] == ["j-1"]
    nothing = machine.begin("j-1", now=NOW, policy=ALLOW)
    assert nothing.items == []  # not approved: it cannot start
    fx = Effects()
    row = machine.approve("j-1", ALICE, note="CR-1", now=NOW + 1, policy=ALLOW, fx=fx)
    assert row.approved_by == "alice"
    assert events(fx) == ["approval_granted"]
    assert fx.of(Disarm) == [Disarm("j-1")]
    assert fx.of(Enqueue) == [Enqueue("j-1", mutating=True)]
    started = machine.begin("j-1", now=NOW + 2, policy=ALLOW)
    assert reported(started) == ["running"]


def test_an_operator_outside_the_policy_is_refused_and_audited() -> None:
    machine = lifecycle()
    deliver(machine, "j-1", scale(5))
    fx = Effects()
    with pytest.raises(CommandRejected) as info:
        machine.approve("j-1", MALLORY, note=None, now=NOW, policy=ALLOW, fx=fx)
    assert info.value.code == "not_authorized"
    assert events(fx) == ["approval_refused"]
    assert machine.get("j-1") is not None  # still pending


def test_deny_and_expiry() -> None:
    machine = lifecycle()
    deliver(machine, "j-1", scale(5))
    deliver(machine, "j-2", scale(5))
    fx = Effects()
    machine.deny("j-1", ALICE, note="not now", now=NOW, policy=ALLOW, fx=fx)
    assert events(fx) == ["approval_denied", "command_rejected"]
    assert reported(fx) == ["rejected"]
    expired = machine.expire("j-2", now=NOW + 300)
    assert events(expired) == ["approval_expired", "command_rejected"]
    assert machine.expire("j-2", now=NOW + 301).items == []  # gone: the timer is harmless
    with pytest.raises(CommandRejected) as info:
        machine.approve("j-2", ALICE, note=None, now=NOW, policy=ALLOW, fx=Effects())
    assert info.value.code == "unknown_command"


# -- restart --------------------------------------------------------------------------------------


def row(jti: str, state: CommandState, **fields: Any) -> CommandRow:
    values: dict[str, Any] = {
        "jti": jti,
        "ref": jti,
        "iss": "cp",
        "kid": "k",
        "type": "scale",
        "params": {"replicas": 3},
        "iat": NOW,
        "exp": NOW + 300,
        "token_sha256": "00" * 32,
        "state": state,
        "received_at": NOW,
        "updated_at": NOW,
    } | fields
    return CommandRow(**values)


def test_recovery_tells_what_was_cut_off_from_what_never_acted() -> None:
    machine = lifecycle()
    fx = machine.recover(
        [
            row("acted", CommandState.RUNNING, acted=True),
            row("never", CommandState.RUNNING, acted=False),
            row("queued", CommandState.RECEIVED),
            row("waiting", CommandState.PENDING_APPROVAL, params={"replicas": 5}),
            row(
                "approved",
                CommandState.PENDING_APPROVAL,
                approved_by="alice",
                params={"replicas": 5},
            ),
        ],
        now=NOW + 10,
        policy=ALLOW,
    )
    by_jti: dict[str, list[str]] = {}
    for effect in fx.of(Audit):
        by_jti.setdefault(str(effect.fields["jti"]), []).append(effect.event)
    assert by_jti["acted"] == ["command_interrupted"]
    assert by_jti["never"] == ["command_resumed"]
    assert [a.fields["never_acted"] for a in fx.of(Audit) if a.fields["jti"] == "never"] == [True]
    assert by_jti["queued"] == ["command_resumed", "policy_decision"]
    assert reported(fx) == ["interrupted"]  # nothing else changes state
    assert {e.jti for e in fx.of(Enqueue)} == {"never", "queued", "approved"}
    assert fx.of(Arm) == [Arm("waiting", NOW + 300)]
    # The one that never acted starts again without a second ``running`` report.
    again = machine.begin("never", now=NOW + 11, policy=ALLOW)
    assert reported(again) == []
    assert [e.command for e in again.of(Execute)] == [Scale(replicas=3)]
    assert events(again)[-1] == "execution_started"


def test_a_resumed_command_that_never_acted_may_still_be_refused() -> None:
    """It never touched the workload, so a policy tightened meanwhile refuses it; one that
    acted cannot be refused (it is interrupted instead)."""
    machine = lifecycle()
    machine.recover([row("never", CommandState.RUNNING)], now=NOW, policy=ALLOW)
    refused = machine.begin("never", now=NOW + 1, policy=DENY_ALL)
    assert reported(refused) == ["rejected"]
    machine.recover([row("acted", CommandState.RUNNING)], now=NOW, policy=ALLOW)
    machine.acted("acted", "replica_starting", {})
    with pytest.raises(LifecycleError, match="acted"):
        machine.begin("acted", now=NOW + 1, policy=DENY_ALL)


def test_a_row_that_no_longer_parses_is_rejected_at_restart_whatever_its_state() -> None:
    """A corrupt store (or a release that parses stricter) must not stop the agent from
    starting: each such row ends, as what it can be, instead of raising."""
    machine = lifecycle()
    bad = {"params": {"replicas": "many"}}
    fx = machine.recover(
        [
            row("received", CommandState.RECEIVED, **bad),
            row("waiting", CommandState.PENDING_APPROVAL, **bad),
            row("approved", CommandState.PENDING_APPROVAL, approved_by="alice", **bad),
            row("never", CommandState.RUNNING, **bad),
            row("acted", CommandState.RUNNING, acted=True, **bad),
        ],
        now=NOW,
        policy=ALLOW,
    )
    assert reported(fx) == ["rejected", "rejected", "rejected", "rejected", "interrupted"]
    assert len(machine) == 0


UPDATE: Final = {
    "type": "update_agent",
    "params": {"version": "0.2.0", "url": "https://r.example/a.bundle", "sha256": "ab" * 32},
}


def test_a_command_whose_restart_is_part_of_it_goes_on_after_the_restart() -> None:
    """update_agent: the agent exits so that the new release starts, and that release carries
    the command on, acted or not; once it acted, neither its expiry nor a policy changed
    meanwhile stops it (it is under way), and it reports no second ``running``."""
    machine = lifecycle(continues=frozenset({"update_agent"}))
    fx = machine.recover(
        [row("update", CommandState.RUNNING, acted=True, exp=NOW + 1, **UPDATE)],
        now=NOW + 600,
        policy=ALLOW,
    )
    assert [(a.event, a.fields["never_acted"]) for a in fx.of(Audit)] == [
        ("command_resumed", False)
    ]
    assert reported(fx) == []
    assert [e.jti for e in fx.of(Enqueue)] == ["update"]
    again = machine.begin("update", now=NOW + 601, policy=DENY_ALL)
    assert reported(again) == []
    assert events(again) == ["execution_started"]
    assert [e.command.type for e in again.of(Execute)] == ["update_agent"]
    # without the updater (a pod), it is cut off like any other acted command
    plain = lifecycle().recover(
        [row("update", CommandState.RUNNING, acted=True, **UPDATE)], now=NOW, policy=ALLOW
    )
    assert reported(plain) == ["interrupted"]


def test_acted_is_recorded_once() -> None:
    machine = lifecycle()
    deliver(machine, "j-1", scale(3))
    machine.begin("j-1", now=NOW, policy=ALLOW)
    first = machine.acted("j-1", "replica_starting", {"replica": 0})
    assert events(first) == ["replica_starting"]
    assert [save.row.acted for save in first.of(Save)] == [True]
    second = machine.acted("j-1", "replica_healthy", {"replica": 0})
    assert second.of(Save) == []


def test_commands_that_end_leave_nothing_in_memory() -> None:
    """/tmp/review3/decided_leak.py: every validly signed command the policy denied left an
    entry behind for good. Here nothing outlives its final state."""
    machine = lifecycle(rate=1e9, burst=10**9)
    for n in range(200):
        deliver(machine, f"denied-{n}", scale(1), policy=DENY_ALL)
    assert len(machine) == 0
    deliver(machine, "allowed", scale(1))
    machine.begin("allowed", now=NOW, policy=ALLOW)
    machine.finish("allowed", succeeded=True, now=NOW, duration_ms=1)
    assert len(machine) == 0


def test_a_result_that_cannot_be_recorded_fails_the_command() -> None:
    machine = lifecycle()
    deliver(machine, "j-1", scale(1))
    machine.begin("j-1", now=NOW, policy=ALLOW)
    fx = machine.finish("j-1", succeeded=True, now=NOW, duration_ms=1, result={"x": float("nan")})
    (report,) = [r.report for r in fx.of(Report)]
    assert isinstance(report, StatusReport)
    assert report.state is CommandState.SUCCEEDED
    assert report.result == {"x": "NaN"}  # made strict JSON, not refused
