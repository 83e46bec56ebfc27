import os
import stat

import pytest

from agent.files import PRIVATE, atomic_write


def leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_creates_and_replaces(tmp_path):
    target = tmp_path / "sub" / "config.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert leftovers(target.parent) == []


def test_private_file_is_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "device.key", b"secret", mode=PRIVATE)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "device.key").stat().st_mode) == 0o600


def test_failed_replace_keeps_the_old_content_and_no_temporary_file(tmp_path):
    target = tmp_path / "config.json"
    target.mkdir()  # a directory cannot be replaced by a file
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.is_dir()
    assert leftovers(tmp_path) == []
