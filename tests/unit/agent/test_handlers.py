import asyncio
import json
import subprocess
import threading

import pytest

from agent.errors import ApplyError, InvalidConfig
from agent.handlers import (
    CONFIG_FILE,
    ENFORCED_POLICY_FILE,
    ENV_FILE,
    POLICIES_FILE,
    EnvFileHandler,
    FileConfigHandler,
    MemoryHandler,
    PolicyHandler,
    default_handlers,
)
from agent.pipeline import ApplyPipeline
from agent.state import AgentState
from protocol.messages import DesiredState
from tests.unit.agent.factories import desired_document


def desired(version, **kwargs):
    return DesiredState.model_validate(desired_document(version, **kwargs))


def read_json(path):
    return json.loads(path.read_text())


def tmp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


async def install(pipeline, version, **kwargs):
    document = desired_document(version, **kwargs)
    await pipeline.apply(DesiredState.model_validate(document), document, previous=None)


@pytest.fixture
def pipeline(tmp_path):
    state = AgentState.in_memory()
    yield ApplyPipeline(state, default_handlers(tmp_path / "config"))
    state.close()


# --- configuration files -----------------------------------------------------------------


async def test_file_handlers_write_every_file(tmp_path, pipeline):
    config_dir = tmp_path / "config"
    await install(
        pipeline,
        1,
        config={"pos": {"currency": "EUR"}, "env": {"POS_CURRENCY": "EUR"}},
        policies={"screen_lock_timeout_s": 300, "usb_storage": False, "vendor_x": 1},
    )
    assert read_json(config_dir / CONFIG_FILE) == {"pos": {"currency": "EUR"}, "env": {"POS_CURRENCY": "EUR"}}
    assert read_json(config_dir / POLICIES_FILE) == {
        "screen_lock_timeout_s": 300,
        "usb_storage": False,
        "vendor_x": 1,
    }
    assert 'POS_CURRENCY="EUR"' in (config_dir / ENV_FILE).read_text().splitlines()
    enforced = read_json(config_dir / ENFORCED_POLICY_FILE)
    assert enforced["version"] == 1
    assert enforced["policies"]["screen_lock_timeout_s"] == 300
    assert enforced["policies"]["usb_storage"] is False
    assert enforced["policies"]["allowed_apps"] is None  # not managed
    assert enforced["unenforced"] == ["vendor_x"]

    await install(pipeline, 2, config={"pos": {"currency": "CHF"}}, policies={})
    assert read_json(config_dir / CONFIG_FILE) == {"pos": {"currency": "CHF"}}
    assert read_json(config_dir / POLICIES_FILE) == {}
    # No env any more: the file stays, empty of variables, so apps see the removal.
    assert [
        line for line in (config_dir / ENV_FILE).read_text().splitlines() if not line.startswith("#")
    ] == []
    assert tmp_files(config_dir) == []


def test_configuration_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(InvalidConfig, match="not serialisable"):
        FileConfigHandler(tmp_path).render(desired(2, config={"a": float("nan")}))


async def test_readers_only_ever_see_a_complete_config(tmp_path, pipeline):
    """A store application reading config.json while versions land sees old or new, never a mix."""
    config_dir = tmp_path / "config"
    big = {"blob": "x" * 200_000}
    await install(pipeline, 1, config={"version": 1, **big})
    stop = threading.Event()
    seen: set[int] = set()
    errors: list[Exception] = []

    def reader():
        while not stop.is_set():
            try:
                seen.add(read_json(config_dir / CONFIG_FILE)["version"])
            except Exception as exc:
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(2, 30):
            await install(pipeline, version, config={"version": version, **big})
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    assert errors == []
    assert seen <= set(range(1, 30))
    assert len(seen) > 1


# --- environment -------------------------------------------------------------------------


def env_lines(version=1, **env):
    data = (
        EnvFileHandler(__import__("pathlib").Path("/x")).render(desired(version, config={"env": env}))[0].data
    )
    return data.decode().splitlines()


