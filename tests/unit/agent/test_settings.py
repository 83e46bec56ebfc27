from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.settings import DEFAULT_STATE_DIR, AgentSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("STOREFLEET_AGENT_"):
            monkeypatch.delenv(name)


def test_defaults():
    settings = AgentSettings()
    assert settings.state_dir == DEFAULT_STATE_DIR
    assert settings.config_path == DEFAULT_STATE_DIR / "config"
    assert settings.health_interval_s is None
    assert (settings.reconnect_min_s, settings.reconnect_max_s) == (0.5, 30.0)
    assert settings.keepalive_s == 30


def test_environment_with_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("STOREFLEET_AGENT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("STOREFLEET_AGENT_TOKEN", "tok-secret-0123456789")
    monkeypatch.setenv("STOREFLEET_AGENT_HEALTH_INTERVAL_S", "5")
    settings = AgentSettings()
    assert settings.state_dir == tmp_path
    assert settings.config_path == tmp_path / "config"
    assert settings.health_interval_s == 5.0
    assert settings.token is not None
    assert settings.token.get_secret_value() == "tok-secret-0123456789"
    assert "tok-secret" not in repr(settings)


def test_arguments_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("STOREFLEET_AGENT_STATE_DIR", "/from/env")
    settings = AgentSettings(state_dir=Path("/from/args"), config_dir=Path("/etc/store"))
    assert settings.state_dir == Path("/from/args")
    assert settings.config_path == Path("/etc/store")


def test_server_url_must_be_https():
    assert AgentSettings(server_url="https://cp.example:8443/").server_url == "https://cp.example:8443"
    with pytest.raises(ValidationError, match="https"):
        AgentSettings(server_url="http://cp.example")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reconnect_min_s": 5.0, "reconnect_max_s": 1.0},
        {"reconnect_min_s": 0},
        {"health_interval_s": 0},
        {"keepalive_s": 1},
        {"connect_timeout_s": -1},
        {"broker_port": 70000},
        {"ca_file": Path("/ca.pem"), "ca_fingerprint": "sha256:" + "a" * 64},
    ],
)
def test_unsafe_or_contradictory_values_are_refused(kwargs):
    with pytest.raises(ValidationError):
        AgentSettings(**kwargs)
