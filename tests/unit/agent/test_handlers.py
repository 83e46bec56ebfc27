import asyncio
import json
import threading

import pytest

from agent.errors import ApplyError
from agent.handlers import CONFIG_FILE, POLICIES_FILE, FileConfigHandler, MemoryHandler
from protocol.messages import DesiredState
from tests.unit.agent.factories import desired_document


def desired(version, **kwargs):
    return DesiredState.model_validate(desired_document(version, **kwargs))


def read_json(path):
    return json.loads(path.read_text())


def tmp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


async def test_file_handler_writes_config_and_policies(tmp_path):
    config_dir = tmp_path / "config"
    handler = FileConfigHandler(config_dir)
    await handler.apply(desired(1, config={"pos": {"currency": "EUR"}}, policies={"lock_s": 300}))
    assert read_json(config_dir / CONFIG_FILE) == {"pos": {"currency": "EUR"}}
    assert read_json(config_dir / POLICIES_FILE) == {"lock_s": 300}

    await handler.apply(desired(2, config={"pos": {"currency": "CHF"}}, policies={}))
    assert read_json(config_dir / CONFIG_FILE) == {"pos": {"currency": "CHF"}}
    assert read_json(config_dir / POLICIES_FILE) == {}
    assert tmp_files(config_dir) == []


async def test_failed_install_restores_the_previous_config(tmp_path):
    handler = FileConfigHandler(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"old": true}\n')
    # policies.json is a non-empty directory: the second rename fails after the first succeeded.
    (tmp_path / POLICIES_FILE).mkdir()
    (tmp_path / POLICIES_FILE / "x").write_text("")

    with pytest.raises(ApplyError) as caught:
        await handler.apply(desired(2, config={"new": True}))

    assert "policies.json" in caught.value.detail or "directory" in caught.value.detail.lower()
    assert read_json(tmp_path / CONFIG_FILE) == {"old": True}
    assert tmp_files(tmp_path) == []


async def test_unwritable_config_dir_is_an_apply_error(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ApplyError, match="cannot create"):
        await FileConfigHandler(blocker / "config").apply(desired(1))


async def test_configuration_that_is_not_json_is_refused_before_writing(tmp_path):
    handler = FileConfigHandler(tmp_path)
    await handler.apply(desired(1, config={"a": 1}))
    with pytest.raises(ApplyError, match="not serialisable"):
        await handler.apply(desired(2, config={"a": float("nan")}))
    assert read_json(tmp_path / CONFIG_FILE) == {"a": 1}


async def test_readers_only_ever_see_a_complete_config(tmp_path):
    """A store application reading config.json while versions land sees old or new, never a mix."""
    handler = FileConfigHandler(tmp_path)
    big = {"blob": "x" * 200_000}
    await handler.apply(desired(1, config={"version": 1, **big}))
    stop = threading.Event()
    seen: set[int] = set()
    errors: list[Exception] = []

    def reader():
        while not stop.is_set():
            try:
                seen.add(read_json(tmp_path / CONFIG_FILE)["version"])
            except Exception as exc:
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(2, 30):
            await handler.apply(desired(version, config={"version": version, **big}))
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    assert errors == []
    assert seen <= set(range(1, 30))
    assert len(seen) > 1


async def test_memory_handler_keeps_the_last_applied_document():
    handler = MemoryHandler()
    await handler.apply(desired(1))
    await handler.apply(desired(2))
    assert handler.applied is not None
    assert handler.applied.version == 2
    assert handler.attempts == 2


async def test_memory_handler_injected_failures_keep_the_previous_document():
    handler = MemoryHandler(fail_versions={3})
    await handler.apply(desired(2))
    with pytest.raises(ApplyError, match="version 3"):
        await handler.apply(desired(3))
    assert handler.applied.version == 2

    always = MemoryHandler(failure_rate=1.0)
    with pytest.raises(ApplyError):
        await always.apply(desired(1))
    assert always.applied is None


async def test_memory_handler_random_failures_are_reproducible():
    async def outcomes(seed):
        handler = MemoryHandler(failure_rate=0.5, seed=seed)
        results = []
        for version in range(1, 40):
            try:
                await handler.apply(desired(version))
                results.append(True)
            except ApplyError:
                results.append(False)
        return results

    first = await outcomes(7)
    assert first == await outcomes(7)
    assert True in first
    assert False in first


def test_memory_handler_refuses_a_nonsense_rate():
    with pytest.raises(ValueError):
        MemoryHandler(failure_rate=1.5)
