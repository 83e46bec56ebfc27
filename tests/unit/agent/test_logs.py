import json
import logging

from agent.logs import DeviceLog, JsonFormatter, TextFormatter


def record_of(caplog, emit):
    with caplog.at_level(logging.INFO, logger="agent.test"):
        emit()
    return caplog.records[-1]


def test_device_log_binds_the_device_id(caplog):
    log = DeviceLog(logging.getLogger("agent.test"), "dev-0001")
    record = record_of(caplog, lambda: log.info("applied version %s", 3, extra={"rollout": "r1"}))
    assert record.device_id == "dev-0001"
    assert record.rollout == "r1"
    assert TextFormatter().format(record).startswith("[dev-0001] ")
    entry = json.loads(JsonFormatter().format(record))
    assert entry["device_id"] == "dev-0001"
    assert entry["msg"] == "applied version 3"
    assert entry["level"] == "info"


def test_records_without_a_device_format_plainly(caplog):
    record = record_of(caplog, lambda: logging.getLogger("agent.test").info("starting"))
    assert "starting" in TextFormatter().format(record)
    assert "device_id" not in json.loads(JsonFormatter().format(record))
