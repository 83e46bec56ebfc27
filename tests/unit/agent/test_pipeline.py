"""The apply pipeline: all handlers or none, revert on failure, and recovery after a crash at
every step (the process dies: nothing in this process gets to clean up)."""

import asyncio
import json

import pytest

from agent.errors import ApplyError, InvalidConfig, PostApplyUnhealthy
from agent.handlers import (
    CONFIG_FILE,
    ENFORCED_POLICY_FILE,
    ENV_FILE,
    POLICIES_FILE,
    MemoryHandler,
    default_handlers,
)
from agent.pipeline import ApplyPipeline
from agent.state import AgentState
from protocol.messages import DesiredState
from tests.unit.agent.factories import desired_document

FILES = (CONFIG_FILE, POLICIES_FILE, ENV_FILE, ENFORCED_POLICY_FILE)


class Crash(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the agent catches it."""


def document(version):
    return desired_document(
        version,
        config={"v": version, "env": {"SF_VERSION": str(version)}},
        policies={"screen_lock_timeout_s": 100 + version},
    )


def parsed(version):
    return DesiredState.model_validate(document(version))


def versions_on_disk(config_dir):
    """The version each file says it belongs to (None: the file is missing)."""
    found = {}
    for name in FILES:
        path = config_dir / name
        if not path.exists():
            found[name] = None
        elif name == CONFIG_FILE:
            found[name] = json.loads(path.read_text())["v"]
        elif name == POLICIES_FILE:
            found[name] = json.loads(path.read_text())["screen_lock_timeout_s"] - 100
        elif name == ENV_FILE:
            found[name] = int(
                next(line for line in path.read_text().splitlines() if line.startswith("SF_VERSION="))[12:-1]
            )
        else:
            found[name] = json.loads(path.read_text())["version"]
    return found


def whole(version):
    return dict.fromkeys(FILES, version)


def leftovers(config_dir):
    if not config_dir.exists():
        return []
    return sorted(p.name for p in config_dir.iterdir() if p.name.startswith("."))


async def apply(pipeline, version, previous=None, **kwargs):
    await pipeline.apply(parsed(version), document(version), previous=previous, **kwargs)


@pytest.fixture
def config_dir(tmp_path):
    return tmp_path / "config"


@pytest.fixture
def make(disk_state, config_dir):
    def make(state=disk_state, **kwargs):
        return ApplyPipeline(state, default_handlers(config_dir), **kwargs)

    return make


async def test_apply_installs_every_file_and_records_last_known_good(disk_state, make, config_dir):
    pipeline = make()
    await apply(pipeline, 1)
    assert versions_on_disk(config_dir) == whole(1)
    assert disk_state.applied().version == 1
    assert disk_state.journal() is None
    assert leftovers(config_dir) == []


async def test_invalid_section_is_refused_before_anything_changes(disk_state, make, config_dir):
    pipeline = make()
    await apply(pipeline, 1)
    bad = desired_document(2, config={"env": {"bad-name": "x"}})
    with pytest.raises(InvalidConfig, match="bad-name"):
        await pipeline.apply(DesiredState.model_validate(bad), bad, previous=parsed(1))
    assert versions_on_disk(config_dir) == whole(1)
    assert disk_state.journal() is None


class FailingHandler:
    def __init__(self):
        self.reverted_to = "never"

    async def apply(self, desired):
        raise ApplyError("service restart failed", detail="pos-app exited with status 3")

    async def revert(self, previous):
        self.reverted_to = previous.version if previous else None


async def test_handler_failure_reverts_every_handler(disk_state, config_dir):
    memory, failing = MemoryHandler(), FailingHandler()
    pipeline = ApplyPipeline(disk_state, [*default_handlers(config_dir), memory, failing])
    failing_later = failing.apply
    failing.apply = memory.apply  # version 1 goes through
    await apply(pipeline, 1)
    failing.apply = failing_later

    with pytest.raises(ApplyError, match="service restart failed") as caught:
        await apply(pipeline, 2, previous=parsed(1))

    assert caught.value.detail == "pos-app exited with status 3"
    assert versions_on_disk(config_dir) == whole(1)
    assert memory.applied.version == 1
    assert memory.reverts == 1
    assert failing.reverted_to == 1
    assert disk_state.applied().version == 1
    assert disk_state.journal() is None
    assert leftovers(config_dir) == []


async def test_failed_post_apply_check_reverts_to_last_known_good(disk_state, make, config_dir):
    seen = []

    async def verify(desired):
        seen.append(versions_on_disk(config_dir))  # the checks run against the new files
        return None if desired.version == 1 else "check 'pos' failed: connection refused"

    pipeline = make(verify=verify)
    await apply(pipeline, 1)
    with pytest.raises(PostApplyUnhealthy, match="pos") as caught:
        await apply(pipeline, 2, previous=parsed(1))
    assert caught.value.detail == "check 'pos' failed: connection refused"
    assert seen == [whole(1), whole(2)]
    assert versions_on_disk(config_dir) == whole(1)
    assert disk_state.applied().version == 1
    assert leftovers(config_dir) == []


async def test_reverting_the_first_apply_restores_what_was_there_before(disk_state, make, config_dir):
    config_dir.mkdir()
    (config_dir / ENV_FILE).write_text("OPERATOR=1\n")

    async def unhealthy(desired):
        return "check 'x' failed"

    with pytest.raises(PostApplyUnhealthy):
        await apply(make(verify=unhealthy), 1)
    assert sorted(p.name for p in config_dir.iterdir()) == [ENV_FILE]
    assert (config_dir / ENV_FILE).read_text() == "OPERATOR=1\n"


async def test_a_cancelled_apply_is_reverted_before_the_cancellation_goes_on(disk_state, make, config_dir):
    started = asyncio.Event()

    async def slow_check(desired):
        started.set()
        await asyncio.sleep(30)

    pipeline = make(verify=slow_check)
    await apply(make(), 1)
    task = asyncio.create_task(apply(pipeline, 2, previous=parsed(1)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert versions_on_disk(config_dir) == whole(1)
    assert disk_state.journal() is None


async def test_a_file_that_cannot_be_replaced_fails_the_apply_and_keeps_the_old_set(
    disk_state, make, config_dir
):
    pipeline = make()
    await apply(pipeline, 1)
    (config_dir / POLICIES_FILE).unlink()
    (config_dir / POLICIES_FILE).mkdir()  # a directory in the way: no backup, no rename
    (config_dir / POLICIES_FILE / "x").write_text("")

    with pytest.raises(ApplyError) as caught:
        await apply(pipeline, 2, previous=parsed(1))

    assert "policies.json" in caught.value.detail
    assert json.loads((config_dir / CONFIG_FILE).read_text())["v"] == 1
    assert disk_state.applied().version == 1
    assert leftovers(config_dir) == []


# --- crash at every step ---------------------------------------------------------------

STEPS = [
    "journal",
    *(f"staged:{i}" for i in range(len(FILES))),
    "staged",
    "committing",
    *(f"renamed:{i}" for i in range(len(FILES))),
    "committed",
    "handlers",
    "verified",
    "recorded",
    "cleaned",
]
# From "recorded" on, version 2 is last-known-good: recovery keeps it.
SURVIVES = {"recorded", "cleaned"}


def test_the_crash_steps_are_the_steps_the_pipeline_takes(disk_state, make):
    taken = []
    asyncio.run(apply(make(on_step=taken.append), 1))
    assert taken == STEPS


@pytest.mark.parametrize("previous", [1, None], ids=["update", "first-apply"])
@pytest.mark.parametrize("step", STEPS)
async def test_a_crash_at_any_step_recovers_to_one_whole_version(
    tmp_path, disk_state, config_dir, step, previous
):
    if previous is not None:
        await apply(ApplyPipeline(disk_state, default_handlers(config_dir)), previous)

    def crash_at(name):
        if name == step:
            raise Crash(name)

    memory = MemoryHandler()
    pipeline = ApplyPipeline(disk_state, [*default_handlers(config_dir), memory], on_step=crash_at)
    with pytest.raises(Crash):
        await apply(pipeline, 2, previous=parsed(previous) if previous else None)
    disk_state.close()

    # The restarted agent: new state connection, new pipeline; recovery before anything else.
    state = AgentState.open(disk_state.directory)
    try:
        restarted = ApplyPipeline(state, default_handlers(config_dir))
        restarted.recover()
        expected = 2 if step in SURVIVES else previous
        assert versions_on_disk(config_dir) == whole(expected)
        assert state.applied().version == (expected or 0)
        assert state.journal() is None
        assert leftovers(config_dir) == []
        assert restarted.recover() is None  # idempotent

        # And the device converges when the desired state comes again.
        if expected != 2:
            await apply(restarted, 2, previous=parsed(previous) if previous else None)
        assert versions_on_disk(config_dir) == whole(2)
        assert state.applied().version == 2
    finally:
        state.close()


async def test_recovery_interrupted_by_another_crash_still_ends_whole(disk_state, config_dir):
    await apply(ApplyPipeline(disk_state, default_handlers(config_dir)), 1)

    def crash_at(name):
        if name == "renamed:2":
            raise Crash(name)

    with pytest.raises(Crash):
        await apply(ApplyPipeline(disk_state, default_handlers(config_dir), on_step=crash_at), 2)
    journal = disk_state.journal()
    assert journal.phase == "committing"
    # Recovery dies after putting back the first file only.
    first = journal.entries[0]
    __import__("os").replace(first["backup"], first["target"])
    disk_state.set_journal_phase("reverting")

    ApplyPipeline(disk_state, default_handlers(config_dir)).recover()
    assert versions_on_disk(config_dir) == whole(1)
    assert leftovers(config_dir) == []


async def test_the_next_apply_recovers_first_if_nobody_did(disk_state, config_dir):
    await apply(ApplyPipeline(disk_state, default_handlers(config_dir)), 1)

    def crash_at(name):
        if name == "renamed:1":
            raise Crash(name)

    with pytest.raises(Crash):
        await apply(ApplyPipeline(disk_state, default_handlers(config_dir), on_step=crash_at), 2)
    fresh = ApplyPipeline(disk_state, default_handlers(config_dir))
    await apply(fresh, 3, previous=parsed(1))
    assert versions_on_disk(config_dir) == whole(3)
    assert leftovers(config_dir) == []


async def test_an_apply_cancelled_while_files_are_being_renamed_is_reverted(disk_state, config_dir):
    await apply(ApplyPipeline(disk_state, default_handlers(config_dir)), 1)
    reached = asyncio.Event()
    loop = asyncio.get_running_loop()

    def note(name):
        if name == "renamed:1":
            loop.call_soon_threadsafe(reached.set)

    slow = ApplyPipeline(disk_state, default_handlers(config_dir), on_step=note, step_delay_s=0.05)
    task = asyncio.create_task(apply(slow, 2, previous=parsed(1)))
    await reached.wait()
    task.cancel()  # e.g. SIGTERM while the file work runs on its thread
    with pytest.raises(asyncio.CancelledError):
        await task
    assert versions_on_disk(config_dir) == whole(1)
    assert disk_state.applied().version == 1
    assert disk_state.journal() is None
    assert leftovers(config_dir) == []