def test_env_file_quotes_values_so_neither_systemd_nor_a_shell_expands_them(tmp_path):
    env = {
        "PLAIN": "eur",
        "SPACES": " a b ",
        "QUOTE": 'say "hi"',
        "DOLLAR": "$HOME",
        "BACKSLASH": "a\\b",
        "TICK": "`id`",
    }
    path = tmp_path / ENV_FILE
    path.write_bytes(EnvFileHandler(tmp_path).render(desired(4, config={"env": env}))[0].data)
    assert path.read_text().startswith("# storefleet desired state version 4")
    # A POSIX shell reads exactly the values back (systemd's EnvironmentFile parser uses the
    # same double-quote escapes).
    script = f"set -a; . {path}; " + "; ".join(f'printf "%s\\0" "${name}"' for name in env)
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [value.encode() for value in env.values()]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"lower": "x"}, "not a valid name"),
        ({"1ABC": "x"}, "not a valid name"),
        ({"A-B": "x"}, "not a valid name"),
        ({"OK": "two\nlines"}, "newline or NUL"),
        ({"OK": "carriage\rreturn"}, "newline or NUL"),
        ({"OK": "nul\0byte"}, "newline or NUL"),
        ({"OK": 5}, "must be a string"),
        ({"OK": None}, "must be a string"),
        ({"OK": "x" * 5000}, "longer than"),
        (["A=1"], "must be an object"),
        ({f"V{i}": "x" for i in range(300)}, "at most"),
    ],
)
def test_env_validation_refuses_bad_names_and_values(tmp_path, env, message):
    with pytest.raises(InvalidConfig, match=message):
        EnvFileHandler(tmp_path).render(desired(1, config={"env": env}))


# --- policies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policies", "field"),
    [
        ({"screen_lock_timeout_s": -1}, "policies.screen_lock_timeout_s"),
        ({"screen_lock_timeout_s": 100_000}, "policies.screen_lock_timeout_s"),
        ({"screen_lock_timeout_s": "300"}, "policies.screen_lock_timeout_s"),
        ({"screen_lock_timeout_s": True}, "policies.screen_lock_timeout_s"),
        ({"usb_storage": 1}, "policies.usb_storage"),
        ({"allowed_apps": "com.example.pos"}, "policies.allowed_apps"),
        ({"allowed_apps": ["com.example.pos", "bad app!"]}, "policies.allowed_apps.1"),
        ({"allowed_apps": ["a.b", "a.b"]}, "twice"),
        ({"kiosk_mode": True}, "kiosk_app"),
        ({"kiosk_mode": True, "kiosk_app": "c.d", "allowed_apps": ["a.b"]}, "one of allowed_apps"),
    ],
)
def test_policy_validation_names_the_policy(tmp_path, policies, field):
    with pytest.raises(InvalidConfig, match=field.replace(".", "\\.")):
        PolicyHandler(tmp_path).render(desired(1, policies=policies))


def test_policy_handler_enforces_known_policies_and_lists_unknown_ones(tmp_path):
    policies = {
        "screen_lock_timeout_s": 0,
        "allowed_apps": ["com.example.pos", "com.example.kiosk"],
        "usb_storage": False,
        "kiosk_mode": True,
        "kiosk_app": "com.example.kiosk",
        "future_policy": {"x": 1},
    }
    [output] = PolicyHandler(tmp_path).render(desired(9, policies=policies))
    assert output.path == tmp_path / ENFORCED_POLICY_FILE
    document = json.loads(output.data)
    assert document == {
        "version": 9,
        "policies": {key: value for key, value in policies.items() if key != "future_policy"},
        "unenforced": ["future_policy"],
    }


# --- the memory handler (simulator) ------------------------------------------------------


async def test_memory_handler_validates_like_a_device():
    handler = MemoryHandler()
    with pytest.raises(InvalidConfig):
        handler.validate(desired(1, config={"env": {"bad name": "x"}}))
    with pytest.raises(InvalidConfig):
        handler.validate(desired(1, policies={"usb_storage": "no"}))
    handler.validate(desired(1))


async def test_memory_handler_reverts_to_the_previous_document():
    handler = MemoryHandler()
    await handler.apply(desired(1))
    await handler.apply(desired(2))
    await handler.revert(desired(1))
    assert handler.applied.version == 1
    await handler.revert(None)
    assert handler.applied is None
    assert handler.reverts == 2


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
