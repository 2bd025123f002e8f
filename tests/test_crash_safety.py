"""Kill anything at any time, lose nothing, run nothing twice.

The agent (``byoc-agent run``, journal driver) and the stub control plane (``cp-stub serve``) run
as real processes. A stream of commands goes in through the stub's operator API while both are
killed with SIGKILL, several times each, at random points of the stream, and restarted after a
random downtime on the same ports with the same state and database files. Afterwards every
command must have exactly one final state, nothing may have executed twice (counted in the
journal driver's own fsync'd file, not in the agent's database), and the audit log must verify.

Randomness is seeded: the seed is printed, and ``BYOC_CRASH_SEED=<n>`` replays a schedule (the
kill points and the commands; process timing is the machine's). Figures are printed (``pytest
-s``) and written to ``summary.json`` in the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

from certs.pki import PKIPaths
from control_plane_stub.client import StubClient
from control_plane_stub.errors import ApiError
from tests.conftest import scaled
from tests.processes import (
    ChildProcess,
    Planned,
    agent_process,
    check_invariants,
    free_port,
    plan_commands,
    stub_process,
    write_journal_agent,
)

SEED_ENV: Final = "BYOC_CRASH_SEED"
AGENT: Final = "agent-1"
COMMANDS: Final = 320
AGENT_KILLS: Final = 5
STUB_KILLS: Final = 5
BOTH_KILLS: Final = 1
"""Kill events: agent alone, stub alone, both at once (each of them then dies 6 times)."""
JOURNAL_DELAY: Final = 0.03
"""Seconds each command takes in the journal driver, so that a kill can land inside one."""

T = TypeVar("T")


async def until_answered(
    call: Callable[[], Awaitable[T]], *, within: float, check: Callable[[], None] = lambda: None
) -> T:
    """Call the stub's API until it answers: it may be dead or restarting meanwhile. ``check``
    raises if waiting is pointless (a process that should be starting has died)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await call()
        except ApiError as exc:
            if exc.status != 0 or loop.time() > deadline:
                raise
        check()
        await asyncio.sleep(0.05)  # polling a process that is starting: there is no event


