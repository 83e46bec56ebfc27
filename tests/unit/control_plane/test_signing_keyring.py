"""The config-signing keyring: add, activate, retire — and what survives a restart."""

import stat

import pytest

from control_plane.errors import Conflict, NotFound
from control_plane.pki.signing_keys import SigningKeyring


def test_rotation_keeps_trust_overlapping_and_survives_reload(tmp_path):
    directory = tmp_path / "signing"
    keyring = SigningKeyring.load_or_create(directory)
    old = keyring.active_kid

    new = keyring.add()
    assert keyring.active_kid == old  # trusted first, signing later
    assert set(keyring.trusted()) == {old, new}
    assert stat.S_IMODE((directory / f"{new}.key").stat().st_mode) == 0o600
    assert SigningKeyring.load_or_create(directory).active_kid == old  # a restart does not activate it

    keyring.activate(new)
    reloaded = SigningKeyring.load_or_create(directory)
    assert reloaded.active_kid == new
    assert set(reloaded.trusted()) == {old, new}

    with pytest.raises(Conflict):
        reloaded.retire(new)
    reloaded.retire(old)
    assert set(reloaded.trusted()) == {new}
    assert set(SigningKeyring.load_or_create(directory).trusted()) == {new}
    assert (directory / "retired" / f"{old}.key").exists()

    with pytest.raises(NotFound):
        reloaded.activate(old)
