"""Releases: immutable, named configuration changes that rollouts carry to devices."""