class Submitter:
    """Submits the plan one command at a time, at a random pace, through a stub that may die.

    "Accepted work" is a command the stub has stored. A 201 means stored. A request that failed
    without an answer (connection refused or reset: the stub died) may or may not have been
    stored, so before sending it again the submitter lists the agent's commands at the stub:
    a command it does not know yet is that very submission (one at a time, so at most one can
    be unknown), and is adopted instead of sent twice. The final check also requires the stub
    to hold no command beyond the ones submitted here."""

    def __init__(self, api: StubClient, rng: random.Random) -> None:
        self.api = api
        self.rng = rng
        self.submitted: dict[str, str] = {}
        """ref -> jti, in submission order."""
        self.adopted = 0
        """Submissions whose answer was lost although the stub had stored them."""
        self.resent = 0
        """Submissions lost before the stub stored them, sent again."""
        self.progress = asyncio.Event()
        self.sending = asyncio.Event()
        """Set while a submission is on its way (the stub may be storing it right now)."""
        self.done = asyncio.Event()

    async def run(self, plan: list[Planned]) -> None:
        for planned in plan:
            await asyncio.sleep(self.rng.uniform(0.02, 0.16))  # the pace of the stream
            record = await self._submit(planned)
            self.submitted[str(record["ref"])] = str(record["jti"])
            self.progress.set()
        self.done.set()

    async def _submit(self, planned: Planned) -> dict[str, Any]:
        while True:
            self.sending.set()
            try:
                return await self.api.send(AGENT, planned.type, planned.params)
            except ApiError as exc:
                if exc.status != 0:
                    raise  # the stub answered and refused: not a crash effect
            finally:
                self.sending.clear()
            adopted = await self._reconcile(planned)
            if adopted is not None:
                self.adopted += 1
                return adopted
            self.resent += 1

    async def _reconcile(self, planned: Planned) -> dict[str, Any] | None:
        listing = await until_answered(
            lambda: self.api.commands(agent_id=AGENT, limit=10_000), within=scaled(60)
        )
        unknown = [c for c in listing if c["ref"] not in self.submitted]
        assert len(unknown) <= 1, f"the stub holds commands never submitted: {unknown}"
        if not unknown:
            return None
        command = unknown[0]
        assert (command["type"], command["params"]) == (planned.type, planned.params)
        return command

    async def wait_submitted(self, count: int) -> None:
        while len(self.submitted) < count:
            self.progress.clear()
            await self.progress.wait()

    async def wait_sending(self) -> bool:
        """Until a submission is on its way (True), or all of them were made (False)."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self.sending, self.done)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self.sending.is_set()


class Chaos:
    """Kills the agent, the stub or both at seeded points of the stream, and restarts them."""

    def __init__(
        self,
        *,
        rng: random.Random,
        api: StubClient,
        stub: ChildProcess,
        agent: ChildProcess,
        submitter: Submitter,
    ) -> None:
        self.rng = rng
        self.api = api
        self.stub = stub
        self.agent = agent
        self.submitter = submitter
        self.events: list[dict[str, object]] = []
        self._agent_since = 0.0

    def schedule(self, commands: int) -> list[tuple[int, str]]:
        targets = ["agent"] * AGENT_KILLS + ["stub"] * STUB_KILLS + ["both"] * BOTH_KILLS
        self.rng.shuffle(targets)
        # Kill points spread over the stream (not in its first or last few commands).
        points = sorted(self.rng.sample(range(15, commands - 15), len(targets)))
        return list(zip(points, targets, strict=True))

    def check_alive(self) -> None:
        """Only the test kills: a process that exited by itself is a failure (e.g. a crash at
        start-up), reported at once instead of after a time-out."""
        for process in (self.stub, self.agent):
            if process.popen is not None and (status := process.popen.poll()) is not None:
                raise AssertionError(f"{process.name} exited by itself with status {status}")

    async def wait_up(self) -> None:
        """Until the stub answers and the agent (since its last start) is connected to it."""
        while True:
            self.check_alive()
            agent = await until_answered(
                lambda: self.api.agent(AGENT, wait_connected=scaled(2)),
                within=scaled(60),
                check=self.check_alive,
            )
            since = agent.get("connected_since")
            if agent["connected"] and since is not None and float(since) >= self._agent_since:
                return

    def start_agent(self) -> None:
        self._agent_since = time.time()
        self.agent.start()

    async def run(self, schedule: list[tuple[int, str]]) -> None:
        for point, target in schedule:
            await self.submitter.wait_submitted(point)
            await asyncio.wait_for(self.wait_up(), scaled(60))
            await asyncio.sleep(self.rng.uniform(0.0, 0.6))  # a random moment, not a ready one
            mid_submission = False
            if target != "agent":
                # Aim at a submission in flight: the stub may die between storing a command
                # and answering, which is what the submitter must cope with.
                mid_submission = await self.submitter.wait_sending()
                await asyncio.sleep(self.rng.uniform(0.0, 0.005))
            victims = {"agent": [self.agent], "stub": [self.stub], "both": [self.agent, self.stub]}
            for process in victims[target]:
                await process.kill()
            downtime = self.rng.uniform(0.05, 1.0)
            self.events.append(
                {
                    "at_command": len(self.submitter.submitted),
                    "killed": target,
                    "mid_submission": mid_submission,
                    "down_s": round(downtime, 2),
                }
            )
            await asyncio.sleep(downtime)  # the outage itself
            if target in ("stub", "both"):
                self.stub.start()
            if target in ("agent", "both"):
                self.start_agent()
        await asyncio.wait_for(self.wait_up(), scaled(60))


async def test_sigkill_agent_and_stub_during_a_command_stream(
    tmp_path: Path, pki: PKIPaths, short_tmp: Path
) -> None:
    seed = int(os.environ.get(SEED_ENV) or secrets.randbits(32))
    print(f"\ncrash test seed: {seed} (replay with {SEED_ENV}={seed})")
    rng = random.Random(seed)
    started = time.monotonic()
    agent_port, api_port = free_port(), free_port()
    files = write_journal_agent(
        tmp_path / "agent", pki=pki, port=agent_port, run_dir=short_tmp, delay=JOURNAL_DELAY
    )
    stub = stub_process(
        pki,
        agent_port=agent_port,
        api_port=api_port,
        db=tmp_path / "stub.db",
        log=tmp_path / "stub.log",
    )
    agent = agent_process(files.config, log=tmp_path / "agent.log")
    try:
        async with StubClient(f"http://127.0.0.1:{api_port}", timeout=scaled(10)) as api:
            submitter = Submitter(api, rng)
            chaos = Chaos(rng=rng, api=api, stub=stub, agent=agent, submitter=submitter)
            plan = plan_commands(rng, COMMANDS)
            schedule = chaos.schedule(COMMANDS)
            stub.start()
            chaos.start_agent()
            await asyncio.wait_for(chaos.wait_up(), scaled(60))

            async with asyncio.timeout(scaled(150)), asyncio.TaskGroup() as group:
                group.create_task(submitter.run(plan))
                group.create_task(chaos.run(schedule))
            chaos_done = time.monotonic()

            # Every accepted command reaches a final state (the stub and the agent are up).
            async with asyncio.timeout(scaled(90)):
                for ref in submitter.submitted:
                    while True:
                        answer = await api.command(ref, wait_for="final", wait_seconds=scaled(5))
                        if not answer["timed_out"]:
                            break
                        chaos.check_alive()  # waiting on a dead process would be pointless
            settled = time.monotonic()

            assert await agent.stop() == 0  # a clean stop completes the audit log
            listing = await api.commands(agent_id=AGENT, limit=10_000)
            assert {c["ref"] for c in listing} == set(submitter.submitted)  # nothing counted twice
            report = await check_invariants(
                api,
                submitter.submitted,
                journal=files.journal,
                audit_log=files.audit_log,
                agent_db=files.state_dir / "agent.db",
            )
        assert await stub.stop() == 0
        summary = {
            "seed": seed,
            "commands": report.commands,
            "agent_kills": agent.kills,
            "stub_kills": stub.kills,
            "kill_events": chaos.events,
            "final_states": report.final_states,
            "duplicate_executions": report.duplicate_executions,
            "max_start_lines_per_jti": report.max_start_lines_per_jti,
            "interrupted_started_no_end": report.interrupted_started_no_end,
            "interrupted_after_end": report.interrupted_after_end,
            "interrupted_before_start_line": report.interrupted_before_start_line,
            "submissions_adopted_after_lost_answer": submitter.adopted,
            "submissions_resent": submitter.resent,
            "delivery_refusals": report.delivery_refusals,
            "audit_records": report.audit_records,
            "audit_tail_repairs": report.audit_tail_repairs,
            "journal_torn_lines": report.journal_torn_lines,
            "chaos_s": round(chaos_done - started, 1),
            "settle_s": round(settled - chaos_done, 1),
            "wall_s": round(time.monotonic() - started, 1),
        }
        (tmp_path / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        # The plan is all valid, allowed, long-lived commands: "rejected" would mean a delivery
        # was refused for good because of a fault, i.e. accepted work lost.
        assert report.final_states.get("rejected", 0) == 0, report.final_states
        assert agent.kills >= 4
        assert stub.kills >= 4
    except BaseException:
        print(f"crash test seed: {seed}")
        for process in (stub, agent):
            print(f"\n===== {process.name} log ({process.log}), last lines =====")
            print(process.tail())
        raise
    finally:
        agent.ensure_dead()
        stub.ensure_dead()
