"""Operator commands to devices: ping, reboot, collect_logs (with upload), rotate_certificate."""
