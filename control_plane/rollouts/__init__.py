"""Staged rollouts of releases: waves, health gate, thresholds, windows, rollback."""
